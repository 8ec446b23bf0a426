//! Full and incremental backups through the CLI, compared byte for byte with the disk's
//! bytes at each point: a chain deeper than 30, deletes and prunes in the middle of it,
//! sparse full backups, and the bad inputs that must leave the store unchanged.

mod common;

use common::{
    BS, Env, Rng, assert_repo_holds_only_live, assert_same, file_allocated, live_blobs,
    pack_entries, repo_indexes, repo_packs,
};
use vmref::repo::{BlobKind, Hash};

fn backup_info(e: &Env, point: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&e.ok(&["ref", "show", point, "--json"])).unwrap();
    v["backup"].clone()
}

/// The data bytes of points' images (what `status` calls logical bytes): their non-zero
/// blocks, each disk's total capped at its size.
fn logical(points: &[(String, Vec<u8>)]) -> u64 {
    points
        .iter()
        .map(|(_, img)| {
            let blocks = img.chunks(BS).filter(|c| c.iter().any(|&b| b != 0)).count();
            ((blocks * BS) as u64).min(img.len() as u64)
        })
        .sum()
}

#[test]
fn chain_of_35_restores_exactly_through_delete_and_prune() {
    // An odd size: the last block is short.
    let size = (1 << 20) + 1000;
    let mut rng = Rng(0x5eed_0001);
    let mut init = vec![0u8; 300 * 1024];
    rng.fill(&mut init);
    let mut e = Env::new(size, &init);
    let mut points: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..35 {
        if i > 0 {
            e.random_writes(&mut rng, 1 + (i % 4));
        }
        if i == 12 {
            // A plain point between backups changes nothing for them.
            e.ok(&["ref", "create", "plain12"]);
        }
        let name = format!("b{i:02}");
        let out = if i == 20 {
            // An incremental since an older point than the newest.
            e.ok(&["backup", &name, "--since", "b15"])
        } else {
            e.ok(&["backup", &name])
        };
        let want = if i == 0 { "full" } else { "incremental" };
        assert!(out.contains(want), "{name}: {out}");
        points.push((name, e.model.clone()));
    }
    assert_eq!(backup_info(&e, "b20")["since"], "b15");
    for (name, want) in &points {
        assert_same(name, &e.restore(name), want);
    }
    assert!(e.ok(&["verify"]).contains("all good"));

    assert_repo_holds_only_live(&e.store);

    // Deleting a point in the middle keeps every other point exact, and its collection
    // leaves no pack that is mostly garbage.
    let before = e.space();
    e.ok(&["ref", "delete", "b10"]);
    points.retain(|(n, _)| n != "b10");
    e.fails(&[
        "restore",
        "b10",
        "--disk",
        "disk0",
        "--to",
        "/nonexistent/x",
    ]);
    for (name, want) in &points {
        assert_same(name, &e.restore(name), want);
    }
    assert_repo_holds_only_live(&e.store);
    let after_delete = e.space();
    assert!(
        after_delete.stored_bytes <= before.stored_bytes,
        "{before:?} -> {after_delete:?}"
    );
    assert_eq!(after_delete.logical_bytes, logical(&points));

    // Prune to the newest 5: they stay exact, and the repository shrinks to what they need
    // (no pack without a live blob, none mostly garbage, one merged index object).
    let out = e.ok(&["prune", "--keep-last", "5"]);
    assert!(out.contains("pruned 29 point(s)"), "{out}");
    let kept: Vec<_> = points[points.len() - 5..].to_vec();
    assert_eq!(
        e.restorable(),
        kept.iter().map(|p| p.0.clone()).collect::<Vec<_>>()
    );
    for (name, want) in &kept {
        assert_same(name, &e.restore(name), want);
    }
    let pruned = e.space();
    assert!(
        pruned.stored_bytes < after_delete.stored_bytes,
        "prune freed nothing: {after_delete:?} -> {pruned:?}"
    );
    assert_eq!(pruned.logical_bytes, logical(&kept));
    let live_bytes = assert_repo_holds_only_live(&e.store);
    assert!(pruned.stored_bytes >= live_bytes);
    assert_eq!(repo_indexes(&e.store).len(), 1);
    assert!(e.ok(&["verify"]).contains("all good"));
    // The plain point is not a backup and is left alone.
    e.ok(&["ref", "show", "plain12"]);
    assert!(
        e.ok(&["prune", "--keep-last", "5"])
            .contains("nothing to prune")
    );
}

