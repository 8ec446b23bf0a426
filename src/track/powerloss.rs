//! Test-only power-loss simulation for tracking files. Every `DurableFile` write and sync is
//! journaled in one global sequence, with markers the test adds (an acknowledged write, a
//! committed point). `state_at` rebuilds each file as a power loss at any position in that
//! sequence could have left it: its bytes at its last sync before the cut plus a random subset
//! of the 512-byte sectors written after that sync and before the cut.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

#[derive(Debug, Clone)]
pub enum Event {
    Write(PathBuf, u64, Vec<u8>),
    Sync(PathBuf, Vec<u8>),
    Mark(PathBuf, u64),
}

static EVENTS: Mutex<Vec<Event>> = Mutex::new(Vec::new());
static FAIL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static FAIL_SYNC: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Make the next write to `path` fail (as on a full copy-on-write filesystem or a bad disk).
pub fn fail_next_write(path: &Path) {
    FAIL.lock().push(path.to_path_buf());
}

/// Whether this write to `path` is to fail (consumes the injected failure).
pub fn should_fail(path: &Path) -> bool {
    let mut f = FAIL.lock();
    match f.iter().position(|p| p == path) {
        Some(i) => {
            f.remove(i);
            true
        }
        None => false,
    }
}

/// Make the next sync of `path` fail (as after a write-back error the kernel reports once).
pub fn fail_next_sync(path: &Path) {
    FAIL_SYNC.lock().push(path.to_path_buf());
}

/// Whether this sync of `path` is to fail (consumes the injected failure).
pub fn sync_should_fail(path: &Path) -> bool {
    let mut f = FAIL_SYNC.lock();
    match f.iter().position(|p| p == path) {
        Some(i) => {
            f.remove(i);
            true
        }
        None => false,
    }
}

pub fn synced(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_default();
    EVENTS.lock().push(Event::Sync(path.to_path_buf(), bytes));
}

pub fn wrote(path: &Path, off: u64, buf: &[u8]) {
    EVENTS
        .lock()
        .push(Event::Write(path.to_path_buf(), off, buf.to_vec()));
}

/// Add a test marker for `dir`; returns nothing, markers are found again by `events`.
pub fn mark(dir: &Path, what: u64) {
    EVENTS.lock().push(Event::Mark(dir.to_path_buf(), what));
}

/// The events that concern files under `dir`, in order.
pub fn events(dir: &Path) -> Vec<Event> {
    EVENTS
        .lock()
        .iter()
        .filter(|e| match e {
            Event::Write(p, ..) | Event::Sync(p, _) | Event::Mark(p, _) => p.starts_with(dir),
        })
        .cloned()
        .collect()
}

/// Each file's bytes after a power loss just before `events[cut]`.
pub fn state_at(
    events: &[Event],
    cut: usize,
    mut keep: impl FnMut() -> bool,
) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    for e in &events[..cut] {
        match e {
            Event::Sync(p, bytes) => {
                files.insert(p.clone(), bytes.clone());
            }
            Event::Write(p, off, data) => {
                let f = files.entry(p.clone()).or_default();
                for (i, sector) in data.chunks(512).enumerate() {
                    if keep() {
                        let at = *off as usize + i * 512;
                        if f.len() < at + sector.len() {
                            f.resize(at + sector.len(), 0);
                        }
                        f[at..at + sector.len()].copy_from_slice(sector);
                    }
                }
            }
            Event::Mark(..) => {}
        }
    }
    files
}
