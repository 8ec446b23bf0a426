//! Pack objects (format v2): many stored blobs back to back in one immutable object, with a
//! trailer table that describes them, so a pack is self-describing and the index can be
//! rebuilt from the packs alone.
//!
//! Layout (little-endian):
//! ```text
//! header   0 magic "VMREFPK2" | 8 major u16 | 10 minor u16 | 12 header_crc u32 (of 0..12)
//! blobs    stored bytes back to back from offset 16
//! table    count x 56-byte entries:
//!          0 hash[32] | 32 kind u8 | 33 codec u8 | 34 zero u16 | 36 stored_len u32 |
//!          40 offset u64 | 48 raw_len u32 | 52 crc32c of the stored bytes u32
//! footer   0 count u32 | 4 table_crc u32 (of table and count) | 8 magic "VMREFPKT"
//! ```
//! Entries are in offset order and the blobs they name tile the data area exactly.

use crate::error::{Error, Result};
use crate::format::{FormatError, crc, le_u16, le_u32, le_u64};
use crate::repo::backend::Backend;
use crate::repo::compress::Codec;
use crate::repo::{BlobKind, Hash};

/// Do not modify: identifies pack objects.
pub const PACK_MAGIC: &[u8; 8] = b"VMREFPK2";
/// Do not modify: ends every pack object.
pub const PACK_TRAILER_MAGIC: &[u8; 8] = b"VMREFPKT";
pub const PACK_MAJOR: u16 = 2;
pub const PACK_MINOR: u16 = 0;
pub const PACK_HEADER_LEN: usize = 16;
pub const PACK_ENTRY_LEN: usize = 56;
pub const PACK_FOOTER_LEN: usize = 16;
/// Packs are filled up to about this many bytes unless the repository says otherwise.
pub const DEFAULT_PACK_TARGET: usize = 16 << 20;
/// No blob is larger than this (blocks are at most 4 MiB; map nodes are small): a larger
/// length in a table is damage.
pub const MAX_BLOB: u32 = 64 << 20;

/// A pack's name: 16 random bytes, chosen before the pack is written so that index entries
/// can name it while it is being filled.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// # Errors
    /// The system's random source failed.
    pub fn random() -> crate::Result<PackId> {
        Ok(PackId::parse(&crate::store::random_id()?).expect("random_id gives 32 hex digits"))
    }

    pub fn parse(hex: &str) -> Option<PackId> {
        if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, x) in b.iter_mut().enumerate() {
            *x = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(PackId(b))
    }

    /// The backend object of this pack: `packs/<first byte>/<id>`, 256 directories so that
    /// none grows too large.
    pub fn object_name(&self) -> String {
        format!("packs/{:02x}/{self}", self.0[0])
    }

    /// The pack an object name names, if it is one.
    pub fn from_object_name(name: &str) -> Option<PackId> {
        let id = PackId::parse(name.strip_prefix("packs/")?.get(3..)?)?;
        (id.object_name() == name).then_some(id)
    }
}

impl std::fmt::Display for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for x in self.0 {
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackId({self})")
    }
}

/// One stored blob of a pack, as the pack's table and the index describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub hash: Hash,
    pub kind: BlobKind,
    pub codec: Codec,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    /// CRC-32C of the stored bytes: damage is found before decompressing.
    pub crc: u32,
}

fn invalid(what: &'static str, why: String) -> FormatError {
    FormatError::Invalid { what, why }
}

fn encode_header() -> Vec<u8> {
    let mut h = Vec::with_capacity(PACK_HEADER_LEN);
    h.extend_from_slice(PACK_MAGIC);
    h.extend_from_slice(&PACK_MAJOR.to_le_bytes());
    h.extend_from_slice(&PACK_MINOR.to_le_bytes());
    let c = crc(&h);
    h.extend_from_slice(&c.to_le_bytes());
    debug_assert_eq!(h.len(), PACK_HEADER_LEN);
    h
}

/// Check a pack's 16-byte header.
///
/// # Errors
/// Damage or a newer major version.
pub fn check_header(b: &[u8]) -> Result<(), FormatError> {
    crate::format::check_header(
        b,
        PACK_HEADER_LEN,
        PACK_MAGIC,
        PACK_MAJOR,
        12,
        "pack header",
    )?;
    Ok(())
}

/// Read a pack's footer (its last 16 bytes): how many entries its table holds.
///
/// # Errors
/// A footer without the trailer magic.
pub fn decode_footer(f: &[u8]) -> Result<u32, FormatError> {
    if f.len() != PACK_FOOTER_LEN {
        return Err(FormatError::Truncated {
            got: f.len(),
            need: PACK_FOOTER_LEN,
        });
    }
    if &f[8..16] != PACK_TRAILER_MAGIC {
        return Err(FormatError::BadMagic {
            got: f[8..16].to_vec(),
            expected: String::from_utf8_lossy(PACK_TRAILER_MAGIC).into_owned(),
        });
    }
    Ok(le_u32(f, 0))
}

