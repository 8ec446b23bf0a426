//! Batch reads of data blobs, for restores and read-ahead: many blocks decoded straight into
//! the caller's buffers with few, large pack reads.
//!
//! Why: a sequential reader of a point wants runs of blocks that a backup stored next to each
//! other in one pack. Reading them one ranged read at a time costs a syscall and, cold, a disk
//! round trip per 64 KiB; one read of the whole run costs one of each. Every blob is still
//! checked on its own exactly as `BlobStore::get` checks it (CRC of the stored bytes, kind,
//! decompression to the exact length, BLAKE3 against its name) before the call succeeds
//! (invariant 5): a failed check fails the whole batch, and the caller's buffers are then
//! garbage it must not use.

use std::cell::RefCell;

use crate::error::Result;
use crate::repo::backend::is_missing;
use crate::repo::index::IndexEntry;
use crate::repo::{BlobKind, BlobStore, Hash, compress, damaged};

use super::Repository;

/// Largest single pack read of a batch: bounds the per-thread scratch buffer.
pub const RUN_BYTES: u64 = 4 << 20;
/// Bytes of other blobs a run may read through to join two wanted ones: cheaper than a second
/// read when they sit this close.
const RUN_GAP: u64 = 64 << 10;

thread_local! {
    /// Stored bytes of the run being decoded; reused across batches of one thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Repository {
    /// One blob through `get`, which knows pending blobs and re-reads a stale index.
    fn get_one_into(&self, (h, out): &mut (Hash, &mut [u8])) -> Result<()> {
        let b = self.get(BlobKind::Data, h)?;
        if b.len() != out.len() {
            return Err(damaged(
                h,
                format!("holds {} bytes, wanted {}", b.len(), out.len()),
            ));
        }
        out.copy_from_slice(&b);
        Ok(())
    }

    /// Check and decode one stored blob into `out` (exactly its raw length).
    fn decode_into(&self, e: &IndexEntry, stored: &[u8], out: &mut [u8]) -> Result<()> {
        let h = &e.entry.hash;
        if stored.len() != e.entry.stored_len as usize {
            return Err(damaged(h, "short read"));
        }
        if crc32c::crc32c(stored) != e.entry.crc {
            return Err(damaged(
                h,
                format!(
                    "stored bytes in pack {} at {} fail their checksum",
                    e.pack, e.entry.offset
                ),
            ));
        }
        if e.entry.kind != BlobKind::Data {
            return Err(damaged(
                h,
                format!("stored as {:?}, wanted Data", e.entry.kind),
            ));
        }
        if e.entry.raw_len as usize != out.len() {
            return Err(damaged(
                h,
                format!("holds {} bytes, wanted {}", e.entry.raw_len, out.len()),
            ));
        }
        compress::decompress_into(e.entry.codec, stored, out).map_err(|why| damaged(h, why))?;
        if self.id_of(out) != *h {
            return Err(damaged(h, "bytes do not match the hash"));
        }
        Ok(())
    }

    /// Where each of `hashes` is stored, by the index snapshot; None for a blob the snapshot
    /// does not name or that a running backup holds pending (read through `get` instead, which
    /// knows those). A caller that both hints and reads the same blobs locates them once.
    ///
    /// # Errors
    /// A damaged index; I/O failures.
    pub fn locate_data(&self, hashes: &[Hash]) -> Result<Vec<Option<IndexEntry>>> {
        let pending: Vec<bool> = {
            let g = self.w.lock();
            if g.pending.is_empty() {
                vec![false; hashes.len()]
            } else {
                hashes.iter().map(|h| g.pending.contains_key(h)).collect()
            }
        };
        hashes
            .iter()
            .zip(pending)
            .map(|(h, p)| if p { Ok(None) } else { self.lookup(h) })
            .collect()
    }

    /// Decode data blobs into the caller's buffers: `blobs[i].1` receives the bytes of blob
    /// `blobs[i].0` and must be exactly its length (a whole block). Blobs stored near each other
    /// in one pack are read together, up to `RUN_BYTES` a read.
    ///
    /// # Errors
    /// `Format` for a missing or damaged blob (then no buffer may be used); I/O failures.
    pub fn read_data_into(&self, blobs: &mut [(Hash, &mut [u8])]) -> Result<()> {
        let hashes: Vec<Hash> = blobs.iter().map(|(h, _)| *h).collect();
        let found = self.locate_data(&hashes)?;
        self.read_located_into(found, blobs)
    }

    /// `read_data_into` with the blobs already located (`locate_data` of the same hashes, in
    /// the same order).
    ///
    /// # Errors
    /// As `read_data_into`.
    pub fn read_located_into(
        &self,
        found: Vec<Option<IndexEntry>>,
        blobs: &mut [(Hash, &mut [u8])],
    ) -> Result<()> {
        if found.len() != blobs.len() {
            return Err(crate::error::Error::Internal(format!(
                "{} blobs located for {} buffers",
                found.len(),
                blobs.len()
            )));
        }
        let mut order: Vec<(IndexEntry, usize)> = Vec::with_capacity(blobs.len());
        for (i, f) in found.into_iter().enumerate() {
            match f {
                Some(e) => order.push((e, i)),
                // Pending, or named by an index this snapshot does not hold yet.
                None => self.get_one_into(&mut blobs[i])?,
            }
        }
        order.sort_by_key(|(e, _)| (e.pack, e.entry.offset));
        SCRATCH.with_borrow_mut(|scratch| {
            let mut at = 0;
            while at < order.len() {
                let (first, _) = order[at];
                let start = first.entry.offset;
                let mut end = start + first.entry.stored_len as u64;
                let mut next = at + 1;
                while let Some((e, _)) = order.get(next) {
                    let e_end = e.entry.offset + e.entry.stored_len as u64;
                    if e.pack != first.pack
                        || e.entry.offset < end
                        || e.entry.offset - end > RUN_GAP
                        || e_end - start > RUN_BYTES
                    {
                        break;
                    }
                    end = e_end;
                    next += 1;
                }
                let len = (end - start) as usize;
                if scratch.len() < len {
                    scratch.resize(len, 0);
                }
                let run = &mut scratch[..len];
                let name = first.pack.object_name();
                for _ in at..next {
                    crate::repo::faults::before_read(BlobKind::Data, &name)?;
                }
                match self.backend.get_range_into(&name, start, run) {
                    Ok(()) => {
                        for (e, i) in &order[at..next] {
                            let off = (e.entry.offset - start) as usize;
                            let stored = &run[off..off + e.entry.stored_len as usize];
                            self.decode_into(e, stored, &mut *blobs[*i].1)?;
                        }
                    }
                    // Another store sharing the repository compacted this pack after our
                    // index snapshot: `get` re-reads the index and finds the blobs' new place.
                    Err(err) if is_missing(&err) => {
                        for (_, i) in &order[at..next] {
                            self.get_one_into(&mut blobs[*i])?;
                        }
                    }
                    // The run spans bytes no blob asked for (gaps, the old copy of a blob
                    // stored again elsewhere): in an encrypted repository their damage fails
                    // the whole read. Each blob alone then fails only for its own damage.
                    Err(_) if next - at > 1 => {
                        let mut one = Vec::new();
                        for (e, i) in &order[at..next] {
                            one.resize(e.entry.stored_len as usize, 0);
                            self.backend
                                .get_range_into(&name, e.entry.offset, &mut one)?;
                            self.decode_into(e, &one, &mut *blobs[*i].1)?;
                        }
                    }
                    Err(e) => return Err(e),
                }
                at = next;
            }
            Ok(())
        })
    }

    /// Hint the backend that the located blobs will be read soon (the local backend asks the
    /// kernel to read their pack ranges ahead), one hint per run of nearby blobs. Blobs not
    /// located are skipped: the read that follows meets them.
    pub fn prefetch_located(&self, found: &[Option<IndexEntry>]) {
        let mut runs: Vec<(IndexEntry, u64)> = Vec::new();
        let mut entries: Vec<IndexEntry> = found.iter().flatten().copied().collect();
        entries.sort_by_key(|e| (e.pack, e.entry.offset));
        for e in entries {
            let e_end = e.entry.offset + e.entry.stored_len as u64;
            match runs.last_mut() {
                Some((f, end))
                    if f.pack == e.pack
                        && e.entry.offset >= *end
                        && e.entry.offset - *end <= RUN_GAP =>
                {
                    *end = e_end;
                }
                _ => runs.push((e, e_end)),
            }
        }
        for (f, end) in runs {
            self.backend
                .prefetch(&f.pack.object_name(), f.entry.offset, end - f.entry.offset);
        }
    }
}
