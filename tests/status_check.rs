//! `vmref status` for monitors. `--check`: one line and exit 0 while tracking covers the newest
//! backup and it is recent enough; non-zero, naming each problem, when a disk is unavailable,
//! its changes since the newest backup are unknown, the last backup attempt failed (made to
//! fail for real: a missing base, damaged backup data, a store held by another process, in
//! the command or in the mounted daemon), or the newest backup is too old. `--json`: each
//! disk's tracking, newest point and backup with their ages, the last backup's outcome and
//! duration, and the store's and repository's bytes.

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

fn status(e: &Env) -> serde_json::Value {
    serde_json::from_str(&e.ok(&["status", "--json"])).unwrap()
}

/// The last backup as `status --json` shows it, store-wide and for disk0 (the same record).
fn last_backup(e: &Env) -> serde_json::Value {
    let st = status(e);
    assert_eq!(st["last_backup"], st["disks"][0]["last_backup"], "{st:#}");
    st["last_backup"].clone()
}

#[test]
fn status_json_carries_points_space_and_the_last_backup() {
    let mut e = Env::new(1 << 20, &[7u8; 64 << 10]);
    let st = status(&e);
    assert!(st.get("last_backup").is_none(), "{st:#}");
    assert!(st["disks"][0].get("newest_point").is_none(), "{st:#}");

    e.ok(&["backup", "b1"]);
    e.ok(&["ref", "create", "r1"]);
    e.write(&[(0, vec![1u8; 4096])]);
    let st = status(&e);
    let d = &st["disks"][0];
    assert_eq!(d["tracking"], "ok", "{st:#}");
    assert_eq!(d["newest_point"]["name"], "r1", "{st:#}");
    assert_eq!(d["newest_point"]["state"], "plain", "{st:#}");
    assert_eq!(d["newest_backup"]["name"], "b1", "{st:#}");
    assert_eq!(d["newest_backup"]["state"], "restorable", "{st:#}");
    assert!(
        d["newest_backup"]["age_secs"].as_u64().unwrap() < 60,
        "{st:#}"
    );
    assert!(d["tracking_bytes"].as_u64().unwrap() > 0, "{st:#}");
    let stored = st["space"]["stored_bytes"].as_u64().unwrap();
    assert!(stored > 0, "{st:#}");
    // The store holds the repository and more.
    assert!(st["store_bytes"].as_u64().unwrap() > stored, "{st:#}");
    let b = &st["last_backup"];
    assert_eq!(b["name"], "b1", "{st:#}");
    assert_eq!(b["result"], "ok", "{st:#}");
    assert_eq!(b["kind"], "full", "{st:#}");
    assert!(b.get("error").is_none(), "{st:#}");
    let took = b["duration_secs"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&took), "{st:#}");
    let text = e.ok(&["status"]);
    assert!(text.contains("last backup: b1 ok (full"), "{text}");
}

#[test]
fn a_failed_backup_is_recorded_and_fails_the_check() {
    let mut e = Env::new(1 << 20, &[7u8; 64 << 10]);
    e.ok(&["backup", "b1"]);
    e.ok(&["status", "--check"]);

    // A base that does not exist: the backup fails where it runs, and says so there.
    let err = e.fails(&["backup", "b2", "--since", "nope"]);
    let b = last_backup(&e);
    assert_eq!(b["result"], "failed", "{b:#}");
    assert_eq!(b["name"], "b2", "{b:#}");
    let why = b["error"].as_str().unwrap();
    assert!(err.contains(why), "recorded {why:?}, printed {err:?}");
    assert!(why.contains("nope"), "{why}");
    let check = e.fails(&["status", "--check"]);
    let line = one_line(&check);
    assert!(line.contains("the last backup, b2 failed after"), "{line}");
    assert!(line.contains(why), "{line}");
    assert!(e.ok(&["status"]).contains("last backup: b2 failed"));

    // A good backup clears it.
    e.ok(&["backup", "b2"]);
    assert_eq!(last_backup(&e)["result"], "ok");
    e.ok(&["status", "--check"]);

    // Damaged backup data under the base: the incremental cannot read the base's map.
    e.write(&[(4096, vec![3u8; 4096])]);
    common::flip_blob(&e.store, &common::point_root(&e.store, "b2", "disk0"));
    e.fails(&["backup", "b3"]);
    let b = last_backup(&e);
    assert_eq!(b["result"], "failed", "{b:#}");
    assert_eq!(b["name"], "b3", "{b:#}");
    let check = e.fails(&["status", "--check"]);
    assert!(
        one_line(&check).contains("the last backup, b3 failed"),
        "{check}"
    );
    // A full backup does not need the base: it succeeds, and the check is clean again.
    e.ok(&["backup", "b3", "--full"]);
    let b = last_backup(&e);
    assert_eq!((&b["result"], &b["kind"]), (&"ok".into(), &"full".into()));
    e.ok(&["status", "--check"]);
}

