//! Damaged backup data: verify names every damaged block, restore and reads fail with an
//! error (EIO at the mount), never with wrong bytes.

mod common;

use common::{
    BS, Env, Rng, assert_same, find_blob, flip_blob, flip_index_entry, point_block_hash, point_root,
};
use vmref::image::{ImageSource, PointSource};

fn setup() -> (Env, Vec<u8>) {
    let mut rng = Rng(99);
    let mut data = vec![0u8; 16 * BS];
    rng.fill(&mut data);
    let mut e = Env::new(1 << 20, &data);
    e.ok(&["backup", "a"]);
    let at_a = e.model.clone();
    e.write(&[(3 * BS as u64, vec![7u8; BS])]);
    e.ok(&["backup", "b"]);
    (e, at_a)
}

/// Call `f` with `point`'s image of disk0 as the mount reads it.
fn with_image(e: &Env, point: &str, f: &mut dyn FnMut(&dyn ImageSource)) {
    let engine = vmref::engine::Engine::open(vmref::store::Store::open(&e.store).unwrap()).unwrap();
    let id = engine.store().read_ref(point).unwrap().id;
    let img = engine.open(point, &id, "disk0").unwrap();
    f(&*img);
}

#[test]
fn a_damaged_pack_block_is_named_and_never_read_as_data() {
    let (e, at_a) = setup();
    // Damage disk block 5 where the full backup stored it (b shares it).
    let h = point_block_hash(&e.store, "a", "disk0", 5);
    assert_eq!(h, point_block_hash(&e.store, "b", "disk0", 5));
    flip_blob(&e.store, &h);

    let out = e.verify_fails(&[]);
    // Both points need that block: both are named.
    assert!(
        out.contains("damaged: point a disk disk0 block 5:"),
        "{out}"
    );
    assert!(
        out.contains("damaged: point b disk disk0 block 5:"),
        "{out}"
    );
    assert_eq!(out.matches("damaged:").count(), 2, "{out}");

    let err = e.restore_fails("a");
    assert!(
        err.contains("checksum") && err.contains(&h.to_hex()),
        "{err}"
    );

    // Through the mount's interface: EIO for the damaged block, exact bytes elsewhere.
    with_image(&e, "a", &mut |img| {
        let mut buf = vec![0u8; BS];
        let err = img.read_at(&mut buf, 5 * BS as u64).unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert!(img.read_at(&mut buf[..10], 5 * BS as u64 + 4000).is_err());
        img.read_at(&mut buf, 6 * BS as u64).unwrap();
        assert_same("block 6", &buf, &at_a[6 * BS..7 * BS]);
        // A read spanning the damaged block fails whole.
        let mut big = vec![0u8; 16 * BS];
        assert!(img.read_at(&mut big, 0).is_err());
    });
}

#[test]
fn a_damaged_index_is_named_and_refused() {
    let (e, at_a) = setup();
    // Damage the index entry of a's map root: a lookup of it reads a bucket that fails its
    // checksum.
    let root = point_root(&e.store, "a", "disk0");
    let idx = flip_index_entry(&e.store, &root);
    let name = idx.file_name().unwrap().to_string_lossy().into_owned();
    let out = e.verify_fails(&[]);
    assert!(
        out.contains("damaged: point a disk disk0:")
            && out.contains("checksum")
            && out.contains(&name),
        "{out}"
    );
    let err = e.restore_fails("a");
    assert!(err.contains("checksum") && err.contains(&name), "{err}");
    // A point whose lookups miss the damaged bucket still restores exactly.
    if !out.contains("damaged: point b") {
        let mut want = at_a.clone();
        want[3 * BS..4 * BS].fill(7);
        assert_same("b", &e.restore("b"), &want);
    }
}

#[test]
fn a_damaged_map_node_is_named_and_read_as_eio() {
    let (e, at_a) = setup();
    // b's map root is its own blob (b's block 3 differs from a's): damage it.
    let root = point_root(&e.store, "b", "disk0");
    assert_ne!(root, point_root(&e.store, "a", "disk0"));
    flip_blob(&e.store, &root);
    let out = e.verify_fails(&[]);
    assert!(
        out.contains("damaged: point b disk disk0: point map:") && out.contains(&root.to_hex()),
        "{out}"
    );
    assert!(!out.contains("damaged: point a"), "{out}");
    let err = e.restore_fails("b");
    assert!(
        err.contains("checksum") && err.contains(&root.to_hex()),
        "{err}"
    );
    // Through the mount's interface: EIO, for every block under the damaged node.
    let mut errnos = Vec::new();
    with_image(&e, "b", &mut |img| {
        let mut buf = vec![0u8; BS];
        for b in [0u64, 3, 15] {
            errnos.push(img.read_at(&mut buf, b * BS as u64).unwrap_err().errno());
        }
    });
    assert_eq!(errnos, [libc::EIO; 3]);
    // a's map and blocks are intact.
    assert_same("a", &e.restore("a"), &at_a);
    assert!(e.ok(&["verify", "a"]).contains("all good"));
}

#[test]
fn a_missing_pack_is_named() {
    let (e, at_a) = setup();
    // The incremental's own pack holds its block 3 and its map root: remove it.
    let h = point_block_hash(&e.store, "b", "disk0", 3);
    let (pack, _) = find_blob(&e.store, &h);
    let (root_pack, _) = find_blob(&e.store, &point_root(&e.store, "b", "disk0"));
    assert_eq!(pack, root_pack);
    std::fs::remove_file(&pack).unwrap();
    let name = pack.file_name().unwrap().to_string_lossy().into_owned();
    let out = e.verify_fails(&[]);
    assert!(
        out.contains("damaged: point b disk disk0:")
            && out.contains(&name)
            && out.contains("missing"),
        "{out}"
    );
    assert!(!out.contains("damaged: point a"), "{out}");
    let err = e.restore_fails("b");
    assert!(err.contains(&name) && err.contains("missing"), "{err}");
    assert_same("a", &e.restore("a"), &at_a);
}

#[test]
fn a_truncated_pack_names_the_blocks_past_the_cut() {
    let (e, _) = setup();
    // Cut the full backup's pack inside the stored bytes of disk block 10: every blob from
    // there on is lost (blocks 10..16 and, written last, a's map root), every blob before it
    // still verifies.
    let h = point_block_hash(&e.store, "a", "disk0", 10);
    let (pack, cut) = find_blob(&e.store, &h);
    let lost: Vec<_> = common::pack_entries(&pack)
        .iter()
        .filter(|x| x.offset >= cut.offset)
        .map(|x| x.hash)
        .collect();
    let root_a = point_root(&e.store, "a", "disk0");
    assert!(lost.contains(&root_a));
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.set_len(cut.offset + 5).unwrap();
    drop(f);
    // a's map went with the cut: a is named, and no byte of it is restored.
    let out = e.verify_fails(&["a"]);
    assert!(
        out.contains("damaged: point a disk disk0: point map:"),
        "{out}"
    );
    e.restore_fails("a");
    // b's map (in b's own pack) is intact and names exactly the blocks past the cut.
    let out = e.verify_fails(&["b"]);
    assert_eq!(out.matches("damaged: point b").count(), 6, "{out}");
    for b in 0..16u64 {
        let named = out.contains(&format!("damaged: point b disk disk0 block {b}:"));
        assert_eq!(named, b >= 10, "block {b}: {out}");
    }
}
