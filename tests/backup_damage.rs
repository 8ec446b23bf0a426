//! Damaged backup data: verify names every damaged block, restore and reads fail with an
//! error (EIO at the mount), never with wrong bytes.

mod common;

use common::{BS, Env, Rng, assert_same, flip};
use vmref::image::PointSource;

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

#[test]
fn a_damaged_pack_block_is_named_and_never_read_as_data() {
    let (e, at_a) = setup();
    // The full backup's pack is the bigger one; damage its slot 5 (disk block 5).
    let mut packs = e.data_files("packs");
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let full = packs.last().unwrap();
    flip(full, 4096 + 5 * BS as u64 + 100);

    let o = e.run(&["verify"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
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
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("damaged"), "{err}");

    let to = e.path("r.img");
    let err = e.fails(&[
        "restore",
        "a",
        "--disk",
        "disk0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(err.contains("checksum"), "{err}");
    assert!(!to.exists(), "no half-restored file");

    // Through the mount's interface: EIO for the damaged block, exact bytes elsewhere.
    let engine = vmref::engine::Engine::open(vmref::store::Store::open(&e.store).unwrap()).unwrap();
    let id = engine.store().read_ref("a").unwrap().id;
    let img = engine.open("a", &id, "disk0").unwrap();
    let mut buf = vec![0u8; BS];
    let err = img.read_at(&mut buf, 5 * BS as u64).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(img.read_at(&mut buf[..10], 5 * BS as u64 + 4000).is_err());
    img.read_at(&mut buf, 6 * BS as u64).unwrap();
    assert_same("block 6", &buf, &at_a[6 * BS..7 * BS]);
    // A read spanning the damaged block fails whole.
    let mut big = vec![0u8; 16 * BS];
    assert!(img.read_at(&mut big, 0).is_err());
}

#[test]
fn a_damaged_index_is_named_and_refused() {
    let (e, _) = setup();
    let idx = e.data_files("index");
    assert_eq!(idx.len(), 2);
    flip(&idx[0], 200);
    let o = e.run(&["verify"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("damaged: point") && out.contains("checksum"),
        "{out}"
    );
    let bad = if out.contains("point a disk disk0:") {
        "a"
    } else {
        "b"
    };
    let to = e.path("r.img");
    let err = e.fails(&[
        "restore",
        bad,
        "--disk",
        "disk0",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(err.contains("checksum"), "{err}");
}

#[test]
fn a_missing_or_truncated_pack_is_named() {
    let (e, _) = setup();
    let mut packs = e.data_files("packs");
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    // Truncate the full pack inside slot 10: blocks 10..16 are lost, 0..10 still verify.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&packs[1])
        .unwrap();
    f.set_len(4096 + 10 * BS as u64 + 5).unwrap();
    drop(f);
    let o = e.run(&["verify", "a"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.matches("damaged: point a").count(), 6, "{out}");
    assert!(
        out.contains("block 10:") && !out.contains("block 9:"),
        "{out}"
    );
    // The incremental's own pack gone: b's block 3 is named.
    std::fs::remove_file(&packs[0]).unwrap();
    let out = String::from_utf8(e.run(&["verify", "b"]).stdout).unwrap();
    assert!(
        out.contains("damaged: point b disk disk0 block 3:"),
        "{out}"
    );
}
