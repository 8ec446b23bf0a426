//! Several stores backing up into one repository (issue 11): a directory repository and one in
//! a real Garage bucket (`common::garage`). Two mounted stores back up concurrently while a
//! third backs up, prunes and collects, round after round, and every kept point of every store
//! restores exact, reads exact through the mount and verifies; two disks made from one base
//! image store their common blocks once; `init --attach` refuses what it cannot safely join;
//! a killed writer's lock does not keep collections out, and a live one puts them off.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::garage::{BUCKET, Garage};
use common::{BS, Env, MountGuard, Rng, assert_same, daemon_pid, fuse_ok, test_seed};
use vmref::repo::backend::{Backend, LocalBackend};

const SIZE: usize = 4 << 20;

/// Where the stores' shared repository is, and how to reach it.
struct Repo {
    location: String,
    envs: Vec<(String, String)>,
    s3: Option<vmref::config::S3Config>,
    block: &'static str,
}

impl Repo {
    fn dir(path: &Path) -> Repo {
        Repo {
            location: path.to_str().unwrap().to_string(),
            envs: Vec::new(),
            s3: None,
            block: "4K",
        }
    }

    /// 64 KiB blocks on Garage: see `tests/s3_repo.rs` for why.
    fn garage(g: &Garage, prefix: &str) -> Repo {
        Repo {
            location: format!("s3://{BUCKET}/{prefix}"),
            envs: g.env(),
            s3: Some(g.s3_config()),
            block: "64K",
        }
    }

    /// A store with one disk `disk0` holding `data`: the repository's first store, or one
    /// attached to it with `first`'s key when it has one.
    fn store(&self, data: &[u8], first: Option<&Env>) -> Env {
        let mut init = vec![
            "--repository".to_string(),
            self.location.clone(),
            "--block-size".into(),
            self.block.into(),
        ];
        if let Some(f) = first {
            init.push("--attach".into());
            let key = f.store.join("repo.key");
            if key.exists() {
                init.push("--key-file".into());
                init.push(key.to_str().unwrap().into());
            }
        }
        let init: Vec<&str> = init.iter().map(String::as_str).collect();
        Env::with_init(SIZE, data, &init, self.envs.clone(), self.s3.clone())
    }
}

/// A store mounted at `mnt`, written through its live file as a VM would.
struct Mounted {
    env: Env,
    mnt: PathBuf,
    _guard: MountGuard,
}

impl Mounted {
    fn new(env: Env) -> Mounted {
        let mnt = env.path("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        env.ok(&["mount", mnt.to_str().unwrap()]);
        let guard = MountGuard {
            mnt: mnt.clone(),
            pid: daemon_pid(&env.store),
            child: None,
        };
        Mounted {
            env,
            mnt,
            _guard: guard,
        }
    }

    fn write(&mut self, rng: &mut Rng, n: usize) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.mnt.join("live/disk0.img"))
            .unwrap();
        for (off, data) in random_writes(rng, n) {
            f.write_all_at(&data, off).unwrap();
            self.env.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
    }

    fn read_point(&self, point: &str) -> Vec<u8> {
        std::fs::read(self.mnt.join(point).join("disk0.img")).unwrap()
    }
}

fn random_writes(rng: &mut Rng, n: usize) -> Vec<(u64, Vec<u8>)> {
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(3 * BS as u64) as usize;
            let off = rng.below((SIZE - len) as u64);
            let mut data = vec![0u8; len];
            if rng.below(5) != 0 {
                rng.fill(&mut data);
            }
            (off, data)
        })
        .collect()
}

fn random(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    rng.fill(&mut d);
    d
}

/// What `prune --json` says of its collection: bytes freed, or why it was put off.
fn prune(e: &Env, keep: &str) -> (u64, Option<String>) {
    let v: serde_json::Value =
        serde_json::from_str(&e.ok(&["prune", "--keep-last", keep, "--json"])).unwrap();
    (
        v["freed_bytes"].as_u64().unwrap_or(0),
        v["collection_put_off"].as_str().map(str::to_string),
    )
}

/// Every restorable point of `e` equals its model, by restore.
fn check_points(what: &str, e: &Env, models: &Models) {
    let kept = e.restorable();
    assert!(!kept.is_empty(), "{what}: no points left");
    for p in &kept {
        let want = models
            .get(p)
            .unwrap_or_else(|| panic!("{what}: unknown point {p}"));
        assert_same(&format!("{what} {p}"), &e.restore(p), want);
    }
}

