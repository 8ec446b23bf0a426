//! Read-ahead of the live disk's own making (`ReadAhead`), for reads through a descriptor that
//! the kernel does not read ahead of (`LiveDisk::reader`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// How far ahead of a sequential reader of the live disk the image is read (`ReadAhead`).
pub(super) const READ_AHEAD: u64 = 2 << 20;
/// The most one `POSIX_FADV_WILLNEED` is trusted to read.
const WILLNEED_PIECE: u64 = 128 << 10;

/// Read-ahead for one sequential reader of a descriptor advised random (`LiveDisk::reader`).
/// That descriptor reads nothing ahead, and a VM with `cache=none` asks for what it reads and
/// no more: a sequential reader in small requests would wait on the disk at each one (4 KiB at
/// queue depth 1: 7-32 MB/s, against 97 with the kernel's read-ahead). So a read that starts
/// where the last one ended (give or take a few requests) asks the kernel to read the next
/// `window` (`POSIX_FADV_WILLNEED`, which fills the cache with small folios), topped up once
/// half of it is consumed.
#[derive(Debug)]
pub struct ReadAhead {
    window: u64,
    /// Where the last read ended, and how far the kernel was asked to read.
    last_end: AtomicU64,
    ahead_to: AtomicU64,
}

impl ReadAhead {
    pub fn new(window: u64) -> ReadAhead {
        ReadAhead {
            window,
            last_end: AtomicU64::new(u64::MAX),
            ahead_to: AtomicU64::new(0),
        }
    }

    /// Note a read of `n` bytes at `off` of `file` (`size` bytes long), reading ahead of it if
    /// it follows the last one.
    pub fn note(&self, file: &File, off: u64, n: u64, size: u64) {
        let end = off + n;
        let last = self.last_end.swap(end, Ordering::Relaxed);
        if !crate::image::follows(last, off, n, self.window) {
            return;
        }
        let want = (end + self.window).min(size);
        let have = self.ahead_to.load(Ordering::Relaxed);
        // Elsewhere (behind the reader, or far ahead of a reader that started again): anew.
        let ours = have >= end && have - end <= self.window;
        if ours && (have >= want || have - end >= self.window / 2) {
            return;
        }
        let from = if ours { have } else { end };
        if from >= want {
            return;
        }
        self.ahead_to.store(want, Ordering::Relaxed);
        // The kernel reads at most its read-ahead size (`read_ahead_kb`, often 128 KiB) or one
        // request's worth per call and drops the rest of a larger one: ask in pieces.
        let mut at = from;
        while at < want {
            let len = WILLNEED_PIECE.min(want - at);
            let _ = crate::sys::fadvise_willneed(file.as_raw_fd(), at, len);
            at += len;
        }
    }
}
