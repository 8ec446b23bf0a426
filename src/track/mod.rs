//! Change tracking for one disk: the sequence-number map, its durable dirty-region log, and
//! recovery at open.
//!
//! Invariants kept here:
//! - No missed change (2): a region is durably marked in the log before any write to it is
//!   acknowledged; at open, every block of a marked region is stamped with the current
//!   sequence number, so after any crash "changed since R" is a superset of the truth.
//! - Tracking loss is never silent (3): a missing or damaged map or log, a damaged page outside
//!   the log, or an image replaced, resized or modified since the last flush restarts tracking
//!   at the current number (`base_seq`) and records why; queries reaching back before it fail.

mod durable;
pub mod log;
pub mod mapfile;
#[cfg(test)]
mod powerloss;
pub mod seqmap;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::FormatError;
use crate::store::Store;
use log::DirtyLog;
use mapfile::{FLAG_OPEN, Identity, MapFile, MapHeader};
use seqmap::{BlockRun, REGION_BLOCKS, SeqMap, regions_for};

/// How the tracker found its state at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Regions re-stamped after an unclean stop.
    pub recovered_regions: u64,
    /// Set when tracking had to restart, saying why.
    pub lost: Option<String>,
}

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
    /// The header as last made durable: a flush with no marks and no header change writes
    /// nothing, so a command that fails or only reads leaves the store's bytes as they were.
    committed: MapHeader,
    report: OpenReport,
    map_path: PathBuf,
    log_path: PathBuf,
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
    }
}

impl Tracker {
    /// Start tracking a newly registered disk at sequence number `seq` (one above any number
    /// an older point holds for this name, so those points are never mistaken for valid).
    pub fn create(store: &Store, name: &str, id: Identity, seq: u32) -> Result<Tracker> {
        let header = fresh_header(store.block_size(), id, seq.max(1), "");
        Self::create_files(store, name, header, OpenReport::default())
    }

    /// Start tracking an image that holds exactly the bytes of a point whose number for this
    /// disk is `point_seq` (a promoted replica): changes since that point are exact (none yet),
    /// changes since any earlier number are unknown.
    pub fn create_at_point(
        store: &Store,
        name: &str,
        id: Identity,
        point_seq: u32,
    ) -> Result<Tracker> {
        let mut header = fresh_header(store.block_size(), id, point_seq + 1, "");
        header.base_seq = point_seq;
        Self::create_files(store, name, header, OpenReport::default())
    }

    fn create_files(
        store: &Store,
        name: &str,
        header: MapHeader,
        report: OpenReport,
    ) -> Result<Tracker> {
        let file = MapFile::create(&store.map_path(name), &header)?;
        let nregions = regions_for(header.nblocks);
        let log = DirtyLog::create(&store.log_path(name), nregions)?;
        Ok(Tracker {
            name: name.to_string(),
            map: SeqMap::new(header.nblocks),
            committed: header.clone(),
            header,
            file,
            log,
            marked: Vec::new(),
            dirty: vec![false; nregions as usize],
            report,
            map_path: store.map_path(name),
            log_path: store.log_path(name),
        })
    }

    /// Open a disk's tracking state, recover it after an unclean stop, and check that the
    /// image is the one last tracked. `seq_floor` is one above the highest number any point
    /// holds for this disk.
    ///
    /// # Errors
    /// I/O errors only: damage is handled by restarting tracking (see `report`).
    pub fn open(store: &Store, name: &str, id: Identity, seq_floor: u32) -> Result<Tracker> {
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
        let mut loaded = match loaded {
            Ok(l) => l,
            Err(reason) => return Self::restart(store, name, id, seq_floor.max(1), reason),
        };
        let nregions = regions_for(loaded.header.nblocks);
        let log_path = store.log_path(name);
        let (log, marked) = match DirtyLog::open(&log_path, nregions) {
            Ok(x) => x,
            Err(Error::Format { source, .. }) => {
                let cur = loaded.header.current_seq.max(seq_floor);
                return Self::restart(store, name, id, cur, Restart::LogDamaged(source));
            }
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let cur = loaded.header.current_seq.max(seq_floor);
                return Self::restart(store, name, id, cur, Restart::LogMissing);
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
            return Self::restart(store, name, id, cur, reason);
        }
        let mut report = OpenReport::default();
        for &r in &marked {
            // A torn page of a marked region is re-stamped whole, so its old content is moot.
            loaded.map.stamp_region(r, cur);
        }
        report.recovered_regions = marked.len() as u64;
        let mut header = loaded.header.clone();
        header.current_seq = cur;
        let mut t = Tracker {
            name: name.to_string(),
            map: loaded.map,
            committed: loaded.header,
            header,
            file: loaded.file,
            log,
            dirty: vec![false; nregions as usize],
            marked,
            report,
            map_path: store.map_path(name),
            log_path,
        };
        t.header.flags |= FLAG_OPEN;
        t.flush(id)?;
        // Recovered stamps are durable now: start with an empty log.
        t.log.clear()?;
        Ok(t)
    }

