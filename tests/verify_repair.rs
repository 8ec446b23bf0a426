//! Self-healing (issue 13): `verify --repair` stores damaged blocks again from the live disk
//! wherever tracking proves the live block unchanged since a point that needs it; what no live
//! disk can vouch for stays damaged and is named; and the next backup stores a block known
//! damaged again instead of deduplicating against the bad copy. Every point is compared with
//! the model of its bytes afterwards. Replication adds sources: a replica image received with
//! `receive --apply` repairs the blocks and map nodes its point shares with a damaged point,
//! and `--from STORE` takes them from the other end of replication; a damaged map node is
//! rebuilt from the blocks under it wherever a source proves them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{BS, Env, Rng, assert_same, find_blob, flip, point_block_hash, test_seed};
use vmref::backup::data::{Data, map_of};
use vmref::repo::map::node;
use vmref::repo::{BlobKind, BlobStore, Hash};
use vmref::store::Store;

const SIZE: usize = 1 << 20;

#[test]
fn repair_from_the_live_disk_where_tracking_vouches_for_it() {
    let seed = test_seed("repair_from_the_live_disk_where_tracking_vouches_for_it");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; SIZE];
    rng.fill(&mut init);
    let mut e = Env::new(SIZE, &init);
    e.ok(&["backup", "p1"]);
    let m1 = e.model.clone();
    // Block 10 changes after p1; block 20 does not.
    let mut new = vec![0u8; BS];
    rng.fill(&mut new);
    e.write(&[(10 * BS as u64, new)]);
    e.ok(&["backup", "p2"]);
    let m2 = e.model.clone();
    let h10 = point_block_hash(&e.store, "p1", "disk0", 10);
    let h20 = point_block_hash(&e.store, "p1", "disk0", 20);
    // Both located before either is damaged (a damaged pack no longer lists its blobs).
    let (p10, b10) = find_blob(&e.store, &h10);
    let (p20, b20) = find_blob(&e.store, &h20);
    flip(&p10, b10.offset + b10.stored_len as u64 / 2);
    flip(&p20, b20.offset + b20.stored_len as u64 / 2);
    // Plain verify names both and repairs nothing.
    let out = e.verify_fails(&[]);
    assert!(
        out.contains("block 10") && out.contains("block 20"),
        "{out}"
    );
    // Repair: block 20 is unchanged since p1 (and p2) on the live disk, block 10 is not.
    let o = e.run(&["verify", "--repair"]);
    assert!(
        !o.status.success(),
        "block 10 cannot be repaired from the live disk"
    );
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        out.contains("repaired: point p1 disk disk0 block 20"),
        "{out}"
    );
    assert!(
        out.contains("damaged: point p1 disk disk0 block 10"),
        "{out}"
    );
    assert!(
        !out.contains("damaged: point p1 disk disk0 block 20"),
        "{out}"
    );
    assert_same("p2", &e.restore("p2"), &m2);
    // The next backup of block 10's old bytes (written back) stores them again.
    e.write(&[(10 * BS as u64, m1[10 * BS..11 * BS].to_vec())]);
    e.ok(&["backup", "p3"]);
    assert!(e.ok(&["verify"]).contains("all good"));
    assert_same("p1", &e.restore("p1"), &m1);
    assert_same("p3", &e.restore("p3"), &e.model);
}

/// 6 MiB of 4 KiB blocks: a map of two leaves (blocks 0..1024 and 1024..1536) under a root.
const BIG: usize = 6 << 20;

fn vmref(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmref"));
    c.arg("--store").arg(store).env_remove("VMREF_STORE");
    c
}

