//! Decoded blocks for point reads: a byte-bounded cache of verified, decompressed blocks, and
//! read-ahead that fills it for sequential readers.
//!
//! Why: a stored block costs a decompression and a hash check (about as much as reading it),
//! and the kernel sends a sequential reader's requests a few at a time, so a daemon that
//! decodes only what is asked waits on each request in turn with cores idle. Read-ahead decodes
//! the next blocks on background threads while the reader consumes the current ones; the cache
//! also lets small reads inside one block pay its check once. Only verified bytes ever enter the
//! cache (invariant 5), and it is bounded (invariant 7).

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::error::Result;
use crate::repo::repository::Repository;
use crate::repo::{BlobKind, BlobStore, Hash};

/// Decoded blocks kept: 32 MiB (512 blocks of 64 KiB), shared by every point a daemon serves.
pub const BLOCK_CACHE_BYTES: usize = 32 << 20;

/// Blocks by hash, and the bytes they hold.
type Lru = (lru::LruCache<Hash, Arc<Vec<u8>>>, usize);

/// A byte-bounded LRU of decoded blocks by hash. Coarse lock: it is held only to look up or
/// insert an `Arc`, never during decoding.
pub struct BlockCache {
    inner: Mutex<Lru>,
    capacity: usize,
    /// Blocks being decoded by read-ahead, so one block is decoded once.
    pending: Mutex<HashSet<Hash>>,
    /// Buffers of evicted blocks no reader held, for read-ahead to decode into, and the bytes
    /// they hold: a fresh zeroed 64 KiB buffer per block was 6 % of the daemon's CPU on a
    /// first sequential read.
    spare: Mutex<(Vec<Vec<u8>>, usize)>,
}

/// Bytes of spare buffers kept: one read-ahead window's worth (64 blocks of 64 KiB) beside
/// the cache's 32 MiB. Counted by capacity, since one cache serves stores of any block size.
const SPARE_BYTES: usize = 4 << 20;

impl BlockCache {
    pub fn new(capacity: usize) -> BlockCache {
        BlockCache {
            inner: Mutex::new((lru::LruCache::unbounded(), 0)),
            capacity,
            pending: Mutex::new(HashSet::new()),
            spare: Mutex::new((Vec::new(), 0)),
        }
    }

    pub fn get(&self, h: &Hash) -> Option<Arc<Vec<u8>>> {
        self.inner.lock().0.get(h).cloned()
    }

    pub fn insert(&self, h: Hash, block: Arc<Vec<u8>>) {
        if block.len() > self.capacity {
            return;
        }
        let mut g = self.inner.lock();
        let (lru, bytes) = &mut *g;
        if let Some(old) = lru.put(h, block.clone()) {
            *bytes -= old.len();
        }
        *bytes += block.len();
        let mut evicted = Vec::new();
        while *bytes > self.capacity {
            match lru.pop_lru() {
                Some((_, b)) => {
                    *bytes -= b.len();
                    evicted.push(b);
                }
                None => break,
            }
        }
        drop(g);
        for b in evicted {
            // Only a buffer no reader still holds (its bytes are overwritten before reuse),
            // and one that holds no more than its length, so the cache's count stays true.
            if let Ok(v) = Arc::try_unwrap(b)
                && v.len() == v.capacity()
            {
                let mut g = self.spare.lock();
                let (spare, bytes) = &mut *g;
                if *bytes + v.len() <= SPARE_BYTES {
                    *bytes += v.len();
                    spare.push(v);
                }
            }
        }
    }

    /// A buffer of `len` bytes to decode a block into: a spare one of that length when there
    /// is one (its old bytes are garbage the decoder overwrites, or the block never enters the
    /// cache), else a fresh one.
    fn buffer(&self, len: usize) -> Vec<u8> {
        let v = {
            let mut g = self.spare.lock();
            let (spare, bytes) = &mut *g;
            let v = spare.pop();
            *bytes -= v.as_ref().map_or(0, Vec::len);
            v
        };
        // A spare of another block size (another store's points) is dropped, not resized.
        v.filter(|v| v.len() == len)
            .unwrap_or_else(|| vec![0u8; len])
    }

    /// No read-ahead under way: every block it took on is cached or given up.
    #[cfg(test)]
    pub fn idle(&self) -> bool {
        self.pending.lock().is_empty()
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().1
    }
}

/// Decode block `h` through the cache: a hit costs a lookup, a miss reads, checks and keeps it.
///
/// # Errors
/// `Format` for a missing or damaged block; I/O failures.
pub fn fetch(repo: &Repository, cache: &BlockCache, h: &Hash) -> Result<Arc<Vec<u8>>> {
    if let Some(b) = cache.get(h) {
        return Ok(b);
    }
    let b = Arc::new(repo.get(BlobKind::Data, h)?);
    cache.insert(*h, b.clone());
    Ok(b)
}

type Job = Box<dyn FnOnce() + Send>;

/// Background decoders: one per core (at most 4), started at the first read-ahead and kept for
/// the life of the process. The queue is bounded; a read-ahead that finds it full is dropped
/// (the reader then decodes the block itself).
fn pool() -> &'static SyncSender<Job> {
    static POOL: OnceLock<SyncSender<Job>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(256);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let n = std::thread::available_parallelism()
            .map(NonZeroUsize::get)
            .unwrap_or(1)
            .clamp(1, 4);
        for i in 0..n {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("vmref-ahead-{i}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(g) => g.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
        }
        tx
    })
}

