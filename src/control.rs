//! The control protocol: what a command asks of the store's owner, carried out by
//! `execute` either in the command's own process (no daemon) or in the mounted daemon, which
//! receives the same request as one JSON line on `STORE/control.sock` and answers with one
//! JSON line `{"ok": …}` or `{"error": "…"}`. One code path, two transports.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::backup::{self, NoProgress, Progress};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::store::Store;
use crate::store::records::RefState;

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
    },
    /// Delete all but the newest `keep_last` restorable points.
    Prune {
        keep_last: u32,
    },
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
    Status,
    Ping,
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
    let store = engine.store();
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
        } => {
            let state = if *checkpoint {
                RefState::Checkpoint
            } else {
                RefState::Plain
            };
            raw(&engine.ref_create(name, owner.as_deref(), state)?)
        }
        Request::RefDelete { name } => raw(&backup::manage::delete(engine, name)?),
        Request::RefDemote { name } => raw(&backup::manage::demote(engine, name)?),
        Request::Backup { name, full, since } => raw(&backup::run::backup(
            engine,
            name,
            *full,
            since.as_deref(),
            progress,
        )?),
        Request::Prune { keep_last } => raw(&backup::manage::prune(engine, *keep_last)?),
        Request::Changes { since, disk } => raw(&engine.changes(since, disk.as_deref())?),
        Request::DiskAdd { name, image } => raw(&engine.disk_add(name, image)?),
        Request::DiskRemove { name } => {
            engine.disk_remove(name)?;
            raw(&())
        }
        Request::Status => raw(&status(engine)?),
        Request::Ping => raw(&json!({"pid": std::process::id(), "store": store.root()})),
    })
}

fn status(engine: &Engine) -> Result<Value> {
    let store = engine.store();
    let refs = store.refs()?;
    let mut disks: Vec<Value> = engine
        .disks()
        .iter()
        .map(|d| {
            let t = d.tracker();
            json!({
                "name": d.name(),
                "image": d.image(),
                "size": d.size(),
                "block_size": t.block_size(),
                "current_seq": t.current_seq(),
                "tracked_since_seq": t.base_seq(),
                "tracking": match &t.report().lost {
                    Some(r) => format!("restarted: {r}"),
                    None if t.report().recovered_regions > 0 => format!(
                        "recovered after an unclean stop ({} regions counted as changed)",
                        t.report().recovered_regions
                    ),
                    // Restarted in an earlier session: older points stay unusable, say why.
                    None if !t.lost_reason().is_empty() => format!(
                        "ok since seq {} (restarted: {})",
                        t.base_seq(),
                        t.lost_reason()
                    ),
                    None => "ok".to_string(),
                },
                // Persistent, unlike `tracking`: why changes before `tracked_since_seq` are
                // unknown (empty when tracking never restarted).
                "restart_reason": t.lost_reason(),
                "tracker_memory_bytes": t.map().memory_bytes(),
            })
        })
        .collect();
    for (name, why) in engine.unavailable() {
        let image = store.read_disk(&name).map(|r| r.image).ok();
        disks.push(json!({
            "name": name,
            "image": image,
            "tracking": format!("unavailable: {why}"),
        }));
    }
    Ok(json!({
        "store": store.root(),
        "store_id": store.meta().id,
        "block_size": store.block_size(),
        "disks": disks,
        "refs": refs.len(),
        "restorable": refs.iter().filter(|r| r.state == RefState::Restorable).count(),
    }))
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Reply<T = Value> {
    Ok(T),
    Error(String),
}

/// Send a request to the daemon owning `store`.
///
/// # Errors
/// `Locked` when nothing answers on the socket (another non-daemon process holds the lock);
/// the daemon's own error text as `Daemon`.
pub fn call(store: &Store, req: &Request) -> Result<Value> {
    call_typed(store, req)
}

/// `call`, parsing the answer straight into `T` (no intermediate `Value` for large replies).
///
/// # Errors
/// As `call`.
pub fn call_typed<T: DeserializeOwned>(store: &Store, req: &Request) -> Result<T> {
    let path = store.socket_path();
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) => return Err(Error::Locked(store.root().to_path_buf())),
    };
    let io = Error::io("talk to the daemon at", &path);
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut r = BufReader::new(s);
    let mut reply = String::new();
    r.read_line(&mut reply)
        .map_err(Error::io("read from the daemon at", &path))?;
    match serde_json::from_str::<Reply<T>>(&reply) {
        Ok(Reply::Ok(v)) => Ok(v),
        Ok(Reply::Error(e)) => Err(Error::Daemon(e)),
        Err(_) => Err(Error::Daemon(format!(
            "unreadable reply from {}: {:?}",
            path.display(),
            reply.chars().take(200).collect::<String>()
        ))),
    }
}

/// Run `req` on the store's owner and get a typed answer: `direct` runs it in this process
/// when the store is free (without a JSON round trip), else the daemon carries out `req`.
///
/// # Errors
/// As `run`.
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
        Err(Error::Locked(_)) => call_typed(store, req),
        Err(e) => Err(e),
    }
}

/// Run `req` on the store's owner: in this process when the store is free, else through the
/// mounted daemon.
pub fn run(store: &Store, req: &Request) -> Result<Value> {
    run_with(store, req, &NoProgress)
}

/// `run`, reporting progress when the request runs in this process (a daemon's progress is
/// not shown).
///
/// # Errors
/// As `run`.
pub fn run_with(store: &Store, req: &Request, progress: &dyn Progress) -> Result<Value> {
    run_typed(store, req, |engine| {
        let raw = execute_with(engine, req, progress)?;
        Ok(serde_json::from_str(raw.get()).expect("a reply parses"))
    })
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
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(req) => match execute(&engine, &req) {
                    Ok(v) => Reply::Ok(v),
                    Err(e) => Reply::Error(e.to_string()),
                },
                Err(e) => Reply::Error(format!("bad request: {e}")),
            };
            let mut out = serde_json::to_vec(&reply).expect("replies serialize");
            out.push(b'\n');
            let _ = (&conn).write_all(&out);
        });
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
