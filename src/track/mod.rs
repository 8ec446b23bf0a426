//! Change tracking for one disk: the sequence-number map, its durable dirty-region log, and
//! recovery at open.
//!
//! Invariants kept here:
//! - No missed change (2): a region is durably marked in the log before any write to it is
//!   acknowledged; at open, every block of a marked region is stamped with the current
//!   sequence number, so after any crash "changed since R" is a superset of the truth.
//! - No missed outside write after an unclean stop (2, 3): a region's block digests are
//!   recorded (`digest`) before its mark is cleared. The open after an unclean stop that the
//!   settled identity cannot vouch for reads every clean region's data and stamps each block
//!   whose bytes differ from its digest, or whose digest is unknown, as marked regions are.
//! - Tracking loss is never silent (3): a missing or damaged map or log, a damaged page outside
//!   the log, or an image replaced, resized or modified since the last flush restarts tracking
//!   at the current number (`base_seq`) and records why; queries reaching back before it fail.

pub mod digest;
mod durable;
pub mod log;
pub mod mapfile;
#[cfg(test)]
mod powerloss;
mod scan;
pub mod seqmap;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::FormatError;
use crate::store::Store;
use digest::{DigestFile, UNKNOWN};
use log::DirtyLog;
use mapfile::{FLAG_OPEN, Identity, MapFile, MapHeader};
use scan::ImageReader;
use seqmap::{BlockRun, REGION_BLOCKS, SeqMap, regions_for};

/// How the tracker found its state at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Regions re-stamped after an unclean stop.
    pub recovered_regions: u64,
    /// Set when tracking had to restart, saying why.
    pub lost: Option<String>,
    /// The stop was unclean and nothing proved the image untouched since: every clean
    /// region's data was read and checked against its digests.
    pub verified: bool,
    /// Blocks outside marked regions counted as changed by that check: their bytes differ from
    /// their digest, or no digest was known.
    pub unproven_blocks: u64,
    /// Bytes of the image read at open (the check, and digests of regions that had none).
    pub bytes_read: u64,
}

/// Regions scanned and recorded per durable step of an open: bounds the pages held in memory.
const SCAN_BATCH: usize = 256;

/// Why tracking restarts: the state found at open (or while running) cannot vouch for every
/// change since the last flush. Its text is what the map header records and what `status`
/// and a failing `changes` show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Restart {
    #[error("tracking state is missing")]
    MapMissing,
    #[error("tracking state is damaged ({0})")]
    MapDamaged(FormatError),
    #[error("dirty-region log is missing")]
    LogMissing,
    #[error("dirty-region log is damaged ({0})")]
    LogDamaged(FormatError),
    #[error("tracking state is damaged ({0} region(s) fail their checksum)")]
    PagesDamaged(usize),
    #[error("the image file was replaced outside vmref")]
    ImageReplaced,
    #[error("the image was resized outside vmref ({from} -> {to} bytes)")]
    ImageResized { from: u64, to: u64 },
    #[error("the image was modified outside the mount")]
    ImageModified,
}

#[derive(Debug)]
pub struct Tracker {
    name: String,
    header: MapHeader,
    map: SeqMap,
    file: MapFile,
    log: DirtyLog,
    /// Regions written since the last flush (their map pages go out at the next one), and
    /// the same as a bitmap for the write path.
    marked: Vec<u64>,
    dirty: Vec<bool>,
    /// Per region marked in the log: the blocks written since its digests were last
    /// recorded (bit i: block i of the region). Digested when the mark is cleared.
    pending: BTreeMap<u64, [u64; 16]>,
    digests: DigestFile,
    image: ImageReader,
    /// The header as last made durable: a flush with no marks and no header change writes
    /// nothing, so a command that fails or only reads leaves the store's bytes as they were.
    committed: MapHeader,
    report: OpenReport,
    map_path: PathBuf,
    log_path: PathBuf,
    digest_path: PathBuf,
}

