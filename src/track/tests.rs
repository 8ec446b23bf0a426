use super::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

struct Fx {
    _d: tempfile::TempDir,
    store: Store,
    img: std::path::PathBuf,
}

impl Fx {
    fn file(&self) -> fs::File {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.img)
            .unwrap()
    }
}

fn fx(size: u64) -> Fx {
    let d = tempfile::tempdir().unwrap();
    let store = Store::init(&d.path().join("s"), 65536).unwrap();
    let img = d.path().join("disk.img");
    fs::File::create(&img).unwrap().set_len(size).unwrap();
    Fx { _d: d, store, img }
}

fn runs(t: &Tracker, since: u32) -> Vec<(u64, u64)> {
    t.changed_since("R", since)
        .unwrap()
        .into_iter()
        .map(|r| (r.start, r.count))
        .collect()
}

#[test]
fn clean_reopen_keeps_exact_changes() {
    let f = fx(64 << 20);
    let id = identity_of(&f.img).unwrap();
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    t.before_write(0, 65536).unwrap();
    let r1 = t.advance(id).unwrap();
    t.before_write(3 * 65536 + 10, 65536).unwrap();
    t.close(id).unwrap();
    drop(t);
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert_eq!(t.report(), &OpenReport::default());
    assert_eq!(runs(&t, r1), vec![(3, 2)]);
    assert!(
        t.changed_since("before", 0).is_err(),
        "seq 0 predates tracking"
    );
}

#[test]
fn crash_without_flush_reports_whole_marked_regions() {
    let f = fx(256 << 20); // 4096 blocks, 4 regions
    let id = identity_of(&f.img).unwrap();
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    let r1 = t.advance(id).unwrap();
    t.before_write(2000 * 65536, 4096).unwrap();
    drop(t); // kill -9: no flush, no close
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert_eq!(t.report().recovered_regions, 1);
    assert_eq!(runs(&t, r1), vec![(1024, 1024)]);
    // Recovery was flushed: a second open is clean and still reports the region.
    drop(t);
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert_eq!(t.report().recovered_regions, 0);
    assert_eq!(runs(&t, r1), vec![(1024, 1024)]);
}

#[test]
fn outside_write_resize_and_damage_are_never_silent() {
    let f = fx(64 << 20);
    let id = identity_of(&f.img).unwrap();
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    let r1 = t.advance(id).unwrap();
    t.close(id).unwrap();
    drop(t);

    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut w = fs::OpenOptions::new().write(true).open(&f.img).unwrap();
    w.write_all(b"outside").unwrap();
    drop(w);
    let id2 = identity_of(&f.img).unwrap();
    let mut t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert!(
        t.report()
            .lost
            .as_deref()
            .unwrap()
            .contains("outside the mount")
    );
    let e = t.changed_since("R1", r1).unwrap_err().to_string();
    assert!(e.contains("outside the mount"), "{e}");
    // A point made after the restart is exact again.
    let r2 = t.advance(id2).unwrap();
    assert!(runs(&t, r2).is_empty());
    t.close(id2).unwrap();
    drop(t);

    fs::OpenOptions::new()
        .write(true)
        .open(&f.img)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r2 + 1).unwrap();
    assert!(t.report().lost.as_deref().unwrap().contains("resized"));
    assert!(t.changed_since("R2", r2).is_err());
    assert_eq!(t.disk_size(), 128 << 20);
    drop(t);

    let mut m = fs::read(f.store.map_path("d")).unwrap();
    for b in &mut m[..8192] {
        *b ^= 0x55;
    }
    fs::write(f.store.map_path("d"), &m).unwrap();
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r2 + 1).unwrap();
    assert!(t.report().lost.as_deref().unwrap().contains("damaged"));
    drop(t);

    fs::remove_file(f.store.log_path("d")).unwrap();
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r2 + 1).unwrap();
    assert!(
        t.report()
            .lost
            .as_deref()
            .unwrap()
            .contains("log is missing")
    );
}

