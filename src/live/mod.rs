//! A live disk: the registered raw image opened read-write, with every write recorded by the
//! tracker before it reaches the image. The FUSE file `live/NAME.img` and the library API
//! both write through here.
//!
//! Concurrency: `gate` is shared by every write for its whole duration (stamp, then data) and
//! taken exclusively to make a stable state, so in-flight writes finish first and new ones
//! wait. The tracker sits behind its own short mutex: stamping is a few memory stores, and the
//! data I/O happens with no lock but the shared gate held.
//!
//! Copy-on-write (`cow`): after stamping and before the data write, the first write to each
//! block since a saver (an open checkpoint) registered hands the block's old bytes to it,
//! under the disk's copy-on-write mutex (a no-op when no saver is registered).
//!
//! Direct writes: a large aligned write (`DIRECT_MIN`) goes to the image with O_DIRECT
//! through a second descriptor of the same open file, so it costs no page-cache fill (which
//! dominated first writes into new space: docs/performance.md); smaller or unaligned writes
//! stay buffered. The kernel keeps the page cache coherent with direct writes (it writes back
//! and drops the range's cached pages around each), except when a buffered and a direct write
//! to the same page run at once: `kinds` never lets those two overlap in flight.
//!
//! Settling: once a disk has had no write (nor owner or mode change) for `SETTLE_AFTER`, the
//! periodic flush syncs the image and records its identity as settled (`Tracker::settle`), so
//! that a crash of an idle disk costs no read of its data at the next open.

mod ahead;
pub mod cow;

use ahead::READ_AHEAD;
pub use ahead::ReadAhead;

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::track::{Tracker, mapfile::Identity};
use cow::DiskCow;

#[derive(Debug)]
pub struct LiveDisk {
    name: String,
    image: PathBuf,
    file: File,
    /// The image again for reads, advised random (`sys::reopen_random_reader`; None where that
    /// fails): the kernel's read-ahead would fill the page cache with large folios, and every
    /// small buffered write of the VM into one pays for the whole folio (docs/performance.md).
    reader: Option<File>,
    /// Read-ahead of the live file's sequential reader, in small folios.
    ahead: ReadAhead,
    size: u64,
    block_size: u32,
    gate: RwLock<()>,
    tracker: Mutex<Tracker>,
    /// The image opened again with O_DIRECT (None where the filesystem refuses it), and
    /// whether it still takes writes (cleared at its first EINVAL).
    direct: Option<File>,
    direct_ok: AtomicBool,
    kinds: IoKinds,
    cow: DiskCow,
    /// Set by `disk remove`: a handle the mount still holds must not write untracked.
    removed: AtomicBool,
    /// Set while the store's filesystem is not at its path (`engine::watch`): the marks of a
    /// write could land in a filesystem that never comes back, so writes are refused.
    store_away: AtomicBool,
    /// Writes refused while the store was away.
    refused: AtomicU64,
    /// When this disk was opened, and nanoseconds after it that the last write or owner or
    /// mode change ended (0: none yet, which counts as "just before the open").
    opened: Instant,
    last_change: AtomicU64,
}

/// How long the image must have been left alone before its identity is recorded as settled.
/// Any later change then lands in a later timestamp tick and shows in the image's times: this
/// exceeds the coarsest granularity a disk image's filesystem is expected to have (1 s: ext4
/// with 128-byte inodes; NFS servers likewise), whichever clock stamps them.
pub const SETTLE_AFTER: Duration = Duration::from_secs(2);

/// Writes this long or longer, aligned to `DIRECT_ALIGN`, bypass the page cache. Small
/// writes stay buffered, where the page cache absorbs them: written O_DIRECT, each would hold
/// a FUSE worker for a whole disk round trip, and a VM's queue depth would shrink to the
/// number of workers.
pub const DIRECT_MIN: u64 = 128 << 10;
/// Offset, length and buffer alignment for O_DIRECT: a page, enough for any common block
/// device and filesystem.
const DIRECT_ALIGN: u64 = 4096;

thread_local! {
    /// Per writer thread: the aligned copy a direct write is made from.
    static ALIGNED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The pages of buffered and of direct writes in flight: a write waits while a write of the
/// other kind overlaps its pages (same-kind overlaps proceed, as before). Overlapping
/// writes in flight are rare (a guest does not issue them), so the wait is too; the check
/// costs one short mutex per write.
#[derive(Debug, Default)]
struct IoKinds {
    inflight: Mutex<Vec<(u64, u64, bool)>>,
    done: Condvar,
}

struct KindGuard<'a> {
    kinds: &'a IoKinds,
    entry: (u64, u64, bool),
}

/// The page cache's unit: buffered and direct writes must not share a page in flight, and on
/// a kernel with 64 KiB pages two writes 4 KiB apart do.
fn cache_page() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| crate::sys::page_size().max(DIRECT_ALIGN))
}

