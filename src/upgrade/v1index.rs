//! The block index of one disk of one restorable point: a flat table giving, for every block
//! of the disk, where its bytes are stored (pack, slot) with their CRC-32C, or that the block is
//! a hole (all zeros, nothing stored).
//!
//! Every restorable point has a complete index of its own (an incremental copies the previous
//! point's table and overrides the changed blocks), so reading any block of any point is one
//! table lookup and one read: the cost does not depend on the chain depth (invariant 6), and
//! deleting a point never changes what another point reads (invariant 4).
//!
//! Layout (little-endian):
//! ```text
//! header, 64 bytes:
//!   0 magic "VMREFIDX" | 8 major u16 | 10 minor u16 | 12 block_size u32 | 16 disk_size u64
//!  24 nblocks u64 | 32 npacks u32 | 36 entry_len u32 (12) | 40 packs_crc u32
//!  44 entries_crc u32 | 48 data_blocks u64 | 56 reserved u32 | 60 header_crc u32 (of 0..60)
//! pack table: npacks x 16-byte pack ids               (packs_crc)
//! entries:    nblocks x (pack u32, slot u32, crc u32)  (entries_crc); pack u32::MAX = hole
//! ```
//! The pack table has its own checksum so garbage collection can learn which packs an index
//! needs from the header and table alone.

use crate::format::{FormatError, check_crc, check_magic, crc, le_u32, le_u64};

use super::v1pack::PackId;

/// Do not modify: identifies block index files.
pub const INDEX_MAGIC: &[u8; 8] = b"VMREFIDX";
pub const INDEX_MAJOR: u16 = 1;
pub const INDEX_MINOR: u16 = 0;
pub const INDEX_HEADER_LEN: usize = 64;
pub const ENTRY_LEN: usize = 12;
/// An index of more packs than this is damage, not data.
const MAX_PACKS: u32 = 1 << 24;

/// Where one block is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Position in the index's pack table, or `u32::MAX` for a hole.
    pub pack: u32,
    pub slot: u32,
    /// CRC-32C of the whole stored slot (a short last block is stored zero-padded).
    pub crc: u32,
}

impl Entry {
    pub const HOLE: Entry = Entry {
        pack: u32::MAX,
        slot: 0,
        crc: 0,
    };
    pub fn is_hole(&self) -> bool {
        self.pack == u32::MAX
    }
}

/// A decoded index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIndex {
    pub block_size: u32,
    pub disk_size: u64,
    pub packs: Vec<PackId>,
    pub entries: Vec<Entry>,
}

/// What the header says, before the body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexHeader {
    pub block_size: u32,
    pub disk_size: u64,
    pub nblocks: u64,
    pub npacks: u32,
    pub packs_crc: u32,
    pub entries_crc: u32,
    pub data_blocks: u64,
}

fn invalid(what: &'static str, why: String) -> FormatError {
    FormatError::Invalid { what, why }
}

impl IndexHeader {
    /// Decode and validate the fixed header.
    ///
    /// # Errors
    /// Any damage or an unsupported major version.
    pub fn decode(b: &[u8]) -> Result<IndexHeader, FormatError> {
        if b.len() < INDEX_HEADER_LEN {
            return Err(FormatError::Truncated {
                got: b.len(),
                need: INDEX_HEADER_LEN,
            });
        }
        check_magic(b, INDEX_MAGIC, INDEX_MAJOR)?;
        check_crc("index header", le_u32(b, 60), &b[..60])?;
        let h = IndexHeader {
            block_size: le_u32(b, 12),
            disk_size: le_u64(b, 16),
            nblocks: le_u64(b, 24),
            npacks: le_u32(b, 32),
            packs_crc: le_u32(b, 40),
            entries_crc: le_u32(b, 44),
            data_blocks: le_u64(b, 48),
        };
        if !h.block_size.is_power_of_two() || !(4096..=(4 << 20)).contains(&h.block_size) {
            return Err(invalid("index block size", h.block_size.to_string()));
        }
        if h.nblocks != h.disk_size.div_ceil(h.block_size as u64) {
            return Err(invalid(
                "index block count",
                format!("{} blocks for {} bytes", h.nblocks, h.disk_size),
            ));
        }
        let elen = le_u32(b, 36);
        if elen as usize != ENTRY_LEN {
            return Err(invalid("index entry length", elen.to_string()));
        }
        if h.npacks > MAX_PACKS || h.data_blocks > h.nblocks {
            return Err(invalid(
                "index counts",
                format!("{} packs, {} data blocks", h.npacks, h.data_blocks),
            ));
        }
        Ok(h)
    }

