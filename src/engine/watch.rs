//! Watching the store's filesystem under a running daemon. A lazy unmount (`umount -l`) of
//! the filesystem holding the store leaves the daemon's open files working, in a filesystem
//! nothing can reach by path and that may never come back (the admin is about to pull its
//! disk); a path opened meanwhile resolves to whatever is underneath. So while the store's
//! root is not the directory the engine opened (same device and inode), every write to a live
//! disk is refused with EIO: none is accepted whose marks could vanish with that filesystem.
//! When the same directory is back at its path (the filesystem mounted again), writes are
//! taken again; nothing was written meanwhile, so tracking and `changes` stay exact. The
//! outage is logged when it starts and ends and kept for `status`.
//!
//! The check runs every `WATCH_EVERY` in the daemon: writes in the first instants after the
//! unmount still go through the open files, tracked in the filesystem they were made in.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::Engine;

/// How often the daemon checks that the store is still at its path.
pub const WATCH_EVERY: Duration = Duration::from_millis(200);

/// The last time the store's filesystem was away, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreOutage {
    pub since_unix: u64,
    /// None while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_unix: Option<u64>,
    /// Writes to live disks refused with EIO meanwhile.
    pub writes_refused: u64,
    /// Outages since the daemon started.
    pub count: u64,
}

#[derive(Debug)]
pub struct StoreWatch {
    root: PathBuf,
    /// Device and inode of the store's root when the engine opened it.
    id: Option<(u64, u64)>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// While away: the refused-write counters of the disks when it began.
    refused_before: Option<u64>,
    last: Option<StoreOutage>,
}

fn identity(root: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(root).ok().map(|m| (m.dev(), m.ino()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl StoreWatch {
    pub fn new(root: &Path) -> StoreWatch {
        StoreWatch {
            root: root.to_path_buf(),
            id: identity(root),
            state: Mutex::new(State::default()),
        }
    }
}

impl Engine {
    /// Compare the store's root with the one opened, and refuse or take writes again on a
    /// change. Returns whether the store is at its path.
    pub fn check_store(&self) -> bool {
        let w = &self.watch;
        let here = w.id.is_some() && identity(&w.root) == w.id;
        let mut st = w.state.lock();
        let refused = || self.disks().iter().map(|d| d.refused_writes()).sum::<u64>();
        match (here, st.refused_before) {
            (false, None) => {
                for d in self.disks() {
                    d.set_store_away(true);
                }
                st.refused_before = Some(refused());
                let count = st.last.as_ref().map_or(0, |o| o.count) + 1;
                st.last = Some(StoreOutage {
                    since_unix: now(),
                    until_unix: None,
                    writes_refused: 0,
                    count,
                });
                log::error!(
                    "the store's filesystem is no longer at {} (unmounted or replaced): writes \
                     to the live disks are refused with EIO until it is back",
                    w.root.display()
                );
            }
            (true, Some(before)) => {
                for d in self.disks() {
                    d.set_store_away(false);
                }
                st.refused_before = None;
                let n = refused() - before;
                if let Some(o) = &mut st.last {
                    o.until_unix = Some(now());
                    o.writes_refused = n;
                }
                log::warn!(
                    "the store is back at {}: live disks take writes again ({n} refused \
                     meanwhile; tracking is exact: nothing was written untracked)",
                    w.root.display()
                );
            }
            _ => {}
        }
        here
    }

    /// The current or last outage of the store's filesystem, if any.
    pub fn store_outage(&self) -> Option<StoreOutage> {
        let st = self.watch.state.lock();
        let mut o = st.last.clone()?;
        if let Some(before) = st.refused_before {
            let now: u64 = self.disks().iter().map(|d| d.refused_writes()).sum();
            o.writes_refused = now - before;
        }
        Some(o)
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::Engine;
    use crate::error::Error;
    use crate::store::Store;

    /// The store moved away from its path (as a lazy unmount leaves it) and back: writes are
    /// refused meanwhile, counted, and taken again after.
    #[test]
    fn writes_are_refused_while_the_store_is_away() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("s");
        let image = d.path().join("disk0.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let store = Store::init(&root, 4096).unwrap();
        let e = Engine::open(store).unwrap();
        e.disk_add("disk0", &image).unwrap();
        let disk = e.disk("disk0").unwrap();
        assert!(e.check_store() && e.store_outage().is_none());
        disk.write_at(&[1; 4096], 0).unwrap();

        let aside = d.path().join("aside");
        std::fs::rename(&root, &aside).unwrap();
        std::fs::create_dir(&root).unwrap();
        assert!(!e.check_store());
        for _ in 0..3 {
            let err = disk.write_at(&[2; 4096], 8192).unwrap_err();
            assert!(matches!(err, Error::StoreAway(_)), "{err}");
            assert_eq!(err.errno(), libc::EIO);
        }
        let o = e.store_outage().unwrap();
        assert!(o.until_unix.is_none() && o.writes_refused == 3 && o.count == 1);

        std::fs::remove_dir(&root).unwrap();
        std::fs::rename(&aside, &root).unwrap();
        assert!(e.check_store());
        disk.write_at(&[3; 4096], 8192).unwrap();
        let o = e.store_outage().unwrap();
        assert!(o.until_unix.is_some() && o.writes_refused == 3 && o.count == 1);
        e.close().unwrap();
    }
}
