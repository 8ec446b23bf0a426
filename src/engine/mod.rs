//! The engine: the one owner of a store's live write path. It holds the store lock, has every
//! registered disk open with its tracker, and carries out the operations that change the
//! store (points, disks) and the queries that need live tracking state (changes). A mounted
//! daemon owns one for its lifetime; without a daemon, a command opens one for its duration.
//!
//! Invariant 4 (nothing half done): a point exists once its record is renamed into place,
//! after every disk's tracker has durably moved past the number it records; a crash before
//! that leaves only an unused number behind.

mod points;
pub mod watch;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::backup::cow::Checkpoint;
use crate::backup::{self, EngineState};
use crate::error::{Error, Result};
use crate::live::{LiveDisk, open_image};
use crate::names;
use crate::store::lock::StoreLock;
use crate::store::records::{DiskRecord, RefDisk, RefRecord, RefState};
use crate::store::{Store, now_unix, random_id};
use crate::track::Tracker;

pub struct Engine {
    store: Store,
    _lock: StoreLock,
    disks: RwLock<BTreeMap<String, Arc<LiveDisk>>>,
    /// Registered disks whose image cannot be opened, with why. They block what must cover
    /// every disk (points, backups, a changes query over all disks) but not `disk remove`, so
    /// an admin can always get out of the state.
    unavailable: RwLock<BTreeMap<String, String>>,
    /// Serialises operations that change the catalog (points, disks, backups, prunes).
    ops: Mutex<()>,
    closed: Mutex<bool>,
    /// Open checkpoints and open packs (see `backup`).
    backup: EngineState,
    /// Whether the store's filesystem is still at its path (`watch`).
    watch: watch::StoreWatch,
}

/// Changed extents of one disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskChanges {
    pub disk: String,
    pub size: u64,
    pub block_size: u32,
    /// False when the disk was registered after the point: everything is new.
    pub in_point: bool,
    pub changed_bytes: u64,
    pub extents: Vec<Extent>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

fn seq_floor(refs: &[RefRecord], disk: &str) -> u32 {
    refs.iter()
        .filter_map(|r| r.disks.get(disk).map(|d| d.seq + 1))
        .max()
        .unwrap_or(1)
}

