//! Replication through real pipes between two stores on one machine: `vmref send | vmref
//! receive`, every received point compared byte for byte with the model of the source disk,
//! the replica image with the newest point; damaged, cut and misdirected streams, modified
//! replicas and killed applies leave the target exactly as before or as after; resume; and a
//! promoted replica whose first backup is incremental.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::store_cmd::{ok, restore, vmref};
use common::{BS, Env, MountGuard, Rng, assert_same, daemon_pid, fuse_ok, is_mounted, test_seed};

const SIZE: usize = 2 << 20;

/// `vmref --store FROM send SEND | vmref --store TO receive RECV` through an OS pipe.
fn pipe(from: &Path, send: &[&str], to: &Path, recv: &[&str]) -> (Output, Output) {
    let mut s = vmref(from)
        .arg("send")
        .args(send)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = s.stdout.take().unwrap();
    let r = vmref(to)
        .arg("receive")
        .args(recv)
        .stdin(Stdio::from(out))
        .output()
        .unwrap();
    (s.wait_with_output().unwrap(), r)
}

fn pipe_ok(from: &Path, send: &[&str], to: &Path, recv: &[&str]) -> String {
    let (s, r) = pipe(from, send, to, recv);
    assert!(
        s.status.success() && r.status.success(),
        "send {send:?} | receive {recv:?}: send: {} receive: {}",
        String::from_utf8_lossy(&s.stderr),
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8(r.stdout).unwrap()
}

/// Run, insist on failure with exactly one stderr line; that line.
fn fails(store: &Path, args: &[&str]) -> String {
    let o = vmref(store).args(args).output().unwrap();
    assert!(!o.status.success(), "vmref {args:?} should fail");
    one_line(&o)
}

fn one_line(o: &Output) -> String {
    let e = String::from_utf8(o.stderr.clone()).unwrap();
    assert_eq!(e.lines().count(), 1, "one stderr line expected: {e:?}");
    e
}

/// Names and ids of a store's points: what "the target is as before" compares.
fn points(store: &Path) -> Vec<(String, String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(store, &["ref", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn target(e: &Env) -> PathBuf {
    let t = e.path("target");
    ok(&t, &["init", "--block-size", "4K"]);
    t
}

fn send_to_file(store: &Path, args: &[&str], file: &Path) {
    let mut a = vec!["send"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--output", file.to_str().unwrap()]);
    ok(store, &a);
}

#[test]
fn full_then_20_incrementals_through_a_pipe() {
    let seed = test_seed("full_then_20_incrementals_through_a_pipe");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; SIZE / 2];
    rng.fill(&mut init);
    let mut e = Env::new(SIZE, &init);
    let t = target(&e);
    let replica = e.path("replica.img");
    let apply = format!("disk0={}", replica.display());
    let mut models = Vec::new();
    for i in 0..21 {
        if i > 0 {
            e.random_writes(&mut rng, 40);
        }
        let name = format!("p{i}");
        e.ok(&["backup", &name]);
        models.push((name.clone(), e.model.clone()));
        let since = if i > 0 {
            vec!["--since".to_string(), format!("p{}", i - 1)]
        } else {
            vec![]
        };
        let mut send: Vec<&str> = vec![&name];
        send.extend(since.iter().map(String::as_str));
        let out = pipe_ok(&e.store, &send, &t, &["--apply", &apply]);
        assert!(out.contains(&format!("received {name}")), "{out}");
        if i > 0 {
            assert!(
                out.contains("in place"),
                "an incremental applies in place: {out}"
            );
        }
        assert_same(
            &format!("replica at {name}"),
            &std::fs::read(&replica).unwrap(),
            &e.model,
        );
    }
    for (name, model) in &models {
        assert_same(
            &format!("received {name}"),
            &restore(&t, name, e.dir.path()),
            model,
        );
    }
    assert!(ok(&t, &["verify"]).contains("all good"));
    // The same ids on both sides: a later incremental applies on top.
    assert_eq!(points(&e.store), points(&t));
    // Received incrementals stored only what changed (plus map nodes).
    let v: serde_json::Value =
        serde_json::from_str(&ok(&t, &["ref", "show", "p20", "--json"])).unwrap();
    assert_eq!(v["backup"]["kind"], "incremental");
    assert!(v["backup"]["stored_blocks"].as_u64().unwrap() <= 40 * 4);
    // A point sent twice is refused, naming it; nothing changes.
    let before = points(&t);
    let (_, r) = pipe(&e.store, &["p20", "--since", "p19"], &t, &[]);
    assert!(!r.status.success());
    assert!(one_line(&r).contains("already exists"));
    assert_eq!(points(&t), before);
}

#[test]
fn checkpoint_sends_need_no_local_backup() {
    let seed = test_seed("checkpoint_sends_need_no_local_backup");
    let mut rng = Rng(seed | 1);
    let mut e = Env::new(SIZE, &[7u8; 100_000]);
    let t = target(&e);
    let replica = e.path("replica.img");
    let apply = format!("disk0={}", replica.display());
    pipe_ok(&e.store, &["--checkpoint", "c0"], &t, &["--apply", &apply]);
    assert_same("c0", &restore(&t, "c0", e.dir.path()), &e.model);
    for i in 1..6 {
        e.random_writes(&mut rng, 30);
        let (name, base) = (format!("c{i}"), format!("c{}", i - 1));
        pipe_ok(
            &e.store,
            &["--checkpoint", &name, "--since", &base],
            &t,
            &["--apply", &apply],
        );
        assert_same(&name, &restore(&t, &name, e.dir.path()), &e.model);
        assert_same("replica", &std::fs::read(&replica).unwrap(), &e.model);
    }
    // On the source the sent checkpoints are plain points: no backup data was kept.
    assert!(e.restorable().is_empty());
    assert!(points(&e.store).iter().all(|p| p.2 == "plain"));
    // A send whose receiver refuses leaves no point behind on the source.
    let (s, r) = pipe(
        &e.store,
        &["--checkpoint", "c9", "--since", "nope"],
        &t,
        &[],
    );
    assert!(!s.status.success() && !r.status.success());
    assert!(!points(&e.store).iter().any(|p| p.0 == "c9"));
}

/// A full and an incremental stream in files, and a target holding the full.
fn streams(e: &mut Env, rng: &mut Rng) -> (PathBuf, PathBuf, PathBuf) {
    e.ok(&["backup", "a"]);
    e.random_writes(rng, 60);
    e.ok(&["backup", "b"]);
    let (fa, fb) = (e.path("a.stream"), e.path("b.stream"));
    send_to_file(&e.store, &["a"], &fa);
    send_to_file(&e.store, &["b", "--since", "a"], &fb);
    let t = target(e);
    let apply = format!("disk0={}", e.path("replica.img").display());
    ok(
        &t,
        &[
            "receive",
            "--input",
            fa.to_str().unwrap(),
            "--apply",
            &apply,
        ],
    );
    (t, fa, fb)
}

#[test]
fn cut_and_damaged_streams_leave_the_target_as_before() {
    let seed = test_seed("cut_and_damaged_streams_leave_the_target_as_before");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; SIZE];
    rng.fill(&mut init);
    let mut e = Env::new(SIZE, &init);
    let (t, _, fb) = streams(&mut e, &mut rng);
    let replica = e.path("replica.img");
    let apply = format!("disk0={}", replica.display());
    let whole = std::fs::read(&fb).unwrap();
    let before = points(&t);
    let replica_before = std::fs::read(&replica).unwrap();
    let bad = e.path("bad.stream");
    let mut trials = 0;
    for k in 0..30 {
        let mut s = whole.clone();
        let what = if k % 2 == 0 {
            let n = rng.below(s.len() as u64) as usize;
            s.truncate(n);
            format!("cut at {n}")
        } else {
            let i = rng.below(s.len() as u64) as usize;
            s[i] ^= 1 << rng.below(8);
            format!("bit flipped at {i}")
        };
        std::fs::write(&bad, &s).unwrap();
        let err = fails(
            &t,
            &[
                "receive",
                "--input",
                bad.to_str().unwrap(),
                "--apply",
                &apply,
            ],
        );
        assert!(
            err.contains("damaged")
                || err.contains("truncated")
                || err.contains("magic")
                || err.contains("empty"),
            "{what}: {err}"
        );
        assert_eq!(points(&t), before, "{what}: no point may appear");
        assert_eq!(
            std::fs::read(&replica).unwrap(),
            replica_before,
            "{what}: replica"
        );
        ok(&t, &["receive", "--abort"]);
        assert!(!t.join("receive.partial").exists());
        trials += 1;
    }
    eprintln!("{trials} cut or damaged streams refused");
    // The whole stream still applies, and the abort reclaimed what the cut ones stored.
    ok(
        &t,
        &[
            "receive",
            "--input",
            fb.to_str().unwrap(),
            "--apply",
            &apply,
        ],
    );
    assert_same("b", &restore(&t, "b", e.dir.path()), &e.model);
    assert_same("replica", &std::fs::read(&replica).unwrap(), &e.model);
    assert!(ok(&t, &["verify"]).contains("all good"));
}

#[test]
fn refusals_name_the_reason_and_change_nothing() {
    let seed = test_seed("refusals_name_the_reason_and_change_nothing");
    let mut rng = Rng(seed | 1);
    let mut e = Env::new(SIZE, &[1u8; 300_000]);
    let (t, _, fb) = streams(&mut e, &mut rng);
    e.random_writes(&mut rng, 10);
    e.ok(&["backup", "c"]);
    let fc = e.path("c.stream");
    send_to_file(&e.store, &["c", "--since", "b"], &fc);
    let replica = e.path("replica.img");
    let apply = format!("disk0={}", replica.display());
    let before = points(&t);
    // The wrong base: both ids named.
    let err = fails(&t, &["receive", "--input", fc.to_str().unwrap()]);
    let b_id = points(&e.store).into_iter().find(|p| p.0 == "b").unwrap().1;
    let a_id = before[0].1.clone();
    assert!(err.contains(&b_id) && err.contains(&a_id), "{err}");
    // Another block size.
    let t2 = e.path("t64k");
    ok(&t2, &["init", "--block-size", "64K"]);
    let err = fails(&t2, &["receive", "--input", fb.to_str().unwrap()]);
    assert!(err.contains("block size"), "{err}");
    // A replica image modified since its last apply.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&replica)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"x", 5).unwrap();
    drop(f);
    let modified = std::fs::read(&replica).unwrap();
    let err = fails(
        &t,
        &[
            "receive",
            "--input",
            fb.to_str().unwrap(),
            "--apply",
            &apply,
        ],
    );
    assert!(err.contains("was modified"), "{err}");
    assert_eq!(std::fs::read(&replica).unwrap(), modified);
    // A new replica over an existing file.
    let err = fails(
        &t,
        &[
            "receive",
            "--input",
            fb.to_str().unwrap(),
            "--apply",
            &format!("disk0={}", e.image.display()),
        ],
    );
    assert!(err.contains("disk0"), "{err}");
    // Not a stream at all.
    let junk = e.path("junk");
    std::fs::write(&junk, b"hello").unwrap();
    assert!(
        fails(&t, &["receive", "--input", junk.to_str().unwrap()]).contains("not a vmref stream")
    );
    assert_eq!(points(&t), before);
    // A point a replica holds cannot be deleted.
    assert!(fails(&t, &["ref", "delete", "a"]).contains("replica"));
    // Receiving into the store that has the live disk is refused.
    assert!(fails(&e.store, &["receive", "--input", fc.to_str().unwrap()]).contains("exists"));
}

#[test]
fn killed_applies_end_exactly_before_or_after() {
    let seed = test_seed("killed_applies_end_exactly_before_or_after");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; SIZE];
    rng.fill(&mut init);
    let mut e = Env::new(SIZE, &init);
    let t = target(&e);
    let replica = e.path("replica.img");
    let apply = format!("disk0={}", replica.display());
    e.ok(&["backup", "k0"]);
    pipe_ok(&e.store, &["k0"], &t, &["--apply", &apply]);
    let mut prev = e.model.clone();
    let mut killed = 0;
    for i in 1..=20 {
        // Big enough that the apply writes a few hundred blocks.
        let w: Vec<(u64, Vec<u8>)> = (0..40)
            .map(|_| {
                let mut d = vec![0u8; 4 * BS];
                rng.fill(&mut d);
                (rng.below((SIZE - 4 * BS) as u64), d)
            })
            .collect();
        e.write(&w);
        let (name, base) = (format!("k{i}"), format!("k{}", i - 1));
        e.ok(&["backup", &name]);
        let stream = e.path("k.stream");
        send_to_file(&e.store, &[&name, "--since", &base], &stream);
        let kill_after = rng.below(200);
        let o = vmref(&t)
            .args([
                "receive",
                "--input",
                stream.to_str().unwrap(),
                "--apply",
                &apply,
            ])
            .env("VMREF_TEST_APPLY_ABORT_AFTER", kill_after.to_string())
            .output()
            .unwrap();
        if !o.status.success() {
            killed += 1;
        }
        // Whether it died or finished, the next command brings the replica to one point.
        ok(&t, &["receive", "--abort"]);
        let got = std::fs::read(&replica).unwrap();
        let committed = points(&t).iter().any(|p| p.0 == name);
        if committed {
            assert_same(
                &format!("trial {i} (killed after {kill_after}: {})", o.status),
                &got,
                &e.model,
            );
        } else {
            assert_same(&format!("trial {i}: before"), &got, &prev);
            pipe_ok(
                &e.store,
                &[&name, "--since", &base],
                &t,
                &["--apply", &apply],
            );
        }
        prev = e.model.clone();
    }
    eprintln!("{killed} of 20 applies killed part way; every replica exact");
    assert!(killed >= 10, "only {killed} applies were killed");
    assert!(ok(&t, &["verify"]).contains("all good"));
}

#[test]
fn a_cut_transfer_resumes_and_an_altered_token_is_refused() {
    let seed = test_seed("a_cut_transfer_resumes_and_an_altered_token_is_refused");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; SIZE];
    rng.fill(&mut init);
    let e = Env::new(SIZE, &init);
    e.ok(&["backup", "full"]);
    let f = e.path("full.stream");
    send_to_file(&e.store, &["full"], &f);
    let t = target(&e);
    let whole = std::fs::read(&f).unwrap();
    let half = e.path("half.stream");
    std::fs::write(&half, &whole[..whole.len() / 2]).unwrap();
    let err = fails(&t, &["receive", "--input", half.to_str().unwrap()]);
    let token = common::resume_token(&err);
    // The same full stream again is refused: a partial receive is pending.
    assert!(fails(&t, &["receive", "--input", f.to_str().unwrap()]).contains("--resume"));
    // An altered token is refused by the sender.
    let mut altered = token.clone().into_bytes();
    let i = altered.len() - 12;
    altered[i] = if altered[i] == b'0' { b'1' } else { b'0' };
    let altered = String::from_utf8(altered).unwrap();
    let o = vmref(&e.store)
        .args(["send", "--resume", &altered, "--output"])
        .arg(e.path("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(one_line(&o).contains("token"));
    let out = pipe_ok(&e.store, &["--resume", &token], &t, &[]);
    assert!(out.contains("resumed"), "{out}");
    assert_same("resumed", &restore(&t, "full", e.dir.path()), &e.model);
    assert!(ok(&t, &["verify"]).contains("all good"));
    assert!(!t.join("receive.partial").exists());
}

fn mount(store: &Path, mnt: &Path) -> MountGuard {
    std::fs::create_dir_all(mnt).unwrap();
    ok(store, &["mount", mnt.to_str().unwrap()]);
    assert!(is_mounted(mnt));
    MountGuard {
        mnt: mnt.to_path_buf(),
        pid: daemon_pid(store),
        child: None,
    }
}

#[test]
fn through_daemons_then_promote_and_back_up_incrementally() {
    if !fuse_ok("through_daemons_then_promote_and_back_up_incrementally") {
        return;
    }
    let seed = test_seed("through_daemons_then_promote_and_back_up_incrementally");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; SIZE];
    rng.fill(&mut init);
    let mut e = Env::new(SIZE, &init);
    let t = target(&e);
    let replica = e.path("replica.img");
    let apply = format!("disk0={}", replica.display());
    e.ok(&["backup", "m0"]);
    pipe_ok(&e.store, &["m0"], &t, &["--apply", &apply]);
    e.random_writes(&mut rng, 30);
    e.ok(&["backup", "m1"]);
    {
        // Both stores mounted: the streams go through both daemons' sockets.
        let _ms = mount(&e.store, &e.path("mnt-src"));
        let _mt = mount(&t, &e.path("mnt-dst"));
        pipe_ok(&e.store, &["m1", "--since", "m0"], &t, &["--apply", &apply]);
        let via = std::fs::read(e.path("mnt-dst/m1/disk0.img")).unwrap();
        assert_same("m1 through the target's mount", &via, &e.model);
        ok(&e.store, &["umount", e.path("mnt-src").to_str().unwrap()]);
        ok(&t, &["umount", e.path("mnt-dst").to_str().unwrap()]);
    }
    // Failover: the replica becomes the target's live disk, tracking from m1.
    assert!(ok(&t, &["replica", "list"]).contains("m1"));
    ok(&t, &["replica", "promote", "disk0"]);
    assert!(ok(&t, &["replica", "list"]).contains("no replicas"));
    let ch: serde_json::Value =
        serde_json::from_str(&ok(&t, &["changes", "--since", "m1", "--json"])).unwrap();
    assert_eq!(ch["disks"][0]["changed_bytes"], 0, "{ch}");
    assert!(fails(&t, &["changes", "--since", "m0"]).contains("unknown"));
    let mnt = e.path("mnt-promoted");
    let _g = mount(&t, &mnt);
    let mut model = e.model.clone();
    let live = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("live/disk0.img"))
        .unwrap();
    for _ in 0..5 {
        let off = rng.below((SIZE - 3 * BS) as u64);
        let mut d = vec![0u8; 3 * BS];
        rng.fill(&mut d);
        std::os::unix::fs::FileExt::write_all_at(&live, &d, off).unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    live.sync_all().unwrap();
    drop(live);
    let b: serde_json::Value =
        serde_json::from_str(&ok(&t, &["backup", "after", "--json"])).unwrap();
    assert_eq!(b["disks"][0]["kind"], "incremental", "{b}");
    assert!(
        b["disks"][0]["scanned_blocks"].as_u64().unwrap() <= 5 * 4,
        "{b}"
    );
    assert_same(
        "after failover",
        &restore(&t, "after", e.dir.path()),
        &model,
    );
    ok(&t, &["umount", mnt.to_str().unwrap()]);
}

#[test]
fn receivers_killed_at_random_moments_leave_before_or_after() {
    let seed = test_seed("receivers_killed_at_random_moments_leave_before_or_after");
    let mut rng = Rng(seed | 1);
    let size = 16 << 20;
    let mut init = vec![0u8; size];
    rng.fill(&mut init);
    let e = Env::new(size, &init);
    e.ok(&["backup", "big"]);
    let f = e.path("big.stream");
    send_to_file(&e.store, &["big"], &f);
    let t = target(&e);
    let replica = e.path("replica.img");
    let mut outcomes = (0, 0);
    for trial in 0..8 {
        let mut c = vmref(&t)
            .args(["receive", "--input", f.to_str().unwrap(), "--apply"])
            .arg(format!("disk0={}", replica.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.below(400)));
        let _ = c.kill();
        let st = c.wait().unwrap();
        ok(&t, &["receive", "--abort"]);
        let held = points(&t).iter().any(|p| p.0 == "big");
        if held {
            outcomes.1 += 1;
            assert_same(
                &format!("trial {trial} ({st})"),
                &restore(&t, "big", e.dir.path()),
                &e.model,
            );
            assert_same("replica", &std::fs::read(&replica).unwrap(), &e.model);
            ok(&t, &["replica", "forget", "disk0"]);
            ok(&t, &["ref", "delete", "big"]);
        } else {
            outcomes.0 += 1;
            assert!(
                !replica.exists(),
                "trial {trial}: no replica without its point"
            );
        }
        std::fs::remove_file(&replica).ok();
        assert!(!t.join("receive.partial").exists());
    }
    eprintln!(
        "{} receivers killed before their commit, {} after",
        outcomes.0, outcomes.1
    );
    ok(&t, &["receive", "--input", f.to_str().unwrap()]);
    assert_same("big", &restore(&t, "big", e.dir.path()), &e.model);
    assert!(ok(&t, &["verify"]).contains("all good"));
}

#[test]
fn promote_refuses_a_replica_behind_a_newer_point_and_trailing_bytes_are_refused() {
    let seed = test_seed("promote_refuses_a_replica_behind_a_newer_point");
    let mut rng = Rng(seed | 1);
    let mut e = Env::new(SIZE, &[3u8; 200_000]);
    let t = target(&e);
    let replica = e.path("replica.img");
    let apply = format!("disk0={}", replica.display());
    e.ok(&["backup", "p"]);
    pipe_ok(&e.store, &["p"], &t, &["--apply", &apply]);
    e.random_writes(&mut rng, 20);
    e.ok(&["backup", "q"]);
    // q arrives without --apply: the replica still holds p.
    let fq = e.path("q.stream");
    send_to_file(&e.store, &["q", "--since", "p"], &fq);
    // Two streams back to back, or junk after one: refused, not half-read.
    let two = e.path("two.stream");
    let mut b = std::fs::read(&fq).unwrap();
    b.extend_from_slice(b"junk");
    std::fs::write(&two, &b).unwrap();
    assert!(fails(&t, &["receive", "--input", two.to_str().unwrap()]).contains("follow the end"));
    ok(&t, &["receive", "--abort"]);
    ok(&t, &["receive", "--input", fq.to_str().unwrap()]);
    // Tracking from p would miss p -> q: refused until the replica is at q.
    let err = fails(&t, &["replica", "promote", "disk0"]);
    assert!(err.contains("point q"), "{err}");
    assert!(ok(&t, &["replica", "list"]).contains("\tp"));
    // Brought to q (a stream since q to q is not needed: delete q and receive it with --apply).
    ok(&t, &["ref", "delete", "q"]);
    ok(
        &t,
        &[
            "receive",
            "--input",
            fq.to_str().unwrap(),
            "--apply",
            &apply,
        ],
    );
    ok(&t, &["replica", "promote", "disk0"]);
    let ch: serde_json::Value =
        serde_json::from_str(&ok(&t, &["changes", "--since", "q", "--json"])).unwrap();
    assert_eq!(ch["disks"][0]["changed_bytes"], 0, "{ch}");
    assert_same(
        "promoted image",
        &std::fs::read(&replica).unwrap(),
        &e.model,
    );
}
