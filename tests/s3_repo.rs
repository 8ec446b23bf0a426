//! A store whose repository is in an S3 bucket, against a real Garage server
//! (`common::garage`): the backend's contract, a chain of backups restored and verified, a
//! prune, the mount, a server killed under a backup, settings from the config file. Tests
//! that need Garage skip without it (and fail when `VMREF_REQUIRE_S3=1`).

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;

use common::garage::{BUCKET, Garage, SECRET_KEY};
use common::{BS, Env, MountGuard, Rng, assert_same, daemon_pid, fuse_ok, test_seed};
use vmref::repo::backend::{Backend, is_missing};

const SIZE: usize = 8 << 20;

/// A store on `s3://BUCKET/prefix` with 64 KiB blocks: every block a point read fetches is
/// one ranged GET, which Garage answers about 40 ms late on loopback (it does not set
/// TCP_NODELAY, so its body waits for the delayed ACK of its headers); 4 KiB blocks made the
/// chain test take 5 minutes.
fn s3_env(g: &Garage, prefix: &str, rng: &mut Rng, extra: &[&str]) -> Env {
    let mut data = vec![0u8; 2 << 20];
    rng.fill(&mut data);
    let loc = format!("s3://{BUCKET}/{prefix}");
    let init = [
        &["--repository", loc.as_str(), "--block-size", "64K"],
        extra,
    ]
    .concat();
    Env::with_init(SIZE, &data, &init, g.env(), Some(g.s3_config()))
}

/// Insist on one line on stderr, naming the object store and never the secret.
fn one_clear_line(err: &str) {
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("object store"), "{err}");
    assert!(!err.contains(SECRET_KEY), "the secret leaked: {err}");
}

