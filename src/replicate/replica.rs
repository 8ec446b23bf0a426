//! Replica images: a raw image of one disk kept at the newest received point, ready to boot
//! (`receive --apply DISK=IMAGE`), and what `replica promote` checks before the image becomes
//! a live disk.
//!
//! An apply is crash-safe by redo, with the data already safe in the store: the replica record
//! first says "applying P_new" (durably, just before P_new's commit), the point is committed,
//! then the blocks that differ between the two points' maps are written in
//! place, the image is synced, and the record says "at P_new". A crash in between leaves a
//! record that names both points; the next `receive` or `receive --abort` writes the same
//! blocks again (idempotent: every block in the difference gets P_new's bytes, every other
//! block is equal in both), so the image ends exactly at P_new. A point a replica needs can
//! not be deleted or pruned meanwhile (`Store::replica_points`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backup::Data;
use crate::backup::NoProgress;
use crate::backup::data::map_of;
use crate::error::{Error, Result};
use crate::store::Store;
use crate::store::records::RefRecord;
use crate::store::replication::{Applying, FileStamp, ReplicaRecord};

/// What an apply did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyReport {
    pub disk: String,
    pub image: PathBuf,
    pub point: String,
    /// Blocks written (or punched to holes) in place; the whole image for a first apply.
    pub blocks: u64,
    /// A new image was written (first apply or resize) instead of blocks in place.
    pub whole: bool,
}

/// A checked `--apply` target.
pub struct Target {
    pub disk: String,
    pub image: PathBuf,
    pub existing: Option<ReplicaRecord>,
}

fn refuse(why: impl Into<String>) -> Error {
    Error::Replication(why.into())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).map_err(Error::io("resolve", p))?;
    Ok(match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    })
}

/// Check `--apply` targets before anything is received: a disk with a replica elsewhere, an
/// image modified since its last apply, or a new replica over an existing file is refused.
///
/// # Errors
/// `Replication` naming the reason.
pub fn check_targets(store: &Store, apply: &[(String, PathBuf)]) -> Result<Vec<Target>> {
    let mut out: Vec<Target> = Vec::new();
    for (disk, image) in apply {
        crate::names::validate(disk)?;
        if out.iter().any(|t| &t.disk == disk) {
            return Err(Error::BadArgument(format!(
                "--apply names disk {disk} twice"
            )));
        }
        let image = absolute(image)?;
        let existing = store.replica(disk)?;
        match &existing {
            Some(r) if r.image != image => {
                return Err(refuse(format!(
                    "disk {disk}'s replica is {}, not {}: apply to it, or remove it with `vmref replica forget {disk}` first",
                    r.image.display(),
                    image.display()
                )));
            }
            Some(r) => check_unmodified(r)?,
            None if std::fs::symlink_metadata(&image).is_ok() => {
                return Err(refuse(format!(
                    "{} exists and is not a replica of disk {disk}: a new replica is made only where no file is",
                    image.display()
                )));
            }
            None => {}
        }
        out.push(Target {
            disk: disk.clone(),
            image,
            existing,
        });
    }
    Ok(out)
}

/// Refuse a replica image touched since vmref last wrote it: applying on top of foreign
/// writes would leave an image that is no point at all.
///
/// # Errors
/// `Replication` naming the image and its point.
pub fn check_unmodified(r: &ReplicaRecord) -> Result<()> {
    let now = FileStamp::of(&r.image).map_err(|e| {
        refuse(format!(
            "the replica image {} of disk {} cannot be used: {e}",
            r.image.display(),
            r.disk
        ))
    })?;
    if now != r.stamp {
        return Err(refuse(format!(
            "the replica image {} of disk {} was modified since point {} was applied to it; \
             remove it (`vmref replica forget {}`) and receive a full stream",
            r.image.display(),
            r.disk,
            r.point,
            r.disk
        )));
    }
    Ok(())
}

/// Record, before point `to` is committed, that `t`'s image is to be brought to it: after a
/// crash, the apply is finished if the point was committed, and dropped if it was not (the
/// image is written only after the commit).
///
/// # Errors
/// I/O failures.
pub fn intend(store: &Store, t: &Target, to: &RefRecord) -> Result<()> {
    let mut rec = record_of(t);
    rec.applying = Some(Applying {
        point: to.name.clone(),
        point_id: to.id.clone(),
    });
    store.write_replica(&rec)
}

/// Bring `t`'s image to point `to` (committed in `store`, after `intend`).
///
/// # Errors
/// I/O failures (the record then still says which apply to finish).
pub fn apply(store: &Store, data: &Arc<Data>, t: &Target, to: &RefRecord) -> Result<ApplyReport> {
    let mut rec = record_of(t);
    rec.applying = Some(Applying {
        point: to.name.clone(),
        point_id: to.id.clone(),
    });
    finish(store, data, rec)
}

