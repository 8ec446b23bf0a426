//! Atomic file replacement: write a temp file beside the target, fsync it, rename it into
//! place, fsync the directory. A reader sees the old file or the new one, never half of
//! either, after any crash. Files are created 0600.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Replace `path` with `bytes` atomically and durably.
///
/// # Errors
/// Any I/O failure; the old file is then untouched and the temp file removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = TempFile::new(path)?;
    tmp.write_all(bytes)?;
    tmp.commit()
}

/// A temp file that is removed on drop unless committed.
pub struct TempFile {
    tmp: PathBuf,
    target: PathBuf,
    file: Option<File>,
    synced: bool,
}

impl TempFile {
    pub fn new(target: &Path) -> Result<TempFile> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = target.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Error::io("create", &tmp))?;
        Ok(TempFile {
            tmp,
            target: target.to_path_buf(),
            file: Some(file),
            synced: false,
        })
    }

    pub fn file(&self) -> &File {
        self.file.as_ref().expect("temp file open until commit")
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn write_all(&self, bytes: &[u8]) -> Result<()> {
        let mut f = self.file();
        f.write_all(bytes).map_err(Error::io("write", &self.tmp))
    }

    /// fsync now, after the last write, so that `commit` has only the name left to make
    /// durable: a caller that must wait for other syncs before the target may appear runs
    /// this one beside them.
    pub fn sync(&mut self) -> Result<()> {
        self.file()
            .sync_all()
            .map_err(Error::io("fsync", &self.tmp))?;
        self.synced = true;
        Ok(())
    }

    /// fsync (unless `sync` did), rename over the target, fsync the directory.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("commit once");
        if !self.synced {
            file.sync_all().map_err(Error::io("fsync", &self.tmp))?;
        }
        drop(file);
        fs::rename(&self.tmp, &self.target).map_err(Error::io("rename", &self.tmp))?;
        self.tmp = PathBuf::new();
        fsync_dir(parent_dir(&self.target))
    }
}

impl TempFile {
    /// `commit` that never replaces: the target must not exist (a hard link fails on an
    /// existing name, where a rename would replace it). The temp file goes either way.
    ///
    /// # Errors
    /// `AlreadyExists` I/O error when the target exists; I/O failures.
    pub fn commit_new(mut self) -> Result<()> {
        let file = self.file.take().expect("commit once");
        file.sync_all().map_err(Error::io("fsync", &self.tmp))?;
        drop(file);
        fs::hard_link(&self.tmp, &self.target).map_err(Error::io("link", &self.target))?;
        fsync_dir(parent_dir(&self.target))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The directory holding `path`: `.` for a bare file name (whose `parent()` is empty).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Make a directory entry change (create, rename, unlink) durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(Error::io("open directory", dir))?;
    d.sync_all().map_err(Error::io("fsync directory", dir))
}

/// Remove a file and make the removal durable; a missing file is not an error.
pub fn remove_durable(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent_dir(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path)(e)),
    }
}

/// Remove temp files a crashed writer left behind in `dir`.
pub fn sweep_temp_files(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with('.') && n.contains(".tmp.") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn uncommitted_temp_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"old").unwrap();
        {
            let t = TempFile::new(&p).unwrap();
            t.write_all(b"half").unwrap();
        }
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
