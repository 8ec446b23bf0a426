//! What the mount serves as a read-only disk image: a point's synthesized image or an open
//! checkpoint. Small trait, with an in-memory implementation for tests.

use std::sync::Arc;

use crate::error::Result;

/// A read-only disk image. Implementations are shared between FUSE worker threads.
pub trait ImageSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read up to `buf.len()` bytes at `off` (short only at the end of the image).
    ///
    /// # Errors
    /// Damaged stored data is `Error::Format` (EIO at the mount), never wrong bytes.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize>;
    /// Start of the first data extent at or after `off`, or None (SEEK_DATA).
    fn next_data(&self, off: u64) -> Result<Option<u64>>;
    /// Start of the first hole at or after `off`; the image size if none (SEEK_HOLE).
    fn next_hole(&self, off: u64) -> Result<u64>;
    /// Bytes of data actually present (for st_blocks).
    fn allocated_bytes(&self) -> u64;
    /// `read_at`, also pushing onto `decoded` every stored block this read decoded whole
    /// though it wanted only part of it. The mount hands the rest of such a block to the
    /// kernel's page cache (`fs::page_store`). Sources that decode nothing push nothing.
    ///
    /// # Errors
    /// As `read_at`.
    fn read_at_decoding(
        &self,
        buf: &mut [u8],
        off: u64,
        decoded: &mut Vec<Decoded>,
    ) -> Result<usize> {
        let _ = decoded;
        self.read_at(buf, off)
    }
    /// False once this image can no longer show its point's bytes (a checkpoint that was
    /// demoted, or whose backup committed and now lives in the store): open the point again.
    fn is_current(&self) -> bool {
        true
    }
}

/// A stored block a read decoded and checked: its bytes, and where they sit in the image.
pub struct Decoded {
    /// Offset of the block in the image.
    pub off: u64,
    /// Bytes of it inside the image (less than the block only at the end of the image).
    pub len: usize,
    pub bytes: std::sync::Arc<Vec<u8>>,
}

/// Whether a read of `n` bytes at `off` continues a stream whose last read ended at `last_end`
/// (`u64::MAX`: no read yet), for read-ahead of `window` bytes. Requests of one reader arrive
/// on several FUSE workers slightly out of order, so "continues" allows a few requests' length
/// either way (at least 64 KiB, at most the window); wider would take random reads in a hot
/// region for a stream and read a whole window ahead of each.
pub fn follows(last_end: u64, off: u64, n: u64, window: u64) -> bool {
    let slack = (4 * n).clamp(64 << 10, window.max(64 << 10));
    last_end != u64::MAX && off.abs_diff(last_end) <= slack
}

/// One point directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointEntry {
    pub name: String,
    /// Changes whenever the name is given to another point (the point's unique id), so the
    /// mount never serves a deleted point's bytes, or cached pages, under a reused name. A
    /// checkpoint keeps its id when its backup commits: the bytes are the same.
    pub id: String,
    /// Its disks and their sizes.
    pub disks: Vec<(String, u64)>,
}

/// The point directories, oldest first.
pub type PointList = Vec<PointEntry>;

/// The read-only directories the mount shows besides `live/`: restorable points and open
/// checkpoints, each with its disks.
pub trait PointSource: Send + Sync {
    /// Current points with the disks each holds and their sizes, oldest first.
    fn points(&self) -> Result<PointList>;
    /// Open one disk image of the point named `point` whose id is `id`.
    ///
    /// # Errors
    /// `NoSuchRef` when no point of that name has that id any more.
    fn open(&self, point: &str, id: &str, disk: &str) -> Result<Arc<dyn ImageSource>>;
}

/// An image held in memory, `block`-granular for holes (a zero block is a hole).
#[derive(Debug, Clone)]
pub struct MemImage {
    pub bytes: Vec<u8>,
    pub block: usize,
}

impl MemImage {
    fn block_is_zero(&self, b: usize) -> bool {
        let s = b * self.block;
        let e = (s + self.block).min(self.bytes.len());
        self.bytes[s..e].iter().all(|&x| x == 0)
    }
}

impl ImageSource for MemImage {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let off = off.min(self.size()) as usize;
        let n = buf.len().min(self.bytes.len() - off);
        buf[..n].copy_from_slice(&self.bytes[off..off + n]);
        Ok(n)
    }
    fn next_data(&self, off: u64) -> Result<Option<u64>> {
        let nb = self.bytes.len().div_ceil(self.block);
        let first = off as usize / self.block;
        Ok((first..nb)
            .find(|&b| !self.block_is_zero(b))
            .map(|b| ((b * self.block) as u64).max(off)))
    }
    fn next_hole(&self, off: u64) -> Result<u64> {
        let nb = self.bytes.len().div_ceil(self.block);
        let first = off as usize / self.block;
        Ok((first..nb)
            .find(|&b| self.block_is_zero(b))
            .map(|b| ((b * self.block) as u64).max(off))
            .unwrap_or(self.size()))
    }
    fn allocated_bytes(&self) -> u64 {
        let nb = self.bytes.len().div_ceil(self.block);
        (0..nb).filter(|&b| !self.block_is_zero(b)).count() as u64 * self.block as u64
    }
}
