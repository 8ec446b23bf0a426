//! The basic commands of the command line, driven through the built binary in temp
//! dirs: init, store lookup, disks, reference points, changes, status, and every bad input,
//! which must fail with a non-zero exit, exactly one line on stderr, and the store unchanged.
//!
//! Tracked writes happen through the library between commands (as the mount will make them).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use vmref::engine::Engine;
use vmref::store::Store;
use vmref::store::lock::StoreLock;

const MIB: u64 = 1 << 20;

/// A temp dir with a store path (`s`) inside it; nothing is created until a test says so.
struct Env {
    dir: tempfile::TempDir,
    store: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    Env { dir, store }
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run vmref with `--store` on this env's store.
    fn run(&self, args: &[&str]) -> Output {
        let mut full = vec!["--store", self.store.to_str().unwrap()];
        full.extend_from_slice(args);
        run_raw(&full, &[])
    }

    fn ok(&self, args: &[&str]) -> String {
        ok(self.run(args), args)
    }

    fn json(&self, args: &[&str]) -> Value {
        parse_json(&self.ok(args))
    }

    /// A sparse image of `size` bytes.
    fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    /// An initialized store with `disk0` registered on a sparse image of `size` bytes.
    fn with_disk(size: u64) -> (Env, PathBuf) {
        let e = env();
        e.ok(&["init"]);
        let img = e.image("disk0.img", size);
        e.ok(&["disk", "add", "disk0", img.to_str().unwrap()]);
        (e, img)
    }

    /// Tracked writes through the library, then a clean close.
    fn write(&self, disk: &str, writes: &[(u64, usize)]) {
        let engine = Engine::open(Store::open(&self.store).unwrap()).unwrap();
        let d = engine.disk(disk).unwrap();
        for &(off, len) in writes {
            d.write_at(&vec![0xA5; len], off).unwrap();
        }
        engine.close().unwrap();
    }

    fn snapshot(&self) -> Snapshot {
        snapshot(&self.store)
    }

    /// Run a command that must fail cleanly and leave the store exactly as it was; returns
    /// its one stderr line.
    fn refused(&self, args: &[&str]) -> String {
        let before = self.snapshot();
        let line = fails_one_line(self.run(args), args);
        assert_eq!(
            diff(&before, &self.snapshot()),
            Vec::<String>::new(),
            "`vmref {}` changed the store",
            args.join(" ")
        );
        line
    }
}

fn run_raw(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmref"));
    c.args(args)
        .env_remove("VMREF_STORE")
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run vmref")
}

fn ok(out: Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "`vmref {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Assert a non-zero exit with exactly one non-empty line on stderr; return that line.
fn fails_one_line(out: Output, args: &[&str]) -> String {
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        !out.status.success(),
        "`vmref {}` succeeded; stdout {:?}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "`vmref {}`: stderr {err:?}", args.join(" "));
    assert!(err.ends_with('\n'));
    assert!(
        lines[0].starts_with("vmref: ") && lines[0].len() > 12,
        "{err:?}"
    );
    lines[0].to_string()
}

fn parse_json(s: &str) -> Value {
    // from_str refuses trailing content: the output must be exactly one document.
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not one JSON document ({e}): {s}"))
}

/// Every file (with its bytes) and directory under a path, except the lock file, whose
/// content is the pid of whoever last took the lock.
type Snapshot = BTreeMap<PathBuf, Option<Vec<u8>>>;

fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new("lock") {
                continue;
            }
            if p.is_dir() {
                out.insert(rel, None);
                walk(root, &p, out);
            } else {
                out.insert(rel, Some(fs::read(&p).unwrap()));
            }
        }
    }
    if root.exists() {
        out.insert(PathBuf::from("."), None);
    }
    walk(root, root, &mut out);
    out
}

fn diff(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let keys: BTreeSet<_> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{} differs", k.display()))
        .collect()
}

fn store_id(v: &Value) -> String {
    v["store_id"].as_str().unwrap().to_string()
}