/// A log write that fails refuses the data write, and must not leave the region looking
/// marked: the next write to it would otherwise be acknowledged with no durable mark, and a
/// crash would then lose it.
#[test]
fn a_failed_mark_is_made_again_by_the_next_write() {
    let f = fx(256 << 20); // 4 regions
    let id = identity_of(&f.img).unwrap();
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    let r1 = t.advance(id).unwrap();
    super::powerloss::fail_next_write(&f.store.log_path("d"));
    let e = t.before_write(1500 * 65536, 4096).unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    assert_eq!(t.dirty_regions(), 0);
    // The caller did not write. The next write to that region is acknowledged...
    t.before_write(1600 * 65536, 4096).unwrap();
    assert_eq!(t.dirty_regions(), 1);
    drop(t); // ...then kill -9.
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert_eq!(t.report().recovered_regions, 1);
    assert_eq!(runs(&t, r1), vec![(1024, 1024)]);
}

#[test]
fn seq_floor_from_points_wins_over_an_older_header() {
    let f = fx(1 << 20);
    let id = identity_of(&f.img).unwrap();
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    t.close(id).unwrap();
    drop(t);
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, 9).unwrap();
    assert_eq!(t.current_seq(), 9);
}

/// Power loss at every kind of moment of the last operation: during region marking, map page
/// writes, header commits and log clears. After it, changes since every committed point still
/// include every acknowledged write (invariant 2), and tracking is not declared lost unless
/// the image really holds bytes tracking never acknowledged.
#[test]
fn power_loss_never_misses_an_acknowledged_write() {
    use super::powerloss::{self, Event};
    use crate::engine::Engine;
    use crate::store::records::RefState;
    use std::collections::BTreeSet;

    const BS: u64 = 4096;
    const SIZE: u64 = 3 * REGION_BLOCKS * BS + 5 * BS; // 4 regions, the last one short
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for trial in 0..40 {
        let d = tempfile::tempdir().unwrap();
        let store = Store::init(&d.path().join("s"), BS as u32).unwrap();
        let img = d.path().join("disk.img");
        fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
        let dir = store.root().to_path_buf();
        // Markers: 2k = write k acknowledged, 2k+1 = point k committed.
        let mut writes: Vec<BTreeSet<u64>> = Vec::new();
        let mut points: Vec<String> = Vec::new();
        let steps = 1 + rnd(30);
        let mut last_is_write = false;
        let mut before_last = 0;
        let mut end = 0;
        {
            let e = Engine::open(store.clone()).unwrap();
            e.disk_add("d", &img).unwrap();
            let disk = e.disk("d").unwrap();
            for step in 0..steps {
                before_last = powerloss::events(&dir).len();
                last_is_write = false;
                match rnd(10) {
                    0..=5 => {
                        let off = rnd(SIZE - 1);
                        let len = (1 + rnd(3 * BS)).min(SIZE - off);
                        disk.write_at(&vec![step as u8 + 1; len as usize], off)
                            .unwrap();
                        writes.push((off / BS..=(off + len - 1) / BS).collect());
                        powerloss::mark(&dir, 2 * (writes.len() as u64 - 1));
                        last_is_write = true;
                    }
                    6 | 7 => {
                        let name = format!("p{}", points.len());
                        e.ref_create(&name, None, RefState::Plain).unwrap();
                        points.push(name);
                        powerloss::mark(&dir, 2 * (points.len() as u64 - 1) + 1);
                    }
                    _ => disk.flush().unwrap(),
                }
                end = powerloss::events(&dir).len();
            }
        }
        // Events after the last operation (the engine's clean close) are never reached.
        let events = powerloss::events(&dir);
        let cut = before_last + rnd((end - before_last) as u64 + 1) as usize;
        let files = powerloss::state_at(&events, cut, || rnd(2) == 0);
        // What the world knew at the cut: acknowledged writes, committed points.
        let mut committed = 0usize;
        let mut unacked_write = last_is_write;
        let mut written_after: Vec<BTreeSet<u64>> = Vec::new();
        for e in &events[..cut] {
            if let Event::Mark(_, m) = e {
                if m % 2 == 0 {
                    let blocks = &writes[(*m / 2) as usize];
                    for w in written_after.iter_mut() {
                        w.extend(blocks.iter().copied());
                    }
                    if *m / 2 == writes.len() as u64 - 1 {
                        unacked_write = false;
                    }
                } else {
                    committed += 1;
                    written_after.push(BTreeSet::new());
                }
            }
        }
        for (p, bytes) in &files {
            fs::write(p, bytes).unwrap();
        }
        for name in &points[committed..] {
            fs::remove_file(store.ref_path(name)).unwrap();
        }
        let e = Engine::open(store.clone()).unwrap();
        let disk = e.disk("d").unwrap();
        let t = disk.tracker();
        let ctx = format!("trial {trial} cut {cut} of {}..{end}", before_last);
        if let Some(why) = &t.report().lost {
            // Only the last write's bytes can be in the image without an acknowledged mark.
            assert!(unacked_write, "{ctx}: tracking declared lost: {why}");
            for p in &points[..committed] {
                let seq = store.read_ref(p).unwrap().disks["d"].seq;
                assert!(t.changed_since(p, seq).is_err(), "{ctx}: loss is silent");
            }
            continue;
        }
        for (i, want) in written_after.iter().enumerate() {
            let seq = store.read_ref(&points[i]).unwrap().disks["d"].seq;
            let got: BTreeSet<u64> = t
                .changed_since(&points[i], seq)
                .unwrap()
                .iter()
                .flat_map(|r| r.start..r.start + r.count)
                .collect();
            let missed: Vec<_> = want.difference(&got).collect();
            assert!(
                missed.is_empty(),
                "{ctx}: point {} misses {missed:?}",
                points[i]
            );
        }
    }
}

