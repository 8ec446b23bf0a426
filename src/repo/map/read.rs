//! Reading point maps through a byte-bounded node cache shared by every point a daemon
//! serves: lookups, data runs (SEEK_DATA/SEEK_HOLE, restore, sparse copies), differences
//! between two maps, and the once-per-node walk of garbage collection's mark phase.

use std::ops::Range;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use super::node::Node;
use super::{MapRoot, check_place, entry_span, fetch, index, misuse, update_with};
use crate::error::Result;
use crate::repo::{BlobStore, Hash};

/// Decoded map nodes by hash, bounded in bytes (a full leaf is 32 KiB). Shared by all maps
/// of all points: a node shared by many points is cached once. Content addressing makes
/// entries immutable, so there is nothing to invalidate.
///
/// One coarse mutex: it is held only for a hash-map probe or insert, never during the
/// store read that fills a miss (two threads missing the same node both read it; the second
/// insert is a no-op), so it does not serialise I/O.
pub struct NodeCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

struct CacheInner {
    lru: LruCache<Hash, Arc<Node>>,
    bytes: usize,
}

impl NodeCache {
    /// A cache holding at most `capacity_bytes` of decoded nodes.
    pub fn new(capacity_bytes: usize) -> NodeCache {
        NodeCache {
            capacity: capacity_bytes,
            inner: Mutex::new(CacheInner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of the cached nodes now (never above `capacity`).
    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    /// Nodes cached now.
    pub fn len(&self) -> usize {
        self.inner.lock().lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, h: &Hash) -> Option<Arc<Node>> {
        self.inner.lock().lru.get(h).cloned()
    }

    fn insert(&self, h: Hash, n: Arc<Node>) {
        let size = n.mem_size();
        if size > self.capacity {
            return;
        }
        let mut g = self.inner.lock();
        if g.lru.contains(&h) {
            return;
        }
        while g.bytes + size > self.capacity {
            match g.lru.pop_lru() {
                Some((_, old)) => g.bytes -= old.mem_size(),
                None => break,
            }
        }
        g.bytes += size;
        g.lru.put(h, n);
    }
}

impl Default for NodeCache {
    /// 64 MiB: about 2000 full leaves, the maps of 128 GiB of 64 KiB blocks.
    fn default() -> Self {
        NodeCache::new(64 << 20)
    }
}

/// Reads maps of one blob store through a shared `NodeCache`.
pub struct MapReader<S: BlobStore + ?Sized> {
    store: Arc<S>,
    cache: Arc<NodeCache>,
}

impl<S: BlobStore + ?Sized> Clone for MapReader<S> {
    fn clone(&self) -> Self {
        MapReader {
            store: self.store.clone(),
            cache: self.cache.clone(),
        }
    }
}

impl<S: BlobStore + ?Sized> MapReader<S> {
    pub fn new(store: Arc<S>, cache: Arc<NodeCache>) -> Self {
        MapReader { store, cache }
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub fn cache(&self) -> &Arc<NodeCache> {
        &self.cache
    }

    /// Node `hash` at `level` starting at block `start` of a disk of `nblocks`, from the
    /// cache or the store; its place is checked on every use, since the same node may be
    /// referenced (wrongly) from another place.
    fn node(&self, hash: &Hash, level: u8, start: u64, nblocks: u64) -> Result<Arc<Node>> {
        if let Some(n) = self.cache.get(hash) {
            check_place(hash, &n, level, start, nblocks)?;
            return Ok(n);
        }
        let n = Arc::new(fetch(&*self.store, hash, level, start, nblocks)?);
        self.cache.insert(*hash, n.clone());
        Ok(n)
    }

    /// `update` of `base`, reading its nodes through the cache: a daemon making incrementals
    /// of a disk whose last point it serves finds the paths it rewrites already cached.
    ///
    /// # Errors
    /// As `update`.
    pub fn update(
        &self,
        base: &MapRoot,
        changes: impl IntoIterator<Item = (u64, Hash)>,
    ) -> Result<MapRoot> {
        let load = |h: &Hash, level: u8, start: u64| {
            self.node(h, level, start, base.nblocks)
                .map(|n| n.entries.to_vec())
        };
        update_with(&*self.store, base, changes, &load)
    }

    /// The hash of `block`'s data, `Hash::ZERO` for a hole: at most `map.levels()` node reads.
    ///
    /// # Errors
    /// `Error::Internal` for a block past the end; `Error::Format` for a damaged node.
    pub fn lookup(&self, map: &MapRoot, block: u64) -> Result<Hash> {
        if block >= map.nblocks {
            return Err(misuse(format!(
                "lookup of block {block} in a map of {} blocks",
                map.nblocks
            )));
        }
        let mut h = map.root;
        let mut level = map.root_level();
        let mut start = 0u64;
        loop {
            if h.is_zero() {
                return Ok(Hash::ZERO);
            }
            let n = self.node(&h, level, start, map.nblocks)?;
            let i = index(level, block);
            h = n.get(i);
            if level == 0 {
                return Ok(h);
            }
            start += i as u64 * entry_span(level);
            level -= 1;
        }
    }

    /// The non-hole blocks of `range` (clipped to the disk) with their hashes, in block
    /// order. Zero subtrees are skipped without reading anything; memory is one node per
    /// level.
    pub fn data_runs(&self, map: &MapRoot, range: Range<u64>) -> DataRuns<'_, S> {
        let end = range.end.min(map.nblocks);
        DataRuns {
            reader: self,
            nblocks: map.nblocks,
            root: (!map.root.is_zero() && range.start < end).then_some(map.root),
            root_level: map.root_level(),
            from: range.start,
            end,
            stack: Vec::new(),
        }
    }

    /// The first non-hole block at or after `from`, if any (SEEK_DATA).
    ///
    /// # Errors
    /// `Error::Format` for a damaged node.
    pub fn next_data(&self, map: &MapRoot, from: u64) -> Result<Option<u64>> {
        self.data_runs(map, from..map.nblocks)
            .next()
            .transpose()
            .map(|o| o.map(|(b, _)| b))
    }

    /// The first hole at or after `from`, `map.nblocks` if none (SEEK_HOLE's virtual hole at
    /// the end); `from` itself when it is at or past the end.
    ///
    /// # Errors
    /// `Error::Format` for a damaged node.
    pub fn next_hole(&self, map: &MapRoot, from: u64) -> Result<u64> {
        let mut expect = from;
        for r in self.data_runs(map, from..map.nblocks) {
            let (b, _) = r?;
            if b != expect {
                break;
            }
            expect = b + 1;
        }
        Ok(expect)
    }

    /// Calls `f(block, hash in a, hash in b)` for every block whose hash differs between
    /// `a` and `b`, in block order, skipping every subtree whose hash is the same in both
    /// without reading it: the cost follows the difference, not the disk.
    ///
    /// # Errors
    /// `Error::Internal` for maps of different shape (root levels); `Error::Format` for a
    /// damaged node; whatever `f` returns.
    pub fn diff(
        &self,
        a: &MapRoot,
        b: &MapRoot,
        mut f: impl FnMut(u64, Hash, Hash) -> Result<()>,
    ) -> Result<()> {
        if a.root_level() != b.root_level() {
            return Err(misuse(format!(
                "diff of maps of {} and {} blocks (different depths)",
                a.nblocks, b.nblocks
            )));
        }
        self.diff_node((a, a.root), (b, b.root), a.root_level(), 0, &mut f)
    }

    fn diff_node(
        &self,
        (a, ha): (&MapRoot, Hash),
        (b, hb): (&MapRoot, Hash),
        level: u8,
        start: u64,
        f: &mut impl FnMut(u64, Hash, Hash) -> Result<()>,
    ) -> Result<()> {
        if ha == hb {
            return Ok(());
        }
        let load = |m: &MapRoot, h: Hash| -> Result<Option<Arc<Node>>> {
            if h.is_zero() {
                Ok(None)
            } else {
                self.node(&h, level, start, m.nblocks).map(Some)
            }
        };
        let (na, nb) = (load(a, ha)?, load(b, hb)?);
        let len = |n: &Option<Arc<Node>>| n.as_ref().map_or(0, |n| n.entries.len());
        let get = |n: &Option<Arc<Node>>, i| n.as_ref().map_or(Hash::ZERO, |n| n.get(i));
        for i in 0..len(&na).max(len(&nb)) {
            let (ca, cb) = (get(&na, i), get(&nb, i));
            if ca == cb {
                continue;
            }
            let child_start = start + i as u64 * entry_span(level);
            if level == 0 {
                f(child_start, ca, cb)?;
            } else {
                self.diff_node((a, ca), (b, cb), level - 1, child_start, f)?;
            }
        }
        Ok(())
    }

    /// Visit the nodes of `map` for garbage collection's mark: `seen(node hash)` is asked
    /// before each node and returns true on its first visit; only then is the node read and
    /// its children visited, and for a leaf `on_data` called with each non-zero block hash.
    /// Called over many maps with one `seen`, subtrees shared between points are read once.
    /// Nodes are read past the cache (a full walk would evict what mounts are using), though
    /// one already cached is used.
    ///
    /// # Errors
    /// `Error::Format` for a damaged node (a mark that cannot be completed must not lead to a
    /// sweep).
    pub fn walk(
        &self,
        map: &MapRoot,
        seen: &mut impl FnMut(&Hash) -> bool,
        on_data: &mut impl FnMut(&Hash),
    ) -> Result<()> {
        self.walk_node(map, map.root, map.root_level(), 0, seen, on_data)
    }

    fn walk_node(
        &self,
        map: &MapRoot,
        h: Hash,
        level: u8,
        start: u64,
        seen: &mut impl FnMut(&Hash) -> bool,
        on_data: &mut impl FnMut(&Hash),
    ) -> Result<()> {
        if h.is_zero() || !seen(&h) {
            return Ok(());
        }
        let n = match self.cache.get(&h) {
            Some(n) => {
                check_place(&h, &n, level, start, map.nblocks)?;
                n
            }
            None => Arc::new(fetch(&*self.store, &h, level, start, map.nblocks)?),
        };
        for (i, c) in n.entries.iter().enumerate() {
            if c.is_zero() {
                continue;
            }
            if level == 0 {
                on_data(c);
            } else {
                let child_start = start + i as u64 * entry_span(level);
                self.walk_node(map, *c, level - 1, child_start, seen, on_data)?;
            }
        }
        Ok(())
    }
}

/// Iterator of `MapReader::data_runs`: `(block, hash)` of each non-hole block.
pub struct DataRuns<'r, S: BlobStore + ?Sized> {
    reader: &'r MapReader<S>,
    nblocks: u64,
    /// The root, until the first `next` reads it.
    root: Option<Hash>,
    root_level: u8,
    from: u64,
    end: u64,
    stack: Vec<Frame>,
}

struct Frame {
    node: Arc<Node>,
    level: u8,
    start: u64,
    /// Next entry to visit.
    i: usize,
}

impl<S: BlobStore + ?Sized> DataRuns<'_, S> {
    fn push(&mut self, h: &Hash, level: u8, start: u64) -> Result<()> {
        let node = self.reader.node(h, level, start, self.nblocks)?;
        // Only the nodes on the path to `from` start mid-way.
        let i = if start <= self.from {
            index(level, self.from)
        } else {
            0
        };
        self.stack.push(Frame {
            node,
            level,
            start,
            i,
        });
        Ok(())
    }

    fn step(&mut self) -> Result<Option<(u64, Hash)>> {
        if let Some(root) = self.root.take() {
            self.push(&root, self.root_level, 0)?;
        }
        while let Some(f) = self.stack.last_mut() {
            let child_start = f.start + f.i as u64 * entry_span(f.level);
            if f.i >= f.node.entries.len() || child_start >= self.end {
                self.stack.pop();
                continue;
            }
            let (h, level) = (f.node.entries[f.i], f.level);
            f.i += 1;
            if h.is_zero() {
                continue;
            }
            if level == 0 {
                return Ok(Some((child_start, h)));
            }
            self.push(&h, level - 1, child_start)?;
        }
        Ok(None)
    }
}

impl<S: BlobStore + ?Sized> Iterator for DataRuns<'_, S> {
    type Item = Result<(u64, Hash)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(o) => o.map(Ok),
            Err(e) => {
                // Stop after an error: the position in the tree is no longer known.
                self.stack.clear();
                self.root = None;
                Some(Err(e))
            }
        }
    }
}
