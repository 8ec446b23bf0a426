//! Point maps (store format v2): for one disk of one point, block number -> hash of the
//! stored block, `Hash::ZERO` for a hole (all zeros, nothing stored).
//!
//! A map is a persistent radix tree of fixed shape whose nodes are `BlobKind::Map` blobs:
//! `FANOUT` (1024) entries a node, leaves (level 0) hold block hashes, a node of level `l`
//! covers `FANOUT^(l+1)` blocks, and the root's level is the smallest that covers the disk
//! (a 1 TiB disk of 64 KiB blocks, 2^24 blocks: 16384 leaves under 16 level-1 nodes under
//! one root). Invariants:
//! - **Canonical.** A node whose entries are all zero is never stored: its parent holds
//!   `Hash::ZERO`. A node's bytes depend only on its entries (`node`). So a map's root hash
//!   is a function of its contents alone: the same contents built or updated by any path give
//!   the same root, an unchanged incremental writes nothing, holes cost nothing.
//! - **Structural sharing.** `update` rewrites only the nodes on the paths from the root to
//!   changed blocks; every other subtree is the base's, shared by hash, never read.
//! - **Bounded steps.** Any block is found in at most `levels()` node reads (3 for 1 TiB)
//!   whatever the number of points before it.
//! - **Bounded memory.** Building and updating hold one node per level; readers go through a
//!   byte-bounded node cache (`NodeCache`) shared by every point a daemon serves.
//! - **Damage is an error.** A node that does not decode, or whose level or entry count does
//!   not fit its place in the tree, is `Error::Format` (EIO at the mount), never wrong bytes.

pub mod node;
mod read;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use node::{FANOUT, Node};
pub use read::{DataRuns, MapReader, NodeCache};

use crate::error::{Error, Result};
use crate::repo::{BlobKind, BlobStore, Hash, damaged};

/// The map of one disk of one point: what a point record keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRoot {
    /// Hash of the root node; `Hash::ZERO` when every block is a hole.
    #[serde(with = "hex_hash")]
    pub root: Hash,
    /// Blocks of the disk (the last one may be short on disk; the map does not care).
    pub nblocks: u64,
}

impl MapRoot {
    /// The map of a disk of `nblocks` holes.
    pub fn empty(nblocks: u64) -> MapRoot {
        MapRoot {
            root: Hash::ZERO,
            nblocks,
        }
    }

    /// Level of the root node: the smallest `L` with `FANOUT^(L+1) >= nblocks`.
    pub fn root_level(&self) -> u8 {
        root_level(self.nblocks)
    }

    /// Node reads for one lookup at most: `root_level() + 1`.
    pub fn levels(&self) -> u32 {
        self.root_level() as u32 + 1
    }
}

fn root_level(nblocks: u64) -> u8 {
    let mut l = 0u8;
    while span(l) < nblocks as u128 {
        l += 1;
    }
    l
}

/// Blocks covered by a node of `level`.
fn span(level: u8) -> u128 {
    1u128 << (node::FANOUT_BITS * (level as u32 + 1))
}

/// Blocks covered by one entry of a node of `level`.
fn entry_span(level: u8) -> u64 {
    1u64 << (node::FANOUT_BITS * level as u32)
}

/// Entry index of `block` in the node of `level` that covers it.
fn index(level: u8, block: u64) -> usize {
    ((block >> (node::FANOUT_BITS * level as u32)) as usize) & (FANOUT - 1)
}

/// Entries a node of `level` starting at `start` may have in a disk of `nblocks`: fewer than
/// `FANOUT` only in the last node of each level.
fn max_entries(level: u8, start: u64, nblocks: u64) -> usize {
    let left = nblocks.saturating_sub(start);
    (left.div_ceil(entry_span(level)) as usize).min(FANOUT)
}

/// Check that a decoded node fits where it was found.
fn check_place(hash: &Hash, n: &Node, level: u8, start: u64, nblocks: u64) -> Result<()> {
    if n.level != level {
        return Err(damaged(
            hash,
            format!("map node of level {} found at level {level}", n.level),
        ));
    }
    let max = max_entries(level, start, nblocks);
    if n.entries.len() > max {
        return Err(damaged(
            hash,
            format!(
                "map node at block {start} level {level} has {} entries, at most {max} fit the disk",
                n.entries.len()
            ),
        ));
    }
    Ok(())
}

/// Read and decode one node straight from the store (no cache), checked for its place.
fn fetch<S: BlobStore + ?Sized>(
    store: &S,
    hash: &Hash,
    level: u8,
    start: u64,
    nblocks: u64,
) -> Result<Node> {
    let bytes = store.get(BlobKind::Map, hash)?;
    let n = node::decode(&bytes).map_err(|e| damaged(hash, e.to_string()))?;
    check_place(hash, &n, level, start, nblocks)?;
    Ok(n)
}

