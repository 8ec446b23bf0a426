//! Moving blobs between repositories in their stored (compressed) form: a replication sender
//! reads a block as stored, a receiver checks it against its hash and keeps the same bytes,
//! so neither end compresses again.
//!
//! "Stored form" is the compressed plaintext: an encrypted repository seals whole objects
//! below this layer (`seal.rs`), so what moves is never one repository's ciphertext, and the
//! receiver seals it under its own key. The hash that travels is always the plain BLAKE3 of
//! the raw bytes (`stream_hash`), whatever either end's key: each end names the blob by its
//! own id (`Repository::id_of`).

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

    /// The key-independent hash of blob `id` (read as `s`) that a stream carries: the plain
    /// BLAKE3 of its raw bytes. Free where ids are plain; an encrypted repository decodes.
    ///
    /// # Errors
    /// `Format` when the bytes do not decode or are not the blob's.
    pub fn stream_hash(&self, id: &Hash, s: &StoredBlob) -> Result<Hash> {
        if self.plain_ids() {
            return Ok(*id);
        }
        let raw = compress::decompress(s.codec, &s.bytes, s.raw_len as usize)
            .map_err(|why| damaged(id, why))?;
        if self.id_of(&raw) != *id {
            return Err(damaged(id, "bytes do not match the hash"));
        }
        Ok(Hash::of(&raw))
    }

    /// Store a blob that arrived in stored form with `hash`, the plain BLAKE3 of its raw
    /// bytes, unless it is held already: decoded and checked against `hash` first, then kept
    /// as it came (or raw, in a repository that does not compress). Returns the blob's id
    /// here (`id_of`), or `None`, storing nothing, when the bytes are not `hash`'s.
    ///
    /// # Errors
    /// I/O failures.
    pub fn put_stored(
        &self,
        kind: BlobKind,
        hash: &Hash,
        blob: &StoredBlob,
    ) -> Result<Option<Hash>> {
        let _gc = self.gc_lock.read();
        let raw = match compress::decompress(blob.codec, &blob.bytes, blob.raw_len as usize) {
            Ok(r) => r,
            Err(_) => return Ok(None),
        };
        if Hash::of(&raw) != *hash {
            return Ok(None);
        }
        let id = self.id_of(&raw);
        if self.contains(&id)? && !self.is_damaged(&id) {
            return Ok(Some(id));
        }
        if self.config.compression == Compression::None && blob.codec != Codec::Raw {
            self.insert(kind, id, Codec::Raw, &raw, raw.len())?;
        } else {
            self.insert(kind, id, blob.codec, &blob.bytes, raw.len())?;
        }
        Ok(Some(id))
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
        assert_eq!(b.put_stored(BlobKind::Data, &h, &bad).unwrap(), None);
        assert!(!b.contains(&h).unwrap());
        assert_eq!(
            b.put_stored(BlobKind::Data, &Hash::of(b"x"), &s).unwrap(),
            None
        );
        assert_eq!(b.put_stored(BlobKind::Data, &h, &s).unwrap(), Some(h));
        b.flush().unwrap();
        assert_eq!(b.get(BlobKind::Data, &h).unwrap(), data);
        assert!(a.get_stored(BlobKind::Data, &Hash::of(b"nothing")).is_err());
    }

    #[test]
    fn blobs_move_between_keys_by_their_plain_hash() {
        use crate::repo::key::RepoKey;
        let (ka, kb) = (RepoKey::generate().unwrap(), RepoKey::generate().unwrap());
        let mk = |k: Option<&RepoKey>| {
            Repository::init_with_key(Arc::new(MemBackend::new()), RepoOptions::default(), k)
                .unwrap()
        };
        let (a, b, c) = (mk(Some(&ka)), mk(Some(&kb)), mk(None));
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 13 % 255) as u8).collect();
        let ia = a.put(BlobKind::Data, &data).unwrap();
        a.flush().unwrap();
        assert_ne!(ia, Hash::of(&data), "keyed id");
        let s = a.get_stored(BlobKind::Data, &ia).unwrap();
        let plain = a.stream_hash(&ia, &s).unwrap();
        assert_eq!(plain, Hash::of(&data));
        // The keyed id itself is not what travels: a receiver refuses it.
        assert_eq!(b.put_stored(BlobKind::Data, &ia, &s).unwrap(), None);
        let ib = b.put_stored(BlobKind::Data, &plain, &s).unwrap().unwrap();
        let ic = c.put_stored(BlobKind::Data, &plain, &s).unwrap().unwrap();
        assert_ne!(ib, ia);
        assert_eq!(ic, plain);
        b.flush().unwrap();
        c.flush().unwrap();
        assert_eq!(b.get(BlobKind::Data, &ib).unwrap(), data);
        assert_eq!(c.get(BlobKind::Data, &ic).unwrap(), data);
        // And back from the plain one into a keyed one.
        let sc = c.get_stored(BlobKind::Data, &ic).unwrap();
        assert_eq!(c.stream_hash(&ic, &sc).unwrap(), plain);
        assert_eq!(a.put_stored(BlobKind::Data, &plain, &sc).unwrap(), Some(ia));
    }
}