fn record_of(t: &Target) -> ReplicaRecord {
    match &t.existing {
        Some(r) => r.clone(),
        None => ReplicaRecord {
            disk: t.disk.clone(),
            image: t.image.clone(),
            point: String::new(),
            point_id: String::new(),
            stamp: FileStamp {
                dev: 0,
                ino: 0,
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
            },
            applying: None,
        },
    }
}

/// Finish every apply a crash interrupted.
///
/// # Errors
/// As `apply`.
pub fn finish_interrupted(store: &Store, data: &Arc<Data>) -> Result<Vec<ApplyReport>> {
    let mut out = Vec::new();
    for r in store.replicas()? {
        if r.applying.is_some() {
            log::info!(
                "finishing the interrupted apply of disk {}'s replica",
                r.disk
            );
            out.push(finish(store, data, r)?);
        }
    }
    Ok(out)
}

/// Carry out the apply `rec.applying` names, then record its end.
fn finish(store: &Store, data: &Arc<Data>, mut rec: ReplicaRecord) -> Result<ApplyReport> {
    let target = rec.applying.clone().expect("an apply in progress");
    let to = match store.read_ref(&target.point) {
        Ok(r) if r.id == target.point_id => r,
        // The receive died before its commit: the image was never touched.
        Ok(_) | Err(Error::NoSuchRef(_)) => {
            rec.applying = None;
            if rec.point.is_empty() {
                store.remove_replica(&rec.disk)?;
            } else {
                store.write_replica(&rec)?;
            }
            return Ok(ApplyReport {
                disk: rec.disk,
                image: rec.image,
                point: rec.point,
                blocks: 0,
                whole: false,
            });
        }
        Err(e) => return Err(e),
    };
    let from = if rec.point.is_empty() {
        None
    } else {
        Some(store.read_ref(&rec.point)?)
    };
    let (to_map, _) = map_of(store, &to, &rec.disk)?;
    let in_place = match &from {
        Some(f) => {
            let (m, _) = map_of(store, f, &rec.disk)?;
            (m.nblocks == to_map.nblocks && f.disks[&rec.disk].size == to.disks[&rec.disk].size)
                .then_some(m)
        }
        None => None,
    };
    let (blocks, whole) = match in_place {
        Some(from_map) => (
            write_difference(store, data, &rec.image, &from_map, &to, &rec.disk)?,
            false,
        ),
        None => {
            // A first apply, or a resize: a new image beside, renamed into place.
            let r = crate::backup::restore::restore(
                store,
                data,
                &to.name,
                &rec.disk,
                &rec.image,
                true,
                &NoProgress,
            )?;
            (r.data_bytes / store.block_size() as u64, true)
        }
    };
    rec.point = to.name.clone();
    rec.point_id = to.id.clone();
    rec.applying = None;
    rec.stamp = FileStamp::of(&rec.image)?;
    store.write_replica(&rec)?;
    Ok(ApplyReport {
        disk: rec.disk,
        image: rec.image,
        point: to.name,
        blocks,
        whole,
    })
}

/// Write the blocks whose hash differs between `from` and `to`'s map in place (holes
/// punched), then sync. Returns the blocks written.
fn write_difference(
    store: &Store,
    data: &Arc<Data>,
    image: &Path,
    from: &crate::repo::map::MapRoot,
    to: &RefRecord,
    disk: &str,
) -> Result<u64> {
    let (to_map, _) = map_of(store, to, disk)?;
    let size = to.disks[disk].size;
    let bs = store.block_size() as u64;
    let f: File = OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(Error::io("open", image))?;
    let mut n = 0u64;
    let abort_after = abort_hook();
    data.maps.diff(from, &to_map, |b, _, h| {
        if abort_after == Some(n) {
            // Test hook: die here as kill -9 would (no unwinding, nothing flushed).
            std::process::abort();
        }
        let off = b * bs;
        let len = bs.min(size - off);
        if h.is_zero() {
            punch(&f, image, off, len)?;
        } else {
            let bytes = data.block(&h)?;
            f.write_all_at(&bytes[..len as usize], off)
                .map_err(Error::io("write", image))?;
        }
        n += 1;
        Ok(())
    })?;
    f.sync_all().map_err(Error::io("fsync", image))?;
    Ok(n)
}

/// Make `[off, off + len)` read as zeros, as a hole where the filesystem can.
fn punch(f: &File, image: &Path, off: u64, len: u64) -> Result<()> {
    let e = match crate::sys::punch_hole(f.as_raw_fd(), off, len) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return f
            .write_all_at(&vec![0u8; len as usize], off)
            .map_err(Error::io("write", image));
    }
    Err(Error::io("punch a hole in", image)(e))
}

/// `VMREF_TEST_APPLY_ABORT_AFTER=N`: the crash tests (tests/replicate.rs) kill an apply after
/// exactly N blocks, which a timed kill -9 could not hit reliably on a small image.
fn abort_hook() -> Option<u64> {
    std::env::var("VMREF_TEST_APPLY_ABORT_AFTER")
        .ok()
        .and_then(|v| v.parse().ok())
}
