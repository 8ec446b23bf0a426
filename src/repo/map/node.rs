//! The encoding of one point-map node: a small fixed header, then up to `FANOUT` 32-byte
//! hashes, either dense or sparse (a presence bitmap and only the non-zero hashes).
//!
//! Layout (little-endian, 8-byte header):
//! `0 magic[3] = "VMP" | 3 version u8 = 1 | 4 level u8 | 5 encoding u8 | 6 count u16`
//! - `count` is the number of entries after trailing `Hash::ZERO` entries are trimmed:
//!   `1..=FANOUT`, and entry `count - 1` is never zero. An all-zero node is never encoded: its
//!   parent holds `Hash::ZERO` instead.
//! - encoding 0, dense: `count` hashes follow, zero entries included.
//! - encoding 1, sparse: a bitmap of `ceil(count / 8)` bytes (bit `i % 8` of byte `i / 8` set
//!   when entry `i` is non-zero, bits past `count` clear), then the non-zero hashes in order.
//!
//! The encoder picks whichever is smaller (dense on a tie), so a node's bytes, and therefore
//! its hash, are a function of its entries alone: identical subtrees are identical blobs. The
//! decoder refuses anything the encoder would not have written. The blob's hash already
//! checks the bytes; these checks catch a blob that hashes right but is not a node of this
//! format (a bug, or a different version), which must never be read as block hashes.

use crate::format::FormatError;
use crate::repo::Hash;

/// Entries per node. A leaf covers `FANOUT` blocks (64 MiB at 64 KiB blocks).
pub const FANOUT: usize = 1024;
/// log2(FANOUT).
pub const FANOUT_BITS: u32 = 10;
/// Do not modify: identifies map nodes.
pub const MAGIC: &[u8; 3] = b"VMP";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// Levels above which no `u64` block number reaches (`FANOUT^7 > 2^64`).
pub const MAX_LEVEL: u8 = 6;

const DENSE: u8 = 0;
const SPARSE: u8 = 1;

/// One decoded node: its level (0 = leaf, entries are data block hashes) and its entries
/// with trailing zeros trimmed (an index past the end reads as `Hash::ZERO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub level: u8,
    pub entries: Box<[Hash]>,
}

impl Node {
    /// Entry `i`; zero past the trimmed end.
    pub fn get(&self, i: usize) -> Hash {
        self.entries.get(i).copied().unwrap_or(Hash::ZERO)
    }

    /// Approximate memory a cached node holds, for the cache's byte budget.
    pub fn mem_size(&self) -> usize {
        self.entries.len() * 32 + 64
    }
}

fn invalid(why: String) -> FormatError {
    FormatError::Invalid {
        what: "map node",
        why,
    }
}

