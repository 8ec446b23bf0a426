//! Tracking loss is never silent (invariant 3), driven through the CLI and a real mount:
//! while unmounted, the image is written with `dd conv=notrunc`, resized with `truncate`,
//! replaced (`cp` + `mv`), or the tracking files under `STORE/track/` are deleted or damaged.
//! Each time `changes --since` an older point fails with exit status non-zero and one stderr
//! line naming the reason, `status` names it, `backup` falls back to a full backup with one
//! warning, that backup restores to exactly the image's bytes, and a fresh mount serves the
//! image with exact tracking again.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

const MIB: usize = 1 << 20;
const SIZE: usize = 8 * MIB;

/// A store whose disk0 has had tracked writes through the mount, a restorable point `a`,
/// and a clean unmount.
fn prepared(test: &str) -> Option<Setup> {
    if !fuse_ok(test) {
        return None;
    }
    let mut init = vec![0u8; SIZE];
    init[..2 * MIB].copy_from_slice(&pattern(2 * MIB, 3));
    let s = Setup::new(&init);
    let m = s.mount();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.live())
        .unwrap();
    f.write_all_at(&pattern(100_000, 4), 3 * MIB as u64)
        .unwrap();
    drop(f);
    s.ok(&["backup", "a"]);
    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    drop(m);
    Some(s)
}

