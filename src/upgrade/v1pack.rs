//! Format 1 pack files, read only by `vmref upgrade` now: the stored bytes of backed-up
//! blocks. A format 1 backup wrote at most one pack per disk; a pack was immutable once
//! renamed into place. The upgrade removes them all after its commit point.
//!
//! Layout (little-endian): a 64-byte header padded with zeros to 4096 bytes, then slots of
//! `block_size` bytes; slot `s` is at `4096 + s * block_size`. A short last block of a disk
//! is stored zero-padded. Each slot's CRC-32C is kept in the index that names it, so a
//! damaged slot is found on read (invariant 5).
//! ```text
//!  0 magic "VMREFPAK" | 8 major u16 | 10 minor u16 | 12 block_size u32 | 16 pack id [16]
//! 32 created_unix u64 | 40 reserved [20] | 60 header_crc u32 (of 0..60)
//! ```
//!
//! `PackCache` keeps recently used packs open (LRU). Its mutex guards only the map: reads are
//! `read_exact_at` on a shared `Arc<File>` with no lock held during the I/O.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::{FormatError, crc, le_u32};
use crate::store::atomic::TempFile;
use crate::store::now_unix;

/// Do not modify: identifies pack files.
pub const PACK_MAGIC: &[u8; 8] = b"VMREFPAK";
pub const PACK_MAJOR: u16 = 1;
pub const PACK_MINOR: u16 = 0;
pub const PACK_HEADER_LEN: usize = 64;
/// Slots start page-aligned.
pub const PACK_DATA_OFFSET: u64 = 4096;
/// Buffered slots are written out in batches of about this many bytes.
const WRITE_BATCH: usize = 4 << 20;

/// A pack's identity: 16 random bytes, its file name in hex (the same type as format 2's).
pub use crate::repo::pack::PackId;

pub fn encode_header(id: PackId, block_size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(PACK_DATA_OFFSET as usize);
    h.extend_from_slice(PACK_MAGIC);
    h.extend_from_slice(&PACK_MAJOR.to_le_bytes());
    h.extend_from_slice(&PACK_MINOR.to_le_bytes());
    h.extend_from_slice(&block_size.to_le_bytes());
    h.extend_from_slice(&id.0);
    h.extend_from_slice(&now_unix().to_le_bytes());
    h.extend_from_slice(&[0u8; 20]);
    let c = crc(&h[..60]);
    h.extend_from_slice(&c.to_le_bytes());
    debug_assert_eq!(h.len(), PACK_HEADER_LEN);
    h.resize(PACK_DATA_OFFSET as usize, 0);
    h
}

/// Check a pack header against the id and block size its index expects.
///
/// # Errors
/// Damage, a newer major version, or a header that belongs to another pack.
pub fn check_header(b: &[u8], id: PackId, block_size: u32) -> Result<(), FormatError> {
    crate::format::check_header(
        b,
        PACK_HEADER_LEN,
        PACK_MAGIC,
        PACK_MAJOR,
        60,
        "pack header",
    )?;
    if le_u32(b, 12) != block_size || b[16..32] != id.0 {
        return Err(FormatError::Invalid {
            what: "pack header",
            why: format!(
                "pack {} of block size {} where {id} of {block_size} was expected",
                PackId(b[16..32].try_into().expect("16 bytes")),
                le_u32(b, 12)
            ),
        });
    }
    Ok(())
}

pub fn pack_path(dir: &Path, id: PackId) -> PathBuf {
    dir.join(format!("{id}.pack"))
}

/// Writes one new pack beside its final name; it exists only once `commit` renamed it in.
pub struct PackWriter {
    id: PackId,
    block_size: usize,
    tmp: TempFile,
    buf: Vec<u8>,
    written: u64,
    slots: u32,
}

impl PackWriter {
    /// # Errors
    /// Failure to create the temp file or write the header.
    pub fn create(dir: &Path, block_size: u32) -> Result<PackWriter> {
        let id = PackId::random()?;
        let tmp = TempFile::new(&pack_path(dir, id))?;
        let header = encode_header(id, block_size);
        Ok(PackWriter {
            id,
            block_size: block_size as usize,
            tmp,
            buf: header,
            written: 0,
            slots: 0,
        })
    }

    pub fn id(&self) -> PackId {
        self.id
    }
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Append one block (zero-padded to a whole slot); returns its slot and CRC.
    ///
    /// # Errors
    /// A failed write of the batch.
    pub fn append(&mut self, block: &[u8]) -> Result<(u32, u32)> {
        debug_assert!(block.len() <= self.block_size);
        let start = self.buf.len();
        self.buf.extend_from_slice(block);
        self.buf.resize(start + self.block_size, 0);
        let c = crc(&self.buf[start..]);
        let slot = self.slots;
        self.slots = self.slots.checked_add(1).ok_or(Error::PackFull)?;
        if self.buf.len() >= WRITE_BATCH {
            self.flush()?;
        }
        Ok((slot, c))
    }

