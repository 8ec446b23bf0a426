//! The control protocol: what a command asks of the store's owner, carried out by
//! `execute` either in the command's own process (no daemon) or in the mounted daemon, which
//! receives the same request as one JSON line on `STORE/control.sock` and answers with one
//! JSON line. One code path, two transports.
//!
//! Each line carries the protocol version: `{"v": 1, "request": {"op": …}}` and
//! `{"v": 1, "reply": {"ok": …}}` or `{"v": 1, "reply": {"error": {"kind": …, "message": …}}}`.
//! An error crosses as its typed `Error` (variant and fields) plus its text: the client
//! rebuilds the same variant, so a command prints the same line and exits the same way
//! whether its work ran in its own process or in the daemon. The text is the fallback when a
//! daemon of another version sends a kind this one does not know.
//!
//! The typed functions below (`ref_create`, `backup`, `status`, …) are what commands call:
//! each builds its request and runs it on the store's owner (`run_typed`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::backup::manage::{PruneArgs, PruneReport};
use crate::backup::outcome::LastBackup;
use crate::backup::restore::RestoreReport;
use crate::backup::run::BackupReport;
use crate::backup::verify::VerifyReport;
use crate::backup::{self, NoProgress, Owner, Progress};
use crate::engine::{DiskChanges, Engine};
use crate::error::{Error, Result};
use crate::replicate::framing::{FrameReader, FrameWriter};
use crate::replicate::receive::{AbortReport, ReceiveArgs, ReceiveReport};
use crate::replicate::send::{SendArgs, SendReport};
use crate::store::Store;
use crate::store::records::{DiskRecord, RefRecord, RefState};

/// The control protocol's version, sent in every request and reply. Bump it when a request
/// or reply changes shape.
/// (2: `prune` carries a retention policy, owner, dry run and zone; `backup` an owner.
/// 3: `send`, `receive`, `receive-abort`, `replica-promote`, `replica-forget`.)
pub const PROTOCOL: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    RefCreate {
        name: String,
        owner: Option<String>,
        checkpoint: bool,
    },
    RefDelete {
        name: String,
    },
    /// Drop a checkpoint's copy-on-write data, leaving a plain point.
    RefDemote {
        name: String,
    },
    /// Checkpoint, copy, commit as restorable, demote (see `backup::run`).
    Backup {
        name: String,
        full: bool,
        since: Option<String>,
        /// The new point's owner.
        #[serde(default)]
        owner: Option<String>,
    },
    /// Delete the restorable points of one owner that no retention rule keeps.
    Prune(PruneArgs),
    Changes {
        since: String,
        disk: Option<String>,
    },
    DiskAdd {
        name: String,
        image: PathBuf,
    },
    DiskRemove {
        name: String,
    },
    /// Write a point's image of one disk to `to` (an absolute path: the daemon runs in `/`).
    Restore {
        point: String,
        disk: String,
        to: PathBuf,
        force: bool,
    },
    /// Check the stored blocks of one restorable point, or of all.
    Verify {
        point: Option<String>,
        /// Store damaged blocks and map nodes again (`backup::heal::repair`).
        #[serde(default)]
        repair: bool,
        /// Other stores to repair from (absolute paths).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        from: Vec<PathBuf>,
    },
    Status,
    Ping,
    /// Stream a point: the reply line follows the stream, framed (`replicate::framing`).
    Send(SendArgs),
    /// Receive a stream that follows the request line, framed; then the reply line.
    Receive(ReceiveArgs),
    ReceiveAbort,
    ReplicaPromote {
        disk: String,
    },
    ReplicaForget {
        disk: String,
    },
}

/// Who answers on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub pid: u32,
    pub store: PathBuf,
}

/// `status`: the store, its disks and their tracking state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub store: PathBuf,
    pub store_id: String,
    pub block_size: u32,
    /// Where backup data lives: `s3://BUCKET/PREFIX`, or the local repository directory.
    /// Never credentials: the endpoint and keys are the host's settings, not the store's.
    #[serde(default)]
    pub repository: String,
    pub disks: Vec<DiskStatus>,
    /// Reference points of every state.
    pub refs: usize,
    pub restorable: usize,
    /// What the repository holds, against what the points hold.
    pub space: backup::data::Space,
    /// Bytes the whole store directory takes on disk (repository, tracking files, records).
    #[serde(default)]
    pub store_bytes: u64,
    /// The outcome of the last backup attempt (`None` before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<LastBackup>,
    /// The last time the daemon found the store's filesystem gone from its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_outage: Option<crate::engine::watch::StoreOutage>,
    /// Daemon log lines held in memory because the log could not be written (a full
    /// store), and why (`logfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_held: Option<(u64, String)>,
    /// The public id of the repository's key when it is encrypted (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_id: Option<String>,
}

