//! A tracking file updated in place: positioned writes that become durable at `sync`. The map
//! and the log both go through here, so a test can see every write and every sync and replay
//! a power loss (`powerloss`): the file as of its last sync plus any subset of the sectors
//! written after it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct DurableFile {
    file: File,
    path: PathBuf,
}

impl DurableFile {
    /// Open an existing file that was created durably (temp file, fsync, rename).
    pub fn open(path: &Path) -> Result<DurableFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(Error::io("open", path))?;
        #[cfg(test)]
        super::powerloss::synced(path);
        Ok(DurableFile {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(Error::io("stat", &self.path))?
            .len())
    }

    /// Read as much of `buf` as the file holds at `off`; returns the count.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(Error::io("read", &self.path)(e)),
            }
        }
        Ok(got)
    }

    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        #[cfg(test)]
        if super::powerloss::should_fail(&self.path) {
            return Err(Error::io("write", &self.path)(
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        #[cfg(test)]
        super::powerloss::wrote(&self.path, off, buf);
        self.file
            .write_all_at(buf, off)
            .map_err(Error::io("write", &self.path))
    }

    /// Make every write so far durable.
    pub fn sync(&self) -> Result<()> {
        #[cfg(test)]
        if super::powerloss::sync_should_fail(&self.path) {
            return Err(Error::io("fsync", &self.path)(
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.file
            .sync_data()
            .map_err(Error::io("fsync", &self.path))?;
        #[cfg(test)]
        super::powerloss::synced(&self.path);
        Ok(())
    }
}
