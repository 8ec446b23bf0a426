//! Repository locks: how writers (backups, receives, repairs) and a collector of one shared
//! repository keep out of each other's way with nothing but PUT, LIST and DELETE, which every
//! S3 server gives with read-after-write (conditional writes are not relied on: Garage 2.5
//! overwrites on `If-None-Match: *`).
//!
//! A lock is an object `locks/<random>` (an envelope: shared or exclusive, host, boot id, pid
//! and the pid's start time, store id, what for). Each side PUTs its lock *before* it LISTs the
//! others:
//! - a writer that sees a live exclusive lock removes its own and waits, then tries again;
//! - a collector that sees any other live lock removes its own and does not collect.
//!
//! If a writer's listing misses a collector's lock, the collector's PUT came after that
//! listing, hence after the writer's PUT, so the collector's listing shows the writer's lock.
//! So a collector that goes on deletes while no writer is between its first index lookup and
//! its published point.
//!
//! A lock is not live when its holder is known dead: the same boot of this host (boot id) and
//! a pid that is gone or was started later (a kill -9 leaves its lock behind); or when it is
//! older than `STALE_AFTER` by the backend's clock (a host that died). Holders rewrite their
//! lock every `REFRESH_EVERY` so a long backup never looks dead, and check it is still there
//! before they commit (`RepoLock::check`): a writer that stalled past the stale age fails
//! instead of committing over blobs a collection may have deleted.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, Kind};
use crate::repo::backend::Backend;

pub const LOCK: Kind = Kind {
    magic: b"VMREFLCK",
    major: 1,
    minor: 0,
};
pub const LOCKS: &str = "locks/";
/// A lock not rewritten for this long belongs to a host that died.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// How often a holder rewrites its lock: well inside `STALE_AFTER`.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// How often a waiting writer looks again.
const POLL: Duration = Duration::from_millis(200);