/// `send ARGS` from `from`, `receive --apply disk0=REPLICA` into `to`, through a file.
fn replicate(from: &Path, send: &[&str], to: &Path, replica: &Path, tmp: &Path) {
    let f = tmp.join("stream");
    let o = vmref(from)
        .arg("send")
        .args(send)
        .arg("--output")
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "send: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = vmref(to)
        .arg("receive")
        .arg("--apply")
        .arg(format!("disk0={}", replica.display()))
        .stdin(Stdio::from(std::fs::File::open(&f).unwrap()))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "receive: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The root of `point`'s map of disk0 and the root's entries (its leaves here).
fn map_nodes(store: &Path, point: &str) -> (Hash, Vec<Hash>) {
    let s = Store::open(store).unwrap();
    let data = Data::open(&s).unwrap();
    let (map, _) = map_of(&s, &s.read_ref(point).unwrap(), "disk0").unwrap();
    let root = node::decode(&data.repo.get(BlobKind::Map, &map.root).unwrap()).unwrap();
    assert_eq!(root.level, 1);
    (map.root, root.entries.to_vec())
}

/// `verify --repair ARGS` in `store`: (success, repaired lines, damaged lines).
fn repair(store: &Path, args: &[&str]) -> (bool, Vec<String>, Vec<String>) {
    let o = vmref(store)
        .args([&["verify", "--repair"], args].concat())
        .output()
        .unwrap();
    let out = String::from_utf8(o.stdout).unwrap();
    eprintln!("verify --repair {args:?} in {}:\n{out}", store.display());
    let pick = |p: &str| {
        out.lines()
            .filter(|l| l.starts_with(p))
            .map(String::from)
            .collect()
    };
    (o.status.success(), pick("repaired: "), pick("damaged: "))
}

fn restore(store: &Path, point: &str, dir: &Path) -> Result<Vec<u8>, String> {
    let to = dir.join(format!("restored-{point}.img"));
    let o = vmref(store)
        .args(["restore", point, "--disk", "disk0", "--to"])
        .arg(&to)
        .arg("--force")
        .output()
        .unwrap();
    if !o.status.success() {
        assert!(!to.exists(), "a failed restore leaves no file");
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let b = std::fs::read(&to).unwrap();
    std::fs::remove_file(&to).unwrap();
    Ok(b)
}

/// Faults injected, and restores that returned bytes other than the model's (must stay 0).
#[derive(Default)]
struct Count {
    faults: u64,
    wrong: u64,
    checked: u64,
}

impl Count {
    fn flip_blob(&mut self, at: &(PathBuf, vmref::repo::pack::PackEntry)) {
        flip(&at.0, at.1.offset + at.1.stored_len as u64 / 2);
        self.faults += 1;
    }

    /// Restore `point` from `store`: exact, or (when `may_fail`) refused; never other bytes.
    fn check(&mut self, store: &Path, point: &str, model: &[u8], dir: &Path, may_fail: bool) {
        self.checked += 1;
        match restore(store, point, dir) {
            Ok(b) => {
                if b != model {
                    self.wrong += 1;
                }
                assert_same(&format!("{point} in {}", store.display()), &b, model);
            }
            Err(e) => assert!(may_fail, "restore {point} from {}: {e}", store.display()),
        }
    }
}

#[test]
fn repair_from_a_replica_and_another_store_including_map_nodes() {
    let seed = test_seed("repair_from_a_replica_and_another_store_including_map_nodes");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; BIG];
    rng.fill(&mut init);
    let mut a = Env::new(BIG, &init);
    let tmp = a.dir.path().to_path_buf();
    let b = tmp.join("target");
    let replica = tmp.join("replica.img");
    let o = vmref(&b)
        .args(["init", "--block-size", "4K"])
        .output()
        .unwrap();
    assert!(o.status.success());

    a.ok(&["backup", "p1"]);
    let m1 = a.model.clone();
    // Blocks 100 and 101 change after p1 (leaf 0); leaf 1 is the same in both points.
    let mut w = vec![0u8; 2 * BS];
    rng.fill(&mut w);
    a.write(&[(100 * BS as u64, w)]);
    a.ok(&["backup", "p2"]);
    let m2 = a.model.clone();
    replicate(&a.store, &["p1"], &b, &replica, &tmp);
    replicate(&a.store, &["p2", "--since", "p1"], &b, &replica, &tmp);
    assert_same("replica at p2", &std::fs::read(&replica).unwrap(), &m2);
    // The live disk moves on at block 1300 (leaf 1), after p2.
    let mut w = vec![0u8; BS];
    rng.fill(&mut w);
    a.write(&[(1300 * BS as u64, w)]);

    let (r1, l1) = map_nodes(&a.store, "p1");
    let (_, l2) = map_nodes(&a.store, "p2");
    assert_eq!(l1[1], l2[1], "leaf 1 is shared");
    assert_ne!(l1[0], l2[0]);
    assert_eq!(
        (r1, l1.clone()),
        map_nodes(&b, "p1"),
        "the same maps on both ends"
    );
    let h100_p1 = point_block_hash(&a.store, "p1", "disk0", 100);
    let h500 = point_block_hash(&a.store, "p2", "disk0", 500);
    let h1200 = point_block_hash(&a.store, "p2", "disk0", 1200);
    let h1300 = point_block_hash(&a.store, "p2", "disk0", 1300);
    assert_eq!(h1200, point_block_hash(&a.store, "p1", "disk0", 1200));

    // Locate every blob before any is damaged (a damaged pack no longer lists its blobs).
    let in_b: Vec<_> = [h1200, h100_p1, l1[1], r1, l1[0]]
        .iter()
        .map(|h| find_blob(&b, h))
        .collect();
    let in_a: Vec<_> = [l2[0], h500, h1300]
        .iter()
        .map(|h| find_blob(&a.store, h))
        .collect();
    let mut n = Count::default();
    for at in &in_b {
        n.flip_blob(at);
    }
    for at in &in_a {
        n.flip_blob(at);
    }
    let faults_b = in_b.len();

    // Receiver, from its own replica image (at p2): p2's leaf 1 (shared with p1) is rebuilt
    // from the image's blocks, then block 1200 under it is read from the image. p1's root
    // and its own leaf 0 and block 100 differ from p2's: nothing here proves them.
    let (ok, fixed, bad) = repair(&b, &[]);
    assert!(!ok);
    assert!(
        fixed.iter().any(|l| l.contains(
            "point p2 disk disk0 map node of level 0 (blocks 1024..1536) from the replica image"
        )),
        "{fixed:?}"
    );
    assert!(
        fixed
            .iter()
            .any(|l| l.contains("point p2 disk disk0 block 1200 from the replica image")),
        "{fixed:?}"
    );
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0].starts_with("damaged: point p1 disk disk0: point map"),
        "{bad:?}"
    );
    n.check(&b, "p2", &m2, &tmp, false);
    n.check(&b, "p1", &m1, &tmp, true);
    let repaired_b1 = fixed.len();

    // ...and from the sender's store: p1's root, then leaf 0 under it, then block 100.
    let (ok, fixed, bad) = repair(&b, &["--from", a.store.to_str().unwrap()]);
    assert!(ok && bad.is_empty(), "{bad:?}");
    for want in [
        "point p1 disk disk0 map node of level 1 (blocks 0..1536) from store",
        "point p1 disk disk0 map node of level 0 (blocks 0..1024) from store",
        "point p1 disk disk0 block 100 from store",
    ] {
        assert!(fixed.iter().any(|l| l.contains(want)), "{want}: {fixed:?}");
    }
    let repaired_b2 = fixed.len();

    // Sender, from its live disk: p2's leaf 0 (nothing written there since p2) and block
    // 500; block 1300 was written since p2, so its old bytes come from the receiver.
    let (ok, fixed, bad) = repair(&a.store, &[]);
    assert!(!ok);
    assert!(
        fixed.iter().any(|l| l.contains(
            "point p2 disk disk0 map node of level 0 (blocks 0..1024) from the live disk"
        )),
        "{fixed:?}"
    );
    assert!(
        fixed
            .iter()
            .any(|l| l.contains("point p1 disk disk0 block 500 from the live disk")),
        "{fixed:?}"
    );
    let mut bad = bad;
    bad.sort();
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(
        bad[0].starts_with("damaged: point p1 disk disk0 block 1300"),
        "{bad:?}"
    );
    assert!(
        bad[1].starts_with("damaged: point p2 disk disk0 block 1300"),
        "{bad:?}"
    );
    let repaired_a1 = fixed.len();
    n.check(&a.store, "p1", &m1, &tmp, true);
    n.check(&a.store, "p2", &m2, &tmp, true);
    // The last repair runs in the sender's daemon when FUSE is here (the request carries
    // --from), and in the command otherwise.
    let mnt = tmp.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted =
        common::fuse_ok("repair_from_a_replica_and_another_store (mounted part)").then(|| {
            a.ok(&["mount", mnt.to_str().unwrap()]);
            common::MountGuard {
                mnt: mnt.clone(),
                pid: common::daemon_pid(&a.store),
                child: None,
            }
        });
    let (ok, fixed, bad) = repair(&a.store, &["--from", b.to_str().unwrap()]);
    if let Some(g) = mounted {
        a.ok(&["umount", mnt.to_str().unwrap()]);
        drop(g);
    }
    assert!(ok && bad.is_empty(), "{bad:?}");
    assert!(
        fixed.iter().any(|l| l.contains("block 1300 from")),
        "{fixed:?}"
    );
    let repaired_a2 = fixed.len();

    // Every point on both ends, byte for byte; a later backup is exact too.
    a.ok(&["backup", "p3"]);
    for (store, point, model) in [
        (&a.store, "p1", &m1),
        (&a.store, "p2", &m2),
        (&a.store, "p3", &a.model),
        (&b, "p1", &m1),
        (&b, "p2", &m2),
    ] {
        n.check(store, point, model, &tmp, false);
    }
    assert!(a.ok(&["verify"]).contains("all good"));
    let o = vmref(&b).arg("verify").output().unwrap();
    assert!(o.status.success());
    assert_eq!(n.wrong, 0);
    eprintln!(
        "repair counts: trials 1, faults injected {} ({faults_b} in the receiver, {} in the \
         sender: blocks and map nodes), repaired lines {} + {} (receiver) {} + {} (sender), \
         restores compared {}, bytes lost 0, silent wrong answers {}",
        n.faults,
        n.faults as usize - faults_b,
        repaired_b1,
        repaired_b2,
        repaired_a1,
        repaired_a2,
        n.checked,
        n.wrong
    );
}