fn fresh_header(block_size: u32, id: Identity, seq: u32, reason: &str) -> MapHeader {
    MapHeader {
        generation: 0,
        block_size,
        disk_size: id.size,
        nblocks: id.size.div_ceil(block_size as u64),
        current_seq: seq,
        base_seq: seq,
        flags: 0,
        identity: id,
        reason: reason.to_string(),
        digest_epoch: 0,
        settled: false,
    }
}

/// A digest epoch: any non-zero number a map written without digests cannot hold.
fn new_epoch() -> Result<u64> {
    let b = crate::store::random_bytes()?;
    Ok(u64::from_le_bytes(b[..8].try_into().expect("8 bytes")).max(1))
}

impl Tracker {
    /// Start tracking a newly registered disk at sequence number `seq` (one above any number
    /// an older point holds for this name, so those points are never mistaken for valid).
    /// Reads the image's data once, to record its block digests.
    pub fn create(
        store: &Store,
        name: &str,
        image: &File,
        path: &Path,
        seq: u32,
    ) -> Result<Tracker> {
        let id = Identity::of(&image.metadata().map_err(Error::io("stat", path))?);
        let mut header = fresh_header(store.block_size(), id, seq.max(1), "");
        // Until its first clean close, a crash leaves the new state to be checked at open.
        header.flags = FLAG_OPEN;
        Self::create_files(store, name, header, OpenReport::default(), image, path)
    }

    /// Start tracking an image that holds exactly the bytes of a point whose number for this
    /// disk is `point_seq` (a promoted replica): changes since that point are exact (none yet),
    /// changes since any earlier number are unknown. Reads the image's data once, as `create`.
    pub fn create_at_point(
        store: &Store,
        name: &str,
        image: &File,
        path: &Path,
        point_seq: u32,
    ) -> Result<Tracker> {
        let id = Identity::of(&image.metadata().map_err(Error::io("stat", path))?);
        let mut header = fresh_header(store.block_size(), id, point_seq + 1, "");
        header.base_seq = point_seq;
        header.flags = FLAG_OPEN;
        Self::create_files(store, name, header, OpenReport::default(), image, path)
    }

    /// New tracking files for `header`, then the digests of every region as the image is now.
    fn create_files(
        store: &Store,
        name: &str,
        mut header: MapHeader,
        report: OpenReport,
        image: &File,
        path: &Path,
    ) -> Result<Tracker> {
        let nregions = regions_for(header.nblocks);
        header.digest_epoch = new_epoch()?;
        // The digest file goes first: a map naming its epoch never exists without it.
        let digests = DigestFile::create(&store.digest_path(name), header.digest_epoch, nregions)?;
        let file = MapFile::create(&store.map_path(name), &header)?;
        let log = DirtyLog::create(&store.log_path(name), nregions)?;
        let mut t = Tracker {
            name: name.to_string(),
            map: SeqMap::new(header.nblocks),
            committed: header.clone(),
            image: ImageReader::new(image, path, header.disk_size, header.block_size)?,
            header,
            file,
            log,
            marked: Vec::new(),
            dirty: vec![false; nregions as usize],
            pending: BTreeMap::new(),
            digests,
            report,
            map_path: store.map_path(name),
            log_path: store.log_path(name),
            digest_path: store.digest_path(name),
        };
        // Nothing is stamped, so nothing orders these writes against the map's.
        let started = std::time::Instant::now();
        let all: Vec<u64> = (0..nregions).collect();
        t.record_digests(&all)?;
        ::log::info!(
            "disk {name}: recorded block digests of {nregions} region(s) in {:.1}s, {} bytes read",
            started.elapsed().as_secs_f64(),
            t.report.bytes_read
        );
        Ok(t)
    }

