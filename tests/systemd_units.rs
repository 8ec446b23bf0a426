//! The systemd units in contrib/systemd are valid: `systemd-analyze verify` accepts each, as
//! an instance, with no warning (the binary path pointed at the one under test, since verify
//! checks that every command exists).

use std::path::Path;
use std::process::Command;

const UNITS: [&str; 3] = [
    "vmref-mount@.service",
    "vmref-backup@.service",
    "vmref-backup@.timer",
];

#[test]
fn units_verify_cleanly() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        // CI installs systemd; only a bare developer machine lacks it.
        assert!(
            std::env::var_os("VMREF_REQUIRE_FUSE").is_none(),
            "systemd-analyze missing where every test tool is required"
        );
        eprintln!("SKIP: units_verify_cleanly: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let mut args = vec!["verify".to_string(), "--man=no".to_string()];
    for unit in UNITS {
        let text = std::fs::read_to_string(src.join(unit)).unwrap();
        if unit.ends_with(".service") {
            assert!(
                text.contains("/usr/bin/vmref"),
                "{unit} runs /usr/bin/vmref"
            );
        }
        let text = text.replace("/usr/bin/vmref", env!("CARGO_BIN_EXE_vmref"));
        // A template verifies as an instance, beside its template.
        let instance = unit.replace('@', "@vm1");
        std::fs::write(dir.path().join(unit), &text).unwrap();
        std::fs::write(dir.path().join(&instance), &text).unwrap();
        args.push(dir.path().join(&instance).display().to_string());
    }
    let out = Command::new("systemd-analyze")
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(err.trim().is_empty(), "warnings: {err}");
}