#[test]
fn open_and_close_without_writes_change_no_byte() {
    let f = fx(8 << 20);
    let id = identity_of(&f.img).unwrap();
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    t.before_write(65536, 10).unwrap();
    let r1 = t.advance(id).unwrap();
    t.close(id).unwrap();
    drop(t);
    let files = |s: &Store| {
        (
            fs::read(s.map_path("d")).unwrap(),
            fs::read(s.log_path("d")).unwrap(),
        )
    };
    let before = files(&f.store);
    let mut t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    t.flush(id).unwrap();
    t.close(id).unwrap();
    drop(t);
    assert!(
        files(&f.store) == before,
        "a no-op open and close rewrote tracking state"
    );
    // A real change is still written.
    let mut t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    t.before_write(0, 1).unwrap();
    t.close(id).unwrap();
    drop(t);
    assert!(files(&f.store).0 != before.0);
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert_eq!(runs(&t, r1), vec![(0, 1)]);
}

/// A tracked write, as `LiveDisk::write_at` makes it: stamp, then the data.
fn tracked(t: &mut Tracker, f: &Fx, off: u64, data: &[u8]) {
    t.before_write(off, data.len() as u64).unwrap();
    f.file().write_all_at(data, off).unwrap();
}

fn outside(f: &Fx, off: u64, data: &[u8]) {
    // Past any timestamp tick of the last tracked change: what a later process would see.
    std::thread::sleep(std::time::Duration::from_millis(20));
    f.file().write_all_at(data, off).unwrap();
}

fn blocks(t: &Tracker, since: u32) -> Vec<u64> {
    t.changed_since("R", since)
        .unwrap()
        .iter()
        .flat_map(|r| r.start..r.start + r.count)
        .collect()
}