type Models = std::collections::BTreeMap<String, Vec<u8>>;

/// One round of a mounted store: writes through its live file, a backup through its daemon,
/// a kept point read back through the mount, and every fifth round a prune of its own.
fn mounted_round(
    m: &mut Mounted,
    models: &mut Models,
    rng: &mut Rng,
    name: String,
    round: usize,
) -> Option<(u64, Option<String>)> {
    m.write(rng, 20);
    m.env.ok(&["backup", &name]);
    models.insert(name.clone(), m.env.model.clone());
    // The daemon reads a kept point while the third store collects beside it.
    let oldest = m.env.restorable().remove(0);
    assert_same(
        &format!("{name}: {oldest} through the mount"),
        &m.read_point(&oldest),
        &models[&oldest],
    );
    (round % 5 == 4).then(|| prune(&m.env, "4"))
}

/// Two mounted stores back up into one repository while a third (unmounted) backs up, prunes
/// and collects, `rounds` times; every kept point of each store stays exact.
fn concurrent_rounds(test: &str, repo: &Repo, rounds: usize) {
    let mut rng = Rng(test_seed(test) | 1);
    let base = random(&mut rng, SIZE / 2);
    let a = repo.store(&base, None);
    let b = repo.store(&random(&mut rng, SIZE / 2), Some(&a));
    let mut c = repo.store(&base, Some(&a));
    let (mut a, mut b) = (Mounted::new(a), Mounted::new(b));
    let mut models: [Models; 3] = Default::default();
    let (mut collected, mut put_off, mut freed) = (0, 0, 0u64);
    let seeds: Vec<u64> = (0..3).map(|_| rng.next() | 1).collect();
    let mut rngs: Vec<Rng> = seeds.into_iter().map(Rng).collect();
    for round in 0..rounds {
        let [ma, mb, mc] = &mut models;
        let [ra, rb, rc] = &mut rngs[..] else {
            unreachable!()
        };
        let (pa, pb, pc) = std::thread::scope(|s| {
            let ta = s.spawn(|| mounted_round(&mut a, ma, ra, format!("a{round:02}"), round));
            let tb = s.spawn(|| mounted_round(&mut b, mb, rb, format!("b{round:02}"), round));
            let tc = s.spawn(|| {
                c.random_writes(rc, 20);
                let name = format!("c{round:02}");
                c.ok(&["backup", &name]);
                mc.insert(name, c.model.clone());
                Some(prune(&c, "2"))
            });
            (ta.join().unwrap(), tb.join().unwrap(), tc.join().unwrap())
        });
        for (f, why) in [pa, pb, pc].into_iter().flatten() {
            freed += f;
            match why {
                Some(_) => put_off += 1,
                None => collected += 1,
            }
        }
    }
    eprintln!(
        "{test}: {rounds} rounds, {collected} collections ran and {put_off} were put off \
         beside writers, {freed} bytes freed"
    );
    // Nothing writes now: a collection must run, and lose nothing either.
    let (f, why) = prune(&c, "1");
    assert_eq!(why, None, "a collection with no writer about");
    freed += f;
    assert!(freed > 0, "pruned points' blocks were never collected");
    for (what, m, models) in [("a", &a, &models[0]), ("b", &b, &models[1])] {
        check_points(what, &m.env, models);
        for p in m.env.restorable() {
            assert_same(
                &format!("{what} {p} mounted"),
                &m.read_point(&p),
                &models[&p],
            );
        }
        m.env.ok(&["verify"]);
    }
    check_points("c", &c, &models[2]);
    c.ok(&["verify"]);
    assert_eq!(c.restorable().len(), 1);
    // Another host, with none of the stores: the repository mounted read-only shows every
    // kept point of every store.
    let kept: Vec<(String, &Vec<u8>)> =
        [(&a.env, &models[0]), (&b.env, &models[1]), (&c, &models[2])]
            .into_iter()
            .flat_map(|(e, m)| e.restorable().into_iter().map(move |p| (p.clone(), &m[&p])))
            .collect();
    drop((a, b));
    let far = tempfile::tempdir().unwrap();
    let mnt = far.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let key = c.store.join("repo.key");
    let mut args = vec!["mount", "--repository", &repo.location, "--cache-dir"];
    let cache = far.path().join("cache");
    args.push(cache.to_str().unwrap());
    if key.exists() {
        args.extend(["--key-file", key.to_str().unwrap()]);
    }
    args.push(mnt.to_str().unwrap());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vmref"))
        .args(&args)
        .envs(repo.envs.iter().map(|(k, v)| (k, v)))
        .env_remove("VMREF_STORE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _guard = MountGuard {
        mnt: mnt.clone(),
        pid: None,
        child: None,
    };
    let dirs: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(dirs.len(), kept.len(), "{dirs:?}");
    assert!(!dirs.contains(&"live".to_string()));
    for (p, want) in &kept {
        let dir = dirs
            .iter()
            .find(|d| d.ends_with(&format!("@{p}")))
            .unwrap_or_else(|| panic!("{p} not in {dirs:?}"));
        let img = mnt.join(dir).join("disk0.img");
        assert_same(
            &format!("{dir} from the repository mount"),
            &std::fs::read(&img).unwrap(),
            want,
        );
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    }
    let o = common::store_cmd::vmref(&c.store)
        .args(["umount", mnt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn stores_share_a_directory_repository_while_a_third_prunes() {
    let test = "stores_share_a_directory_repository_while_a_third_prunes";
    if !fuse_ok(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    concurrent_rounds(test, &Repo::dir(&dir.path().join("repo")), 20);
}

#[test]
fn stores_share_a_garage_bucket_while_a_third_prunes() {
    let test = "stores_share_a_garage_bucket_while_a_third_prunes";
    if !fuse_ok(test) {
        return;
    }
    let Some(g) = Garage::start(test) else {
        return;
    };
    concurrent_rounds(test, &Repo::garage(&g, "shared"), 20);
}

/// Bytes the repository's objects take: the data a user pays for.
fn repo_bytes(b: &dyn Backend) -> u64 {
    b.list("").unwrap().iter().map(|n| b.size(n).unwrap()).sum()
}

/// Two VMs made from one base image: their common blocks are stored once.
fn dedup_across_stores(test: &str, repo: &Repo, bytes: &dyn Fn() -> u64) {
    let mut rng = Rng(test_seed(test) | 1);
    let base = random(&mut rng, SIZE);
    let mut a = repo.store(&base, None);
    a.ok(&["backup", "a0"]);
    let one = bytes();
    let mut b = repo.store(&base, Some(&a));
    b.ok(&["backup", "b0"]);
    let two = bytes();
    eprintln!(
        "{test}: {SIZE} bytes of base image: one store {one} bytes, two stores {two} bytes \
         (+{})",
        two - one
    );
    // The second store adds its map and snapshot, not the blocks.
    assert!(
        two - one < SIZE as u64 / 20,
        "the second store added {} bytes",
        two - one
    );
    // Each VM then writes its own: only that is added.
    let mut w = Vec::new();
    for i in 0..8 {
        w.push(((i * 64 * BS) as u64, random(&mut rng, BS)));
    }
    a.write(&w);
    b.write(&w[..4]);
    a.ok(&["backup", "a1"]);
    b.ok(&["backup", "b1"]);
    assert_same("a1", &a.restore("a1"), &a.model);
    assert_same("b1", &b.restore("b1"), &b.model);
    assert_same("b0", &b.restore("b0"), &base);
    // Deleting every point of one store keeps what the other needs.
    a.ok(&["ref", "delete", "a0"]);
    a.ok(&["ref", "delete", "a1"]);
    let (_, why) = prune(&b, "2");
    assert_eq!(why, None);
    assert_same("b0 after a's points went", &b.restore("b0"), &base);
    assert_same("b1 after a's points went", &b.restore("b1"), &b.model);
    b.ok(&["verify"]);
}

#[test]
fn two_vms_from_one_base_image_store_it_once_in_a_directory_repository() {
    let test = "two_vms_from_one_base_image_store_it_once_in_a_directory_repository";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    dedup_across_stores(test, &Repo::dir(&path), &|| {
        repo_bytes(&LocalBackend::new(&path).unwrap())
    });
}

#[test]
fn two_vms_from_one_base_image_store_it_once_in_a_garage_bucket() {
    let test = "two_vms_from_one_base_image_store_it_once_in_a_garage_bucket";
    let Some(g) = Garage::start(test) else {
        return;
    };
    dedup_across_stores(test, &Repo::garage(&g, "dedup"), &|| {
        repo_bytes(&g.backend("dedup"))
    });
}

fn one_line(err: &str) {
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

/// `vmref init ARGS` on a new store under `dir`, insisting it fails in one line and leaves no
/// store behind; its stderr.
fn init_fails(dir: &Path, args: &[&str]) -> String {
    let store = dir.join(format!("refused-{}", args.len()));
    let o = common::store_cmd::vmref(&store)
        .arg("init")
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success(), "init {args:?} should fail");
    let err = String::from_utf8(o.stderr).unwrap();
    one_line(&err);
    assert!(!store.exists(), "init {args:?} left {}", store.display());
    err
}

/// `init` arguments that attach to the repository at `loc` with the key file `key`.
fn attach_with_key<'a>(loc: &'a str, key: &'a Path) -> [&'a str; 5] {
    [
        "--repository",
        loc,
        "--attach",
        "--key-file",
        key.to_str().unwrap(),
    ]
}

#[test]
fn attach_refuses_what_it_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let loc = repo.to_str().unwrap();
    // Nothing there yet.
    let e = init_fails(d, &["--repository", loc, "--attach"]);
    assert!(e.contains("none to attach to"), "{e}");
    // A store's private repository is not for sharing.
    let private = Env::new(SIZE, &[]);
    let e = init_fails(
        d,
        &[
            "--repository",
            private.store.join("repo").to_str().unwrap(),
            "--attach",
        ],
    );
    assert!(e.contains("private repository"), "{e}");
    // A relative path is no location.
    let e = init_fails(d, &["--repository", "relative/repo", "--attach"]);
    assert!(e.contains("relative/repo"), "{e}");
    // An encrypted repository: no key, or another one.
    let mut rng = Rng(7);
    let first = Env::with_init(
        SIZE,
        &random(&mut rng, BS * 8),
        &["--repository", loc, "--encrypt"],
        Vec::new(),
        None,
    );
    first.ok(&["backup", "p0"]);
    let e = init_fails(d, &["--repository", loc, "--attach"]);
    assert!(e.contains("key"), "{e}");
    let other = Env::with_init(SIZE, &[], &["--encrypt"], Vec::new(), None);
    let wrong = other.store.join("repo.key");
    let e = init_fails(d, &attach_with_key(loc, &wrong));
    assert!(e.contains("key"), "{e}");
    // Flags that would change the repository are refused with --attach.
    for extra in [&["--compression", "none"][..], &["--no-encrypt"][..]] {
        let args = [&["--repository", loc, "--attach"][..], extra].concat();
        let o = common::store_cmd::vmref(&d.join("conflict"))
            .arg("init")
            .args(&args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "init {args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("cannot be used with"), "{err}");
        assert!(!d.join("conflict").exists());
    }
    // A repository whose store has not published its points (as one made by an older
    // vmref): its blocks would look like garbage to the new store's collections.
    let b = LocalBackend::new(&repo).unwrap();
    let marks = b.list("stores/").unwrap();
    assert_eq!(marks.len(), 1, "{marks:?}");
    for m in &marks {
        b.delete(m).unwrap();
    }
    let key = first.store.join("repo.key");
    let e = init_fails(d, &attach_with_key(loc, &key));
    assert!(e.contains("not published"), "{e}");
    // Its next backup publishes them, and the attach then works.
    first.ok(&["backup", "p1"]);
    let mut second = Env::with_init(
        SIZE,
        &random(&mut rng, BS * 8),
        &attach_with_key(loc, &key),
        Vec::new(),
        None,
    );
    second.random_writes(&mut rng, 5);
    second.ok(&["backup", "s0"]);
    assert_same("s0", &second.restore("s0"), &second.model);
    // The first store's collection keeps the second's blocks.
    first.ok(&["ref", "delete", "p0"]);
    assert_same("s0 after p0 went", &second.restore("s0"), &second.model);
    second.ok(&["verify"]);
    first.ok(&["verify"]);
}

/// A writer's lock keeps collections out while its process lives, and not after it died.
#[test]
fn a_live_writers_lock_puts_collection_off_and_a_dead_ones_does_not() {
    let test = "a_live_writers_lock_puts_collection_off_and_a_dead_ones_does_not";
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::dir(&dir.path().join("repo"));
    let mut rng = Rng(test_seed(test) | 1);
    // Not encrypted, so that this test can write lock objects as another process would.
    let mut a = Env::with_init(
        SIZE,
        &random(&mut rng, SIZE),
        &["--repository", &repo.location, "--no-encrypt"],
        Vec::new(),
        None,
    );
    let b = repo.store(&random(&mut rng, SIZE / 4), Some(&a));
    for i in 0..3 {
        a.random_writes(&mut rng, 40);
        a.ok(&["backup", &format!("a{i}")]);
    }
    b.ok(&["backup", "b0"]);
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(&dir.path().join("repo")).unwrap());
    // A writer of this (live) process.
    let lock =
        vmref::repo::lock::RepoLock::shared(&backend, "test", "backup", Duration::ZERO).unwrap();
    let (freed, why) = prune(&a, "1");
    let why = why.expect("the collection is put off beside a live writer");
    assert!(why.contains("backup"), "{why}");
    assert_eq!(freed, 0);
    let text = a.ok(&["prune", "--keep-last", "1"]);
    assert!(text.contains("space still not reclaimed"), "{text}");
    drop(lock);
    // The next prune collects what was put off, though it deletes nothing.
    let text = a.ok(&["prune", "--keep-last", "1"]);
    assert!(
        text.contains("nothing to prune") && text.contains("an earlier collection left"),
        "{text}"
    );
    assert!(!text.contains("not reclaimed"), "{text}");
    // A lock left by a writer that died (killed, or its host lost power and came back): its
    // process is gone, so the lock holds nothing.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let planted =
        vmref::repo::lock::RepoLock::shared(&backend, "test", "backup", Duration::ZERO).unwrap();
    let name = planted.name();
    let mut info = vmref::repo::lock::decode(&backend.get(&name).unwrap()).unwrap();
    drop(planted);
    info.pid = gone.id();
    backend
        .put_if_absent(&name, &vmref::repo::lock::encode(&info))
        .unwrap();
    a.random_writes(&mut rng, 1);
    a.ok(&["backup", "a3"]);
    let (freed, why) = prune(&a, "1");
    assert_eq!(why, None, "a dead process's lock puts nothing off");
    assert!(freed > 0);
    assert!(
        backend.get(&name).is_err(),
        "the dead lock was cleared by the collection"
    );
    assert_same("a3", &a.restore("a3"), &a.model);
    a.ok(&["verify"]);
    b.ok(&["verify"]);
    assert!(b.restorable().contains(&"b0".to_string()));
}

/// A receive cut short into a store that shares its repository keeps its blocks through
/// another store's collection (its partial maps are published), and the resume is exact.
#[test]
fn a_cut_receive_keeps_its_blocks_through_another_stores_collection() {
    let test = "a_cut_receive_keeps_its_blocks_through_another_stores_collection";
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::dir(&dir.path().join("repo"));
    let mut rng = Rng(test_seed(test) | 1);
    // The sender has a repository of its own.
    let source = Env::new(SIZE, &random(&mut rng, SIZE));
    source.ok(&["backup", "full"]);
    let stream = source.path("full.stream");
    source.ok(&["send", "full", "--output", stream.to_str().unwrap()]);
    let bytes = std::fs::read(&stream).unwrap();
    let half = source.path("half.stream");
    std::fs::write(&half, &bytes[..bytes.len() * 3 / 4]).unwrap();
    // Two stores share the repository; the target receives into it.
    let mut a = repo.store(&random(&mut rng, SIZE / 2), None);
    // A store with no disk of its own: received disks must not be live ones.
    let target = dir.path().join("target");
    let key = a.store.join("repo.key");
    let mut init = vec!["init", "--block-size", "4K"];
    init.extend(attach_with_key(&repo.location, &key));
    common::store_cmd::ok(&target, &init);
    let o = common::store_cmd::vmref(&target)
        .args(["receive", "--input", half.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success(), "a cut stream is refused");
    let err = String::from_utf8(o.stderr).unwrap();
    let token = common::resume_token(&err);
    let published = LocalBackend::new(&dir.path().join("repo"))
        .unwrap()
        .list("snapshots/")
        .unwrap();
    assert!(
        published.iter().any(|n| n.contains("/partial-")),
        "the partial receive is published: {published:?}"
    );
    // The other store collects: what arrived is kept for the resume.
    a.ok(&["backup", "a0"]);
    a.random_writes(&mut rng, 40);
    a.ok(&["backup", "a1"]);
    let (freed, why) = prune(&a, "1");
    assert_eq!(why, None);
    assert!(freed > 0, "the collection ran and freed a0's blocks");
    let resumed = source.path("rest.stream");
    source.ok(&[
        "send",
        "--resume",
        &token,
        "--output",
        resumed.to_str().unwrap(),
    ]);
    let out = common::store_cmd::ok(&target, &["receive", "--input", resumed.to_str().unwrap()]);
    assert!(out.contains("resumed"), "{out}");
    assert_same(
        "received",
        &common::store_cmd::restore(&target, "full", dir.path()),
        &source.model,
    );
    common::store_cmd::ok(&target, &["verify"]);
    a.ok(&["verify"]);
}