#[test]
fn a_backup_that_never_reached_the_store_is_recorded_by_the_command() {
    let e = Env::new(1 << 20, &[7u8; 64 << 10]);
    e.ok(&["backup", "b1"]);
    // Another process holds the store (as another command would) and no daemon answers.
    // --no-fork: the lock's holder is the process killed below, not a child left running.
    let mut holder = std::process::Command::new("flock")
        .arg("--no-fork")
        .arg(e.store.join("lock"))
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    let held = std::time::Instant::now();
    while std::process::Command::new("flock")
        .args(["--nonblock", "--conflict-exit-code", "9"])
        .arg(e.store.join("lock"))
        .arg("true")
        .status()
        .unwrap()
        .code()
        != Some(9)
    {
        assert!(held.elapsed().as_secs() < 20, "flock never took the lock");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let o = e.run(&["backup", "b2"]);
    assert!(
        !o.status.success(),
        "a backup ran on a store another process holds"
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    holder.kill().unwrap();
    holder.wait().unwrap();
    let b = last_backup(&e);
    assert_eq!(b["result"], "failed", "{b:#}");
    assert_eq!(b["name"], "b2", "{b:#}");
    assert!(err.contains(b["error"].as_str().unwrap()), "{b:#} {err}");
    let check = e.fails(&["status", "--check"]);
    assert!(
        one_line(&check).contains("the last backup, b2 failed"),
        "{check}"
    );
}

#[test]
fn the_mounted_daemon_records_the_backups_it_runs() {
    if !common::fuse_ok("the_mounted_daemon_records_the_backups_it_runs") {
        return;
    }
    let e = Env::new(1 << 20, &[7u8; 64 << 10]);
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    e.ok(&["mount", mnt.to_str().unwrap()]);
    let _guard = common::MountGuard {
        mnt: mnt.clone(),
        pid: common::daemon_pid(&e.store),
        child: None,
    };
    e.ok(&["backup", "b1"]);
    assert_eq!(last_backup(&e)["result"], "ok");
    let err = e.fails(&["backup", "b2", "--since", "nope"]);
    let b = last_backup(&e);
    assert_eq!((&b["result"], &b["name"]), (&"failed".into(), &"b2".into()));
    assert!(err.contains(b["error"].as_str().unwrap()), "{b:#} {err}");
    let check = e.fails(&["status", "--check"]);
    assert!(
        one_line(&check).contains("the last backup, b2 failed"),
        "{check}"
    );
    e.ok(&["umount", mnt.to_str().unwrap()]);
    // The record outlives the daemon.
    assert_eq!(last_backup(&e)["result"], "failed");
}

#[test]
fn a_backup_killed_while_it_runs_is_reported_interrupted() {
    let mut rng =
        common::Rng(common::test_seed("a_backup_killed_while_it_runs_is_reported_interrupted") | 1);
    let mut data = vec![0u8; 64 << 20];
    rng.fill(&mut data);
    let e = Env::new(data.len(), &data);
    let store = vmref::store::Store::open(&e.store).unwrap();
    let mut killed = false;
    for attempt in 0..5 {
        let name = format!("k{attempt}");
        let mut child = e
            .cmd(&["backup", &name, "--full"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill it once it has recorded its start, while it copies.
        let running = loop {
            if let Ok(Some(r)) = vmref::backup::outcome::read(&store)
                && r.name == name
                && r.result == vmref::backup::outcome::Outcome::Running
            {
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        let _ = child.kill();
        let done = child.wait().unwrap().success();
        if running && !done {
            killed = true;
            let b = last_backup(&e);
            assert_eq!(
                (&b["result"], &b["name"]),
                (&"failed".into(), &name.as_str().into()),
                "{b:#}"
            );
            assert!(
                b["error"].as_str().unwrap().starts_with("interrupted"),
                "{b:#}"
            );
            assert!(b.get("runner").is_none(), "{b:#}");
            let check = e.fails(&["status", "--check"]);
            assert!(
                one_line(&check).contains(&format!("the last backup, {name} failed")),
                "{check}"
            );
            break;
        }
    }
    assert!(killed, "every backup finished before it could be killed");
    e.ok(&["backup", "after"]);
    assert_eq!(last_backup(&e)["result"], "ok");
    e.ok(&["status", "--check"]);
}
