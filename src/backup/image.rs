//! Synthesized images: the bytes of a disk at a restorable point, read through the point's own
//! map (at most a few cached node reads per block, at any chain depth: invariant 6), with every
//! stored block checked against its hash before a byte of it is returned (invariant 5). Holes
//! read as zeros without I/O.

use std::sync::Arc;

use crate::error::Result;
use crate::image::ImageSource;
use crate::repo::Hash;
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
        })
    }

    pub fn map(&self) -> &MapRoot {
        &self.map
    }

    /// The hash of block `b` (`Hash::ZERO` for a hole).
    ///
    /// # Errors
    /// `Format` for a damaged map node.
    pub fn block_hash(&self, b: u64) -> Result<Hash> {
        self.data.maps.lookup(&self.map, b)
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
        let bs = self.bs as usize;
        let mut done = 0usize;
        while done < n {
            let pos = off + done as u64;
            let b = pos / self.bs;
            let inb = (pos % self.bs) as usize;
            let take = (bs - inb).min(n - done);
            let h = self.data.maps.lookup(&self.map, b)?;
            if h.is_zero() {
                buf[done..done + take].fill(0);
            } else {
                let block = self.data.block(&h)?;
                buf[done..done + take].copy_from_slice(&block[inb..inb + take]);
            }
            done += take;
        }
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
