//! The write path's copy-on-write hook: before a tracked write overwrites a block, every
//! registered `BlockSaver` that still needs the block's old bytes gets them. The write path
//! owns the hook; what is saved and where (an open checkpoint, see `backup::cow`) is the
//! saver's business, so the VM's write path does not depend on the backup subsystem.
//!
//! Each live disk has a `DiskCow`: its savers behind one mutex. A write takes that mutex, and
//! for each block it touches that some saver still needs, reads the block's current
//! (pre-write) bytes and hands them over, then releases the mutex and lets the write go
//! ahead. A reader of a saver's image takes the same mutex (`hold`) around "is it saved?"
//! and the read of the live bytes, so it never sees a block half-saved or already
//! overwritten: while it holds the mutex, no block some saver still needs can be written.

use std::fmt::Debug;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

/// Something that keeps the old bytes of blocks about to be overwritten. Every method is
/// called with the disk's copy-on-write mutex held.
pub trait BlockSaver: Send + Sync + Debug {
    /// Whether the old bytes of `block` still have to be saved before it is overwritten.
    fn needs(&self, block: u64) -> bool;
    /// Keep `old`, the bytes of `block` before the write that is about to happen. A saver
    /// that cannot keep them marks itself failed: the VM's write goes ahead regardless.
    fn save(&self, block: u64, old: &[u8]);
    /// The old bytes could not be read: the saver can no longer be complete.
    fn fail(&self, why: String);
    /// Copy-on-write stopped for this saver: from now on a write may change a block it never
    /// saved.
    fn close(&self);
}

/// The copy-on-write state of one live disk: its registered savers.
#[derive(Debug, Default)]
pub struct DiskCow {
    savers: Mutex<Vec<Arc<dyn BlockSaver>>>,
}

/// While held, no write saves or overwrites a block some saver still needs (see the module
/// docs). Dropping it lets writes go on.
pub struct CowHold<'a> {
    _savers: MutexGuard<'a, Vec<Arc<dyn BlockSaver>>>,
}

impl DiskCow {
    pub fn add(&self, s: Arc<dyn BlockSaver>) {
        self.savers.lock().push(s);
    }

    /// Stop saving for `s`, and close it under the lock: a reader that checks for closure
    /// under `hold` after reading live bytes knows no unsaved block changed before.
    pub fn remove(&self, s: &dyn BlockSaver) {
        let mut savers = self.savers.lock();
        savers.retain(|x| !std::ptr::addr_eq(Arc::as_ptr(x), s as *const dyn BlockSaver));
        s.close();
    }

    /// Exclude saves and the writes behind them, for a consistent read of a saver's image.
    pub fn hold(&self) -> CowHold<'_> {
        CowHold {
            _savers: self.savers.lock(),
        }
    }

    /// Save the old bytes of every block of `off..off+len` some saver still needs. Called by
    /// `LiveDisk::write_at` before the data write, with the write gate shared.
    pub fn before_write(&self, live: &File, size: u64, block_size: u32, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let savers = self.savers.lock();
        if savers.is_empty() {
            return;
        }
        let bs = block_size as u64;
        let mut old = Vec::new();
        for b in off / bs..=(off + len - 1) / bs {
            let need: Vec<&Arc<dyn BlockSaver>> = savers.iter().filter(|s| s.needs(b)).collect();
            if need.is_empty() {
                continue;
            }
            let start = b * bs;
            let n = bs.min(size - start) as usize;
            old.resize(n, 0);
            match live.read_exact_at(&mut old, start) {
                Ok(()) => need.iter().for_each(|s| s.save(b, &old)),
                Err(e) => {
                    for s in need {
                        s.fail(format!("reading live block {b} failed: {e}"));
                    }
                }
            }
        }
    }
}
