//! Checkpoints: copy-on-write of live disks so a point's image stays readable while the VM
//! keeps writing.
//!
//! A checkpoint registers one `CowSaver` per disk with the disk's copy-on-write hook
//! (`live::cow`): the first write to each block since the checkpoint hands the block's old
//! bytes to the saver first. A reader of a checkpoint image takes the hook's mutex
//! (`DiskCow::hold`) around "is it saved?" and the read of the live bytes, so it can never see
//! a block half-saved or already overwritten. (Reads of many blocks read the live bytes
//! first, unlocked, and then replace every block found saved: see
//! `CheckpointImage::read_at`.)
//!
//! Saved blocks go to an unlinked file under `STORE/data/cow/`: they live only as long as the
//! engine (a crash or restart leaves nothing behind, and the checkpoint is gone; see the
//! module docs of `backup`). If saving fails (no space), the checkpoint is marked failed and
//! the VM's write still goes ahead: a broken backup is better than a stopped VM, and reads of
//! a failed checkpoint report the error instead of wrong bytes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::image::ImageSource;
use crate::live::cow::BlockSaver;
use crate::live::{LiveDisk, ReadAhead};
use crate::store::records::RefRecord;

/// One checkpoint's saved blocks of one disk.
#[derive(Debug)]
pub struct CowSaver {
    point: String,
    disk: String,
    size: u64,
    block_size: u32,
    file: File,
    path: PathBuf,
    state: Mutex<SaverState>,
}

#[derive(Debug, Default)]
struct SaverState {
    /// Block number → slot in the save file.
    slots: BTreeMap<u64, u64>,
    next: u64,
    failed: Option<String>,
    /// Set, under the disk's savers lock, when the checkpoint stops copy-on-write: from then
    /// on a write may change a block that was never saved, so the image is gone.
    closed: bool,
}

