//! The real mount, driven by real clients: qemu-io, dd (also O_DIRECT), Rust file I/O,
//! qemu-img compare, and `vmref` itself in other processes, against a model of the disk's
//! bytes; plus every way a mount ends (vmref umount, umount, fusermount3 -u, SIGTERM,
//! SIGINT, kill -9) and what each must leave behind.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;

const MIB: usize = 1 << 20;
const BLOCK: u64 = 65536;

fn initial(size: usize) -> Vec<u8> {
    // Data in the first and last MiB only; the rest is a hole.
    let mut v = vec![0u8; size];
    v[..MIB].copy_from_slice(&pattern(MIB, 7));
    v[size - MIB..].copy_from_slice(&pattern(MIB, 8));
    v
}

fn apply(model: &mut [u8], off: usize, data: &[u8]) {
    model[off..off + data.len()].copy_from_slice(data);
}

#[test]
fn live_writes_reach_the_image_exactly_and_are_tracked() {
    if !fuse_ok("live_writes_reach_the_image_exactly_and_are_tracked") {
        return;
    }
    let size = 16 * MIB;
    let mut model = initial(size);
    let s = Setup::new(&model);
    let mut m = s.mount();
    let live = s.live();
    let live_s = live.to_str().unwrap();

    assert_eq!(std::fs::metadata(&live).unwrap().len(), size as u64);
    assert_eq!(
        std::fs::read(&live).unwrap(),
        model,
        "initial bytes through the mount"
    );

    // ref create while mounted goes through the daemon's socket.
    let out = s.ok(&["ref", "create", "r0"]);
    assert!(out.contains("created reference point r0"), "{out}");
    assert_eq!(
        daemon_pid(&s.store),
        m.pid,
        "the daemon still owns the store"
    );

    let mut writes = Vec::new();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xab 1M 64k", live_s],
    );
    apply(&mut model, MIB, &[0xab; 65536]);
    writes.push((MIB as u64, 65536));

    let src = s.dir.path().join("src.bin");
    let data = pattern(3 * 4096, 42);
    std::fs::write(&src, &data).unwrap();
    let src_s = src.to_str().unwrap();
    run_ok(
        "dd",
        &[
            &format!("if={src_s}"),
            &format!("of={live_s}"),
            "bs=4096",
            "seek=1000",
            "conv=notrunc,fsync",
            "status=none",
        ],
    );
    apply(&mut model, 1000 * 4096, &data);
    writes.push((1000 * 4096, data.len() as u64));
    run_ok(
        "dd",
        &[
            &format!("if={src_s}"),
            &format!("of={live_s}"),
            "bs=4096",
            "seek=2500",
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ],
    );
    apply(&mut model, 2500 * 4096, &data);
    writes.push((2500 * 4096, data.len() as u64));

    // Rust file I/O: unaligned, spanning a block boundary.
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&live)
            .unwrap();
        let d = pattern(70_000, 9);
        let off = 5 * BLOCK as usize - 1234;
        f.write_all_at(&d, off as u64).unwrap();
        f.sync_all().unwrap();
        apply(&mut model, off, &d);
        writes.push((off as u64, d.len() as u64));
        let mut back = vec![0u8; d.len()];
        f.read_exact_at(&mut back, off as u64).unwrap();
        assert_eq!(back, d);
    }

    assert_eq!(
        std::fs::read(&live).unwrap(),
        model,
        "all bytes through the mount"
    );
    let model_file = s.dir.path().join("model.raw");
    std::fs::write(&model_file, &model).unwrap();
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            live_s,
            model_file.to_str().unwrap(),
        ],
    );

    // Another process asks the daemon: exactly the written blocks.
    let ch = s.json(&["changes", "--since", "r0", "--json"]);
    assert_eq!(
        changed_extents(&ch),
        block_extents(&writes, BLOCK, size as u64)
    );

    // A second point splits the history.
    s.ok(&["ref", "create", "r1"]);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 8M 4k", live_s],
    );
    apply(&mut model, 8 * MIB, &[0x5a; 4096]);
    let ch = s.json(&["changes", "--since", "r1", "--json"]);
    assert_eq!(changed_extents(&ch), vec![(8 * MIB as u64, BLOCK)]);

    // Refused: resize, writes past the end, and any change to the layout.
    let o = run("truncate", &["-s", "1M", live_s]);
    assert!(!o.status.success(), "truncate must be refused");
    assert!(String::from_utf8_lossy(&o.stderr).contains("Operation not permitted"));
    run_ok("truncate", &["-s", &size.to_string(), live_s]);
    let o = run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={live_s}"),
            "bs=4096",
            "count=1",
            &format!("seek={}", size / 4096),
            "conv=notrunc",
            "status=none",
        ],
    );
    assert!(!o.status.success(), "a write past the end must fail");
    let o = run("touch", &[s.mnt.join("live/new.img").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Read-only file system"));
    assert!(
        std::fs::create_dir(s.mnt.join("x"))
            .unwrap_err()
            .raw_os_error()
            == Some(libc::EROFS)
    );
    assert!(std::fs::remove_file(&live).unwrap_err().raw_os_error() == Some(libc::EROFS));
    assert_eq!(std::fs::metadata(&live).unwrap().len(), size as u64);

    // Second mount of the same store: refused with one line.
    let other = s.dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let o = s.vmref(&["mount", other.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("already in use by vmref daemon pid"), "{err}");
    assert!(!is_mounted(&other));

    let out = s.ok(&["umount", s.mnt.to_str().unwrap()]);
    assert!(out.contains("unmounted"), "{out}");
    assert!(!is_mounted(&s.mnt));
    m.wait_gone();
    assert_eq!(
        std::fs::read(&s.image).unwrap(),
        model,
        "backing image after unmount"
    );
    assert_eq!(s.tracking(), "ok");
    let ch = s.json(&["changes", "--since", "r1", "--json"]);
    assert_eq!(
        changed_extents(&ch),
        vec![(8 * MIB as u64, BLOCK)],
        "same answer without the daemon"
    );
}

/// SIGTERM and SIGINT to a foreground daemon, and `umount`/`fusermount3 -u` of a
/// background one, all end with tracking flushed and the socket gone.
#[test]
fn every_unmount_is_clean() {
    if !fuse_ok("every_unmount_is_clean") {
        return;
    }
    let size = 4 * MIB;
    let s = Setup::new(&initial(size));
    s.ok(&["ref", "create", "r0"]);
    let live = s.live();
    let live_s = live.to_str().unwrap().to_string();
    let mut expected = Vec::new();
    for (i, how) in ["SIGTERM", "SIGINT", "umount", "fusermount3"]
        .iter()
        .enumerate()
    {
        let mut m = if how.starts_with("SIG") {
            s.mount_foreground()
        } else {
            s.mount()
        };
        if !how.starts_with("SIG") {
            // A daemonized mount logs to STORE/daemon.log, private like every store file.
            let mode = std::fs::metadata(s.store.join("daemon.log"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "daemon.log mode {mode:o}");
        }
        let off = (i as u64 + 1) * BLOCK * 3;
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P 0x{:x} {off} 4k", 0x10 + i),
                &live_s,
            ],
        );
        expected.push((off, 4096));
        match *how {
            "SIGTERM" => m.signal("TERM"),
            "SIGINT" => m.signal("INT"),
            "umount" => {
                run_ok("umount", &[s.mnt.to_str().unwrap()]);
            }
            _ => {
                run_ok("fusermount3", &["-u", s.mnt.to_str().unwrap()]);
            }
        }
        if m.child.is_some() {
            let st = m.wait_child();
            assert!(st.success(), "{how}: daemon exit {st}");
        } else {
            m.wait_gone();
        }
        assert!(!is_mounted(&s.mnt), "{how}");
        assert!(
            !s.store.join("control.sock").exists(),
            "{how}: socket left behind"
        );
        assert_eq!(s.tracking(), "ok", "{how}: tracking not flushed cleanly");
        let ch = s.json(&["changes", "--since", "r0", "--json"]);
        assert_eq!(
            changed_extents(&ch),
            block_extents(&expected, BLOCK, size as u64),
            "{how}"
        );
    }
}

#[test]
fn kill_9_leaves_a_dead_mount_that_umount_and_mount_clear() {
    if !fuse_ok("kill_9_leaves_a_dead_mount_that_umount_and_mount_clear") {
        return;
    }
    let size = 4 * MIB;
    let s = Setup::new(&initial(size));
    s.ok(&["ref", "create", "r0"]);
    let live_s = s.live().to_str().unwrap().to_string();
    let mnt_s = s.mnt.to_str().unwrap().to_string();

    let mut m = s.mount();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 2M 4k", &live_s],
    );
    m.signal("KILL");
    m.wait_gone();
    let e = std::fs::metadata(&s.mnt).unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)),
        "a dead mount: {e}"
    );
    let out = s.ok(&["umount", &mnt_s]);
    assert!(out.contains("dead mount"), "{out}");
    assert!(!is_mounted(&s.mnt));
    // Invariant 2: nothing missed after kill -9.
    let ch = s.json(&["changes", "--since", "r0", "--json"]);
    assert!(
        changed_extents(&ch)
            .iter()
            .any(|&(o, l)| o <= 2 * MIB as u64 && 2 * MIB as u64 + 4096 <= o + l)
    );

    let mut m = s.mount();
    m.signal("KILL");
    m.wait_gone();
    // A new mount clears the dead one by itself.
    let mut m = s.mount();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x77 2M 4k", &live_s],
    );
    s.ok(&["umount", &mnt_s]);
    m.wait_gone();
    assert!(!is_mounted(&s.mnt));
}