/// Encode and store a node; `Hash::ZERO` for an all-zero node, which is never stored.
/// `unchanged` is the hash the node had before: when the new bytes hash to it, nothing is
/// written (a "change" that restored the same contents costs no put).
fn store_node<S: BlobStore + ?Sized>(
    store: &S,
    level: u8,
    entries: &[Hash],
    unchanged: Hash,
) -> Result<Hash> {
    match node::encode(level, entries) {
        None => Ok(Hash::ZERO),
        Some(bytes) => {
            // The store's own id (keyed when encrypted), or `unchanged` would never match.
            let h = store.id_of(&bytes);
            if h == unchanged {
                return Ok(h);
            }
            store.put(BlobKind::Map, &bytes)
        }
    }
}

fn misuse(why: String) -> Error {
    Error::Internal(format!("point map: {why}"))
}

/// Builds the map of a whole disk from its block hashes in increasing block order, holding
/// one node per level (never the whole map). Blocks not pushed are holes.
pub struct MapBuilder<'s, S: BlobStore + ?Sized> {
    store: &'s S,
    nblocks: u64,
    /// Per level: the index (at that level) of the node being filled and its entries.
    open: Vec<(u64, Vec<Hash>)>,
    next: u64,
}

impl<'s, S: BlobStore + ?Sized> MapBuilder<'s, S> {
    pub fn new(store: &'s S, nblocks: u64) -> Self {
        let levels = root_level(nblocks) as usize + 1;
        MapBuilder {
            store,
            nblocks,
            open: (0..levels).map(|_| (0, Vec::new())).collect(),
            next: 0,
        }
    }

    /// Set `block`'s hash (`Hash::ZERO`: a hole, same as not pushing it).
    ///
    /// # Errors
    /// `Error::Internal` for a block not after the previous one or past the disk's end;
    /// storage errors while writing finished nodes.
    pub fn push(&mut self, block: u64, hash: Hash) -> Result<()> {
        if block < self.next || block >= self.nblocks {
            return Err(misuse(format!(
                "block {block} pushed out of order or past the end (next {}, {} blocks)",
                self.next, self.nblocks
            )));
        }
        self.next = block + 1;
        if !hash.is_zero() {
            self.set(0, block, hash)?;
        }
        Ok(())
    }

    /// Set entry `pos` (a block number at level 0, a child node's index above) at `level`,
    /// first closing the open node there if `pos` lies in a later one.
    fn set(&mut self, level: usize, pos: u64, hash: Hash) -> Result<()> {
        let node_idx = pos >> node::FANOUT_BITS;
        if self.open[level].0 != node_idx {
            self.close(level)?;
            self.open[level].0 = node_idx;
        }
        let entries = &mut self.open[level].1;
        let i = pos as usize & (FANOUT - 1);
        if entries.len() <= i {
            entries.resize(i + 1, Hash::ZERO);
        }
        entries[i] = hash;
        Ok(())
    }

    /// Store the open node of `level` (if any entry is set) and enter it in its parent.
    fn close(&mut self, level: usize) -> Result<Hash> {
        let (idx, mut entries) = std::mem::take(&mut self.open[level]);
        let h = store_node(self.store, level as u8, &entries, Hash::ZERO)?;
        entries.clear();
        self.open[level].1 = entries; // keep the allocation for the next node
        if !h.is_zero() && level + 1 < self.open.len() {
            self.set(level + 1, idx, h)?;
        }
        Ok(h)
    }

    /// Store the last nodes and return the map.
    ///
    /// # Errors
    /// Storage errors.
    pub fn finish(mut self) -> Result<MapRoot> {
        let top = self.open.len() - 1;
        for level in 0..top {
            self.close(level)?;
        }
        let root = self.close(top)?;
        Ok(MapRoot {
            root,
            nblocks: self.nblocks,
        })
    }
}

/// Build a whole map from sorted `(block, hash)` pairs (see `MapBuilder`).
///
/// # Errors
/// As `MapBuilder::push` and `finish`.
pub fn build<S: BlobStore + ?Sized>(
    store: &S,
    nblocks: u64,
    blocks: impl IntoIterator<Item = (u64, Hash)>,
) -> Result<MapRoot> {
    let mut b = MapBuilder::new(store, nblocks);
    for (block, hash) in blocks {
        b.push(block, hash)?;
    }
    b.finish()
}

