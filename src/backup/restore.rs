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

use super::data::Data;
use super::image::PointImage;
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

/// Copy the image's data extents into `out` (already sized; holes stay holes). Reading and
/// checking (one thread) overlaps with writing (another): each alone is about as slow as the
/// other here, so the pipeline nearly halves the time.
fn copy_data(
    img: &PointImage,
    out: &std::fs::File,
    out_path: &Path,
    progress: &dyn Progress,
) -> Result<u64> {
    use std::sync::mpsc;
    let size = img.size();
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(2);
        let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
        let writer = s.spawn(move || -> Result<u64> {
            let mut total = 0;
            for (off, buf) in rx {
                std::os::unix::fs::FileExt::write_all_at(out, &buf, off)
                    .map_err(Error::io("write", out_path))?;
                total += buf.len() as u64;
                progress.inc(buf.len() as u64);
                let _ = back_tx.send(buf);
            }
            Ok(total)
        });
        let read = (|| -> Result<()> {
            let mut pos = 0;
            while let Some(d) = img.next_data(pos)? {
                let h = img.next_hole(d)?;
                let mut off = d;
                while off < h {
                    let n = ((h - off) as usize).min(CHUNK);
                    let mut buf = back_rx.try_recv().unwrap_or_default();
                    buf.resize(n, 0);
                    img.read_at(&mut buf, off)?;
                    if tx.send((off, buf)).is_err() {
                        return Ok(()); // the writer failed: its error is reported below
                    }
                    off += n as u64;
                }
                pos = h;
                if pos >= size {
                    break;
                }
            }
            Ok(())
        })();
        drop(tx);
        let written = writer.join().expect("restore writer thread panicked");
        read?;
        written
    })
}

/// Restore `disk` of point `point` to `to`.
///
/// # Errors
/// `Exists` when `to` exists and `force` is not set; `NotRestorable`, `NoSuchDisk`; `Format`
/// for damaged backup data (then `to` is untouched).
pub fn restore(
    store: &Store,
    data: &Arc<Data>,
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
    // Renaming a restore over a live image would swap bytes under the tracker (and under a
    // running VM): restore beside it, and replace it with the VM stopped, then re-add it.
    if let Ok(target) = std::fs::canonicalize(to) {
        for d in store.disks()? {
            if std::fs::canonicalize(&d.image).is_ok_and(|img| img == target) {
                return Err(Error::RestoreOverLive {
                    path: to.to_path_buf(),
                    disk: d.name,
                });
            }
        }
    }
    let img = PointImage::open(store, data.clone(), &rec, disk)?;
    let size = img.size();
    let tmp = TempFile::new(to)?;
    tmp.file()
        .set_len(size)
        .map_err(Error::io("resize", tmp.path()))?;
    progress.start("restore", img.allocated_bytes());
    let data_bytes = copy_data(&img, tmp.file(), tmp.path(), progress)?;
    tmp.commit()?;
    progress.finish();
    Ok(RestoreReport {
        point: rec.name,
        disk: disk.to_string(),
        size,
        data_bytes,
    })
}
