//! `vmref status --check` for monitors: one line and exit 0 while tracking covers the newest
//! backup and it is recent enough; non-zero, naming each problem, when a disk is unavailable,
//! its changes since the newest backup are unknown, or the newest backup is too old.

mod common;

use std::os::unix::fs::FileExt;

use common::Env;

fn one_line(s: &str) -> &str {
    assert_eq!(s.lines().count(), 1, "one line: {s:?}");
    s.trim_end()
}

#[test]
fn check_names_lost_tracking_unavailable_disks_and_old_backups() {
    let e = Env::new(1 << 20, &[7u8; 64 << 10]);
    let out = e.ok(&["status", "--check"]);
    assert!(
        one_line(&out).starts_with("ok: 1 disk(s) tracked; no backup yet"),
        "{out}"
    );
    let err = e.fails(&["status", "--check", "--max-age", "3600"]);
    assert!(one_line(&err).contains("no backup yet"), "{err}");

    e.ok(&["backup", "b1"]);
    let out = e.ok(&["status", "--check", "--max-age", "3600"]);
    assert!(one_line(&out).contains("newest backup b1"), "{out}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let err = e.fails(&["status", "--check", "--max-age", "0"]);
    assert!(
        one_line(&err).contains("the newest backup, b1, is"),
        "{err}"
    );

    // A write that bypassed the mount: the next backup must be full, and the check says so.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&e.image)
        .unwrap();
    f.write_all_at(&[9u8; 4096], 8192).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let err = e.fails(&["status", "--check"]);
    assert!(
        one_line(&err).contains("disk disk0: changes since b1 are unknown"),
        "{err}"
    );
    e.ok(&["backup", "b2"]);
    e.ok(&["status", "--check"]);

    // An image that is gone.
    std::fs::rename(&e.image, e.path("moved.img")).unwrap();
    let err = e.fails(&["status", "--check"]);
    assert!(one_line(&err).contains("disk disk0: unavailable"), "{err}");
    // Plain status still works and shows it.
    assert!(e.ok(&["status"]).contains("unavailable"));
}