/// A point as a monitor sees it: which, and how long ago.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointAge {
    pub name: String,
    pub state: RefState,
    pub created_unix: u64,
    /// Seconds since it was created, or for a backup since it finished.
    pub age_secs: u64,
}

/// One disk in `status`. An unavailable disk has only its name, image and `tracking`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    pub name: String,
    /// None when the record of an unavailable disk cannot be read either.
    pub image: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_seq: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracked_since_seq: Option<u32>,
    /// One human line: ok, recovered, restarted (and why), or unavailable (and why).
    pub tracking: String,
    /// Persistent, unlike `tracking`: why changes before `tracked_since_seq` are unknown
    /// (empty when tracking never restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracker_memory_bytes: Option<u64>,
    /// Bytes its tracking files (map and log) take on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_bytes: Option<u64>,
    /// The newest point of any state that holds this disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_point: Option<PointAge>,
    /// The newest restorable point that holds this disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_backup: Option<PointAge>,
    /// The last backup attempt (every backup covers every disk, so the store's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<LastBackup>,
}

/// Carry out a request on the engine.
///
/// # Errors
/// Whatever the operation reports.
pub fn execute(engine: &Engine, req: &Request) -> Result<Box<RawValue>> {
    execute_with(engine, req, &NoProgress)
}

/// `execute`, reporting the progress of long operations (a backup) to `progress`.
///
/// # Errors
/// Whatever the operation reports.
pub fn execute_with(
    engine: &Engine,
    req: &Request,
    progress: &dyn Progress,
) -> Result<Box<RawValue>> {
    // Serialized once, straight from the typed result: a changes reply can hold hundreds of
    // thousands of extents, and a `Value` tree of them costs more than the query.
    fn raw<T: Serialize + ?Sized>(v: &T) -> Box<RawValue> {
        serde_json::value::to_raw_value(v).expect("replies serialize")
    }
    Ok(match req {
        Request::RefCreate {
            name,
            owner,
            checkpoint,
        } => raw(&engine.ref_create(name, owner.as_deref(), point_state(*checkpoint))?),
        Request::RefDelete { name } => raw(&backup::manage::delete(engine, name)?),
        Request::RefDemote { name } => raw(&backup::manage::demote(engine, name)?),
        Request::Backup {
            name,
            full,
            since,
            owner,
        } => raw(&backup::outcome::backup_recorded(
            engine,
            name,
            owner.as_deref(),
            *full,
            since.as_deref(),
            progress,
        )?),
        Request::Prune(args) => raw(&backup::manage::prune(engine, args)?),
        Request::Changes { since, disk } => raw(&engine.changes(since, disk.as_deref())?),
        Request::DiskAdd { name, image } => raw(&engine.disk_add(name, image)?),
        Request::DiskRemove { name } => {
            engine.disk_remove(name)?;
            raw(&())
        }
        Request::Restore {
            point,
            disk,
            to,
            force,
        } => raw(&backup::restore::restore(
            engine.store(),
            &engine.backup_state().data,
            point,
            disk,
            to,
            *force,
            progress,
        )?),
        Request::Verify {
            point,
            repair,
            from,
        } => raw(&verify_on(
            engine,
            point.as_deref(),
            *repair,
            from,
            progress,
        )?),
        Request::Status => raw(&engine_status(engine)?),
        Request::Send(_) | Request::Receive(_) => {
            return Err(Error::Internal(
                "send and receive carry a stream: run them with `stream_request`".into(),
            ));
        }
        Request::ReceiveAbort => raw(&crate::replicate::receive::abort(engine)?),
        Request::ReplicaPromote { disk } => raw(&engine.replica_promote(disk)?),
        Request::ReplicaForget { disk } => raw(&replica_forget_on(engine, disk)?),
        Request::Ping => raw(&Pong {
            pid: std::process::id(),
            store: engine.store().root().to_path_buf(),
        }),
    })
}

