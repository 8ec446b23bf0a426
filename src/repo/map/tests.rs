//! Point maps against a simple model (a `BTreeMap` of non-hole blocks), and their costs
//! counted on a wrapper store.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use proptest::prelude::*;

use super::*;
use crate::repo::MemBlobStore;

/// A `MemBlobStore` that counts calls and bytes written.
#[derive(Default)]
struct Counting {
    inner: MemBlobStore,
    gets: AtomicU64,
    puts: AtomicU64,
    put_bytes: AtomicU64,
}

impl Counting {
    fn reset(&self) {
        self.gets.store(0, Relaxed);
        self.puts.store(0, Relaxed);
        self.put_bytes.store(0, Relaxed);
    }
    fn counts(&self) -> (u64, u64, u64) {
        (
            self.gets.load(Relaxed),
            self.puts.load(Relaxed),
            self.put_bytes.load(Relaxed),
        )
    }
}

impl BlobStore for Counting {
    fn put(&self, kind: BlobKind, data: &[u8]) -> Result<Hash> {
        self.puts.fetch_add(1, Relaxed);
        self.put_bytes.fetch_add(data.len() as u64, Relaxed);
        self.inner.put(kind, data)
    }
    fn get(&self, kind: BlobKind, hash: &Hash) -> Result<Vec<u8>> {
        self.gets.fetch_add(1, Relaxed);
        self.inner.get(kind, hash)
    }
    fn id_of(&self, data: &[u8]) -> Hash {
        self.inner.id_of(data)
    }
}

type Model = BTreeMap<u64, Hash>;

fn h(i: u64) -> Hash {
    Hash::of(&i.to_le_bytes())
}

fn apply(model: &mut Model, changes: &[(u64, Hash)]) {
    for &(b, x) in changes {
        if x.is_zero() {
            model.remove(&b);
        } else {
            model.insert(b, x);
        }
    }
}

fn reader<S: BlobStore>(store: Arc<S>, cache_bytes: usize) -> MapReader<S> {
    MapReader::new(store, Arc::new(NodeCache::new(cache_bytes)))
}

fn runs<S: BlobStore>(r: &MapReader<S>, m: &MapRoot, range: std::ops::Range<u64>) -> Model {
    r.data_runs(m, range).map(|x| x.unwrap()).collect()
}

/// Everything a reader can say about `m` equals `model`.
fn check<S: BlobStore>(r: &MapReader<S>, m: &MapRoot, model: &Model, probes: &[u64]) {
    assert_eq!(&runs(r, m, 0..m.nblocks), model);
    for &p in probes.iter().filter(|&&p| p < m.nblocks) {
        let want = model.get(&p).copied().unwrap_or(Hash::ZERO);
        assert_eq!(r.lookup(m, p).unwrap(), want, "block {p}");
        let sub: Model = model.range(p..p + 3000).map(|(a, b)| (*a, *b)).collect();
        assert_eq!(runs(r, m, p..p + 3000), sub, "runs from {p}");
        assert_eq!(
            r.next_data(m, p).unwrap(),
            model.range(p..).next().map(|(b, _)| *b)
        );
        let mut hole = p;
        while model.contains_key(&hole) {
            hole += 1;
        }
        assert_eq!(r.next_hole(m, p).unwrap(), hole.min(m.nblocks));
    }
}

fn model_diff(a: &Model, b: &Model) -> Vec<(u64, Hash, Hash)> {
    let keys: BTreeSet<u64> = a.keys().chain(b.keys()).copied().collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (
                a.get(&k).copied().unwrap_or(Hash::ZERO),
                b.get(&k).copied().unwrap_or(Hash::ZERO),
            );
            (x != y).then_some((k, x, y))
        })
        .collect()
}

fn nblocks_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1u64),
        Just(1023),
        Just(1024),
        Just(1025),
        1u64..5000,
        Just(1024 * 1024 + 3),
        Just(1 << 24),
    ]
}