/// The unclean-stop gap (issue 13): after a kill -9 the log holds marks and the image's times
/// moved for tracked writes, so a write made straight to the image before the next open shows
/// only in its bytes. It lands in a region that has data and went clean long ago, in one that
/// went clean in the last flush, and in a hole; each block is found, and nothing else.
#[test]
fn outside_writes_after_a_crash_are_found_by_their_bytes() {
    const BS: u64 = 65536;
    let f = fx(8 * REGION_BLOCKS * BS); // 8 regions
    let file = f.file();
    for r in [2, 5] {
        file.write_all_at(&[r as u8; 3 * BS as usize], r * REGION_BLOCKS * BS)
            .unwrap();
    }
    let id = identity_of(&f.img).unwrap();
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    assert!(
        t.report().bytes_read >= 6 * BS,
        "the image's data is digested at create"
    );
    let r1 = t.advance(id).unwrap();
    tracked(
        &mut t,
        &f,
        3 * REGION_BLOCKS * BS + 7,
        b"clean since the last flush",
    );
    t.flush(identity_of(&f.img).unwrap()).unwrap();
    t.flush(identity_of(&f.img).unwrap()).unwrap(); // region 3 idle for an interval: clean
    tracked(&mut t, &f, 7 * REGION_BLOCKS * BS, b"marked at the crash");
    t.flush(identity_of(&f.img).unwrap()).unwrap();
    tracked(&mut t, &f, 7 * REGION_BLOCKS * BS + BS, b"unflushed");
    drop(t); // kill -9

    outside(&f, 2 * REGION_BLOCKS * BS + BS + 5, b"old data");
    outside(&f, 3 * REGION_BLOCKS * BS + 100, b"recent data");
    outside(&f, 6 * REGION_BLOCKS * BS + 9 * BS, b"hole");
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    let rep = t.report().clone();
    assert!(rep.verified && rep.lost.is_none(), "{rep:?}");
    assert_eq!(rep.recovered_regions, 1);
    assert_eq!(rep.unproven_blocks, 3, "{rep:?}");
    let mut want = vec![
        2 * REGION_BLOCKS + 1,
        3 * REGION_BLOCKS,
        6 * REGION_BLOCKS + 9,
    ];
    want.extend(7 * REGION_BLOCKS..8 * REGION_BLOCKS);
    assert_eq!(blocks(&t, r1), want);
    drop(t);

    // The recovery recorded what it found: another crash finds nothing new.
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert_eq!(t.report().unproven_blocks, 0);
    assert_eq!(blocks(&t, r1), want);
}

/// An outside write into a region that was written and went clean before the crash must be
/// compared with the bytes the tracked write left, not with older ones; and a block changed
/// back to the bytes it had is no change.
#[test]
fn digests_follow_tracked_writes() {
    const BS: u64 = 65536;
    let f = fx(4 * REGION_BLOCKS * BS);
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    let id = identity_of(&f.img).unwrap();
    let r1 = t.advance(id).unwrap();
    tracked(&mut t, &f, BS, &[1; 100]);
    tracked(&mut t, &f, 2 * BS, &[2; 100]);
    let r2 = t.advance(identity_of(&f.img).unwrap()).unwrap();
    t.flush(identity_of(&f.img).unwrap()).unwrap(); // region 0 goes clean
    tracked(&mut t, &f, REGION_BLOCKS * BS, b"keeps a mark");
    drop(t);
    outside(&f, 2 * BS, &[9; 100]);
    outside(&f, BS, &[1; 100]); // the same bytes again
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r2 + 1).unwrap();
    assert_eq!(t.report().unproven_blocks, 1);
    let mut want = vec![2];
    want.extend(REGION_BLOCKS..2 * REGION_BLOCKS);
    assert_eq!(blocks(&t, r2), want);
    assert_eq!(&blocks(&t, r1)[..2], &[1, 2]);
}

/// A settled disk (idle, synced, digests recorded, log empty) opens after a crash without
/// reading the image; an outside write after it changes the image's times, and is loud.
#[test]
fn a_settled_disk_opens_without_reading_and_still_sees_outside_writes() {
    const BS: u64 = 65536;
    let f = fx(4 * REGION_BLOCKS * BS);
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    let r1 = t.advance(identity_of(&f.img).unwrap()).unwrap();
    tracked(&mut t, &f, 5 * BS, &[5; 4096]);
    t.flush(identity_of(&f.img).unwrap()).unwrap();
    assert!(t.needs_settle());
    f.file().sync_all().unwrap();
    t.settle(identity_of(&f.img).unwrap()).unwrap();
    assert!(!t.needs_settle());
    drop(t); // kill -9 of an idle disk

    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    let rep = t.report().clone();
    assert!(!rep.verified && rep.bytes_read == 0, "{rep:?}");
    assert_eq!(blocks(&t, r1), vec![5]);
    assert!(
        !t.needs_settle(),
        "the settled identity is still the image's"
    );
    drop(t);

    outside(&f, 3 * REGION_BLOCKS * BS, b"x");
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert!(
        t.report()
            .lost
            .as_deref()
            .unwrap()
            .contains("outside the mount")
    );
}