    /// Bytes of header and pack table.
    pub fn packs_end(&self) -> usize {
        INDEX_HEADER_LEN + self.npacks as usize * 16
    }

    /// Total file length this header describes.
    pub fn file_len(&self) -> u64 {
        self.packs_end() as u64 + self.nblocks * ENTRY_LEN as u64
    }

    /// Decode the pack table that follows the header in `b`.
    ///
    /// # Errors
    /// Truncation or a checksum mismatch.
    pub fn decode_packs(&self, b: &[u8]) -> Result<Vec<PackId>, FormatError> {
        let end = self.packs_end();
        if b.len() < end {
            return Err(FormatError::Truncated {
                got: b.len(),
                need: end,
            });
        }
        let table = &b[INDEX_HEADER_LEN..end];
        check_crc("index pack table", self.packs_crc, table)?;
        Ok(table
            .chunks_exact(16)
            .map(|c| PackId(c.try_into().expect("16 bytes")))
            .collect())
    }
}

impl BlockIndex {
    /// An index of holes only.
    pub fn empty(block_size: u32, disk_size: u64) -> BlockIndex {
        BlockIndex {
            block_size,
            disk_size,
            packs: Vec::new(),
            entries: vec![Entry::HOLE; disk_size.div_ceil(block_size as u64) as usize],
        }
    }

    pub fn nblocks(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn data_blocks(&self) -> u64 {
        self.entries.iter().filter(|e| !e.is_hole()).count() as u64
    }

    /// Position of `id` in the pack table, adding it if absent.
    pub fn pack_slot(&mut self, id: PackId) -> u32 {
        match self.packs.iter().position(|p| *p == id) {
            Some(i) => i as u32,
            None => {
                self.packs.push(id);
                (self.packs.len() - 1) as u32
            }
        }
    }

    /// Drop pack table entries no block uses, so an index keeps alive only the packs it needs.
    pub fn compact(&mut self) {
        let mut used = vec![false; self.packs.len()];
        for e in self.entries.iter().filter(|e| !e.is_hole()) {
            used[e.pack as usize] = true;
        }
        let mut remap = vec![u32::MAX; self.packs.len()];
        let mut packs = Vec::new();
        for (i, p) in self.packs.iter().enumerate() {
            if used[i] {
                remap[i] = packs.len() as u32;
                packs.push(*p);
            }
        }
        for e in self.entries.iter_mut().filter(|e| !e.is_hole()) {
            e.pack = remap[e.pack as usize];
        }
        self.packs = packs;
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut table = Vec::with_capacity(self.packs.len() * 16);
        for p in &self.packs {
            table.extend_from_slice(&p.0);
        }
        let mut entries = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for e in &self.entries {
            entries.extend_from_slice(&e.pack.to_le_bytes());
            entries.extend_from_slice(&e.slot.to_le_bytes());
            entries.extend_from_slice(&e.crc.to_le_bytes());
        }
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + table.len() + entries.len());
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&INDEX_MAJOR.to_le_bytes());
        out.extend_from_slice(&INDEX_MINOR.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.nblocks().to_le_bytes());
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        out.extend_from_slice(&(ENTRY_LEN as u32).to_le_bytes());
        out.extend_from_slice(&crc(&table).to_le_bytes());
        out.extend_from_slice(&crc(&entries).to_le_bytes());
        out.extend_from_slice(&self.data_blocks().to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        let h = crc(&out[..60]);
        out.extend_from_slice(&h.to_le_bytes());
        debug_assert_eq!(out.len(), INDEX_HEADER_LEN);
        out.extend_from_slice(&table);
        out.extend_from_slice(&entries);
        out
    }