#[test]
fn s3_backend_keeps_the_backend_contract() {
    let Some(g) = Garage::start("s3_backend_keeps_the_backend_contract") else {
        return;
    };
    let b = g.backend("contract");
    assert!(b.put_if_absent("packs/ab/abcd", b"hello world").unwrap());
    assert!(!b.put_if_absent("packs/ab/abcd", b"other").unwrap());
    assert_eq!(b.get("packs/ab/abcd").unwrap(), b"hello world");
    assert_eq!(b.get_range("packs/ab/abcd", 6, 5).unwrap(), b"world");
    assert_eq!(b.get_range("packs/ab/abcd", 11, 0).unwrap(), b"");
    for (off, len) in [(6, 6), (11, 1), (20, 1), (12, 0)] {
        let e = b.get_range("packs/ab/abcd", off, len).unwrap_err();
        assert!(matches!(e, vmref::Error::Format { .. }), "{e}");
        assert!(!is_missing(&e), "{off}+{len}: {e}");
    }
    assert_eq!(b.size("packs/ab/abcd").unwrap(), 11);
    assert!(b.put_if_absent("packs/cd/ef", b"").unwrap());
    assert!(b.put_if_absent("index/1", b"i").unwrap());
    assert!(b.put_if_absent("config", b"c").unwrap());
    // A large object goes through the spool file.
    let big: Vec<u8> = (0..3 << 20).map(|i| (i * 7 % 251) as u8).collect();
    assert!(
        b.put_stream("packs/ff/big", &mut |w| {
            for c in big.chunks(100_000) {
                w.write_all(c).unwrap();
            }
            Ok(())
        })
        .unwrap()
    );
    assert!(!b.put_stream("packs/ff/big", &mut |_| Ok(())).unwrap());
    assert_eq!(b.get("packs/ff/big").unwrap(), big);
    assert_eq!(
        b.list("packs/").unwrap(),
        vec!["packs/ab/abcd", "packs/cd/ef", "packs/ff/big"]
    );
    assert_eq!(b.list("packs/ab").unwrap(), vec!["packs/ab/abcd"]);
    assert_eq!(b.list("index/").unwrap(), vec!["index/1"]);
    assert_eq!(b.list("nothing/").unwrap(), Vec::<String>::new());
    assert_eq!(b.list("").unwrap().len(), 5);
    // Another prefix of the bucket is another repository.
    assert_eq!(g.backend("other").list("").unwrap(), Vec::<String>::new());
    b.delete("packs/ab/abcd").unwrap();
    b.delete("packs/ab/abcd").unwrap();
    for e in [
        b.get("packs/ab/abcd").unwrap_err(),
        b.get_range("packs/ab/abcd", 0, 1).unwrap_err(),
        b.size("packs/ab/abcd").unwrap_err(),
    ] {
        assert!(is_missing(&e), "{e}");
    }
    for bad in ["", "/abs", "a/../b", "a//b", ".hidden", "a/.tmp", "a b"] {
        assert!(b.put_if_absent(bad, b"x").is_err(), "{bad:?}");
    }
    // A wrong secret is refused by the server, in one line that does not show it.
    let mut s = g.settings();
    s.secret_access_key = "f".repeat(64);
    let wrong = vmref::s3::S3Backend::new(&format!("s3://{BUCKET}/contract"), s).unwrap();
    let e = wrong.get("index/1").unwrap_err().to_string();
    assert!(
        e.contains("HTTP 403") && !e.contains(&"f".repeat(64)),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn s3_chain_of_backups_restores_verifies_and_prunes() {
    let Some(g) = Garage::start("s3_chain_of_backups_restores_verifies_and_prunes") else {
        return;
    };
    let mut rng = Rng(test_seed("s3_chain") | 1);
    let mut e = s3_env(&g, "chain", &mut rng, &[]);
    assert!(
        !e.store.join("repo").exists(),
        "no local repository beside an S3 one"
    );
    let mut points = Vec::new();
    e.ok(&["backup", "p00"]);
    points.push(("p00".to_string(), e.model.clone()));
    for i in 1..=11 {
        e.random_writes(&mut rng, 20);
        let name = format!("p{i:02}");
        e.ok(&["backup", &name]);
        points.push((name, e.model.clone()));
    }
    assert_eq!(e.restorable().len(), 12);
    for (p, model) in &points {
        assert_same(p, &e.restore(p), model);
    }
    e.ok(&["verify"]);
    let space = e.space();
    assert!(
        space.stored_bytes > 0 && space.logical_bytes > 0,
        "{space:?}"
    );
    let objects = g.backend("chain").list("").unwrap();
    assert!(
        objects.iter().any(|o| o.starts_with("packs/")),
        "{objects:?}"
    );
    assert!(objects.iter().any(|o| o == "config"), "{objects:?}");

    e.ok(&["prune", "--keep-last", "3"]);
    let kept: Vec<String> = points[9..].iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(e.restorable(), kept);
    e.ok(&["verify"]);
    for (p, model) in &points[9..] {
        assert_same(p, &e.restore(p), model);
    }
    // The collection deleted what the pruned points alone needed.
    let after = g.backend("chain").list("").unwrap();
    assert!(e.space().stored_bytes <= space.stored_bytes, "{after:?}");
}

#[test]
fn s3_points_read_through_the_mount() {
    let test = "s3_points_read_through_the_mount";
    if !fuse_ok(test) {
        return;
    }
    let Some(g) = Garage::start(test) else {
        return;
    };
    let mut rng = Rng(test_seed(test) | 1);
    let mut e = s3_env(&g, "mount", &mut rng, &[]);
    e.ok(&["backup", "m0"]);
    let m0 = e.model.clone();
    e.random_writes(&mut rng, 30);
    e.ok(&["backup", "m1"]);
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    e.ok(&["mount", mnt.to_str().unwrap()]);
    let _guard = MountGuard {
        mnt: mnt.clone(),
        pid: daemon_pid(&e.store),
        child: None,
    };
    let scratch = e.dir.path().to_path_buf();
    let cmp = |point: &str, model: &[u8]| {
        let want = scratch.join(format!("model-{point}.img"));
        std::fs::write(&want, model).unwrap();
        let got = mnt.join(point).join("disk0.img");
        let st = Command::new("cmp").arg(&got).arg(&want).status().unwrap();
        assert!(st.success(), "cmp {} against the model", got.display());
    };
    cmp("m0", &m0);
    cmp("m1", &e.model);
    // A backup through the daemon, of a write through the live file.
    let live = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("live/disk0.img"))
        .unwrap();
    let mut data = vec![0u8; 5 * BS + 123];
    rng.fill(&mut data);
    let off = 3 * BS as u64 + 17;
    live.write_all_at(&data, off).unwrap();
    live.sync_all().unwrap();
    drop(live);
    e.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    e.ok(&["backup", "m2"]);
    cmp("m2", &e.model);
    e.ok(&["verify"]);
    e.ok(&["umount", mnt.to_str().unwrap()]);
}

/// The bytes the server keeps on disk: grows as uploads land.
fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            n += if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            };
        }
    }
    n
}

