//! The store's filesystem disappears under a running mount (issue 13, part 3): a lazy unmount
//! of the loop-mounted ext4 holding the store. The daemon must refuse the VM's writes with EIO
//! (never accept one it cannot track), say so in its log, take writes again once the same
//! filesystem is mounted back, report the outage in `status`, and keep `changes` exact: every
//! accepted write is in it, no refused one is, and a backup restores to the image.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A loop device over an ext4 image, mounted at `dir`; unmounted and detached on drop.
struct LoopFs {
    dir: PathBuf,
    dev: String,
}

fn sh(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

impl LoopFs {
    fn new(file: &Path, dir: PathBuf) -> LoopFs {
        std::fs::File::create(file)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        sh("mkfs.ext4", &["-q", "-F", file.to_str().unwrap()]);
        let dev = sh("losetup", &["-f", "--show", file.to_str().unwrap()])
            .trim()
            .to_string();
        std::fs::create_dir_all(&dir).unwrap();
        let fs = LoopFs { dir, dev };
        fs.mount();
        fs
    }

    /// Mount the same device again: the same filesystem (one superblock per block device),
    /// never a second loop device over the file, which would be a second writer of its blocks.
    fn mount(&self) {
        sh("mount", &[&self.dev, self.dir.to_str().unwrap()]);
    }

    fn lazy_umount(&self) {
        sh("umount", &["-l", self.dir.to_str().unwrap()]);
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn live_write(live: &Path, off: u64, data: &[u8]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(live)?;
    f.write_all_at(data, off)
}

/// Fill `dir`'s filesystem with `dir/filler` until ENOSPC.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0x5au8; chunk];
        loop {
            match f.write(&buf) {
                Ok(n) if n == buf.len() => {}
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filler: {e}"),
            }
        }
    }
}

/// The daemon's log is in the store: when the store is full, its important lines (here: the
/// store leaving and coming back) wait in memory, `status` says so, and they are written, in
/// order and under a line saying why they are late, once there is space again.
#[test]
fn daemon_log_lines_wait_while_the_store_is_full() {
    if !fuse_ok("daemon_log_lines_wait_while_the_store_is_full") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk0.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let fs = LoopFs::new(&dir.path().join("store.ext4"), dir.path().join("storefs"));
    let e = Env {
        store: fs.dir.join("store"),
        image,
        model: vec![0u8; 1 << 20],
        envs: Vec::new(),
        s3: None,
        dir,
    };
    e.ok(&["init", "--block-size", "4K"]);
    e.ok(&["disk", "add", "disk0", e.image.to_str().unwrap()]);
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    e.ok(&["mount", mnt.to_str().unwrap()]);
    let g = MountGuard {
        mnt: mnt.clone(),
        pid: daemon_pid(&e.store),
        child: None,
    };
    let log_path = e.store.join("daemon.log");
    let log = || std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(log(), "", "nothing logged at the default level yet");
    fill(&fs.dir);
    fs.lazy_umount();
    std::thread::sleep(Duration::from_millis(600));
    fs.mount();
    let start = Instant::now();
    let held = loop {
        let st: serde_json::Value = serde_json::from_str(&e.ok(&["status", "--json"])).unwrap();
        if st["store_outage"]["until_unix"].as_u64().is_some() {
            break st["log_held"].clone();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{st}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(held[0], 2, "both lines held: {held}");
    assert!(
        held[1].as_str().unwrap().contains("No space left"),
        "{held}"
    );
    assert!(e.ok(&["status"]).contains("daemon log: 2 line(s) held"));
    assert_eq!(log(), "", "nothing half-written");

    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    let start = Instant::now();
    while !log().contains("is back at") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "held lines not written: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = log();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains("could not be written to this log"),
        "{text}"
    );
    assert!(lines[1].contains("is no longer at"), "{text}");
    assert!(lines[2].contains("is back at"), "{text}");
    let st: serde_json::Value = serde_json::from_str(&e.ok(&["status", "--json"])).unwrap();
    assert!(st.get("log_held").is_none(), "{st}");
    e.ok(&["umount", mnt.to_str().unwrap()]);
    drop(g);
    eprintln!(
        "store_away log counts: trials 1, faults injected 2 (store full, then away), log \
         lines held 2, lines lost 0"
    );
    drop(fs);
}

#[test]
fn store_filesystem_lazily_unmounted_under_a_running_mount() {
    if !fuse_ok("store_filesystem_lazily_unmounted_under_a_running_mount") {
        return;
    }
    let seed = test_seed("store_filesystem_lazily_unmounted_under_a_running_mount");
    let mut rng = Rng(seed | 1);
    let size = 8usize << 20;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk0.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size as u64)
        .unwrap();
    let fs = LoopFs::new(&dir.path().join("store.ext4"), dir.path().join("storefs"));
    let e = Env {
        store: fs.dir.join("store"),
        image,
        model: vec![0u8; size],
        envs: Vec::new(),
        s3: None,
        dir,
    };
    let mut e = e;
    e.ok(&["init", "--block-size", "4K"]);
    e.ok(&["disk", "add", "disk0", e.image.to_str().unwrap()]);
    e.ok(&["ref", "create", "p0"]);
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    e.ok(&["mount", mnt.to_str().unwrap()]);
    let g = MountGuard {
        mnt: mnt.clone(),
        pid: daemon_pid(&e.store),
        child: None,
    };
    let live = mnt.join("live/disk0.img");
    let blocks = (size / BS) as u64;
    let mut accepted: Vec<(u64, u64)> = Vec::new();
    let (mut trials, mut refused) = (0u64, 0u64);
    let mut write = |e: &mut Env, rng: &mut Rng| -> std::io::Result<()> {
        let off = rng.below(blocks) * BS as u64 + rng.below(100);
        let mut data = vec![0u8; 1 + rng.below(2 * BS as u64) as usize];
        rng.fill(&mut data);
        let off = off.min(size as u64 - data.len() as u64);
        trials += 1;
        live_write(&live, off, &data)?;
        e.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        accepted.push((off, data.len() as u64));
        Ok(())
    };
    for _ in 0..20 {
        write(&mut e, &mut rng).unwrap();
    }

    // The store's filesystem goes away: within moments every write is refused with EIO.
    fs.lazy_umount();
    let start = Instant::now();
    loop {
        match write(&mut e, &mut rng) {
            Ok(()) => assert!(
                start.elapsed() < Duration::from_secs(10),
                "writes still accepted 10 s after the store left"
            ),
            Err(err) => {
                assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
                refused += 1;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..10 {
        let err = write(&mut e, &mut rng).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        refused += 1;
    }
    // Reads go on.
    let f = std::fs::File::open(&live).unwrap();
    let mut got = vec![0u8; size];
    f.read_exact_at(&mut got, 0).unwrap();
    assert_same("live while the store is away", &got, &e.model);
    drop(f);
    // Nothing answers for the store at its path meanwhile: a command fails, never pretends.
    assert!(!e.run(&["status"]).status.success());

    // Back: the same filesystem at the same path; writes are taken again.
    fs.mount();
    let start = Instant::now();
    loop {
        match write(&mut e, &mut rng) {
            Ok(()) => break,
            Err(err) => {
                assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
                refused += 1;
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "writes still refused 10 s after the store came back"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..20 {
        write(&mut e, &mut rng).unwrap();
    }

    let st: serde_json::Value = serde_json::from_str(&e.ok(&["status", "--json"])).unwrap();
    let o = &st["store_outage"];
    assert_eq!(o["count"], 1, "{st}");
    assert!(o["until_unix"].as_u64().is_some(), "{st}");
    assert_eq!(o["writes_refused"].as_u64(), Some(refused), "{st}");
    let human = e.ok(&["status"]);
    assert!(human.contains("store outage:"), "{human}");
    let log = std::fs::read_to_string(e.store.join("daemon.log")).unwrap();
    assert!(log.contains("is no longer at"), "{log}");
    assert!(log.contains("is back at"), "{log}");

    // `changes` holds exactly the accepted writes' blocks; a backup restores to the image.
    let v: serde_json::Value =
        serde_json::from_str(&e.ok(&["changes", "--since", "p0", "--json"])).unwrap();
    assert_eq!(
        changed_extents(&v),
        block_extents(&accepted, BS as u64, size as u64),
        "changes since p0"
    );
    assert_same("image", &std::fs::read(&e.image).unwrap(), &e.model);
    e.ok(&["backup", "after"]);
    assert_same("restore after", &e.restore("after"), &e.model);
    e.ok(&["umount", mnt.to_str().unwrap()]);
    drop(g);
    eprintln!(
        "store_away counts: trials {trials} writes, faults injected 1 (lazy unmount of the \
         store's filesystem), writes refused with EIO {refused}, accepted {}, bytes lost 0, \
         silent wrong answers 0",
        accepted.len()
    );
    drop(fs);
}