fn point_state(checkpoint: bool) -> RefState {
    if checkpoint {
        RefState::Checkpoint
    } else {
        RefState::Plain
    }
}

fn engine_status(engine: &Engine) -> Result<Status> {
    let store = engine.store();
    let refs = store.refs()?;
    let mut disks: Vec<DiskStatus> = engine
        .disks()
        .iter()
        .map(|d| {
            let t = d.tracker();
            let tracking = match &t.report().lost {
                Some(r) => format!("restarted: {r}"),
                None if t.report().recovered_regions > 0 || t.report().unproven_blocks > 0 => {
                    let r = t.report();
                    let outside = if r.unproven_blocks > 0 {
                        format!(
                            ", and {} block(s) whose bytes no longer match their digest",
                            r.unproven_blocks
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "recovered after an unclean stop ({} regions counted as changed{outside})",
                        r.recovered_regions
                    )
                }
                // Restarted in an earlier session: older points stay unusable, say why.
                None if !t.lost_reason().is_empty() => format!(
                    "ok since seq {} (restarted: {})",
                    t.base_seq(),
                    t.lost_reason()
                ),
                None => "ok".to_string(),
            };
            DiskStatus {
                name: d.name().to_string(),
                image: Some(d.image().to_path_buf()),
                size: Some(d.size()),
                block_size: Some(t.block_size()),
                current_seq: Some(t.current_seq()),
                tracked_since_seq: Some(t.base_seq()),
                tracking,
                restart_reason: Some(t.lost_reason().to_string()),
                tracker_memory_bytes: Some(t.map().memory_bytes()),
                tracking_bytes: Some(
                    disk_usage(&store.map_path(d.name()), None)
                        + disk_usage(&store.log_path(d.name()), None),
                ),
                newest_point: None,
                newest_backup: None,
                last_backup: None,
            }
        })
        .collect();
    for (name, why) in engine.unavailable() {
        let image = store.read_disk(&name).map(|r| r.image).ok();
        disks.push(DiskStatus {
            name,
            image,
            size: None,
            block_size: None,
            current_seq: None,
            tracked_since_seq: None,
            tracking: format!("unavailable: {why}"),
            restart_reason: None,
            tracker_memory_bytes: None,
            tracking_bytes: None,
            newest_point: None,
            newest_backup: None,
            last_backup: None,
        });
    }
    let last_backup = backup::outcome::read(store)
        .unwrap_or_else(|e| {
            log::warn!("{e}");
            None
        })
        .map(backup::outcome::as_seen_by_owner);
    let now = crate::store::now_unix();
    for d in &mut disks {
        let holding = || refs.iter().rev().filter(|r| r.disks.contains_key(&d.name));
        let age = |r: &RefRecord, at: u64| PointAge {
            name: r.name.clone(),
            state: r.state,
            created_unix: r.created_unix,
            age_secs: now.saturating_sub(at),
        };
        d.newest_point = holding().next().map(|r| age(r, r.created_unix));
        d.newest_backup = holding()
            .find(|r| r.state == RefState::Restorable)
            .map(|r| {
                age(
                    r,
                    r.backup
                        .as_ref()
                        .map_or(r.created_unix, |b| b.finished_unix),
                )
            });
        d.last_backup = last_backup.clone();
    }
    Ok(Status {
        store: store.root().to_path_buf(),
        store_id: store.meta().id.clone(),
        block_size: store.block_size(),
        repository: store
            .repository()
            .map_or_else(|| store.repo_dir().display().to_string(), str::to_string),
        disks,
        refs: refs.len(),
        restorable: refs
            .iter()
            .filter(|r| r.state == RefState::Restorable)
            .count(),
        space: backup::data::space(store, &engine.backup_state().data, &refs)?,
        store_bytes: disk_usage(store.root(), None),
        last_backup,
        store_outage: engine.store_outage(),
        log_held: crate::logfile::held(),
        encryption_key_id: engine.backup_state().data.repo.config().key_id.clone(),
    })
}

/// Bytes a file or a directory tree takes on disk (allocated blocks; symlinks not followed,
/// nor other filesystems: a mount point inside the store must not count the VM's images).
/// What cannot be read counts as nothing: this is for monitors, not accounting.
fn disk_usage(path: &Path, dev: Option<u64>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if dev.is_some_and(|d| d != m.dev()) {
        return 0;
    }
    let mut n = m.blocks() * 512;
    if m.is_dir()
        && let Ok(rd) = std::fs::read_dir(path)
    {
        n += rd
            .flatten()
            .map(|e| disk_usage(&e.path(), Some(m.dev())))
            .sum::<u64>();
    }
    n
}

/// The typed operations commands call: each runs its request on the store's owner.
///
/// # Errors
/// Whatever the operation reports, the same variant whichever process carried it out.
pub fn ref_create(
    store: &Store,
    name: &str,
    owner: Option<&str>,
    checkpoint: bool,
) -> Result<RefRecord> {
    let req = Request::RefCreate {
        name: name.to_string(),
        owner: owner.map(str::to_string),
        checkpoint,
    };
    run_typed(store, &req, |e| {
        e.ref_create(name, owner, point_state(checkpoint))
    })
}

/// What `ref_delete` removed.
#[derive(Debug, Clone, PartialEq)]
pub enum Deleted {
    Point(RefRecord),
    /// A record that does not decode (see `ref_delete`).
    DamagedRecord,
}

/// See `ref_create`. A damaged record stops the engine from opening at all (it cannot know
/// which numbers the point held), so it is removed directly, under the store lock; its
/// backup data, if any, is collected at the next open.
///
/// # Errors
/// As `backup::manage::delete`; `Locked` for a damaged record while the store is in use.
pub fn ref_delete(store: &Store, name: &str) -> Result<Deleted> {
    let rec = match store.read_ref(name) {
        Err(Error::Format { .. }) => {
            backup::manage::delete_damaged_record(store, name)?;
            return Ok(Deleted::DamagedRecord);
        }
        r => r?,
    };
    // A format 1 store opens only through its upgrade, which a damaged point stops: deleting
    // the point's record (its data goes with the upgrade's removal of format 1 files) is the
    // way out, so it must not need the engine.
    if store.format() < crate::store::STORE_FORMAT {
        backup::manage::delete_damaged_record(store, name)?;
        return Ok(Deleted::Point(rec));
    }
    let req = Request::RefDelete {
        name: name.to_string(),
    };
    run_typed(store, &req, |e| backup::manage::delete(e, name)).map(Deleted::Point)
}

/// See `ref_create`.
///
/// # Errors
/// As `backup::manage::demote`.
pub fn ref_demote(store: &Store, name: &str) -> Result<RefRecord> {
    let req = Request::RefDemote {
        name: name.to_string(),
    };
    run_typed(store, &req, |e| backup::manage::demote(e, name))
}

/// See `ref_create`. Progress is reported only when the backup runs in this process (a
/// daemon's is not shown).
///
/// # Errors
/// As `backup::run::backup`.
pub fn backup(
    store: &Store,
    name: &str,
    owner: Option<&str>,
    full: bool,
    since: Option<&str>,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let req = Request::Backup {
        name: name.to_string(),
        full,
        since: since.map(str::to_string),
        owner: owner.map(str::to_string),
    };
    let started = std::time::SystemTime::now();
    let r = run_typed(store, &req, |e| {
        backup::outcome::backup_recorded(e, name, owner, full, since, progress)
    });
    if let Err(e) = &r {
        backup::outcome::record_if_unrecorded(store, name, owner, started, e);
    }
    r
}

/// See `ref_create`.
///
/// # Errors
/// As `backup::manage::prune`.
pub fn prune(store: &Store, args: &PruneArgs) -> Result<PruneReport> {
    run_typed(store, &Request::Prune(args.clone()), |e| {
        backup::manage::prune(e, args)
    })
}

/// See `ref_create`. Typed all the way: a 1 TiB disk can have hundreds of thousands of
/// extents.
///
/// # Errors
/// As `Engine::changes`.
pub fn changes(store: &Store, since: &str, disk: Option<&str>) -> Result<Vec<DiskChanges>> {
    let req = Request::Changes {
        since: since.to_string(),
        disk: disk.map(str::to_string),
    };
    run_typed(store, &req, |e| e.changes(since, disk))
}

/// See `ref_create`.
///
/// # Errors
/// As `Engine::disk_add`.
pub fn disk_add(store: &Store, name: &str, image: &Path) -> Result<DiskRecord> {
    let req = Request::DiskAdd {
        name: name.to_string(),
        image: image.to_path_buf(),
    };
    run_typed(store, &req, |e| e.disk_add(name, image))
}

/// See `ref_create`.
///
/// # Errors
/// As `Engine::disk_remove`.
pub fn disk_remove(store: &Store, name: &str) -> Result<()> {
    let req = Request::DiskRemove {
        name: name.to_string(),
    };
    run_typed(store, &req, |e| e.disk_remove(name))
}

/// See `ref_create`.
///
/// # Errors
/// As `Engine::open` and the queries it makes.
pub fn status(store: &Store) -> Result<Status> {
    run_typed(store, &Request::Status, engine_status)
}

/// Restore a point's disk to `to`, in the daemon when one is mounted, else here.
///
/// Unlike the requests above, without a daemon this runs on the store directly, not on an
/// engine: it only reads backup data, so it needs no store lock, and taking one would make a
/// restore fail beside another command (or a damaged record) that it does not depend on.
///
/// # Errors
/// As `backup::restore::restore`.
pub fn restore(
    store: &Store,
    point: &str,
    disk: &str,
    to: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    // The daemon runs in `/`: it must be told where `to` is from here.
    let abs = std::path::absolute(to).map_err(Error::io("resolve", to))?;
    let req = Request::Restore {
        point: point.to_string(),
        disk: disk.to_string(),
        to: abs,
        force,
    };
    run_read_only(store, &req, || {
        let data = std::sync::Arc::new(backup::Data::open(store)?);
        backup::restore::restore(store, &data, point, disk, to, force, progress)
    })
}

/// Verify one point or all, in the daemon when one is mounted, else here (read-only on the
/// store, as `restore`).
///
/// # Errors
/// As `backup::verify::verify`.
pub fn verify(
    store: &Store,
    point: Option<&str>,
    repair: bool,
    from: &[PathBuf],
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let from = from
        .iter()
        .map(|p| std::path::absolute(p).map_err(crate::Error::io("resolve", p)))
        .collect::<Result<Vec<_>>>()?;
    let req = Request::Verify {
        point: point.map(str::to_string),
        repair,
        from: from.clone(),
    };
    if repair {
        // Reads live disks and writes the repository: the store's owner does it.
        return run_typed(store, &req, |e| verify_on(e, point, true, &from, progress));
    }
    run_read_only(store, &req, || {
        let data = std::sync::Arc::new(backup::Data::open(store)?);
        backup::verify::verify(store, &data, point, progress)
    })
}

fn verify_on(
    engine: &Engine,
    point: Option<&str>,
    repair: bool,
    from: &[PathBuf],
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let data = &engine.backup_state().data;
    if repair {
        let _op = engine.lock_ops();
        let disks = engine.disks();
        let sources = backup::heal::Sources::new(engine.store(), data, &disks, from)?;
        backup::heal::repair(engine.store(), data, &sources, point, progress)
    } else {
        backup::verify::verify(engine.store(), data, point, progress)
    }
}

/// Who serves the store's control socket, if anyone.
///
/// # Errors
/// `Locked` when nothing answers; as `call`.
pub fn ping(store: &Store) -> Result<Pong> {
    call(store, &Request::Ping)
}

/// One request line on the wire.
#[derive(Serialize, Deserialize)]
struct RequestLine<R> {
    v: u32,
    request: R,
}

/// One reply line on the wire. `reply` holds the typed answer or the error.
#[derive(Serialize, Deserialize)]
struct ReplyLine<T> {
    v: u32,
    reply: Reply<T>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Reply<T> {
    Ok(T),
    Error(WireError<Box<RawValue>>),
}

/// An error on the wire: the typed error (`E` is `Error` when sent; read back raw, so that a
/// kind this vmref does not know still leaves the text to print).
#[derive(Serialize, Deserialize)]
struct WireError<E> {
    kind: E,
    message: String,
}

/// What any reply line, of any version, says about itself: enough to explain a reply that
/// does not parse as this version's.
#[derive(Deserialize)]
struct ReplyHeader {
    #[serde(default)]
    v: u32,
    /// Before versioning, errors came back as `{"error": "text"}`.
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// Send a request to the daemon owning `store` and parse the answer straight into `T` (no
/// intermediate tree for large replies).
///
/// # Errors
/// `Locked` when nothing answers on the socket (another non-daemon process holds the lock);
/// the daemon's error as the same `Error` variant; `Protocol` for a daemon of another
/// protocol version, `Daemon` for a reply that cannot be understood.
pub fn call<T: DeserializeOwned>(store: &Store, req: &Request) -> Result<T> {
    let path = store.socket_path();
    let s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) => return Err(Error::Locked(store.root().to_path_buf())),
    };
    call_on(s, &path, req)
}

fn call_on<T: DeserializeOwned>(mut s: UnixStream, path: &Path, req: &Request) -> Result<T> {
    write_request(&mut s, path, req)?;
    read_reply(&mut BufReader::new(s), path)
}

fn unreadable(reply: &str, path: &Path) -> Error {
    match serde_json::from_str::<ReplyHeader>(reply) {
        Ok(h) if h.v != PROTOCOL => Error::Protocol {
            daemon: h.v,
            client: PROTOCOL,
        },
        Ok(ReplyHeader {
            error: Some(serde_json::Value::String(e)),
            ..
        }) => Error::Daemon(e),
        _ => Error::Daemon(format!(
            "unreadable reply from {}: {:?}",
            path.display(),
            reply.chars().take(200).collect::<String>()
        )),
    }
}

/// Run `req` on the store's owner and get a typed answer: `direct` runs it in this process
/// when the store is free (without a JSON round trip), else the daemon carries out `req`.
///
/// # Errors
/// What `direct` or the daemon reports; `Locked` when another command holds the store.
pub fn run_typed<T: DeserializeOwned>(
    store: &Store,
    req: &Request,
    direct: impl FnOnce(&Engine) -> Result<T>,
) -> Result<T> {
    match Engine::open(store.clone()) {
        Ok(engine) => {
            let v = direct(&engine)?;
            engine.close()?;
            Ok(v)
        }
        Err(Error::Locked(_)) => call(store, req),
        Err(e) => Err(e),
    }
}

/// Run a read-only request in the daemon when one answers, else `direct` here, with no
/// engine and no lock (see `restore`).
fn run_read_only<T: DeserializeOwned>(
    store: &Store,
    req: &Request,
    direct: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let path = store.socket_path();
    match UnixStream::connect(&path) {
        Ok(s) => call_on(s, &path, req),
        Err(_) => direct(),
    }
}

/// Serve requests on the control socket until the listener is closed. One thread per
/// connection: requests are short, and a slow one (a backup) must not stall `ref list`.
pub fn serve(engine: Arc<Engine>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let engine = engine.clone();
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            let mut r = BufReader::new(&conn);
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                return;
            }
            let result = match parse_request(&line) {
                Ok(Request::Send(args)) => serve_send(&engine, &args, &conn),
                Ok(Request::Receive(args)) => {
                    // A stream may pause for as long as its sender does.
                    let _ = conn.set_read_timeout(None);
                    let mut input = FrameReader::new(&mut r);
                    crate::replicate::receive::receive(&*engine, &args, &mut input).map(|rep| {
                        serde_json::value::to_raw_value(&rep).expect("replies serialize")
                    })
                }
                Ok(req) => execute(&engine, &req),
                Err(e) => Err(e),
            };
            let reply = match result {
                Ok(v) => Reply::Ok(v),
                Err(e) => Reply::Error(wire_error(&e)),
            };
            let mut out =
                serde_json::to_vec(&ReplyLine { v: PROTOCOL, reply }).expect("replies serialize");
            out.push(b'\n');
            let _ = (&conn).write_all(&out);
        });
    }
}