    fn restart(
        store: &Store,
        name: &str,
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
                recovered_regions: 0,
                lost: Some(reason),
            },
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

    /// Record a write of `len` bytes at `off` before it is made: durably mark the regions it
    /// touches (once per flush interval), then stamp its blocks with the current number.
    ///
    /// # Errors
    /// A failed log write: the data write must then not happen.
    pub fn before_write(&mut self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = self.header.block_size as u64;
        let first = off / bs;
        let last = ((off + len - 1) / bs).min(self.header.nblocks - 1);
        let regions = first / REGION_BLOCKS..=last / REGION_BLOCKS;
        let new: Vec<u64> = regions
            .clone()
            .filter(|r| !self.log.is_marked(*r))
            .collect();
        if !new.is_empty() {
            self.log.mark(&new)?;
        }
        for r in regions {
            if !self.dirty[r as usize] {
                self.dirty[r as usize] = true;
                self.marked.push(r);
            }
        }
        self.map
            .stamp(first, last - first + 1, self.header.current_seq);
        Ok(())
    }

    /// Make the stamps durable and age the log. The caller must have quiesced writers, and
    /// passes the image's identity.
    pub fn flush(&mut self, id: Identity) -> Result<()> {
        self.check_outside_write(id)?;
        self.header.identity = id;
        if self.marked.is_empty() && same_state(&self.header, &self.committed) {
            return Ok(());
        }
        self.marked.sort_unstable();
        self.marked.dedup();
        self.file.write_regions(&self.map, &self.marked)?;
        self.file.commit_header(&self.header)?;
        self.committed = self.header.clone();
        // Regions written in this interval keep their mark into the next one: a working set
        // that stays busy then costs no log sync per interval. A region idle for a whole
        // interval is cleared. After a crash this over-reports those regions, never less.
        self.log.retain_only(&self.marked)?;
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
    /// and record that changes before the current number are unknown, and why.
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
        self.file = MapFile::create(&self.map_path, &header)?;
        self.log = DirtyLog::create(&self.log_path, regions_for(header.nblocks))?;
        self.map = SeqMap::new(header.nblocks);
        self.marked.clear();
        self.dirty.iter_mut().for_each(|d| *d = false);
        self.committed = header.clone();
        self.header = header;
        self.report.lost = Some(reason.to_string());
        Ok(())
    }

    /// Record a reference point: flush with the next number already in the header, then
    /// advance. Returns the number the point holds. Writers must be quiesced.
    pub fn advance(&mut self, id: Identity) -> Result<u32> {
        // Before the number moves: a write that bypassed the mount happened before this point,
        // so the point itself is where exact tracking starts again.
        self.check_outside_write(id)?;
        let seq = self.header.current_seq;
        self.header.current_seq = seq + 1;
        // On failure nothing durable claims the new number; a later point simply skips it.
        self.flush(id)?;
        Ok(seq)
    }

    /// Clean stop: flush and clear the open flag.
    pub fn close(&mut self, id: Identity) -> Result<()> {
        self.header.flags &= !FLAG_OPEN;
        self.flush(id)?;
        // A clean stop leaves nothing to recover: changes stay exact across it.
        self.log.clear()
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
