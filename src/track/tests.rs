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
