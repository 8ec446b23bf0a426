//! A store's side of a shared repository: publishing its points (`repo::snapshot`) and taking
//! the repository locks (`repo::lock`) around what writes to the repository or collects it.
//!
//! Every store does this, shared or not: a repository may be attached to by another store
//! at any time (`init --attach`), and the cost is a few small objects per backup.
//!
//! - A backup (receive, repair) holds a shared lock (`WriteGuard`) from before its first
//!   index lookup until its point is committed; it reloads the index after taking the lock,
//!   so it never dedups against a blob a collection removed while it was not holding one.
//! - A backup publishes its point after its blobs are durable and before its record is
//!   renamed in (the commit point). A crash between the two leaves a published point with no
//!   record, which the store's next reconcile deletes (never another store's).
//! - `reconcile` makes the store's published points equal its restorable points (and its
//!   partial receive): it runs when a write guard is dropped and before every collection, so
//!   a delete or prune, whose collection follows its commit, is unpublished there. Once a
//!   store's points are all published it says so in `stores/<id>`.
//! - A collection marks from this store's own records and every other store's published
//!   points, under the exclusive lock taken before it reloads the index and lists the
//!   published points; when a writer holds the repository it is put off.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::repo::lock::RepoLock;
use crate::repo::map::MapRoot;
use crate::repo::snapshot::{self, SnapDisk, Snapshot, StoreMark};
use crate::store::Store;
use crate::store::records::{RefRecord, RefState};
use crate::store::replication::PartialReceive;

use super::data::Data;

/// How long a writer waits for a running collection: `VMREF_REPO_LOCK_WAIT` seconds, else
/// ten minutes.
fn lock_wait() -> Duration {
    std::env::var("VMREF_REPO_LOCK_WAIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(600), Duration::from_secs)
}

/// The published form of a restorable point.
///
/// # Errors
/// `Internal` for a point with a disk that has no map.
pub fn snapshot_of(store: &Store, rec: &RefRecord) -> Result<Snapshot> {
    let mut disks = BTreeMap::new();
    for (name, d) in &rec.disks {
        let m = d
            .map
            .as_ref()
            .ok_or_else(|| Error::Internal(format!("point {} disk {name} has no map", rec.name)))?;
        disks.insert(
            name.clone(),
            SnapDisk {
                size: d.size,
                root: m.root.clone(),
                data_blocks: m.data_blocks,
            },
        );
    }
    Ok(Snapshot {
        store_id: store.meta().id.clone(),
        point_id: rec.id.clone(),
        name: rec.name.clone(),
        created_unix: rec.created_unix,
        owner: rec.owner.clone(),
        block_size: store.block_size(),
        partial: false,
        disks,
    })
}

/// The published form of a partial receive: its maps, kept by every store's collections so
/// that a resume finds the blocks that arrived.
pub fn partial_snapshot(store: &Store, p: &PartialReceive) -> Snapshot {
    // Named by its roots too: a resume moves them, and the new form is a new object (names
    // are never reused for other bytes).
    let mut h = blake3::Hasher::new();
    for d in &p.disks {
        h.update(d.name.as_bytes());
        h.update(d.root.as_bytes());
    }
    let tag = h.finalize().to_hex();
    Snapshot {
        store_id: store.meta().id.clone(),
        point_id: format!("partial-{}-{}", p.point_id, &tag[..16]),
        name: p.point_name.clone(),
        created_unix: p.updated_unix,
        owner: None,
        block_size: store.block_size(),
        partial: true,
        disks: p
            .disks
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    SnapDisk {
                        size: d.size,
                        root: d.root.clone(),
                        data_blocks: d.data_blocks,
                    },
                )
            })
            .collect(),
    }
}

/// Publish a partial receive's maps before the store records them (`receive` saves its
/// progress): a collection never deletes what a resume will build on. The form it replaces
/// goes at the next reconcile.
///
/// # Errors
/// I/O or server failures.
pub fn publish_partial(store: &Store, data: &Data, p: &PartialReceive) -> Result<()> {
    snapshot::publish(&**data.repo.backend(), &partial_snapshot(store, p))
}

/// Every point this store should have published: its restorable points and its partial
/// receive.
fn wanted(store: &Store) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    for r in store.refs()? {
        if r.state == RefState::Restorable {
            out.push(snapshot_of(store, &r)?);
        }
    }
    if let Some(p) = store.partial_receive()? {
        out.push(partial_snapshot(store, &p));
    }
    Ok(out)
}