/// Merged byte extents of a set of blocks, clipped to the disk size.
fn extents(blocks: &BTreeSet<u64>, bs: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((o, l)) if *o + *l == b * bs => *l += bs,
            _ => out.push((b * bs, bs)),
        }
    }
    for (o, l) in &mut out {
        *l = (*l).min(size - *o);
    }
    out
}

fn json_extents(disk: &Value) -> Vec<(u64, u64)> {
    disk["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn changes_json(e: &Env, args: &[&str]) -> BTreeMap<String, Value> {
    let mut full = vec!["changes", "--json"];
    full.extend_from_slice(args);
    let v = e.json(&full);
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["disk"].as_str().unwrap().to_string(), d.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// init and finding the store

#[test]
fn init_default_and_block_size_with_private_modes() {
    let e = env();
    let out = e.ok(&["init"]);
    assert!(out.contains("64 KiB"), "{out}");
    assert_eq!(e.json(&["status", "--json"])["block_size"], 65536);
    for (p, want) in [
        (e.store.clone(), 0o700),
        (e.store.join("refs"), 0o700),
        (e.store.join("vmref.store"), 0o600),
    ] {
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}", p.display());
    }
    // A second init is refused and changes nothing.
    let line = e.refused(&["init"]);
    assert!(line.contains("already holds a vmref store"), "{line}");

    let e2 = env();
    e2.ok(&["init", "--block-size", "4K"]);
    assert_eq!(e2.json(&["status", "--json"])["block_size"], 4096);
    let e3 = env();
    e3.ok(&["init", "--block-size", "1M"]);
    assert_eq!(e3.json(&["status", "--json"])["block_size"], 1 << 20);

    for bad in ["3K", "2K", "8M", "lots", ""] {
        let e = env();
        let line = fails_one_line(e.run(&["init", "--block-size", bad]), &["init", bad]);
        assert!(line.contains("block size"), "{line}");
        assert!(
            !e.store.exists(),
            "a refused init left {}",
            e.store.display()
        );
    }
}

#[test]
fn store_flag_beats_env_beats_config_file() {
    let e = env();
    let (a, b, c) = (e.path("a"), e.path("b"), e.path("c"));
    let conf = e.path("config.toml");
    fs::write(&conf, format!("store = {:?}\n", c.to_str().unwrap())).unwrap();
    let conf = conf.to_str().unwrap();
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());

    // Each way of naming a store is enough for init.
    ok(run_raw(&["--store", a, "init"], &[]), &["init a"]);
    ok(run_raw(&["init"], &[("VMREF_STORE", b)]), &["init b"]);
    ok(run_raw(&["--config", conf, "init"], &[]), &["init c"]);
    let id = |args: &[&str], envs: &[(&str, &str)]| {
        let mut full = args.to_vec();
        full.extend_from_slice(&["status", "--json"]);
        store_id(&parse_json(&ok(run_raw(&full, envs), &full)))
    };
    let (ia, ib, ic) = (
        id(&["--store", a], &[]),
        id(&[], &[("VMREF_STORE", b)]),
        id(&["--config", conf], &[]),
    );
    assert!(ia != ib && ib != ic && ia != ic);

    assert_eq!(
        id(&["--store", a, "--config", conf], &[("VMREF_STORE", b)]),
        ia
    );
    assert_eq!(id(&["--config", conf], &[("VMREF_STORE", b)]), ib);
    assert_eq!(id(&["--config", conf], &[("VMREF_STORE", "")]), ic);

    // A named config file that is missing or has unknown keys is one clear error.
    let missing = e.path("nope.toml");
    let args = ["--config", missing.to_str().unwrap(), "status"];
    let line = fails_one_line(run_raw(&args, &[]), &args);
    assert!(line.contains("nope.toml"), "{line}");
    let bad = e.path("bad.toml");
    fs::write(&bad, "stor = \"/x\"\n").unwrap();
    let args = ["--config", bad.to_str().unwrap(), "status"];
    let line = fails_one_line(run_raw(&args, &[]), &args);
    assert!(line.contains("bad.toml"), "{line}");
}

