//! Errors keep their kind across the control socket: a command whose work runs in the
//! mounted daemon fails with the same line and exit code as when it runs in its own process.

mod common;

use std::process::Output;

use common::{Setup, fuse_ok};

/// (exit code, stderr, stdout) of a command.
fn outcome(o: &Output) -> (Option<i32>, String, String) {
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn daemon_errors_match_direct_errors() {
    if !fuse_ok("daemon_errors_match_direct_errors") {
        return;
    }
    let s = Setup::new(&vec![7u8; 1 << 20]);
    s.ok(&["ref", "create", "r1"]);
    s.ok(&["ref", "create", "cp1", "--checkpoint"]);
    let cases: &[&[&str]] = &[
        &["changes", "--since", "nosuch"],
        &["changes", "--since", "r1", "--disk", "nodisk"],
        &["ref", "create", "r1"],
        &["ref", "demote", "r1"],
        &["ref", "delete", "nosuch"],
        &["prune", "--keep-last", "0"],
        &["backup", "b1", "--since", "r1"],
        &[
            "restore",
            "nosuch",
            "--disk",
            "disk0",
            "--to",
            "/tmp/vmref-never-written",
        ],
        &["verify", "r1"],
        &["disk", "remove", "nodisk"],
    ];
    let direct: Vec<_> = cases.iter().map(|a| outcome(&s.vmref(a))).collect();
    let mounted = s.mount();
    for (args, want) in cases.iter().zip(&direct) {
        let got = outcome(&s.vmref(args));
        assert_eq!(&got, want, "vmref {args:?} through the daemon");
        assert_ne!(want.0, Some(0), "vmref {args:?} should fail");
    }
    // The first case is the one the issue names: a daemon-side NoSuchRef.
    assert_eq!(
        direct[0].1.trim_end(),
        "vmref: no reference point named \"nosuch\"",
        "{:?}",
        direct[0]
    );
    drop(mounted);
}
