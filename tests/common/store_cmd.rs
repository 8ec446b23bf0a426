//! The binary run against a store directory by path, for tests that drive several stores at
//! once (replication, encryption) rather than one `Env`.

use std::path::Path;
use std::process::Command;

/// `vmref --store STORE`, with no store inherited from the environment.
pub fn vmref(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmref"));
    c.arg("--store").arg(store);
    c.env_remove("VMREF_STORE");
    c
}

/// Run, insist on success; stdout.
pub fn ok(store: &Path, args: &[&str]) -> String {
    let o = vmref(store).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "vmref {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The bytes of `disk0` at `point`, restored through a file in `scratch`.
pub fn restore(store: &Path, point: &str, scratch: &Path) -> Vec<u8> {
    let to = scratch.join(format!("r-{point}.img"));
    ok(
        store,
        &[
            "restore",
            point,
            "--disk",
            "disk0",
            "--to",
            to.to_str().unwrap(),
            "--force",
        ],
    );
    let b = std::fs::read(&to).unwrap();
    std::fs::remove_file(&to).unwrap();
    b
}
