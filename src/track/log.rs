//! The durable dirty-region log (`STORE/track/NAME.log`): one bit per region of the map.
//! Before the first write to a region since the last flush is acknowledged, its bit is written
//! and fdatasync'ed (write-through), so after any crash every region written since the last
//! flush is known. A flush of the map clears the bits of regions not written in the interval
//! it flushed (a busy region stays marked, so it pays no new sync per interval); a clean stop
//! clears them all. Bits only go from 0 to 1 between clears, so a torn bitmap write can lose
//! only the bit of a write not yet acknowledged.
//!
//! Group commit: a writer marks its new regions (page write, no sync) under the tracker's
//! lock, then waits outside it (`LogSync::wait`) until a sync covers that page write. One
//! waiter at a time syncs, for every page write done before it started, so marks of
//! concurrent writers share one sync, and writers into regions already durable never wait
//! behind another's sync. A failed sync fails every write that depends on a mark not yet
//! durable when it failed: the kernel drops a page whose write-back failed and reports the
//! error once, so any page write not known durable, including one made while the failed sync
//! ran, may be lost. Those marks count as unmarked from then on (even if a later sync
//! succeeds), so the next write to them writes their page again. A write depends on every
//! mark it needs, its own and other writers' still in flight, and waits for all of them.
//!
//! Layout: `0 magic "VMREFLOG" | 8 major u16 | 10 minor u16 | 16 nregions u64 | 4092 crc u32`,
//! then the bitmap from offset 4096, padded to 4 KiB.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use super::durable::DurableFile;
use crate::error::{Error, Result};
use crate::format::{FormatError, check_header, crc, le_u64};
use crate::store::atomic;

/// Do not modify.
pub const MAGIC: &[u8; 8] = b"VMREFLOG";
pub const MAJOR: u16 = 1;
pub const MINOR: u16 = 0;
const PAGE: usize = 4096;
const BITS_PER_PAGE: u64 = PAGE as u64 * 8;

pub fn encode_header(nregions: u64) -> [u8; PAGE] {
    let mut b = [0u8; PAGE];
    b[..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&MAJOR.to_le_bytes());
    b[10..12].copy_from_slice(&MINOR.to_le_bytes());
    b[16..24].copy_from_slice(&nregions.to_le_bytes());
    let c = crc(&b[..PAGE - 4]);
    b[PAGE - 4..].copy_from_slice(&c.to_le_bytes());
    b
}

/// The number of regions the log covers.
pub fn decode_header(b: &[u8]) -> Result<u64, FormatError> {
    check_header(b, PAGE, MAGIC, MAJOR, PAGE - 4, "log header")?;
    Ok(le_u64(b, 16))
}

fn bitmap_bytes(nregions: u64) -> usize {
    (nregions.div_ceil(BITS_PER_PAGE) as usize).max(1) * PAGE
}

#[derive(Debug)]
pub struct DirtyLog {
    file: Arc<DurableFile>,
    bits: Vec<u8>,
    sync: Arc<LogSync>,
    /// Regions set in `bits` whose page write no sync is known to cover yet, with that
    /// write's generation.
    unsynced: Vec<(u64, u64)>,
}

/// The sync side of group commit, shared with writers waiting outside the tracker's lock.
#[derive(Debug)]
pub struct LogSync {
    file: Arc<DurableFile>,
    /// Generation of the last page write begun (writes count from 1): taken before the write,
    /// so a write under way while a sync fails is counted in that failure.
    begun: AtomicU64,
    /// Generation of the last page write that completed (page writes run one at a time,
    /// under the tracker's lock, so they complete in order).
    written: AtomicU64,
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Every page write up to this generation reached a successful sync...
    durable: u64,
    /// ...except those in these ranges `(lo, hi]`, lost to a failed sync: lo was durable when
    /// it failed, hi the last write begun by the time it returned.
    failed: Vec<(u64, u64)>,
    syncing: bool,
}

impl SyncState {
    fn is_failed(&self, generation: u64) -> bool {
        self.failed
            .iter()
            .any(|&(lo, hi)| lo < generation && generation <= hi)
    }
}

/// The marks one write needs durable before it may go ahead: their page writes' generations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkWait(Vec<u64>);

impl LogSync {
    fn new(file: Arc<DurableFile>) -> Arc<LogSync> {
        Arc::new(LogSync {
            file,
            begun: AtomicU64::new(0),
            written: AtomicU64::new(0),
            state: Mutex::new(SyncState::default()),
            done: Condvar::new(),
        })
    }