#[test]
fn full_backup_of_a_sparse_disk_stores_no_zero_blocks() {
    let size = 64 << 20;
    let mut e = Env::new(size, &[]);
    let mut rng = Rng(7);
    let mut a = vec![0u8; BS];
    rng.fill(&mut a);
    let mut half = vec![0u8; BS];
    rng.fill(&mut half[..BS / 2]);
    // Three data blocks, and one block written with zeros (stored as a hole).
    e.write(&[
        (0, a.clone()),
        (40 << 20, half.clone()),
        ((64 << 20) - BS as u64, a.clone()),
        (20 << 20, vec![0u8; BS]),
    ]);
    let out = e.ok(&["backup", "full1"]);
    assert!(out.contains("full, 3 blocks stored"), "{out}");
    let info = backup_info(&e, "full1");
    assert_eq!(info["stored_blocks"], 3);
    // Only the two distinct data blocks (block 0 and the last hold the same bytes) and the
    // map nodes over them are stored: the root and the three leaves that cover data.
    let live = live_blobs(&e.store);
    let mut data: Vec<Hash> = live
        .iter()
        .filter(|(_, k)| **k == BlobKind::Data)
        .map(|(h, _)| *h)
        .collect();
    data.sort();
    let mut want = vec![Hash::of(&a), Hash::of(&half)];
    want.sort();
    assert_eq!(data, want);
    assert_eq!(live.len(), 2 + 4, "{live:?}");
    let packs = repo_packs(&e.store);
    let stored: Vec<_> = packs.iter().flat_map(|p| pack_entries(p)).collect();
    assert_eq!(
        stored.len(),
        live.len(),
        "nothing but live blobs: {stored:?}"
    );
    assert!(stored.iter().all(|x| x.hash != Hash::of(&[0u8; BS])));
    let space = e.space();
    assert_eq!(space.blobs, 6);
    assert_eq!(space.logical_bytes, 3 * BS as u64);
    assert!(space.raw_bytes >= 2 * BS as u64 && space.raw_bytes < 3 * BS as u64);
    assert!(space.stored_bytes < 3 * BS as u64, "{space:?}");
    let to = e.path("r.img");
    e.ok(&[
        "restore",
        "full1",
        "--disk",
        "disk0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_same("full1", &std::fs::read(&to).unwrap(), &e.model);
    assert!(file_allocated(&to) <= 64 * 1024, "restore is sparse");

    // An incremental with nothing changed stores nothing.
    let out = e.ok(&["backup", "inc1"]);
    assert!(
        out.contains("incremental since full1, 0 blocks stored"),
        "{out}"
    );
    assert_eq!(repo_packs(&e.store), packs);
    assert_eq!(e.space().blobs, space.blobs);
    // --full copies everything again.
    let out = e.ok(&["backup", "full2", "--full"]);
    assert!(out.contains("full, 3 blocks stored"), "{out}");
    // ... and stores none of them twice: the same blocks give the same map.
    assert_eq!(e.space().blobs, space.blobs);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut e = Env::new(1 << 20, &[1u8; 8192]);
    e.ok(&["backup", "a"]);
    e.ok(&["ref", "create", "p"]);
    let listing = e.ok(&["ref", "list"]);
    let files = e.repo_objects();
    assert!(!files.is_empty());
    // A path of this test's own: a fixed /tmp name could be anything on a shared machine.
    let to = e.path("x.img");
    let to = to.to_str().unwrap();
    for (args, msg) in [
        (vec!["backup", "a"], "already exists"),
        (vec!["backup", "x", "--since", "p"], "not restorable"),
        (vec!["backup", "x", "--since", "nope"], "no reference point"),
        (vec!["backup", "bad/name"], "invalid name"),
        (vec!["prune", "--keep-last", "0"], "at least 1"),
        (
            vec!["restore", "p", "--disk", "disk0", "--to", to],
            "not restorable",
        ),
        (
            vec!["restore", "a", "--disk", "nope", "--to", to],
            "no disk",
        ),
        (vec!["verify", "p"], "not restorable"),
        (vec!["ref", "demote", "a"], "not a checkpoint"),
    ] {
        let err = e.fails(&args);
        assert!(err.contains(msg), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    }
    // A usage error (clap's, with its usage lines).
    assert!(
        e.fails(&["backup", "x", "--full", "--since", "a"])
            .contains("cannot be used")
    );
    assert_eq!(e.ok(&["ref", "list"]), listing);
    assert_eq!(e.repo_objects(), files);

    // restore refuses to overwrite without --force, and leaves the file alone.
    let to = e.path("exists.img");
    std::fs::write(&to, b"keep me").unwrap();
    let err = e.fails(&[
        "restore",
        "a",
        "--disk",
        "disk0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&to).unwrap(), b"keep me");
    e.ok(&[
        "restore",
        "a",
        "--disk",
        "disk0",
        "--to",
        to.to_str().unwrap(),
        "--force",
    ]);
    assert_same("a", &std::fs::read(&to).unwrap(), &e.model);
    e.write(&[(0, vec![9u8; 10])]);
}

#[test]
fn lost_tracking_falls_back_to_full_with_a_warning() {
    let mut e = Env::new(1 << 20, &[3u8; 100_000]);
    e.ok(&["backup", "a"]);
    e.write(&[(5000, vec![4u8; 5000])]);
    // A write behind vmref's back: tracking is lost, the next backup must be full.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&e.image)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[5u8; 3], 700_000).unwrap();
    drop(f);
    e.model[700_000..700_003].copy_from_slice(&[5u8; 3]);
    let o = e.run(&["backup", "b"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("full copy"),
        "{err}"
    );
    assert_eq!(backup_info(&e, "b")["kind"], "full");
    assert_same("b", &e.restore("b"), &e.model);
}

/// Invariants 1 and 6 at depth 100: every point of a chain of a full and 99 incrementals
/// restores exactly, however many maps lie before it, and each incremental stored only what
/// changed (its map shares the rest with the point before).
#[test]
fn chain_of_100_restores_exactly_at_every_depth() {
    let size = (256 << 10) + 100;
    let mut rng = Rng(0x5eed_0100);
    let mut init = vec![0u8; 64 << 10];
    rng.fill(&mut init);
    let mut e = Env::new(size, &init);
    let mut points: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..100 {
        if i > 0 {
            e.random_writes(&mut rng, 1 + i % 3);
        }
        let name = format!("p{i:03}");
        let out = e.ok(&["backup", &name]);
        let want = if i == 0 { "full" } else { "incremental" };
        assert!(out.contains(want), "{name}: {out}");
        if i > 0 {
            // At most 3 writes of at most 3 blocks each, each touching at most 4 blocks.
            let stored = backup_info(&e, &name)["stored_blocks"].as_u64().unwrap();
            assert!(stored <= 12, "{name} stored {stored} blocks");
        }
        points.push((name, e.model.clone()));
    }
    for (name, want) in &points {
        assert_same(name, &e.restore(name), want);
    }
    assert!(e.ok(&["verify"]).contains("100 point(s): all good"));
}
