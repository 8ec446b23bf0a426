//! The engine as seen by the backup operations (`backup::Owner`) and by the mount
//! (`PointSource`): both need the store, the open checkpoints and the catalog lock, which only
//! the engine has, so the impls live here and `backup` never names the engine.

use std::sync::Arc;

use parking_lot::MutexGuard;

use crate::backup::cow::Checkpoint;
use crate::backup::image::PointImage;
use crate::backup::{EngineState, Owner};
use crate::error::{Error, Result};
use crate::image::{ImageSource, PointEntry, PointList, PointSource};
use crate::store::Store;
use crate::store::records::{RefRecord, RefState};

use super::Engine;

impl Owner for Engine {
    fn store(&self) -> &Store {
        &self.store
    }

    fn backup_state(&self) -> &EngineState {
        &self.backup
    }

    fn lock_ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock()
    }

    fn checkpoint_locked(&self, name: &str, owner: Option<&str>) -> Result<Arc<Checkpoint>> {
        let (_, cp) = self.create_locked(name, owner, RefState::Checkpoint, false)?;
        Ok(cp.expect("a point created as a checkpoint opens one"))
    }
}

/// The mount lists restorable points and open checkpoints, oldest first, and opens their
/// disks. Checkpoints opened by a backup appear while that backup runs.
impl PointSource for Engine {
    fn points(&self) -> Result<PointList> {
        let entry = |r: &RefRecord| PointEntry {
            name: r.name.clone(),
            id: r.id.clone(),
            disks: r.disks.iter().map(|(d, p)| (d.clone(), p.size)).collect(),
        };
        let mut v: Vec<(u64, PointEntry)> = Vec::new();
        let cps = self.backup.checkpoints();
        for r in self.store().refs()? {
            if r.state == RefState::Restorable && !cps.iter().any(|c| c.rec.name == r.name) {
                v.push((r.serial, entry(&r)));
            }
        }
        for c in cps {
            v.push((c.rec.serial, entry(&c.rec)));
        }
        v.sort_by_key(|p| p.0);
        Ok(v.into_iter().map(|(_, e)| e).collect())
    }

    fn open(&self, point: &str, id: &str, disk: &str) -> Result<Arc<dyn ImageSource>> {
        // A backup commits its point before it closes its checkpoint: while both exist, the
        // checkpoint's image is served, and it reports itself stale once closed.
        if let Some(cp) = self.backup.checkpoint(point).filter(|c| c.rec.id == id) {
            return Ok(Arc::new(cp.image(disk)?));
        }
        let rec = self.store().read_ref(point)?;
        if rec.state != RefState::Restorable || rec.id != id {
            return Err(Error::NoSuchRef(point.to_string()));
        }
        Ok(Arc::new(PointImage::open(
            self.store(),
            self.backup.data.clone(),
            &rec,
            disk,
        )?))
    }
}
