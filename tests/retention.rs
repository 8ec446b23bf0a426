//! `prune` retention rules through the CLI: points made by real backups, with creation times
//! set by `VMREF_TEST_NOW`, pruned by hand-computed tables across a year boundary and a DST
//! change in the zone `TZ` names; `--dry-run` changes nothing, `--owner` never touches other
//! owners' points (nor plain points), and every kept point still restores exactly.

mod common;

use std::collections::BTreeMap;

use common::{BS, Env, assert_same};
use serde_json::Value;

const BERLIN: &str = "CET-1CEST,M3.5.0,M10.5.0/3";

/// Run vmref with `TZ` and, when given, `VMREF_TEST_NOW`; insist on success; stdout.
fn ok_with(e: &Env, args: &[&str], tz: &str, now: Option<u64>) -> String {
    let mut c = e.cmd(args);
    c.env("TZ", tz);
    if let Some(t) = now {
        c.env("VMREF_TEST_NOW", t.to_string());
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "vmref {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Backups with their expected images.
struct Points {
    models: BTreeMap<String, Vec<u8>>,
    n: u8,
}

impl Points {
    fn new() -> Points {
        Points {
            models: BTreeMap::new(),
            n: 0,
        }
    }

    /// Write a block of bytes no other point has (so deleting the point frees it), then back
    /// up as `name` created at `t`.
    fn backup(&mut self, e: &mut Env, name: &str, t: u64, owner: Option<&str>) {
        self.n += 1;
        let off = (self.n as usize % 8) * BS;
        e.write(&[(off as u64, vec![self.n; BS])]);
        let mut args = vec!["backup", name];
        if let Some(o) = owner {
            args.extend(["--owner", o]);
        }
        ok_with(e, &args, "UTC0", Some(t));
        self.models.insert(name.to_string(), e.model.clone());
    }

    fn check_restores(&self, e: &Env) {
        for name in e.restorable() {
            assert_same(&name, &e.restore(&name), &self.models[&name]);
        }
    }
}

fn prune_json(e: &Env, args: &[&str], tz: &str) -> Value {
    let out = ok_with(e, &[&["prune", "--json"], args].concat(), tz, None);
    serde_json::from_str(&out).unwrap()
}

/// (kept name with its rules, deleted names) of a prune report.
fn table(r: &Value) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    let kept = r["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_string(),
                k["rules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    let deleted = r["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    (kept, deleted)
}

fn kept(v: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    v.iter()
        .map(|(n, r)| (n.to_string(), r.iter().map(|s| s.to_string()).collect()))
        .collect()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Everything a prune could change: the point listing and the repository's files.
fn snapshot(e: &Env) -> (String, Vec<std::path::PathBuf>) {
    let mut files = e.repo_objects();
    files.sort();
    (e.ok(&["ref", "list", "--json"]), files)
}

#[test]
fn year_boundary_policy_dry_run_owner_and_exact_restores() {
    let mut e = Env::new(16 * BS, &[7u8; 3 * BS]);
    let mut p = Points::new();
    // UTC, at 12:00 unless said.
    p.backup(&mut e, "nov30", 1_732_968_000, None); // 2024-11-30
    p.backup(&mut e, "veeam1", 1_733_000_000, Some("veeam")); // 2024-11-30 20:53
    p.backup(&mut e, "dec30", 1_735_560_000, None); // 2024-12-30
    p.backup(&mut e, "dec31a", 1_735_646_400, None); // 2024-12-31
    p.backup(&mut e, "dec31b", 1_735_689_599, None); // 2024-12-31 23:59:59
    ok_with(&e, &["ref", "create", "plain"], "UTC0", Some(1_735_689_599));
    p.backup(&mut e, "jan01a", 1_735_689_600, None); // 2025-01-01 00:00:00
    p.backup(&mut e, "veeam2", 1_735_700_000, Some("veeam")); // 2025-01-01 02:53
    p.backup(&mut e, "jan01b", 1_735_732_800, None); // 2025-01-01
    p.backup(&mut e, "jan02", 1_735_819_200, None); // 2025-01-02
    let show: Value = serde_json::from_str(&e.ok(&["ref", "show", "veeam1", "--json"])).unwrap();
    assert_eq!(show["owner"], "veeam");
    assert_eq!(show["created_unix"], 1_733_000_000);

    // Dry runs: the table, and nothing changes.
    let before = snapshot(&e);
    let r = prune_json(&e, &["--keep-daily", "3", "--dry-run"], "UTC0");
    assert_eq!(r["dry_run"], true);
    assert_eq!(r["freed_bytes"], 0);
    assert_eq!(
        table(&r),
        (
            kept(&[
                ("dec31b", &["daily"]),
                ("jan01b", &["daily"]),
                ("jan02", &["daily"])
            ]),
            names(&["nov30", "dec30", "dec31a", "jan01a"])
        )
    );
    // In New York, 2025-01-01 00:00 UTC is Dec 31 19:00: jan01a is Dec 31's newest.
    let r = prune_json(
        &e,
        &["--keep-daily", "3", "--dry-run"],
        "EST5EDT,M3.2.0,M11.1.0",
    );
    assert_eq!(
        table(&r).0,
        kept(&[
            ("jan01a", &["daily"]),
            ("jan01b", &["daily"]),
            ("jan02", &["daily"])
        ])
    );
    let text = ok_with(
        &e,
        &[
            "prune",
            "--keep-daily",
            "3",
            "--keep-last",
            "1",
            "--dry-run",
        ],
        "UTC0",
        None,
    );
    assert!(text.contains("keep   jan02 (last, daily)"), "{text}");
    assert!(text.contains("delete nov30"), "{text}");
    assert!(text.contains("nothing deleted"), "{text}");
    assert_eq!(snapshot(&e), before, "a dry run changed the store");

    // The real prune: months Jan 2025, Dec 2024, Nov 2024; years 2025, 2024; the last one.
    let space = e.space();
    let r = prune_json(
        &e,
        &[
            "--keep-monthly",
            "3",
            "--keep-yearly",
            "2",
            "--keep-last",
            "1",
        ],
        "UTC0",
    );
    assert_eq!(
        table(&r),
        (
            kept(&[
                ("nov30", &["monthly"]),
                ("dec31b", &["monthly", "yearly"]),
                ("jan02", &["last", "monthly", "yearly"]),
            ]),
            names(&["dec30", "dec31a", "jan01a", "jan01b"])
        )
    );
    assert!(r["freed_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(e.space().stored_bytes < space.stored_bytes);
    // veeam's points and the plain point are untouched by a policy without --owner.
    assert_eq!(
        e.restorable(),
        names(&["nov30", "veeam1", "dec31b", "veeam2", "jan02"])
    );
    e.ok(&["ref", "show", "plain"]);
    p.check_restores(&e);

    // veeam's own policy touches only veeam's points.
    let r = prune_json(&e, &["--owner", "veeam", "--keep-last", "1"], "UTC0");
    assert_eq!(r["owner"], "veeam");
    assert_eq!(
        table(&r),
        (kept(&[("veeam2", &["last"])]), names(&["veeam1"]))
    );
    let r = prune_json(&e, &["--owner", "nobody", "--keep-last", "1"], "UTC0");
    assert_eq!(table(&r), (vec![], vec![]));
    assert_eq!(
        e.restorable(),
        names(&["nov30", "dec31b", "veeam2", "jan02"])
    );
    e.ok(&["ref", "show", "plain"]);
    p.check_restores(&e);
    assert!(e.ok(&["verify"]).contains("all good"));
}

#[test]
fn hours_follow_the_zone_in_tz_across_a_dst_change() {
    let mut e = Env::new(16 * BS, &[]);
    let mut p = Points::new();
    // Berlin, 2024-10-27: at 03:00 CEST (01:00 UTC) clocks go back to 02:00 CET.
    p.backup(&mut e, "cest0130", 1_729_985_400, None); // 23:30 Z
    p.backup(&mut e, "cest0210", 1_729_988_400, None); // 00:20 Z
    p.backup(&mut e, "cest0250", 1_729_990_200, None); // 00:50 Z
    p.backup(&mut e, "cet0210", 1_729_991_400, None); // 01:10 Z
    p.backup(&mut e, "cet0250", 1_729_993_800, None); // 01:50 Z
    p.backup(&mut e, "cet0310", 1_729_995_000, None); // 02:10 Z
    // In UTC the hours are 23, 00, 01, 02: the newest of the last three.
    let r = prune_json(&e, &["--keep-hourly", "3", "--dry-run"], "UTC0");
    assert_eq!(
        table(&r),
        (
            kept(&[
                ("cest0250", &["hourly"]),
                ("cet0250", &["hourly"]),
                ("cet0310", &["hourly"])
            ]),
            names(&["cest0130", "cest0210", "cet0210"])
        )
    );
    // The zone database's name, when this machine has the database, agrees with the rule.
    let mut zones = vec![BERLIN];
    if std::path::Path::new("/usr/share/zoneinfo/Europe/Berlin").exists() {
        zones.push("Europe/Berlin");
    }
    for tz in zones {
        let r = prune_json(&e, &["--keep-hourly", "3", "--dry-run"], tz);
        // Berlin local hours 01, 02 (twice as long), 03.
        assert_eq!(
            table(&r),
            (
                kept(&[
                    ("cest0130", &["hourly"]),
                    ("cet0250", &["hourly"]),
                    ("cet0310", &["hourly"])
                ]),
                names(&["cest0210", "cest0250", "cet0210"])
            ),
            "TZ={tz}"
        );
    }
    // A 25-hour day is one day.
    let r = prune_json(&e, &["--keep-daily", "2"], BERLIN);
    assert_eq!(table(&r).0, kept(&[("cet0310", &["daily"])]));
    assert_eq!(e.restorable(), names(&["cet0310"]));
    p.check_restores(&e);
}

#[test]
fn bad_policies_are_refused_and_change_nothing() {
    let mut e = Env::new(16 * BS, &[]);
    let mut p = Points::new();
    p.backup(&mut e, "a", 1_700_000_000, None);
    p.backup(&mut e, "b", 1_700_000_100, None);
    let before = snapshot(&e);
    for (args, tz, msg) in [
        (vec!["prune"], "UTC0", "at least one of --keep-last"),
        (vec!["prune", "--dry-run"], "UTC0", "at least one of"),
        (
            vec!["prune", "--keep-daily", "0", "--keep-last", "1"],
            "UTC0",
            "--keep-daily must be at least 1",
        ),
        (
            vec!["prune", "--keep-last", "1"],
            "No/Such_Zone",
            "no such time zone",
        ),
        (
            vec!["prune", "--keep-last", "1", "--owner", "bad/owner"],
            "UTC0",
            "",
        ),
    ] {
        let o = e.cmd(&args).env("TZ", tz).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if msg.is_empty() {
            // Any owner name selects only that owner's points: an impossible one none.
            assert!(o.status.success(), "{args:?}: {err}");
            continue;
        }
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    assert_eq!(snapshot(&e), before);
    p.check_restores(&e);
}

#[test]
fn the_config_files_retention_table_is_the_default_policy() {
    let mut e = Env::new(16 * BS, &[]);
    let mut p = Points::new();
    // 2023-11-14 .. 2023-11-17, one a day.
    for (i, n) in ["d1", "d2", "d3", "d4"].iter().enumerate() {
        p.backup(&mut e, n, 1_700_000_000 + i as u64 * 86_400, None);
    }
    let conf = e.path("config.toml");
    std::fs::write(&conf, "[retention]\nkeep_last = 1\nkeep_daily = 2\n").unwrap();
    let c = conf.to_str().unwrap();

    // No flag: the table's rules.
    let before = snapshot(&e);
    let r = prune_json(&e, &["--config", c, "--dry-run"], "UTC0");
    assert_eq!(
        table(&r),
        (
            kept(&[("d3", &["daily"]), ("d4", &["last", "daily"])]),
            names(&["d1", "d2"])
        )
    );
    // Any flag replaces the whole table.
    let r = prune_json(
        &e,
        &["--config", c, "--keep-last", "3", "--dry-run"],
        "UTC0",
    );
    assert_eq!(
        table(&r),
        (
            kept(&[("d2", &["last"]), ("d3", &["last"]), ("d4", &["last"])]),
            names(&["d1"])
        )
    );
    assert_eq!(snapshot(&e), before);

    let out = ok_with(&e, &["--config", c, "prune"], "UTC0", None);
    assert!(out.contains("pruned 2 point(s) (d1, d2), kept 2"), "{out}");
    assert_eq!(e.restorable(), names(&["d3", "d4"]));
    p.check_restores(&e);

    // A table with no usable rule is refused when the file is read, in one line naming it.
    let before = snapshot(&e);
    for (text, msg) in [
        (
            "[retention]\nkeep_daily = 0\n",
            "keep_daily must be at least 1",
        ),
        ("[retention]\nkeep_dayly = 3\n", "keep_dayly"),
        ("[retention]\n", "needs at least one of keep_last"),
    ] {
        std::fs::write(&conf, text).unwrap();
        let o = e.cmd(&["--config", c, "prune"]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{text:?}");
        assert!(err.contains(msg) && err.contains(c), "{text:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{text:?}: {err}");
    }
    // Without the table, prune still needs flags, and says where a policy can come from.
    std::fs::write(&conf, "").unwrap();
    let o = e.cmd(&["--config", c, "prune"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("[retention] table"), "{err}");
    assert_eq!(snapshot(&e), before);
}