/// What a lock object says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub exclusive: bool,
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id`: the same boot of the same host.
    pub boot_id: String,
    pub pid: u32,
    /// The pid's start time (clock ticks since boot), so a reused pid is not taken for it.
    pub pid_start: u64,
    pub store_id: String,
    pub what: String,
    /// The holder's PID namespace (`/proc/self/ns/pid`): a container shares the host's boot
    /// id but not its pids.
    #[serde(default)]
    pub pid_ns: String,
}

pub fn encode(l: &LockInfo) -> Vec<u8> {
    format::encode(LOCK, l)
}

/// # Errors
/// `FormatError` for damaged bytes.
pub fn decode(b: &[u8]) -> std::result::Result<LockInfo, format::FormatError> {
    format::decode(LOCK, b)
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of `/proc/PID/stat`: when the process started. None: no such process.
fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn pid_ns() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl LockInfo {
    fn mine(exclusive: bool, store_id: &str, what: &str) -> LockInfo {
        let pid = std::process::id();
        LockInfo {
            exclusive,
            host: hostname(),
            boot_id: boot_id(),
            pid,
            pid_start: start_time(pid).unwrap_or(0),
            store_id: store_id.to_string(),
            what: what.to_string(),
            pid_ns: pid_ns(),
        }
    }

    /// Whether the holder is known to be dead: same boot of this host, same hostname and PID
    /// namespace, and its process is gone, or is visibly another one now. A process this one
    /// cannot see (`hidepid`) counts as alive.
    fn holder_dead(&self) -> bool {
        if self.boot_id.is_empty()
            || self.boot_id != boot_id()
            || self.host != hostname()
            || self.pid_ns.is_empty()
            || self.pid_ns != pid_ns()
        {
            return false;
        }
        if crate::sys::process_gone(self.pid) {
            return true;
        }
        start_time(self.pid).is_some_and(|t| t != self.pid_start)
    }

    fn describe(&self) -> String {
        format!(
            "{} by {} (pid {}, store {})",
            self.what, self.host, self.pid, self.store_id
        )
    }
}

/// Another lock found live.
#[derive(Debug, Clone)]
pub struct Other {
    pub name: String,
    /// None: unreadable (damaged, or sealed under another key); taken as exclusive.
    pub info: Option<LockInfo>,
}

impl Other {
    fn exclusive(&self) -> bool {
        self.info.as_ref().is_none_or(|i| i.exclusive)
    }

    fn describe(&self) -> String {
        match &self.info {
            Some(i) => i.describe(),
            None => format!("an unreadable lock {}", self.name),
        }
    }
}

/// Every live lock but `mine`. Locks of dead holders are deleted on the way (best effort).
///
/// # Errors
/// Listing failures.
pub fn live_locks(backend: &dyn Backend, mine: Option<&str>) -> Result<Vec<Other>> {
    let mut out = Vec::new();
    for (name, age) in backend.list_aged(LOCKS)? {
        if Some(name.as_str()) == mine {
            continue;
        }
        let info = match backend.get(&name) {
            Ok(b) => decode(&b).ok(),
            // Released since the listing.
            Err(e) if crate::repo::backend::is_missing(&e) => continue,
            // Damaged, or sealed under another key: nobody can say it is dead.
            Err(Error::Format { .. }) => None,
            Err(e) => return Err(e),
        };
        let dead = age > STALE_AFTER || info.as_ref().is_some_and(LockInfo::holder_dead);
        if dead {
            log::info!(
                "removing the stale repository lock {name} ({})",
                info.as_ref()
                    .map_or_else(|| "unreadable".into(), LockInfo::describe)
            );
            let _ = backend.delete(&name);
            continue;
        }
        out.push(Other { name, info });
    }
    Ok(out)
}

struct Refresh {
    stop: Mutex<bool>,
    cv: Condvar,
}

/// A held lock; dropping it removes the lock object.
/// The lock object as this process holds it.
struct Held {
    name: String,
    /// `sys::boottime()` of the last write of the lock object.
    written: Duration,
    /// The refresh found the object gone: someone took it for stale.
    lost: bool,
}

/// How long a lock may go without a refresh before its holder stops trusting it: well before
/// others may take it for stale, whatever this host's clock runs at.
const TRUST_FOR: Duration = Duration::from_secs(STALE_AFTER.as_secs() - 5 * 60);

pub struct RepoLock {
    backend: Arc<dyn Backend>,
    held: Arc<Mutex<Held>>,
    exclusive: bool,
    refresh: Arc<Refresh>,
    thread: Option<JoinHandle<()>>,
    /// The operation failed already (its server gone, most likely): a lock that cannot be
    /// removed is no news then, only a log line at info level.
    quiet: bool,
}

impl std::fmt::Debug for RepoLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoLock")
            .field("name", &self.name())
            .field("exclusive", &self.exclusive)
            .finish()
    }
}

fn new_name() -> Result<String> {
    Ok(format!("{LOCKS}{}", crate::store::random_id()?))
}

impl RepoLock {
    fn put(backend: &Arc<dyn Backend>, info: &LockInfo) -> Result<RepoLock> {
        let name = new_name()?;
        backend.put_if_absent(&name, &encode(info))?;
        let refresh = Arc::new(Refresh {
            stop: Mutex::new(false),
            cv: Condvar::new(),
        });
        let held = Arc::new(Mutex::new(Held {
            name,
            written: crate::sys::boottime(),
            lost: false,
        }));
        let thread = {
            let (backend, held, refresh, info) =
                (backend.clone(), held.clone(), refresh.clone(), info.clone());
            std::thread::Builder::new()
                .name("vmref-repo-lock".into())
                .spawn(move || {
                    let mut stop = refresh.stop.lock();
                    loop {
                        // Checked before waiting too: a lock dropped before this thread ran
                        // has already sent its only notification.
                        if *stop {
                            return;
                        }
                        refresh.cv.wait_for(&mut stop, REFRESH_EVERY);
                        if *stop {
                            return;
                        }
                        // A lock someone removed as stale is not ours to write again: a
                        // collection may have run since. `check` then fails.
                        let old = held.lock().name.clone();
                        match backend.size(&old) {
                            Ok(_) => {}
                            Err(e) if crate::repo::backend::is_missing(&e) => {
                                log::warn!(
                                    "the repository lock {old} was removed by another process"
                                );
                                held.lock().lost = true;
                                return;
                            }
                            Err(e) => {
                                log::warn!("could not refresh the repository lock: {e}");
                                continue;
                            }
                        }
                        // A new object, then the old one gone: never a moment without a lock.
                        let Ok(fresh) = new_name() else { continue };
                        let now = crate::sys::boottime();
                        match backend.put_if_absent(&fresh, &encode(&info)) {
                            Ok(_) => {
                                {
                                    let mut h = held.lock();
                                    h.name = fresh;
                                    h.written = now;
                                }
                                let _ = backend.delete(&old);
                            }
                            Err(e) => log::warn!("could not refresh the repository lock: {e}"),
                        }
                    }
                })
                .map_err(|e| Error::Internal(format!("lock refresh thread: {e}")))?
        };
        Ok(RepoLock {
            backend: backend.clone(),
            held,
            exclusive: info.exclusive,
            refresh,
            thread: Some(thread),
            quiet: false,
        })
    }

    /// Take a shared lock for a writer, waiting up to `wait` while a collection holds the
    /// repository.
    ///
    /// # Errors
    /// `Repo` naming the collection still running after `wait`; I/O or server failures.
    pub fn shared(
        backend: &Arc<dyn Backend>,
        store_id: &str,
        what: &str,
        wait: Duration,
    ) -> Result<RepoLock> {
        let info = LockInfo::mine(false, store_id, what);
        let start = Instant::now();
        let mut said = false;
        loop {
            let l = RepoLock::put(backend, &info)?;
            let others = live_locks(&**backend, Some(&l.name()))?;
            let Some(x) = others.iter().find(|o| o.exclusive()) else {
                return Ok(l);
            };
            drop(l);
            if start.elapsed() >= wait {
                return Err(Error::Repo(format!(
                    "the repository {} is being collected ({}); try again later",
                    backend.describe(),
                    x.describe()
                )));
            }
            if !said {
                log::info!("waiting for the repository's collection ({})", x.describe());
                said = true;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Take the exclusive lock for a collection, or None when any other live lock is there
    /// (the collection is put off; nothing waits).
    ///
    /// # Errors
    /// I/O or server failures.
    pub fn exclusive(
        backend: &Arc<dyn Backend>,
        store_id: &str,
        what: &str,
    ) -> Result<std::result::Result<RepoLock, Vec<Other>>> {
        let l = RepoLock::put(backend, &LockInfo::mine(true, store_id, what))?;
        let others = live_locks(&**backend, Some(&l.name()))?;
        if others.is_empty() {
            Ok(Ok(l))
        } else {
            Ok(Err(others))
        }
    }

    pub fn name(&self) -> String {
        self.held.lock().name.clone()
    }

    /// Report a failure to remove this lock at info level only (see `quiet`).
    pub fn set_quiet(&mut self) {
        self.quiet = true;
    }

    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }

    /// Fail unless this lock is still good: never found removed, written again within
    /// `TRUST_FOR` (by the boot clock, which counts a suspend or a stopped process), and in
    /// the repository now. A writer calls it just before it commits; a collection just before
    /// it deletes.
    ///
    /// # Errors
    /// `Repo` when the lock is lost or too old; I/O or server failures.
    pub fn check(&self) -> Result<()> {
        let lost = |name: &str| {
            Error::Repo(format!(
                "this process's repository lock {name} was removed (taken for a dead \
                 host's after {} min without a refresh); nothing was committed",
                STALE_AFTER.as_secs() / 60
            ))
        };
        // Held across the HEAD: the refresh swaps the name under the same mutex.
        let h = self.held.lock();
        if h.lost {
            return Err(lost(&h.name));
        }
        let since = crate::sys::boottime().saturating_sub(h.written);
        if since > TRUST_FOR {
            return Err(Error::Repo(format!(
                "this process's repository lock {} was last written {} min ago (the \
                 repository was unreachable, or this host slept); others may take it for \
                 stale, so nothing was committed",
                h.name,
                since.as_secs() / 60
            )));
        }
        match self.backend.size(&h.name) {
            Ok(_) => Ok(()),
            Err(e) if crate::repo::backend::is_missing(&e) => Err(lost(&h.name)),
            Err(e) => Err(e),
        }
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        *self.refresh.stop.lock() = true;
        self.refresh.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let name = self.name();
        if let Err(e) = self.backend.delete(&name) {
            let say = format!(
                "could not remove the repository lock {name} (it goes stale when this process \
                 ends, or after {} min): {e}",
                STALE_AFTER.as_secs() / 60
            );
            if self.quiet {
                log::info!("{say}");
            } else {
                log::warn!("{say}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::backend::MemBackend;

    fn mem() -> Arc<dyn Backend> {
        Arc::new(MemBackend::new())
    }

    #[test]
    fn round_trip_and_damage() {
        let l = LockInfo::mine(true, "ab", "gc");
        let b = encode(&l);
        assert_eq!(decode(&b).unwrap(), l);
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(decode(&d).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn writers_share_and_keep_a_collector_out() {
        let be = mem();
        let a = RepoLock::shared(&be, "a", "backup", Duration::ZERO).unwrap();
        let b = RepoLock::shared(&be, "b", "backup", Duration::ZERO).unwrap();
        let others = RepoLock::exclusive(&be, "c", "gc").unwrap().unwrap_err();
        assert_eq!(others.len(), 2);
        // The collector that gave up left no lock behind.
        assert_eq!(be.list(LOCKS).unwrap().len(), 2);
        a.check().unwrap();
        drop(a);
        drop(b);
        assert!(be.list(LOCKS).unwrap().is_empty());
        let c = RepoLock::exclusive(&be, "c", "gc").unwrap().unwrap();
        assert!(c.is_exclusive());
        let e = RepoLock::shared(&be, "a", "backup", Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(e.to_string().contains("being collected"), "{e}");
        assert_eq!(be.list(LOCKS).unwrap(), vec![c.name()]);
        drop(c);
        RepoLock::shared(&be, "a", "backup", Duration::ZERO).unwrap();
    }

    #[test]
    fn a_dead_holders_lock_is_removed_and_a_removed_lock_fails_check() {
        let be = mem();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = LockInfo {
            pid,
            pid_start: 1,
            ..LockInfo::mine(true, "x", "gc")
        };
        be.put_if_absent("locks/dead", &encode(&dead)).unwrap();
        // An unreadable lock counts as a live exclusive one.
        be.put_if_absent("locks/junk", b"junk").unwrap();
        let others = live_locks(&*be, None).unwrap();
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].name, "locks/junk");
        assert!(be.size("locks/dead").is_err());
        be.delete("locks/junk").unwrap();
        let l = RepoLock::exclusive(&be, "c", "gc").unwrap().unwrap();
        be.delete(&l.name()).unwrap();
        assert!(l.check().unwrap_err().to_string().contains("was removed"));
    }
}
