//! Full filesystems, for real (issue 13, part 3): the store or the live image on a small tmpfs
//! that fills up. A full store must fail a backup, `ref create` or `prune` with one line and
//! leave every point as it was; a full image filesystem must refuse the VM's write with an
//! error; and whichever fills, a write the VM saw accepted must be tracked (invariants 2 and 4).
//! Each test counts its trials, the faults it injected and the bytes it lost (always zero: a
//! loss fails the test).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::smallfs::SmallFs;
use common::*;

/// An `Env` whose store lives on a `size` tmpfs (the image stays in the temp dir).
fn env_on_small_store(size_bytes: usize, data: &[u8], fs_size: &str) -> (Env, SmallFs) {
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(dir.path().join("storefs"), fs_size);
    let store = fs.path("store");
    let image = dir.path().join("disk0.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(size_bytes as u64).unwrap();
    f.write_all_at(data, 0).unwrap();
    drop(f);
    let mut model = vec![0u8; size_bytes];
    model[..data.len()].copy_from_slice(data);
    let e = Env {
        dir,
        store,
        image,
        model,
        envs: Vec::new(),
        s3: None,
    };
    e.ok(&["init", "--block-size", "4K"]);
    e.ok(&["disk", "add", "disk0", e.image.to_str().unwrap()]);
    (e, fs)
}

/// `ref list --json` without what may change on its own (nothing should), for comparing.
fn ref_list(e: &Env) -> serde_json::Value {
    serde_json::from_str(&e.ok(&["ref", "list", "--json"])).unwrap()
}

/// A failed command: non-zero exit and exactly one line on stderr. Returns that line.
fn one_line_failure(what: &str, o: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{what} should fail; stderr: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "{what}: exactly one stderr line, got: {err:?}"
    );
    assert!(err.starts_with("vmref: "), "{what}: {err:?}");
    err
}

/// `count` writes of 16 KiB of random (incompressible) data at random 4K-aligned offsets.
fn big_writes(e: &mut Env, rng: &mut Rng, count: usize) {
    let blocks = e.model.len() as u64 / BS as u64;
    let w: Vec<(u64, Vec<u8>)> = (0..count)
        .map(|_| {
            let off = rng.below(blocks - 4) * BS as u64;
            let mut d = vec![0u8; 4 * BS];
            rng.fill(&mut d);
            (off, d)
        })
        .collect();
    e.write(&w);
}

/// Every point in `points` restores to its model.
fn all_restore(e: &Env, points: &[(String, Vec<u8>)]) -> u64 {
    for (p, want) in points {
        assert_same(&format!("restore {p}"), &e.restore(p), want);
    }
    points.len() as u64
}

fn report(test: &str, trials: u64, faults: u64, checks: u64) {
    eprintln!(
        "{test}: {trials} trials, {faults} faults injected, {checks} restores compared, 0 bytes lost"
    );
}

/// Store full during a backup: one stderr line, no point committed, every older point restores
/// exactly (while still full, too); once there is room again the next backup works.
#[test]
fn store_full_during_backup() {
    let seed = test_seed("store_full_during_backup");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; 2 << 20];
    rng.fill(&mut init);
    let (mut e, fs) = env_on_small_store(4 << 20, &init, "24m");
    e.ok(&["backup", "b0"]);
    let mut points = vec![("b0".to_string(), e.model.clone())];
    let (mut trials, mut faults, mut checks) = (0, 0, 0);
    // Room left, from none to more than a page or two: the backup runs out at different steps
    // (checkpoint file, pack, index, map nodes, point record). Each change is ~1 MiB of
    // incompressible data, more than any room left.
    for (i, room) in [0u64, 4096, 16 << 10, 64 << 10, 256 << 10, 512 << 10]
        .into_iter()
        .enumerate()
    {
        trials += 1;
        big_writes(&mut e, &mut rng, 64);
        let before = ref_list(&e);
        fs.fill(room);
        faults += 1;
        let name = format!("t{i}");
        let o = e.run(&["backup", &name]);
        let line = one_line_failure(&format!("backup {name} with {room} bytes free"), &o);
        assert!(
            line.contains("No space left") || line.contains("space"),
            "room {room}: {line}"
        );
        assert_eq!(ref_list(&e), before, "room {room}: no point committed");
        // Reading needs no room: restore while the store is still full.
        checks += all_restore(&e, &points);
        fs.unfill();
        checks += all_restore(&e, &points);
        e.ok(&["backup", &name]);
        points.push((name, e.model.clone()));
        checks += all_restore(&e, &points[points.len() - 1..]);
    }
    let v: serde_json::Value = serde_json::from_str(&e.ok(&["verify", "--json"])).unwrap();
    assert!(e.run(&["verify"]).status.success(), "verify: {v}");
    checks += all_restore(&e, &points);
    report("store_full_during_backup", trials, faults, checks);
}