/// Make this store's published points equal to what it holds: publish what is missing,
/// delete what it no longer holds. Then mark the store as fully published.
///
/// # Errors
/// I/O or server failures (nothing is lost: a later reconcile finishes the work).
pub fn reconcile(store: &Store, data: &Data) -> Result<()> {
    let be = data.repo.backend();
    let id = &store.meta().id;
    let want = wanted(store)?;
    let have: BTreeSet<String> = snapshot::list(&**be, Some(id))?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    // New first, then the old: the store's roots are published at every moment.
    for s in &want {
        if !have.contains(&s.point_id) {
            snapshot::publish(&**be, s)?;
        }
    }
    let keep: BTreeSet<&str> = want.iter().map(|s| s.point_id.as_str()).collect();
    for p in have.iter().filter(|p| !keep.contains(p.as_str())) {
        be.delete(&snapshot::object_name(id, p))?;
    }
    if !snapshot::marked_stores(&**be)?.contains(id) {
        // Before the mark: once other stores may attach, a release that would collect their
        // blocks must refuse this store.
        store.rewrite_meta_if_older()?;
        snapshot::mark_store(
            &**be,
            &StoreMark {
                store_id: id.clone(),
                host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
                path: store.root().display().to_string(),
                since_unix: crate::store::now_unix(),
            },
        )?;
    }
    Ok(())
}

/// A writer's hold on the repository: a shared lock, released (after publishing what the
/// store now holds) when dropped.
pub struct WriteGuard<'a> {
    store: &'a Store,
    data: &'a Data,
    lock: Option<RepoLock>,
    /// Whether the writer published a point: a guard dropped without one is an operation
    /// that failed (or committed nothing), which leaves publishing to the next one.
    published: std::cell::Cell<bool>,
}

impl<'a> WriteGuard<'a> {
    /// Take the shared lock (waiting out a collection), then reload the index.
    ///
    /// # Errors
    /// A collection still running after the wait; I/O or server failures.
    pub fn take(store: &'a Store, data: &'a Data, what: &str) -> Result<WriteGuard<'a>> {
        let lock = RepoLock::shared(data.repo.backend(), &store.meta().id, what, lock_wait())?;
        // Blobs a collection removed while we held no lock must not be deduplicated against:
        // neither those an old index snapshot names nor a failed writer's unindexed ones.
        data.repo.forget_unindexed();
        data.repo.refresh()?;
        Ok(WriteGuard {
            store,
            data,
            lock: Some(lock),
            published: std::cell::Cell::new(false),
        })
    }

    /// Publish `rec` (about to be committed) after checking the lock still holds.
    ///
    /// # Errors
    /// The lock was taken for stale; I/O or server failures.
    pub fn publish(&self, rec: &RefRecord) -> Result<()> {
        if let Some(l) = &self.lock {
            l.check()?;
        }
        snapshot::publish(&**self.data.repo.backend(), &snapshot_of(self.store, rec)?)?;
        self.published.set(true);
        Ok(())
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        // A failed operation's error is the one line the user needs; reconciling waits for
        // the next writer or collection, which do it first.
        let partial = self.store.partial_receive().ok().flatten().is_some();
        if !self.published.get() && !partial {
            if let Some(l) = self.lock.as_mut() {
                l.set_quiet();
            }
        } else if let Err(e) = reconcile(self.store, self.data) {
            log::warn!("could not publish this store's points in its repository: {e}");
        }
        self.lock.take();
    }
}

/// The roots a collection keeps besides this store's own: every other store's published
/// points.
///
/// # Errors
/// A damaged published point; I/O or server failures.
pub fn other_roots(store: &Store, data: &Data) -> Result<Vec<MapRoot>> {
    let mut out = Vec::new();
    for s in snapshot::read_all(&**data.repo.backend(), Some(&store.meta().id))? {
        out.extend(s.roots()?.into_iter().map(|(_, r)| r));
    }
    Ok(out)
}

/// Take the exclusive lock for a collection, or say why not.
///
/// # Errors
/// I/O or server failures.
pub fn collect_lock(store: &Store, data: &Data) -> Result<std::result::Result<RepoLock, String>> {
    Ok(
        match RepoLock::exclusive(data.repo.backend(), &store.meta().id, "collection")? {
            Ok(l) => Ok(l),
            Err(others) => Err(format!(
                "{} other process(es) use the repository ({})",
                others.len(),
                others
                    .iter()
                    .map(|o| match &o.info {
                        Some(i) => format!("{} by {} pid {}", i.what, i.host, i.pid),
                        None => o.name.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
    )
}