/// Where a pack of `size` bytes whose footer says `count` keeps its table.
///
/// # Errors
/// A count that does not fit in the pack.
pub fn table_range(size: u64, count: u32) -> Result<(u64, usize), FormatError> {
    let table = count as u64 * PACK_ENTRY_LEN as u64;
    let fixed = (PACK_HEADER_LEN + PACK_FOOTER_LEN) as u64;
    if size < fixed || size - fixed < table {
        return Err(invalid(
            "pack footer",
            format!("{count} entries do not fit in {size} bytes"),
        ));
    }
    Ok((size - PACK_FOOTER_LEN as u64 - table, table as usize))
}

/// Decode and check a pack's table given its footer; `table_off` is where the table starts
/// (the end of the data area).
///
/// # Errors
/// Checksum mismatch, unknown codes, entries that do not tile the data area.
pub fn decode_table(
    table: &[u8],
    footer: &[u8],
    table_off: u64,
) -> Result<Vec<PackEntry>, FormatError> {
    let count = decode_footer(footer)?;
    if table.len() != count as usize * PACK_ENTRY_LEN {
        return Err(FormatError::Truncated {
            got: table.len(),
            need: count as usize * PACK_ENTRY_LEN,
        });
    }
    let mut h = crc32c::crc32c(table);
    h = crc32c::crc32c_append(h, &footer[..4]);
    let stored = le_u32(footer, 4);
    if stored != h {
        return Err(FormatError::BadChecksum {
            what: "pack table",
            stored,
            computed: h,
        });
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut next = PACK_HEADER_LEN as u64;
    for e in table.chunks_exact(PACK_ENTRY_LEN) {
        let kind = BlobKind::from_code(e[32])
            .ok_or_else(|| invalid("pack entry", format!("kind {}", e[32])))?;
        let codec = Codec::from_code(e[33])
            .ok_or_else(|| invalid("pack entry", format!("codec {}", e[33])))?;
        if le_u16(e, 34) != 0 {
            return Err(invalid("pack entry", "reserved bytes set".into()));
        }
        let entry = PackEntry {
            hash: Hash(e[..32].try_into().expect("32 bytes")),
            kind,
            codec,
            stored_len: le_u32(e, 36),
            offset: le_u64(e, 40),
            raw_len: le_u32(e, 48),
            crc: le_u32(e, 52),
        };
        if entry.offset != next || entry.stored_len > MAX_BLOB || entry.raw_len > MAX_BLOB {
            return Err(invalid(
                "pack entry",
                format!(
                    "blob at {} of {} bytes where one at {next} was expected",
                    entry.offset, entry.stored_len
                ),
            ));
        }
        next += entry.stored_len as u64;
        out.push(entry);
    }
    if next != table_off {
        return Err(invalid(
            "pack table",
            format!("blobs end at {next}, table starts at {table_off}"),
        ));
    }
    Ok(out)
}

/// Decode a whole pack and check everything in it: header, table, and each blob's CRC.
/// (Decompression and the BLAKE3 check are the repository's, on read.)
///
/// # Errors
/// Any damage.
pub fn decode_pack(b: &[u8]) -> Result<Vec<PackEntry>, FormatError> {
    check_header(b)?;
    if b.len() < PACK_HEADER_LEN + PACK_FOOTER_LEN {
        return Err(FormatError::Truncated {
            got: b.len(),
            need: PACK_HEADER_LEN + PACK_FOOTER_LEN,
        });
    }
    let footer = &b[b.len() - PACK_FOOTER_LEN..];
    let (off, len) = table_range(b.len() as u64, decode_footer(footer)?)?;
    let entries = decode_table(&b[off as usize..off as usize + len], footer, off)?;
    for e in &entries {
        let s = &b[e.offset as usize..e.offset as usize + e.stored_len as usize];
        let c = crc(s);
        if c != e.crc {
            return Err(FormatError::BadChecksum {
                what: "blob",
                stored: e.crc,
                computed: c,
            });
        }
    }
    Ok(entries)
}

/// Read a stored pack's table with ranged gets (footer, then table), without its blobs.
///
/// # Errors
/// A missing or damaged pack.
pub fn read_table(backend: &dyn Backend, id: PackId) -> Result<Vec<PackEntry>> {
    let name = id.object_name();
    let err = |source| Error::Format {
        path: format!("repository object {name}").into(),
        source,
    };
    let size = backend.size(&name)?;
    if size < (PACK_HEADER_LEN + PACK_FOOTER_LEN) as u64 {
        return Err(err(FormatError::Truncated {
            got: size as usize,
            need: PACK_HEADER_LEN + PACK_FOOTER_LEN,
        }));
    }
    check_header(&backend.get_range(&name, 0, PACK_HEADER_LEN)?).map_err(err)?;
    let footer = backend.get_range(&name, size - PACK_FOOTER_LEN as u64, PACK_FOOTER_LEN)?;
    let (off, len) = table_range(size, decode_footer(&footer).map_err(err)?).map_err(err)?;
    let table = backend.get_range(&name, off, len)?;
    decode_table(&table, &footer, off).map_err(err)
}

/// Builds one pack in memory (a pack is written as one object, also on an object store).
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PackWriter {
    pub fn new() -> PackWriter {
        PackWriter {
            buf: encode_header(),
            entries: Vec::new(),
        }
    }

    /// Append one stored blob (already compressed as `codec` says) and return its entry.
    pub fn add(
        &mut self,
        hash: Hash,
        kind: BlobKind,
        codec: Codec,
        stored: &[u8],
        raw_len: u32,
    ) -> PackEntry {
        debug_assert!(stored.len() as u64 <= MAX_BLOB as u64 && raw_len <= MAX_BLOB);
        let e = PackEntry {
            hash,
            kind,
            codec,
            offset: self.buf.len() as u64,
            stored_len: stored.len() as u32,
            raw_len,
            crc: crc(stored),
        };
        self.buf.extend_from_slice(stored);
        self.entries.push(e);
        e
    }

    /// Bytes so far (header and blobs), to compare with the pack target.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }

    /// The stored bytes of an entry of this writer (reads of blobs not yet written out).
    pub fn stored(&self, e: &PackEntry) -> &[u8] {
        &self.buf[e.offset as usize..e.offset as usize + e.stored_len as usize]
    }

    /// The finished pack's bytes and its entries.
    pub fn finish(mut self) -> (Vec<u8>, Vec<PackEntry>) {
        let table_start = self.buf.len();
        for e in &self.entries {
            self.buf.extend_from_slice(&e.hash.0);
            self.buf.push(e.kind.code());
            self.buf.push(e.codec.code());
            self.buf.extend_from_slice(&0u16.to_le_bytes());
            self.buf.extend_from_slice(&e.stored_len.to_le_bytes());
            self.buf.extend_from_slice(&e.offset.to_le_bytes());
            self.buf.extend_from_slice(&e.raw_len.to_le_bytes());
            self.buf.extend_from_slice(&e.crc.to_le_bytes());
        }
        let count = (self.entries.len() as u32).to_le_bytes();
        let h = crc32c::crc32c_append(crc32c::crc32c(&self.buf[table_start..]), &count);
        self.buf.extend_from_slice(&count);
        self.buf.extend_from_slice(&h.to_le_bytes());
        self.buf.extend_from_slice(PACK_TRAILER_MAGIC);
        (self.buf, self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<PackEntry>) {
        let mut w = PackWriter::new();
        for i in 0..3u8 {
            let raw = vec![i; 10 + i as usize];
            let kind = if i == 1 {
                BlobKind::Map
            } else {
                BlobKind::Data
            };
            w.add(Hash::of(&raw), kind, Codec::Raw, &raw, raw.len() as u32);
        }
        w.finish()
    }

    #[test]
    fn round_trip() {
        let (b, entries) = sample();
        assert_eq!(decode_pack(&b).unwrap(), entries);
        assert_eq!(entries[1].kind, BlobKind::Map);
        assert_eq!(entries[2].offset, 16 + 10 + 11);
        let e = entries[2];
        assert_eq!(
            &b[e.offset as usize..][..e.stored_len as usize],
            &[2u8; 12][..]
        );
        // The table alone, as a reader with ranged gets finds it.
        let footer = &b[b.len() - PACK_FOOTER_LEN..];
        let (off, len) = table_range(b.len() as u64, decode_footer(footer).unwrap()).unwrap();
        assert_eq!(
            decode_table(&b[off as usize..][..len], footer, off).unwrap(),
            entries
        );
        let (empty, none) = PackWriter::new().finish();
        assert!(none.is_empty());
        assert_eq!(decode_pack(&empty).unwrap(), vec![]);
    }

    #[test]
    fn every_truncation_is_refused() {
        let (b, _) = sample();
        for n in 0..b.len() {
            assert!(decode_pack(&b[..n]).is_err(), "len {n}");
        }
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let (b, _) = sample();
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(decode_pack(&c).is_err(), "bit {i}");
        }
    }

    #[test]
    fn table_reads_with_ranged_gets() {
        let (b, entries) = sample();
        let m = crate::repo::backend::MemBackend::new();
        let id = PackId::random().unwrap();
        m.put_if_absent(&id.object_name(), &b).unwrap();
        assert_eq!(read_table(&m, id).unwrap(), entries);
        for n in 0..b.len() {
            m.overwrite(&id.object_name(), b[..n].to_vec());
            assert!(read_table(&m, id).is_err(), "len {n}");
        }
        assert!(read_table(&m, PackId::random().unwrap()).is_err());
    }

    #[test]
    fn pack_names_round_trip() {
        let id = PackId::random().unwrap();
        let n = id.object_name();
        assert!(n.starts_with("packs/"));
        assert_eq!(PackId::from_object_name(&n), Some(id));
        assert_eq!(PackId::from_object_name("packs/00/xyz"), None);
        assert_eq!(PackId::from_object_name(&format!("packs/zz/{id}")), None);
    }

    #[test]
    fn newer_major_is_refused() {
        let (mut b, _) = sample();
        b[8] = 3;
        let c = crc(&b[..12]);
        b[12..16].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(decode_pack(&b), Err(FormatError::TooNew { .. })));
    }
}
