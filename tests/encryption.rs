//! Encrypted repositories end to end (issue 11): a chain of backups restores, mounts and
//! verifies exactly while nothing under the store shows a pattern written into the disk (an
//! unencrypted control store shows it); ids depend on the key; a wrong or missing key file is
//! one line and changes nothing; send/receive between encrypted and unencrypted stores is
//! exact; and the same on a real Garage server (`common::garage`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::garage::{BUCKET, Garage};
use common::store_cmd::{ok, restore, vmref};
use common::{BS, Env, MountGuard, Rng, assert_same, daemon_pid, fuse_ok, test_seed};
use vmref::repo::backend::Backend;

const SIZE: usize = 2 << 20;
/// Written into the disks: no byte sequence like it may appear in an encrypted repository.
const MARKER: &[u8] = b"VMREF-SECRET-DISK-CONTENT-7f3a9c";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Random bytes with the marker planted at `n` random places.
fn marked(rng: &mut Rng, len: usize, n: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    rng.fill(&mut d);
    for _ in 0..n {
        let at = rng.below((len - MARKER.len()) as u64) as usize;
        d[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    d
}

/// Every regular file under `dir`, by path, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

fn marker_in(dir: &Path) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|(_, b)| contains(b, MARKER))
        .map(|(p, _)| p)
        .collect()
}

/// The map root of `disk0` in point `name`'s record (an envelope: 28 bytes, then JSON).
fn root(store: &Path, name: &str) -> String {
    let b = std::fs::read(store.join("refs").join(format!("{name}.ref"))).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&b[28..]).unwrap();
    v["disks"]["disk0"]["map"]["root"]
        .as_str()
        .unwrap()
        .to_string()
}