/// Write the stream of a `send` to the client, framed, then end the frames (the reply line
/// follows, written by the caller).
fn serve_send(engine: &Engine, args: &SendArgs, conn: &UnixStream) -> Result<Box<RawValue>> {
    let mut fw = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, conn));
    let r = crate::replicate::send::send(engine, args, &mut fw);
    fw.finish()
        .map_err(Error::io("write to", "the control socket"))?;
    r.map(|rep| serde_json::value::to_raw_value(&rep).expect("replies serialize"))
}

fn replica_forget_on(engine: &Engine, disk: &str) -> Result<()> {
    let _op = engine.lock_ops();
    let store = engine.store();
    // An interrupted apply is finished first: the image left behind is then a whole point.
    crate::replicate::replica::finish_interrupted(store, &engine.backup_state().data)?;
    match store.replica(disk)? {
        Some(_) => store.remove_replica(disk),
        None => Err(Error::Replication(format!(
            "this store keeps no replica of disk {disk}"
        ))),
    }
}

/// Run `direct` on an engine of this process when the store is free; else send `req` to the
/// daemon and let `remote` carry the stream beside it and read the reply. `io` (the stream's
/// source or sink) goes to whichever runs.
fn run_streaming<T, I>(
    store: &Store,
    req: &Request,
    io: I,
    direct: impl FnOnce(&Engine, I) -> Result<T>,
    remote: impl FnOnce(UnixStream, &Path, I) -> Result<T>,
) -> Result<T> {
    match Engine::open(store.clone()) {
        Ok(engine) => {
            let v = direct(&engine, io)?;
            engine.close()?;
            Ok(v)
        }
        Err(Error::Locked(_)) => {
            let path = store.socket_path();
            let mut s = UnixStream::connect(&path)
                .map_err(|_| Error::Locked(store.root().to_path_buf()))?;
            write_request(&mut s, &path, req)?;
            remote(s, &path, io)
        }
        Err(e) => Err(e),
    }
}