/// Run and return (success, stdout, stderr).
fn outcome(s: &Setup, args: &[&str]) -> (bool, String, String) {
    let o = s.vmref(args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Everything that must follow a loss of tracking whose reason contains `why`.
fn assert_loss_is_loud(s: &Setup, why: &str) {
    let (ok, out, err) = outcome(s, &["changes", "--since", "a", "--json"]);
    assert!(!ok, "changes --since a must fail after: {why}; got {out}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(
        err.contains(why) && err.contains("\"a\"") && err.contains("disk0"),
        "the line names the point, the disk and the reason ({why}): {err}"
    );
    // Asked again (tracking has been restarted durably by now), the same answer.
    let (ok, _, err2) = outcome(s, &["changes", "--since", "a"]);
    assert!(!ok);
    assert_eq!(err2, err, "the reason is kept");

    let tracking = s.tracking();
    assert!(
        tracking.contains(why),
        "status names the reason: {tracking}"
    );

    let (ok, out, err) = outcome(s, &["backup", "b"]);
    assert!(ok, "backup b: {out}{err}");
    assert!(out.contains("backup b: full"), "falls back to full: {out}");
    assert_eq!(err.lines().count(), 1, "one warning: {err:?}");
    assert!(
        err.starts_with("vmref: warning:") && err.contains("full copy"),
        "{err}"
    );
    let image = std::fs::read(&s.image).unwrap();
    let to = s.dir.path().join("b.img");
    s.ok(&[
        "restore",
        "b",
        "--disk",
        "disk0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_same("b", &std::fs::read(&to).unwrap(), &image);

    // Points made after the restart are exact again, and the mount serves the image.
    let m = s.mount();
    assert_eq!(std::fs::read(s.live()).unwrap(), image);
    let ch = s.json(&["changes", "--since", "b", "--json"]);
    assert_eq!(changed_extents(&ch), vec![], "nothing written since b");
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.live())
        .unwrap()
        .write_all_at(b"tracked", 65536 * 5 + 10)
        .unwrap();
    let ch = s.json(&["changes", "--since", "b", "--json"]);
    assert_eq!(changed_extents(&ch), vec![(65536 * 5, 65536)]);
    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    drop(m);
    assert!(s.tracking().contains("ok"), "{}", s.tracking());
}

fn dd(src: &Path, image: &Path, seek_blocks: u64) {
    run_ok(
        "dd",
        &[
            &format!("if={}", src.display()),
            &format!("of={}", image.display()),
            "bs=4096",
            &format!("seek={seek_blocks}"),
            "conv=notrunc",
            "status=none",
        ],
    );
}

#[test]
fn dd_into_the_unmounted_image_is_detected() {
    let Some(s) = prepared("dd_into_the_unmounted_image_is_detected") else {
        return;
    };
    // Right after the unmount, into a block nobody wrote since a.
    let src = s.dir.path().join("src.bin");
    std::fs::write(&src, pattern(8192, 77)).unwrap();
    dd(&src, &s.image, 1500);
    assert_loss_is_loud(&s, "the image was modified outside the mount");
}

#[test]
fn dd_of_the_same_bytes_is_still_detected() {
    let Some(s) = prepared("dd_of_the_same_bytes_is_still_detected") else {
        return;
    };
    // vmref cannot tell what was written: any write outside the mount loses tracking.
    let src = s.dir.path().join("src.bin");
    std::fs::write(&src, &std::fs::read(&s.image).unwrap()[..4096]).unwrap();
    dd(&src, &s.image, 0);
    // Found by the daemon this time: it logs why, and answers through its socket alike.
    let m = s.mount();
    let log = std::fs::read_to_string(s.store.join("daemon.log")).unwrap();
    assert!(
        log.contains("change tracking restarted: the image was modified outside the mount"),
        "{log}"
    );
    let (ok, _, err) = outcome(&s, &["changes", "--since", "a"]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("modified outside the mount"), "{err}");
    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    drop(m);
    assert_loss_is_loud(&s, "the image was modified outside the mount");
}

#[test]
fn truncate_grow_is_detected() {
    let Some(s) = prepared("truncate_grow_is_detected") else {
        return;
    };
    run_ok("truncate", &["-s", "+1M", s.image.to_str().unwrap()]);
    assert_loss_is_loud(
        &s,
        &format!(
            "the image was resized outside vmref ({SIZE} -> {} bytes)",
            SIZE + MIB
        ),
    );
    assert_eq!(
        s.json(&["status", "--json"])["disks"][0]["size"],
        (SIZE + MIB) as u64
    );
}

#[test]
fn a_replaced_image_is_detected() {
    let Some(s) = prepared("a_replaced_image_is_detected") else {
        return;
    };
    // Same bytes, new file: cp to a temp name, then mv over the registered path.
    let tmp = s.dir.path().join("disk0.raw.new");
    run_ok("cp", &[s.image.to_str().unwrap(), tmp.to_str().unwrap()]);
    run_ok("mv", &[tmp.to_str().unwrap(), s.image.to_str().unwrap()]);
    assert_loss_is_loud(&s, "the image file was replaced outside vmref");
}

fn track_file(s: &Setup, ext: &str) -> std::path::PathBuf {
    s.store.join("track").join(format!("disk0.{ext}"))
}

#[test]
fn deleted_or_damaged_tracking_files_are_detected() {
    type Harm = fn(&Setup);
    let cases: [(&str, Harm, &str); 6] = [
        (
            "map deleted",
            |s| std::fs::remove_file(track_file(s, "map")).unwrap(),
            "tracking state is missing",
        ),
        (
            "log deleted",
            |s| std::fs::remove_file(track_file(s, "log")).unwrap(),
            "dirty-region log is missing",
        ),
        (
            // Region 0's page of stamps: after the two header slots and one CRC table page.
            "map page damaged",
            |s| flip(&track_file(s, "map"), 3 * 4096 + 40),
            "region(s) fail their checksum",
        ),
        (
            "both map headers damaged",
            |s| {
                flip(&track_file(s, "map"), 50);
                flip(&track_file(s, "map"), 4096 + 50);
            },
            "tracking state is damaged",
        ),
        (
            "map truncated",
            |s| {
                let p = track_file(s, "map");
                let len = std::fs::metadata(&p).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(len - 4096)
                    .unwrap();
            },
            "tracking state is damaged",
        ),
        (
            "log header damaged",
            |s| flip(&track_file(s, "log"), 20),
            "dirty-region log is damaged",
        ),
    ];
    for (what, harm, why) in cases {
        let Some(s) = prepared("deleted_or_damaged_tracking_files_are_detected") else {
            return;
        };
        harm(&s);
        eprintln!("{what}");
        assert_loss_is_loud(&s, why);
    }
}

/// The unclean-stop case (invariants 2 and 3, issue 13): after a kill -9 the log holds marks,
/// and tracked writes made since the last flush legitimately moved the image's mtime and
/// ctime, so the times cannot show a write made straight to the image between the kill and the
/// next open. The open checks every clean region's bytes against the digests recorded when it
/// went clean, and counts the block as changed.
#[test]
fn dd_after_a_kill_9_is_detected() {
    if !fuse_ok("dd_after_a_kill_9_is_detected") {
        return;
    }
    // 4 KiB blocks: 4 MiB regions, two on this disk.
    let dir = tempfile::tempdir().unwrap();
    let s = Setup {
        store: dir.path().join("store"),
        image: dir.path().join("disk0.raw"),
        mnt: dir.path().join("mnt"),
        dir,
    };
    std::fs::create_dir(&s.mnt).unwrap();
    std::fs::File::create(&s.image)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();
    s.ok(&["init", "--block-size", "4K"]);
    s.ok(&["disk", "add", "disk0", s.image.to_str().unwrap()]);
    s.ok(&["ref", "create", "a"]);
    let mut m = s.mount();
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.live())
        .unwrap()
        .write_all_at(b"tracked", 10)
        .unwrap();
    m.signal("KILL");
    m.wait_gone();
    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    // In the second region, which the log did not mark.
    let src = s.dir.path().join("src.bin");
    std::fs::write(&src, pattern(4096, 5)).unwrap();
    dd(&src, &s.image, 1900);
    let (ok, out, err) = outcome(&s, &["changes", "--since", "a", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ext = changed_extents(&v);
    assert!(
        ext.iter()
            .any(|&(o, l)| o <= 1900 * 4096 && 1901 * 4096 <= o + l),
        "the outside write after the kill went unnoticed: {out}"
    );
    // Exactly: the marked region whole, and the block dd wrote.
    assert_eq!(ext, vec![(0, 1024 * 4096), (1900 * 4096, 4096)]);
}