impl Engine {
    /// Take the store lock and open every disk, recovering tracking state as needed.
    ///
    /// # Errors
    /// `Locked` when another process owns the store; I/O errors. A registered image that is
    /// gone or unusable does not fail the open: that disk is unavailable (see `disk`).
    pub fn open(mut store: Store) -> Result<Engine> {
        let lock = StoreLock::try_acquire(store.root())?;
        let owed = recover(&mut store)?;
        let backup = EngineState::new(&store)?;
        // With the lock held no writer of ours is running: a temp object is a crash's leftover.
        // An object store has no temp objects (an upload is whole or absent).
        if store.repository().is_none() {
            crate::repo::backend::LocalBackend::new(&store.repo_dir())?.sweep_temp();
        }
        if owed && let Err(e) = backup::gc::collect(&store, &backup.data) {
            log::warn!("reclaiming the space of an interrupted prune: {e}");
        }
        let refs = store.refs()?;
        let mut disks = BTreeMap::new();
        let mut unavailable = BTreeMap::new();
        for rec in store.disks()? {
            match Self::open_disk(&store, &rec, seq_floor(&refs, &rec.name)) {
                Ok(disk) => {
                    disks.insert(rec.name.clone(), Arc::new(disk));
                }
                Err(e @ Error::BadImage { .. }) => {
                    log::info!("disk {}: {e}", rec.name);
                    unavailable.insert(rec.name.clone(), e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Engine {
            watch: watch::StoreWatch::new(store.root()),
            backup,
            store,
            _lock: lock,
            disks: RwLock::new(disks),
            unavailable: RwLock::new(unavailable),
            ops: Mutex::new(()),
            closed: Mutex::new(false),
        })
    }

    fn open_disk(store: &Store, rec: &DiskRecord, floor: u32) -> Result<LiveDisk> {
        let file = open_image(&rec.image)?;
        let tracker = Tracker::open(store, &rec.name, &file, &rec.image, floor)?;
        Ok(LiveDisk::new(&rec.name, &rec.image, file, tracker))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// # Errors
    /// `NoSuchDisk`, or `DiskUnavailable` for a registered disk whose image cannot be opened.
    pub fn disk(&self, name: &str) -> Result<Arc<LiveDisk>> {
        if let Some(d) = self.disks.read().get(name) {
            return Ok(d.clone());
        }
        Err(self.unavailable_error(name))
    }

    fn unavailable_error(&self, name: &str) -> Error {
        match self.unavailable.read().get(name) {
            Some(why) => Error::DiskUnavailable {
                disk: name.to_string(),
                why: why.clone(),
            },
            None => Error::NoSuchDisk(name.to_string()),
        }
    }

    /// Registered disks whose image cannot be opened, with why.
    pub fn unavailable(&self) -> BTreeMap<String, String> {
        self.unavailable.read().clone()
    }

    /// Fail when some disk is unavailable: a point or query over every disk would be partial.
    fn require_all_disks(&self) -> Result<()> {
        match self.unavailable.read().keys().next() {
            Some(name) => Err(self.unavailable_error(name)),
            None => Ok(()),
        }
    }

    pub fn disks(&self) -> Vec<Arc<LiveDisk>> {
        self.disks.read().values().cloned().collect()
    }

    /// Serve a disk this engine just took on (`disk_add`, a promoted replica): a VM may start
    /// writing it at once, so the pages cached before go first (`LiveDisk::drop_cached_pages`).
    fn take_disk(&self, disk: LiveDisk) {
        disk.drop_cached_pages();
        self.disks
            .write()
            .insert(disk.name().to_string(), Arc::new(disk));
    }

    /// Register an image as a disk and start tracking it.
    ///
    /// # Errors
    /// A bad name, a duplicate name or image, or an image that is missing, empty or not a file.
    pub fn disk_add(&self, name: &str, image: &Path) -> Result<DiskRecord> {
        names::validate(name)?;
        let _op = self.ops.lock();
        if self.disks.read().contains_key(name) || self.unavailable.read().contains_key(name) {
            return Err(Error::DiskExists(name.to_string()));
        }
        let file = open_image(image)?;
        let image = std::fs::canonicalize(image).map_err(Error::io("resolve", image))?;
        if let Some(d) = self.disks.read().values().find(|d| d.image() == image) {
            return Err(Error::BadImage {
                path: image,
                why: format!("already registered as disk {}", d.name()),
            });
        }
        let floor = seq_floor(&self.store.refs()?, name);
        let tracker = Tracker::create(&self.store, name, &file, &image, floor)?;
        let rec = DiskRecord {
            name: name.to_string(),
            image: image.clone(),
            added_unix: now_unix(),
        };
        // The record goes in last: until it is in place the disk does not exist.
        self.store.write_disk(&rec)?;
        self.take_disk(LiveDisk::new(name, &image, file, tracker));
        Ok(rec)
    }

    /// `replica promote DISK`: register the replica image of `name` as a live disk, tracking
    /// from exactly the received point it holds, so the next backup or send since that point
    /// is incremental and `changes --since` it is exact.
    ///
    /// # Errors
    /// No replica of that disk, a replica modified since its last apply, a disk of that name
    /// already registered; I/O failures.
    pub fn replica_promote(&self, name: &str) -> Result<DiskRecord> {
        let _op = self.ops.lock();
        let data = &self.backup.data;
        crate::replicate::replica::finish_interrupted(&self.store, data)?;
        let rep = self.store.replica(name)?.ok_or_else(|| {
            Error::Replication(format!(
                "this store keeps no replica of disk {name} (`vmref receive --apply {name}=IMAGE` makes one)"
            ))
        })?;
        crate::replicate::replica::check_unmodified(&rep)?;
        if self.disks.read().contains_key(name) || self.unavailable.read().contains_key(name) {
            return Err(Error::DiskExists(name.to_string()));
        }
        let point = self.store.read_ref(&rep.point)?;
        let seq = point
            .disks
            .get(name)
            .map(|d| d.seq)
            .ok_or_else(|| Error::NoSuchDisk(format!("{name} (in point {})", point.name)))?;
        // Tracking starts just above the replica's point: a point of this disk at or above it
        // (received but not applied, or kept from a disk of that name that was live here)
        // would then be compared with numbers that never saw its changes.
        if let Some(newer) = self
            .store
            .refs()?
            .into_iter()
            .find(|r| r.id != point.id && r.disks.get(name).is_some_and(|d| d.seq >= seq))
        {
            return Err(Error::Replication(format!(
                "point {} holds disk {name} at or after the replica's point {}: apply it to the replica \
                 (receive it again with --apply) or delete it, then promote",
                newer.name, point.name
            )));
        }
        let file = open_image(&rep.image)?;
        let tracker = Tracker::create_at_point(&self.store, name, &file, &rep.image, seq)?;
        let rec = DiskRecord {
            name: name.to_string(),
            image: rep.image.clone(),
            added_unix: now_unix(),
        };
        // The disk record is the commit point; the replica record goes after it (a crash in
        // between leaves a replica record naming a live disk, which receive refuses anyway).
        self.store.write_disk(&rec)?;
        self.store.remove_replica(name)?;
        self.take_disk(LiveDisk::new(name, &rep.image, file, tracker));
        Ok(rec)
    }

    /// Stop tracking a disk. Its image is left alone; points keep its old numbers.
    pub fn disk_remove(&self, name: &str) -> Result<()> {
        let _op = self.ops.lock();
        if self.unavailable.read().contains_key(name) {
            self.store.remove_disk_record(name)?;
            self.unavailable.write().remove(name);
        } else {
            let disk = self.disk(name)?;
            // An open checkpoint still reads this disk's live bytes: removing it would let
            // writes through a re-added disk change them unsaved.
            if let Some(cp) = self
                .backup
                .checkpoints()
                .into_iter()
                .find(|c| c.disks.contains_key(name))
            {
                return Err(Error::DiskInCheckpoint {
                    disk: name.to_string(),
                    point: cp.rec.name.clone(),
                });
            }
            disk.close()?;
            disk.mark_removed();
            self.store.remove_disk_record(name)?;
            self.disks.write().remove(name);
        }
        let _ = std::fs::remove_file(self.store.map_path(name));
        let _ = std::fs::remove_file(self.store.log_path(name));
        let _ = std::fs::remove_file(self.store.digest_path(name));
        Ok(())
    }

    /// Create a reference point: quiesce every disk, flush data and tracking, record every
    /// disk's number, advance, let writes continue.
    ///
    /// # Errors
    /// A bad or duplicate name; I/O errors (then no point exists).
    pub fn ref_create(
        &self,
        name: &str,
        owner: Option<&str>,
        state: RefState,
    ) -> Result<RefRecord> {
        let _op = self.ops.lock();
        Ok(self.create_locked(name, owner, state, true)?.0)
    }

    /// `ref_create` with the catalog lock already held. A `Checkpoint` starts copy-on-write
    /// while writers are still quiesced, and is returned. With `persist` false the record is
    /// not written (a backup writes it once its data is in place: that rename is its commit
    /// point).
    fn create_locked(
        &self,
        name: &str,
        owner: Option<&str>,
        state: RefState,
        persist: bool,
    ) -> Result<(RefRecord, Option<Arc<Checkpoint>>)> {
        names::validate(name)?;
        if let Some(o) = owner {
            validate_owner(o)?;
        }
        self.require_all_disks()?;
        if self.store.ref_exists(name) || self.backup.checkpoint(name).is_some() {
            return Err(Error::RefExists(name.to_string()));
        }
        let serial = self.store.next_serial()?;
        let disks = self.disks();
        let guards: Vec<_> = disks.iter().map(|d| d.quiesce()).collect();
        let mut points = BTreeMap::new();
        let mut ids = Vec::with_capacity(disks.len());
        for d in &disks {
            let id = d.identity()?;
            let seq = d.tracker().bump(id)?;
            ids.push(id);
            points.insert(
                d.name().to_string(),
                RefDisk {
                    seq,
                    size: d.size(),
                    map: None,
                },
            );
        }
        let rec = RefRecord {
            name: name.to_string(),
            id: random_id()?,
            serial,
            created_unix: point_created_unix(),
            owner: owner.map(str::to_string),
            state,
            disks: points,
            backup: None,
            origin: None,
        };
        let staged = durable_point(&self.store, &disks, &ids, persist.then_some(&rec))?;
        let cp = match state {
            RefState::Checkpoint => {
                Some(self.backup.begin_checkpoint(&self.store, &rec, &disks)?)
            }
            _ => None,
        };
        if let Some(tmp) = staged
            && let Err(e) = tmp.commit()
        {
            self.backup.end_checkpoint(name);
            return Err(e);
        }
        drop(guards);
        Ok((rec, cp))
    }

    /// Delete a metadata-only point. (`control` deletes through `backup::manage::delete`, which
    /// also drops checkpoint state and backup data.)
    pub fn ref_delete(&self, name: &str) -> Result<RefRecord> {
        let _op = self.ops.lock();
        let rec = self.store.read_ref(name)?;
        self.store.remove_ref_record(name)?;
        Ok(rec)
    }

    /// Changed byte extents since point `since`, for one disk or all.
    ///
    /// # Errors
    /// `NoSuchRef`, `NoSuchDisk`, or `TrackingLost` when tracking restarted after the point.
    pub fn changes(&self, since: &str, disk: Option<&str>) -> Result<Vec<DiskChanges>> {
        let point = self.store.read_ref(since)?;
        let disks = match disk {
            Some(n) => vec![self.disk(n)?],
            None => {
                self.require_all_disks()?;
                self.disks()
            }
        };
        let mut out = Vec::new();
        for d in disks {
            let t = d.tracker();
            let bs = t.block_size() as u64;
            let size = t.disk_size();
            let (in_point, runs) = match point.disks.get(d.name()) {
                Some(p) => (true, t.changed_since(since, p.seq)?),
                None => (
                    false,
                    vec![crate::track::seqmap::BlockRun {
                        start: 0,
                        count: t.map().nblocks(),
                    }],
                ),
            };
            let extents: Vec<Extent> = runs
                .iter()
                .map(|r| {
                    let offset = r.start * bs;
                    Extent {
                        offset,
                        length: (r.count * bs).min(size - offset),
                    }
                })
                .collect();
            out.push(DiskChanges {
                disk: d.name().to_string(),
                size,
                block_size: t.block_size(),
                in_point,
                changed_bytes: extents.iter().map(|e| e.length).sum(),
                extents,
            });
        }
        Ok(out)
    }

    /// Flush every disk's tracking state that has unflushed marks, and settle every disk
    /// idle long enough (`LiveDisk::settle_if_idle`). The daemon calls it periodically.
    pub fn flush_dirty(&self) -> Result<()> {
        for d in self.disks() {
            if d.tracker().dirty_regions() > 0 {
                d.flush()?;
            }
            d.settle_if_idle()?;
        }
        Ok(())
    }

    /// Clean stop: every disk flushed and marked closed. Idempotent.
    pub fn close(&self) -> Result<()> {
        let mut closed = self.closed.lock();
        if *closed {
            return Ok(());
        }
        // Checkpoints live only as long as the engine: record them as plain points.
        backup::manage::demote_all(self)?;
        for d in self.disks() {
            d.close()?;
        }
        *closed = true;
        Ok(())
    }
}

impl Engine {
    /// Simulate a crash for tests: release the lock and every file without flushing or
    /// closing, as kill -9 would (unflushed stamps are lost, the dirty-region log stays).
    #[doc(hidden)]
    pub fn crash(self) {
        *self.closed.lock() = true;
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("closing the store: {e}");
        }
    }
}

/// Bring a store whose owner died back to a consistent state, with its lock held: the one
/// place recovery runs from at open. Stale temporary files go, then `backup` finishes or
/// undoes what a crashed backup, prune or delete left and demotes checkpoints (their
/// copy-on-write data died with the process), and a store in an older format is upgraded
/// (`upgrade`). Tracking state recovers per disk as each tracker opens. Returns true when a
/// garbage collection is owed.
fn recover(store: &mut Store) -> Result<bool> {
    store.sweep();
    let owed = backup::manage::recover(store)?;
    crate::upgrade::upgrade(store, &crate::backup::NoProgress)?;
    Ok(owed)
}

/// Owners are matched exactly by `ref list --owner` and printed in listings, so they keep to
/// the name alphabet: nothing that needs quoting.
/// When a new point is created: now, or for tests `VMREF_TEST_NOW` (Unix seconds), read by
/// whichever process creates the point (the daemon when the store is mounted). It lets the
/// retention tests (tests/retention.rs) place points made by real backups in chosen hours,
/// days and years; only the recorded creation time changes, nothing else reads the variable.
fn point_created_unix() -> u64 {
    std::env::var("VMREF_TEST_NOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(now_unix)
}

fn validate_owner(owner: &str) -> Result<()> {
    names::validate(owner).map_err(|e| match e {
        Error::BadName { name, why } => Error::BadName {
            name: format!("owner {name}"),
            why,
        },
        e => e,
    })
}

/// The syncs a new point needs, run side by side: each image's data (what the point holds),
/// each tracker's flush (the numbers after the point, so no later write is stamped with the
/// point's own), and the point's record under a temp name. None depends on another; only the
/// record's name must wait for all of them, which the caller publishes with `commit` on the
/// returned temp file. Four ordered syncs of one point became two on the critical path (the
/// slowest of these, then the directory's). Writers are quiesced by the caller.
fn durable_point(
    store: &Store,
    disks: &[Arc<LiveDisk>],
    ids: &[crate::track::mapfile::Identity],
    record: Option<&RefRecord>,
) -> Result<Option<crate::store::atomic::TempFile>> {
    std::thread::scope(|s| {
        let images: Vec<_> = disks.iter().map(|d| s.spawn(|| d.sync_all())).collect();
        let staged = record.map(|r| s.spawn(|| store.stage_ref(r)));
        // The trackers' flushes are the longest chain (map, digests, log): on this thread,
        // they start without waiting for a thread to be scheduled.
        let flushed: Result<()> = disks
            .iter()
            .zip(ids)
            .try_for_each(|(d, &id)| d.tracker().flush(id));
        for h in images {
            h.join().expect("a point's image sync panicked")?;
        }
        let staged = staged
            .map(|h| h.join().expect("a point's record write panicked"))
            .transpose()?;
        flushed?;
        Ok(staged)
    })
}