impl IoKinds {
    fn enter(&self, off: u64, len: u64, direct: bool) -> KindGuard<'_> {
        let page = cache_page();
        let start = off - off % page;
        let end = (off + len).div_ceil(page) * page;
        let mut v = self.inflight.lock();
        while v
            .iter()
            .any(|&(s, e, d)| d != direct && s < end && start < e)
        {
            self.done.wait(&mut v);
        }
        v.push((start, end, direct));
        KindGuard {
            kinds: self,
            entry: (start, end, direct),
        }
    }
}

impl Drop for KindGuard<'_> {
    fn drop(&mut self) {
        let mut v = self.kinds.inflight.lock();
        if let Some(i) = v.iter().position(|e| *e == self.entry) {
            v.swap_remove(i);
        }
        drop(v);
        self.kinds.done.notify_all();
    }
}

/// The image's open file again, with O_DIRECT: the same inode whatever its path became.
fn reopen_direct(file: &File) -> Option<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            ::log::debug!("O_DIRECT open refused ({e}): every write goes through the page cache");
            None
        }
    }
}

/// Open an image for tracked use, refusing what cannot be a disk.
pub fn open_image(path: &Path) -> Result<File> {
    let bad = |why: String| Error::BadImage {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(bad("it is empty".into()));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| bad(e.to_string()))
}

impl LiveDisk {
    pub fn new(name: &str, image: &Path, file: File, tracker: Tracker) -> LiveDisk {
        LiveDisk {
            name: name.to_string(),
            image: image.to_path_buf(),
            size: tracker.disk_size(),
            block_size: tracker.block_size(),
            direct_ok: AtomicBool::new(true),
            direct: reopen_direct(&file),
            reader: crate::sys::reopen_random_reader(&file),
            ahead: ReadAhead::new(READ_AHEAD),
            kinds: IoKinds::default(),
            file,
            gate: RwLock::new(()),
            tracker: Mutex::new(tracker),
            cow: DiskCow::default(),
            removed: AtomicBool::new(false),
            store_away: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            opened: Instant::now(),
            last_change: AtomicU64::new(0),
        }
    }

    /// Note that the image's times may just have moved through us (after the change ended).
    fn changed(&self) {
        let ns = self.opened.elapsed().as_nanos().max(1) as u64;
        self.last_change.fetch_max(ns, Ordering::AcqRel);
    }

    fn idle_for(&self) -> Duration {
        let at = Duration::from_nanos(self.last_change.load(Ordering::Acquire));
        self.opened.elapsed().saturating_sub(at)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Refuse writes (EIO) while the store's filesystem is away, or take them again. A
    /// write already past the check finishes under the gate, which this waits for.
    pub fn set_store_away(&self, away: bool) {
        let _exclusive = self.gate.write();
        self.store_away.store(away, Ordering::Release);
    }

    /// Writes refused so far because the store was away.
    pub fn refused_writes(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    pub fn image(&self) -> &Path {
        &self.image
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Write back and drop the image's cached pages, once, when the daemon starts serving the
    /// disk or takes a new one: pages cached before that are likely large folios (`cp`,
    /// `qemu-img convert`, any buffered writer of 128 KiB and more), which make the VM's small
    /// writes slow as read-ahead's do (`reader`). Dirty pages cannot be dropped, hence the
    /// sync first. Only a hint: failures are logged.
    pub fn drop_cached_pages(&self) {
        let r = self
            .file
            .sync_data()
            .and_then(|()| crate::sys::fadvise_dontneed(self.file.as_raw_fd()));
        if let Err(e) = r {
            ::log::debug!("disk {}: dropping its cached pages failed: {e}", self.name);
        }
    }
    /// The descriptor to read the image's data through (see `reader`).
    pub fn reader(&self) -> &File {
        self.reader.as_ref().unwrap_or(&self.file)
    }
    pub fn tracker(&self) -> parking_lot::MutexGuard<'_, Tracker> {
        self.tracker.lock()
    }
    /// The copy-on-write hook of this disk's writes.
    pub fn cow(&self) -> &DiskCow {
        &self.cow
    }

    /// Read up to `buf.len()` bytes at `off`; short at the end of the disk.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        if off >= self.size {
            return Ok(0);
        }
        let n = buf.len().min((self.size - off) as usize);
        self.ahead.note(self.reader(), off, n as u64, self.size);
        self.reader()
            .read_exact_at(&mut buf[..n], off)
            .map_err(Error::io("read", &self.image))?;
        Ok(n)
    }

