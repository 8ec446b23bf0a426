//! Synthesized images: the bytes of a disk at a restorable point, read through the point's own
//! block index (one lookup and one pread per block, at any chain depth: invariant 6), with
//! every stored block checked against its CRC before a byte of it is returned (invariant 5).
//! Holes read as zeros without I/O. (The mount's view of points, `PointSource`, is the
//! engine's: it needs the open checkpoints too.)

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{FormatError, crc};
use crate::image::ImageSource;
use crate::store::Store;
use crate::store::records::RefRecord;

use super::index::BlockIndex;
use super::pack::{OpenPack, PackCache};

thread_local! {
    /// One block buffer per reading thread, for reads that cover part of a block.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A restorable point's image of one disk.
pub struct PointImage {
    label: String,
    index: Arc<BlockIndex>,
    packs: Arc<PackCache>,
    data_blocks: u64,
}

impl PointImage {
    /// Load the point's index of `disk`.
    ///
    /// # Errors
    /// `NotRestorable`, `NoSuchDisk`, or `Format` for a missing or damaged index.
    pub fn open(
        store: &Store,
        packs: Arc<PackCache>,
        rec: &RefRecord,
        disk: &str,
    ) -> Result<PointImage> {
        let index = super::load_index(store, rec, disk)?;
        Ok(Self::from_index(
            format!("point {} disk {disk}", rec.name),
            Arc::new(index),
            packs,
        ))
    }

    pub fn from_index(label: String, index: Arc<BlockIndex>, packs: Arc<PackCache>) -> PointImage {
        let data_blocks = index.data_blocks();
        PointImage {
            label,
            index,
            packs,
            data_blocks,
        }
    }

    pub fn index(&self) -> &BlockIndex {
        &self.index
    }

    fn check(&self, pack: &OpenPack, block: u64, bytes: &[u8]) -> Result<()> {
        let stored = self.index.entries[block as usize].crc;
        let computed = crc(bytes);
        if stored != computed {
            return Err(Error::Format {
                path: pack.path.clone(),
                source: FormatError::Invalid {
                    what: "stored block",
                    why: format!(
                        "{} block {block} (slot {}): checksum {computed:#010x}, expected {stored:#010x}",
                        self.label, self.index.entries[block as usize].slot
                    ),
                },
            });
        }
        Ok(())
    }
}

impl ImageSource for PointImage {
    fn size(&self) -> u64 {
        self.index.disk_size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let size = self.index.disk_size;
        if off >= size {
            return Ok(0);
        }
        let n = buf.len().min((size - off) as usize);
        let bs = self.index.block_size as usize;
        let entries = &self.index.entries;
        let mut done = 0usize;
        while done < n {
            let pos = off + done as u64;
            let b = pos / bs as u64;
            let inb = (pos % bs as u64) as usize;
            let take = (bs - inb).min(n - done);
            let e = entries[b as usize];
            if e.is_hole() {
                buf[done..done + take].fill(0);
                done += take;
                continue;
            }
            let pack = self.packs.get(self.index.packs[e.pack as usize])?;
            if inb == 0 && take == bs {
                // Whole blocks stored in consecutive slots of one pack: one read for the run.
                let mut k = 1usize;
                while done + (k + 1) * bs <= n
                    && (b as usize + k) < entries.len()
                    && entries[b as usize + k].pack == e.pack
                    && entries[b as usize + k].slot as u64 == e.slot as u64 + k as u64
                {
                    k += 1;
                }
                let dst = &mut buf[done..done + k * bs];
                pack.read_slots(e.slot, dst, bs as u32)?;
                for i in 0..k {
                    self.check(&pack, b + i as u64, &dst[i * bs..(i + 1) * bs])?;
                }
                done += k * bs;
            } else {
                // Part of a block: the whole block is read and checked, in a buffer reused by
                // this thread (no allocation and zeroing per small read).
                SCRATCH.with_borrow_mut(|scratch| -> Result<()> {
                    scratch.resize(bs, 0);
                    pack.read_slots(e.slot, scratch, bs as u32)?;
                    self.check(&pack, b, scratch)?;
                    buf[done..done + take].copy_from_slice(&scratch[inb..inb + take]);
                    Ok(())
                })?;
                done += take;
            }
        }
        Ok(n)
    }

    fn next_data(&self, off: u64) -> Result<Option<u64>> {
        let bs = self.index.block_size as u64;
        if off >= self.index.disk_size {
            return Ok(None);
        }
        Ok(self.index.entries[(off / bs) as usize..]
            .iter()
            .position(|e| !e.is_hole())
            .map(|i| ((off / bs + i as u64) * bs).max(off)))
    }

    fn next_hole(&self, off: u64) -> Result<u64> {
        let bs = self.index.block_size as u64;
        let size = self.index.disk_size;
        if off >= size {
            return Ok(size);
        }
        Ok(self.index.entries[(off / bs) as usize..]
            .iter()
            .position(|e| e.is_hole())
            .map(|i| ((off / bs + i as u64) * bs).max(off).min(size))
            .unwrap_or(size))
    }

    fn allocated_bytes(&self) -> u64 {
        (self.data_blocks * self.index.block_size as u64).min(self.index.disk_size)
    }
}
