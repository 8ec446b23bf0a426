//! Garbage collection: mark every blob that a restorable point's map (or a partial receive's,
//! see `replicate::receive`, or another store's published point, see `shared`) reaches (its
//! nodes and blocks), then let the repository delete packs that hold no marked blob and
//! compact packs that are mostly unmarked (`Repository::collect`). It runs under the
//! repository's exclusive lock, and is put off while another process writes to it.
//!
//! Safe at any moment, twice, or after a crash halfway (invariant 4): it only removes what no
//! committed point reaches, and the repository writes compacted packs and their index before
//! it deletes anything. Marking stops at the first point whose map cannot be read: deleting a
//! blob we cannot prove unused could lose the only copy of a block. The caller holds the
//! catalog lock, so no backup of this store puts blobs meanwhile, and the repository's
//! exclusive lock keeps every other store's writers out (see `shared`).

use std::cell::RefCell;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::repo::gc::GcOptions;
use crate::repo::map::MapRoot;
use crate::store::Store;
use crate::store::records::RefState;

use super::data::{Data, map_of};

/// What a collection did, for `prune` and `ref delete` to report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs (blocks and map nodes) still needed.
    pub live_blobs: u64,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    /// Bytes the repository shrank by: packs and index objects deleted, less what compaction
    /// wrote.
    pub freed_bytes: u64,
    /// Why nothing was collected this time (another process writes to the repository); the
    /// garbage waits for a later collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub put_off: Option<String>,
}

/// How long a collection keeps trying to get the repository to itself.
const COLLECT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Up to 200 ms of jitter, so two collectors do not meet in step.
fn rand_ms() -> u64 {
    crate::store::random_bytes().map_or(0, |b| u64::from(b[0]) * 200 / 256)
}

/// Present while a collection is owed: the last one was put off (another process wrote to
/// the shared repository) or failed. The next `prune` collects even when it deletes nothing.
pub fn owed_path(store: &Store) -> std::path::PathBuf {
    store.data_dir().join("collection-owed")
}

/// Collect every blob no restorable point needs, and remember when that was not done.
///
/// # Errors
/// `Format` for a point whose map cannot be read (nothing is deleted then); I/O failures.
pub fn collect(store: &Store, data: &Data) -> Result<GcReport> {
    let r = collect_now(store, data);
    // Losing the flag only leaves garbage for a later collection: not synced.
    let flag = owed_path(store);
    let kept = match &r {
        Ok(rep) if rep.put_off.is_none() => {
            std::fs::remove_file(&flag).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
        }
        _ => std::fs::write(&flag, b""),
    };
    if let Err(e) = kept {
        log::debug!("{}: {e}", flag.display());
    }
    r
}

fn collect_now(store: &Store, data: &Data) -> Result<GcReport> {
    // Unpublish what this store deleted, publish what it holds (see `shared`).
    super::shared::reconcile(store, data)?;
    // Writers hold the repository for seconds at a time: look again for a few seconds
    // before putting the collection off.
    let start = std::time::Instant::now();
    let lock = loop {
        match super::shared::collect_lock(store, data)? {
            Ok(l) => break l,
            Err(_) if start.elapsed() < COLLECT_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(100 + rand_ms()));
            }
            Err(why) => {
                log::info!("repository collection put off: {why}");
                return Ok(GcReport {
                    put_off: Some(why),
                    ..GcReport::default()
                });
            }
        }
    };
    let mut roots: Vec<MapRoot> = Vec::new();
    for r in store.refs()? {
        if r.state != RefState::Restorable {
            continue;
        }
        for disk in r.disks.keys() {
            roots.push(map_of(store, &r, disk)?.0);
        }
    }
    // A partial receive's maps are no point's yet, but a resume builds on them.
    if let Some(p) = store.partial_receive()? {
        let bs = store.block_size() as u64;
        for d in &p.disks {
            let root = crate::repo::Hash::parse(&d.root).ok_or_else(|| Error::Format {
                path: store.partial_receive_path(),
                source: crate::format::FormatError::Invalid {
                    what: "partial receive",
                    why: format!("map root {:?}", d.root),
                },
            })?;
            roots.push(MapRoot {
                root,
                nblocks: d.size.div_ceil(bs),
            });
        }
    }
    // Every other store's published points, listed under the lock: none can be committed
    // meanwhile.
    roots.extend(super::shared::other_roots(store, data)?);
    // Blocks already durable but not yet in an index object are invisible to the marker;
    // other processes' index objects written since this one loaded its index too.
    data.repo.flush()?;
    data.repo.refresh()?;
    let marker = RefCell::new(data.repo.gc_marker()?);
    let failed: RefCell<Option<Error>> = RefCell::new(None);
    let note = |e: Error| {
        failed.borrow_mut().get_or_insert(e);
    };
    for root in &roots {
        data.maps.walk(
            root,
            &mut |h| {
                marker.borrow_mut().mark_first(h).unwrap_or_else(|e| {
                    note(e);
                    false
                })
            },
            &mut |h| {
                if let Err(e) = marker.borrow_mut().mark(h) {
                    note(e);
                }
            },
        )?;
        if let Some(e) = failed.borrow_mut().take() {
            return Err(e);
        }
    }
    let marker = marker.into_inner();
    let live_blobs = marker.live();
    // Marking may take long: a lock taken for stale meanwhile means writers may have gone
    // on, and nothing may be deleted.
    lock.check()?;
    let rep = data.repo.collect(marker, &GcOptions::default())?;
    Ok(GcReport {
        live_blobs,
        packs_deleted: rep.packs_deleted,
        packs_rewritten: rep.packs_rewritten,
        freed_bytes: rep.net_freed().max(0) as u64,
        put_off: None,
    })
}