/// `send`: in this process when the store is free, else streamed by the daemon (framed on
/// the socket) and copied to `out` here.
///
/// # Errors
/// As `replicate::send::send`; a closed `out` is one line (the receiving end closed).
pub fn send(store: &Store, args: &SendArgs, out: &mut dyn Write) -> Result<SendReport> {
    run_streaming(
        store,
        &Request::Send(args.clone()),
        out,
        |e, out| crate::replicate::send::send(e, args, out),
        |s, path, out| {
            let mut r = BufReader::with_capacity(1 << 20, s);
            let mut frames = FrameReader::new(&mut r);
            let mut buf = vec![0u8; crate::replicate::framing::CHUNK];
            loop {
                let n = std::io::Read::read(&mut frames, &mut buf)
                    .map_err(Error::io("read from the daemon at", path))?;
                if n == 0 {
                    break;
                }
                if let Err(e) = out.write_all(&buf[..n]) {
                    // Dropping the socket makes the daemon's send fail: a checkpoint it sends
                    // is then not recorded as sent.
                    return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                        Error::Replication("the receiving end closed the stream".into())
                    } else {
                        Error::io("write", "the stream")(e)
                    });
                }
            }
            out.flush().map_err(Error::io("write", "the stream"))?;
            read_reply(&mut r, path)
        },
    )
}