#[test]
fn s3_server_killed_under_a_backup() {
    let test = "s3_server_killed_under_a_backup";
    let Some(mut g) = Garage::start(test) else {
        return;
    };
    let mut rng = Rng(test_seed(test) | 1);
    let mut e = s3_env(&g, "kill", &mut rng, &["--compression", "none"]);
    e.ok(&["backup", "k0"]);

    // The server is gone before the backup starts.
    e.random_writes(&mut rng, 20);
    g.kill();
    let err = e.fails(&["backup", "k1"]);
    one_clear_line(&err);
    assert_eq!(e.restorable(), vec!["k0"], "no point committed");
    g.restart();
    e.ok(&["backup", "k1"]);
    e.ok(&["verify"]);
    assert_same("k1", &e.restore("k1"), &e.model);

    // The server dies while a backup uploads: once a MiB of its 8 MiB pack has landed.
    let mut big = vec![0u8; SIZE - BS];
    rng.fill(&mut big);
    e.write(&[(0, big)]);
    let data_dir = g.data_dir();
    let before = dir_bytes(&data_dir);
    let mut child = e
        .cmd(&["backup", "k2"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut killed = false;
    while child.try_wait().unwrap().is_none() {
        if dir_bytes(&data_dir) > before + (1 << 20) || start.elapsed().as_secs() > 30 {
            g.kill();
            killed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // The backup won the race (its last upload landed first): it must be whole.
        eprintln!("{test}: the backup finished before the server died (killed: {killed})");
        assert!(e.restorable().contains(&"k2".to_string()));
    } else {
        eprintln!("{test}: the backup failed as the server died: {err}");
        one_clear_line(&err);
        assert_eq!(e.restorable(), vec!["k0", "k1"], "no point committed");
    }
    g.restart();
    // Consistent before anything repairs it: every committed point verifies and restores,
    // and what the failed backup uploaded is only garbage nothing names.
    e.ok(&["verify"]);
    let committed = e.restorable();
    e.ok(&["backup", "k3"]);
    e.ok(&["verify"]);
    assert_same("k3", &e.restore("k3"), &e.model);
    // A collection over the leftovers trips over nothing and keeps every point whole.
    let before = g.backend("kill").list("packs/").unwrap().len();
    e.ok(&["ref", "delete", "k0"]);
    let mut want: Vec<String> = committed.into_iter().filter(|p| p != "k0").collect();
    want.push("k3".into());
    assert_eq!(e.restorable(), want);
    e.ok(&["verify"]);
    assert_same("k3", &e.restore("k3"), &e.model);
    let after = g.backend("kill").list("packs/").unwrap().len();
    assert!(
        after <= before,
        "{before} packs before the collection, {after} after"
    );
    // The server gone under a restore and a verify: each fails in one clear line.
    g.kill();
    let err = e.restore_fails("k3");
    one_clear_line(&err);
    let o = e.run(&["verify"]);
    assert!(!o.status.success());
    one_clear_line(&String::from_utf8_lossy(&o.stderr));
}

#[test]
fn s3_settings_from_the_config_file() {
    let test = "s3_settings_from_the_config_file";
    let Some(g) = Garage::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (store, image) = (dir.path().join("store"), dir.path().join("d.img"));
    let mut data = vec![0u8; 1 << 20];
    Rng(test_seed(test) | 1).fill(&mut data);
    std::fs::write(&image, &data).unwrap();
    let cfg = g.config_file();
    let vmref = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmref"));
        c.arg("--store").arg(&store).arg("--config").arg(&cfg);
        for v in [
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            c.env_remove(v);
        }
        let o = c.args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let loc = format!("s3://{BUCKET}/config-file");
    vmref(&["init", "--repository", &loc]);
    vmref(&["disk", "add", "disk0", image.to_str().unwrap()]);
    vmref(&["backup", "c0"]);
    vmref(&["verify"]);
    let to = dir.path().join("r.img");
    vmref(&[
        "restore",
        "c0",
        "--disk",
        "disk0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_same("c0", &std::fs::read(&to).unwrap(), &data);
    assert!(g.backend("config-file").size("config").is_ok());
}

/// Refusals that need no server: each is one line, and leaves the directory free for the
/// next `init`.
#[test]
fn s3_init_refuses_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let init = |loc: &str, envs: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmref"));
        c.arg("--store")
            .arg(&store)
            .args(["init", "--repository", loc]);
        for v in [
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
        ] {
            c.env_remove(v);
        }
        let o = c.envs(envs.iter().copied()).output().unwrap();
        assert!(!o.status.success(), "{loc} {envs:?}");
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!store.exists(), "{loc}: init left {}", store.display());
        err
    };
    let creds = [("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")];
    assert!(init("s3://No_Such", &creds).contains("bucket name"));
    assert!(init("file:///x", &creds).contains("s3://BUCKET"));
    assert!(init("s3://bucket/../x", &creds).contains("repository"));
    assert!(init("s3://bucket/p", &[]).contains("no credentials"));
    let http = [
        creds[0],
        creds[1],
        ("AWS_ENDPOINT_URL", "http://192.0.2.1:3900"),
    ];
    assert!(init("s3://bucket/p", &http).contains("plain http"));
    // Nothing listens on port 1: retried, then one line.
    let down = [
        creds[0],
        creds[1],
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
    ];
    let err = init("s3://bucket/p", &down);
    assert!(err.contains("attempts") && !err.contains("\"s\""), "{err}");
}

/// Bytes of the cache files under `dir` and their number.
fn cache_files(dir: &std::path::Path) -> (u64, usize) {
    let mut n = (0, 0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if !e.file_name().to_string_lossy().starts_with('.') {
                n.0 += e.metadata().unwrap().len();
                n.1 += 1;
            }
        }
    }
    n
}

#[test]
fn s3_read_cache_fetches_segments_once_and_never_gives_wrong_bytes() {
    use vmref::s3::cache::{CachedBackend, SEGMENT};
    let test = "s3_read_cache_fetches_segments_once_and_never_gives_wrong_bytes";
    let Some(g) = Garage::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("cache");
    let mut rng = Rng(test_seed(test) | 1);
    // 3 MiB and a bit: four segments, the last one short.
    let mut obj = vec![0u8; 3 * SEGMENT as usize + 1000];
    rng.fill(&mut obj);
    let name = "packs/ab/0123456789abcdef";
    assert!(g.backend("cache").put_if_absent(name, &obj).unwrap());
    let cached = |cap: u64| CachedBackend::new(g.backend("cache"), &cdir, cap).unwrap();

    // A sequential reader in 64 KiB steps: each segment is fetched once (by the reader or
    // ahead of it), not once a read.
    let c = cached(64 << 20);
    let step = 64 << 10;
    for off in (0..obj.len()).step_by(step) {
        let len = step.min(obj.len() - off);
        assert_eq!(
            c.get_range(name, off as u64, len).unwrap(),
            &obj[off..off + len],
            "at {off}"
        );
    }
    c.wait_idle();
    let (gets, bytes) = c.fetches();
    // Read-ahead may probe a few segments past the end before a short one shows where it
    // is (empty answers): never more than one window of them.
    assert!(
        gets <= 4 + vmref::s3::cache::READ_AHEAD,
        "{gets} fetches for 4 segments"
    );
    assert_eq!(bytes, obj.len() as u64, "each byte fetched once");
    // Past the end is a truncation, never zeros; the same object read again costs nothing.
    let e = c.get_range(name, obj.len() as u64 - 10, 20).unwrap_err();
    assert!(
        matches!(e, vmref::Error::Format { .. }) && !is_missing(&e),
        "{e}"
    );
    c.wait_idle();
    let g0 = c.fetches().0;
    assert_eq!(
        c.get_range(name, SEGMENT - 5, 10).unwrap(),
        &obj[SEGMENT as usize - 5..SEGMENT as usize + 5]
    );
    assert_eq!(c.fetches().0, g0);
    drop(c);

    // Another process (a new backend on the same directory) uses the files: no fetch.
    let c = cached(64 << 20);
    assert_eq!(c.get_range(name, 100, 5000).unwrap(), &obj[100..5100]);
    assert_eq!(c.fetches().0, 0);
    drop(c);

    // A damaged cache file is never served: its CRC fails, it is fetched again.
    let (_, files) = cache_files(&cdir);
    assert_eq!(files, 4);
    let seg1 = cdir.join(format!("{}@1", name.replace('/', "%")));
    common::flip(&seg1, 16 + 777);
    let c = cached(64 << 20);
    let s = SEGMENT as usize;
    assert_eq!(c.get_range(name, s as u64, s).unwrap(), &obj[s..2 * s]);
    assert_eq!(c.fetches().0, 1, "the damaged segment was fetched again");
    // A truncated one too.
    drop(c);
    let f = std::fs::OpenOptions::new().write(true).open(&seg1).unwrap();
    f.set_len(100).unwrap();
    let c = cached(64 << 20);
    assert_eq!(
        c.get_range(name, s as u64 + 50, 1000).unwrap(),
        &obj[s + 50..s + 1050]
    );
    drop(c);

    // Bounded: with room for one segment, random reads stay exact and the files stay under it.
    std::fs::remove_dir_all(&cdir).unwrap();
    let c = cached(SEGMENT + 4096);
    for _ in 0..40 {
        let off = rng.below(obj.len() as u64) as usize;
        let len = (rng.below(300_000) as usize + 1).min(obj.len() - off);
        assert_eq!(
            c.get_range(name, off as u64, len).unwrap(),
            &obj[off..off + len]
        );
    }
    // Read-ahead under way may hold one segment more for a moment.
    c.wait_idle();
    assert!(c.cached_bytes() <= SEGMENT + 4096, "{}", c.cached_bytes());
    // Room for one whole segment and the short last one (16-byte header each).
    let (on_disk, files) = cache_files(&cdir);
    assert!(
        files <= 2 && on_disk <= SEGMENT + 4096 + 16 * files as u64,
        "{files} files, {on_disk} bytes"
    );

    // A deleted object goes from the cache with it, even with read-ahead of it queued.
    let _ = c.get_range(name, 0, 10).unwrap();
    c.delete(name).unwrap();
    assert_eq!(cache_files(&cdir).1, 0);
    assert!(is_missing(&c.get_range(name, 0, 10).unwrap_err()));
}

#[test]
fn s3_restore_and_mount_read_through_the_cache() {
    let test = "s3_restore_and_mount_read_through_the_cache";
    let Some(g) = Garage::start(test) else {
        return;
    };
    let mut rng = Rng(test_seed(test) | 1);
    let mut e = s3_env(&g, "rcache", &mut rng, &["--compression", "none"]);
    let mut big = vec![0u8; SIZE - 3 * BS];
    rng.fill(&mut big);
    e.write(&[(BS as u64, big)]);
    e.ok(&["backup", "r0"]);
    let r0 = e.model.clone();
    let cdir = e.store.join("cache/s3");
    assert_same("r0", &e.restore("r0"), &r0);
    let (bytes, files) = cache_files(&cdir);
    assert!(
        files > 0 && bytes >= SIZE as u64 / 2,
        "the restore filled the cache: {files} files, {bytes} bytes"
    );
    // Every cache file damaged: restores are still exact (each file fails its check and is
    // fetched again), and verify, which reads the bucket, finds nothing wrong.
    for f in std::fs::read_dir(&cdir).unwrap().flatten() {
        common::flip(&f.path(), 16 + 4096);
    }
    assert_same("r0", &e.restore("r0"), &r0);
    e.ok(&["verify"]);
    // The data pack (the largest) damaged in the bucket while the cache holds a good copy:
    // restores still get good bytes from the cache; verify reads the bucket and names the
    // block and the pack.
    let b = g.backend("rcache");
    let packs = b.list("packs/").unwrap();
    let data_pack = packs
        .iter()
        .max_by_key(|p| b.size(p).unwrap())
        .unwrap()
        .clone();
    let pack_id = data_pack.rsplit('/').next().unwrap().to_string();
    let mut bytes = b.get(&data_pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    b.delete(&data_pack).unwrap();
    assert!(b.put_if_absent(&data_pack, &bytes).unwrap());
    assert_same("r0 (cached)", &e.restore("r0"), &r0);
    let out = e.verify_fails(&[]);
    let line = out
        .lines()
        .find(|l| l.starts_with("damaged: point r0 disk disk0 block "))
        .unwrap_or_else(|| panic!("verify names a block: {out}"));
    assert!(
        line.contains(&pack_id),
        "verify names pack {pack_id}: {line}"
    );
    let block: usize = line["damaged: point r0 disk disk0 block ".len()..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // The same pack lost from the bucket: verify names it as missing, and with the cache off
    // (cold) its blocks read as EIO through the mount.
    b.delete(&data_pack).unwrap();
    let out = e.verify_fails(&[]);
    assert!(
        out.contains(&data_pack) && out.contains("missing"),
        "verify names {data_pack}: {out}"
    );
    if fuse_ok(test) {
        std::fs::remove_dir_all(&cdir).unwrap();
        let mnt = e.path("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut c = e.cmd(&["mount", mnt.to_str().unwrap()]);
        c.env("VMREF_S3_CACHE_SIZE", "0");
        assert!(c.status().unwrap().success());
        let _guard = MountGuard {
            mnt: mnt.clone(),
            pid: daemon_pid(&e.store),
            child: None,
        };
        let f = std::fs::File::open(mnt.join("r0/disk0.img")).unwrap();
        // One block only: the kernel retries a failed read page by page, each a request.
        let mut buf = vec![0u8; BS];
        let err = f.read_exact_at(&mut buf, (block * BS) as u64).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_eio()), "block {block}: {err}");
        drop(f);
        e.ok(&["umount", mnt.to_str().unwrap()]);
    }
}

fn libc_eio() -> i32 {
    5
}

/// Bytes of `model` in 4 KiB pages that are not all zeros: what a sparse copy allocates.
fn data_pages(model: &[u8]) -> u64 {
    model
        .chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64
        * 4096
}

/// The acceptance scenario of the local backup tests, with the repository on Garage: a full
/// backup and 30 incrementals, every point read through the mount (`cmp`), every eighth by
/// `qemu-img compare`, `cp --sparse=always` and `rsync --sparse` as well, restores, `verify`,
/// a prune while mounted, and `status` naming the repository and never the secret.
#[test]
fn s3_acceptance_full_30_incrementals_mount_copy_restore_verify_prune() {
    use std::os::unix::fs::MetadataExt;
    let test = "s3_acceptance_full_30_incrementals_mount_copy_restore_verify_prune";
    if !fuse_ok(test) {
        return;
    }
    let Some(g) = Garage::start(test) else {
        return;
    };
    let mut rng = Rng(test_seed(test) | 1);
    let mut e = s3_env(&g, "accept", &mut rng, &[]);
    let mut points: Vec<(String, std::path::PathBuf)> = Vec::new();
    for i in 0..=30 {
        if i > 0 {
            e.random_writes(&mut rng, 6);
        }
        let name = format!("p{i:02}");
        let out = e.ok(&["backup", &name]);
        assert!(
            out.contains(if i == 0 { "full" } else { "incremental" }),
            "{name}: {out}"
        );
        let saved = e.path(&format!("{name}.saved"));
        std::fs::write(&saved, &e.model).unwrap();
        points.push((name, saved));
    }
    let status = e.ok(&["status"]);
    assert!(
        status.contains(&format!("repository: s3://{BUCKET}/accept")),
        "{status}"
    );
    assert!(!status.contains(SECRET_KEY), "{status}");

    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    e.ok(&["mount", mnt.to_str().unwrap()]);
    let _guard = MountGuard {
        mnt: mnt.clone(),
        pid: daemon_pid(&e.store),
        child: None,
    };
    let img = |p: &str| mnt.join(p).join("disk0.img");
    for (i, (name, saved)) in points.iter().enumerate() {
        let (is, ss) = (img(name), saved.to_str().unwrap().to_string());
        let is = is.to_str().unwrap();
        common::run_ok("cmp", &[is, &ss]);
        assert_eq!(std::fs::metadata(is).unwrap().len(), SIZE as u64, "{name}");
        if i % 8 != 3 {
            continue;
        }
        common::run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", is, &ss]);
        let want = std::fs::read(saved).unwrap();
        for (tool, flag) in [("cp", "--sparse=always"), ("rsync", "--sparse")] {
            let out = e.path(&format!("{name}.{tool}"));
            common::run_ok(tool, &[flag, is, out.to_str().unwrap()]);
            common::run_ok("cmp", &[out.to_str().unwrap(), &ss]);
            let alloc = std::fs::metadata(&out).unwrap().blocks() * 512;
            assert!(
                alloc <= data_pages(&want) + (1 << 20),
                "{name}: the {tool} copy allocates {alloc} bytes for {} of data",
                data_pages(&want)
            );
            std::fs::remove_file(&out).unwrap();
        }
    }
    for (name, saved) in points.iter().step_by(10) {
        assert_same(name, &e.restore(name), &std::fs::read(saved).unwrap());
    }
    e.ok(&["verify"]);

    // Pruned while mounted: gone at once from the mount and the bucket's collection ran;
    // the kept points still read, restore and verify exactly.
    let before = e.space();
    let out = e.ok(&["prune", "--keep-last", "5"]);
    assert!(out.contains("pruned 26 point(s)"), "{out}");
    let kept = points.split_off(points.len() - 5);
    for (name, _) in &points {
        assert!(!img(name).exists(), "{name} pruned but still there");
    }
    assert!(
        e.space().stored_bytes < before.stored_bytes,
        "the collection freed nothing"
    );
    for (name, saved) in &kept {
        common::run_ok(
            "cmp",
            &[img(name).to_str().unwrap(), saved.to_str().unwrap()],
        );
        assert_same(name, &e.restore(name), &std::fs::read(saved).unwrap());
    }
    e.ok(&["verify"]);
    e.ok(&["umount", mnt.to_str().unwrap()]);
}