fn one_line(err: &str) {
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

fn fails(store: &Path, args: &[&str]) -> String {
    let o = vmref(store).args(args).output().unwrap();
    assert!(!o.status.success(), "vmref {args:?} should fail");
    String::from_utf8(o.stderr).unwrap()
}

/// `vmref --store FROM send SEND | vmref --store TO receive` through an OS pipe.
fn pipe_ok(from: &Path, send: &[&str], to: &Path) -> String {
    let mut s = vmref(from)
        .arg("send")
        .args(send)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = s.stdout.take().unwrap();
    let r: Output = vmref(to)
        .arg("receive")
        .stdin(Stdio::from(out))
        .output()
        .unwrap();
    let s = s.wait_with_output().unwrap();
    assert!(
        s.status.success() && r.status.success(),
        "send {send:?}: {} receive: {}",
        String::from_utf8_lossy(&s.stderr),
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8(r.stdout).unwrap()
}

/// The same writes into both stores' disks: random data with the marker in it.
fn write_both(a: &mut Env, b: &mut Env, rng: &mut Rng) {
    let mut w = Vec::new();
    for _ in 0..6 {
        let len = 1 + rng.below(3 * BS as u64) as usize + MARKER.len();
        let off = rng.below((SIZE - len) as u64);
        w.push((off, marked(rng, len, 1)));
    }
    a.write(&w);
    b.write(&w);
}

#[test]
fn encrypted_chain_restores_mounts_verifies_and_hides_the_disk() {
    let test = "encrypted_chain_restores_mounts_verifies_and_hides_the_disk";
    let mut rng = Rng(test_seed(test) | 1);
    let data = marked(&mut rng, 1 << 20, 40);
    let init = ["--encrypt", "--compression", "none"];
    let mut e = Env::with_init(SIZE, &data, &init, Vec::new(), None);
    let mut c = Env::with_init(SIZE, &data, &["--compression", "none"], Vec::new(), None);
    let key = e.store.join("repo.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!c.store.join("repo.key").exists());
    let st: serde_json::Value = serde_json::from_str(&e.ok(&["status", "--json"])).unwrap();
    let id = st["encryption_key_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert!(
        e.ok(&["status"])
            .contains(&format!("encryption: on, key id {id}"))
    );
    assert!(c.ok(&["status"]).contains("encryption: off"));
    let mut models = Vec::new();
    for i in 0..5 {
        let name = format!("p{i}");
        e.ok(&["backup", &name]);
        c.ok(&["backup", &name]);
        models.push((name, e.model.clone()));
        write_both(&mut e, &mut c, &mut rng);
    }
    assert_eq!(e.model, c.model);
    for (p, m) in &models {
        assert_same(p, &e.restore(p), m);
    }
    e.ok(&["verify"]);
    // Nowhere in the encrypted store (repository, records, tracking), everywhere in the
    // control's repository.
    assert_eq!(marker_in(&e.store), Vec::<PathBuf>::new());
    assert!(
        !marker_in(&c.store.join("repo")).is_empty(),
        "the control repository must show the marker"
    );
    // The key file holds no disk data either, and the repository no key material.
    let key_bytes = std::fs::read(&key).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&key_bytes[28..]).unwrap();
    let master = v["key"].as_str().unwrap().to_string();
    for (p, b) in files(&e.store.join("repo")) {
        assert!(!contains(&b, master.as_bytes()), "{}", p.display());
    }
    // A prune collects garbage through the sealed objects and keeps the rest exact.
    e.ok(&["prune", "--keep-last", "3"]);
    e.ok(&["verify"]);
    for (p, m) in &models[2..] {
        assert_same(p, &e.restore(p), m);
    }

    // Damage inside a sealed pack: found by `verify`, a failed restore, never other bytes.
    let packs: Vec<PathBuf> = files(&e.store.join("repo/packs")).into_keys().collect();
    let victim = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(victim).unwrap().len();
    common::flip(victim, len / 2);
    let damage = e.verify_fails(&[]);
    assert!(!damage.is_empty());
    common::flip(victim, len / 2);
    e.ok(&["verify"]);

    if !fuse_ok(test) {
        return;
    }
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    e.ok(&["mount", mnt.to_str().unwrap()]);
    let _guard = MountGuard {
        mnt: mnt.clone(),
        pid: daemon_pid(&e.store),
        child: None,
    };
    for (p, m) in &models[2..] {
        let got = std::fs::read(mnt.join(p).join("disk0.img")).unwrap();
        assert_same(&format!("mount {p}"), &got, m);
    }
    e.ok(&["umount", mnt.to_str().unwrap()]);
}

#[test]
fn ids_depend_on_the_key() {
    let mut rng = Rng(test_seed("ids_depend_on_the_key") | 1);
    let data = marked(&mut rng, 1 << 20, 4);
    let a = Env::with_init(SIZE, &data, &["--encrypt"], Vec::new(), None);
    let b = Env::with_init(SIZE, &data, &["--encrypt"], Vec::new(), None);
    let ka = a.store.join("repo.key");
    let same = Env::with_init(
        SIZE,
        &data,
        &["--key-file", ka.to_str().unwrap()],
        Vec::new(),
        None,
    );
    let plain = Env::with_init(SIZE, &data, &[], Vec::new(), None);
    for e in [&a, &b, &same, &plain] {
        e.ok(&["backup", "p0"]);
    }
    let (ra, rb, rs, rp) = (
        root(&a.store, "p0"),
        root(&b.store, "p0"),
        root(&same.store, "p0"),
        root(&plain.store, "p0"),
    );
    assert_ne!(ra, rb, "two keys: unrelated ids");
    assert_eq!(
        ra, rs,
        "one key: the same ids (blocks dedup across its stores)"
    );
    assert_ne!(ra, rp);
    // The copied key file is the same key, kept in the new store.
    let key_of = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b[28..]).unwrap();
        v["key"].as_str().unwrap().to_string()
    };
    assert_eq!(key_of(&ka), key_of(&same.store.join("repo.key")));
    assert_same("same key", &same.restore("p0"), &a.model);
}

#[test]
fn a_wrong_or_missing_key_is_one_line_and_changes_nothing() {
    let mut rng = Rng(test_seed("a_wrong_or_missing_key") | 1);
    let data = marked(&mut rng, 1 << 20, 4);
    let mut e = Env::with_init(SIZE, &data, &["--encrypt"], Vec::new(), None);
    e.ok(&["backup", "p0"]);
    e.random_writes(&mut rng, 10);
    let other = Env::with_init(SIZE, &data, &["--encrypt"], Vec::new(), None);
    let key = e.store.join("repo.key");
    let aside = e.path("good.key");
    std::fs::rename(&key, &aside).unwrap();
    let before = files(&e.store.join("repo"));

    let err = e.fails(&["verify"]);
    one_line(&err);
    assert!(
        err.contains("is encrypted") && err.contains("key file"),
        "{err}"
    );
    std::fs::copy(other.store.join("repo.key"), &key).unwrap();
    for args in [
        &["verify"][..],
        &["backup", "p1"],
        &["restore", "p0", "--disk", "disk0", "--to", "/dev/null"],
    ] {
        let err = e.fails(args);
        one_line(&err);
        assert!(err.contains("key id"), "{args:?}: {err}");
    }
    assert_eq!(files(&e.store.join("repo")), before, "nothing changed");
    assert!(!e.path("r.img").exists());
    std::fs::remove_file(&key).unwrap();
    std::fs::rename(&aside, &key).unwrap();
    e.ok(&["verify"]);
    assert_eq!(e.restorable(), vec!["p0"]);
    e.ok(&["backup", "p1"]);
    assert_same("p1", &e.restore("p1"), &e.model);

    // `init --key-file` with a file that is not a key: one line, no store.
    let s = e.path("new");
    for bad in [e.path("absent.key"), e.image.clone()] {
        let err = fails(&s, &["init", "--key-file", bad.to_str().unwrap()]);
        one_line(&err);
        assert!(err.contains("key file"), "{err}");
        assert!(!s.exists());
    }
}