/// `receive`: in this process when the store is free, else the stream is sent to the daemon
/// (framed) and it receives it.
///
/// # Errors
/// As `replicate::receive::receive`.
pub fn receive(
    store: &Store,
    args: &ReceiveArgs,
    input: &mut dyn std::io::Read,
) -> Result<ReceiveReport> {
    run_streaming(
        store,
        &Request::Receive(args.clone()),
        input,
        |e, input| crate::replicate::receive::receive(e, args, input),
        |s, path, input| {
            {
                let mut fw = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, &s));
                let mut buf = vec![0u8; crate::replicate::framing::CHUNK];
                // The daemon answers early when it refuses the stream; its reply is then read
                // below, whatever this copy ran into.
                let copied = (|| -> std::io::Result<()> {
                    loop {
                        let n = match input.read(&mut buf) {
                            Ok(0) => return fw.finish().map(|_| ()),
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e),
                        };
                        fw.write_all(&buf[..n])?;
                    }
                })();
                if let Err(e) = copied {
                    log::debug!("sending the stream to the daemon stopped: {e}");
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
            read_reply(&mut BufReader::new(s), path)
        },
    )
}

/// See `ref_create`.
///
/// # Errors
/// As `replicate::receive::abort`.
pub fn receive_abort(store: &Store) -> Result<AbortReport> {
    run_typed(store, &Request::ReceiveAbort, |e| {
        crate::replicate::receive::abort(e)
    })
}

