//! Helpers for tests that mount the real filesystem: temp stores with one disk, the built
//! binary run under `timeout`, a `MountGuard` that never leaves a mount behind, an in-memory
//! `PointSource`, and the FUSE availability check (skip only without /dev/fuse, and fail
//! instead when `VMREF_REQUIRE_FUSE=1`), which also starts the watchdog that fails a test
//! binary held by a hung mount.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

mod backup_env;
pub mod garage;
mod repo_env;
pub mod smallfs;
pub mod store_cmd;
mod watchdog;
#[allow(unused_imports)]
pub use backup_env::*;
#[allow(unused_imports)]
pub use repo_env::*;
use vmref::image::{ImageSource, MemImage, PointSource};

pub const BIN: &str = env!("CARGO_BIN_EXE_vmref");
/// Any client command that takes longer than this is hung; `timeout` kills it.
pub const CMD_TIMEOUT: &str = "60";

/// Whether FUSE tests can run here. Panics when FUSE is required but missing; otherwise
/// prints `SKIP: <test>: /dev/fuse missing`, the line `test.sh` counts as a skipped test.
pub fn fuse_ok(test: &str) -> bool {
    if Path::new("/dev/fuse").exists() {
        watchdog::start();
        return true;
    }
    if std::env::var("VMREF_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("{test}: /dev/fuse is missing and VMREF_REQUIRE_FUSE=1");
    }
    // Written to the process's stderr, not with eprintln!: the test harness keeps what a
    // passing test prints with eprintln! to itself, and a skip must show in every run.
    let line =
        format!("SKIP: {test}: /dev/fuse missing (set VMREF_REQUIRE_FUSE=1 to fail instead)\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    false
}

/// The seed of a randomised test. `VMREF_TEST_SEED=N` replays a run (a failure prints its
/// seed); without it the seed comes from the clock, so every run tries new inputs. Printed
/// either way, and shown by `cargo test` when the test fails.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("VMREF_TEST_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("VMREF_TEST_SEED={v:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("{test}: seed {seed} (replay with VMREF_TEST_SEED={seed})");
    seed
}

/// Run a program under `timeout`.
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(CMD_TIMEOUT)
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {prog}: {e}"))
}

/// Run a program under `timeout` and insist it succeeds; returns stdout.
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let o = run(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A deterministic, non-repeating byte pattern (xorshift).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A store in a temp dir with one disk, `disk0`, whose image starts as `initial`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub image: PathBuf,
    pub mnt: PathBuf,
}

impl Setup {
    pub fn new(initial: &[u8]) -> Setup {
        Setup::with_block_size(initial, None)
    }

