//! Healing damaged blobs: a blob whose stored copy fails its checks can be stored again from
//! good bytes found elsewhere (`verify --repair` reads them from a live disk that tracking
//! proves unchanged). The new copy goes into a new pack and index object; lookups read the
//! newest index first, so it shadows the damaged one, which garbage collection later drops
//! with its pack. Blobs known damaged are also stored again by the next put of their bytes
//! (a backup), instead of being deduplicated against the bad copy; the flush that makes the
//! new copy durable forgets the damage.

use crate::error::Result;
use crate::repo::compress;
use crate::repo::{BlobKind, Hash};

use super::Repository;

impl Repository {
    /// Remember blobs whose stored copy is damaged.
    pub fn mark_damaged(&self, hashes: impl IntoIterator<Item = Hash>) {
        self.damaged.write().extend(hashes);
    }

    pub fn is_damaged(&self, h: &Hash) -> bool {
        self.damaged.read().contains(h)
    }

    /// Blobs known damaged and not stored again yet.
    pub fn damaged(&self) -> Vec<Hash> {
        self.damaged.read().iter().copied().collect()
    }

    /// Store `data` again as a new copy of blob `hash`, even though a (damaged) copy is
    /// indexed. Returns false, storing nothing, when the bytes are not the blob's.
    ///
    /// # Errors
    /// I/O failures.
    pub fn store_again(&self, kind: BlobKind, hash: &Hash, data: &[u8]) -> Result<bool> {
        if self.id_of(data) != *hash {
            return Ok(false);
        }
        let _gc = self.gc_lock.read();
        let (codec, stored) = compress::compress(self.config.compression, data);
        self.insert(kind, *hash, codec, &stored, data.len())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::repo::BlobStore;
    use crate::repo::backend::{Backend, MemBackend};
    use crate::repo::repository::RepoOptions;

    /// Damage every pack's bytes in place.
    fn damage_packs(b: &MemBackend) {
        for name in b.list("packs/").unwrap() {
            let mut bytes = b.get(&name).unwrap().to_vec();
            bytes[20] ^= 0xff;
            b.overwrite(&name, bytes);
        }
    }

    #[test]
    fn a_damaged_blob_is_stored_again_and_shadows_the_bad_copy() {
        let b = Arc::new(MemBackend::new());
        let r = Repository::init(b.clone(), RepoOptions::default()).unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        let h = r.put(BlobKind::Data, &data).unwrap();
        r.flush().unwrap();
        damage_packs(&b);
        let r = Repository::open(b.clone()).unwrap();
        assert!(r.get(BlobKind::Data, &h).is_err());
        // A plain put dedups against the bad copy...
        r.put(BlobKind::Data, &data).unwrap();
        r.flush().unwrap();
        assert!(r.get(BlobKind::Data, &h).is_err());
        // ...unless the blob is known damaged.
        r.mark_damaged([h]);
        assert!(!r.store_again(BlobKind::Data, &h, b"other bytes").unwrap());
        r.put(BlobKind::Data, &data).unwrap();
        r.flush().unwrap();
        assert_eq!(r.get(BlobKind::Data, &h).unwrap(), data);
        assert_eq!(
            Repository::open(b)
                .unwrap()
                .get(BlobKind::Data, &h)
                .unwrap(),
            data
        );
        assert!(r.damaged().is_empty());
    }
}