/// See `ref_create`.
///
/// # Errors
/// As `Engine::replica_promote`.
pub fn replica_promote(store: &Store, disk: &str) -> Result<DiskRecord> {
    let req = Request::ReplicaPromote {
        disk: disk.to_string(),
    };
    run_typed(store, &req, |e| e.replica_promote(disk))
}

/// See `ref_create`.
///
/// # Errors
/// No replica of that disk; I/O failures.
pub fn replica_forget(store: &Store, disk: &str) -> Result<()> {
    let req = Request::ReplicaForget {
        disk: disk.to_string(),
    };
    run_typed(store, &req, |e| replica_forget_on(e, disk))
}

fn write_request(s: &mut UnixStream, path: &Path, req: &Request) -> Result<()> {
    let mut line = serde_json::to_vec(&RequestLine {
        v: PROTOCOL,
        request: req,
    })
    .expect("requests serialize");
    line.push(b'\n');
    s.write_all(&line)
        .map_err(Error::io("talk to the daemon at", path))
}

fn read_reply<T: DeserializeOwned>(r: &mut impl BufRead, path: &Path) -> Result<T> {
    let mut reply = String::new();
    r.read_line(&mut reply)
        .map_err(Error::io("read from the daemon at", path))?;
    parse_reply(&reply, path)
}

