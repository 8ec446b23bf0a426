//! The point directories the daemon serves. Until the backup engine lands there are no
//! restorable points or open checkpoints, so the mount lists none; `for_engine` is the one
//! constructor to replace when it does.

use std::sync::Arc;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::image::{ImageSource, PointSource};

/// Metadata-only points have no bytes to show, and this build has no other kind.
#[derive(Debug, Default)]
pub struct NoPoints;

impl PointSource for NoPoints {
    fn points(&self) -> Result<Vec<(String, Vec<(String, u64)>)>> {
        Ok(Vec::new())
    }
    fn open(&self, point: &str, _disk: &str) -> Result<Arc<dyn ImageSource>> {
        Err(Error::NoSuchRef(point.to_string()))
    }
}

/// The `PointSource` a daemon on `engine` mounts.
pub fn for_engine(_engine: &Arc<Engine>) -> Arc<dyn PointSource> {
    Arc::new(NoPoints)
}
