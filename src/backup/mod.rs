//! Backups: checkpoints with copy-on-write, full and incremental copies into the store's
//! repository, the synthesized image of every restorable point, restore, verify, prune and
//! garbage collection.
//!
//! ```text
//! STORE/repo/                 the repository: content-addressed blocks and point maps (`repo`)
//! STORE/data/cow/             open checkpoints' saved blocks, unlinked at creation
//! STORE/data/prune.journal    the points a prune deletes, between its commit and its end
//! STORE/data/last-backup      the outcome of the last backup attempt, for monitors
//! ```
//!
//! Invariants kept here (numbers as in docs/design.md):
//! - Exactness (1) and chain-independent reads (6): every restorable point has a map of its
//!   own per disk, sharing unchanged subtrees with the point it was made from; a read is a
//!   lookup of at most a few map nodes (cached) and one blob read at any depth.
//! - Nothing lost (4): a backup's blocks and map nodes are made durable in the repository
//!   before the point's record is renamed in (its commit point); a delete's commit point is
//!   the record's removal, a prune's the rename of its journal (rolled forward at open).
//!   Blocks no point needs any more are collected afterwards by mark and sweep (`gc`), which
//!   is idempotent: a crash anywhere leaves at worst garbage for the next collection.
//! - Never wrong bytes (5): every stored block and map node is named by the BLAKE3 hash of
//!   its bytes, checked on every read; a mismatch is `Error::Format` (EIO at the mount), and
//!   `verify` names the point, disk and block.
//! - A point costs what changed (7): an incremental stores the changed blocks not already in
//!   the repository, plus the map nodes on their paths.
//!
//! Checkpoints keep their copy-on-write data in memory and an unlinked file only while the
//! engine runs: a checkpoint does not survive a restart of the daemon (or the end of the
//! command that opened the store). At engine open and close every record still in the
//! checkpoint state is demoted to a plain point.

pub mod blocks;
pub mod cow;
pub mod data;
pub mod gc;
pub mod heal;
pub mod image;
pub mod manage;
pub mod outcome;
pub mod progress;
pub mod published;
pub mod restore;
pub mod retention;
pub mod run;
pub mod shared;
pub mod verify;

use std::collections::BTreeMap;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::live::LiveDisk;
use crate::store::Store;
use crate::store::records::RefRecord;
use cow::{Checkpoint, CowSaver};
pub use data::Data;

pub use progress::{NoProgress, Progress};

pub fn cow_dir(store: &Store) -> PathBuf {
    store.data_dir().join("cow")
}

/// Create the host-local data directories (0700) if missing.
///
/// # Errors
/// I/O failures.
pub fn ensure_dirs(store: &Store) -> Result<()> {
    let d = cow_dir(store);
    if !d.is_dir() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .map_err(Error::io("create directory", &d))?;
    }
    Ok(())
}

/// What an engine keeps for backups while it runs: open checkpoints and the repository.
pub struct EngineState {
    /// Open checkpoints by point name. Coarse: touched only when a checkpoint opens or
    /// closes and when the mount lists or opens points.
    checkpoints: Mutex<BTreeMap<String, Arc<Checkpoint>>>,
    pub data: Arc<Data>,
}

impl EngineState {
    /// # Errors
    /// As `Data::open`.
    pub fn new(store: &Store) -> Result<EngineState> {
        Ok(EngineState {
            checkpoints: Mutex::new(BTreeMap::new()),
            data: Arc::new(Data::open(store)?),
        })
    }

    /// Start copy-on-write for point `rec` on `disks`. The caller holds every disk quiesced,
    /// so no write lands between the point's numbers and the start of copy-on-write.
    ///
    /// # Errors
    /// Failure to create a save file; then nothing was registered.
    pub fn begin_checkpoint(
        &self,
        store: &Store,
        rec: &RefRecord,
        disks: &[Arc<LiveDisk>],
    ) -> Result<Arc<Checkpoint>> {
        ensure_dirs(store)?;
        let mut savers = BTreeMap::new();
        for d in disks.iter().filter(|d| rec.disks.contains_key(d.name())) {
            let s = Arc::new(CowSaver::create(
                &cow_dir(store),
                rec,
                d.name(),
                d.size(),
                d.block_size(),
            )?);
            savers.insert(d.name().to_string(), (d.clone(), s));
        }
        for (d, s) in savers.values() {
            d.cow().add(s.clone());
        }
        let cp = Arc::new(Checkpoint {
            rec: rec.clone(),
            disks: savers,
        });
        self.checkpoints.lock().insert(rec.name.clone(), cp.clone());
        Ok(cp)
    }

    /// Stop copy-on-write for a checkpoint and drop its saved data.
    pub fn end_checkpoint(&self, name: &str) -> Option<Arc<Checkpoint>> {
        let cp = self.checkpoints.lock().remove(name)?;
        for (d, s) in cp.disks.values() {
            d.cow().remove(s.as_ref());
        }
        Some(cp)
    }

    pub fn checkpoint(&self, name: &str) -> Option<Arc<Checkpoint>> {
        self.checkpoints.lock().get(name).cloned()
    }

    pub fn checkpoints(&self) -> Vec<Arc<Checkpoint>> {
        self.checkpoints.lock().values().cloned().collect()
    }
}

/// True when every byte is zero (a block a backup stores as a hole). Compares 16 bytes at a
/// time: this runs over every byte a full backup reads.
pub fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(16);
    let tail = words.remainder();
    words
        .into_iter()
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && tail.iter().all(|&x| x == 0)
}

/// What the backup operations need from the store's owner (the engine implements it): the
/// store, the catalog lock, the open checkpoints, and a new point opened as a checkpoint. A
/// trait so that `backup` sits below `engine` and never names it.
pub trait Owner: Send + Sync {
    fn store(&self) -> &Store;
    fn backup_state(&self) -> &EngineState;
    /// Serialises operations that change the catalog (points, disks, backups, prunes);
    /// held across each multi-step operation here.
    fn lock_ops(&self) -> MutexGuard<'_, ()>;
    /// With the catalog lock held: create point `name` as an open checkpoint, without writing
    /// its record (a backup writes it once its data is in place: its commit point).
    ///
    /// # Errors
    /// A bad or existing name, an unavailable disk, I/O failures (then no point exists).
    fn checkpoint_locked(&self, name: &str, owner: Option<&str>) -> Result<Arc<Checkpoint>>;
}

/// A shared owner (`Arc<Engine>`, as the daemon holds it) is an owner.
impl<T: Owner + ?Sized> Owner for Arc<T> {
    fn store(&self) -> &Store {
        (**self).store()
    }
    fn backup_state(&self) -> &EngineState {
        (**self).backup_state()
    }
    fn lock_ops(&self) -> MutexGuard<'_, ()> {
        (**self).lock_ops()
    }
    fn checkpoint_locked(&self, name: &str, owner: Option<&str>) -> Result<Arc<Checkpoint>> {
        (**self).checkpoint_locked(name, owner)
    }
}