/// Blocks one read-ahead job decodes: its pack bytes come with one read when the backup
/// stored them together (1 MiB at 64 KiB blocks).
const RUN_BLOCKS: usize = 16;

/// Decode `hashes` into the cache in the background, skipping blocks already cached or on
/// their way, in runs of blocks with one pack read each. Errors are left for the reader to meet (and report) when it
/// asks for the block: a block that fails its check never enters the cache.
pub fn read_ahead(repo: &Arc<Repository>, cache: &Arc<BlockCache>, hashes: Vec<Hash>, bs: usize) {
    let mut want = Vec::with_capacity(hashes.len());
    {
        let mut pending = cache.pending.lock();
        for h in hashes {
            if !h.is_zero() && !want.contains(&h) && cache.get(&h).is_none() && pending.insert(h) {
                want.push(h);
            }
        }
    }
    if want.is_empty() {
        return;
    }
    for (i, run) in want.chunks(RUN_BLOCKS).enumerate() {
        let (repo, c, mine) = (repo.clone(), cache.clone(), run.to_vec());
        let job: Job = Box::new(move || {
            decode_run(&repo, &c, &mine, bs);
            let mut pending = c.pending.lock();
            for h in &mine {
                pending.remove(h);
            }
        });
        if pool().try_send(job).is_err() {
            // Queue full: drop this run and the rest (the reader decodes them itself).
            let mut pending = cache.pending.lock();
            for h in &want[i * RUN_BLOCKS..] {
                pending.remove(h);
            }
            return;
        }
    }
}

/// Decode `run` into the cache with one batch read; when the batch fails (a damaged or missing
/// block among them), each block alone, so the good ones are still cached.
fn decode_run(repo: &Repository, cache: &BlockCache, run: &[Hash], bs: usize) {
    let mut bufs: Vec<Vec<u8>> = run.iter().map(|_| cache.buffer(bs)).collect();
    let mut blobs: Vec<(Hash, &mut [u8])> = run
        .iter()
        .copied()
        .zip(bufs.iter_mut().map(Vec::as_mut_slice))
        .collect();
    if repo.read_data_into(&mut blobs).is_ok() {
        drop(blobs);
        for (h, b) in run.iter().zip(bufs) {
            cache.insert(*h, Arc::new(b));
        }
    } else {
        run.iter().for_each(|h| drop(fetch(repo, cache, h)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_keeps_recent_blocks() {
        let c = BlockCache::new(3 * 1000);
        for i in 0..10u8 {
            c.insert(Hash::of(&[i]), Arc::new(vec![i; 1000]));
            assert!(c.bytes() <= 3000);
        }
        assert!(c.get(&Hash::of(&[9])).is_some());
        assert!(c.get(&Hash::of(&[0])).is_none());
        c.insert(Hash::of(b"big"), Arc::new(vec![0; 5000]));
        assert!(c.get(&Hash::of(b"big")).is_none(), "larger than the cache");
    }

    #[test]
    fn evicted_buffers_no_reader_holds_are_reused_and_the_spares_are_bounded() {
        let c = BlockCache::new(1000);
        let held = Arc::new(vec![1u8; 1000]);
        c.insert(Hash::of(b"held"), held.clone());
        c.insert(Hash::of(b"a"), Arc::new(vec![2u8; 1000]));
        assert!(
            c.spare.lock().0.is_empty(),
            "a buffer a reader holds was kept for reuse"
        );
        assert_eq!(*held, vec![1u8; 1000]);
        c.insert(Hash::of(b"b"), Arc::new(vec![3u8; 1000]));
        assert_eq!(c.spare.lock().0.len(), 1);
        let v = c.buffer(1000);
        assert_eq!((v.len(), v[0]), (1000, 2), "not the evicted block's buffer");
        assert_eq!(*c.spare.lock(), (vec![], 0));
        // A spare of another size is never handed out resized: a fresh buffer instead, whose
        // capacity is its length (the cache counts blocks by length).
        c.insert(Hash::of(b"c"), Arc::new(vec![4u8; 1000]));
        assert_eq!(c.spare.lock().1, 1000);
        let v = c.buffer(700);
        assert_eq!((v.len(), v.capacity(), v[0]), (700, 700, 0));
        assert_eq!(*c.spare.lock(), (vec![], 0));
        // A buffer with room beyond its length is not kept.
        let mut roomy = vec![5u8; 1000];
        roomy.reserve(4000);
        c.insert(Hash::of(b"roomy"), Arc::new(roomy));
        assert_eq!(c.buffer(1000)[0], 4, "c's buffer, evicted by roomy");
        c.insert(Hash::of(b"d"), Arc::new(vec![6u8; 1000]));
        assert!(
            c.spare.lock().0.is_empty(),
            "a buffer larger than its length was kept"
        );
        // The spares are bounded in bytes.
        for i in 0..(3 * SPARE_BYTES / 1000) {
            c.insert(Hash::of(&i.to_le_bytes()), Arc::new(vec![0u8; 1000]));
        }
        let (n, bytes) = {
            let g = c.spare.lock();
            (g.0.len(), g.1)
        };
        assert_eq!((n * 1000, bytes), (bytes, SPARE_BYTES / 1000 * 1000));
    }
}
