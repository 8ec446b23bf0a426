//! `restore REF --disk NAME --to PATH`: write a point's image of one disk as a sparse raw file
//! (holes where the point has holes), beside the target and renamed into place, so the
//! target is never seen half-written. Read-only on the store: needs no store lock.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::ImageSource;
use crate::store::Store;
use crate::store::atomic::TempFile;

use crate::repo::Hash;
use crate::repo::index::IndexEntry;
use crate::repo::map::MapRoot;

use super::data::{Data, map_of};
use super::image::PointImage;
use super::progress::Progress;

/// What a restore wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreReport {
    pub point: String,
    pub disk: String,
    pub size: u64,
    pub data_bytes: u64,
}

/// Bytes one worker decodes and writes per step: large aligned writes, and a pack read per run
/// of blocks a backup stored together.
const CHUNK: usize = 4 << 20;

/// Decoders: one per core, at most 8.
fn decoders() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
}

/// A run of consecutive data blocks: the first block's number and every block's hash.
type Run = (u64, Vec<Hash>);
/// A run, with where its blocks are stored (located once, for the hint and the read).
type Job = (u64, Vec<Hash>, Vec<Option<IndexEntry>>);

/// Copy the point's data blocks into `out` (already sized; holes stay holes, never written).
///
/// The map is walked once, in block order, cutting the data into runs of consecutive blocks of
/// up to `CHUNK` bytes. Decoders (one per core) decode a run straight into a buffer (pack
/// reads coalesced, every block checked against its hash: `Repository::read_data_into`); one
/// writer writes each buffer at its offset with one `pwrite` and hands it back. One writer,
/// because writes to one file serialise on its inode lock anyway: several writers only spun
/// on it (perf), taking cores from the decoders. The caller makes the file durable once, at
/// the end. As a run is queued its pack ranges are hinted to the backend, so a cold restore
/// has the next runs' reads in flight while the current ones decode. Blocks bypass the
/// mount's block cache: a restore reads each once.
fn copy_data(
    data: &Data,
    map: &MapRoot,
    size: u64,
    bs: u64,
    out: &std::fs::File,
    out_path: &Path,
    progress: &dyn Progress,
) -> Result<u64> {
    use std::sync::mpsc;
    let per_chunk = (CHUNK as u64 / bs).max(1) as usize;
    let failed = &AtomicBool::new(false);
    let n = decoders();
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(n);
    let job_rx = Mutex::new(job_rx);
    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(n);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    let free_rx = Mutex::new(free_rx);
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<u64> {
            let mut total = 0;
            for (off, buf) in full_rx {
                // The last block is stored zero-padded: write only the disk's bytes.
                let len = (buf.len() as u64).min(size - off) as usize;
                if let Err(e) = std::os::unix::fs::FileExt::write_all_at(out, &buf[..len], off) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(Error::io("write", out_path)(e));
                }
                total += len as u64;
                progress.inc(len as u64);
                let _ = free_tx.send(buf);
            }
            Ok(total)
        });
        let workers: Vec<_> = (0..n)
            .map(|_| {
                let full_tx = full_tx.clone();
                let (job_rx, free_rx) = (&job_rx, &free_rx);
                s.spawn(move || -> Result<()> {
                    loop {
                        let Ok((first, hashes, found)) = job_rx.lock().recv() else {
                            return Ok(());
                        };
                        let mut buf = free_rx.lock().try_recv().unwrap_or_default();
                        buf.resize(hashes.len() * bs as usize, 0);
                        let mut blobs: Vec<(Hash, &mut [u8])> = hashes
                            .iter()
                            .copied()
                            .zip(buf.chunks_mut(bs as usize))
                            .collect();
                        if let Err(e) = data.repo.read_located_into(found, &mut blobs) {
                            failed.store(true, Ordering::Relaxed);
                            // Keep taking jobs until the planner sees `failed` and stops:
                            // the job channel outlives the workers, and a planner blocked
                            // on a full channel with no one taking would hang the restore.
                            while job_rx.lock().recv().is_ok() {}
                            return Err(e);
                        }
                        if full_tx.send((first * bs, buf)).is_err() {
                            return Ok(()); // the writer failed: its error is reported below
                        }
                    }
                })
            })
            .collect();
        drop(full_tx);
        let plan = (|| -> Result<()> {
            let mut job: Option<Run> = None;
            let send = |(first, hashes): Run| -> Result<bool> {
                let found = data.repo.locate_data(&hashes)?;
                data.repo.prefetch_located(&found);
                Ok(job_tx.send((first, hashes, found)).is_ok() && !failed.load(Ordering::Relaxed))
            };
            for r in data.maps.data_runs(map, 0..map.nblocks) {
                let (b, h) = r?;
                match &mut job {
                    Some((first, hs)) if *first + hs.len() as u64 == b && hs.len() < per_chunk => {
                        hs.push(h);
                    }
                    _ => {
                        if let Some(j) = job.replace((b, vec![h]))
                            && !send(j)?
                        {
                            return Ok(()); // a worker failed: its error is reported below
                        }
                    }
                }
            }
            if let Some(j) = job {
                send(j)?;
            }
            Ok(())
        })();
        drop(job_tx);
        let decoded: Vec<Result<()>> = workers
            .into_iter()
            .map(|h| h.join().expect("restore decoder panicked"))
            .collect();
        let written = writer.join().expect("restore writer panicked");
        plan?;
        decoded.into_iter().collect::<Result<()>>()?;
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
    let (map, _) = map_of(store, &rec, disk)?;
    let bs = store.block_size() as u64;
    let data_bytes = copy_data(data, &map, size, bs, tmp.file(), tmp.path(), progress)?;
    tmp.commit()?;
    progress.finish();
    Ok(RestoreReport {
        point: rec.name,
        disk: disk.to_string(),
        size,
        data_bytes,
    })
}
