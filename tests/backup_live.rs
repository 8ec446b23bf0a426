//! Library-level: the VM keeps writing through `LiveDisk::write_at` while a backup runs or a
//! checkpoint is read; the backup and the checkpoint image must hold the bytes of the
//! checkpoint moment exactly, and that moment must lie inside the backup's run, with writes
//! done before it and after it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{BS, Env, Rng, assert_same};
use vmref::backup::NoProgress;
use vmref::engine::Engine;
use vmref::image::PointSource;
use vmref::store::Store;
use vmref::store::records::RefState;

const HOT: u64 = 64;

/// Write number `i`: a whole block (or a piece of one) of `i`'s pattern, at a block picked
/// from `i`, so any image can be matched against the writes that made it.
fn write_of(i: u64) -> (u64, Vec<u8>) {
    let block = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % HOT;
    let mut b = vec![0u8; BS];
    for (k, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(i << 16 | k as u64).to_le_bytes());
    }
    // Every third write covers only part of the block (an unaligned write).
    if i.is_multiple_of(3) {
        let off = block * BS as u64 + 100;
        return (off, b[100..1500].to_vec());
    }
    (block * BS as u64, b)
}

/// Apply writes `0..n` to `model`.
fn model_after(initial: &[u8], n: u64) -> Vec<u8> {
    let mut m = initial.to_vec();
    for i in 0..n {
        let (off, d) = write_of(i);
        m[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    m
}

/// The number of writes the image shows were done: the smallest n whose model equals it.
fn cut_of(initial: &[u8], image: &[u8], total: u64) -> u64 {
    let mut m = initial.to_vec();
    for n in 0..=total {
        if m == image {
            return n;
        }
        if n < total {
            let (off, d) = write_of(n);
            m[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
    }
    panic!("the image matches no prefix of the writes: torn or mixed");
}

/// Do writes `0, 1, …` until `stop`; `done` counts the writes that have returned.
fn writer(
    disk: Arc<vmref::live::LiveDisk>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let (off, d) = write_of(i);
            disk.write_at(&d, off).unwrap();
            i += 1;
            done.store(i, Ordering::Release);
        }
        i
    })
}

/// Wait until the writer has done at least `n` writes.
fn wait_for_writes(done: &AtomicU64, n: u64) {
    let start = std::time::Instant::now();
    while done.load(Ordering::Acquire) < n {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "the writer is stuck at {} writes",
            done.load(Ordering::Acquire)
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn backup_during_writes_is_exact_at_the_checkpoint() {
    let mut rng = Rng(1234);
    let mut init = vec![0u8; 256 * BS];
    rng.fill(&mut init);
    let e = Env::new(4 << 20, &init);
    let initial = e.model.clone();
    let engine = Engine::open(Store::open(&e.store).unwrap()).unwrap();
    let disk = engine.disk("disk0").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let w = writer(disk.clone(), stop.clone(), done.clone());
    // Writes before each checkpoint, during each backup and after the last one. `done` read
    // before a backup counts writes that must be in it; read after it returns, writes that may
    // be (the one in flight then may have started before the checkpoint, so `+ 1`).
    wait_for_writes(&done, 500);
    let full_lo = done.load(Ordering::Acquire);
    let full = vmref::backup::run::backup(&engine, "full", None, false, None, &NoProgress).unwrap();
    let full_hi = done.load(Ordering::Acquire) + 1;
    assert_eq!(full.point.backup.as_ref().unwrap().kind, "full");
    let inc_lo = done.load(Ordering::Acquire);
    let inc = vmref::backup::run::backup(&engine, "inc", None, false, None, &NoProgress).unwrap();
    let inc_hi = done.load(Ordering::Acquire) + 1;
    assert_eq!(inc.point.backup.as_ref().unwrap().kind, "incremental");
    wait_for_writes(&done, inc_hi + 500);
    stop.store(true, Ordering::Relaxed);
    let total = w.join().unwrap();

    let read = |p: &str| {
        let img = engine.open(p, &point_id(&engine, p), "disk0").unwrap();
        let mut b = vec![0u8; img.size() as usize];
        assert_eq!(img.read_at(&mut b, 0).unwrap(), b.len());
        b
    };
    let (a, b) = (read("full"), read("inc"));
    let ca = cut_of(&initial, &a, total);
    let cb = cut_of(&initial, &b, total);
    eprintln!(
        "cuts: full {ca} (in {full_lo}..={full_hi}), inc {cb} (in {inc_lo}..={inc_hi}) of {total} writes"
    );
    // Each checkpoint fell inside its own backup's run: not a copy of an earlier moment, not
    // one taken after the backup returned.
    assert!(
        (full_lo..=full_hi).contains(&ca),
        "full backup's cut {ca} outside its run {full_lo}..={full_hi}"
    );
    assert!(
        (inc_lo..=inc_hi).contains(&cb),
        "incremental backup's cut {cb} outside its run {inc_lo}..={inc_hi}"
    );
    // So the cuts are in the middle of the writes: some before the first, some after the last.
    assert!(
        0 < ca && ca <= cb && cb < total,
        "cuts {ca}, {cb} not inside 0..{total}"
    );
    assert_same("full", &a, &model_after(&initial, ca));
    assert_same("inc", &b, &model_after(&initial, cb));
    engine.close().unwrap();
    drop(engine);
    // And the CLI restores the same bytes.
    assert_same("full (restore)", &e.restore("full"), &a);
    assert_same("inc (restore)", &e.restore("inc"), &b);
    assert!(e.ok(&["verify"]).contains("all good"));
}

/// The id of the point `name` the mount would show.
fn point_id(engine: &Engine, name: &str) -> String {
    let points = engine.points().unwrap();
    points.into_iter().find(|p| p.name == name).unwrap().id
}

#[test]
fn checkpoint_image_stays_exact_under_writes_and_readers() {
    let mut rng = Rng(77);
    let mut init = vec![0u8; 128 * BS];
    rng.fill(&mut init);
    let e = Env::new(2 << 20, &init);
    let engine = Arc::new(Engine::open(Store::open(&e.store).unwrap()).unwrap());
    let disk = engine.disk("disk0").unwrap();
    // Nothing writes now: the checkpoint holds the initial bytes.
    engine.ref_create("cp", None, RefState::Checkpoint).unwrap();
    let points = engine.points().unwrap();
    assert_eq!(points[0].name, "cp");
    let id = points[0].id.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(disk.clone(), stop.clone(), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let engine = engine.clone();
            let want = e.model.clone();
            let id = id.clone();
            std::thread::spawn(move || {
                let img = engine.open("cp", &id, "disk0").unwrap();
                let mut rng = Rng(5 + t);
                for _ in 0..300 {
                    let len = 1 + rng.below(5 * BS as u64) as usize;
                    let off = rng.below(want.len() as u64 - len as u64) as usize;
                    let mut b = vec![0u8; len];
                    img.read_at(&mut b, off as u64).unwrap();
                    assert_same("checkpoint read", &b, &want[off..off + len]);
                    // SEEK_DATA/SEEK_HOLE never call a data block a hole.
                    let d = img.next_data(off as u64).unwrap();
                    if want[off..].iter().any(|&x| x != 0) {
                        assert!(d.is_some());
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let n = w.join().unwrap();
    assert!(n > 0);
    // Whole image still exact after the writes.
    let img = engine.open("cp", &id, "disk0").unwrap();
    let mut all = vec![0u8; img.size() as usize];
    img.read_at(&mut all, 0).unwrap();
    assert_same("checkpoint", &all, &e.model);
    assert!(img.is_current());
    // Demote: the saved data goes, a plain point stays, and an image still open refuses to
    // read (the live disk's bytes are not the checkpoint's any more).
    let rec = vmref::backup::manage::demote(&engine, "cp").unwrap();
    assert_eq!(rec.state, RefState::Plain);
    assert!(!img.is_current());
    let err = img.read_at(&mut all[..10], 0).unwrap_err();
    assert_eq!(err.errno(), libc::ESTALE, "{err}");
    assert!(img.next_data(0).is_err());
    assert!(engine.open("cp", &id, "disk0").is_err());
    assert!(engine.points().unwrap().is_empty());
}

#[test]
fn a_checkpoint_does_not_outlive_its_engine() {
    let e = Env::new(1 << 20, &[1u8; 5000]);
    let out = e.ok(&["ref", "create", "cp", "--checkpoint"]);
    assert!(out.contains("created checkpoint cp"), "{out}");
    // The command's engine closed: the checkpoint is now a plain point.
    let v: serde_json::Value =
        serde_json::from_str(&e.ok(&["ref", "show", "cp", "--json"])).unwrap();
    assert_eq!(v["state"], "plain");
    // A record left in the checkpoint state by a crash is demoted at the next open.
    let store = Store::open(&e.store).unwrap();
    let mut rec = store.read_ref("cp").unwrap();
    rec.state = RefState::Checkpoint;
    store.write_ref(&rec).unwrap();
    e.ok(&["status"]);
    assert_eq!(store.read_ref("cp").unwrap().state, RefState::Plain);
    e.ok(&["ref", "delete", "cp"]);
}
