//! The systemd units in contrib/systemd are valid: `systemd-analyze verify` accepts each, as
//! an instance, with no warning (the binary path pointed at the one under test, since verify
//! checks that every command exists). The backup unit's shell commands do what its comment
//! says: run as systemd would run them, they back up, then prune by VMREF_PRUNE, else by the
//! config's [retention] table, else not at all.

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

/// The shell command of `key` (`ExecStart`, `ExecStartPost`) in the backup unit, as systemd
/// hands it to `/bin/sh -c` for instance `vm1`: continuation lines joined, the single-quoted
/// argument unquoted, `\\`, `%%` and `%i` resolved. Only what the unit uses is handled, and
/// anything else fails the test rather than be guessed.
fn backup_unit_shell(key: &str) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/vmref-backup@.service");
    let text = std::fs::read_to_string(src).unwrap().replace("\\\n", " ");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}="));
    let arg = line
        .strip_prefix("/bin/sh -c '")
        .and_then(|l| l.strip_suffix('\''))
        .unwrap_or_else(|| panic!("{key} is not /bin/sh -c '...': {line}"));
    assert!(!arg.contains('\''), "{arg}");
    let arg = arg.replace("\\\\", "\u{0}");
    assert!(
        !arg.contains('\\'),
        "an escape this helper does not know: {arg}"
    );
    arg.replace('\u{0}', "\\")
        .replace("%%", "\u{1}")
        .replace("%i", "vm1")
        .replace('\u{1}', "%")
}

/// The backup unit's commands, run as systemd would run them (with the store, the binary
/// and /etc/vmref/config.toml moved into a temp dir): a backup; then a prune by VMREF_PRUNE
/// when the env file sets it, else by the config's [retention] table, else none.
#[test]
fn backup_unit_backs_up_then_prunes_by_env_or_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("vm1");
    let conf = d.join("config.toml");
    let image = d.join("disk0.img");
    std::fs::write(&image, vec![5u8; 1 << 20]).unwrap();
    // /usr/bin/vmref reads /etc/vmref/config.toml: here a wrapper names the temp config.
    let wrapper = d.join("vmref");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} --config {} \"$@\"\n",
            env!("CARGO_BIN_EXE_vmref"),
            conf.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(&conf, "").unwrap();
    let vmref = |args: &[&str]| {
        let o = Command::new(&wrapper)
            .arg("--store")
            .arg(&store)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    vmref(&["init"]);
    vmref(&["disk", "add", "disk0", image.to_str().unwrap()]);
    let sh = |key: &str, env: Option<&str>| {
        let cmd = backup_unit_shell(key)
            .replace("/usr/bin/vmref", wrapper.to_str().unwrap())
            .replace("/var/lib/vmref/vm1", store.to_str().unwrap())
            .replace("/etc/vmref/config.toml", conf.to_str().unwrap());
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(&cmd).env_remove("VMREF_PRUNE");
        if let Some(v) = env {
            c.env("VMREF_PRUNE", v);
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let points = || {
        let v: serde_json::Value =
            serde_json::from_str(&vmref(&["ref", "list", "--json"])).unwrap();
        let names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("auto-")), "{names:?}");
        names.len()
    };
    let backup = || {
        // Names have one-second resolution.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        sh("ExecStart", None);
    };
    for _ in 0..4 {
        backup();
    }
    assert_eq!(points(), 4);
    // Neither an env file nor a [retention] table: nothing is pruned.
    sh("ExecStartPost", None);
    assert_eq!(points(), 4);
    // The config's table.
    std::fs::write(&conf, "[retention]\nkeep_last = 3\n").unwrap();
    sh("ExecStartPost", None);
    assert_eq!(points(), 3);
    // VMREF_PRUNE overrides it.
    backup();
    sh("ExecStartPost", Some("--keep-last 2"));
    assert_eq!(points(), 2);
}