    /// Return once every mark of `w` is durable: sync (every page write done so far) unless
    /// another waiter's sync already covers them.
    ///
    /// # Errors
    /// A sync that failed may have lost one of them: the write that waits must not happen.
    pub fn wait(&self, w: &MarkWait) -> Result<()> {
        let newest = w.0.iter().copied().max().unwrap_or(0);
        let mut st = self.state.lock();
        loop {
            if w.0.iter().any(|&g| st.is_failed(g)) {
                return Err(Error::io("fsync", self.file.path())(std::io::Error::other(
                    "syncing the dirty-region log failed",
                )));
            }
            if newest <= st.durable {
                return Ok(());
            }
            if st.syncing {
                self.done.wait(&mut st);
                continue;
            }
            st.syncing = true;
            let target = self.written.load(Ordering::Acquire);
            let r = parking_lot::MutexGuard::unlocked(&mut st, || self.file.sync());
            st.syncing = false;
            match &r {
                Ok(()) => st.durable = st.durable.max(target),
                Err(_) => {
                    // Not only the writes before it: one made while it ran may have had its
                    // page written back, failed and dropped by this very sync.
                    let lo = st.durable;
                    let hi = self.begun.load(Ordering::Acquire);
                    match st.failed.last_mut() {
                        // Failures in a row with nothing made durable between: one range.
                        Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                        _ if hi > lo => st.failed.push((lo, hi)),
                        _ => {}
                    }
                }
            }
            self.done.notify_all();
            r?;
        }
    }
}

impl DirtyLog {
    /// Create an empty log atomically.
    pub fn create(path: &Path, nregions: u64) -> Result<DirtyLog> {
        let tmp = atomic::TempFile::new(path)?;
        tmp.write_all(&encode_header(nregions))?;
        tmp.write_all(&vec![0u8; bitmap_bytes(nregions)])?;
        tmp.commit()?;
        Ok(DirtyLog::new(
            DurableFile::open(path)?,
            vec![0u8; bitmap_bytes(nregions)],
        ))
    }

    fn new(file: DurableFile, bits: Vec<u8>) -> DirtyLog {
        let file = Arc::new(file);
        DirtyLog {
            sync: LogSync::new(file.clone()),
            file,
            bits,
            unsynced: Vec::new(),
        }
    }

    /// The handle writers wait on for their marks to be durable.
    pub fn sync_handle(&self) -> Arc<LogSync> {
        self.sync.clone()
    }

    /// Open and read the log; returns it and the regions marked in it.
    ///
    /// # Errors
    /// `Format` for a damaged header or a region count other than `nregions`.
    pub fn open(path: &Path, nregions: u64) -> Result<(DirtyLog, Vec<u64>)> {
        let file = DurableFile::open(path)?;
        let ferr = |source| Error::Format {
            path: path.to_path_buf(),
            source,
        };
        let mut h = vec![0u8; PAGE];
        let got = file.read_at(&mut h, 0)?;
        if got < PAGE {
            return Err(ferr(FormatError::Truncated { got, need: PAGE }));
        }
        let n = decode_header(&h).map_err(ferr)?;
        if n != nregions {
            return Err(ferr(FormatError::Invalid {
                what: "region count",
                why: format!("log has {n}, map has {nregions}"),
            }));
        }
        let mut bits = vec![0u8; bitmap_bytes(nregions)];
        let got = file.read_at(&mut bits, PAGE as u64)?;
        if got < bits.len() {
            return Err(ferr(FormatError::Truncated {
                got: PAGE + got,
                need: PAGE + bits.len(),
            }));
        }
        let marked = (0..nregions)
            .filter(|&r| bits[(r / 8) as usize] & (1 << (r % 8)) != 0)
            .collect();
        Ok((DirtyLog::new(file, bits), marked))
    }

    pub fn is_marked(&self, region: u64) -> bool {
        self.bits[(region / 8) as usize] & (1 << (region % 8)) != 0
    }

    /// Mark regions and make the marks durable before returning.
    ///
    /// # Errors
    /// A failed write or sync. The regions then count as unmarked, so the next write to them
    /// marks them again (rewriting the page) instead of trusting a mark that may never have
    /// reached the disk.
    pub fn mark(&mut self, regions: &[u64]) -> Result<()> {
        match self.mark_unsynced(regions)? {
            Some(w) => self.sync.wait(&w),
            None => Ok(()),
        }
    }

