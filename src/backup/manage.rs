//! Point lifecycle beyond creation: demote a checkpoint, delete a point (with its backup data),
//! prune restorable points by a retention policy (chosen by `retention`), and recovery at
//! engine open.
//!
//! Atomicity (invariant 4): a delete commits by removing the point's record; a prune, which
//! removes several records, commits by renaming its journal into place and is rolled forward
//! from the journal by the next engine open if it was interrupted. Unreferenced blobs are
//! collected afterwards (`gc`). Every remaining point keeps its own map, so a delete never
//! changes what another point reads.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, Kind};
use crate::store::records::{RefRecord, RefState};
use crate::store::{Store, atomic};

use super::retention::{self, Candidate, Kept, Policy};
use super::{Owner, gc};

/// Do not modify the magic: identifies prune journals.
pub const PRUNE_JOURNAL: Kind = Kind {
    magic: b"VMREFPRJ",
    major: 1,
    minor: 0,
};

/// The points a prune deletes: name and id, so a point re-created under the same name after
/// the prune is never touched by a roll-forward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneJournal {
    pub points: Vec<(String, String)>,
}

fn journal_path(store: &Store) -> std::path::PathBuf {
    store.data_dir().join("prune.journal")
}

fn remove_if_same(store: &Store, name: &str, id: &str) -> Result<()> {
    match store.read_ref(name) {
        Ok(r) if r.id == id => store.remove_ref_record(name),
        Ok(_) | Err(Error::NoSuchRef(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Finish what an interrupted operation committed and demote checkpoints left by a dead
/// owner. Runs at engine open, with the store lock held. Returns true when a collection is
/// owed (a prune was rolled forward), for the caller to run once the repository is open.
///
/// # Errors
/// I/O failures; `Format` for a damaged journal.
pub fn recover(store: &Store) -> Result<bool> {
    let data = store.data_dir();
    if !data.is_dir() {
        return Ok(false);
    }
    let mut owed = false;
    // Save files are unlinked at creation; anything here is from a crash in between.
    if let Ok(rd) = std::fs::read_dir(super::cow_dir(store)) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let jp = journal_path(store);
    match std::fs::read(&jp) {
        Ok(b) => {
            let j: PruneJournal =
                format::decode(PRUNE_JOURNAL, &b).map_err(|source| Error::Format {
                    path: jp.clone(),
                    source,
                })?;
            log::info!(
                "finishing an interrupted prune of {} point(s)",
                j.points.len()
            );
            for (name, id) in &j.points {
                remove_if_same(store, name, id)?;
            }
            atomic::remove_durable(&jp)?;
            owed = true;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("read", &jp)(e)),
    }
    for r in store.refs()? {
        if r.state == RefState::Checkpoint {
            log::info!(
                "checkpoint {} did not survive the restart: now a plain point",
                r.name
            );
            store.write_ref(&RefRecord {
                state: RefState::Plain,
                ..r
            })?;
        }
    }
    Ok(owed)
}

/// Collect after a delete or prune has committed. A failure leaves garbage for a later
/// collection, never a half-done delete, so it is a warning, not the operation's error.
/// Returns the bytes freed and why nothing was collected, if it was put off.
fn collect_after(owner: &dyn Owner, what: &str) -> (u64, Option<String>) {
    match gc::collect(owner.store(), &owner.backup_state().data) {
        Ok(r) => (r.freed_bytes, r.put_off),
        Err(e) => {
            log::warn!("{what} done, but its space was not reclaimed: {e}");
            (0, Some(e.to_string()))
        }
    }
}

/// Demote every open checkpoint (the engine is closing).
///
/// # Errors
/// I/O failures writing records.
pub fn demote_all(owner: &dyn Owner) -> Result<()> {
    let _op = owner.lock_ops();
    for cp in owner.backup_state().checkpoints() {
        demote_locked(owner, &cp.rec.name)?;
    }
    Ok(())
}

fn demote_locked(owner: &dyn Owner, name: &str) -> Result<RefRecord> {
    let store = owner.store();
    owner.backup_state().end_checkpoint(name);
    let rec = store.read_ref(name)?;
    if rec.state != RefState::Checkpoint {
        return Ok(rec);
    }
    let rec = RefRecord {
        state: if rec.backup.is_some() {
            RefState::Restorable
        } else {
            RefState::Plain
        },
        ..rec
    };
    store.write_ref(&rec)?;
    Ok(rec)
}

/// `ref demote NAME`: drop a checkpoint's saved data, leaving a plain point.
///
/// # Errors
/// `NoSuchRef`; `NotACheckpoint` when the point is not an open checkpoint.
pub fn demote(owner: &dyn Owner, name: &str) -> Result<RefRecord> {
    let _op = owner.lock_ops();
    let rec = owner.store().read_ref(name)?;
    if rec.state != RefState::Checkpoint {
        return Err(Error::NotACheckpoint(name.to_string()));
    }
    demote_locked(owner, name)
}

/// `ref delete NAME`: remove the point (the record's removal is the commit point), then any
/// checkpoint state and backup data nothing else needs.
///
/// # Errors
/// `NoSuchRef`; I/O failures (before the commit the point is intact).
pub fn delete(owner: &dyn Owner, name: &str) -> Result<RefRecord> {
    let _op = owner.lock_ops();
    let store = owner.store();
    let rec = store.read_ref(name)?;
    if let Some((_, disk)) = store.replica_points()?.into_iter().find(|(p, _)| p == name) {
        return Err(Error::Replication(format!(
            "point {name} is what the replica of disk {disk} holds (the base of its next apply); \
             `vmref replica forget {disk}` first"
        )));
    }
    let has_data = rec.state == RefState::Restorable;
    store.remove_ref_record(name)?;
    owner.backup_state().end_checkpoint(name);
    if has_data {
        collect_after(owner, &format!("ref delete {name}"));
    }
    Ok(rec)
}

/// Remove a point record without the engine: a record that does not decode (which keeps the
/// engine from opening), or a point of a format 1 store whose upgrade it stops. Takes the
/// store lock itself; blobs only that point used are collected by the next prune or delete of
/// a restorable point (format 1 data goes with the upgrade).
///
/// # Errors
/// `Locked` when the store is in use; I/O failures.
pub fn delete_damaged_record(store: &Store, name: &str) -> Result<()> {
    let _lock = crate::store::lock::StoreLock::try_acquire(store.root())?;
    store.remove_ref_record(name)
}

/// What `prune` is asked: the policy, whose points it applies to, and the zone its calendar
/// periods are in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PruneArgs {
    #[serde(flatten)]
    pub policy: Policy,
    /// The owner whose restorable points the policy applies to; `None`: points without one.
    #[serde(default)]
    pub owner: Option<String>,
    /// Report what would be deleted, delete nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// The asking command's `TZ` (see `retention::zone`).
    #[serde(default)]
    pub tz: Option<String>,
}

/// What a prune did (or, in a dry run, would do) to the points in its scope, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneReport {
    pub owner: Option<String>,
    pub dry_run: bool,
    pub deleted: Vec<String>,
    pub kept: Vec<Kept>,
    /// Bytes the collection after the prune freed (0 in a dry run).
    pub freed_bytes: u64,
    /// Why the collection did not run (another process writing to a shared repository, or an
    /// error): the space is reclaimed by a later prune or delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection_put_off: Option<String>,
}

/// `prune`: delete the restorable points of one owner (or without one) that no rule of the
/// policy keeps (see `retention`). Plain points and other owners' points are never touched.
///
/// # Errors
/// `BadArgument` for a policy without a rule, a rule of 0 or an unknown `TZ`; I/O failures
/// (before the journal is in place nothing changed; after, the next engine open finishes the
/// prune).
pub fn prune(owner: &dyn Owner, args: &PruneArgs) -> Result<PruneReport> {
    args.policy.validate()?;
    let zone = retention::zone(args.tz.as_deref())?;
    let _op = owner.lock_ops();
    let store = owner.store();
    let restorable: Vec<RefRecord> = store
        .refs()?
        .into_iter()
        .filter(|r| r.state == RefState::Restorable)
        .collect();
    let candidates: Vec<Candidate<'_>> = restorable
        .iter()
        .map(|r| Candidate {
            name: &r.name,
            created_unix: r.created_unix,
            owner: r.owner.as_deref(),
        })
        .collect();
    let sel = retention::select(
        &candidates,
        &args.policy,
        args.owner.as_deref(),
        &retention::calendar_in(&zone),
    );
    let mut sel = sel;
    // A replica's point is the base of its next apply: kept whatever the policy says.
    let needed = store.replica_points()?;
    sel.deleted.retain(|n| !needed.iter().any(|(p, _)| p == n));
    let gone: std::collections::HashSet<&str> = sel.deleted.iter().map(String::as_str).collect();
    let old: Vec<&RefRecord> = restorable
        .iter()
        .filter(|r| gone.contains(r.name.as_str()))
        .collect();
    let mut report = PruneReport {
        owner: args.owner.clone(),
        dry_run: args.dry_run,
        deleted: sel.deleted,
        kept: sel.kept,
        freed_bytes: 0,
        collection_put_off: None,
    };
    if old.is_empty() && !args.dry_run && gc::owed_path(store).exists() {
        (report.freed_bytes, report.collection_put_off) = collect_after(owner, "prune");
    }
    if old.is_empty() || args.dry_run {
        return Ok(report);
    }
    super::ensure_dirs(store)?;
    let journal = PruneJournal {
        points: old.iter().map(|r| (r.name.clone(), r.id.clone())).collect(),
    };
    let jp = journal_path(store);
    // The commit point: from here on the prune happens, now or at the next open.
    atomic::write_atomic(&jp, &format::encode(PRUNE_JOURNAL, &journal))?;
    for (name, id) in &journal.points {
        remove_if_same(store, name, id)?;
    }
    atomic::remove_durable(&jp)?;
    (report.freed_bytes, report.collection_put_off) = collect_after(owner, "prune");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_round_trip_and_damage() {
        let j = PruneJournal {
            points: vec![("a".into(), "01".into()), ("b".into(), "02".into())],
        };
        let b = format::encode(PRUNE_JOURNAL, &j);
        assert_eq!(
            format::decode::<PruneJournal>(PRUNE_JOURNAL, &b).unwrap(),
            j
        );
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(
                format::decode::<PruneJournal>(PRUNE_JOURNAL, &c).is_err(),
                "bit {i}"
            );
        }
        for n in 0..b.len() {
            assert!(format::decode::<PruneJournal>(PRUNE_JOURNAL, &b[..n]).is_err());
        }
    }
}