/// The byte round `round` writes over 64 KiB block `b` of `concurrent_readers_while_a_writer_runs`.
fn value(round: u8, b: u8) -> u8 {
    round.wrapping_mul(31).wrapping_add(b) | 1
}

/// Readers in other threads never fail and see only bytes that were there or were written
/// there, and the final image equals the model.
#[test]
fn concurrent_readers_while_a_writer_runs() {
    if !fuse_ok("concurrent_readers_while_a_writer_runs") {
        return;
    }
    let size = 8 * MIB;
    let s = Setup::new(&vec![0u8; size]);
    let _m = s.mount();
    let live = s.live();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let live = live.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let f = std::fs::File::open(&live).unwrap();
                let mut buf = vec![0u8; 4096];
                let mut x: u64 = 12345 + r;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 50 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let page = (x >> 33) % (size as u64 / 4096);
                    f.read_exact_at(&mut buf, page * 4096).unwrap();
                    // Every byte is the old zero or a value some round wrote to this block.
                    // (Not one value per page: a read racing a write of the same page may see
                    // part of it on Linux, as on a real disk, where the guest never relies on
                    // such a race.)
                    let b = (page * 4096 / 65536) as u8;
                    let ok = |v: u8| v == 0 || (1..=4u8).any(|r| v == value(r, b));
                    assert!(buf.iter().all(|&v| ok(v)), "foreign bytes in page {page}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut model = vec![0u8; size];
    let f = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
    for round in 1..=4u8 {
        for b in 0..(size / 65536) {
            let v = value(round, b as u8);
            // Writes of whole pages of one value, so a reader can tell a torn page.
            f.write_all_at(&[v; 65536], (b * 65536) as u64).unwrap();
            apply(&mut model, b * 65536, &[v; 65536]);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() >= 50);
    }
    assert_eq!(std::fs::read(&live).unwrap(), model);
}

/// libvirt's dynamic ownership: `chown`/`chmod` on a live file apply to the image (so QEMU
/// running as another user can open it), the live file reports the image's owner and mode,
/// and the ctime this moves is not taken for a write that bypassed the mount: changes stay
/// exact across the change, a flush and a remount.
#[test]
fn chown_and_chmod_on_a_live_disk_apply_to_the_image_and_keep_tracking() {
    if !fuse_ok("chown_and_chmod_on_a_live_disk_apply_to_the_image_and_keep_tracking") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let s = Setup::new(&initial(2 * MIB));
    s.ok(&["ref", "create", "r0"]);
    let m = s.mount();
    let live = s.live();
    std::os::unix::fs::chown(&live, Some(64055), Some(994)).unwrap();
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o660)).unwrap();
    for p in [&live, &s.image] {
        let md = std::fs::metadata(p).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (64055, 994, 0o660),
            "{}",
            p.display()
        );
    }
    // A tracked write after the change, then a point: the flush must not see an outside write.
    let f = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
    f.write_all_at(&[0x5a; 4096], MIB as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    s.ok(&["ref", "create", "r1"]);
    let ch = s.json(&["changes", "--since", "r0", "--json"]);
    let ext = changed_extents(&ch);
    assert!(
        ext.iter()
            .any(|&(o, l)| o <= MIB as u64 && MIB as u64 + 4096 <= o + l),
        "the write is reported: {ext:?}"
    );
    let total: u64 = ext.iter().map(|e| e.1).sum();
    assert!(
        total <= 64 * 1024,
        "only the written block changed, not all: {ext:?}"
    );
    // A clean stop: `vmref umount` waits for the daemon to close (dropping the guard alone
    // kills it, maybe before its close ends).
    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    drop(m);
    // Across a clean stop and a new open, still no restart.
    let _m = s.mount();
    let ch = s.json(&["changes", "--since", "r0", "--json"]);
    let total: u64 = changed_extents(&ch).iter().map(|e| e.1).sum();
    assert!(total <= 64 * 1024, "{ch}");
    let st = s.json(&["status", "--json"]);
    assert_eq!(st["disks"][0]["tracking"], "ok", "{st}");
}