// ---------------------------------------------------------------------------------------
// disks, points, changes, status

#[test]
fn disk_add_list_remove() {
    let (e, img) = Env::with_disk(4 * MIB);
    let list = e.ok(&["disk", "list"]);
    assert!(
        list.contains("disk0") && list.contains(img.to_str().unwrap()),
        "{list}"
    );
    let v = e.json(&["disk", "list", "--json"]);
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["name"], "disk0");
    assert_eq!(
        v[0]["image"],
        fs::canonicalize(&img).unwrap().to_str().unwrap()
    );

    let line = e.refused(&["disk", "add", "disk0", img.to_str().unwrap()]);
    assert!(line.contains("already registered"), "{line}");
    let line = e.refused(&["disk", "add", "other", img.to_str().unwrap()]);
    assert!(line.contains("disk0"), "same image twice: {line}");
    let empty = e.image("empty.img", 0);
    let line = e.refused(&["disk", "add", "disk1", empty.to_str().unwrap()]);
    assert!(line.contains("empty"), "{line}");
    let line = e.refused(&["disk", "add", "disk1", e.dir.path().to_str().unwrap()]);
    assert!(line.contains("not a regular file"), "{line}");

    let img1 = e.image("disk1.img", 2 * MIB);
    e.ok(&["disk", "add", "disk1", img1.to_str().unwrap()]);
    let names: Vec<String> = e
        .json(&["disk", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["disk0", "disk1"]);

    e.ok(&["disk", "remove", "disk0"]);
    let v = e.json(&["disk", "list", "--json"]);
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["name"], "disk1");
    assert!(!e.store.join("track/disk0.map").exists());
    assert_eq!(
        fs::metadata(&img).unwrap().len(),
        4 * MIB,
        "image left alone"
    );
    e.refused(&["disk", "remove", "disk0"]);
}

