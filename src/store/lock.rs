//! The store lock: an exclusive `flock` on `STORE/lock`, held by the one process that owns the
//! live write path and changes the store (a mounted daemon for its lifetime, or a command
//! working on the store directly). The kernel drops it when the holder dies, even by kill -9.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct StoreLock {
    file: File,
    path: PathBuf,
}

impl StoreLock {
    /// Take the lock without waiting.
    ///
    /// # Errors
    /// `Error::Locked` when another process holds it.
    pub fn try_acquire(store: &Path) -> Result<StoreLock> {
        let path = store.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io("open", &path))?;
        if let Err(e) = crate::sys::flock_exclusive_nb(file.as_raw_fd()) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Locked(store.to_path_buf()));
            }
            return Err(Error::io("lock", &path)(e));
        }
        let mut f = &file;
        let _ = f.set_len(0);
        let _ = writeln!(f, "{}", std::process::id());
        Ok(StoreLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

impl Drop for StoreLock {
    /// Unlock explicitly rather than by closing: a child forked by another thread (any
    /// `Command::spawn`) holds a duplicate of the descriptor until it execs, and the lock
    /// belongs to the shared open file, so a plain close could leave the store locked for
    /// that moment and make the next owner fail with `Locked`.
    fn drop(&mut self) {
        let _ = crate::sys::flock_unlock(self.file.as_raw_fd());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_first_dropped() {
        let d = tempfile::tempdir().unwrap();
        let a = StoreLock::try_acquire(d.path()).unwrap();
        assert!(matches!(
            StoreLock::try_acquire(d.path()),
            Err(Error::Locked(_))
        ));
        drop(a);
        StoreLock::try_acquire(d.path()).unwrap();
    }
}