/// Store full during `ref create` and `prune`: one clear line, the point list unchanged, and
/// everything works afterwards.
#[test]
fn store_full_during_ref_create_and_prune() {
    let seed = test_seed("store_full_during_ref_create_and_prune");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; 1 << 20];
    rng.fill(&mut init);
    let (mut e, fs) = env_on_small_store(4 << 20, &init, "24m");
    let mut points = Vec::new();
    for i in 0..4 {
        big_writes(&mut e, &mut rng, 16);
        e.ok(&["backup", &format!("b{i}")]);
        points.push((format!("b{i}"), e.model.clone()));
    }
    let (mut trials, mut faults, mut checks) = (0, 0, 0);

    // ref create with no room at all.
    big_writes(&mut e, &mut rng, 8);
    let before = ref_list(&e);
    fs.fill(0);
    trials += 1;
    faults += 1;
    let o = e.run(&["ref", "create", "r0"]);
    one_line_failure("ref create on a full store", &o);
    assert_eq!(ref_list(&e), before, "ref create: point list unchanged");

    // prune with no room: it would delete b0..b2 and rewrite packs.
    trials += 1;
    faults += 1;
    let o = e.run(&["prune", "--keep-last", "1"]);
    one_line_failure("prune on a full store", &o);
    assert_eq!(ref_list(&e), before, "prune: point list unchanged");
    checks += all_restore(&e, &points);

    fs.unfill();
    checks += all_restore(&e, &points);
    e.ok(&["ref", "create", "r0"]);
    big_writes(&mut e, &mut rng, 8);
    let v: serde_json::Value =
        serde_json::from_str(&e.ok(&["changes", "--since", "r0", "--json"])).unwrap();
    assert!(!changed_extents(&v).is_empty(), "changes since r0");
    e.ok(&["prune", "--keep-last", "1"]);
    assert_eq!(e.restorable(), vec!["b3".to_string()]);
    checks += all_restore(&e, &points[3..]);
    e.ok(&["backup", "b4"]);
    checks += all_restore(&e, &[("b4".to_string(), e.model.clone())]);
    assert!(e.run(&["verify"]).status.success(), "verify after prune");
    report(
        "store_full_during_ref_create_and_prune",
        trials,
        faults,
        checks,
    );
}

/// Write `data` at `off` through the mounted live file, O_DIRECT-free but synced, the way a VM
/// with cache=none sees an error. Ok when the daemon accepted every byte.
fn live_write(live: &Path, off: u64, data: &[u8]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(live)?;
    f.write_all_at(data, off)?;
    f.sync_data()
}

