//! A real VM on a live disk: QEMU (TCG, so no /dev/kvm is needed) boots the host's Debian
//! kernel with a busybox initramfs built here, and the guest's own `dd` writes known blocks at
//! known offsets of /dev/vda, which is `MOUNTPOINT/live/disk0.img` (`cache=none,aio=native`, as
//! libvirt would configure it). Backups are taken while the guest runs: between its rounds of
//! writes, while it writes, and after it powered off. `changes --since` must cover exactly the
//! blocks the guest wrote; each point's image must equal the model of what the guest wrote,
//! and the last one the image itself, byte for byte. A second test runs QEMU as an
//! unprivileged user on a live file `chown`ed to it, as libvirt's dynamic ownership does.
//!
//! Skips (printing why) only when qemu-system-x86_64 or a kernel is missing, and fails instead
//! when `VMREF_REQUIRE_FUSE=1` (CI sets it and installs them). Every QEMU run is killed after
//! `QEMU_TIMEOUT` whatever happens, and the VMs of this file run one at a time.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use common::{Setup, block_extents, changed_extents, fuse_ok, pattern};

/// No QEMU run may outlive this.
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
const DISK: usize = 32 << 20;
const BLOCK: u64 = 64 << 10;
/// The guest writes in 4 KiB pages with O_DIRECT: the unit a concurrent checkpoint can split.
const PAGE: usize = 4096;
/// Loaded in this order (each needs the ones before it) unless built into the kernel.
const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];

/// Two TCG guests at once on a small machine only make both slow.
static ONE_VM: Mutex<()> = Mutex::new(());

struct Kernel {
    image: PathBuf,
    /// `/lib/modules/<version>`.
    modules: PathBuf,
}

/// The host's QEMU and newest kernel, or None (after printing why) when a test must skip.
fn vm_tools(test: &str) -> Option<Kernel> {
    let missing = |what: String| {
        if std::env::var("VMREF_REQUIRE_FUSE").as_deref() == Ok("1") {
            panic!("{test}: {what} (VMREF_REQUIRE_FUSE=1: CI installs it)");
        }
        let line = format!("SKIP: {test}: {what}\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        None
    };
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !qemu {
        return missing("qemu-system-x86_64 is not installed".into());
    }
    let mut kernels: Vec<(String, PathBuf)> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let v = n.strip_prefix("vmlinuz-")?.to_string();
            Path::new("/lib/modules")
                .join(&v)
                .is_dir()
                .then(|| (v, e.path()))
        })
        .collect();
    kernels.sort();
    match kernels.pop() {
        Some((v, image)) => Some(Kernel {
            image,
            modules: Path::new("/lib/modules").join(v),
        }),
        None => missing("no /boot/vmlinuz-* with its /lib/modules (linux-image-amd64)".into()),
    }
}

/// A cpio archive in the "newc" format the kernel unpacks as its initramfs.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let pad = |v: &mut Vec<u8>| v.resize(v.len().div_ceil(4) * 4, 0);
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        pad(&mut self.out);
        self.out.extend_from_slice(data);
        pad(&mut self.out);
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// A kernel module's bytes, decompressed when the distribution ships it compressed; None
/// when the kernel has it built in.
fn module(k: &Kernel, name: &str) -> Option<Vec<u8>> {
    fn find(dir: &Path, names: &[String]) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = find(&p, names) {
                    return Some(f);
                }
            } else if names.iter().any(|n| e.file_name().to_str() == Some(n)) {
                return Some(p);
            }
        }
        None
    }
    let names: Vec<String> = ["ko", "ko.xz", "ko.zst", "ko.gz"]
        .iter()
        .map(|x| format!("{name}.{x}"))
        .collect();
    let Some(p) = find(&k.modules.join("kernel"), &names) else {
        let builtin =
            std::fs::read_to_string(k.modules.join("modules.builtin")).unwrap_or_default();
        assert!(
            builtin.lines().any(|l| l.ends_with(&format!("/{name}.ko"))),
            "module {name} is neither in {} nor built in",
            k.modules.display()
        );
        return None;
    };
    let tool = match p.extension().and_then(|x| x.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return Some(std::fs::read(&p).unwrap()),
    };
    let o = Command::new(tool).arg("-dc").arg(&p).output().unwrap();
    assert!(o.status.success(), "{tool} -dc {}", p.display());
    Some(o.stdout)
}

