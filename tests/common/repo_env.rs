//! Helpers that look inside a store's repository (store format 2): its pack and index objects
//! as files, a blob's stored bytes found through its pack's trailer table, the blobs the
//! restorable points reach, and `status`'s space figures. Tests damage and count repository
//! objects only through these, so none of them hard-codes the layout.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use vmref::backup::data::{Data, Space, map_of};
use vmref::repo::pack::{PackEntry, decode_pack};
use vmref::repo::{BlobKind, Hash};
use vmref::store::Store;
use vmref::store::records::RefState;

use super::flip;

/// Every file below `dir`, recursively, sorted (temp files included).
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn is_temp(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// The pack objects of the store's repository (`repo/packs/XX/<id>`), temp files left out.
pub fn repo_packs(store: &Path) -> Vec<PathBuf> {
    files_below(&store.join("repo/packs"))
        .into_iter()
        .filter(|p| !is_temp(p))
        .collect()
}

/// The index objects of the store's repository (`repo/index/<seq>-<hex>`), oldest first.
pub fn repo_indexes(store: &Path) -> Vec<PathBuf> {
    files_below(&store.join("repo/index"))
        .into_iter()
        .filter(|p| !is_temp(p))
        .collect()
}

/// Temp files (`.<name>.tmp.*`, or any other dot file) anywhere in the repository.
pub fn repo_temp_files(store: &Path) -> Vec<PathBuf> {
    files_below(&store.join("repo"))
        .into_iter()
        .filter(|p| is_temp(p))
        .collect()
}

/// The pack's table, decoded and checked whole (header, table and every blob's CRC).
pub fn pack_entries(pack: &Path) -> Vec<PackEntry> {
    decode_pack(&std::fs::read(pack).unwrap())
        .unwrap_or_else(|e| panic!("pack {}: {e}", pack.display()))
}

/// The pack that stores blob `h`, and its entry there.
pub fn find_blob(store: &Path, h: &Hash) -> (PathBuf, PackEntry) {
    for p in repo_packs(store) {
        if let Some(e) = pack_entries(&p).into_iter().find(|e| e.hash == *h) {
            return (p, e);
        }
    }
    panic!("blob {h} is in no pack of {}", store.display());
}

/// Damage blob `h` where it is stored: flip a byte in the middle of its stored bytes.
/// Returns the pack it is in.
pub fn flip_blob(store: &Path, h: &Hash) -> PathBuf {
    let (p, e) = find_blob(store, h);
    flip(&p, e.offset + e.stored_len as u64 / 2);
    p
}

/// Damage the entry of blob `h` in the index object that names it (each entry is 64 bytes,
/// from offset 16, beginning with the hash; see src/repo/index.rs). Returns that index object.
pub fn flip_index_entry(store: &Path, h: &Hash) -> PathBuf {
    for p in repo_indexes(store) {
        let b = std::fs::read(&p).unwrap();
        let mut off = 16;
        while off + 64 <= b.len() {
            if b[off..off + 32] == h.0 {
                flip(&p, off as u64 + 40);
                return p;
            }
            off += 64;
        }
    }
    panic!("blob {h} is in no index object of {}", store.display());
}

/// The root of `disk`'s map in restorable point `point`, as its record names it.
pub fn point_root(store: &Path, point: &str, disk: &str) -> Hash {
    let s = Store::open(store).unwrap();
    let rec = s.read_ref(point).unwrap();
    let m = rec.disks[disk]
        .map
        .as_ref()
        .expect("a restorable point's map");
    Hash::parse(&m.root).unwrap()
}

/// The hash of block `block` of `disk` in point `point` (`Hash::ZERO` for a hole).
pub fn point_block_hash(store: &Path, point: &str, disk: &str, block: u64) -> Hash {
    let s = Store::open(store).unwrap();
    let data = Data::open(&s).unwrap();
    let rec = s.read_ref(point).unwrap();
    let (map, _) = map_of(&s, &rec, disk).unwrap();
    data.maps.lookup(&map, block).unwrap()
}

/// Every blob the restorable points reach (map nodes and data blocks), with its kind.
pub fn live_blobs(store: &Path) -> HashMap<Hash, BlobKind> {
    let s = Store::open(store).unwrap();
    let data = Data::open(&s).unwrap();
    let mut live = HashMap::new();
    let mut nodes = HashSet::new();
    let mut blocks = Vec::new();
    for r in s.refs().unwrap() {
        if r.state != RefState::Restorable {
            continue;
        }
        for disk in r.disks.keys() {
            let (map, _) = map_of(&s, &r, disk).unwrap();
            data.maps
                .walk(&map, &mut |h| nodes.insert(*h), &mut |h| blocks.push(*h))
                .unwrap();
        }
    }
    live.extend(nodes.into_iter().map(|h| (h, BlobKind::Map)));
    live.extend(blocks.into_iter().map(|h| (h, BlobKind::Data)));
    live
}

/// What `vmref status --json` says of the repository's space.
pub fn status_space(status_json: &str) -> Space {
    let v: serde_json::Value = serde_json::from_str(status_json).unwrap();
    serde_json::from_value(v["space"].clone()).unwrap()
}

/// Check that the repository holds what the restorable points need and little else: every
/// live blob is in a pack with its kind, no pack is without live blobs, and every pack's live
/// bytes are at least half its blob bytes (garbage collection rewrites packs below that).
/// Returns the live blobs' stored bytes.
pub fn assert_repo_holds_only_live(store: &Path) -> u64 {
    let live = live_blobs(store);
    let mut found: HashMap<Hash, BlobKind> = HashMap::new();
    let mut live_bytes = 0;
    for p in repo_packs(store) {
        let entries = pack_entries(&p);
        let total: u64 = entries.iter().map(|e| e.stored_len as u64).sum();
        let alive: u64 = entries
            .iter()
            .filter(|e| live.contains_key(&e.hash))
            .map(|e| e.stored_len as u64)
            .sum();
        assert!(
            alive > 0 && alive * 2 >= total,
            "pack {} holds {alive} live of {total} blob bytes",
            p.display()
        );
        for e in entries.iter().filter(|e| live.contains_key(&e.hash)) {
            if found.insert(e.hash, e.kind).is_none() {
                live_bytes += e.stored_len as u64;
            }
        }
    }
    for (h, k) in &live {
        assert_eq!(found.get(h), Some(k), "live blob {h} ({k:?}) not stored");
    }
    live_bytes
}
