use super::*;
use std::fs;
use std::io::Write;

struct Fx {
    _d: tempfile::TempDir,
    store: Store,
    img: std::path::PathBuf,
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
    let mut t = Tracker::create(&f.store, "d", id, 1).unwrap();
    t.before_write(0, 65536).unwrap();
    let r1 = t.advance(id).unwrap();
    t.before_write(3 * 65536 + 10, 65536).unwrap();
    t.close(id).unwrap();
    drop(t);
    let t = Tracker::open(&f.store, "d", id, r1 + 1).unwrap();
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
    let mut t = Tracker::create(&f.store, "d", id, 1).unwrap();
    let r1 = t.advance(id).unwrap();
    t.before_write(2000 * 65536, 4096).unwrap();
    drop(t); // kill -9: no flush, no close
    let t = Tracker::open(&f.store, "d", id, r1 + 1).unwrap();
    assert_eq!(t.report().recovered_regions, 1);
    assert_eq!(runs(&t, r1), vec![(1024, 1024)]);
    // Recovery was flushed: a second open is clean and still reports the region.
    drop(t);
    let t = Tracker::open(&f.store, "d", id, r1 + 1).unwrap();
    assert_eq!(t.report().recovered_regions, 0);
    assert_eq!(runs(&t, r1), vec![(1024, 1024)]);
}

#[test]
fn outside_write_resize_and_damage_are_never_silent() {
    let f = fx(64 << 20);
    let id = identity_of(&f.img).unwrap();
    let mut t = Tracker::create(&f.store, "d", id, 1).unwrap();
    let r1 = t.advance(id).unwrap();
    t.close(id).unwrap();
    drop(t);

    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut w = fs::OpenOptions::new().write(true).open(&f.img).unwrap();
    w.write_all(b"outside").unwrap();
    drop(w);
    let id2 = identity_of(&f.img).unwrap();
    let mut t = Tracker::open(&f.store, "d", id2, r1 + 1).unwrap();
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
    let id3 = identity_of(&f.img).unwrap();
    let t = Tracker::open(&f.store, "d", id3, r2 + 1).unwrap();
    assert!(t.report().lost.as_deref().unwrap().contains("resized"));
    assert!(t.changed_since("R2", r2).is_err());
    assert_eq!(t.disk_size(), 128 << 20);
    drop(t);

    let mut m = fs::read(f.store.map_path("d")).unwrap();
    for b in &mut m[..8192] {
        *b ^= 0x55;
    }
    fs::write(f.store.map_path("d"), &m).unwrap();
    let t = Tracker::open(&f.store, "d", id3, r2 + 1).unwrap();
    assert!(t.report().lost.as_deref().unwrap().contains("damaged"));
    drop(t);

    fs::remove_file(f.store.log_path("d")).unwrap();
    let t = Tracker::open(&f.store, "d", id3, r2 + 1).unwrap();
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
    let mut t = Tracker::create(&f.store, "d", id, 1).unwrap();
    let r1 = t.advance(id).unwrap();
    super::powerloss::fail_next_write(&f.store.log_path("d"));
    let e = t.before_write(1500 * 65536, 4096).unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    assert_eq!(t.dirty_regions(), 0);
    // The caller did not write. The next write to that region is acknowledged...
    t.before_write(1600 * 65536, 4096).unwrap();
    assert_eq!(t.dirty_regions(), 1);
    drop(t); // ...then kill -9.
    let t = Tracker::open(&f.store, "d", id, r1 + 1).unwrap();
    assert_eq!(t.report().recovered_regions, 1);
    assert_eq!(runs(&t, r1), vec![(1024, 1024)]);
}

#[test]
fn seq_floor_from_points_wins_over_an_older_header() {
    let f = fx(1 << 20);
    let id = identity_of(&f.img).unwrap();
    let mut t = Tracker::create(&f.store, "d", id, 1).unwrap();
    t.close(id).unwrap();
    drop(t);
    let t = Tracker::open(&f.store, "d", id, 9).unwrap();
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
    let mut t = Tracker::create(&f.store, "d", id, 1).unwrap();
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
    let mut t = Tracker::open(&f.store, "d", id, r1 + 1).unwrap();
    t.flush(id).unwrap();
    t.close(id).unwrap();
    drop(t);
    assert!(
        files(&f.store) == before,
        "a no-op open and close rewrote tracking state"
    );
    // A real change is still written.
    let mut t = Tracker::open(&f.store, "d", id, r1 + 1).unwrap();
    t.before_write(0, 1).unwrap();
    t.close(id).unwrap();
    drop(t);
    assert!(files(&f.store).0 != before.0);
    let t = Tracker::open(&f.store, "d", id, r1 + 1).unwrap();
    assert_eq!(runs(&t, r1), vec![(0, 1)]);
}
