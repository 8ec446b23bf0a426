//! The repository under the point maps (`repo::map`): maps built and updated over a
//! `Repository`, marked by walking the kept maps, collected, and read back exact.

use super::*;
use crate::repo::backend::MemBackend;
use crate::repo::gc::GcOptions;
use crate::repo::map::{self, MapReader, MapRoot, NodeCache};

fn block(seed: u64) -> Vec<u8> {
    crate::repo::test_bytes(seed, 4096)
}

#[test]
fn maps_over_the_repository_survive_prune_and_collection() {
    let b = Arc::new(MemBackend::new());
    let r = Arc::new(
        Repository::init(
            b.clone(),
            RepoOptions {
                compression: Compression::Zstd { level: 1 },
                pack_target: 64 << 10,
            },
        )
        .unwrap(),
    );
    let nblocks = 4096u64;
    // Point 0: 300 blocks of data; each next point rewrites 40 blocks with new bytes.
    let mut contents: Vec<Vec<(u64, u64)>> = Vec::new(); // per point: (block, seed)
    let mut cur: Vec<(u64, u64)> = (0..300).map(|i| (i * 13 % nblocks, i)).collect();
    cur.sort();
    let mut roots: Vec<MapRoot> = Vec::new();
    let pairs = |c: &[(u64, u64)]| -> Vec<(u64, Hash)> {
        c.iter()
            .map(|(blk, s)| (*blk, r.put(BlobKind::Data, &block(*s)).unwrap()))
            .collect()
    };
    roots.push(map::build(&*r, nblocks, pairs(&cur)).unwrap());
    r.flush().unwrap();
    contents.push(cur.clone());
    for p in 1..8u64 {
        let mut changes = Vec::new();
        for k in 0..40usize {
            let idx = (k * 7 + p as usize * 3) % cur.len();
            cur[idx].1 = 1000 * p + k as u64;
            changes.push(cur[idx]);
        }
        changes.sort();
        changes.dedup_by_key(|c| c.0);
        let root = map::update(&*r, roots.last().unwrap(), pairs(&changes)).unwrap();
        r.flush().unwrap();
        roots.push(root);
        contents.push(cur.clone());
    }
    let before = b.bytes();
    // Prune: keep points 0, 5 and 7.
    let kept = [0usize, 5, 7];
    let reader = MapReader::new(r.clone(), Arc::new(NodeCache::new(1 << 20)));
    let mut m = r.gc_marker().unwrap();
    let mut err = None;
    for &p in &kept {
        let mut data = Vec::new();
        reader
            .walk(
                &roots[p],
                &mut |h| match m.mark_first(h) {
                    Ok(first) => first,
                    Err(e) => {
                        err = Some(e);
                        false
                    }
                },
                &mut |h| data.push(*h),
            )
            .unwrap();
        for h in data {
            m.mark(&h).unwrap();
        }
    }
    assert!(err.is_none());
    let rep = r.collect(m, &GcOptions::default()).unwrap();
    assert_eq!(rep.missing_marks, 0);
    assert!(rep.freed_bytes > 0, "{rep:?}");
    assert!(b.bytes() < before, "{} -> {}", before, b.bytes());
    // Every kept point reads exact through a fresh repository and reader.
    let r2 = Arc::new(Repository::open(b.clone()).unwrap());
    let reader = MapReader::new(r2.clone(), Arc::new(NodeCache::new(1 << 20)));
    for &p in &kept {
        for (blk, seed) in &contents[p] {
            let h = reader.lookup(&roots[p], *blk).unwrap();
            assert_eq!(
                r2.get(BlobKind::Data, &h).unwrap(),
                block(*seed),
                "point {p}"
            );
        }
        assert_eq!(reader.lookup(&roots[p], 1).unwrap(), Hash::ZERO);
    }
}