/// With no marks but the open flag set (a point was made, then kill -9) and an identity that
/// is not settled, equal times prove nothing (a write may share the last one's timestamp
/// tick on a coarse clock): the open checks the bytes. With settled times it need not.
#[test]
fn an_unsettled_crash_with_an_empty_log_is_checked() {
    const BS: u64 = 65536;
    let f = fx(2 * REGION_BLOCKS * BS);
    f.file().write_all_at(b"data", 3 * BS).unwrap();
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    let r1 = t.advance(identity_of(&f.img).unwrap()).unwrap();
    drop(t);
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    let rep = t.report().clone();
    assert!(
        rep.verified && rep.bytes_read > 0 && rep.lost.is_none(),
        "{rep:?}"
    );
    assert!(blocks(&t, r1).is_empty());
}

/// Tracking state written by a release that kept no digests (map minor 0, no digest epoch,
/// no digest file) opens: after a clean stop it records digests and stamps nothing; after an
/// unclean one every block counts as changed, since none can be proven.
#[test]
fn older_tracking_state_without_digests_opens_safely() {
    const BS: u64 = 65536;
    let older = |f: &Fx, open_flag: bool| {
        let p = f.store.map_path("d");
        let mut m = fs::read(&p).unwrap();
        for slot in [0, mapfile::PAGE] {
            let b = &mut m[slot..slot + mapfile::PAGE];
            b[10..12].copy_from_slice(&0u16.to_le_bytes());
            b[368..380].fill(0);
            let flags = u32::from_le_bytes(b[56..60].try_into().unwrap());
            let flags = if open_flag {
                flags | FLAG_OPEN
            } else {
                flags & !FLAG_OPEN
            };
            b[56..60].copy_from_slice(&flags.to_le_bytes());
            let c = crate::format::crc(&b[..mapfile::PAGE - 4]);
            b[mapfile::PAGE - 4..].copy_from_slice(&c.to_le_bytes());
        }
        fs::write(&p, &m).unwrap();
        let _ = fs::remove_file(f.store.digest_path("d"));
    };
    let f = fx(3 * REGION_BLOCKS * BS);
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    let r1 = t.advance(identity_of(&f.img).unwrap()).unwrap();
    tracked(&mut t, &f, 2 * BS, &[2; 10]);
    t.close(identity_of(&f.img).unwrap()).unwrap();
    drop(t);

    older(&f, false);
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert_eq!(t.report().lost, None);
    assert!(!t.report().verified);
    assert_eq!(blocks(&t, r1), vec![2]);
    assert!(
        f.store.digest_path("d").exists(),
        "digests recorded at a clean open"
    );
    let mut t = t;
    tracked(&mut t, &f, 3 * BS, b"then kill -9");
    drop(t);

    older(&f, true);
    outside(&f, REGION_BLOCKS * BS, b"x");
    let mut t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert!(t.report().verified && t.report().lost.is_none());
    assert_eq!(
        blocks(&t, r1).len() as u64,
        t.map().nblocks(),
        "nothing proven"
    );
    // From here on the digests are known again: the next crash costs only what changed.
    let r2 = t.advance(identity_of(&f.img).unwrap()).unwrap();
    tracked(&mut t, &f, 0, b"z");
    drop(t);
    outside(&f, 2 * REGION_BLOCKS * BS, b"y");
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r2 + 1).unwrap();
    let mut want: Vec<u64> = (0..REGION_BLOCKS).collect();
    want.push(2 * REGION_BLOCKS);
    assert_eq!(blocks(&t, r2), want);
}

