//! Format 1 stores convert to format 2 with every point exact: a copy of the store kept in
//! tests/fixtures/v1-store (made by vmref 0.1.0) is upgraded with `vmref upgrade`, or by
//! opening it with another command, or with the upgrade killed at every step and run again;
//! each time every point's image of every disk restores to the SHA-256 recorded when the
//! fixture was made. A damaged format 1 block stops the upgrade, naming the point, with the
//! store left in format 1.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::smallfs::SmallFs;
use common::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1-store");
const RESTORABLE: [&str; 3] = ["full1", "inc2", "inc3"];

/// A private copy of the fixture store.
struct V1 {
    dir: tempfile::TempDir,
    store: PathBuf,
}

impl V1 {
    fn new() -> V1 {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        run_ok(
            "cp",
            &["-a", &format!("{FIXTURE}/store"), store.to_str().unwrap()],
        );
        V1 { dir, store }
    }

    /// `vmref --store STORE ARGS` under `timeout`, never dumping core (the crash test aborts).
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg(CMD_TIMEOUT)
            .arg(BIN)
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env_remove("VMREF_STORE")
            .env_remove("VMREF_TEST_UPGRADE_ABORT_AFTER")
            .stdin(Stdio::null());
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            c.pre_exec(|| {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                Ok(())
            });
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vmref {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn meta(&self) -> Vec<u8> {
        std::fs::read(self.store.join("vmref.store")).unwrap()
    }

    fn has_v1_files(&self) -> (bool, bool) {
        (
            self.store.join("data/packs").exists(),
            self.store.join("data/index").exists(),
        )
    }

    /// Points by name with their state and owner, from `ref list --json`.
    fn refs(&self) -> Vec<(String, String, Option<String>)> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["ref", "list", "--json"])).expect("ref list --json");
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_string(),
                    r["state"].as_str().unwrap().to_string(),
                    r["owner"].as_str().map(str::to_string),
                )
            })
            .collect()
    }

    /// Every point's image of every disk restores to the SHA-256 the fixture recorded.
    fn assert_points_exact(&self) {
        let expected = expected();
        assert_eq!(expected.len(), 6, "3 points x 2 disks in expected.sha256");
        self.assert_exact(&RESTORABLE);
    }

    /// Every disk of `points` restores to the fixture's SHA-256.
    fn assert_exact(&self, points: &[&str]) {
        for (point, disk, sha) in expected()
            .into_iter()
            .filter(|e| points.contains(&e.0.as_str()))
        {
            let to = self.dir.path().join(format!("r-{point}-{disk}.img"));
            self.ok(&[
                "restore",
                &point,
                "--disk",
                &disk,
                "--to",
                to.to_str().unwrap(),
                "--force",
            ]);
            assert_eq!(sha256(&to), sha, "point {point} disk {disk}");
            std::fs::remove_file(&to).unwrap();
        }
    }

    /// Damage the first slot of the first format 1 pack (slots start at 4096, after the
    /// header); returns where, to put it back.
    fn flip_first_slot(&self) -> (PathBuf, u64) {
        let mut packs: Vec<PathBuf> = std::fs::read_dir(self.store.join("data/packs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        packs.sort();
        let (pack, off) = (packs[0].clone(), 4096 + 100);
        flip(&pack, off);
        (pack, off)
    }

    fn assert_upgraded(&self) {
        assert_ne!(self.meta(), fixture_meta(), "the store meta names format 2");
        assert_eq!(
            self.has_v1_files(),
            (false, false),
            "data/packs and data/index are gone"
        );
        let out = self.ok(&["upgrade"]);
        assert!(out.contains("already in format 2"), "{out}");
        let out = self.ok(&["verify"]);
        assert!(out.contains("3 point(s): all good"), "{out}");
        self.assert_points_exact();
        let refs = self.refs();
        assert_eq!(refs.len(), 4, "{refs:?}");
        assert!(
            refs.contains(&("plain1".into(), "plain".into(), Some("veeam".into()))),
            "plain1 is still a plain point of veeam: {refs:?}"
        );
        let restorable: Vec<&str> = refs
            .iter()
            .filter(|r| r.1 == "restorable")
            .map(|r| r.0.as_str())
            .collect();
        assert_eq!(restorable, RESTORABLE);
    }
}

fn fixture_meta() -> Vec<u8> {
    std::fs::read(format!("{FIXTURE}/store/vmref.store")).unwrap()
}

/// (point, disk, sha256) from `exp-POINT-DISK.img` lines.
fn expected() -> Vec<(String, String, String)> {
    std::fs::read_to_string(format!("{FIXTURE}/expected.sha256"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (sha, file) = l.split_once("  ").expect("sha256sum line");
            let stem = file
                .strip_prefix("exp-")
                .and_then(|f| f.strip_suffix(".img"))
                .expect("exp-POINT-DISK.img");
            let (point, disk) = stem.rsplit_once('-').unwrap();
            (point.to_string(), disk.to_string(), sha.to_string())
        })
        .collect()
}

/// With the `sha256sum` of coreutils: the fixture's sums were made with it, and a test
/// dependency on a SHA-256 crate would be one more crate for six files.
fn sha256(p: &Path) -> String {
    let out = run_ok("sha256sum", &[p.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn upgrade_converts_every_point_exactly() {
    let v = V1::new();
    assert_eq!(v.has_v1_files(), (true, true));
    let out = v.ok(&["upgrade"]);
    assert!(
        out.contains("from format 1 to 2") && out.contains(": 3 restorable point(s)"),
        "{out}"
    );
    v.assert_upgraded();
}

#[test]
fn upgrade_json_reports_the_conversion() {
    let v = V1::new();
    let r: serde_json::Value = serde_json::from_str(&v.ok(&["upgrade", "--json"])).unwrap();
    assert_eq!(r["from"], 1, "{r}");
    assert_eq!(r["to"], 2, "{r}");
    assert_eq!(r["points"], 3, "{r}");
    assert!(r["blocks"].as_u64().unwrap() > 0, "{r}");
    let r: serde_json::Value = serde_json::from_str(&v.ok(&["upgrade", "--json"])).unwrap();
    assert_eq!(
        (r["from"].clone(), r["points"].clone()),
        (2.into(), 0.into())
    );
}

#[test]
fn opening_the_engine_upgrades_too() {
    let v = V1::new();
    // `status` opens the engine, and the engine upgrades an older store when it opens it.
    let out = v.ok(&["status"]);
    assert!(out.contains("points:     4 (3 restorable)"), "{out}");
    v.assert_upgraded();
}

#[test]
fn killed_upgrade_finishes_later_with_every_point_exact() {
    // After 0..=3 of the 3 restorable points (0: the repository made, nothing converted;
    // 3: everything converted, not yet committed), and after the commit, before the format 1
    // files are removed.
    for step in ["0", "1", "2", "3", "commit"] {
        let v = V1::new();
        let o = v
            .cmd(&["upgrade"])
            .env("VMREF_TEST_UPGRADE_ABORT_AFTER", step)
            .output()
            .unwrap();
        assert!(
            !o.status.success() && o.stdout.is_empty(),
            "step {step}: the upgrade should have been killed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stdout)
        );
        assert_eq!(
            v.has_v1_files(),
            (true, true),
            "step {step}: format 1 files are kept until after the commit"
        );
        if step == "commit" {
            assert_ne!(v.meta(), fixture_meta(), "step {step}: committed");
        } else {
            assert_eq!(v.meta(), fixture_meta(), "step {step}: still format 1");
        }
        // The store still opens, with its points as they were.
        let refs = v.refs();
        assert_eq!(refs.len(), 4, "step {step}: {refs:?}");
        let out = v.ok(&["upgrade"]);
        if step == "commit" {
            assert!(out.contains("already in format 2"), "step {step}: {out}");
        } else {
            assert!(
                out.contains("from format 1 to 2") && out.contains(": 3 restorable point(s)"),
                "step {step}: {out}"
            );
        }
        v.assert_upgraded();
    }
}

#[test]
fn damaged_v1_block_stops_the_upgrade_naming_the_point() {
    let v = V1::new();
    let (pack, off) = v.flip_first_slot();
    let refs_before = v.refs();

    let o = v.run(&["upgrade"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "upgrade must fail: {err}");
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    let named: Vec<&str> = RESTORABLE
        .into_iter()
        .filter(|p| err.contains(&format!("point {p} ")))
        .collect();
    assert_eq!(named.len(), 1, "names the damaged point: {err}");
    assert!(err.contains("checksum"), "{err}");

    // Still format 1: meta unchanged, format 1 files kept, the same points restorable.
    assert_eq!(v.meta(), fixture_meta());
    assert_eq!(v.has_v1_files(), (true, true));
    assert_eq!(v.refs(), refs_before);
    // Opening with another command fails the same way rather than half-upgrading.
    let o = v.run(&["status"]);
    assert!(!o.status.success());
    assert_eq!(v.meta(), fixture_meta());

    // Nothing was half-applied: with the byte put back, the upgrade finishes exactly.
    flip(&pack, off);
    v.ok(&["upgrade"]);
    v.assert_upgraded();
}

/// The way out of a damaged format 1 point: `ref delete` works without the engine (whose open
/// would run the failing upgrade), and the upgrade then converts the rest exactly.
#[test]
fn a_damaged_v1_point_can_be_deleted_and_the_rest_upgraded() {
    let v = V1::new();
    v.flip_first_slot();
    let mut deleted = Vec::new();
    loop {
        let o = v.run(&["upgrade"]);
        if o.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let p = RESTORABLE
            .into_iter()
            .find(|p| err.contains(&format!("point {p} ")))
            .unwrap_or_else(|| panic!("upgrade names no point: {err}"));
        assert!(
            !deleted.contains(&p),
            "{p} named again after its delete: {err}"
        );
        v.ok(&["ref", "delete", p]);
        deleted.push(p);
    }
    assert!(!deleted.is_empty(), "the flipped byte stopped the upgrade");
    let kept: Vec<&str> = RESTORABLE
        .into_iter()
        .filter(|p| !deleted.contains(p))
        .collect();
    assert!(!kept.is_empty(), "some point survives: deleted {deleted:?}");
    v.assert_exact(&kept);
    let out = v.ok(&["verify"]);
    assert!(out.contains("all good"), "{out}");
}

/// The store's filesystem full during `upgrade` (issue 13, part 3): with a little more room at
/// each try, every failed upgrade is one stderr line and leaves the store in format 1, and the
/// first one with room enough converts every point exactly. A tmpfs is mounted, so root only.
#[test]
fn upgrade_on_a_full_store_fails_in_one_line_and_later_succeeds() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: upgrade_on_a_full_store_fails_in_one_line_and_later_succeeds: not root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(dir.path().join("storefs"), "4M");
    let store = fs.path("store");
    run_ok(
        "cp",
        &["-a", &format!("{FIXTURE}/store"), store.to_str().unwrap()],
    );
    let v = V1 { dir, store };
    let (mut failures, mut room) = (0u64, 0u64);
    loop {
        fs.unfill();
        fs.fill(room);
        let o = v.run(&["upgrade"]);
        if o.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "room {room}: one line, got {err:?}");
        assert!(err.starts_with("vmref: "), "room {room}: {err:?}");
        assert_eq!(v.meta(), fixture_meta(), "room {room}: still format 1");
        assert_eq!(v.has_v1_files(), (true, true), "room {room}: v1 data kept");
        failures += 1;
        room += 16 << 10;
        assert!(room < 4 << 20, "upgrade never succeeded; last error: {err}");
    }
    fs.unfill();
    assert!(
        failures > 0,
        "the first try had no room at all and must fail"
    );
    eprintln!(
        "upgrade_on_a_full_store: {failures} failed tries on a full store, then converted with \
         {room} bytes free; 0 bytes lost"
    );
    v.assert_upgraded();
}