    /// Open a disk's tracking state, recover it after an unclean stop, and check that the
    /// image is the one last tracked. `seq_floor` is one above the highest number any point
    /// holds for this disk.
    ///
    /// # Errors
    /// I/O errors only: damage is handled by restarting tracking (see `report`).
    pub fn open(
        store: &Store,
        name: &str,
        image: &File,
        path: &Path,
        seq_floor: u32,
    ) -> Result<Tracker> {
        let id = Identity::of(&image.metadata().map_err(Error::io("stat", path))?);
        let map_path = store.map_path(name);
        let loaded = if map_path.exists() {
            match MapFile::open(&map_path) {
                Ok(l) => Ok(l),
                Err(Error::Format { source, .. }) => Err(Restart::MapDamaged(source)),
                Err(e) => return Err(e),
            }
        } else {
            Err(Restart::MapMissing)
        };
        let restart = |cur, reason| Self::restart(store, name, image, path, id, cur, reason);
        let mut loaded = match loaded {
            Ok(l) => l,
            Err(reason) => return restart(seq_floor.max(1), reason),
        };
        let nregions = regions_for(loaded.header.nblocks);
        let log_path = store.log_path(name);
        let (log, marked) = match DirtyLog::open(&log_path, nregions) {
            Ok(x) => x,
            Err(Error::Format { source, .. }) => {
                let cur = loaded.header.current_seq.max(seq_floor);
                return restart(cur, Restart::LogDamaged(source));
            }
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let cur = loaded.header.current_seq.max(seq_floor);
                return restart(cur, Restart::LogMissing);
            }
            Err(e) => return Err(e),
        };
        let cur = loaded.header.current_seq.max(seq_floor).max(1);
        let unexplained: Vec<u64> = loaded
            .damaged
            .iter()
            .copied()
            .filter(|r| !log.is_marked(*r))
            .collect();
        let old = loaded.header.identity;
        // Times count only when they moved forward: identities are recorded at flushes that do
        // not sync the image, so after a power loss the inode's times may be older, never newer.
        let reason = if !unexplained.is_empty() {
            Some(Restart::PagesDamaged(unexplained.len()))
        } else if old.dev != id.dev || old.ino != id.ino {
            Some(Restart::ImageReplaced)
        } else if old.size != id.size {
            Some(Restart::ImageResized {
                from: old.size,
                to: id.size,
            })
        } else if marked.is_empty() && (id.mtime_ns > old.mtime_ns || id.ctime_ns > old.ctime_ns) {
            Some(Restart::ImageModified)
        } else {
            None
        };
        if let Some(reason) = reason {
            return restart(cur, reason);
        }
        // Digests are trusted only from the file whose epoch this map names: a map written by
        // a release that kept none names no epoch (0), so then nothing is known.
        let digest_path = store.digest_path(name);
        let epoch = loaded.header.digest_epoch;
        let digests = match DigestFile::open(&digest_path, nregions) {
            Ok(d) if epoch != 0 && d.epoch() == epoch => Some(d),
            Ok(_) | Err(Error::Format { .. }) => None,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut header = loaded.header.clone();
        let digests = match digests {
            Some(d) => d,
            None => {
                ::log::info!("disk {name}: no block digests known; recording them now");
                header.digest_epoch = new_epoch()?;
                DigestFile::create(&digest_path, header.digest_epoch, nregions)?
            }
        };
        // An unclean stop leaves marks, or an open flag with no settled identity that the
        // image still shows. Then a write made straight to the image after the stop may be
        // anywhere, and only the bytes can tell (see `verify`).
        let proven = loaded.header.settled && id == old;
        let unclean = !marked.is_empty() || (loaded.header.flags & FLAG_OPEN != 0 && !proven);
        for &r in &marked {
            // A torn page of a marked region is re-stamped whole, so its old content is moot.
            loaded.map.stamp_region(r, cur);
        }
        header.current_seq = cur;
        header.flags |= FLAG_OPEN;
        header.identity = id;
        header.settled = proven;
        let mut t = Tracker {
            name: name.to_string(),
            map: loaded.map,
            committed: loaded.header,
            image: ImageReader::new(image, path, header.disk_size, header.block_size)?,
            header,
            file: loaded.file,
            log,
            dirty: vec![false; nregions as usize],
            marked,
            pending: BTreeMap::new(),
            digests,
            report: OpenReport::default(),
            map_path,
            log_path,
            digest_path,
        };
        t.report.recovered_regions = t.marked.len() as u64;
        t.report.verified = unclean;
        t.recover(unclean)?;
        Ok(t)
    }

