//! Moving blobs between repositories in their stored (compressed) form: a replication sender
//! reads a block as stored, a receiver checks it against its hash and keeps the same bytes,
//! so neither end compresses again.

use crate::error::Result;
use crate::repo::compress::{self, Codec, Compression};
use crate::repo::{BlobKind, Hash, damaged};

use super::{NOT_STORED, Repository};

/// A blob as a repository stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub codec: Codec,
    pub bytes: Vec<u8>,
    pub raw_len: u32,
}

impl Repository {
    /// The stored bytes of committed blob `hash`, their CRC checked (not decompressed: the
    /// receiving end checks them against the hash).
    ///
    /// # Errors
    /// `Format` for a missing blob or damaged bytes; I/O failures.
    pub fn get_stored(&self, kind: BlobKind, hash: &Hash) -> Result<StoredBlob> {
        match self.read_stored_form(kind, hash) {
            // Our snapshot of the index may be stale (a collection compacted the pack this
            // blob was in): re-read the index list once and look again, as `get` does.
            Err(e) if crate::repo::backend::is_missing(&e) || super::is_absent(&e) => {
                self.refresh()?;
                self.read_stored_form(kind, hash)
            }
            r => r,
        }
    }

    fn read_stored_form(&self, kind: BlobKind, hash: &Hash) -> Result<StoredBlob> {
        let e = self
            .lookup(hash)?
            .ok_or_else(|| damaged(hash, NOT_STORED))?;
        crate::repo::faults::before_read(kind, &e.pack.object_name())?;
        let stored = self.backend.get_range(
            &e.pack.object_name(),
            e.entry.offset,
            e.entry.stored_len as usize,
        )?;
        if stored.len() != e.entry.stored_len as usize || crc32c::crc32c(&stored) != e.entry.crc {
            return Err(damaged(
                hash,
                format!(
                    "stored bytes in pack {} at {} fail their checksum",
                    e.pack, e.entry.offset
                ),
            ));
        }
        if e.entry.kind != kind {
            return Err(damaged(
                hash,
                format!("stored as {:?}, wanted {kind:?}", e.entry.kind),
            ));
        }
        Ok(StoredBlob {
            codec: e.entry.codec,
            bytes: stored,
            raw_len: e.entry.raw_len,
        })
    }

    /// Store a blob that arrived in stored form, unless `hash` is held already: decoded and
    /// checked against `hash` first, then kept as it came (or raw, in a repository that does
    /// not compress). Returns whether the bytes matched; nothing is stored when they do not.
    ///
    /// # Errors
    /// I/O failures.
    pub fn put_stored(&self, kind: BlobKind, hash: &Hash, blob: &StoredBlob) -> Result<bool> {
        let _gc = self.gc_lock.read();
        let raw = match compress::decompress(blob.codec, &blob.bytes, blob.raw_len as usize) {
            Ok(r) => r,
            Err(_) => return Ok(false),
        };
        if Hash::of(&raw) != *hash {
            return Ok(false);
        }
        if self.contains(hash)? {
            return Ok(true);
        }
        if self.config.compression == Compression::None && blob.codec != Codec::Raw {
            self.insert(kind, *hash, Codec::Raw, &raw, raw.len())?;
        } else {
            self.insert(kind, *hash, blob.codec, &blob.bytes, raw.len())?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::repo::BlobStore;
    use crate::repo::backend::MemBackend;
    use crate::repo::repository::RepoOptions;

    #[test]
    fn a_blob_moves_in_stored_form() {
        let a = Repository::init(Arc::new(MemBackend::new()), RepoOptions::default()).unwrap();
        let b = Repository::init(Arc::new(MemBackend::new()), RepoOptions::default()).unwrap();
        let data = vec![42u8; 65536];
        let h = a.put(BlobKind::Data, &data).unwrap();
        a.flush().unwrap();
        let s = a.get_stored(BlobKind::Data, &h).unwrap();
        assert_eq!(s.codec, Codec::Zstd);
        assert!(s.bytes.len() < 1000);
        let mut bad = s.clone();
        bad.bytes[0] ^= 1;
        assert!(!b.put_stored(BlobKind::Data, &h, &bad).unwrap());
        assert!(!b.contains(&h).unwrap());
        assert!(!b.put_stored(BlobKind::Data, &Hash::of(b"x"), &s).unwrap());
        assert!(b.put_stored(BlobKind::Data, &h, &s).unwrap());
        b.flush().unwrap();
        assert_eq!(b.get(BlobKind::Data, &h).unwrap(), data);
        assert!(a.get_stored(BlobKind::Data, &Hash::of(b"nothing")).is_err());
    }
}