fn parse_reply<T: DeserializeOwned>(reply: &str, path: &Path) -> Result<T> {
    match serde_json::from_str::<ReplyLine<T>>(reply) {
        Ok(ReplyLine { v, .. }) if v != PROTOCOL => Err(Error::Protocol {
            daemon: v,
            client: PROTOCOL,
        }),
        Ok(ReplyLine {
            reply: Reply::Ok(v),
            ..
        }) => Ok(v),
        Ok(ReplyLine {
            reply: Reply::Error(e),
            ..
        }) => Err(serde_json::from_str::<Error>(e.kind.get()).unwrap_or(Error::Daemon(e.message))),
        Err(_) => Err(unreadable(reply, path)),
    }
}

fn wire_error(e: &Error) -> WireError<Box<RawValue>> {
    WireError {
        kind: serde_json::value::to_raw_value(e).expect("errors serialize"),
        message: e.to_string(),
    }
}

fn parse_request(line: &str) -> Result<Request> {
    #[derive(Deserialize)]
    struct Version {
        #[serde(default)]
        v: u32,
    }
    match serde_json::from_str::<RequestLine<Request>>(line) {
        Ok(r) if r.v == PROTOCOL => Ok(r.request),
        Ok(r) => Err(Error::Protocol {
            daemon: PROTOCOL,
            client: r.v,
        }),
        Err(e) => match serde_json::from_str::<Version>(line) {
            Ok(h) if h.v != PROTOCOL => Err(Error::Protocol {
                daemon: PROTOCOL,
                client: h.v,
            }),
            _ => Err(Error::Daemon(format!("bad request: {e}"))),
        },
    }
}

/// Bind the control socket, replacing a stale one left by a dead daemon (we hold the lock,
/// so nobody else is listening). The socket is 0600: only the store's owner may steer it.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(Error::io("bind", path))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io("chmod", path))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::retention::Policy;

    #[test]
    fn prune_request_round_trips_on_the_wire() {
        let req = Request::Prune(PruneArgs {
            policy: Policy {
                keep_daily: Some(7),
                keep_last: Some(2),
                ..Policy::default()
            },
            owner: Some("veeam".into()),
            dry_run: true,
            tz: Some("Europe/Berlin".into()),
        });
        let line = serde_json::to_string(&RequestLine {
            v: PROTOCOL,
            request: &req,
        })
        .unwrap();
        assert!(line.contains(r#""op":"prune""#), "{line}");
        assert!(line.contains(r#""keep_daily":7"#), "{line}");
        assert_eq!(parse_request(&line).unwrap(), req);
        // A request of protocol 1 is refused, not carried out with missing fields.
        let old = r#"{"v":1,"request":{"op":"prune","keep_last":3}}"#;
        assert!(matches!(parse_request(old), Err(Error::Protocol { .. })));
    }
}