    /// A tracked write. The disk never grows: a write past its end is refused whole.
    ///
    /// # Errors
    /// `OutOfRange` past the end; I/O errors from the log or the image.
    pub fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        let len = data.len() as u64;
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::OutOfRange {
                disk: self.name.clone(),
                offset: off,
                len,
                size: self.size,
            });
        }
        let _shared = self.gate.read();
        if self.removed.load(Ordering::Acquire) {
            return Err(Error::DiskRemoved(self.name.clone()));
        }
        if self.store_away.load(Ordering::Acquire) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Error::StoreAway(self.name.clone()));
        }
        // Group commit: a write into regions not yet durably marked waits for the log sync
        // without holding the tracker, so writes into marked regions go on meanwhile and
        // concurrent first writes share one sync. The data write starts only after it.
        let mut t = self.tracker.lock();
        if let Some(w) = t.mark_for_write(off, len)? {
            let sync = t.log_sync();
            drop(t);
            sync.wait(&w)?;
            t = self.tracker.lock();
        }
        t.stamp_write(off, len);
        drop(t);
        self.cow
            .before_write(self.reader(), self.size, self.block_size, off, len);
        let r = self.write_data(data, off);
        self.changed();
        r
    }

    /// The data write of `write_at`, direct when it is large and aligned (module docs).
    fn write_data(&self, data: &[u8], off: u64) -> Result<()> {
        let len = data.len() as u64;
        let direct = match &self.direct {
            Some(f)
                if len >= DIRECT_MIN
                    && off.is_multiple_of(DIRECT_ALIGN)
                    && len.is_multiple_of(DIRECT_ALIGN)
                    && self.direct_ok.load(Ordering::Relaxed) =>
            {
                f
            }
            _ => return self.write_buffered(data, off),
        };
        let done = {
            let _k = self.kinds.enter(off, len, true);
            ALIGNED.with_borrow_mut(|buf| {
                let need = data.len() + DIRECT_ALIGN as usize;
                if buf.len() < need {
                    buf.resize(need, 0);
                }
                let at = buf.as_ptr().align_offset(DIRECT_ALIGN as usize);
                let dst = &mut buf[at..at + data.len()];
                dst.copy_from_slice(data);
                direct.write_at(dst, off)
            })
        };
        match done {
            Ok(n) if n == data.len() => Ok(()),
            // Short (a full filesystem): the rest through the page cache, which reports why.
            Ok(n) => self.write_buffered(&data[n..], off + n as u64),
            // Refused by a filesystem that opened the file O_DIRECT but cannot write it so.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                ::log::info!(
                    "disk {}: O_DIRECT write refused ({e}): writes go through the page cache",
                    self.name
                );
                self.direct_ok.store(false, Ordering::Relaxed);
                self.write_buffered(data, off)
            }
            Err(e) => Err(Error::io("write", &self.image)(e)),
        }
    }

    fn write_buffered(&self, data: &[u8], off: u64) -> Result<()> {
        let _k = self.kinds.enter(off, data.len() as u64, false);
        self.file
            .write_all_at(data, off)
            .map_err(Error::io("write", &self.image))
    }

    /// Make written data durable (fsync of the live file).
    pub fn sync_data(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(Error::io("fsync", &self.image))
    }

    /// Stop writes: in-flight ones finish, new ones wait until the guard is dropped.
    pub fn quiesce(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write()
    }

    /// Sync the image and return its identity, for a tracker flush. Writers must be quiesced.
    pub fn synced_identity(&self) -> Result<Identity> {
        self.sync_all()?;
        self.identity()
    }

    /// fsync of the image, data and metadata.
    pub fn sync_all(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(Error::io("fsync", &self.image))
    }

    /// The identity of the open image, not of its path: if the path was renamed over, the
    /// next open sees another inode and knows tracking does not cover it. A sync moves none
    /// of its times, so it may be taken before one that writers, quiesced, wait for.
    pub fn identity(&self) -> Result<Identity> {
        let m = self
            .file
            .metadata()
            .map_err(Error::io("stat", &self.image))?;
        Ok(Identity::of(&m))
    }

    /// Stop tracking for good: later writes through handles still open fail. Writers in
    /// flight finish first.
    pub fn mark_removed(&self) {
        let _q = self.quiesce();
        self.removed.store(true, Ordering::Release);
    }

    /// Flush tracking state (periodic or on demand); quiesces writers briefly.
    ///
    /// The image is not synced here: a stamp made durable before its data only over-reports
    /// if the data is then lost (the block reverts to bytes it had before), and the identity
    /// check at open only looks for times that moved forward. So a VM that writes without
    /// fsync pays no data flush every interval; points and clean stops still sync the image.
    pub fn flush(&self) -> Result<()> {
        let _q = self.quiesce();
        let id = self.identity()?;
        self.tracker.lock().flush(id)
    }

    /// Settle the disk if it has been idle for `SETTLE_AFTER` and its tracking state is not
    /// settled yet (see `Tracker::settle`): the image is synced first, outside the gate, and
    /// the settle is skipped if a write came in meanwhile.
    pub fn settle_if_idle(&self) -> Result<()> {
        if !self.tracker.lock().needs_settle() || self.idle_for() < SETTLE_AFTER {
            return Ok(());
        }
        let seen = self.last_change.load(Ordering::Acquire);
        // Synced, the image shows the recorded identity even after a power loss.
        self.file
            .sync_all()
            .map_err(Error::io("fsync", &self.image))?;
        let _q = self.quiesce();
        if self.last_change.load(Ordering::Acquire) != seen {
            return Ok(());
        }
        let id = self.identity()?;
        self.tracker.lock().settle(id)
    }

    /// Change the image's owner and mode (libvirt's and QEMU's dynamic ownership), keeping
    /// tracking exact: writers wait, tracking is flushed (judging any outside write before
    /// this), the change is applied, and the identity it leaves is recorded, so the ctime it
    /// moves is not taken for a write that bypassed the mount.
    ///
    /// # Errors
    /// The image's chown or chmod failing; tracking I/O failures.
    pub fn set_owner_mode(
        &self,
        uid: Option<u32>,
        gid: Option<u32>,
        mode: Option<u32>,
    ) -> Result<()> {
        let _q = self.quiesce();
        let before = self.identity()?;
        let mut t = self.tracker.lock();
        t.flush(before)?;
        let r = self.apply_owner_mode(uid, gid, mode);
        // Even a failed change may have moved the times (a chown that worked before a chmod
        // that did not).
        self.changed();
        r?;
        t.note_identity(self.identity()?)
    }

    fn apply_owner_mode(
        &self,
        uid: Option<u32>,
        gid: Option<u32>,
        mode: Option<u32>,
    ) -> Result<()> {
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&self.file, uid, gid)
                .map_err(Error::io("chown", &self.image))?;
        }
        if let Some(m) = mode {
            use std::os::unix::fs::PermissionsExt;
            self.file
                .set_permissions(std::fs::Permissions::from_mode(m & 0o7777))
                .map_err(Error::io("chmod", &self.image))?;
        }
        Ok(())
    }

    /// Clean stop: flush and mark the tracking state closed.
    pub fn close(&self) -> Result<()> {
        let _q = self.quiesce();
        let id = self.synced_identity()?;
        self.tracker.lock().close(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn resident(file: &File, off: u64) -> bool {
        crate::sys::page_resident(file.as_raw_fd(), off).unwrap()
    }

    #[test]
    fn cached_pages_are_dropped_and_a_sequential_reader_has_the_next_window_read_ahead() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::init(&d.path().join("s"), 65536).unwrap();
        let img = d.path().join("disk.img");
        let data: Vec<u8> = (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&img, &data).unwrap();
        let f = open_image(&img).unwrap();
        // Whether this filesystem lets pages go at all: a probe file written and dropped.
        let probe = d.path().join("probe");
        std::fs::write(&probe, &data[..1 << 20]).unwrap();
        let p = File::open(&probe).unwrap();
        p.sync_all().unwrap();
        crate::sys::fadvise_dontneed(p.as_raw_fd()).unwrap();
        if resident(&p, 65536) {
            eprintln!("skipped: this filesystem keeps files cached through POSIX_FADV_DONTNEED");
            return;
        }
        let t = Tracker::create(&store, "d", &f, &img, 1).unwrap();
        // Pages cached (dirty ones too) before the daemon takes the disk are dropped.
        assert!(resident(&f, 1 << 20), "the image was just written");
        let disk = LiveDisk::new("d", &img, f, t);
        disk.drop_cached_pages();
        assert!(!resident(disk.file(), 1 << 20), "cached pages kept");
        let mut buf = vec![0u8; 65536];
        // Out of order, even half a MiB apart (random reads in a hot region): nothing read
        // ahead.
        disk.read_at(&mut buf, 7 << 20).unwrap();
        disk.read_at(&mut buf, 5 << 20).unwrap();
        disk.read_at(&mut buf, (5 << 20) + (512 << 10)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        for off in [(5 << 20) + (1 << 20), (6 << 20) + (512 << 10)] {
            assert!(
                !resident(disk.file(), off),
                "{off} read ahead of a random reader"
            );
        }
        // In order: the next 2 MiB.
        for off in [0u64, 65536] {
            assert_eq!(disk.read_at(&mut buf, off).unwrap(), 65536);
            assert_eq!(buf, data[off as usize..off as usize + 65536]);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !resident(disk.file(), (2 << 20) + 65536) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for off in [128 << 10, 1 << 20, (2 << 20) + 65536] {
            assert!(resident(disk.file(), off), "{off} not read ahead");
        }
        assert!(!resident(disk.file(), 3 << 20), "read ahead too far");
    }
}
