//! Rebuilding the index from the packs: every pack says what it holds in its own table, so a
//! repository whose index objects are lost or damaged can be made whole again from its packs.
//!
//! Crash safety: the new index objects are written before any old one is deleted; a crash
//! leaves both, and the newer ones are consulted first.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::Result;
use crate::repo::Hash;
use crate::repo::backend::{Backend, is_missing};
use crate::repo::index::{self, INDEX_PREFIX, IndexEntry, IndexFile, IndexSet};
use crate::repo::pack::{self, PackId};
use crate::repo::repository::Repository;

/// Index objects are written every this many entries while packs are read, so memory stays
/// bounded; they are merged into one at the end.
const REBUILD_BATCH: usize = 1 << 18;

/// What a rebuild found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub packs: u64,
    pub blobs: u64,
    /// Packs whose table could not be read: their blobs are not in the new index.
    pub bad_packs: Vec<String>,
}

/// Replace the index of the repository in `backend` with one read from its packs. Works on a
/// repository that does not open (damaged index objects); nothing may write to it meanwhile.
///
/// # Errors
/// I/O failures listing or writing (the old index objects are then left in place).
pub fn rebuild_index(backend: &Arc<dyn Backend>) -> Result<RebuildReport> {
    let be = &**backend;
    let old = be.list(INDEX_PREFIX)?;
    let mut seq = old
        .iter()
        .filter_map(|n| index::index_seq(n))
        .max()
        .unwrap_or(0);
    let mut rep = RebuildReport::default();
    let mut written: Vec<String> = Vec::new();
    let mut batch: Vec<IndexEntry> = Vec::new();
    let mut write = |batch: &mut Vec<IndexEntry>, seq: &mut u64| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        *seq += 1;
        let name = index::index_name(*seq)?;
        be.put_if_absent(&name, &index::encode(batch))?;
        written.push(name);
        batch.clear();
        Ok(())
    };
    for name in be.list("packs/")? {
        let Some(id) = PackId::from_object_name(&name) else {
            continue;
        };
        match pack::read_table(be, id) {
            Ok(entries) => {
                rep.packs += 1;
                rep.blobs += entries.len() as u64;
                batch.extend(
                    entries
                        .into_iter()
                        .map(|entry| IndexEntry { pack: id, entry }),
                );
            }
            Err(e) if is_missing(&e) => {}
            Err(e) => {
                log::warn!("rebuild: {e}");
                rep.bad_packs.push(name);
            }
        }
        if batch.len() >= REBUILD_BATCH {
            write(&mut batch, &mut seq)?;
        }
    }
    write(&mut batch, &mut seq)?;
    // Merge the batches into one index object, newest first so that when two packs hold a
    // blob one copy is kept.
    if written.len() > 1 {
        let files = written
            .iter()
            .rev()
            .map(|n| IndexFile::open(be, n).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let set = IndexSet::new(files);
        let name = index::index_name(seq + 1)?;
        index::merge(be, &set, &HashSet::new(), &name)?;
        for n in &written {
            be.delete(n)?;
        }
        written = vec![name];
    }
    let keep: HashSet<&String> = written.iter().collect();
    for n in old.iter().filter(|n| !keep.contains(n)) {
        be.delete(n)?;
    }
    rep.blobs = match written.first() {
        Some(n) => IndexFile::open(be, n)?.count(),
        None => 0,
    };
    Ok(rep)
}

/// What `Repository::verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs: u64,
    pub bytes: u64,
    /// Blobs that could not be read back exact, with why (at most `MAX_REPORTED`).
    pub damaged: Vec<(Hash, String)>,
    pub damaged_count: u64,
}

/// Damaged blobs named one by one in a report; the rest are counted.
pub const MAX_REPORTED: usize = 100;

impl Repository {
    /// Read back every blob the index names (the newest entry of each hash) and check it:
    /// CRC of the stored bytes, decompression, BLAKE3. Streams the index; one blob in memory.
    ///
    /// # Errors
    /// A damaged index object (the blobs it names cannot be found); listing failures.
    /// Damaged blobs are reported, not errors.
    pub fn verify(&self) -> Result<VerifyReport> {
        let set = self.index.read().clone();
        let mut rep = VerifyReport::default();
        let mut s = set.stream(&*self.backend);
        let mut last = None;
        while let Some(x) = s.next_entry()? {
            let e = x.entry;
            if last == Some(e.entry.hash) {
                continue;
            }
            last = Some(e.entry.hash);
            rep.blobs += 1;
            match self.read_from_pack(&e, e.entry.kind) {
                Ok(b) => rep.bytes += b.len() as u64,
                Err(err) => {
                    rep.damaged_count += 1;
                    if rep.damaged.len() < MAX_REPORTED {
                        rep.damaged.push((e.entry.hash, err.to_string()));
                    }
                }
            }
        }
        Ok(rep)
    }

