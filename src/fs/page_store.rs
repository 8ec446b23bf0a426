//! The rest of a decoded block, pushed into the kernel's page cache.
//!
//! A small read of a point image decodes and checks the whole stored block around it (64 KiB
//! by default), and the kernel keeps only the pages it asked for. A reader working through an
//! image in small random pieces (a backup tool, `fio`, a VM booting from a point) then pays a
//! request, a decode and a checksum for every 4 KiB. Point images never change, so once a
//! block is decoded its other pages are handed to the kernel (`FUSE_NOTIFY_STORE`) and the
//! reader's next reads inside it are page-cache hits that never reach the daemon.
//!
//! The pages go from a thread of their own, after the reply: a store waits for the lock of any
//! page a request is filling, and a FUSE worker that waited for a store could wait for itself.
//! The queue is bounded in bytes and a block that does not fit is dropped (it is only a hint),
//! so a worker never blocks here and the daemon's memory stays bounded (invariant 7): at most
//! 4 MiB queued, plus the one block being stored.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::image::Decoded;

/// Bytes of blocks queued for the kernel at most (one block of any size is always taken).
const QUEUE_BYTES: usize = 4 << 20;
/// Largest store sent at once.
const STORE_BYTES: u64 = 1 << 20;

struct Job {
    ino: u64,
    block: Decoded,
    /// The request that decoded it: its pages are the kernel's own to fill.
    read: Range<u64>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    bytes: usize,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// The FUSE workers' end: offers blocks and never waits.
pub struct PageStore {
    shared: Arc<Shared>,
}

/// The end that sends to the kernel, started once the session gives a notifier.
pub struct Pending {
    shared: Arc<Shared>,
}

/// A page store and the end that serves it.
pub fn channel() -> (PageStore, Pending) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        ready: Condvar::new(),
    });
    (
        PageStore {
            shared: shared.clone(),
        },
        Pending { shared },
    )
}

impl PageStore {
    /// Offer the kernel the pages of `block` (of file `ino`) that the request for `read` did
    /// not cover; dropped when the queue is full.
    pub fn offer(&self, ino: u64, block: Decoded, read: Range<u64>) {
        let mut q = self.shared.queue.lock();
        if q.closed || (q.bytes > 0 && q.bytes + block.len > QUEUE_BYTES) {
            return;
        }
        q.bytes += block.len;
        q.jobs.push_back(Job { ino, block, read });
        self.shared.ready.notify_one();
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        self.shared.queue.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

impl Pending {
    /// Serve the queue on a thread of its own until the workers' end is dropped.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start(self, notifier: fuser::Notifier) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("page-store".into())
            .spawn(move || self.serve(notifier))
            .map(drop)
    }

    fn serve(self, notifier: fuser::Notifier) {
        let _ = crate::sys::lowest_priority_for_this_thread();
        loop {
            let job = {
                let mut q = self.shared.queue.lock();
                loop {
                    if let Some(j) = q.jobs.pop_front() {
                        q.bytes -= j.block.len;
                        break j;
                    }
                    if q.closed {
                        return;
                    }
                    self.shared.ready.wait(&mut q);
                }
            };
            let page = crate::sys::page_size();
            for piece in pieces(job.block.off, job.block.len as u64, &job.read, page) {
                let mut at = piece.start;
                while at < piece.end {
                    let end = (at + STORE_BYTES).min(piece.end);
                    let bytes = &job.block.bytes
                        [(at - job.block.off) as usize..(end - job.block.off) as usize];
                    // The kernel forgetting the inode meanwhile (ENOENT) or an unmount under
                    // way is no error of the reader's: the pages were only a hint.
                    if let Err(e) = notifier.store(fuser::INodeNo(job.ino), at, bytes) {
                        log::debug!("page store of inode {} at {at}: {e}", job.ino);
                        break;
                    }
                    at = end;
                }
            }
        }
    }
}

/// The whole pages of `[off, off + len)` outside the pages `read` touches: at most two ranges,
/// before and after it.
fn pieces(off: u64, len: u64, read: &Range<u64>, page: u64) -> Vec<Range<u64>> {
    let end = off + len;
    let first = off.next_multiple_of(page);
    let last = end - end % page;
    if first >= last {
        // No whole page inside the block (blocks smaller than a page, or a short last block).
        return Vec::new();
    }
    let before = first..(read.start - read.start % page).clamp(first, last);
    let after = read.end.next_multiple_of(page).clamp(first, last)..last;
    [before, after]
        .into_iter()
        .filter(|r| r.start < r.end)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    #[test]
    fn pieces_skip_the_pages_of_the_request() {
        let b = 10 * 65536;
        // A 4 KiB read in the middle of a block: what is before it and after it.
        assert_eq!(
            pieces(b, 65536, &(b + 8192..b + 12288), P),
            vec![b..b + 8192, b + 12288..b + 65536]
        );
        // Unaligned reads give up every page they touch.
        assert_eq!(
            pieces(b, 65536, &(b + 100..b + 5000), P),
            vec![b + 8192..b + 65536]
        );
        // A read at either end leaves one piece.
        assert_eq!(
            pieces(b, 65536, &(b..b + 4096), P),
            vec![b + 4096..b + 65536]
        );
        assert_eq!(
            pieces(b, 65536, &(b + 61440..b + 65536), P),
            vec![b..b + 61440]
        );
        // A read that spans the block, or a request reaching past it, leaves nothing.
        assert!(pieces(b, 65536, &(b - 10..b + 65536 + 10), P).is_empty());
        // The last block of an image whose size is not a page multiple: the partial page is
        // left to the kernel (a store may not reach past the end of the file).
        assert_eq!(pieces(b, 10000, &(b..b + 10), P), vec![b + 4096..b + 8192]);
        // Pages larger than the block (4 KiB blocks on a 64 KiB-page kernel): nothing whole.
        assert!(pieces(8192, 4096, &(8192..8200), 65536).is_empty());
        assert!(pieces(65536, 4096, &(65536..65600), 65536).is_empty());
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_closes_with_the_workers_end() {
        let (store, pending) = channel();
        let block = |len: usize| Decoded {
            off: 0,
            len,
            bytes: Arc::new(vec![0; len]),
        };
        // One block of any size is taken even if it alone passes the bound.
        store.offer(1, block(2 * QUEUE_BYTES), 0..1);
        store.offer(1, block(4096), 0..1);
        assert_eq!(pending.shared.queue.lock().jobs.len(), 1);
        pending.shared.queue.lock().jobs.clear();
        pending.shared.queue.lock().bytes = 0;
        for _ in 0..QUEUE_BYTES / 65536 + 10 {
            store.offer(1, block(65536), 0..1);
        }
        let q = pending.shared.queue.lock();
        assert_eq!(q.jobs.len(), QUEUE_BYTES / 65536);
        assert_eq!(q.bytes, QUEUE_BYTES);
        drop(q);
        drop(store);
        assert!(pending.shared.queue.lock().closed);
    }
}