    /// A store with `block_size` (`init --block-size`, default when None) and one disk0 holding
    /// `initial`.
    pub fn with_block_size(initial: &[u8], block_size: Option<&str>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let image = dir.path().join("disk0.raw");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(initial.len() as u64).unwrap();
        // Leave zero blocks as holes so SEEK_DATA/SEEK_HOLE have something to find.
        for (i, chunk) in initial.chunks(65536).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                f.write_all_at(chunk, (i * 65536) as u64).unwrap();
            }
        }
        drop(f);
        let s = Setup {
            dir,
            store,
            image,
            mnt,
        };
        match block_size {
            Some(bs) => s.ok(&["init", "--block-size", bs]),
            None => s.ok(&["init"]),
        };
        s.ok(&["disk", "add", "disk0", s.image.to_str().unwrap()]);
        s
    }

    pub fn live(&self) -> PathBuf {
        self.mnt.join("live/disk0.img")
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![BIN, "--store", self.store.to_str().unwrap()];
        v.extend_from_slice(args);
        v
    }

    /// `vmref --store STORE ARGS…` under `timeout`.
    pub fn vmref(&self, args: &[&str]) -> Output {
        let a = self.args(args);
        run(a[0], &a[1..])
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let a = self.args(args);
        run_ok(a[0], &a[1..])
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// Mount in the background (the command returns once mounted).
    pub fn mount(&self) -> MountGuard {
        self.mount_at(&self.mnt)
    }

    pub fn mount_at(&self, mnt: &Path) -> MountGuard {
        self.ok(&["mount", mnt.to_str().unwrap()]);
        assert!(
            is_mounted(mnt),
            "vmref mount returned but nothing is mounted"
        );
        MountGuard {
            mnt: mnt.to_path_buf(),
            pid: daemon_pid(&self.store),
            child: None,
        }
    }

    /// Mount with `--foreground` as a child process, waiting until the mount appears.
    pub fn mount_foreground(&self) -> MountGuard {
        let child = Command::new(BIN)
            .args([
                "--store",
                self.store.to_str().unwrap(),
                "mount",
                "--foreground",
            ])
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut g = MountGuard {
            mnt: self.mnt.clone(),
            pid: Some(pid),
            child: Some(child),
        };
        wait_until(|| is_mounted(&self.mnt), "the foreground mount to appear");
        let _ = &mut g;
        g
    }

    /// `tracking` of disk0 in `vmref status --json`.
    pub fn tracking(&self) -> String {
        self.json(&["status", "--json"])["disks"][0]["tracking"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// The pid in the store's lock file: whoever took the lock last (the daemon, while mounted).
pub fn daemon_pid(store: &Path) -> Option<i32> {
    std::fs::read_to_string(store.join("lock"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

pub fn is_mounted(mnt: &Path) -> bool {
    let canon = std::fs::canonicalize(mnt.parent().unwrap())
        .unwrap()
        .join(mnt.file_name().unwrap());
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

pub fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_is_vmref(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|&b| b == 0)
                .next()
                .is_some_and(|a| a.ends_with(b"vmref"))
        })
        .unwrap_or(false)
}

/// Unmounts on drop (lazily, so a failing test never leaves a mount), then kills the daemon.
pub struct MountGuard {
    pub mnt: PathBuf,
    pub pid: Option<i32>,
    pub child: Option<Child>,
}

impl MountGuard {
    /// Wait for a foreground daemon to exit; its exit status.
    pub fn wait_child(&mut self) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("a foreground mount");
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "daemon did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until the daemon process is gone (or a zombie of ours).
    pub fn wait_gone(&mut self) {
        if self.child.is_some() {
            self.wait_child();
            return;
        }
        if let Some(pid) = self.pid {
            wait_until(|| !pid_is_vmref(pid), "the daemon to exit");
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.pid.expect("daemon pid").to_string();
        run_ok("kill", &[&format!("-{sig}"), &pid]);
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Some(pid) = self.pid.filter(|&p| pid_is_vmref(p)) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// One point held in memory: its id (new for every point created) and its disks.
type MemPoint = (String, BTreeMap<String, Arc<MemImage>>);

/// Points held in memory, for driving the filesystem with point directories.
#[derive(Default)]
pub struct MemPoints {
    pub points: RwLock<BTreeMap<String, MemPoint>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl MemPoints {
    /// Add a disk to `point`, creating the point (with a fresh id) if it does not exist.
    pub fn insert(&self, point: &str, disk: &str, bytes: Vec<u8>, block: usize) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.points
            .write()
            .entry(point.to_string())
            .or_insert_with(|| (format!("mem{id}"), BTreeMap::new()))
            .1
            .insert(disk.to_string(), Arc::new(MemImage { bytes, block }));
    }
    pub fn remove(&self, point: &str) {
        self.points.write().remove(point);
    }
}

impl PointSource for MemPoints {
    fn points(&self) -> vmref::Result<vmref::image::PointList> {
        Ok(self
            .points
            .read()
            .iter()
            .map(|(p, (id, d))| vmref::image::PointEntry {
                name: p.clone(),
                id: id.clone(),
                disks: d.iter().map(|(n, i)| (n.clone(), i.size())).collect(),
            })
            .collect())
    }
    fn open(&self, point: &str, id: &str, disk: &str) -> vmref::Result<Arc<dyn ImageSource>> {
        self.points
            .read()
            .get(point)
            .filter(|(i, _)| i == id)
            .and_then(|(_, d)| d.get(disk))
            .map(|i| i.clone() as Arc<dyn ImageSource>)
            .ok_or_else(|| vmref::Error::NoSuchRef(point.to_string()))
    }
}

/// Block-aligned extents `(offset, length)` covering the written byte ranges, merged.
pub fn block_extents(writes: &[(u64, u64)], block: u64, size: u64) -> Vec<(u64, u64)> {
    let mut blocks: Vec<u64> = writes
        .iter()
        .filter(|(_, l)| *l > 0)
        .flat_map(|&(o, l)| (o / block)..(o + l).div_ceil(block))
        .collect();
    blocks.sort_unstable();
    blocks.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some((o, l)) if *o + *l == b * block => *l += block,
            _ => out.push((b * block, block)),
        }
    }
    for e in &mut out {
        e.1 = e.1.min(size - e.0);
    }
    out
}

/// Extents from `vmref changes --json` for disk0.
pub fn changed_extents(v: &serde_json::Value) -> Vec<(u64, u64)> {
    v["disks"][0]["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// Damage one byte of a store file in place (flip some of its bits).
pub fn flip(path: &Path, off: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, off).unwrap();
}

/// The resume token (`vmref1-...`) in a failed receive's error line.
#[allow(dead_code)]
pub fn resume_token(err: &str) -> String {
    err.split_whitespace()
        .find(|w| w.starts_with("vmref1-"))
        .unwrap_or_else(|| panic!("no token in {err:?}"))
        .trim_end_matches('`')
        .to_string()
}