/// One guest write: `data` at byte `offset` of /dev/vda.
#[derive(Clone)]
struct GuestWrite {
    offset: u64,
    data: Vec<u8>,
}

/// The initramfs: busybox, the virtio modules and `/init`, which loads them, prints
/// `VMREF-READY`, then for each round prints `VMREF-ROUND-<n>-START`, writes the round's
/// data with `dd` (O_DIRECT, fsync), `sync`s and prints `VMREF-ROUND-<n>-DONE`; between rounds
/// it waits for a line on the console. After the last round it powers off.
fn initramfs(k: &Kernel, rounds: &[Vec<GuestWrite>]) -> Vec<u8> {
    let mut c = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules", "data"] {
        c.dir(d);
    }
    // The kernel opens it for init's stdin and stdout before /init runs.
    c.entry("dev/console", 0o020600, (5, 1), &[]);
    c.file(
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").expect("busybox-static installs /bin/busybox"),
    );
    let mut init = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         fail() { echo \"VMREF-FAIL $*\"; poweroff -f; }\n",
    );
    for m in MODULES {
        if let Some(ko) = module(k, m) {
            c.file(&format!("lib/modules/{m}.ko"), 0o644, &ko);
            init += &format!("insmod /lib/modules/{m}.ko || fail insmod {m}\n");
        }
    }
    init += "i=0\n\
             while [ ! -b /dev/vda ]; do\n\
             i=$((i+1)); [ $i -gt 300 ] && fail no /dev/vda; sleep 0.1\n\
             done\n\
             echo VMREF-READY\n";
    for (r, writes) in rounds.iter().enumerate() {
        let n = r + 1;
        if r > 0 {
            init += "read -r go\n";
        }
        init += &format!("echo VMREF-ROUND-{n}-START\n");
        for (i, w) in writes.iter().enumerate() {
            let f = format!("data/r{n}w{i}");
            c.file(&f, 0o644, &w.data);
            assert_eq!(w.offset % PAGE as u64, 0);
            init += &format!(
                "dd if=/{f} of=/dev/vda bs={PAGE} seek={} oflag=direct conv=fsync 2>/dev/null || fail dd {f}\n",
                w.offset / PAGE as u64
            );
        }
        init += &format!("sync\necho VMREF-ROUND-{n}-DONE\n");
    }
    init += "poweroff -f\n";
    c.file("init", 0o755, init.as_bytes());
    c.finish()
}

/// A running QEMU: its console lines arrive on `lines`; killed on drop and by a watchdog
/// after `QEMU_TIMEOUT`.
struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Everything the console printed, for failure messages.
    log: Vec<String>,
    started: Instant,
}