    /// Decode and validate a whole index file.
    ///
    /// # Errors
    /// Any truncation, trailing bytes, checksum mismatch or out-of-range entry.
    pub fn decode(b: &[u8]) -> Result<BlockIndex, FormatError> {
        let h = IndexHeader::decode(b)?;
        let packs = h.decode_packs(b)?;
        let need = h.file_len();
        if b.len() as u64 != need {
            return Err(if (b.len() as u64) < need {
                FormatError::Truncated {
                    got: b.len(),
                    need: need as usize,
                }
            } else {
                invalid(
                    "index length",
                    format!("{} bytes, expected {need}", b.len()),
                )
            });
        }
        let body = &b[h.packs_end()..];
        check_crc("index entries", h.entries_crc, body)?;
        let mut entries = Vec::with_capacity(h.nblocks as usize);
        let mut data = 0u64;
        for (i, c) in body.chunks_exact(ENTRY_LEN).enumerate() {
            let e = Entry {
                pack: le_u32(c, 0),
                slot: le_u32(c, 4),
                crc: le_u32(c, 8),
            };
            if !e.is_hole() {
                if e.pack >= h.npacks {
                    return Err(invalid(
                        "index entry",
                        format!("block {i} names pack {} of {}", e.pack, h.npacks),
                    ));
                }
                data += 1;
            }
            entries.push(e);
        }
        if data != h.data_blocks {
            return Err(invalid(
                "index data block count",
                format!("header says {}, entries hold {data}", h.data_blocks),
            ));
        }
        Ok(BlockIndex {
            block_size: h.block_size,
            disk_size: h.disk_size,
            packs,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BlockIndex {
        let mut ix = BlockIndex::empty(4096, 4096 * 5 + 100);
        let a = ix.pack_slot(PackId([1; 16]));
        let b = ix.pack_slot(PackId([2; 16]));
        ix.entries[0] = Entry {
            pack: a,
            slot: 0,
            crc: 11,
        };
        ix.entries[3] = Entry {
            pack: b,
            slot: 7,
            crc: 22,
        };
        ix.entries[5] = Entry {
            pack: a,
            slot: 1,
            crc: 33,
        };
        ix
    }

    #[test]
    fn round_trip() {
        let ix = sample();
        assert_eq!(ix.nblocks(), 6);
        let b = ix.encode();
        assert_eq!(BlockIndex::decode(&b).unwrap(), ix);
        let h = IndexHeader::decode(&b).unwrap();
        assert_eq!(h.decode_packs(&b).unwrap(), ix.packs);
        assert_eq!(h.data_blocks, 3);
    }

    #[test]
    fn compact_drops_unused_packs() {
        let mut ix = sample();
        ix.entries[3] = Entry::HOLE;
        ix.pack_slot(PackId([9; 16]));
        ix.compact();
        assert_eq!(ix.packs, vec![PackId([1; 16])]);
        assert_eq!(ix.entries[5].pack, 0);
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let b = sample().encode();
        for n in 0..b.len() {
            assert!(BlockIndex::decode(&b[..n]).is_err(), "len {n}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(BlockIndex::decode(&longer).is_err());
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let b = sample().encode();
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(BlockIndex::decode(&c).is_err(), "bit {i}");
        }
    }

    #[test]
    fn newer_major_refused_newer_minor_accepted() {
        let mut b = sample().encode();
        b[10] = 3;
        let h = crc(&b[..60]);
        b[60..64].copy_from_slice(&h.to_le_bytes());
        assert!(BlockIndex::decode(&b).is_ok());
        b[8] = 2;
        let h = crc(&b[..60]);
        b[60..64].copy_from_slice(&h.to_le_bytes());
        assert!(matches!(
            BlockIndex::decode(&b),
            Err(FormatError::TooNew { .. })
        ));
    }
}