    /// The rest of `open`: make the recovered stamps durable, check the image against its
    /// digests after an unclean stop, record digests where none are known, and start with an
    /// empty log.
    fn recover(&mut self, unclean: bool) -> Result<()> {
        let id = self.header.identity;
        let marked = std::mem::take(&mut self.marked);
        if !marked.is_empty() || !same_state(&self.header, &self.committed) {
            self.file.write_regions(&self.map, &marked)?;
            self.file.commit_header(&self.header)?;
            self.committed = self.header.clone();
        }
        let started = std::time::Instant::now();
        let todo: Vec<u64> = (0..self.map.nregions())
            .filter(|&r| unclean || !self.digests.is_known(r))
            .collect();
        let mut log_marked = vec![false; self.map.nregions() as usize];
        for &r in &marked {
            log_marked[r as usize] = true;
        }
        if unclean {
            self.verify(&todo, &log_marked)?;
        } else {
            self.record_digests(&todo)?;
        }
        if unclean || !todo.is_empty() {
            ::log::info!(
                "disk {}: {} {} region(s) of block digests in {:.1}s, {} bytes read{}",
                self.name,
                if unclean { "checked" } else { "recorded" },
                todo.len(),
                started.elapsed().as_secs_f64(),
                self.report.bytes_read,
                if unclean {
                    format!(
                        "; {} block(s) counted as changed",
                        self.report.unproven_blocks
                    )
                } else {
                    String::new()
                }
            );
        }
        debug_assert_eq!(self.header.identity, id);
        // Recovered stamps and the digests of every region are durable now: start with an
        // empty log.
        self.log.clear()
    }

    /// After an unclean stop: digest `regions` as they are now, stamp every block outside a
    /// log-marked region whose bytes differ from its digest or has none, make those stamps
    /// durable, and only then record the new digests (a digest recorded before its stamp
    /// could hide the change from the next open).
    fn verify(&mut self, regions: &[u64], log_marked: &[bool]) -> Result<()> {
        let extents = self.image.data_extents()?;
        let cur = self.header.current_seq;
        let nblocks = self.map.nblocks();
        for batch in regions.chunks(SCAN_BATCH) {
            let (pages, read) = self.image.scan_regions(&extents, batch)?;
            self.report.bytes_read += read;
            let mut stamped = Vec::new();
            let mut changed = vec![false; batch.len()];
            for (k, (&r, page)) in batch.iter().zip(&pages).enumerate() {
                let old = if log_marked[r as usize] {
                    None
                } else {
                    self.digests.region(r)?
                };
                changed[k] = old.as_deref() != Some(page.as_slice());
                if log_marked[r as usize] {
                    continue;
                }
                let base = r * REGION_BLOCKS;
                let n = (nblocks - base).min(REGION_BLOCKS) as usize;
                let mut hit = false;
                for i in 0..n {
                    let was = old.as_ref().map_or(UNKNOWN, |o| o[i]);
                    if was == UNKNOWN || was != page[i] {
                        self.map.stamp(base + i as u64, 1, cur);
                        self.report.unproven_blocks += 1;
                        hit = true;
                    }
                }
                if hit {
                    stamped.push(r);
                }
            }
            if !stamped.is_empty() {
                self.file.write_regions(&self.map, &stamped)?;
                self.file.commit_header(&self.header)?;
                self.committed = self.header.clone();
            }
            for (k, (&r, page)) in batch.iter().zip(&pages).enumerate() {
                if changed[k] {
                    self.digests.set_region(r, page)?;
                }
            }
            self.digests.sync()?;
        }
        Ok(())
    }

    /// Digest `regions` as they are now and record the digests durably. Only for regions
    /// whose bytes tracking already accounts for (a new disk, a clean open, a restart).
    fn record_digests(&mut self, regions: &[u64]) -> Result<()> {
        if regions.is_empty() {
            return Ok(());
        }
        let extents = self.image.data_extents()?;
        for batch in regions.chunks(SCAN_BATCH) {
            let (pages, read) = self.image.scan_regions(&extents, batch)?;
            self.report.bytes_read += read;
            for (&r, page) in batch.iter().zip(&pages) {
                self.digests.set_region(r, page)?;
            }
        }
        self.digests.sync()
    }