impl CowSaver {
    /// Create the save file and unlink it at once, so nothing outlives the process.
    ///
    /// # Errors
    /// I/O failures.
    pub fn create(
        dir: &Path,
        rec: &RefRecord,
        disk: &str,
        size: u64,
        block_size: u32,
    ) -> Result<CowSaver> {
        let path = dir.join(format!("{}.{disk}.cow", rec.id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io("create", &path))?;
        std::fs::remove_file(&path).map_err(Error::io("unlink", &path))?;
        Ok(CowSaver {
            point: rec.name.clone(),
            disk: disk.to_string(),
            size,
            block_size,
            file,
            path,
            state: Mutex::new(SaverState::default()),
        })
    }

    pub fn point(&self) -> &str {
        &self.point
    }

    pub fn saved_blocks(&self) -> u64 {
        self.state.lock().slots.len() as u64
    }

    /// Whether the saved blocks plus the live bytes still make the checkpoint's image.
    fn usable(&self) -> Result<()> {
        let st = self.state.lock();
        if st.closed {
            return Err(Error::CheckpointClosed(self.point.clone()));
        }
        match &st.failed {
            Some(why) => Err(Error::CheckpointBroken {
                point: self.point.clone(),
                disk: self.disk.clone(),
                why: why.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl BlockSaver for CowSaver {
    fn needs(&self, block: u64) -> bool {
        let st = self.state.lock();
        st.failed.is_none()
            && !st.slots.contains_key(&block)
            && block * (self.block_size as u64) < self.size
    }

    fn save(&self, block: u64, old: &[u8]) {
        let mut st = self.state.lock();
        if st.failed.is_some() || st.slots.contains_key(&block) {
            return;
        }
        let slot = st.next;
        match self.file.write_all_at(old, slot * self.block_size as u64) {
            Ok(()) => {
                st.slots.insert(block, slot);
                st.next += 1;
            }
            Err(e) => {
                log::error!(
                    "checkpoint {} disk {}: saving block {block} failed: {e}; the checkpoint is broken",
                    self.point,
                    self.disk
                );
                st.failed = Some(format!(
                    "saving block {block} to {} failed: {e}",
                    self.path.display()
                ));
            }
        }
    }

    fn fail(&self, why: String) {
        log::error!("checkpoint {} disk {}: {why}", self.point, self.disk);
        self.state.lock().failed = Some(why);
    }

    fn close(&self) {
        self.state.lock().closed = true;
    }
}

/// An open checkpoint: its record and, per disk, the live disk and the saver.
pub struct Checkpoint {
    pub rec: RefRecord,
    pub disks: BTreeMap<String, (Arc<LiveDisk>, Arc<CowSaver>)>,
}

impl Checkpoint {
    /// The checkpoint's image of `disk`.
    ///
    /// # Errors
    /// `NoSuchDisk` when the disk is not part of the checkpoint.
    pub fn image(&self, disk: &str) -> Result<CheckpointImage> {
        let (d, s) = self.disks.get(disk).ok_or_else(|| {
            Error::NoSuchDisk(format!("{disk} (in checkpoint {})", self.rec.name))
        })?;
        Ok(CheckpointImage {
            disk: d.clone(),
            saver: s.clone(),
            ahead: ReadAhead::new(CHECKPOINT_READ_AHEAD),
        })
    }
}

/// How far ahead of a backup's reads of a running disk its image is read: a few of its 4 MiB
/// chunks.
const CHECKPOINT_READ_AHEAD: u64 = 16 << 20;

/// The bytes of a disk at a checkpoint: saved bytes where the block was written since, live
/// bytes elsewhere.
pub struct CheckpointImage {
    disk: Arc<LiveDisk>,
    saver: Arc<CowSaver>,
    /// The live disk's reader reads nothing ahead: a backup reads in chunks and then
    /// compresses them, so the next chunks are read while it does.
    ahead: ReadAhead,
}

impl ImageSource for CheckpointImage {
    fn size(&self) -> u64 {
        self.saver.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let size = self.saver.size;
        if off >= size {
            return Ok(0);
        }
        let n = buf.len().min((size - off) as usize);
        let bs = self.saver.block_size as u64;
        // Read the live bytes first, without the mutex (so the VM's writes are not held up
        // by our I/O). Every block written since the checkpoint was saved before its write
        // began, so a block found unsaved *after* this read was not written during it, and a
        // block found saved is taken from the save file instead.
        self.ahead.note(self.disk.reader(), off, n as u64, size);
        self.disk
            .reader()
            .read_exact_at(&mut buf[..n], off)
            .map_err(Error::io("read", self.disk.image()))?;
        let saved: Vec<(u64, u64)> = {
            let _g = self.disk.cow().hold();
            self.saver.usable()?;
            let st = self.saver.state.lock();
            st.slots
                .range(off / bs..=(off + n as u64 - 1) / bs)
                .map(|(&b, &s)| (b, s))
                .collect()
        };
        for (b, slot) in saved {
            // The part of block b inside [off, off + n).
            let start = (b * bs).max(off);
            let end = ((b + 1) * bs).min(off + n as u64);
            let dst = &mut buf[(start - off) as usize..(end - off) as usize];
            self.saver
                .file
                .read_exact_at(dst, slot * bs + (start - b * bs))
                .map_err(Error::io("read", &self.saver.path))?;
        }
        Ok(n)
    }

    fn next_data(&self, off: u64) -> Result<Option<u64>> {
        let size = self.saver.size;
        if off >= size {
            return Ok(None);
        }
        let bs = self.saver.block_size as u64;
        // Under the mutex an unsaved block equals the checkpoint's bytes, so a live hole
        // there is a hole of the checkpoint too.
        let _g = self.disk.cow().hold();
        self.saver.usable()?;
        let live = crate::sys::seek_data_hole(self.disk.file().as_raw_fd(), off, false)
            .map_err(Error::io("seek", self.disk.image()))?;
        let saved = self
            .saver
            .state
            .lock()
            .slots
            .range(off / bs..)
            .next()
            .map(|(&b, _)| (b * bs).max(off));
        Ok(match (live, saved) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .filter(|&x| x < size))
    }

    fn next_hole(&self, off: u64) -> Result<u64> {
        let size = self.saver.size;
        if off >= size {
            return Ok(size);
        }
        let bs = self.saver.block_size as u64;
        let _g = self.disk.cow().hold();
        self.saver.usable()?;
        let st = self.saver.state.lock();
        let mut pos = off;
        loop {
            let h = crate::sys::seek_data_hole(self.disk.file().as_raw_fd(), pos, true)
                .map_err(Error::io("seek", self.disk.image()))?
                .unwrap_or(size)
                .min(size);
            if h >= size {
                return Ok(size);
            }
            // A live hole inside a saved block is not a hole of the checkpoint.
            if st.slots.contains_key(&(h / bs)) {
                pos = (h / bs + 1) * bs;
                if pos >= size {
                    return Ok(size);
                }
                continue;
            }
            return Ok(h);
        }
    }

    fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let live = self
            .disk
            .file()
            .metadata()
            .map(|m| m.blocks() * 512)
            .unwrap_or(self.saver.size);
        live.min(self.saver.size)
    }

    fn is_current(&self) -> bool {
        !self.saver.state.lock().closed
    }
}