/// Encode a node of `level` from its entries (at most `FANOUT`); `None` when every entry is
/// zero (such a node is never stored).
pub fn encode(level: u8, entries: &[Hash]) -> Option<Vec<u8>> {
    assert!(entries.len() <= FANOUT && level <= MAX_LEVEL);
    let count = entries.iter().rposition(|h| !h.is_zero())? + 1;
    let entries = &entries[..count];
    let nonzero = entries.iter().filter(|h| !h.is_zero()).count();
    let bitmap_len = count.div_ceil(8);
    let sparse = bitmap_len + nonzero * 32 < count * 32;
    let mut out = Vec::with_capacity(HEADER_LEN + count * 32);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(level);
    out.push(if sparse { SPARSE } else { DENSE });
    out.extend_from_slice(&(count as u16).to_le_bytes());
    if sparse {
        let mut bitmap = vec![0u8; bitmap_len];
        for (i, h) in entries.iter().enumerate() {
            if !h.is_zero() {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bitmap);
        for h in entries.iter().filter(|h| !h.is_zero()) {
            out.extend_from_slice(&h.0);
        }
    } else {
        for h in entries {
            out.extend_from_slice(&h.0);
        }
    }
    Some(out)
}

fn hash_at(b: &[u8], off: usize) -> Hash {
    Hash(b[off..off + 32].try_into().unwrap())
}

/// Decode and check a node's bytes: header, count, canonical trimming and encoding choice.
/// Whether the level and count fit the node's position is the caller's check (`Geometry`).
///
/// # Errors
/// `FormatError` for anything the encoder would not have written.
pub fn decode(b: &[u8]) -> Result<Node, FormatError> {
    if b.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            got: b.len(),
            need: HEADER_LEN,
        });
    }
    if &b[..3] != MAGIC {
        return Err(FormatError::BadMagic {
            got: b[..3].to_vec(),
            expected: String::from_utf8_lossy(MAGIC).into_owned(),
        });
    }
    if b[3] != VERSION {
        return Err(invalid(format!(
            "version {}, this vmref reads {VERSION}",
            b[3]
        )));
    }
    let level = b[4];
    if level > MAX_LEVEL {
        return Err(invalid(format!("level {level} above {MAX_LEVEL}")));
    }
    let count = u16::from_le_bytes([b[6], b[7]]) as usize;
    if count == 0 || count > FANOUT {
        return Err(invalid(format!("{count} entries")));
    }
    let body = &b[HEADER_LEN..];
    let entries: Vec<Hash> = match b[5] {
        DENSE => {
            if body.len() != count * 32 {
                return Err(invalid(format!(
                    "dense body of {} bytes for {count} entries",
                    body.len()
                )));
            }
            (0..count).map(|i| hash_at(body, i * 32)).collect()
        }
        SPARSE => {
            let bitmap_len = count.div_ceil(8);
            if body.len() < bitmap_len {
                return Err(FormatError::Truncated {
                    got: b.len(),
                    need: HEADER_LEN + bitmap_len,
                });
            }
            let (bitmap, hashes) = body.split_at(bitmap_len);
            let present = |i: usize| bitmap[i / 8] & (1 << (i % 8)) != 0;
            if (count..bitmap_len * 8).any(present) {
                return Err(invalid("bitmap bits set past the entry count".into()));
            }
            let nonzero = (0..count).filter(|&i| present(i)).count();
            if hashes.len() != nonzero * 32 {
                return Err(invalid(format!(
                    "sparse body of {} hash bytes for {nonzero} entries",
                    hashes.len()
                )));
            }
            let mut next = 0;
            let mut entries = Vec::with_capacity(count);
            for i in 0..count {
                if present(i) {
                    let h = hash_at(hashes, next * 32);
                    if h.is_zero() {
                        return Err(invalid(format!("entry {i} marked present but zero")));
                    }
                    entries.push(h);
                    next += 1;
                } else {
                    entries.push(Hash::ZERO);
                }
            }
            entries
        }
        e => return Err(invalid(format!("unknown encoding {e}"))),
    };
    if entries[count - 1].is_zero() {
        return Err(invalid("trailing zero entry (not trimmed)".into()));
    }
    let node = Node {
        level,
        entries: entries.into_boxed_slice(),
    };
    // The encoding choice is part of the canonical form: a node written otherwise would hash
    // differently from the same entries written by this encoder, breaking dedup.
    if encode(level, &node.entries).as_deref() != Some(b) {
        return Err(invalid("not in canonical encoding".into()));
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> Hash {
        Hash::of(&i.to_le_bytes())
    }

    fn dense_full() -> Vec<Hash> {
        (0..FANOUT as u64).map(h).collect()
    }

    fn sparse_few() -> Vec<Hash> {
        let mut v = vec![Hash::ZERO; FANOUT];
        v[3] = h(3);
        v[700] = h(700);
        v
    }

    #[test]
    fn all_zero_is_not_encoded() {
        assert_eq!(encode(0, &[]), None);
        assert_eq!(encode(2, &vec![Hash::ZERO; FANOUT]), None);
    }

    #[test]
    fn round_trip_dense_and_sparse() {
        for (level, entries) in [(0u8, dense_full()), (1, sparse_few()), (6, vec![h(1)])] {
            let b = encode(level, &entries).unwrap();
            let n = decode(&b).unwrap();
            assert_eq!(n.level, level);
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(n.get(i), *e, "entry {i}");
            }
            assert_eq!(n.get(FANOUT + 5), Hash::ZERO);
        }
    }

    #[test]
    fn sizes_follow_content() {
        assert_eq!(
            encode(0, &dense_full()).unwrap().len(),
            HEADER_LEN + FANOUT * 32
        );
        // Trailing zeros trimmed.
        assert_eq!(
            encode(0, &[h(1), Hash::ZERO]).unwrap().len(),
            HEADER_LEN + 32
        );
        // Two entries in 701: bitmap (88 bytes) and two hashes.
        assert_eq!(
            encode(0, &sparse_few()).unwrap().len(),
            HEADER_LEN + 88 + 64
        );
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        for entries in [sparse_few(), vec![h(1), Hash::ZERO, h(2)]] {
            let b = encode(1, &entries).unwrap();
            for n in 0..b.len() {
                assert!(decode(&b[..n]).is_err(), "len {n}");
            }
            // Flips of the header or the bitmap are refused; a flip inside a hash is a valid
            // different node (the blob's own hash catches it).
            let hashes_at = b.len() - entries.iter().filter(|h| !h.is_zero()).count() * 32;
            let hashes_at = if b[5] == DENSE { HEADER_LEN } else { hashes_at };
            for i in 0..hashes_at * 8 {
                let mut c = b.clone();
                c[i / 8] ^= 1 << (i % 8);
                // The level byte may flip to another valid level: the position check catches it.
                if i / 8 == 4 && decode(&c).is_ok_and(|n| n.level != 1) {
                    continue;
                }
                assert!(decode(&c).is_err(), "bit {i}");
            }
        }
    }

    #[test]
    fn non_canonical_forms_are_refused() {
        // Untrimmed trailing zero written densely.
        let mut b = encode(0, &[h(1)]).unwrap();
        b[6] = 2;
        b.extend_from_slice(&[0; 32]);
        assert!(decode(&b).is_err());
        // A sparse node that should have been dense.
        let mut b = encode(0, &[h(1), h(2)]).unwrap();
        b[5] = SPARSE;
        b.splice(HEADER_LEN..HEADER_LEN, [0b11u8]);
        assert!(decode(&b).is_err());
        // Newer version.
        let mut b = encode(0, &[h(1)]).unwrap();
        b[3] = 2;
        assert!(decode(&b).is_err());
    }
}