impl Vm {
    fn boot(kernel: &Path, initrd: &Path, drive: &Path, as_user: Option<u32>) -> Vm {
        let drive = format!(
            "file={},format=raw,if=virtio,cache=none,aio=native",
            drive.display()
        );
        let qemu_args = [
            "-accel",
            "tcg",
            "-m",
            "512",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
            "-kernel",
            kernel.to_str().unwrap(),
            "-initrd",
            initrd.to_str().unwrap(),
            "-append",
            "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3",
            "-drive",
            &drive,
        ];
        let mut cmd = match as_user {
            None => Command::new("qemu-system-x86_64"),
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "qemu-system-x86_64",
                ]);
                c
            }
        };
        let mut child = cmd
            .args(qemu_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-system-x86_64");
        let (tx, lines) = channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
        }
        // The watchdog: setpriv execs QEMU, so the pid is QEMU's either way.
        let pid = child.id();
        std::thread::spawn(move || {
            std::thread::sleep(QEMU_TIMEOUT);
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        });
        Vm {
            stdin: child.stdin.take(),
            child,
            lines,
            log: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Wait for a console line containing `marker`; panics with the console's output on a
    /// guest failure, an early exit or `QEMU_TIMEOUT`.
    fn wait_for(&mut self, marker: &str) -> Duration {
        loop {
            let left = QEMU_TIMEOUT.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let failed = l.contains("VMREF-FAIL") || l.contains("Kernel panic");
                    self.log.push(l);
                    let l = self.log.last().unwrap();
                    assert!(!failed, "guest failed: {l}\n{}", self.log.join("\n"));
                    // The console echoes our input: match only lines the guest printed.
                    if l.trim_end().ends_with(marker) {
                        return self.started.elapsed();
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no {marker} within {QEMU_TIMEOUT:?}; console:\n{}",
                    self.log.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "QEMU exited before {marker} ({:?}); console:\n{}",
                    self.child.try_wait(),
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Let the guest go on to its next round.
    fn resume(&mut self) {
        let s = self.stdin.as_mut().unwrap();
        s.write_all(b"go\n").unwrap();
        s.flush().unwrap();
    }

    /// Wait for the guest's power-off: QEMU exits 0 (`-no-reboot`).
    fn wait_exit(&mut self) -> Duration {
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.lines.try_recv() {
                    self.log.push(l);
                }
                assert!(
                    st.success(),
                    "QEMU: {st}; console:\n{}",
                    self.log.join("\n")
                );
                return self.started.elapsed();
            }
            while let Ok(l) = self.lines.try_recv() {
                self.log.push(l);
            }
            assert!(
                self.started.elapsed() < QEMU_TIMEOUT,
                "QEMU did not exit; console:\n{}",
                self.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes of one round: `n` page-aligned runs of 1 to `max_pages` pages, none overlapping
/// another of the same round (so a concurrent checkpoint sees each page old or new), placed
/// anywhere on the disk, so most straddle tracking blocks.
fn round(seed: u64, n: usize, max_pages: u64) -> Vec<GuestWrite> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let pages = DISK as u64 / PAGE as u64;
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let len = 1 + next() % max_pages;
        let start = next() % (pages - len);
        if taken.iter().any(|&(s, l)| start < s + l && s < start + len) {
            continue;
        }
        taken.push((start, len));
        out.push(GuestWrite {
            offset: start * PAGE as u64,
            data: pattern((len as usize) * PAGE, next()),
        });
    }
    out
}

fn apply(model: &mut [u8], writes: &[GuestWrite]) {
    for w in writes {
        let o = w.offset as usize;
        model[o..o + w.data.len()].copy_from_slice(&w.data);
    }
}

fn extents_of(writes: &[&[GuestWrite]]) -> Vec<(u64, u64)> {
    let all: Vec<(u64, u64)> = writes
        .iter()
        .flat_map(|r| r.iter().map(|w| (w.offset, w.data.len() as u64)))
        .collect();
    block_extents(&all, BLOCK, DISK as u64)
}

fn same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// A point's image of disk0, read through the mount.
fn point_image(s: &Setup, point: &str) -> Vec<u8> {
    std::fs::read(s.mnt.join(point).join("disk0.img")).unwrap()
}

fn changes(s: &Setup, since: &str) -> Vec<(u64, u64)> {
    changed_extents(&s.json(&["changes", "--since", since, "--json"]))
}

/// A place both the test and an unprivileged QEMU can read: the kernel (0600 on some
/// distributions) and the initramfs, in a directory of the test's temp dir.
fn vm_files(s: &Setup, k: &Kernel, rounds: &[Vec<GuestWrite>]) -> (PathBuf, PathBuf) {
    let dir = s.dir.path().join("vm");
    std::fs::create_dir(&dir).unwrap();
    let kernel = dir.join("vmlinuz");
    std::fs::copy(&k.image, &kernel).unwrap();
    std::fs::set_permissions(&kernel, PermissionsExt::from_mode(0o644)).unwrap();
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, initramfs(k, rounds)).unwrap();
    (kernel, initrd)
}

#[test]
fn guest_writes_are_tracked_and_backed_up_exactly_while_it_runs() {
    let test = "guest_writes_are_tracked_and_backed_up_exactly_while_it_runs";
    if !fuse_ok(test) {
        return;
    }
    let Some(k) = vm_tools(test) else { return };
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let seed = common::test_seed(test);
    let t0 = Instant::now();

    let mut model = vec![0u8; DISK];
    // Data in the first quarter before the VM ever runs, holes elsewhere.
    model[..DISK / 4].copy_from_slice(&pattern(DISK / 4, seed ^ 0xabc));
    let s = Setup::new(&model);
    let _mount = s.mount();
    s.ok(&["backup", "b0"]);

    let rounds = [
        round(seed, 12, 40),
        // Many small synced writes: a backup taken meanwhile lands among them.
        round(seed.wrapping_mul(3), 60, 4),
        round(seed.wrapping_mul(7), 8, 64),
    ];
    let (kernel, initrd) = vm_files(&s, &k, &rounds);
    let mut vm = Vm::boot(&kernel, &initrd, &s.live(), None);
    let ready = vm.wait_for("VMREF-READY");
    eprintln!("{test}: guest ready after {ready:?}");

    // Round 1, then a backup while the guest waits (running, disk open).
    vm.wait_for("VMREF-ROUND-1-DONE");
    let mut r1 = model.clone();
    apply(&mut r1, &rounds[0]);
    assert_eq!(
        changes(&s, "b0"),
        extents_of(&[&rounds[0]]),
        "changes after round 1"
    );
    s.ok(&["backup", "b1"]);
    same("b1", &point_image(&s, "b1"), &r1);
    vm.resume();

    // Round 2: a backup while the guest writes, then one after.
    vm.wait_for("VMREF-ROUND-2-START");
    s.ok(&["backup", "mid"]);
    vm.wait_for("VMREF-ROUND-2-DONE");
    let mut r2 = r1.clone();
    apply(&mut r2, &rounds[1]);
    s.ok(&["backup", "b2"]);
    assert_eq!(
        changes(&s, "b1"),
        extents_of(&[&rounds[1]]),
        "changes after round 2"
    );
    same("b2", &point_image(&s, "b2"), &r2);
    // Every page of "mid" is as before round 2 or as after it: the checkpoint cut between
    // the guest's writes, never through one.
    let mid = point_image(&s, "mid");
    let mut new_pages = 0;
    for (i, page) in mid.chunks(PAGE).enumerate() {
        let at = i * PAGE..(i + 1) * PAGE;
        if page == &r2[at.clone()] {
            new_pages += usize::from(page != &r1[at]);
        } else {
            assert_eq!(
                page, &r1[at],
                "mid: page {i} is neither before nor after round 2"
            );
        }
    }
    eprintln!(
        "{test}: the backup during round 2 holds {new_pages} of its {} written pages",
        rounds[1].iter().map(|w| w.data.len() / PAGE).sum::<usize>()
    );
    vm.resume();

    // Round 3 and power-off; the last backup after the VM stopped.
    vm.wait_for("VMREF-ROUND-3-DONE");
    let ran = vm.wait_exit();
    eprintln!("{test}: guest ran {ran:?} (boot, three rounds, power-off)");
    let mut r3 = r2.clone();
    apply(&mut r3, &rounds[2]);
    s.ok(&["backup", "b3"]);
    assert_eq!(
        changes(&s, "b2"),
        extents_of(&[&rounds[2]]),
        "changes after round 3"
    );
    assert_eq!(
        changes(&s, "b0"),
        extents_of(&[&rounds[0], &rounds[1], &rounds[2]]),
        "changes over the whole run"
    );
    let b3 = point_image(&s, "b3");
    same("b3 against the model", &b3, &r3);
    same(
        "b3 against the image",
        &b3,
        &std::fs::read(&s.image).unwrap(),
    );
    // And through restore, as an admin would get it back.
    let restored = s.dir.path().join("restored.img");
    s.ok(&[
        "restore",
        "b3",
        "--disk",
        "disk0",
        "--to",
        restored.to_str().unwrap(),
    ]);
    same("restored b3", &std::fs::read(&restored).unwrap(), &r3);
    // Earlier points are still exact after the later backups.
    same("b1 at the end", &point_image(&s, "b1"), &r1);
    eprintln!("{test}: took {:?}", t0.elapsed());
}

#[test]
fn qemu_as_an_unprivileged_user_boots_and_writes_on_a_chowned_live_file() {
    let test = "qemu_as_an_unprivileged_user_boots_and_writes_on_a_chowned_live_file";
    if !fuse_ok(test) {
        return;
    }
    let Some(k) = vm_tools(test) else { return };
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let seed = common::test_seed(test);
    let t0 = Instant::now();
    // nobody: no home, no groups, nothing of its own on this host.
    const UID: u32 = 65534;

    let mut model = pattern(DISK, seed ^ 0x55);
    model[DISK / 2..].fill(0);
    let s = Setup::new(&model);
    // The user must reach the mount point and the VM files through the test's directory.
    std::fs::set_permissions(s.dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    s.ok(&["mount", s.mnt.to_str().unwrap(), "--allow-other"]);
    let _mount = common::MountGuard {
        mnt: s.mnt.clone(),
        pid: common::daemon_pid(&s.store),
        child: None,
    };
    s.ok(&["backup", "b0"]);
    let opens_rw = || {
        Command::new("setpriv")
            .args([
                &format!("--reuid={UID}"),
                &format!("--regid={UID}"),
                "--clear-groups",
            ])
            .args(["sh", "-c", "exec 2>/dev/null; exec 3<>\"$0\""])
            .arg(s.live())
            .status()
            .unwrap()
            .success()
    };
    // The mount checks permissions (default_permissions): the root-owned disk is not theirs.
    assert!(!opens_rw(), "uid {UID} opened a root-owned live disk");
    // What libvirt's dynamic ownership does before it starts QEMU.
    std::os::unix::fs::chown(s.live(), Some(UID), Some(UID)).unwrap();
    assert_eq!(std::fs::metadata(&s.image).unwrap().uid(), UID);
    assert!(opens_rw(), "uid {UID} cannot open its own live disk");

    let rounds = [round(seed, 10, 32)];
    let (kernel, initrd) = vm_files(&s, &k, &rounds);

    let mut vm = Vm::boot(&kernel, &initrd, &s.live(), Some(UID));
    // setpriv execs QEMU once it dropped root: the process is QEMU, as the user.
    common::wait_until(
        || {
            let st = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id()))
                .unwrap_or_default();
            st.lines()
                .any(|l| l.starts_with("Name:") && l.contains("qemu"))
                && st.lines().any(|l| {
                    l.starts_with("Uid:")
                        && l.split_whitespace().skip(1).all(|u| u == UID.to_string())
                })
        },
        "QEMU to run as the unprivileged user",
    );
    vm.wait_for("VMREF-ROUND-1-DONE");
    let ran = vm.wait_exit();
    eprintln!("{test}: guest ran {ran:?} as uid {UID}");
    apply(&mut model, &rounds[0]);
    assert_eq!(changes(&s, "b0"), extents_of(&[&rounds[0]]));
    s.ok(&["backup", "b1"]);
    same("b1", &point_image(&s, "b1"), &model);
    same("image", &std::fs::read(&s.image).unwrap(), &model);
    let meta = std::fs::metadata(s.live()).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (UID, UID));
    assert_eq!(s.tracking(), "ok");
    eprintln!("{test}: took {:?}", t0.elapsed());
}
