//! Backups: checkpoints with copy-on-write, full and incremental copies into the store, the
//! synthesized image of every restorable point, restore, verify, prune and garbage collection.
//!
//! ```text
//! STORE/data/packs/ID.pack          stored blocks, immutable (see `pack`)
//! STORE/data/index/REFID.DISK.idx   one complete block index per point and disk (see `index`)
//! STORE/data/cow/                   open checkpoints' saved blocks, unlinked at creation
//! STORE/data/gc.pending             set while an operation may leave unreferenced files
//! STORE/data/prune.journal          the points a prune deletes, between its commit and its end
//! ```
//!
//! Invariants kept here:
//! - Exactness (1) and chain-independent reads (6): every restorable point has a complete
//!   index of its own, built for an incremental by copying the previous point's index and
//!   overriding the blocks changed since; a read is one lookup and one pread at any depth.
//! - Nothing lost (4): packs and indexes are written beside their final names and renamed in;
//!   the point's record rename is the commit point of a backup and its removal the commit point
//!   of a delete; a prune commits by renaming its journal in and is rolled forward at open.
//!   Files nothing references any more are removed afterwards, idempotently, and again at
//!   engine open while `gc.pending` says a collection may be owed.
//! - Never wrong bytes (5): every stored block carries its CRC-32C in the index; a mismatch is
//!   `Error::Format` (EIO at the mount), and `verify` names the block.
//!
//! Checkpoints keep their copy-on-write data in memory and an unlinked file only while the
//! engine runs: a checkpoint does not survive a restart of the daemon (or the end of the
//! command that opened the store). At engine open and close every record still in the
//! checkpoint state is demoted to a plain point.

pub mod cow;
pub mod gc;
pub mod image;
pub mod index;
pub mod manage;
pub mod pack;
pub mod progress;
pub mod restore;
pub mod run;
pub mod verify;

use std::collections::BTreeMap;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::live::LiveDisk;
use crate::store::records::{RefRecord, RefState};
use crate::store::{Store, atomic};
use cow::{Checkpoint, CowSaver};
use index::BlockIndex;
use pack::PackCache;

pub use progress::{NoProgress, Progress};

pub fn packs_dir(store: &Store) -> PathBuf {
    store.data_dir().join("packs")
}
pub fn index_dir(store: &Store) -> PathBuf {
    store.data_dir().join("index")
}
pub fn cow_dir(store: &Store) -> PathBuf {
    store.data_dir().join("cow")
}
pub fn index_path(store: &Store, ref_id: &str, disk: &str) -> PathBuf {
    index_dir(store).join(format!("{ref_id}.{disk}.idx"))
}

/// Create the data directories (0700) if missing.
///
/// # Errors
/// I/O failures.
pub fn ensure_dirs(store: &Store) -> Result<()> {
    for d in [packs_dir(store), index_dir(store), cow_dir(store)] {
        if !d.is_dir() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(Error::io("create directory", &d))?;
        }
    }
    Ok(())
}

/// Load and check the index of `disk` in restorable point `rec`.
///
/// # Errors
/// `NotRestorable`, `NoSuchDisk`, or `Format` for a missing or damaged index.
pub fn load_index(store: &Store, rec: &RefRecord, disk: &str) -> Result<BlockIndex> {
    if rec.state != RefState::Restorable {
        return Err(Error::NotRestorable(rec.name.clone()));
    }
    let d = rec
        .disks
        .get(disk)
        .ok_or_else(|| Error::NoSuchDisk(format!("{disk} (in point {})", rec.name)))?;
    let path = index_path(store, &rec.id, disk);
    let fmt = |source| Error::Format {
        path: path.clone(),
        source,
    };
    let bytes = std::fs::read(&path).map_err(|e| {
        fmt(crate::format::FormatError::Invalid {
            what: "block index",
            why: format!("cannot read: {e}"),
        })
    })?;
    let ix = BlockIndex::decode(&bytes).map_err(fmt)?;
    if ix.block_size != store.block_size() || ix.disk_size != d.size {
        return Err(fmt(crate::format::FormatError::Invalid {
            what: "block index",
            why: format!(
                "describes {} bytes in blocks of {}, the point {} bytes in blocks of {}",
                ix.disk_size,
                ix.block_size,
                d.size,
                store.block_size()
            ),
        }));
    }
    Ok(ix)
}

/// Write an index beside its final name and rename it in.
///
/// # Errors
/// I/O failures; the index then does not exist.
pub fn write_index(store: &Store, ref_id: &str, disk: &str, ix: &BlockIndex) -> Result<()> {
    atomic::write_atomic(&index_path(store, ref_id, disk), &ix.encode())
}

/// What an engine keeps for backups while it runs: open checkpoints and open packs.
pub struct EngineState {
    /// Open checkpoints by point name. Coarse: touched only when a checkpoint opens or
    /// closes and when the mount lists or opens points.
    checkpoints: Mutex<BTreeMap<String, Arc<Checkpoint>>>,
    pub packs: Arc<PackCache>,
}

impl EngineState {
    pub fn new(store: &Store) -> EngineState {
        EngineState {
            checkpoints: Mutex::new(BTreeMap::new()),
            packs: Arc::new(PackCache::new(packs_dir(store), store.block_size())),
        }
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
    fn checkpoint_locked(&self, name: &str) -> Result<Arc<Checkpoint>>;
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
    fn checkpoint_locked(&self, name: &str) -> Result<Arc<Checkpoint>> {
        (**self).checkpoint_locked(name)
    }
}
