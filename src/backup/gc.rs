//! Garbage collection: remove index files of points that are no longer restorable and packs no
//! remaining index names. Only ever removes what nothing committed references, so running it
//! at any moment, twice, or after a crash halfway through is harmless (invariant 4).
//!
//! An operation that may leave such files behind (backup, delete, prune) first writes
//! `data/gc.pending` and removes it after collecting; engine open collects while it exists.
//! If any remaining index cannot be read, packs are left alone: deleting a pack we cannot
//! prove unused could lose the only copy of a block.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::FormatError;
use crate::store::records::RefState;
use crate::store::{Store, atomic};

use super::index::{INDEX_HEADER_LEN, IndexHeader};
use super::pack::{PackCache, PackId};
use super::{index_dir, packs_dir};

const MARKER: &str = "gc.pending";

fn marker(store: &Store) -> PathBuf {
    store.data_dir().join(MARKER)
}

/// Note that a collection may be owed (before an operation that can leave garbage).
///
/// # Errors
/// I/O failures.
pub fn mark_pending(store: &Store) -> Result<()> {
    atomic::write_atomic(&marker(store), b"")
}

pub fn is_pending(store: &Store) -> bool {
    marker(store).exists()
}

/// The collection is done.
///
/// # Errors
/// I/O failures.
pub fn clear_pending(store: &Store) -> Result<()> {
    atomic::remove_durable(&marker(store))
}

/// What a collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub indexes: u64,
    pub packs: u64,
    pub bytes: u64,
}

/// The packs an index file names, from its header and pack table alone.
///
/// # Errors
/// `Format` for damage, I/O errors.
pub fn packs_of(path: &Path) -> Result<Vec<PackId>> {
    let fmt = |source| Error::Format {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(Error::io("open", path))?;
    let mut h = [0u8; INDEX_HEADER_LEN];
    f.read_exact_at(&mut h, 0).map_err(|e| {
        fmt(FormatError::Invalid {
            what: "block index",
            why: e.to_string(),
        })
    })?;
    let hdr = IndexHeader::decode(&h).map_err(fmt)?;
    let mut b = vec![0u8; hdr.packs_end()];
    f.read_exact_at(&mut b, 0).map_err(|e| {
        fmt(FormatError::Invalid {
            what: "block index",
            why: e.to_string(),
        })
    })?;
    hdr.decode_packs(&b).map_err(fmt)
}

fn list(dir: &Path, ext: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut v = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(Error::io("read directory", dir)(e)),
    };
    for e in rd {
        let e = e.map_err(Error::io("read directory", dir))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') {
            continue;
        }
        if let Some(stem) = n.strip_suffix(ext) {
            v.push((stem.to_string(), e.path()));
        }
    }
    Ok(v)
}

/// Remove unreferenced index files and packs. The caller holds the store lock and the catalog
/// lock, so no backup is writing.
///
/// # Errors
/// I/O failures listing or reading the store.
pub fn collect(store: &Store, cache: Option<&PackCache>) -> Result<GcReport> {
    let mut report = GcReport::default();
    let live: HashSet<(String, String)> = store
        .refs()?
        .into_iter()
        .filter(|r| r.state == RefState::Restorable)
        .flat_map(|r| {
            let id = r.id.clone();
            r.disks.into_keys().map(move |d| (id.clone(), d))
        })
        .collect();
    let idir = index_dir(store);
    let mut keep = Vec::new();
    for (stem, path) in list(&idir, ".idx")? {
        let key = stem
            .split_once('.')
            .map(|(id, disk)| (id.to_string(), disk.to_string()));
        if key.is_some_and(|k| live.contains(&k)) {
            keep.push(path);
        } else {
            fs::remove_file(&path).map_err(Error::io("remove", &path))?;
            report.indexes += 1;
        }
    }
    if report.indexes > 0 {
        atomic::fsync_dir(&idir)?;
    }
    let mut used = BTreeSet::new();
    for path in &keep {
        match packs_of(path) {
            Ok(p) => used.extend(p),
            Err(e) => {
                log::warn!("not collecting packs: {e}");
                return Ok(report);
            }
        }
    }
    let pdir = packs_dir(store);
    for (stem, path) in list(&pdir, ".pack")? {
        // A file we cannot parse as a pack name is not ours to delete.
        let Some(id) = PackId::parse(&stem) else {
            continue;
        };
        if used.contains(&id) {
            continue;
        }
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(&path).map_err(Error::io("remove", &path))?;
        if let Some(c) = cache {
            c.forget(id);
        }
        report.packs += 1;
        report.bytes += len;
    }
    if report.packs > 0 {
        atomic::fsync_dir(&pdir)?;
    }
    Ok(report)
}