    /// Fold all index objects into one when there are more than `max_objects` (every flush
    /// adds one, and a lookup that misses reads a bucket of each). Returns how many objects
    /// were merged (0 when there were few enough). Crash-safe: the merged object is written
    /// before the others are deleted.
    ///
    /// # Errors
    /// A damaged index object; I/O failures.
    pub fn merge_index(&self, max_objects: usize) -> Result<usize> {
        let _excl = self.gc_lock.write();
        self.flush()?;
        let set = self.index.read().clone();
        let n = set.files().len();
        if n <= max_objects.max(1) {
            return Ok(0);
        }
        let name = index::index_name(self.next_seq.fetch_add(1, Ordering::Relaxed))?;
        index::merge(&*self.backend, &set, &HashSet::new(), &name)?;
        for f in set.files() {
            self.backend.delete(&f.name)?;
        }
        self.refresh()?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::backend::MemBackend;
    use crate::repo::compress::Compression;
    use crate::repo::repository::RepoOptions;
    use crate::repo::{BlobKind, BlobStore};

    #[test]
    fn index_rebuilt_from_packs_reads_everything() {
        let b = Arc::new(MemBackend::new());
        let be: Arc<dyn Backend> = b.clone();
        let r = Repository::init(
            be.clone(),
            RepoOptions {
                compression: Compression::Zstd { level: 1 },
                pack_target: 4000,
            },
        )
        .unwrap();
        let data: Vec<Vec<u8>> = (0..60u32)
            .map(|i| format!("{i:>8}").repeat(300).into_bytes())
            .collect();
        let hs: Vec<_> = data
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if i % 20 == 19 {
                    r.flush().unwrap();
                }
                r.put(BlobKind::Data, d).unwrap()
            })
            .collect();
        r.flush().unwrap();
        drop(r);
        // Damage one index object: the repository no longer opens.
        let ix = b.list("index/").unwrap();
        assert!(ix.len() >= 3);
        b.flip(&ix[0], 5, 1);
        assert!(Repository::open(be.clone()).is_err());
        let rep = rebuild_index(&be).unwrap();
        assert_eq!(rep.blobs, 60);
        assert!(rep.bad_packs.is_empty());
        assert_eq!(b.list("index/").unwrap().len(), 1);
        let r = Repository::open(be.clone()).unwrap();
        for (h, d) in hs.iter().zip(&data) {
            assert_eq!(&r.get(BlobKind::Data, h).unwrap(), d);
        }
        // A pack with a damaged table is reported; the others still index.
        let p = b.list("packs/").unwrap()[0].clone();
        let n = b.size(&p).unwrap() as usize;
        b.flip(&p, n - 20, 1);
        let rep = rebuild_index(&be).unwrap();
        assert_eq!(rep.bad_packs, vec![p]);
        assert!(rep.blobs < 60 && rep.blobs > 0);
    }

    #[test]
    fn verify_names_damaged_and_missing_blobs() {
        let b = Arc::new(MemBackend::new());
        let r = Repository::init(
            b.clone(),
            RepoOptions {
                compression: Compression::None,
                pack_target: 3000,
            },
        )
        .unwrap();
        let hs: Vec<_> = (0..30u32)
            .map(|i| {
                r.put(BlobKind::Data, format!("{i:>6}").repeat(200).as_bytes())
                    .unwrap()
            })
            .collect();
        r.flush().unwrap();
        let rep = r.verify().unwrap();
        assert_eq!((rep.blobs, rep.damaged_count), (30, 0));
        assert_eq!(rep.bytes, 30 * 1200);
        // Damage one blob's stored bytes and delete another's pack.
        let e = r.lookup(&hs[3]).unwrap().unwrap();
        b.flip(&e.pack.object_name(), e.entry.offset as usize, 4);
        let gone = r.lookup(&hs[20]).unwrap().unwrap().pack;
        assert_ne!(gone, e.pack);
        let in_gone = hs
            .iter()
            .filter(|h| r.lookup(h).unwrap().unwrap().pack == gone)
            .count() as u64;
        b.delete(&gone.object_name()).unwrap();
        let rep = r.verify().unwrap();
        assert_eq!(rep.damaged_count, 1 + in_gone);
        assert!(rep.damaged.iter().any(|(h, _)| *h == hs[3]));
        assert!(rep.damaged.iter().any(|(h, _)| *h == hs[20]));
    }

    #[test]
    fn many_index_objects_merge_into_one() {
        let b = Arc::new(MemBackend::new());
        let r = Repository::init(b.clone(), RepoOptions::default()).unwrap();
        let hs: Vec<_> = (0..10u32)
            .map(|i| {
                let h = r.put(BlobKind::Map, &i.to_le_bytes()).unwrap();
                r.flush().unwrap();
                h
            })
            .collect();
        assert_eq!(b.list("index/").unwrap().len(), 10);
        assert_eq!(r.merge_index(16).unwrap(), 0);
        assert_eq!(r.merge_index(4).unwrap(), 10);
        assert_eq!(b.list("index/").unwrap().len(), 1);
        for (i, h) in hs.iter().enumerate() {
            assert_eq!(r.get(BlobKind::Map, h).unwrap(), (i as u32).to_le_bytes());
        }
        let st = r.stats().unwrap();
        assert_eq!((st.blobs, st.index_objects), (10, 1));
    }
}