/// The map of `base` with `changes` applied: `(block, hash)` pairs in strictly increasing
/// block order, `Hash::ZERO` for a block that became a hole. Copy-on-write: reads and writes
/// only the nodes on the paths to changed blocks (at most `levels()` of each per change,
/// shared between changes under one node); with no changes it reads and writes nothing and
/// returns `base`. Nodes left all-zero disappear (their parent holds `Hash::ZERO`).
///
/// # Errors
/// `Error::Internal` for unsorted changes or a block past the end; `Error::Format` for a
/// damaged base node; storage errors.
pub fn update<S: BlobStore + ?Sized>(
    store: &S,
    base: &MapRoot,
    changes: impl IntoIterator<Item = (u64, Hash)>,
) -> Result<MapRoot> {
    let nblocks = base.nblocks;
    let load = |h: &Hash, level: u8, start: u64| {
        fetch(store, h, level, start, nblocks).map(|n| n.entries.into_vec())
    };
    update_with(store, base, changes, &load)
}

/// Base nodes of an update: a node's entries by hash, level and first block, checked.
type Load<'a> = dyn Fn(&Hash, u8, u64) -> Result<Vec<Hash>> + 'a;

/// `update`, reading base nodes with `load` (straight from the store, or through a cache).
fn update_with<S: BlobStore + ?Sized>(
    store: &S,
    base: &MapRoot,
    changes: impl IntoIterator<Item = (u64, Hash)>,
    load: &Load<'_>,
) -> Result<MapRoot> {
    let mut changes = Checked {
        inner: changes.into_iter().peekable(),
        last: None,
        nblocks: base.nblocks,
    };
    if changes.peek_block()?.is_none() {
        return Ok(*base);
    }
    let top = base.root_level();
    let root = update_node(store, load, base.root, top, 0, &mut changes)?;
    // The root covers every block below nblocks, so every change was consumed or refused.
    debug_assert!(changes.inner.peek().is_none());
    Ok(MapRoot {
        root,
        nblocks: base.nblocks,
    })
}

/// The change stream of `update`, checked for order and range as it is consumed.
struct Checked<I: Iterator<Item = (u64, Hash)>> {
    inner: std::iter::Peekable<I>,
    last: Option<u64>,
    nblocks: u64,
}

impl<I: Iterator<Item = (u64, Hash)>> Checked<I> {
    fn peek_block(&mut self) -> Result<Option<u64>> {
        let Some(&(b, _)) = self.inner.peek() else {
            return Ok(None);
        };
        if self.last.is_some_and(|l| b <= l) || b >= self.nblocks {
            return Err(misuse(format!(
                "change at block {b} out of order or past the end ({} blocks)",
                self.nblocks
            )));
        }
        Ok(Some(b))
    }

    /// The next change if it falls before `end`.
    fn next_before(&mut self, end: u128) -> Result<Option<(u64, Hash)>> {
        match self.peek_block()? {
            Some(b) if (b as u128) < end => {
                self.last = Some(b);
                Ok(self.inner.next())
            }
            _ => Ok(None),
        }
    }
}

/// Apply the changes that fall in the node of `level` starting at `start` whose current
/// hash is `base` (`Hash::ZERO`: all holes, nothing to read), return its new hash.
fn update_node<S: BlobStore + ?Sized, I: Iterator<Item = (u64, Hash)>>(
    store: &S,
    load: &Load<'_>,
    base: Hash,
    level: u8,
    start: u64,
    changes: &mut Checked<I>,
) -> Result<Hash> {
    let end = start as u128 + span(level);
    let mut entries: Vec<Hash> = if base.is_zero() {
        Vec::new()
    } else {
        load(&base, level, start)?
    };
    if level == 0 {
        while let Some((block, hash)) = changes.next_before(end)? {
            let i = (block - start) as usize;
            if entries.len() <= i {
                entries.resize(i + 1, Hash::ZERO);
            }
            entries[i] = hash;
        }
    } else {
        let child_span = entry_span(level);
        while let Some(block) = changes.peek_block()? {
            if block as u128 >= end {
                break;
            }
            let i = index(level, block);
            let child_start = start + i as u64 * child_span;
            let old = entries.get(i).copied().unwrap_or(Hash::ZERO);
            let new = update_node(store, load, old, level - 1, child_start, changes)?;
            if entries.len() <= i {
                entries.resize(i + 1, Hash::ZERO);
            }
            entries[i] = new;
        }
    }
    store_node(store, level, &entries, base)
}

/// Serde for a `Hash` as 64 hex digits (point records are JSON).
mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::repo::Hash;

    pub fn serialize<S: Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&h.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let s = String::deserialize(d)?;
        Hash::parse(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}