/// Everything a mounted test needs to check after the fact: every accepted write must be
/// within `changes --since p0`, and a backup must restore to the image.
fn check_tracked(e: &Env, writes: &[(u64, u64)]) {
    let v: serde_json::Value =
        serde_json::from_str(&e.ok(&["changes", "--since", "p0", "--json"])).unwrap();
    let got = changed_extents(&v);
    let want = block_extents(writes, BS as u64, e.model.len() as u64);
    for (o, l) in &want {
        let covered = got.iter().any(|(go, gl)| go <= o && o + l <= go + gl);
        assert!(covered, "write extent {o}+{l} missing from changes {got:?}");
    }
    let image = std::fs::read(&e.image).unwrap();
    assert_same("image vs model", &image, &e.model);
    e.ok(&["backup", "after"]);
    assert_same("restore after", &e.restore("after"), &image);
}

/// The live image on a small sparse filesystem that fills: a write into a never-written region
/// gets an error, and tracking stays exact once space is freed and the write retried.
#[test]
fn image_filesystem_full() {
    if !fuse_ok("image_filesystem_full") {
        return;
    }
    let seed = test_seed("image_filesystem_full");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(dir.path().join("imgfs"), "8m");
    // Ballast to free later.
    std::fs::write(fs.path("ballast"), vec![1u8; 3 << 20]).unwrap();
    let size = 32usize << 20;
    let image = fs.path("disk0.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size as u64)
        .unwrap();
    let mut e = Env {
        store: dir.path().join("store"),
        image,
        model: vec![0u8; size],
        envs: Vec::new(),
        s3: None,
        dir,
    };
    e.ok(&["init", "--block-size", "4K"]);
    e.ok(&["disk", "add", "disk0", e.image.to_str().unwrap()]);
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    e.ok(&["ref", "create", "p0"]);
    let (mut trials, mut faults, mut refused, mut accepted_bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut writes: Vec<(u64, u64)> = Vec::new();
    let mut failed: Vec<(u64, Vec<u8>)> = Vec::new();
    {
        e.ok(&["mount", mnt.to_str().unwrap()]);
        let _g = MountGuard {
            mnt: mnt.clone(),
            pid: daemon_pid(&e.store),
            child: None,
        };
        let live = mnt.join("live/disk0.img");
        // 1 MiB writes at distinct never-written offsets: the filesystem (8 MiB, 3 of them
        // ballast) runs out after a few.
        for i in 0..(size >> 20) as u64 {
            trials += 1;
            let off = i << 20;
            let mut d = vec![0u8; 1 << 20];
            rng.fill(&mut d);
            match live_write(&live, off, &d) {
                Ok(()) => {
                    e.model[off as usize..off as usize + d.len()].copy_from_slice(&d);
                    accepted_bytes += d.len() as u64;
                    writes.push((off, d.len() as u64));
                }
                Err(err) => {
                    faults += 1;
                    refused += 1;
                    assert!(
                        err.raw_os_error() == Some(libc::ENOSPC)
                            || err.raw_os_error() == Some(libc::EIO),
                        "write at {off}: {err}"
                    );
                    // What reached the image is unknown; it is rewritten below, and tracking
                    // must cover it whatever it is.
                    writes.push((off, d.len() as u64));
                    failed.push((off, d));
                }
            }
        }
        assert!(refused > 0, "the image filesystem never filled");
        assert!(accepted_bytes > 0, "no write fitted at all");
        std::fs::remove_file(fs.path("ballast")).unwrap();
        // Free enough for the retries: drop what the first refused writes used, too.
        failed.truncate(2);
        for (off, d) in &failed {
            live_write(&live, *off, d).expect("rewrite after freeing space");
            e.model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
    }
    // Regions that stayed refused hold whatever part reached the image: make the model the
    // image there (the check below still insists they are tracked).
    let img = std::fs::read(&e.image).unwrap();
    for &(off, len) in &writes {
        let r = off as usize..(off + len) as usize;
        e.model[r.clone()].copy_from_slice(&img[r]);
    }
    check_tracked(&e, &writes);
    eprintln!(
        "image_filesystem_full: {trials} trials, {faults} faults injected ({refused} refused \
         writes), {accepted_bytes} bytes accepted, 0 bytes lost, 0 untracked"
    );
}

/// The store's filesystem fills while mounted and the VM writes: every write is accepted and
/// tracked, or refused with an error; never accepted untracked.
#[test]
fn store_full_while_mounted() {
    if !fuse_ok("store_full_while_mounted") {
        return;
    }
    let seed = test_seed("store_full_while_mounted");
    let mut rng = Rng(seed | 1);
    let size = 64usize << 20;
    let (mut e, fs) = env_on_small_store(size, &[], "8m");
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    e.ok(&["ref", "create", "p0"]);
    let (mut trials, mut faults, mut refused) = (0u64, 0u64, 0u64);
    let mut writes: Vec<(u64, u64)> = Vec::new();
    let mut retry: Vec<(u64, Vec<u8>)> = Vec::new();
    {
        e.ok(&["mount", mnt.to_str().unwrap()]);
        let _g = MountGuard {
            mnt: mnt.clone(),
            pid: daemon_pid(&e.store),
            child: None,
        };
        let live = mnt.join("live/disk0.img");
        let blocks = (size / BS) as u64;
        for round in 0..3 {
            fs.fill(0);
            faults += 1;
            // Writes all over the disk (every 4 MiB tracking region), some across a region
            // boundary; then wait past a flush interval so a periodic flush meets the full store.
            for _ in 0..40 {
                trials += 1;
                let off = rng.below(blocks - 8) * BS as u64 + rng.below(BS as u64);
                let mut d = vec![0u8; 1 + rng.below(6 * BS as u64) as usize];
                rng.fill(&mut d);
                match live_write(&live, off, &d) {
                    Ok(()) => {
                        e.model[off as usize..off as usize + d.len()].copy_from_slice(&d);
                        writes.push((off, d.len() as u64));
                    }
                    Err(err) => {
                        refused += 1;
                        eprintln!("round {round}: write at {off} refused: {err}");
                        retry.push((off, d));
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5500));
            fs.unfill();
            // What part of a refused write reached the image is unknown: write it again, now
            // that there is room, so the model is exact again.
            for (off, d) in retry.drain(..) {
                live_write(&live, off, &d).expect("rewrite after freeing space");
                e.model[off as usize..off as usize + d.len()].copy_from_slice(&d);
                writes.push((off, d.len() as u64));
            }
        }
        // Last round: the store stays full through the unmount, so the clean stop's flush
        // cannot write the map. The next open must still cover these writes.
        fs.fill(0);
        faults += 1;
        for _ in 0..40 {
            trials += 1;
            let off = rng.below(blocks - 8) * BS as u64;
            let mut d = vec![0u8; 1 + rng.below(6 * BS as u64) as usize];
            rng.fill(&mut d);
            match live_write(&live, off, &d) {
                Ok(()) => {
                    e.model[off as usize..off as usize + d.len()].copy_from_slice(&d);
                    writes.push((off, d.len() as u64));
                }
                Err(_) => {
                    refused += 1;
                    retry.push((off, d));
                }
            }
        }
        let o = Command::new("timeout")
            .args([CMD_TIMEOUT, BIN, "--store"])
            .arg(&e.store)
            .arg("umount")
            .arg(&mnt)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("umount on a full store: {} {err}", o.status);
        assert!(
            err.lines().count() <= 1,
            "umount: one line at most: {err:?}"
        );
        if !o.status.success() {
            wait_until(|| !is_mounted(&mnt), "the mount to go");
        }
        fs.unfill();
    }
    // Refused writes of the last round, retried through the library (tracked the same way).
    for (off, d) in retry {
        writes.push((off, d.len() as u64));
        e.write(&[(off, d)]);
    }
    eprintln!(
        "daemon.log: {}",
        std::fs::read_to_string(e.store.join("daemon.log")).unwrap_or_default()
    );
    check_tracked(&e, &writes);
    eprintln!(
        "store_full_while_mounted: {trials} trials, {faults} faults injected, {refused} refused \
         writes, 0 bytes lost, 0 untracked"
    );
}
