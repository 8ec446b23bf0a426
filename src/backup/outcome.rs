//! The outcome of the last backup attempt, kept in `STORE/data/last-backup` for monitors
//! (`status --json`, `status --check`): a failed backup leaves no point behind, so without this
//! record a monitor could only notice it once the newest backup grew too old.
//!
//! Whoever carries out a backup (the command itself, or the mounted daemon) records it, so the
//! outcome is kept even when the asking command went away. A failure before any executor was
//! reached (the store could not be opened, or another command held it) is recorded by the
//! asking command instead (`record_if_unrecorded`).
//!
//! A backup is recorded as running, by this process, before it starts: if the process is
//! killed or the host loses power, the record still says so, and whoever owns the store next
//! (and so is not that process) reports it as interrupted (`as_seen_by_owner`).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, Kind};
use crate::store::records::BackupKind;
use crate::store::{Store, atomic};

use super::Owner;
use super::progress::Progress;
use super::run::BackupReport;

/// Do not modify the magic: identifies last-backup records.
pub const LAST_BACKUP: Kind = Kind {
    magic: b"VMREFLBK",
    major: 1,
    minor: 0,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
    /// Started by `runner` and not finished yet.
    Running,
}

/// One backup attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastBackup {
    /// The point the backup was to create.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub result: Outcome,
    /// Why it failed: the error's one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Full or incremental, for a backup that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<BackupKind>,
    /// Bytes the repository grew by, for a backup that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// Milliseconds since the epoch: tells the attempts of one second apart.
    pub started_unix_ms: u64,
    /// For a running backup, when it started.
    pub finished_unix: u64,
    pub duration_secs: f64,
    /// The process running it (`runner_id`), while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
}

/// This process among all that ever ran a backup of the store: a pid alone can come back.
pub fn runner_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let nonce = crate::store::random_id().unwrap_or_default();
        format!("{}-{nonce}", std::process::id())
    })
}

/// The record as the store's owner reports it: a backup still marked running by another
/// process was cut short, since no other process can be running one while this one owns the
/// store.
pub fn as_seen_by_owner(mut rec: LastBackup) -> LastBackup {
    if rec.result == Outcome::Running && rec.runner.as_deref() != Some(runner_id()) {
        rec.result = Outcome::Failed;
        rec.error = Some(
            "interrupted: the process running it stopped before it finished (killed, crashed \
             or the host went down)"
                .into(),
        );
        rec.runner = None;
    }
    rec
}

pub fn path(store: &Store) -> std::path::PathBuf {
    store.data_dir().join("last-backup")
}

/// The record of the last attempt; `None` before the first.
///
/// # Errors
/// I/O failures; `Format` for a damaged record.
pub fn read(store: &Store) -> Result<Option<LastBackup>> {
    let p = path(store);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &p)(e)),
    };
    format::decode(LAST_BACKUP, &bytes)
        .map(Some)
        .map_err(|source| Error::Format { path: p, source })
}

/// Replace the record atomically.
///
/// # Errors
/// I/O failures; the old record is then untouched.
pub fn write(store: &Store, rec: &LastBackup) -> Result<()> {
    crate::store::mkdir_private(&store.data_dir())?;
    atomic::write_atomic(&path(store), &format::encode(LAST_BACKUP, rec))
}

pub fn now_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn record(
    name: &str,
    owner: Option<&str>,
    started: SystemTime,
    took: std::time::Duration,
    r: std::result::Result<&BackupReport, &Error>,
) -> LastBackup {
    let info = r.ok().and_then(|r| r.point.backup.as_ref());
    LastBackup {
        name: name.to_string(),
        owner: owner.map(str::to_string),
        result: if r.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Failed
        },
        error: r.err().map(one_line),
        kind: info.map(|b| b.kind),
        stored_bytes: info.map(|b| b.stored_bytes),
        started_unix_ms: now_ms(started),
        finished_unix: crate::store::now_unix(),
        duration_secs: took.as_secs_f64(),
        runner: None,
    }
}

/// A monitor prints the reason on one line.
fn one_line(e: &Error) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