/// A damaged digest page proves nothing about its region after an unclean stop: every block
/// of it counts as changed, and tracking goes on.
#[test]
fn a_damaged_digest_page_counts_its_region_as_changed() {
    const BS: u64 = 4096;
    let d = tempfile::tempdir().unwrap();
    let store = Store::init(&d.path().join("s"), BS as u32).unwrap();
    let img = d.path().join("disk.img");
    let f = Fx { _d: d, store, img };
    let file = fs::File::create(&f.img).unwrap();
    file.set_len(2 * REGION_BLOCKS * BS).unwrap();
    file.write_all_at(&[3; 4096], REGION_BLOCKS * BS + 5 * BS)
        .unwrap();
    let mut t = Tracker::create(&f.store, "d", &f.file(), &f.img, 1).unwrap();
    let r1 = t.advance(identity_of(&f.img).unwrap()).unwrap();
    tracked(&mut t, &f, 0, b"a");
    drop(t);
    // Region 1's page: after the header and one table page.
    let p = f.store.digest_path("d");
    let mut g = fs::read(&p).unwrap();
    g[2 * 4096 + 8 * 1024 + 5 * 8] ^= 0x10;
    fs::write(&p, &g).unwrap();
    let t = Tracker::open(&f.store, "d", &f.file(), &f.img, r1 + 1).unwrap();
    assert!(t.report().lost.is_none());
    assert_eq!(blocks(&t, r1), (0..2 * REGION_BLOCKS).collect::<Vec<_>>());
}