    fn restart(
        store: &Store,
        name: &str,
        image: &File,
        path: &Path,
        id: Identity,
        cur: u32,
        reason: Restart,
    ) -> Result<Tracker> {
        let reason = reason.to_string();
        // Info, not a warning: the loss is reported where it matters (changes since an older
        // point fail naming the reason, status shows it), and a failing command must print
        // exactly one line on stderr.
        ::log::info!("disk {name}: change tracking restarts: {reason}");
        let mut header = fresh_header(store.block_size(), id, cur, &reason);
        header.flags = FLAG_OPEN;
        Self::create_files(
            store,
            name,
            header,
            OpenReport {
                lost: Some(reason),
                ..OpenReport::default()
            },
            image,
            path,
        )
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn report(&self) -> &OpenReport {
        &self.report
    }
    pub fn current_seq(&self) -> u32 {
        self.header.current_seq
    }
    pub fn base_seq(&self) -> u32 {
        self.header.base_seq
    }
    pub fn lost_reason(&self) -> &str {
        &self.header.reason
    }
    pub fn disk_size(&self) -> u64 {
        self.header.disk_size
    }
    pub fn block_size(&self) -> u32 {
        self.header.block_size
    }
    pub fn map(&self) -> &SeqMap {
        &self.map
    }
    pub fn dirty_regions(&self) -> usize {
        self.marked.len()
    }

    /// Whether `settle` would change anything: regions are still marked, or the recorded
    /// identity is not a settled one.
    pub fn needs_settle(&self) -> bool {
        !self.pending.is_empty() || !self.committed.settled
    }

    /// Record a write of `len` bytes at `off` before it is made: durably mark the regions it
    /// touches (once per flush interval), then stamp its blocks with the current number.
    ///
    /// # Errors
    /// A failed log write: the data write must then not happen.
    pub fn before_write(&mut self, off: u64, len: u64) -> Result<()> {
        if let Some(w) = self.mark_for_write(off, len)? {
            self.log.sync_handle().wait(&w)?;
        }
        self.stamp_write(off, len);
        Ok(())
    }

    /// The first half of `before_write`, for a caller that waits for the log sync without
    /// holding the tracker (group commit, see `log`): mark the regions the write touches in
    /// the log, unsynced. Returns what to wait for (`log_sync().wait`) if some of
    /// them are not known durable yet; `stamp_write` follows only once that wait succeeded.
    ///
    /// # Errors
    /// A failed log write: the data write must then not happen.
    pub fn mark_for_write(&mut self, off: u64, len: u64) -> Result<Option<log::MarkWait>> {
        if len == 0 {
            return Ok(None);
        }
        let (first, last) = self.block_span(off, len);
        let regions: Vec<u64> = (first / REGION_BLOCKS..=last / REGION_BLOCKS).collect();
        self.log.mark_unsynced(&regions)
    }

    /// What the writers of `mark_for_write` wait on for their marks to be durable.
    pub fn log_sync(&self) -> std::sync::Arc<log::LogSync> {
        self.log.sync_handle()
    }

    /// The second half of `before_write`, once the regions' marks are durable: stamp the
    /// write's blocks with the current number and note them for the next flush.
    pub fn stamp_write(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = self.block_span(off, len);
        for r in first / REGION_BLOCKS..=last / REGION_BLOCKS {
            if !self.dirty[r as usize] {
                self.dirty[r as usize] = true;
                self.marked.push(r);
            }
        }
        for b in first..=last {
            let i = b % REGION_BLOCKS;
            let bits = self.pending.entry(b / REGION_BLOCKS).or_default();
            bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        self.map
            .stamp(first, last - first + 1, self.header.current_seq);
    }

    /// First and last block a write of `len` (> 0) bytes at `off` touches.
    fn block_span(&self, off: u64, len: u64) -> (u64, u64) {
        let bs = self.header.block_size as u64;
        let first = off / bs;
        let last = ((off + len - 1) / bs).min(self.header.nblocks - 1);
        (first, last)
    }

    /// Make the stamps durable and age the log. The caller must have quiesced writers, and
    /// passes the image's identity.
    pub fn flush(&mut self, id: Identity) -> Result<()> {
        self.commit(id, false, false)
    }

    /// Flush, digest every region still marked and clear the log, and record `id` as a
    /// settled identity: one that any later change to the image shows in its times. The
    /// caller quiesced writers and vouches that the image's last tracked change (write, owner
    /// or mode) ended long enough before `id` was taken that a later change cannot fall in the
    /// same timestamp tick (`live::SETTLE_AFTER`), and that the image was synced just before.
    ///
    /// So an idle disk carries no marks, and the open after a crash or power loss that finds
    /// the image as settled proves, with no read, that nothing wrote to it since.
    pub fn settle(&mut self, id: Identity) -> Result<()> {
        self.commit(id, true, true)
    }

    /// What flushes, settles and closes share. `all`: every marked region goes clean (its
    /// digests are recorded and its mark cleared), not only those idle for the interval.
    fn commit(&mut self, id: Identity, all: bool, settle: bool) -> Result<()> {
        self.check_outside_write(id)?;
        // A settled identity stays settled while the image shows it unchanged: a later change
        // would have moved its times.
        self.header.settled = settle || (self.committed.settled && id == self.committed.identity);
        self.header.identity = id;
        let cleaning: Vec<u64> = self
            .pending
            .keys()
            .copied()
            .filter(|&r| all || !self.dirty[r as usize])
            .collect();
        // Setting the open flag alone is not worth a write, clearing it is: an open flag on
        // disk with no marks sends the next open to check the image's bytes.
        let clears_open =
            self.committed.flags & FLAG_OPEN != 0 && self.header.flags & FLAG_OPEN == 0;
        if self.marked.is_empty()
            && cleaning.is_empty()
            && !clears_open
            && same_state(&self.header, &self.committed)
        {
            return Ok(());
        }
        self.marked.sort_unstable();
        self.marked.dedup();
        self.file.write_regions(&self.map, &self.marked)?;
        self.file.commit_header(&self.header)?;
        self.committed = self.header.clone();
        // A region's digests are durable before its mark goes: until then an open after a
        // crash re-stamps the region whole, whatever its digests say.
        if !cleaning.is_empty() {
            for &r in &cleaning {
                let bits = self.pending[&r];
                let mut page = self
                    .digests
                    .region(r)?
                    .unwrap_or_else(|| vec![UNKNOWN; REGION_BLOCKS as usize]);
                self.image.digest_blocks(r, &bits, &mut page)?;
                self.digests.set_region(r, &page)?;
            }
            self.digests.sync()?;
            for r in &cleaning {
                self.pending.remove(r);
            }
        }
        // Regions written in this interval keep their mark into the next one: a working set
        // that stays busy then costs no log sync per interval. A region idle for a whole
        // interval is cleared. After a crash this over-reports those regions, never less.
        if all {
            self.log.clear()?;
        } else {
            self.log.retain_only(&self.marked)?;
        }
        for &r in &self.marked {
            self.dirty[r as usize] = false;
        }
        self.marked.clear();
        Ok(())
    }

    /// Record the image's identity after a change the mount itself made to it (owner or
    /// mode through the live file): its ctime moved, but through no write, so the next flush
    /// or open must not take it for one. The caller quiesced writers and flushed just before,
    /// so any earlier outside write was already judged.
    pub fn note_identity(&mut self, id: Identity) -> Result<()> {
        self.header.identity = id;
        self.header.settled = false;
        self.file.commit_header(&self.header)?;
        self.committed = self.header.clone();
        Ok(())
    }

    /// Every tracked write since the last flush marked a region, so with no marks the image's
    /// times can only have moved through a write that bypassed the mount: restart tracking at
    /// the current number.
    fn check_outside_write(&mut self, id: Identity) -> Result<()> {
        let old = self.committed.identity;
        if self.marked.is_empty() && (id.mtime_ns > old.mtime_ns || id.ctime_ns > old.ctime_ns) {
            self.restart_in_place(id, Restart::ImageModified)?;
        }
        Ok(())
    }

    /// Restart tracking while running (see `open` for the same at start): forget every stamp,
    /// and record that changes before the current number are unknown, and why. No digest is
    /// known until the next open records them (writers are held back here, so the image is
    /// not read now).
    fn restart_in_place(&mut self, id: Identity, reason: Restart) -> Result<()> {
        let reason = &reason.to_string();
        ::log::info!("disk {}: change tracking restarts: {reason}", self.name);
        let mut header = fresh_header(self.header.block_size, id, self.header.current_seq, reason);
        // The geometry stays that of the running disk; the identity keeps its size too, so a
        // resize that came with the outside write is still found (and handled) at next open.
        header.disk_size = self.header.disk_size;
        header.nblocks = self.header.nblocks;
        header.identity.size = self.header.disk_size;
        header.flags = self.header.flags;
        header.digest_epoch = new_epoch()?;
        let nregions = regions_for(header.nblocks);
        self.digests = DigestFile::create(&self.digest_path, header.digest_epoch, nregions)?;
        self.file = MapFile::create(&self.map_path, &header)?;
        self.log = DirtyLog::create(&self.log_path, nregions)?;
        self.map = SeqMap::new(header.nblocks);
        self.marked.clear();
        self.pending.clear();
        self.dirty.iter_mut().for_each(|d| *d = false);
        self.committed = header.clone();
        self.header = header;
        self.report.lost = Some(reason.to_string());
        Ok(())
    }

    /// Record a reference point: flush with the next number already in the header, then
    /// advance. Returns the number the point holds. Writers must be quiesced.
    pub fn advance(&mut self, id: Identity) -> Result<u32> {
        let seq = self.bump(id)?;
        self.flush(id)?;
        Ok(seq)
    }

    /// The first half of `advance`, in memory only: the point's number, with the next one in
    /// the header. Nothing may claim the number durably until `flush(id)` returns; a caller
    /// that splits the two overlaps the flush with other syncs of the same point. On failure
    /// of either half nothing durable claims the new number, and a later point skips it.
    pub fn bump(&mut self, id: Identity) -> Result<u32> {
        // Before the number moves: a write that bypassed the mount happened before this point,
        // so the point itself is where exact tracking starts again.
        self.check_outside_write(id)?;
        let seq = self.header.current_seq;
        self.header.current_seq = seq + 1;
        Ok(seq)
    }

    /// Clean stop: flush, digest every region still marked, clear the log and the open flag.
    /// A clean stop leaves nothing to recover: changes stay exact across it.
    pub fn close(&mut self, id: Identity) -> Result<()> {
        self.header.flags &= !FLAG_OPEN;
        self.commit(id, true, false)
    }

    /// Blocks changed since a point that holds `since` for this disk.
    ///
    /// # Errors
    /// `TrackingLost` if tracking restarted after that point.
    pub fn changed_since(&self, point: &str, since: u32) -> Result<Vec<BlockRun>> {
        if since < self.header.base_seq {
            return Err(Error::TrackingLost {
                disk: self.name.clone(),
                since: point.to_string(),
                reason: if self.header.reason.is_empty() {
                    "the disk was registered after that point".to_string()
                } else {
                    self.header.reason.clone()
                },
            });
        }
        Ok(self.map.changed_since(since))
    }
}

/// Whether two headers describe the same durable state. The generation is the file's own
/// bookkeeping, and `FLAG_OPEN` alone is not worth a write: it goes out with the next real one.
fn same_state(a: &MapHeader, b: &MapHeader) -> bool {
    let strip = |h: &MapHeader| MapHeader {
        generation: 0,
        flags: h.flags & !FLAG_OPEN,
        ..h.clone()
    };
    strip(a) == strip(b)
}

/// Identity of an image path as tracking records it.
pub fn identity_of(path: &Path) -> Result<Identity> {
    let m = std::fs::metadata(path).map_err(Error::io("stat", path))?;
    Ok(Identity::of(&m))
}

#[cfg(test)]
mod tests;