    /// Forget marks whose sync failed (they count as unmarked), and the bookkeeping of marks
    /// known durable.
    fn settle_unsynced(&mut self) {
        if self.unsynced.is_empty() {
            return;
        }
        // One look at the state: a failure and a later success between two looks would pass
        // a lost mark for a durable one.
        let st = self.sync.state.lock();
        let mut keep = Vec::new();
        for &(r, g) in &self.unsynced {
            if st.is_failed(g) {
                self.bits[(r / 8) as usize] &= !(1 << (r % 8));
            } else if g > st.durable {
                keep.push((r, g));
            }
        }
        drop(st);
        self.unsynced = keep;
    }

    /// Set the marks of `regions` and write their pages without syncing. Returns what to
    /// pass to `LogSync::wait` before any write to them, if any of them is not known durable
    /// yet (this call's marks, or other writers' still in flight: all of them, since a sync
    /// may fail for one and succeed for another).
    ///
    /// # Errors
    /// A failed page write: the new marks are undone.
    pub fn mark_unsynced(&mut self, regions: &[u64]) -> Result<Option<MarkWait>> {
        self.settle_unsynced();
        let mut deps: Vec<u64> = self
            .unsynced
            .iter()
            .filter(|(r, _)| regions.contains(r))
            .map(|&(_, g)| g)
            .collect();
        deps.sort_unstable();
        deps.dedup();
        let new: Vec<u64> = regions
            .iter()
            .copied()
            .filter(|&r| !self.is_marked(r))
            .collect();
        if new.is_empty() {
            return Ok((!deps.is_empty()).then_some(MarkWait(deps)));
        }
        for &r in &new {
            self.bits[(r / 8) as usize] |= 1 << (r % 8);
        }
        let mut pages: Vec<u64> = new.iter().map(|r| r / BITS_PER_PAGE).collect();
        pages.dedup();
        // Counted before the write: a sync failing while it runs must count it as lost.
        let generation = self.sync.begun.fetch_add(1, Ordering::AcqRel) + 1;
        if let Err(e) = self.write_pages_unsynced(&pages) {
            for r in new {
                self.bits[(r / 8) as usize] &= !(1 << (r % 8));
            }
            return Err(e);
        }
        self.sync.written.store(generation, Ordering::Release);
        self.unsynced.extend(new.iter().map(|&r| (r, generation)));
        deps.push(generation);
        Ok(Some(MarkWait(deps)))
    }

    /// Clear every mark durably (after the map flush that covers them is durable).
    pub fn clear(&mut self) -> Result<()> {
        self.retain_only(&[])
    }

    /// Clear every mark but those of `keep` durably (after the map flush that covers the
    /// cleared ones is durable). Writes only the pages that change.
    pub fn retain_only(&mut self, keep: &[u64]) -> Result<()> {
        // Writers are quiesced, so every mark is settled: durable, or failed and dropped here.
        self.settle_unsynced();
        let mut next = vec![0u8; self.bits.len()];
        for &r in keep {
            if self.is_marked(r) {
                next[(r / 8) as usize] |= 1 << (r % 8);
            }
        }
        let pages: Vec<u64> = (0..(self.bits.len() / PAGE) as u64)
            .filter(|p| {
                let (s, e) = (*p as usize * PAGE, (*p as usize + 1) * PAGE);
                self.bits[s..e] != next[s..e]
            })
            .collect();
        if pages.is_empty() {
            return Ok(());
        }
        self.bits = next;
        self.write_pages(&pages)
    }

    fn write_pages(&mut self, pages: &[u64]) -> Result<()> {
        self.write_pages_unsynced(pages)?;
        self.file.sync()
    }