#[test]
fn ref_create_list_show_delete_with_owners() {
    let (e, _img) = Env::with_disk(4 * MIB);
    let out = e.ok(&["ref", "create", "r1", "--owner", "veeam"]);
    assert!(out.contains("r1"), "{out}");
    e.ok(&["ref", "create", "r2", "--owner", "acme"]);
    e.ok(&["ref", "create", "r3"]);

    let all = e.json(&["ref", "list", "--json"]);
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r1", "r2", "r3"], "oldest first");
    let seqs: Vec<u64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["disks"]["disk0"]["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs[0] < seqs[1] && seqs[1] < seqs[2], "{seqs:?}");
    let ids: BTreeSet<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "ids are unique");

    let text = e.ok(&["ref", "list"]);
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(
        rows[0].starts_with("r1 ") && rows[0].contains("veeam"),
        "{text}"
    );

    let veeam = e.json(&["ref", "list", "--owner", "veeam", "--json"]);
    assert_eq!(veeam.as_array().unwrap().len(), 1);
    assert_eq!(veeam[0]["name"], "r1");
    let text = e.ok(&["ref", "list", "--owner", "acme"]);
    assert!(
        text.contains("r2") && !text.contains("r1") && !text.contains("r3"),
        "{text}"
    );
    let none = e.json(&["ref", "list", "--owner", "nobody", "--json"]);
    assert_eq!(none, Value::Array(vec![]));

    let show = e.json(&["ref", "show", "r2", "--json"]);
    assert_eq!(show["name"], "r2");
    assert_eq!(show["owner"], "acme");
    assert_eq!(show["state"], "plain");
    assert_eq!(show["disks"]["disk0"]["seq"].as_u64(), Some(seqs[1]));
    assert_eq!(show["disks"]["disk0"]["size"].as_u64(), Some(4 * MIB));
    let text = e.ok(&["ref", "show", "r2"]);
    assert!(
        text.contains("name:     r2") && text.contains("owner:    acme"),
        "{text}"
    );

    e.ok(&["ref", "delete", "r2"]);
    let names: Vec<String> = e
        .json(&["ref", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["r1", "r3"]);
    assert!(!e.store.join("refs/r2.ref").exists());
    let line = e.refused(&["ref", "show", "r2"]);
    assert!(line.contains("r2"), "{line}");
    // A deleted name can be used again, with a new id and a newer number.
    e.ok(&["ref", "create", "r2"]);
    let again = e.json(&["ref", "show", "r2", "--json"]);
    assert_ne!(again["id"], show["id"]);
    assert!(again["disks"]["disk0"]["seq"].as_u64().unwrap() > seqs[2]);
}

#[test]
fn changes_since_points_per_disk_and_disks_added_later() {
    let size = 10 * MIB + 1000; // a partial last block
    let bs = 65536;
    let (e, _img) = Env::with_disk(size);
    e.ok(&["ref", "create", "r1"]);
    let first = [(0, 10), (bs * 3 + 5, (bs * 2) as usize), (size - 1, 1)];
    e.write("disk0", &first);
    e.ok(&["ref", "create", "r2"]);
    let second = [(bs * 40, 1), (bs * 41 - 1, 2)];
    e.write("disk0", &second);

    let blocks = |ws: &[(u64, usize)]| -> BTreeSet<u64> {
        ws.iter()
            .flat_map(|&(o, l)| o / bs..=(o + l as u64 - 1) / bs)
            .collect()
    };
    let all: BTreeSet<u64> = blocks(&first).union(&blocks(&second)).copied().collect();

    let c = changes_json(&e, &["--since", "r1"]);
    let d0 = &c["disk0"];
    assert_eq!(d0["in_point"], true);
    assert_eq!(json_extents(d0), extents(&all, bs, size));
    let sum: u64 = json_extents(d0).iter().map(|x| x.1).sum();
    assert_eq!(d0["changed_bytes"].as_u64(), Some(sum));
    let c = changes_json(&e, &["--since", "r2"]);
    assert_eq!(
        json_extents(&c["disk0"]),
        extents(&blocks(&second), bs, size)
    );

    // The text form: one line per extent.
    let text = e.ok(&["changes", "--since", "r2"]);
    let lines: Vec<String> = extents(&blocks(&second), bs, size)
        .iter()
        .map(|(o, l)| format!("disk0\t{o}\t{l}"))
        .collect();
    assert_eq!(text.lines().collect::<Vec<_>>(), lines);

    // A disk registered after r2 has no entry in it and says so.
    let img1 = e.image("disk1.img", 3 * MIB);
    e.ok(&["disk", "add", "disk1", img1.to_str().unwrap()]);
    e.write("disk1", &[(MIB, 1)]);
    let c = changes_json(&e, &["--since", "r2"]);
    assert_eq!(c.len(), 2);
    assert_eq!(c["disk1"]["in_point"], false);
    assert_eq!(json_extents(&c["disk1"]), vec![(0, 3 * MIB)]);
    assert_eq!(
        json_extents(&c["disk0"]),
        extents(&blocks(&second), bs, size)
    );
    let text = e.ok(&["changes", "--since", "r2", "--disk", "disk1"]);
    assert!(
        text.contains("not registered when r2 was created"),
        "{text}"
    );
    assert!(!text.contains("disk0"), "{text}");

    let c = changes_json(&e, &["--since", "r2", "--disk", "disk0"]);
    assert_eq!(c.keys().collect::<Vec<_>>(), ["disk0"]);

    // A point made now sees no change on either disk.
    e.ok(&["ref", "create", "r3"]);
    let c = changes_json(&e, &["--since", "r3"]);
    assert!(
        c.values()
            .all(|d| json_extents(d).is_empty() && d["in_point"] == true)
    );
}

#[test]
fn status_json_reports_disks_and_points() {
    let (e, img) = Env::with_disk(8 * MIB);
    let v = e.json(&["status", "--json"]);
    assert_eq!(v["refs"], 0);
    let d = &v["disks"][0];
    assert_eq!(d["name"], "disk0");
    assert_eq!(d["size"].as_u64(), Some(8 * MIB));
    assert_eq!(d["block_size"], 65536);
    assert_eq!(d["tracking"], "ok");
    assert_eq!(
        d["image"],
        fs::canonicalize(&img).unwrap().to_str().unwrap()
    );
    let seq0 = d["current_seq"].as_u64().unwrap();
    e.ok(&["ref", "create", "a"]);
    e.ok(&["ref", "create", "b"]);
    let v = e.json(&["status", "--json"]);
    assert_eq!(v["refs"], 2);
    assert_eq!(v["disks"][0]["current_seq"].as_u64(), Some(seq0 + 2));
    let text = e.ok(&["status"]);
    assert!(
        text.contains("disk disk0") && text.contains("tracking ok"),
        "{text}"
    );
}

#[test]
fn outside_write_makes_older_changes_fail_with_the_reason() {
    let (e, img) = Env::with_disk(4 * MIB);
    e.ok(&["ref", "create", "r1"]);
    e.write("disk0", &[(0, 100)]);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(b"behind vmref's back", 2 * MIB).unwrap();
    drop(f);

    let args = ["changes", "--since", "r1"];
    let line = fails_one_line(e.run(&args), &args);
    assert!(line.contains("outside the mount"), "{line}");
    assert!(line.contains("disk0") && line.contains("r1"), "{line}");
    // It stays failed: the loss is recorded, not forgotten at the next open.
    let line = fails_one_line(e.run(&args), &args);
    assert!(line.contains("outside the mount"), "{line}");
    let r1 = e.json(&["ref", "show", "r1", "--json"])["disks"]["disk0"]["seq"]
        .as_u64()
        .unwrap();
    let v = e.json(&["status", "--json"]);
    let since = v["disks"][0]["tracked_since_seq"].as_u64().unwrap();
    assert!(since > r1, "status: tracked since {since}, r1 holds {r1}");
    // A point made afterwards is exact again.
    e.ok(&["ref", "create", "r2"]);
    e.write("disk0", &[(3 * MIB, 1)]);
    let c = changes_json(&e, &["--since", "r2"]);
    assert_eq!(json_extents(&c["disk0"]), vec![(3 * MIB, 65536)]);
}

// ---------------------------------------------------------------------------------------
// bad input: one line, non-zero exit, store unchanged

#[test]
fn bad_and_duplicate_point_names_are_refused() {
    let (e, img) = Env::with_disk(2 * MIB);
    e.ok(&["ref", "create", "r1"]);
    let long = "x".repeat(65);
    for name in [
        "../x",
        "a/b",
        "",
        ".hidden",
        "live",
        long.as_str(),
        "sp ace",
    ] {
        let line = e.refused(&["ref", "create", name]);
        assert!(line.contains("invalid name"), "{name:?}: {line}");
        let line = e.refused(&["disk", "add", name, img.to_str().unwrap()]);
        assert!(line.contains("invalid name"), "disk {name:?}: {line}");
        e.refused(&["ref", "show", name]);
    }
    let line = e.refused(&["ref", "create", "r1"]);
    assert!(line.contains("already exists"), "{line}");
    let line = e.refused(&["ref", "create", "ok", "--owner", "a/b"]);
    assert!(line.contains("owner"), "{line}");
    // 64 characters is still a name.
    e.ok(&["ref", "create", &"x".repeat(64)]);
}

#[test]
fn unknown_point_or_disk_is_refused() {
    let (e, _img) = Env::with_disk(2 * MIB);
    e.ok(&["ref", "create", "r1"]);
    e.write("disk0", &[(0, 1)]);
    for args in [
        &["ref", "show", "nope"][..],
        &["ref", "show", "nope", "--json"],
        &["ref", "delete", "nope"],
        &["changes", "--since", "nope"],
        &["changes", "--since", "nope", "--json"],
    ] {
        let line = e.refused(args);
        assert!(line.contains("no reference point named \"nope\""), "{line}");
    }
    for args in [
        &["changes", "--since", "r1", "--disk", "nope"][..],
        &["disk", "remove", "nope"],
    ] {
        let line = e.refused(args);
        assert!(line.contains("no disk named \"nope\""), "{line}");
    }
}

#[test]
fn missing_image_file_is_refused() {
    let (e, img) = Env::with_disk(2 * MIB);
    e.ok(&["ref", "create", "r1"]);
    let missing = e.path("missing.img");
    let line = e.refused(&["disk", "add", "disk1", missing.to_str().unwrap()]);
    assert!(line.contains("missing.img"), "{line}");

    // A registered image that disappeared: commands that need every disk say which, and
    // change nothing; status shows it; the admin can still remove the disk and go on.
    fs::remove_file(&img).unwrap();
    for args in [&["changes", "--since", "r1"][..], &["ref", "create", "r2"]] {
        let line = e.refused(args);
        assert!(
            line.contains("disk0.img") && line.contains("disk remove disk0"),
            "{line}"
        );
    }
    let status = e.ok(&["status"]);
    assert!(status.contains("unavailable"), "{status}");
    // Read-only listings still work.
    e.ok(&["ref", "list"]);
    e.ok(&["disk", "list"]);
    e.ok(&["disk", "remove", "disk0"]);
    assert!(!e.ok(&["disk", "list"]).contains("disk0"));
    e.ok(&["ref", "create", "r2"]);
}

#[test]
fn store_that_is_not_a_store_is_refused() {
    let e = env();
    let empty = e.path("empty");
    fs::create_dir(&empty).unwrap();
    let other = e.path("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("notes.txt"), b"mine").unwrap();
    let missing = e.path("missing");
    let img = e.image("d.img", MIB);
    let img = img.to_str().unwrap();

    for dir in [&empty, &other, &missing] {
        let before = snapshot(e.dir.path());
        for args in [
            &["status"][..],
            &["status", "--json"],
            &["disk", "list"],
            &["disk", "add", "disk0", img],
            &["ref", "list", "--json"],
            &["ref", "create", "r1"],
            &["changes", "--since", "r1"],
        ] {
            let mut full = vec!["--store", dir.to_str().unwrap()];
            full.extend_from_slice(args);
            let line = fails_one_line(run_raw(&full, &[]), &full);
            assert!(line.contains("not a vmref store"), "{line}");
        }
        assert_eq!(diff(&before, &snapshot(e.dir.path())), Vec::<String>::new());
    }
    // init refuses a directory with other files, too.
    let args = ["--store", other.to_str().unwrap(), "init"];
    let line = fails_one_line(run_raw(&args, &[]), &args);
    assert!(line.contains("not empty"), "{line}");
    assert_eq!(fs::read_dir(&other).unwrap().count(), 1);
}

#[test]
fn a_locked_store_is_refused_to_a_second_process() {
    let (e, img) = Env::with_disk(2 * MIB);
    e.ok(&["ref", "create", "r1"]);
    let img1 = e.image("disk1.img", MIB);
    let lock = StoreLock::try_acquire(&e.store).unwrap();
    for args in [
        &["ref", "create", "r2"][..],
        &["ref", "delete", "r1"],
        &["disk", "add", "disk1", img1.to_str().unwrap()],
        &["disk", "remove", "disk0"],
        &["changes", "--since", "r1"],
        &["status"],
    ] {
        let line = e.refused(args);
        assert!(line.contains("locked by another vmref process"), "{line}");
    }
    // Reading the catalog needs no lock.
    e.ok(&["ref", "list"]);
    drop(lock);
    e.ok(&["ref", "create", "r2"]);

    // The same with a lock held by another process (flock(1)), if the tool is here.
    let held = Command::new("flock")
        .args(["-x", e.store.join("lock").to_str().unwrap(), "sleep", "30"])
        .spawn();
    if let Ok(mut child) = held {
        // Wait until the child holds it.
        let t0 = std::time::Instant::now();
        while StoreLock::try_acquire(&e.store).is_ok() {
            assert!(t0.elapsed().as_secs() < 10, "flock never took the lock");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let line = e.refused(&["ref", "create", "r3"]);
        assert!(line.contains("locked"), "{line}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let _ = img;
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    BadMagic,
    BadChecksum,
    Truncated,
}

fn damage(path: &Path, how: Damage) {
    let mut b = fs::read(path).unwrap();
    match how {
        Damage::BadMagic => b[0] ^= 0x20,
        Damage::BadChecksum => {
            let n = b.len();
            b[n - 3] ^= 0x01; // in the JSON payload, covered by its CRC
        }
        Damage::Truncated => b.truncate(b.len() / 2),
    }
    fs::write(path, b).unwrap();
}

#[test]
fn damaged_store_files_are_refused() {
    for how in [Damage::BadMagic, Damage::BadChecksum, Damage::Truncated] {
        let (e, _img) = Env::with_disk(2 * MIB);
        e.ok(&["ref", "create", "r1"]);
        let cases: [(&str, &[&[&str]]); 3] = [
            (
                "vmref.store",
                &[&["status"], &["ref", "list"], &["ref", "create", "r2"]],
            ),
            (
                "refs/r1.ref",
                &[
                    &["ref", "list", "--json"],
                    &["ref", "show", "r1"],
                    &["ref", "create", "r2"],
                    &["changes", "--since", "r1"],
                ],
            ),
            (
                "disks/disk0.disk",
                &[
                    &["disk", "list"],
                    &["status", "--json"],
                    &["ref", "create", "r2"],
                ],
            ),
        ];
        for (file, commands) in cases {
            let path = e.store.join(file);
            let good = fs::read(&path).unwrap();
            damage(&path, how);
            for args in commands {
                let line = e.refused(args);
                let fname = Path::new(file).file_name().unwrap().to_str().unwrap();
                assert!(line.contains(fname), "{how:?} {file} {args:?}: {line}");
                let why = match how {
                    Damage::BadMagic => "bad magic",
                    Damage::BadChecksum => "checksum",
                    Damage::Truncated => "truncated",
                };
                assert!(line.contains(why), "{how:?} {file} {args:?}: {line}");
            }
            if file.ends_with(".ref") {
                // The way out: the damaged record can be deleted, and the store works again.
                e.ok(&["ref", "delete", "r1"]);
                assert!(!path.exists());
                e.ok(&["ref", "create", "r2"]);
                e.ok(&["ref", "delete", "r2"]);
            }
            fs::write(&path, good).unwrap();
            e.ok(&["ref", "list"]);
        }
    }
}

#[test]
fn damaged_tracking_state_fails_changes_with_the_reason() {
    let (e, _img) = Env::with_disk(2 * MIB);
    e.ok(&["ref", "create", "r1"]);
    e.write("disk0", &[(0, 1)]);
    let map = e.store.join("track/disk0.map");
    let mut b = fs::read(&map).unwrap();
    for x in &mut b[..8192] {
        *x ^= 0x55; // both header slots
    }
    fs::write(&map, b).unwrap();
    let args = ["changes", "--since", "r1"];
    let line = fails_one_line(e.run(&args), &args);
    assert!(line.contains("damaged") && line.contains("full"), "{line}");
}

/// `vmref completions SHELL` prints a script the shell accepts, naming every command, with no
/// store needed.
#[test]
fn completions_for_bash_zsh_and_fish() {
    let bash = ok(run_raw(&["completions", "bash"], &[]), &["completions"]);
    for cmd in ["backup", "restore", "prune", "upgrade", "keep-daily"] {
        assert!(bash.contains(cmd), "bash completion names {cmd}");
    }
    let mut sh = Command::new("bash")
        .arg("-n")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(sh.stdin.as_mut().unwrap(), bash.as_bytes()).unwrap();
    assert!(sh.wait().unwrap().success(), "bash -n accepts the script");
    let zsh = ok(run_raw(&["completions", "zsh"], &[]), &["completions"]);
    assert!(
        zsh.starts_with("#compdef vmref"),
        "{}",
        &zsh[..40.min(zsh.len())]
    );
    let fish = ok(run_raw(&["completions", "fish"], &[]), &["completions"]);
    assert!(fish.contains("complete -c vmref") && fish.contains("upgrade"));
    assert!(!run_raw(&["completions", "tcsh"], &[]).status.success());
}