/// Extended attributes as libvirt's `remember_owner` uses them: a live disk (and every file
/// below the root) answers EOPNOTSUPP, as a filesystem without xattrs does, so libvirt skips
/// remembering the owner instead of failing to start the VM; only the root carries the
/// store's name.
#[test]
fn live_disks_say_they_support_no_xattrs() {
    if !fuse_ok("live_disks_say_they_support_no_xattrs") {
        return;
    }
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let s = Setup::new(&initial(2 * MIB));
    s.ok(&["backup", "b1"]);
    let _m = s.mount();
    let c = |p: &std::path::Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    let errno = || std::io::Error::last_os_error().raw_os_error();
    let name = CString::new("trusted.libvirt.security.ref_dac").unwrap();
    let mut buf = [0u8; 256];
    for p in [s.live(), s.mnt.join("b1/disk0.img"), s.mnt.join("live")] {
        let cp = c(&p);
        // SAFETY: valid C strings and a buffer of the length given.
        let r = unsafe {
            libc::getxattr(
                cp.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(
            (r, errno()),
            (-1, Some(libc::EOPNOTSUPP)),
            "getxattr {}",
            p.display()
        );
    }
    let live = c(&s.live());
    // SAFETY: as above.
    let r = unsafe { libc::setxattr(live.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    assert_eq!(
        (r, errno()),
        (-1, Some(libc::EOPNOTSUPP)),
        "setxattr on the live disk"
    );
    // SAFETY: as above.
    let r = unsafe { libc::removexattr(live.as_ptr(), name.as_ptr()) };
    assert_eq!(
        (r, errno()),
        (-1, Some(libc::EOPNOTSUPP)),
        "removexattr on the live disk"
    );
    // A point's image stays read-only.
    let point = c(&s.mnt.join("b1/disk0.img"));
    // SAFETY: as above.
    let r = unsafe { libc::setxattr(point.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    assert_eq!(
        (r, errno()),
        (-1, Some(libc::EROFS)),
        "setxattr on a point's image"
    );
    // The root still names its store.
    let root = c(&s.mnt);
    let store_attr = CString::new("user.vmref.store").unwrap();
    // SAFETY: as above.
    let n = unsafe {
        libc::getxattr(
            root.as_ptr(),
            store_attr.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n > 0, "the root's store xattr: {:?}", errno());
    assert_eq!(
        &buf[..n as usize],
        std::fs::canonicalize(&s.store)
            .unwrap()
            .as_os_str()
            .as_bytes()
    );
    // And the image is untouched by any of it: tracking saw nothing.
    assert_eq!(s.tracking(), "ok");
}