/// A replaced config that says "not encrypted" (someone with write access to the bucket or
/// directory) must not make a store with a key write its disks in the clear.
#[test]
fn a_config_downgraded_to_plain_is_refused() {
    let mut rng = Rng(test_seed("a_config_downgraded_to_plain") | 1);
    let data = marked(&mut rng, 1 << 20, 4);
    let mut e = Env::with_init(SIZE, &data, &["--encrypt"], Vec::new(), None);
    e.ok(&["backup", "p0"]);
    e.random_writes(&mut rng, 10);
    let plain = Env::with_init(SIZE, &data, &[], Vec::new(), None);
    let config = e.store.join("repo/config");
    let kept = std::fs::read(&config).unwrap();
    std::fs::copy(plain.store.join("repo/config"), &config).unwrap();
    // The sealed index objects would not load as plain ones: an attacker removes them too.
    let index = e.store.join("repo/index");
    let index_aside = e.path("index-aside");
    std::fs::rename(&index, &index_aside).unwrap();
    std::fs::create_dir(&index).unwrap();
    let before = files(&e.store.join("repo"));
    for args in [&["backup", "p1"][..], &["verify"]] {
        let err = e.fails(args);
        one_line(&err);
        assert!(err.contains("not encrypted"), "{args:?}: {err}");
    }
    assert_eq!(files(&e.store.join("repo")), before, "nothing written");
    assert!(marker_in(&e.store.join("repo")).is_empty(), "no plaintext");
    std::fs::write(&config, kept).unwrap();
    std::fs::remove_dir(&index).unwrap();
    std::fs::rename(&index_aside, &index).unwrap();
    e.ok(&["backup", "p1"]);
    assert_same("p1", &e.restore("p1"), &e.model);
}

#[test]
fn send_receive_between_encrypted_and_plain_stores_is_exact() {
    let mut rng = Rng(test_seed("send_receive_between_encrypted_and_plain") | 1);
    let data = marked(&mut rng, 1 << 20, 8);
    let mut e = Env::with_init(SIZE, &data, &["--encrypt"], Vec::new(), None);
    let mut models = Vec::new();
    for i in 0..3 {
        let name = format!("p{i}");
        e.ok(&["backup", &name]);
        models.push((name, e.model.clone()));
        e.random_writes(&mut rng, 15);
    }
    let plain = e.path("plain");
    let keyed = e.path("keyed");
    ok(&plain, &["init", "--block-size", "4K"]);
    ok(&keyed, &["init", "--block-size", "4K", "--encrypt"]);
    // Encrypted -> plain, then plain -> another key, each a full and incrementals.
    for (from, to) in [(&e.store, &plain), (&plain, &keyed)] {
        let mut since: Option<&str> = None;
        for (p, _) in &models {
            let mut send = vec![p.as_str()];
            if let Some(s) = since {
                send.extend(["--since", s]);
            }
            let out = pipe_ok(from, &send, to);
            assert!(out.contains(&format!("received {p}")), "{out}");
            since = Some(p);
        }
    }
    // And encrypted -> encrypted under another key, directly.
    let keyed2 = e.path("keyed2");
    ok(&keyed2, &["init", "--block-size", "4K", "--encrypt"]);
    pipe_ok(&e.store, &["p0"], &keyed2);
    pipe_ok(&e.store, &["p2", "--since", "p0"], &keyed2);
    let scratch = e.path("");
    for store in [&plain, &keyed] {
        for (p, m) in &models {
            assert_same(p, &restore(store, p, &scratch), m);
        }
        ok(store, &["verify"]);
    }
    assert_same("p2", &restore(&keyed2, "p2", &scratch), &models[2].1);
    ok(&keyed2, &["verify"]);
    assert_eq!(marker_in(&keyed), Vec::<PathBuf>::new());
    assert_eq!(marker_in(&keyed2), Vec::<PathBuf>::new());
    assert_ne!(root(&plain, "p2"), root(&keyed, "p2"));
}

