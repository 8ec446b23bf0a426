//! The repository (store format v2): where backup data lives, content-addressed.
//!
//! Every stored object is a *blob* named by the BLAKE3 hash of its uncompressed bytes (keyed
//! under the repository's key when it is encrypted: `seal.rs`, `Repository::id_of`): disk
//! blocks (`BlobKind::Data`) and the nodes of point maps (`BlobKind::Map`). The hash is the
//! name (identical bytes are stored once, across disks and points, and across stores once
//! several share a repository, which is not built yet) and the checksum
//! (a blob whose bytes do not hash to its name is damage: `Error::Format`, EIO at the mount).
//!
//! Layers, lowest first; each depends only on those above it in this list:
//! - `BlobStore` (this file): put a blob and get its hash, get a blob by hash, verified. The
//!   point maps and everything that reads points see only this trait, so they cannot tell a
//!   local repository from an object store, and tests use `MemBlobStore`.
//! - the repository's own modules below implement it over a backend of named objects.

pub mod backend;
pub mod compress;
mod faults;
pub mod gc;
pub mod index;
pub mod key;
pub mod lock;
pub mod pack;
pub mod repair;
pub mod repository;
pub mod seal;
pub mod snapshot;

use std::collections::HashMap;
use std::fmt;

use parking_lot::RwLock;

use crate::error::{Error, Result};
use crate::format::FormatError;

pub mod map;

/// The BLAKE3 hash of a blob's uncompressed bytes: its name and its checksum.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The all-zero value, never the hash of any blob: used as "nothing here" (a hole, an
    /// empty subtree) in encoded maps.
    pub const ZERO: Hash = Hash([0; 32]);

    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parse 64 lowercase or uppercase hex digits.
    pub fn parse(hex: &str) -> Option<Hash> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Hash(out))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a blob holds. Kept beside each stored blob so that garbage collection and `verify`
/// know a map node (whose children must be followed) from a disk block without decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// Bytes of one disk block (always a whole block; a disk's short last block is stored
    /// zero-padded).
    Data,
    /// One node of a point map.
    Map,
}

impl BlobKind {
    pub fn code(self) -> u8 {
        match self {
            BlobKind::Data => 1,
            BlobKind::Map => 2,
        }
    }
    pub fn from_code(c: u8) -> Option<BlobKind> {
        match c {
            1 => Some(BlobKind::Data),
            2 => Some(BlobKind::Map),
            _ => None,
        }
    }
}

/// Content-addressed storage of blobs. Implementations are shared by many threads (the mount
/// reads points from every FUSE worker), so both calls take `&self`.
pub trait BlobStore: Send + Sync {
    /// Store `data` unless a blob of the same hash is already stored, and return its hash.
    /// Durability: a put is durable once the implementation's `flush`/commit says so (the
    /// local repository makes a backup's blobs durable before its point is committed).
    ///
    /// # Errors
    /// I/O failures of the underlying storage.
    fn put(&self, kind: BlobKind, data: &[u8]) -> Result<Hash>;

    /// The bytes of blob `hash`, checked against the hash before they are returned.
    ///
    /// # Errors
    /// `Error::Format` when the blob is missing or its bytes do not match its hash; I/O
    /// failures.
    fn get(&self, kind: BlobKind, hash: &Hash) -> Result<Vec<u8>>;

    /// The id `put` gives these bytes: their BLAKE3 hash unless the store keys its ids (an
    /// encrypted repository).
    fn id_of(&self, data: &[u8]) -> Hash {
        Hash::of(data)
    }
}

/// Error for a blob that is not where its map says it is, or not what its hash says.
pub fn damaged(hash: &Hash, why: impl Into<String>) -> Error {
    Error::Format {
        path: format!("blob {hash}").into(),
        source: FormatError::Invalid {
            what: "blob",
            why: why.into(),
        },
    }
}

/// An in-memory `BlobStore` for tests: the model every other implementation must match.
#[derive(Default)]
pub struct MemBlobStore {
    blobs: RwLock<HashMap<Hash, (BlobKind, Vec<u8>)>>,
}

impl MemBlobStore {
    pub fn new() -> MemBlobStore {
        MemBlobStore::default()
    }

    /// How many distinct blobs are stored.
    pub fn len(&self) -> usize {
        self.blobs.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.read().is_empty()
    }

    /// Total bytes of the stored blobs (uncompressed).
    pub fn bytes(&self) -> u64 {
        self.blobs
            .read()
            .values()
            .map(|(_, b)| b.len() as u64)
            .sum()
    }

    /// Damage a stored blob in place (tests of damage handling).
    pub fn corrupt(&self, hash: &Hash) -> bool {
        match self.blobs.write().get_mut(hash) {
            Some((_, b)) if !b.is_empty() => {
                b[0] ^= 0xff;
                true
            }
            _ => false,
        }
    }
}

impl BlobStore for MemBlobStore {
    fn put(&self, kind: BlobKind, data: &[u8]) -> Result<Hash> {
        let h = Hash::of(data);
        self.blobs
            .write()
            .entry(h)
            .or_insert_with(|| (kind, data.to_vec()));
        Ok(h)
    }

    fn get(&self, kind: BlobKind, hash: &Hash) -> Result<Vec<u8>> {
        let g = self.blobs.read();
        let (k, b) = g.get(hash).ok_or_else(|| damaged(hash, "not stored"))?;
        if *k != kind {
            return Err(damaged(hash, format!("stored as {k:?}, wanted {kind:?}")));
        }
        if Hash::of(b) != *hash {
            return Err(damaged(hash, "bytes do not match the hash"));
        }
        Ok(b.clone())
    }
}

/// Deterministic pseudo-random bytes for tests (xorshift): incompressible, reproducible.
#[cfg(test)]
pub(crate) fn test_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_hex_round_trip() {
        let h = Hash::of(b"vmref");
        assert_eq!(Hash::parse(&h.to_hex()), Some(h));
        assert_eq!(Hash::parse(&h.to_hex()[1..]), None);
        assert_eq!(Hash::parse(&"zz".repeat(32)), None);
        assert!(!h.is_zero());
        assert!(Hash::ZERO.is_zero());
    }

    #[test]
    fn mem_store_dedups_and_detects_damage() {
        let s = MemBlobStore::new();
        let a = s.put(BlobKind::Data, &[7u8; 4096]).unwrap();
        let b = s.put(BlobKind::Data, &[7u8; 4096]).unwrap();
        assert_eq!(a, b);
        assert_eq!(s.len(), 1);
        assert_eq!(s.get(BlobKind::Data, &a).unwrap(), vec![7u8; 4096]);
        assert!(s.get(BlobKind::Map, &a).is_err());
        assert!(s.corrupt(&a));
        assert!(s.get(BlobKind::Data, &a).is_err());
        assert!(s.get(BlobKind::Data, &Hash::of(b"absent")).is_err());
    }
}
