//! Writes that bypass a running mount: straight into the image file, or a new file renamed over
//! it, while the daemon serves it. Tracking cannot see them, so it must say so (invariant 3)
//! rather than let the next incremental miss them. And a disk removed while the VM still has
//! its live file open must not take untracked writes.

mod common;

use std::io::ErrorKind;
use std::os::unix::fs::FileExt;

use common::{Setup, fuse_ok, pattern, run_ok, wait_until};

const MIB: usize = 1 << 20;

fn refused_line(s: &Setup, args: &[&str]) -> String {
    let o = s.vmref(args);
    assert!(!o.status.success(), "vmref {args:?} should fail");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    err
}

#[test]
fn a_write_into_the_image_while_mounted_is_not_silent() {
    if !fuse_ok("a_write_into_the_image_while_mounted_is_not_silent") {
        return;
    }
    let s = Setup::new(&pattern(8 * MIB, 1));
    let m = s.mount();
    s.ok(&["ref", "create", "before"]);
    // Tracked writes through the mount, then a write behind vmref's back while it runs.
    let live = std::fs::OpenOptions::new()
        .write(true)
        .open(s.live())
        .unwrap();
    live.write_all_at(&[1u8; 4096], 0).unwrap();
    drop(live);
    s.ok(&["ref", "create", "middle"]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    run_ok(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", s.image.display()),
            "bs=4096",
            "seek=700",
            "count=1",
            "conv=notrunc",
            "status=none",
        ],
    );
    // The next flush (here: the point, or unmount) finds times that moved with no tracked
    // write, and restarts tracking.
    s.ok(&["ref", "create", "after"]);
    let err = refused_line(&s, &["changes", "--since", "middle"]);
    assert!(err.contains("outside the mount"), "{err}");
    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    drop(m);
    let err = refused_line(&s, &["changes", "--since", "before"]);
    assert!(err.contains("outside the mount"), "{err}");
    assert!(
        s.tracking().contains("outside the mount"),
        "{}",
        s.tracking()
    );
    // Points made after the restart are exact.
    let v = s.json(&["changes", "--since", "after", "--json"]);
    assert_eq!(v["disks"][0]["changed_bytes"], 0, "{v}");
}

#[test]
fn an_image_renamed_over_while_mounted_is_not_silent() {
    if !fuse_ok("an_image_renamed_over_while_mounted_is_not_silent") {
        return;
    }
    let s = Setup::new(&pattern(8 * MIB, 2));
    let m = s.mount();
    s.ok(&["ref", "create", "before"]);
    // What `restore --force` onto the live image, or `cp new.img; mv`, does.
    let other = s.dir.path().join("other.raw");
    std::fs::write(&other, pattern(8 * MIB, 3)).unwrap();
    std::fs::rename(&other, &s.image).unwrap();
    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    drop(m);
    let err = refused_line(&s, &["changes", "--since", "before"]);
    assert!(err.contains("replaced"), "{err}");
    // And restore refuses to write over a registered image, even with --force.
    s.ok(&["backup", "b1"]);
    let err = refused_line(
        &s,
        &[
            "restore",
            "b1",
            "--disk",
            "disk0",
            "--to",
            s.image.to_str().unwrap(),
            "--force",
        ],
    );
    assert!(err.contains("disk0"), "{err}");
}

#[test]
fn a_removed_disk_takes_no_more_writes_and_an_open_checkpoint_blocks_removal() {
    if !fuse_ok("a_removed_disk_takes_no_more_writes_and_an_open_checkpoint_blocks_removal") {
        return;
    }
    let s = Setup::new(&pattern(4 * MIB, 4));
    let _m = s.mount();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.live())
        .unwrap();
    f.write_all_at(&[7u8; 4096], 4096).unwrap();
    s.ok(&["ref", "create", "cp", "--checkpoint"]);
    let err = refused_line(&s, &["disk", "remove", "disk0"]);
    assert!(err.contains("checkpoint cp"), "{err}");
    s.ok(&["ref", "demote", "cp"]);
    s.ok(&["disk", "remove", "disk0"]);
    let before = std::fs::read(&s.image).unwrap();
    let e = f.write_all_at(&[9u8; 4096], 8192).unwrap_err();
    assert_ne!(e.kind(), ErrorKind::Other, "{e}");
    assert_eq!(
        std::fs::read(&s.image).unwrap(),
        before,
        "an untracked write got through"
    );
    wait_until(
        || !s.mnt.join("live/disk0.img").exists(),
        "live/disk0.img to vanish",
    );
}