#[test]
fn s3_repository_is_encrypted_by_default() {
    let test = "s3_repository_is_encrypted_by_default";
    let Some(g) = Garage::start(test) else {
        return;
    };
    let mut rng = Rng(test_seed(test) | 1);
    let data = marked(&mut rng, 1 << 20, 40);
    let env = |prefix: &str, extra: &[&str]| {
        let loc = format!("s3://{BUCKET}/{prefix}");
        let init = [
            &["--repository", loc.as_str(), "--block-size", "64K"][..],
            &["--compression", "none"],
            extra,
        ]
        .concat();
        Env::with_init(SIZE, &data, &init, g.env(), Some(g.s3_config()))
    };
    let mut e = env("enc", &[]);
    let mut c = env("plain", &["--no-encrypt"]);
    assert!(e.store.join("repo.key").exists());
    assert!(!c.store.join("repo.key").exists());
    let mut models = Vec::new();
    for i in 0..3 {
        let name = format!("s{i}");
        e.ok(&["backup", &name]);
        c.ok(&["backup", &name]);
        models.push((name, e.model.clone()));
        write_both(&mut e, &mut c, &mut rng);
    }
    for (p, m) in &models {
        assert_same(p, &e.restore(p), m);
    }
    e.ok(&["verify"]);
    let objects = |prefix: &str| -> BTreeMap<String, Vec<u8>> {
        let b = g.backend(prefix);
        b.list("")
            .unwrap()
            .into_iter()
            .map(|n| {
                let bytes = b.get(&n).unwrap();
                (n, bytes)
            })
            .collect()
    };
    let enc = objects("enc");
    assert!(enc.keys().any(|n| n.starts_with("packs/")), "{enc:?}");
    let shown: Vec<&String> = enc
        .iter()
        .filter(|(_, b)| contains(b, MARKER))
        .map(|(n, _)| n)
        .collect();
    assert!(shown.is_empty(), "{shown:?}");
    assert!(
        objects("plain").values().any(|b| contains(b, MARKER)),
        "the control bucket prefix must show the marker"
    );
    // A wrong key: one line, nothing in the bucket changed.
    let key = e.store.join("repo.key");
    let aside = e.path("good.key");
    std::fs::rename(&key, &aside).unwrap();
    let other = env("other", &[]);
    std::fs::copy(other.store.join("repo.key"), &key).unwrap();
    let err = e.fails(&["verify"]);
    one_line(&err);
    assert!(
        err.contains("is encrypted") && err.contains("key id"),
        "{err}"
    );
    let err = e.fails(&["backup", "s9"]);
    one_line(&err);
    assert_eq!(objects("enc"), enc, "nothing changed in the bucket");
    std::fs::remove_file(&key).unwrap();
    std::fs::rename(&aside, &key).unwrap();
    e.ok(&["verify"]);
}

#[test]
fn verify_repair_heals_a_sealed_pack_from_the_live_disk() {
    let mut rng = Rng(test_seed("verify_repair_heals_a_sealed_pack") | 1);
    let data = marked(&mut rng, 1 << 20, 4);
    let e = Env::with_init(SIZE, &data, &["--encrypt"], Vec::new(), None);
    e.ok(&["backup", "p1"]);
    let packs: Vec<PathBuf> = files(&e.store.join("repo/packs")).into_keys().collect();
    let victim = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(victim).unwrap().len();
    // One byte spoils the 16 KiB chunk it is in: every block stored across it.
    common::flip(victim, len / 3);
    let out = e.verify_fails(&[]);
    assert!(out.contains("damaged"), "{out}");
    // The live disk is unchanged since p1, so tracking vouches for every damaged block, and
    // the new copies get the keyed ids the map names.
    let repaired = e.ok(&["verify", "--repair"]);
    assert!(repaired.contains("repaired: point p1"), "{repaired}");
    assert!(e.ok(&["verify"]).contains("all good"));
    assert_same("p1", &e.restore("p1"), &e.model);
}