    fn write_pages_unsynced(&self, pages: &[u64]) -> Result<()> {
        for &p in pages {
            let s = p as usize * PAGE;
            self.file
                .write_at(&self.bits[s..s + PAGE], PAGE as u64 + s as u64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[test]
    fn marks_survive_reopen_and_clear() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        let mut l = DirtyLog::create(&p, 40000).unwrap();
        l.mark(&[3, 39999]).unwrap();
        drop(l);
        let (mut l, marked) = DirtyLog::open(&p, 40000).unwrap();
        assert_eq!(marked, vec![3, 39999]);
        assert!(l.is_marked(3) && !l.is_marked(4));
        l.clear().unwrap();
        assert!(DirtyLog::open(&p, 40000).unwrap().1.is_empty());
    }

    #[test]
    fn concurrent_marks_share_syncs_and_all_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        let log = Mutex::new(DirtyLog::create(&p, 100_000).unwrap());
        let sync = log.lock().sync_handle();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (log, sync) = (&log, &sync);
                s.spawn(move || {
                    for i in 0..50u64 {
                        // Regions on several log pages; each thread's own, plus one shared.
                        let r = [t * 25_000 + i, 99_999];
                        let g = log.lock().mark_unsynced(&r).unwrap();
                        if let Some(g) = g {
                            sync.wait(&g).unwrap();
                        }
                    }
                });
            }
        });
        drop(log);
        let (_, marked) = DirtyLog::open(&p, 100_000).unwrap();
        let mut want: Vec<u64> = (0..4u64)
            .flat_map(|t| (0..50).map(move |i| t * 25_000 + i))
            .collect();
        want.push(99_999);
        assert_eq!(marked, want);
    }

    #[test]
    fn a_failed_sync_fails_its_writers_and_their_marks_are_written_again() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        let mut l = DirtyLog::create(&p, 40000).unwrap();
        let sync = l.sync_handle();
        let g1 = l.mark_unsynced(&[5]).unwrap().expect("a new mark waits");
        // Another writer into the same region before the sync: it waits for the same one.
        assert_eq!(l.mark_unsynced(&[5]).unwrap(), Some(g1.clone()));
        crate::track::powerloss::fail_next_sync(&p);
        assert!(sync.wait(&g1).is_err(), "the failed sync fails the write");
        // A later sync succeeding does not vouch for the failed one.
        let g2 = l.mark_unsynced(&[39999]).unwrap().unwrap();
        sync.wait(&g2).unwrap();
        assert!(sync.wait(&g1).is_err());
        // The failed mark counts as unmarked: the next write to it marks it again.
        let g3 = l.mark_unsynced(&[5]).unwrap().expect("marked again");
        assert!(g3.0[0] > g2.0[0]);
        sync.wait(&g3).unwrap();
        assert_eq!(l.mark_unsynced(&[5, 39999]).unwrap(), None, "durable now");
        drop(l);
        assert_eq!(DirtyLog::open(&p, 40000).unwrap().1, vec![5, 39999]);
    }

    #[test]
    fn a_write_that_needs_a_lost_mark_fails_even_when_its_own_syncs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        let mut l = DirtyLog::create(&p, 40000).unwrap();
        let sync = l.sync_handle();
        // A durable mark stays good whatever fails after it.
        let g0 = l.mark_unsynced(&[7]).unwrap().unwrap();
        sync.wait(&g0).unwrap();
        // Writer A marks region 5; writer B spans 5 (A's mark, in flight) and 39999 (a new
        // mark on another log page).
        let a = l.mark_unsynced(&[5]).unwrap().unwrap();
        let b = l.mark_unsynced(&[5, 39999]).unwrap().unwrap();
        assert_eq!(b.0.len(), 2, "B depends on both marks: {b:?}");
        crate::track::powerloss::fail_next_sync(&p);
        assert!(sync.wait(&a).is_err());
        // Syncing again would succeed, but region 5's page may be lost: B must fail too.
        assert!(sync.wait(&b).is_err(), "B needs A's lost mark");
        sync.wait(&g0).unwrap();
        assert!(l.is_marked(7));
        // Both lost marks are made again by the next writes.
        let c = l.mark_unsynced(&[5, 39999]).unwrap().unwrap();
        sync.wait(&c).unwrap();
        drop(l);
        assert_eq!(DirtyLog::open(&p, 40000).unwrap().1, vec![5, 7, 39999]);
    }

    #[test]
    fn a_failed_page_write_leaves_the_region_unmarked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        let mut l = DirtyLog::create(&p, 10).unwrap();
        crate::track::powerloss::fail_next_write(&p);
        assert!(l.mark_unsynced(&[3]).is_err());
        assert!(!l.is_marked(3));
        l.mark(&[3]).unwrap();
        assert!(l.is_marked(3));
        drop(l);
        assert_eq!(DirtyLog::open(&p, 10).unwrap().1, vec![3]);
    }

    #[test]
    fn damaged_or_mismatched_log_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        DirtyLog::create(&p, 10).unwrap();
        assert!(DirtyLog::open(&p, 11).is_err());
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(DirtyLog::open(&p, 10).is_err());
        std::fs::write(&p, &b[..100]).unwrap();
        assert!(DirtyLog::open(&p, 10).is_err());
    }
}
