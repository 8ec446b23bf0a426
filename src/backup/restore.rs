//! `restore REF --disk NAME --to PATH`: write a point's image of one disk as a sparse raw file
//! (holes where the point has holes), beside the target and renamed into place, so the
//! target is never seen half-written. Read-only on the store: needs no store lock.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::ImageSource;
use crate::store::Store;
use crate::store::atomic::TempFile;

use super::image::PointImage;
use super::pack::PackCache;
use super::progress::Progress;

/// Bytes read and written per step.
const CHUNK: usize = 4 << 20;

/// What a restore wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreReport {
    pub point: String,
    pub disk: String,
    pub size: u64,
    pub data_bytes: u64,
}

/// Restore `disk` of point `point` to `to`.
///
/// # Errors
/// `Exists` when `to` exists and `force` is not set; `NotRestorable`, `NoSuchDisk`; `Format`
/// for damaged backup data (then `to` is untouched).
pub fn restore(
    store: &Store,
    point: &str,
    disk: &str,
    to: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let rec = store.read_ref(point)?;
    if to.is_dir() {
        return Err(Error::BadImage {
            path: to.to_path_buf(),
            why: "is a directory".into(),
        });
    }
    if !force && std::fs::symlink_metadata(to).is_ok() {
        return Err(Error::Exists(to.to_path_buf()));
    }
    let packs = Arc::new(PackCache::new(super::packs_dir(store), store.block_size()));
    let img = PointImage::open(store, packs, &rec, disk)?;
    let size = img.size();
    let tmp = TempFile::new(to)?;
    tmp.file()
        .set_len(size)
        .map_err(Error::io("resize", tmp.path()))?;
    progress.start("restore", img.allocated_bytes());
    let mut buf = vec![0u8; CHUNK];
    let mut data_bytes = 0;
    let mut pos = 0;
    while let Some(d) = img.next_data(pos)? {
        let h = img.next_hole(d)?;
        let mut off = d;
        while off < h {
            let n = ((h - off) as usize).min(CHUNK);
            img.read_at(&mut buf[..n], off)?;
            std::os::unix::fs::FileExt::write_all_at(tmp.file(), &buf[..n], off)
                .map_err(Error::io("write", tmp.path()))?;
            off += n as u64;
            data_bytes += n as u64;
            progress.inc(n as u64);
        }
        pos = h;
        if pos >= size {
            break;
        }
    }
    tmp.commit()?;
    progress.finish();
    Ok(RestoreReport {
        point: rec.name,
        disk: disk.to_string(),
        size,
        data_bytes,
    })
}