    fn flush(&mut self) -> Result<()> {
        self.tmp
            .file()
            .write_all_at(&self.buf, self.written)
            .map_err(Error::io("write", self.tmp.path()))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Write the rest, fsync, rename into place.
    ///
    /// # Errors
    /// I/O failures; the pack then does not exist.
    pub fn commit(mut self) -> Result<PackId> {
        self.flush()?;
        let id = self.id;
        self.tmp.commit()?;
        Ok(id)
    }
}

/// An open, header-checked pack.
#[derive(Debug)]
pub struct OpenPack {
    pub id: PackId,
    pub path: PathBuf,
    pub file: File,
}

impl OpenPack {
    /// Read `n` consecutive slots starting at `slot` into `dst` (`n * block_size` bytes).
    /// A pack too short for them is damage.
    ///
    /// # Errors
    /// `Format` when the pack is truncated; I/O errors.
    pub fn read_slots(&self, slot: u32, dst: &mut [u8], block_size: u32) -> Result<()> {
        let off = PACK_DATA_OFFSET + slot as u64 * block_size as u64;
        self.file.read_exact_at(dst, off).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Format {
                    path: self.path.clone(),
                    source: FormatError::Invalid {
                        what: "pack",
                        why: format!("truncated before slot {slot}"),
                    },
                }
            } else {
                Error::io("read", &self.path)(e)
            }
        })
    }
}

/// Recently used packs, kept open.
pub struct PackCache {
    dir: PathBuf,
    block_size: u32,
    /// Guards only the map; never held across I/O but the open of a missing entry.
    open: Mutex<lru::LruCache<PackId, Arc<OpenPack>>>,
}

impl PackCache {
    pub fn new(dir: PathBuf, block_size: u32) -> PackCache {
        PackCache {
            dir,
            block_size,
            open: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(256).expect("non-zero"),
            )),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The open pack `id`, opening and checking its header on first use.
    ///
    /// # Errors
    /// A missing pack or a damaged header: both `Format` (the store lost data).
    pub fn get(&self, id: PackId) -> Result<Arc<OpenPack>> {
        if let Some(p) = self.open.lock().get(&id) {
            return Ok(p.clone());
        }
        let path = pack_path(&self.dir, id);
        let fmt = |why: String| Error::Format {
            path: path.clone(),
            source: FormatError::Invalid { what: "pack", why },
        };
        let file = File::open(&path).map_err(|e| fmt(format!("cannot open: {e}")))?;
        let mut h = [0u8; PACK_HEADER_LEN];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| fmt(format!("cannot read header: {e}")))?;
        check_header(&h, id, self.block_size).map_err(|source| Error::Format {
            path: path.clone(),
            source,
        })?;
        let p = Arc::new(OpenPack { id, path, file });
        self.open.lock().put(id, p.clone());
        Ok(p)
    }

    /// Forget an open pack (after it was deleted).
    pub fn forget(&self, id: PackId) {
        self.open.lock().pop(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_damage() {
        let id = PackId::random().unwrap();
        let h = encode_header(id, 65536);
        assert_eq!(h.len(), PACK_DATA_OFFSET as usize);
        check_header(&h, id, 65536).unwrap();
        assert!(check_header(&h, id, 4096).is_err());
        assert!(check_header(&h, PackId([0; 16]), 65536).is_err());
        for n in 0..PACK_HEADER_LEN {
            assert!(check_header(&h[..n], id, 65536).is_err(), "len {n}");
        }
        for i in 0..PACK_HEADER_LEN * 8 {
            let mut c = h.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(check_header(&c, id, 65536).is_err(), "bit {i}");
        }
    }

    #[test]
    fn ids_print_and_parse() {
        let id = PackId::random().unwrap();
        assert_eq!(PackId::parse(&id.to_string()), Some(id));
        assert_eq!(PackId::parse("xyz"), None);
    }

    #[test]
    fn write_commit_read() {
        let d = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(d.path(), 4096).unwrap();
        let (s0, c0) = w.append(&[7u8; 4096]).unwrap();
        let (s1, c1) = w.append(&[9u8; 100]).unwrap();
        assert_eq!((s0, s1), (0, 1));
        let id = w.commit().unwrap();
        let cache = PackCache::new(d.path().to_path_buf(), 4096);
        let p = cache.get(id).unwrap();
        let mut b = vec![0u8; 8192];
        p.read_slots(0, &mut b, 4096).unwrap();
        assert_eq!(crc(&b[..4096]), c0);
        assert_eq!(crc(&b[4096..]), c1);
        assert_eq!(&b[4096..4196], &[9u8; 100][..]);
        assert!(b[4196..].iter().all(|&x| x == 0));
        assert!(p.read_slots(2, &mut b[..4096], 4096).is_err());
        // A missing pack is a format error, not a silent hole.
        assert!(matches!(
            cache.get(PackId([3; 16])),
            Err(Error::Format { .. })
        ));
    }

    #[test]
    fn uncommitted_pack_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut w = PackWriter::create(d.path(), 4096).unwrap();
            w.append(&[1u8; 4096]).unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
