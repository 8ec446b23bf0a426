//! Synthesized images: the bytes of a disk at a restorable point, read through the point's own
//! map (at most a few cached node reads per block, at any chain depth: invariant 6), with every
//! stored block checked against its hash before a byte of it is returned (invariant 5). Holes
//! read as zeros without I/O.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::image::ImageSource;
use crate::repo::map::MapRoot;
use crate::store::Store;
use crate::store::records::RefRecord;

use super::data::{Data, map_of};

/// A restorable point's image of one disk.
pub struct PointImage {
    data: Arc<Data>,
    map: MapRoot,
    size: u64,
    bs: u64,
    data_blocks: u64,
    /// Where the last read ended, to tell a sequential reader.
    last_end: AtomicU64,
    /// First block read-ahead has not been asked for yet.
    ahead: AtomicU64,
}

impl PointImage {
    /// The image of `disk` in point `rec`.
    ///
    /// # Errors
    /// `NotRestorable`, `NoSuchDisk`, or `Format` for a record without a readable map.
    pub fn open(store: &Store, data: Arc<Data>, rec: &RefRecord, disk: &str) -> Result<PointImage> {
        let (map, data_blocks) = map_of(store, rec, disk)?;
        let size = rec.disks.get(disk).map(|d| d.size).unwrap_or_default();
        Ok(PointImage {
            data,
            map,
            size,
            bs: store.block_size() as u64,
            data_blocks,
            last_end: AtomicU64::new(u64::MAX),
            ahead: AtomicU64::new(0),
        })
    }
}

/// Blocks a read must span before it is split over threads.
const PARALLEL_MIN_BLOCKS: usize = 4;

/// Threads one read may use: the machine's cores, at most 8.
fn read_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8)
    })
}

/// How far ahead of a sequential reader blocks are decoded.
const READ_AHEAD_BYTES: u64 = 4 << 20;

impl PointImage {
    /// A read that starts near where the last one ended is sequential: ask for the blocks of
    /// the next `READ_AHEAD_BYTES` not asked for yet. (The kernel's requests of one reader
    /// arrive on several threads slightly out of order, hence "near".)
    fn read_ahead(&self, off: u64, n: u64) {
        let end = off + n;
        let last = self.last_end.swap(end, Ordering::Relaxed);
        if last == u64::MAX || off.abs_diff(last) > READ_AHEAD_BYTES {
            return;
        }
        let next = end.div_ceil(self.bs);
        let to = ((end + READ_AHEAD_BYTES) / self.bs).min(self.map.nblocks);
        // Resume where the last read-ahead stopped, unless the reader is elsewhere now (a
        // second pass from the start): then from the reader. Two threads racing here at worst
        // ask for a block twice, which the cache's pending set absorbs.
        let a = self.ahead.swap(to.max(next), Ordering::Relaxed);
        let from = if (next..=to).contains(&a) { a } else { next };
        if from >= to {
            return;
        }
        let mut hashes = Vec::with_capacity((to - from) as usize);
        for r in self.data.maps.data_runs(&self.map, from..to) {
            match r {
                Ok((_, h)) => hashes.push(h),
                // The reader meets (and reports) the damage when it gets there.
                Err(_) => break,
            }
        }
        super::blocks::read_ahead(&self.data.repo, &self.data.blocks, hashes);
    }

    /// Fill `dst` from block `b`, starting `inb` bytes into it.
    fn read_block(&self, b: u64, inb: usize, dst: &mut [u8]) -> Result<()> {
        let h = self.data.maps.lookup(&self.map, b)?;
        if h.is_zero() {
            dst.fill(0);
        } else {
            let block = self.data.block(&h)?;
            dst.copy_from_slice(&block[inb..inb + dst.len()]);
        }
        Ok(())
    }
}

impl ImageSource for PointImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        if off >= self.size {
            return Ok(0);
        }
        let n = buf.len().min((self.size - off) as usize);
        self.read_ahead(off, n as u64);
        // The pieces of the request, one per block it touches.
        let mut pieces: Vec<(u64, usize, &mut [u8])> = Vec::new();
        let mut rest = &mut buf[..n];
        let mut pos = off;
        while !rest.is_empty() {
            let inb = (pos % self.bs) as usize;
            let take = (self.bs as usize - inb).min(rest.len());
            let (piece, tail) = rest.split_at_mut(take);
            pieces.push((pos / self.bs, inb, piece));
            rest = tail;
            pos += take as u64;
        }
        // Checking and decompressing a block costs about as much as reading it: a large
        // request (the kernel's read-ahead of a sequential reader) spreads its blocks over
        // the cores instead of waiting on one.
        let workers = if pieces.len() >= PARALLEL_MIN_BLOCKS {
            read_threads().min(pieces.len())
        } else {
            1
        };
        if workers <= 1 {
            for (b, inb, dst) in pieces {
                self.read_block(b, inb, dst)?;
            }
            return Ok(n);
        }
        let per = pieces.len().div_ceil(workers);
        let mut groups: Vec<Vec<(u64, usize, &mut [u8])>> = Vec::new();
        let mut it = pieces.into_iter().peekable();
        while it.peek().is_some() {
            groups.push(it.by_ref().take(per).collect());
        }
        let mine = groups.pop().unwrap_or_default();
        std::thread::scope(|s| {
            let handles: Vec<_> = groups
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        g.into_iter()
                            .try_for_each(|(b, inb, dst)| self.read_block(b, inb, dst))
                    })
                })
                .collect();
            let r = mine
                .into_iter()
                .try_for_each(|(b, inb, dst)| self.read_block(b, inb, dst));
            handles
                .into_iter()
                .map(|h| h.join().expect("point read thread panicked"))
                .fold(r, |acc, x| acc.and(x))
        })?;
        Ok(n)
    }

    fn next_data(&self, off: u64) -> Result<Option<u64>> {
        if off >= self.size {
            return Ok(None);
        }
        Ok(self
            .data
            .maps
            .next_data(&self.map, off / self.bs)?
            .map(|b| (b * self.bs).max(off))
            .filter(|&p| p < self.size))
    }

    fn next_hole(&self, off: u64) -> Result<u64> {
        if off >= self.size {
            return Ok(self.size);
        }
        let b = self.data.maps.next_hole(&self.map, off / self.bs)?;
        Ok((b * self.bs).max(off).min(self.size))
    }

    fn allocated_bytes(&self) -> u64 {
        (self.data_blocks * self.bs).min(self.size)
    }
}