/// `run::backup`, then the record of its outcome. A record that cannot be written does not
/// turn a committed backup into a failure: it becomes a warning.
///
/// # Errors
/// As `run::backup`.
pub fn backup_recorded(
    owner: &dyn Owner,
    name: &str,
    point_owner: Option<&str>,
    full: bool,
    since: Option<&str>,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let started = SystemTime::now();
    let clock = Instant::now();
    let running = LastBackup {
        name: name.to_string(),
        owner: point_owner.map(str::to_string),
        result: Outcome::Running,
        error: None,
        kind: None,
        stored_bytes: None,
        started_unix_ms: now_ms(started),
        finished_unix: crate::store::now_unix(),
        duration_secs: 0.0,
        runner: Some(runner_id().to_string()),
    };
    // Not a warning: the command's one stderr line must stay its own error. If the backup
    // fails, that line says why (a full store fails this write for the same reason); if it
    // succeeds, writing its outcome below replaces this record or warns.
    if let Err(e) = write(owner.store(), &running) {
        log::info!("the backup's start was not recorded: {e}");
    }
    let r = super::run::backup(owner, name, point_owner, full, since, progress);
    let rec = record(name, point_owner, started, clock.elapsed(), r.as_ref());
    let written = write(owner.store(), &rec);
    match (r, written) {
        (Ok(mut rep), Err(e)) => {
            rep.warnings
                .push(format!("the backup's outcome was not recorded: {e}"));
            Ok(rep)
        }
        (Err(e), Err(w)) => {
            // Logged below the default level: the failure `e` is printed as the command's one
            // line, and a monitor sees the record left stale by its age (`status --check
            // --max-age`).
            log::info!("the failed backup's outcome was not recorded: {w}");
            Err(e)
        }
        (r, Ok(())) => r,
    }
}

/// Record a failure that no executor recorded: the attempt that began at `started` failed with
/// `err` before reaching one (the store could not be opened, another command held it, the
/// daemon went away). A record of an attempt that started at or after `started` is that
/// executor's own and is left alone. Best effort: a store that cannot be written is logged.
pub fn record_if_unrecorded(
    store: &Store,
    name: &str,
    owner: Option<&str>,
    started: SystemTime,
    err: &Error,
) {
    match read(store) {
        // Still marked running: that executor could not record its end.
        Ok(Some(r)) if r.started_unix_ms >= now_ms(started) && r.result != Outcome::Running => {
            return;
        }
        _ => {}
    }
    let took = started.elapsed().unwrap_or_default();
    let rec = record(name, owner, started, took, Err(err));
    if let Err(w) = write(store, &rec) {
        // Below the default level, as in `backup_recorded`: `err` is the command's one line.
        log::info!("the failed backup's outcome was not recorded: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_damage_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::init(&d.path().join("s"), 65536).unwrap();
        assert_eq!(read(&s).unwrap(), None);
        let started = SystemTime::now();
        let err = Error::NoSuchRef("base".into());
        record_if_unrecorded(&s, "b1", Some("veeam"), started, &err);
        let r = read(&s).unwrap().unwrap();
        assert_eq!(r.result, Outcome::Failed);
        assert_eq!(r.name, "b1");
        assert_eq!(r.error.as_deref(), Some(err.to_string().as_str()));
        // An executor's record of a later attempt is never replaced by an older failure.
        let earlier = started - std::time::Duration::from_secs(5);
        record_if_unrecorded(&s, "b0", None, earlier, &err);
        assert_eq!(read(&s).unwrap().unwrap().name, "b1");

        // A backup marked running by another process was interrupted; by this one, it runs.
        let mut running = read(&s).unwrap().unwrap();
        running.result = Outcome::Running;
        running.runner = Some(runner_id().to_string());
        assert_eq!(as_seen_by_owner(running.clone()), running);
        running.runner = Some("1-00".into());
        let seen = as_seen_by_owner(running);
        assert_eq!(seen.result, Outcome::Failed);
        assert!(seen.error.unwrap().starts_with("interrupted"));

        let b = std::fs::read(path(&s)).unwrap();
        for n in 0..b.len() {
            assert!(format::decode::<LastBackup>(LAST_BACKUP, &b[..n]).is_err());
        }
        let mut c = b.clone();
        c[40] ^= 1;
        std::fs::write(path(&s), &c).unwrap();
        assert!(matches!(read(&s), Err(Error::Format { .. })));
    }
}