/// Blocks clustered around a few places (start, middle, end, anywhere) so that nodes fill
/// up, empty out and sit at the disk's ragged end.
fn changes_strategy(nblocks: u64, max: usize) -> impl Strategy<Value = Vec<(u64, Hash)>> {
    let anchor = prop_oneof![Just(0u64), Just(nblocks / 2), Just(nblocks - 1), 0..nblocks];
    let hash = prop_oneof![1 => Just(Hash::ZERO), 3 => (0u64..40).prop_map(h)];
    prop::collection::vec((anchor, 0u64..2100, hash), 0..max).prop_map(move |v| {
        let m: BTreeMap<u64, Hash> = v
            .into_iter()
            .map(|(a, o, x)| ((a + o) % nblocks, x))
            .collect();
        m.into_iter().collect()
    })
}

/// A disk size, the change sets of a chain (the first builds the base), probe blocks.
type Case = (u64, Vec<Vec<(u64, Hash)>>, Vec<u64>);

fn case_strategy() -> impl Strategy<Value = Case> {
    nblocks_strategy().prop_flat_map(|n| {
        (
            Just(n),
            prop::collection::vec(changes_strategy(n, 40), 50..60),
            prop::collection::vec(0..n, 8),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random builds and chains of 50+ updates: every version reads as its model, diffs of
    /// neighbours are the model's, a map's root depends only on its contents, the walk of all
    /// versions reaches every stored node once and every live block hash.
    #[test]
    fn maps_match_the_model((nblocks, steps, probes) in case_strategy()) {
        let store = Arc::new(MemBlobStore::new());
        // A small cache, so that eviction happens during the test.
        let r = reader(store.clone(), 200 << 10);
        let mut model = Model::new();
        apply(&mut model, &steps[0]);
        let first = build(&*store, nblocks, model.iter().map(|(a, b)| (*a, *b))).unwrap();
        prop_assert_eq!(update(&*store, &MapRoot::empty(nblocks), steps[0].clone()).unwrap(), first);
        check(&r, &first, &model, &probes);
        let mut versions = vec![(first, model.clone())];
        for (i, changes) in steps[1..].iter().enumerate() {
            let (prev, prev_model) = versions.last().unwrap().clone();
            // Both ways of updating: straight from the store and through the cache.
            let next = if i % 2 == 0 {
                update(&*store, &prev, changes.iter().copied()).unwrap()
            } else {
                r.update(&prev, changes.iter().copied()).unwrap()
            };
            apply(&mut model, changes);
            let probes: Vec<u64> = probes.iter().copied()
                .chain(changes.iter().map(|c| c.0)).collect();
            check(&r, &next, &model, &probes);
            // Canonical: the same contents built from scratch give the same root.
            let built = build(&*store, nblocks, model.iter().map(|(a, b)| (*a, *b))).unwrap();
            prop_assert_eq!(built, next);
            let mut d = Vec::new();
            r.diff(&prev, &next, |b, x, y| { d.push((b, x, y)); Ok(()) }).unwrap();
            prop_assert_eq!(d, model_diff(&prev_model, &model));
            versions.push((next, model.clone()));
        }
        // Every version is still exact at the end of the chain.
        for (m, model) in &versions {
            for &p in &probes {
                prop_assert_eq!(r.lookup(m, p).unwrap(), model.get(&p).copied().unwrap_or(Hash::ZERO));
            }
        }
        let (a, ma) = &versions[0];
        let (b, mb) = versions.last().unwrap();
        let mut d = Vec::new();
        r.diff(a, b, |b, x, y| { d.push((b, x, y)); Ok(()) }).unwrap();
        prop_assert_eq!(d, model_diff(ma, mb));
        // The mark phase over all versions: each node read once, and together the nodes
        // are every stored node (nothing else lives in this store).
        let mut seen = HashSet::new();
        let mut data = HashSet::new();
        for (m, _) in &versions {
            r.walk(m, &mut |x| seen.insert(*x), &mut |x| { data.insert(*x); }).unwrap();
        }
        prop_assert_eq!(seen.len(), store.len());
        let live: HashSet<Hash> = versions.iter().flat_map(|(_, m)| m.values().copied()).collect();
        prop_assert_eq!(data, live);
        prop_assert!(r.cache().bytes() <= r.cache().capacity());
    }
}

/// A 1 TiB disk of 64 KiB blocks with 64 MiB of data: one full leaf at the start and one
/// block every 2^16 blocks elsewhere.
fn big_base(store: &Counting) -> MapRoot {
    let n = 1u64 << 24;
    let dense = (0..1024).map(|b| (b, h(b)));
    let scattered = (1..256u64).map(|i| (i << 16, h(i << 16)));
    build(store, n, dense.chain(scattered)).unwrap()
}

#[test]
fn update_cost_follows_the_change_not_the_disk() {
    let store = Counting::default();
    let base = big_base(&store);
    assert_eq!(base.levels(), 3);

    store.reset();
    let same = update(&store, &base, []).unwrap();
    assert_eq!(same, base);
    assert_eq!(
        store.counts(),
        (0, 0, 0),
        "an empty incremental touches nothing"
    );

    // One block changed inside the full leaf: root, level-1 node and leaf rewritten.
    store.reset();
    let one = update(&store, &base, [(500, h(1 << 40))]).unwrap();
    let (gets, puts, bytes) = store.counts();
    eprintln!(
        "1 change in a full leaf of a 2^24-block map: {gets} gets, {puts} puts, {bytes} bytes"
    );
    assert_eq!((gets, puts), (3, 3));
    assert!(bytes < 40_000, "{bytes}");
    assert_ne!(one.root, base.root);

    // One block written in a hole far from any data: two nodes read, the new leaf is tiny.
    store.reset();
    update(&store, &base, [((1 << 24) - 7, h(7))]).unwrap();
    let (gets, puts, bytes) = store.counts();
    eprintln!("1 change in a hole of a 2^24-block map: {gets} gets, {puts} puts, {bytes} bytes");
    assert_eq!((gets, puts), (2, 3));
    assert!(bytes < 2_000, "{bytes}");

    // Writing back what was there: nodes read, nothing written.
    store.reset();
    let back = update(&store, &base, [(500, h(500))]).unwrap();
    assert_eq!(back, base);
    assert_eq!(store.counts().1, 0);

    // A whole leaf zeroed: the leaf collapses into a zero entry of its parent.
    store.reset();
    let zeroed = update(&store, &base, (0..1024).map(|b| (b, Hash::ZERO))).unwrap();
    assert_eq!(
        store.counts().1,
        2,
        "no leaf written, parent and root rewritten"
    );
    let r = MapReader::new(Arc::new(store), Arc::new(NodeCache::new(1 << 20)));
    assert_eq!(r.next_data(&zeroed, 0).unwrap(), Some(1 << 16));
    // Everything removed: the map is empty again, nothing stored.
    let empty = update(
        &**r.store(),
        &zeroed,
        (1..256u64).map(|i| (i << 16, Hash::ZERO)),
    )
    .unwrap();
    assert_eq!(empty, MapRoot::empty(1 << 24));
}

#[test]
fn reads_are_bounded_whatever_the_chain_depth() {
    let store = Arc::new(Counting::default());
    let mut m = big_base(&store);
    for i in 0..100u64 {
        m = update(&*store, &m, [(i * 977 % (1 << 24), h(i + 10_000))]).unwrap();
    }
    let r = reader(store.clone(), 8 << 20);
    store.reset();
    assert_eq!(r.lookup(&m, 1023).unwrap(), h(1023));
    assert_eq!(
        store.counts().0,
        3,
        "a lookup reads at most one node per level"
    );
    store.reset();
    assert_eq!(r.lookup(&m, 1022).unwrap(), h(1022));
    assert_eq!(
        store.counts().0,
        0,
        "the second lookup in the same leaf is cached"
    );

    // data_runs skips zero subtrees: first and last leaf only.
    let ends = build(&*store, 1 << 24, [(3, h(3)), ((1 << 24) - 1, h(4))]).unwrap();
    let r = reader(store.clone(), 8 << 20);
    store.reset();
    assert_eq!(runs(&r, &ends, 0..1 << 24).len(), 2);
    assert_eq!(store.counts().0, 5, "root, two level-1 nodes, two leaves");

    // diff reads only the differing paths.
    let base = big_base(&store);
    let one = update(&*store, &base, [(500, h(1 << 40))]).unwrap();
    let r = reader(store.clone(), 8 << 20);
    store.reset();
    let mut d = Vec::new();
    r.diff(&base, &one, |b, _, _| {
        d.push(b);
        Ok(())
    })
    .unwrap();
    assert_eq!(d, vec![500]);
    assert_eq!(store.counts().0, 6);

    // walk: a second map sharing all but one path reads only that path.
    let mut seen = HashSet::new();
    let mut data = 0;
    store.reset();
    r.walk(&base, &mut |x| seen.insert(*x), &mut |_| data += 1)
        .unwrap();
    let first = store.counts().0;
    store.reset();
    r.walk(&one, &mut |x| seen.insert(*x), &mut |_| data += 1)
        .unwrap();
    assert!(store.counts().0 <= 3, "shared subtrees are not read again");
    assert!(first >= 3 && data == 1024 + 255 + 1024);
}

#[test]
fn cache_stays_within_its_capacity() {
    let store = Arc::new(MemBlobStore::new());
    let n = 64 * 1024;
    let m = build(&*store, n, (0..n).map(|b| (b, h(b)))).unwrap();
    let cap = 100 << 10; // three full leaves
    let r = reader(store, cap);
    for b in (0..n).step_by(1000) {
        assert_eq!(r.lookup(&m, b).unwrap(), h(b));
        assert!(r.cache().bytes() <= cap);
    }
    assert!(r.cache().len() >= 2);
    // A cache too small for a node still reads correctly, it just keeps nothing.
    let tiny = reader(r.store().clone(), 100);
    assert_eq!(tiny.lookup(&m, 5).unwrap(), h(5));
    assert!(tiny.cache().is_empty());
}

#[test]
fn damaged_nodes_are_errors_never_wrong_hashes() {
    let store = Arc::new(MemBlobStore::new());
    let n = 1 << 24;
    let m = build(&*store, n, [(5, h(5)), (1 << 20, h(6))]).unwrap();
    // Find the leaf under block 5 through the tree itself.
    let root = node::decode(&store.get(BlobKind::Map, &m.root).unwrap()).unwrap();
    let l1 = node::decode(&store.get(BlobKind::Map, &root.get(0)).unwrap()).unwrap();
    let leaf = l1.get(0);
    assert!(store.corrupt(&leaf));
    let r = reader(store.clone(), 1 << 20);
    let is_eio = |e: Error| assert_eq!(e.errno(), libc::EIO, "{e}");
    is_eio(r.lookup(&m, 5).unwrap_err());
    assert_eq!(
        r.lookup(&m, 1 << 20).unwrap(),
        h(6),
        "other subtrees still read"
    );
    is_eio(r.data_runs(&m, 0..n).find_map(|x| x.err()).unwrap());
    is_eio(update(&*store, &m, [(6, h(7))]).unwrap_err());
    let empty = MapRoot::empty(n);
    is_eio(r.diff(&m, &empty, |_, _, _| Ok(())).unwrap_err());
    let mut seen = HashSet::new();
    is_eio(
        r.walk(&m, &mut |x| seen.insert(*x), &mut |_| ())
            .unwrap_err(),
    );

    // A valid node in the wrong place: a leaf given as the root of a 3-level map.
    let leaf = store
        .put(BlobKind::Map, &node::encode(0, &[h(1)]).unwrap())
        .unwrap();
    is_eio(
        r.lookup(
            &MapRoot {
                root: leaf,
                nblocks: n,
            },
            0,
        )
        .unwrap_err(),
    );
    // Too many entries for the disk's end: a full leaf as the map of a 10-block disk.
    let full: Vec<Hash> = (0..1024).map(h).collect();
    let full = store
        .put(BlobKind::Map, &node::encode(0, &full).unwrap())
        .unwrap();
    let small = MapRoot {
        root: full,
        nblocks: 10,
    };
    is_eio(r.lookup(&small, 0).unwrap_err());
    // Bytes that are not a node at all.
    let junk = store.put(BlobKind::Map, b"not a map node").unwrap();
    is_eio(
        r.lookup(
            &MapRoot {
                root: junk,
                nblocks: 1,
            },
            0,
        )
        .unwrap_err(),
    );
}

#[test]
fn misuse_is_refused() {
    let store = MemBlobStore::new();
    let mut b = MapBuilder::new(&store, 100);
    b.push(5, h(1)).unwrap();
    assert!(b.push(5, h(2)).is_err());
    assert!(b.push(100, h(2)).is_err());
    let m = MapRoot::empty(100);
    assert!(update(&store, &m, [(3, h(1)), (2, h(1))]).is_err());
    assert!(update(&store, &m, [(100, h(1))]).is_err());
    let r = reader(Arc::new(store), 1 << 20);
    assert!(r.lookup(&m, 100).is_err());
    assert!(
        r.diff(&m, &MapRoot::empty(1 << 20), |_, _, _| Ok(()))
            .is_err()
    );
}

#[test]
fn empty_and_tiny_disks() {
    let store = MemBlobStore::new();
    let zero = build(&store, 0, []).unwrap();
    assert_eq!(zero, MapRoot::empty(0));
    assert_eq!(update(&store, &zero, []).unwrap(), zero);
    let one = build(&store, 1, [(0, h(9))]).unwrap();
    assert_eq!(one.levels(), 1);
    let r = reader(Arc::new(store), 1 << 20);
    assert_eq!(r.lookup(&one, 0).unwrap(), h(9));
    assert_eq!(r.next_hole(&one, 0).unwrap(), 1);
    assert_eq!(runs(&r, &zero, 0..10), Model::new());
    assert_eq!(
        MapRoot::empty(u64::MAX).root_level(),
        6,
        "the largest disk fits the format"
    );
}

#[test]
fn map_root_round_trips_through_json() {
    let m = MapRoot {
        root: h(3),
        nblocks: 1 << 24,
    };
    let j = serde_json::to_string(&m).unwrap();
    assert!(j.contains(&h(3).to_hex()), "{j}");
    assert_eq!(serde_json::from_str::<MapRoot>(&j).unwrap(), m);
    assert!(serde_json::from_str::<MapRoot>(r#"{"root":"00","nblocks":1}"#).is_err());
}

/// The most one changed block can cost on a 1 TiB disk: a full leaf under a full level-1
/// node under a root with all 16 entries (64 GiB of data under that level-1 node).
#[test]
fn one_change_worst_case_on_a_full_subtree() {
    let store = Counting::default();
    let n = 1u64 << 24;
    let full = (0..1u64 << 20).map(|b| (b, h(b)));
    let others = (1..16u64).map(|i| (i << 20, h(i << 20)));
    let base = build(&store, n, full.chain(others)).unwrap();
    store.reset();
    update(&store, &base, [(12345, h(1 << 40))]).unwrap();
    let (gets, puts, bytes) = store.counts();
    eprintln!("1 change under a full level-1 node: {gets} gets, {puts} puts, {bytes} bytes");
    assert_eq!((gets, puts), (3, 3));
    let full_node = (node::HEADER_LEN + FANOUT * 32) as u64;
    assert_eq!(bytes, 2 * full_node + (node::HEADER_LEN + 16 * 32) as u64);
}