/// Power loss at every sync point of a history of writes, flushes, settles and points, and
/// then a write made straight to the image before the next open (issue 13). The image keeps
/// every byte written, including writes after the cut, which tracking never acknowledged: they
/// are outside writes too. After the open, for every point committed before the cut, every
/// block whose bytes differ from the point's (a model of the image at each point) is in
/// `changes` since it, or tracking is declared lost for it, which is allowed only when the
/// log held no mark at the cut (then the image's times moved with no tracked write to explain
/// them, the loud path that does not need digests).
#[test]
fn power_loss_then_an_outside_write_is_never_missed() {
    use super::powerloss::{self, Event};
    use crate::engine::Engine;
    use crate::store::records::RefState;
    use digest::block_digest;

    const BS: u64 = 4096;
    const SIZE: u64 = 3 * REGION_BLOCKS * BS + 5 * BS;
    const NB: u64 = SIZE.div_ceil(BS);
    let mut seed = match std::env::var("VMREF_TEST_SEED") {
        Ok(v) => v.parse().unwrap(),
        Err(_) => 0x2545_f491_4f6c_dd1d_u64,
    };
    eprintln!("seed {seed} (replay with VMREF_TEST_SEED={seed})");
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let digests = |img: &[u8]| -> Vec<u64> { img.chunks(BS as usize).map(block_digest).collect() };
    let (mut cuts_total, mut lost_total) = (0, 0);
    for trial in 0..12 {
        let d = tempfile::tempdir().unwrap();
        let store = Store::init(&d.path().join("s"), BS as u32).unwrap();
        let img = d.path().join("disk.img");
        let mut model = vec![0u8; SIZE as usize];
        // Data that was there before the disk was registered, in two regions.
        for k in 0..40 {
            let off = (REGION_BLOCKS + k * 37) * BS;
            model[off as usize..(off + 100) as usize].fill(k as u8 + 1);
        }
        model[(2 * REGION_BLOCKS * BS) as usize] = 7;
        fs::write(&img, &model).unwrap();
        let dir = store.root().to_path_buf();
        // Markers: 2k+1 = point k committed; 0 = the disk exists (cuts start after it).
        let mut points: Vec<(String, Vec<u64>)> = Vec::new();
        let start;
        {
            let e = Engine::open(store.clone()).unwrap();
            e.disk_add("d", &img).unwrap();
            powerloss::mark(&dir, 0);
            start = powerloss::events(&dir).len();
            let disk = e.disk("d").unwrap();
            for step in 0..1 + rnd(30) {
                match rnd(12) {
                    0..=5 => {
                        let off = if rnd(3) == 0 {
                            rnd(SIZE - 1)
                        } else {
                            rnd(8 * BS)
                        };
                        let len = (1 + rnd(3 * BS)).min(SIZE - off);
                        let data = vec![step as u8 ^ 0xa5; len as usize];
                        disk.write_at(&data, off).unwrap();
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    6 | 7 => {
                        let name = format!("p{}", points.len());
                        e.ref_create(&name, None, RefState::Plain).unwrap();
                        points.push((name, digests(&model)));
                        powerloss::mark(&dir, 2 * points.len() as u64 - 1);
                    }
                    8 => {
                        let _q = disk.quiesce();
                        let id = identity_of(&img).unwrap();
                        disk.tracker().settle(id).unwrap();
                    }
                    _ => disk.flush().unwrap(),
                }
            }
        }
        let events = powerloss::events(&dir);
        let records: Vec<Vec<u8>> = points
            .iter()
            .map(|(n, _)| fs::read(store.ref_path(n)).unwrap())
            .collect();
        let tracked: BTreeSet<PathBuf> = events
            .iter()
            .filter_map(|e| match e {
                Event::Write(p, ..) | Event::Sync(p, _) => Some(p.clone()),
                Event::Mark(..) => None,
            })
            .collect();
        // Every sync point, and a few random cuts between them.
        let mut cuts: Vec<usize> = (start..=events.len())
            .filter(|&c| matches!(events[c - 1], Event::Sync(..)))
            .collect();
        for _ in 0..4 {
            cuts.push(start + rnd((events.len() - start) as u64 + 1) as usize);
        }
        for cut in cuts {
            cuts_total += 1;
            let files = powerloss::state_at(&events, cut, || rnd(2) == 0);
            for p in &tracked {
                match files.get(p) {
                    Some(b) => fs::write(p, b).unwrap(),
                    None => {
                        let _ = fs::remove_file(p);
                    }
                }
            }
            let committed = events[..cut]
                .iter()
                .filter(|e| matches!(e, Event::Mark(_, m) if m % 2 == 1))
                .count();
            for (i, (name, _)) in points.iter().enumerate() {
                if i < committed {
                    fs::write(store.ref_path(name), &records[i]).unwrap();
                } else {
                    let _ = fs::remove_file(store.ref_path(name));
                }
            }
            let log_marked = files
                .get(&store.log_path("d"))
                .and_then(|b| {
                    fs::write(d.path().join("log.copy"), b).unwrap();
                    DirtyLog::open(&d.path().join("log.copy"), 4).ok()
                })
                .is_none_or(|(_, m)| !m.is_empty());
            // The image: every byte the history wrote, then one write straight to it.
            let mut now = model.clone();
            let off = rnd(SIZE - 1);
            let len = (1 + rnd(2 * BS)).min(SIZE - off);
            for (k, b) in now[off as usize..(off + len) as usize]
                .iter_mut()
                .enumerate()
            {
                *b = (k as u8) ^ (cut as u8) ^ 0x3c;
            }
            fs::write(&img, &now).unwrap();

            let e = Engine::open(store.clone()).unwrap();
            let disk = e.disk("d").unwrap();
            let t = disk.tracker();
            let ctx = format!("trial {trial} cut {cut} of {start}..{}", events.len());
            if let Some(why) = &t.report().lost {
                lost_total += 1;
                assert!(
                    !log_marked,
                    "{ctx}: tracking lost with marks in the log: {why}"
                );
                for (name, _) in &points[..committed] {
                    let seq = store.read_ref(name).unwrap().disks["d"].seq;
                    assert!(t.changed_since(name, seq).is_err(), "{ctx}: loss is silent");
                }
            } else {
                let now_d = digests(&now);
                for (name, then) in &points[..committed] {
                    let seq = store.read_ref(name).unwrap().disks["d"].seq;
                    let got: BTreeSet<u64> = t
                        .changed_since(name, seq)
                        .unwrap()
                        .iter()
                        .flat_map(|r| r.start..r.start + r.count)
                        .collect();
                    let missed: Vec<u64> = (0..NB)
                        .filter(|&b| now_d[b as usize] != then[b as usize] && !got.contains(&b))
                        .collect();
                    assert!(
                        missed.is_empty(),
                        "{ctx}: point {name} misses blocks {missed:?}"
                    );
                }
            }
            drop(t);
            e.crash();
        }
    }
    eprintln!("{cuts_total} cuts, tracking declared lost at {lost_total}");
    assert!(
        lost_total < cuts_total,
        "the digests never decided anything"
    );
}
