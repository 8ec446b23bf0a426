//! Backends: where the repository's objects live. An object is named by a relative path of
//! `/`-separated parts (`config`, `packs/ab/<hex>`, `index/<seq>-<hex>`, and for stores
//! sharing the repository `snapshots/<store-id>/<point-id>`, `stores/<store-id>` and
//! `locks/<hex>`), is written once and never changed, only deleted.
//!
//! A name is never reused for other bytes (packs and index objects have random names, the
//! config is never deleted): readers may cache open handles by name.
//!
//! Invariants every backend keeps:
//! - `put_if_absent` is durable when it returns and never replaces an existing object: the
//!   object is there whole or not at all after any crash.
//! - A missing object, or a range past its end, is an error (`missing`/`Truncated`), never
//!   zeros: the caller turns it into EIO.
//!
//! `LocalBackend` keeps objects as files under one directory; `MemBackend` is the in-memory
//! model the tests use (with hooks to damage objects). The object-store backend is meant to be
//! a third implementation of `Backend`, which is why the trait speaks only of whole immutable
//! objects and ranges of them.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};
use crate::format::FormatError;
use crate::store::atomic::fsync_dir;

/// Objects of the repository, by name. Shared by every thread of the process.
pub trait Backend: Send + Sync {
    /// The whole object.
    ///
    /// # Errors
    /// `missing(name)` when there is no such object; I/O failures.
    fn get(&self, name: &str) -> Result<Vec<u8>>;

    /// `len` bytes at `off`; an object shorter than `off + len` is an error, not zeros.
    ///
    /// # Errors
    /// `missing(name)`, `FormatError::Truncated` for a short object; I/O failures.
    fn get_range(&self, name: &str, off: u64, len: usize) -> Result<Vec<u8>>;

    /// `get_range` into a caller's buffer (`buf.len()` bytes at `off`), so a reader that reads
    /// many ranges reuses one buffer.
    ///
    /// # Errors
    /// As `get_range`.
    fn get_range_into(&self, name: &str, off: u64, buf: &mut [u8]) -> Result<()> {
        buf.copy_from_slice(&self.get_range(name, off, buf.len())?);
        Ok(())
    }

    /// A hint that `len` bytes at `off` of `name` will be read soon: a backend that can start
    /// fetching them in the background does (the local one asks the kernel to read ahead).
    /// Never fails: a wrong hint costs only the I/O.
    fn prefetch(&self, _name: &str, _off: u64, _len: u64) {}

    /// Store `bytes` as `name` unless an object of that name exists. Durable when it returns.
    /// Returns false (and changes nothing) when the object already existed.
    ///
    /// # Errors
    /// A bad name; I/O failures (then no object of that name was made).
    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool>;

    /// Like `put_if_absent`, for an object too large to hold in memory: `write` is called
    /// once with a sink for the object's bytes. The object exists only if `write` succeeds.
    ///
    /// # Errors
    /// An error of `write`; as `put_if_absent`.
    fn put_stream(
        &self,
        name: &str,
        write: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
    ) -> Result<bool> {
        let mut buf = Vec::new();
        write(&mut buf)?;
        self.put_if_absent(name, &buf)
    }

    /// Names that start with `prefix`, sorted.
    ///
    /// # Errors
    /// I/O failures.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;

    /// `list` with each object's age by the backend's own clock (S3: the server's `Date`
    /// against each object's `LastModified`; local files: now against the mtime), so that a
    /// lock left by a host that died can be told from a live one whatever the hosts' clocks
    /// say. A backend that cannot tell says zero: its locks never go stale.
    ///
    /// # Errors
    /// I/O failures.
    fn list_aged(&self, prefix: &str) -> Result<Vec<(String, std::time::Duration)>> {
        Ok(self
            .list(prefix)?
            .into_iter()
            .map(|n| (n, std::time::Duration::ZERO))
            .collect())
    }

    /// Remove an object; removing a missing object is not an error. Durable when it returns.
    ///
    /// # Errors
    /// I/O failures.
    fn delete(&self, name: &str) -> Result<()>;

    /// The object's length in bytes.
    ///
    /// # Errors
    /// `missing(name)`; I/O failures.
    fn size(&self, name: &str) -> Result<u64>;

    /// Where the objects are, for messages.
    fn describe(&self) -> String;

    /// The same objects without a local cache in front (`s3::cache`), for `verify`, which
    /// checks what the repository holds, not a copy of it. None: this backend has no cache.
    fn uncached(&self) -> Option<Arc<dyn Backend>> {
        None
    }
}

/// The error for an object that is not there. It is a `Format` error (EIO at the mount, a
/// damaged repository to `verify`); `is_missing` tells it from other damage.
pub fn missing(name: &str) -> Error {
    Error::Format {
        path: format!("repository object {name}").into(),
        source: FormatError::Invalid {
            what: "object",
            why: MISSING.into(),
        },
    }
}

const MISSING: &str = "missing";

/// Whether `e` is the error `missing` makes.
pub fn is_missing(e: &Error) -> bool {
    matches!(e, Error::Format { source: FormatError::Invalid { what: "object", why }, .. } if why == MISSING)
}

fn truncated(name: &str, got: usize, need: usize) -> Error {
    Error::Format {
        path: format!("repository object {name}").into(),
        source: FormatError::Truncated { got, need },
    }
}

/// Object names are relative paths of short parts made of `[A-Za-z0-9_.-]`, none starting
/// with a dot (temp files do): nothing can escape the repository directory or clash with a
/// writer's temp file.
///
/// # Errors
/// `Error::BadName`.
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why| {
        Err(Error::BadName {
            name: name.into(),
            why,
        })
    };
    if name.is_empty() || name.len() > 512 {
        return bad("an object name has 1 to 512 characters");
    }
    for part in name.split('/') {
        if part.is_empty() || part.starts_with('.') {
            return bad("empty part or part starting with a dot");
        }
        if !part
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.')
        {
            return bad("only letters, digits, '_', '-' and '.' in an object name");
        }
    }
    Ok(())
}

/// Objects as files under a directory: directories 0700, files 0600.
pub struct LocalBackend {
    root: PathBuf,
    /// Open read handles by name, so a read is one `pread`. The mutex guards only the map;
    /// reads run on a cloned `Arc<File>` with no lock held.
    fds: Mutex<LruCache<String, Arc<File>>>,
    tmp_seq: AtomicU64,
}

/// Open read handles kept per backend.
const OPEN_FILES: usize = 256;

impl LocalBackend {
    /// Use `root` (created 0700 if missing) as the repository directory. Temp files left by
    /// a crashed writer are removed lazily by `sweep_temp`.
    ///
    /// # Errors
    /// Failure to create the directory.
    pub fn new(root: &Path) -> Result<LocalBackend> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(Error::io("create directory", root))?;
        Ok(LocalBackend {
            root: root.to_path_buf(),
            fds: Mutex::new(LruCache::new(NonZeroUsize::new(OPEN_FILES).unwrap())),
            tmp_seq: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn open(&self, name: &str) -> Result<Arc<File>> {
        if let Some(f) = self.fds.lock().get(name) {
            return Ok(f.clone());
        }
        let p = self.path(name)?;
        let f = match File::open(&p) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(missing(name)),
            Err(e) => return Err(Error::io("open", &p)(e)),
        };
        self.fds.lock().put(name.to_string(), f.clone());
        Ok(f)
    }

    /// Create the directories of `dir` below the root, fsyncing each parent whose entries
    /// changed so that a new object's directory survives a crash with it.
    fn make_dirs(&self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent()
            && parent != self.root
        {
            self.make_dirs(parent)?;
        }
        match DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => fsync_dir(dir.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io("create directory", dir)(e)),
        }
    }

    /// Remove temp files (`.<name>.tmp.*`) a crashed writer left anywhere in the repository.
    pub fn sweep_temp(&self) {
        fn walk(d: &Path) {
            if let Ok(rd) = fs::read_dir(d) {
                for e in rd.flatten() {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p);
                    } else if n.starts_with('.') && n.contains(".tmp.") {
                        let _ = fs::remove_file(&p);
                    }
                }
            }
        }
        walk(&self.root);
    }
}

impl Backend for LocalBackend {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let len = self.size(name)?;
        self.get_range(name, 0, len as usize)
    }

    fn get_range(&self, name: &str, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.get_range_into(name, off, &mut buf)?;
        Ok(buf)
    }

    fn get_range_into(&self, name: &str, off: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.open(name)?;
        let len = buf.len();
        let mut done = 0;
        while done < len {
            match f.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => return Err(truncated(name, off as usize + done, off as usize + len)),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", self.root.join(name))(e)),
            }
        }
        Ok(())
    }

    fn prefetch(&self, name: &str, off: u64, len: u64) {
        if let Ok(f) = self.open(name) {
            let _ = crate::sys::fadvise_willneed(f.as_raw_fd(), off, len);
        }
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        self.put_stream(name, &mut |w| {
            w.write_all(bytes)
                .map_err(Error::io("write", self.root.join(name)))
        })
    }

    fn put_stream(
        &self,
        name: &str,
        write: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
    ) -> Result<bool> {
        let target = self.path(name)?;
        if target.exists() {
            return Ok(false);
        }
        let dir = target.parent().unwrap_or(&self.root).to_path_buf();
        self.make_dirs(&dir)?;
        let base = name.rsplit('/').next().unwrap_or(name);
        let tmp = dir.join(format!(
            ".{base}.tmp.{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| -> Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(Error::io("create", &tmp))?;
            let mut w = BufWriter::with_capacity(1 << 20, &mut f);
            write(&mut w)?;
            w.flush().map_err(Error::io("write", &tmp))?;
            drop(w);
            f.sync_all().map_err(Error::io("fsync", &tmp))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        // A hard link never replaces an existing name, unlike rename: two writers of one
        // name cannot overwrite each other, and the loser learns the object was there.
        let linked = fs::hard_link(&tmp, &target);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                fsync_dir(&dir)?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io("link", &target)(e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // Walk only the directory the prefix names, not the whole repository.
        let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            check_name(dir_part)?;
            self.root.join(dir_part)
        };
        let mut out = Vec::new();
        fn walk(root: &Path, d: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
            let rd = match fs::read_dir(d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::io("list", d)(e)),
            };
            for e in rd {
                let e = e.map_err(Error::io("list", d))?;
                let n = e.file_name();
                let n = n.to_string_lossy();
                if n.starts_with('.') {
                    continue;
                }
                let p = e.path();
                let ft = e.file_type().map_err(Error::io("stat", &p))?;
                if ft.is_dir() {
                    walk(root, &p, prefix, out)?;
                } else if let Ok(rel) = p.strip_prefix(root) {
                    let rel = rel.to_string_lossy().into_owned();
                    if rel.starts_with(prefix) {
                        out.push(rel);
                    }
                }
            }
            Ok(())
        }
        walk(&self.root, &start, prefix, &mut out)?;
        out.sort();
        Ok(out)
    }

    fn list_aged(&self, prefix: &str) -> Result<Vec<(String, std::time::Duration)>> {
        let now = std::time::SystemTime::now();
        let mut out = Vec::new();
        for n in self.list(prefix)? {
            let p = self.root.join(&n);
            match fs::metadata(&p).and_then(|m| m.modified()) {
                Ok(t) => out.push((n, now.duration_since(t).unwrap_or_default())),
                // Deleted since the listing: gone, not aged.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("stat", &p)(e)),
            }
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let p = self.path(name)?;
        self.fds.lock().pop(name);
        match fs::remove_file(&p) {
            Ok(()) => fsync_dir(p.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &p)(e)),
        }
    }

    fn size(&self, name: &str) -> Result<u64> {
        let p = self.path(name)?;
        match fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(missing(name)),
            Err(e) => Err(Error::io("stat", &p)(e)),
        }
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// In-memory objects: the model for tests, with hooks to damage and count.
#[derive(Default)]
pub struct MemBackend {
    objects: RwLock<BTreeMap<String, Arc<Vec<u8>>>>,
}

impl MemBackend {
    pub fn new() -> MemBackend {
        MemBackend::default()
    }

    /// Replace an object's bytes outright (damage tests).
    pub fn overwrite(&self, name: &str, bytes: Vec<u8>) {
        self.objects
            .write()
            .insert(name.to_string(), Arc::new(bytes));
    }

    /// Flip the bits of `mask` in byte `off` of an object; false if there is no such byte.
    pub fn flip(&self, name: &str, off: usize, mask: u8) -> bool {
        let mut g = self.objects.write();
        match g.get_mut(name) {
            Some(b) if off < b.len() => {
                Arc::make_mut(b)[off] ^= mask;
                true
            }
            _ => false,
        }
    }

    /// Total bytes of all objects.
    pub fn bytes(&self) -> u64 {
        self.objects.read().values().map(|b| b.len() as u64).sum()
    }
}

impl Backend for MemBackend {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        check_name(name)?;
        self.objects
            .read()
            .get(name)
            .map(|b| b.to_vec())
            .ok_or_else(|| missing(name))
    }

    fn get_range(&self, name: &str, off: u64, len: usize) -> Result<Vec<u8>> {
        check_name(name)?;
        let b = self
            .objects
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| missing(name))?;
        let end = off.saturating_add(len as u64);
        if end > b.len() as u64 {
            return Err(truncated(name, b.len(), end as usize));
        }
        Ok(b[off as usize..end as usize].to_vec())
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        check_name(name)?;
        let mut g = self.objects.write();
        if g.contains_key(name) {
            return Ok(false);
        }
        g.insert(name.to_string(), Arc::new(bytes.to_vec()));
        Ok(true)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .objects
            .read()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }

    fn delete(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.objects.write().remove(name);
        Ok(())
    }

    fn size(&self, name: &str) -> Result<u64> {
        check_name(name)?;
        self.objects
            .read()
            .get(name)
            .map(|b| b.len() as u64)
            .ok_or_else(|| missing(name))
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn exercise(b: &dyn Backend) {
        assert!(b.put_if_absent("packs/ab/abcd", b"hello world").unwrap());
        assert!(!b.put_if_absent("packs/ab/abcd", b"other").unwrap());
        assert_eq!(b.get("packs/ab/abcd").unwrap(), b"hello world");
        assert_eq!(b.get_range("packs/ab/abcd", 6, 5).unwrap(), b"world");
        assert_eq!(b.get_range("packs/ab/abcd", 11, 0).unwrap(), b"");
        let e = b.get_range("packs/ab/abcd", 6, 6).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{e}");
        assert!(!is_missing(&e));
        assert_eq!(b.size("packs/ab/abcd").unwrap(), 11);
        assert!(b.put_if_absent("packs/cd/ef", b"").unwrap());
        assert!(b.put_if_absent("index/1", b"i").unwrap());
        assert!(b.put_if_absent("config", b"c").unwrap());
        assert_eq!(
            b.list("packs/").unwrap(),
            vec!["packs/ab/abcd".to_string(), "packs/cd/ef".to_string()]
        );
        assert_eq!(b.list("packs/ab").unwrap(), vec!["packs/ab/abcd"]);
        assert_eq!(b.list("index/").unwrap(), vec!["index/1"]);
        assert_eq!(b.list("nothing/").unwrap(), Vec::<String>::new());
        assert_eq!(b.list("").unwrap().len(), 4);
        b.delete("packs/ab/abcd").unwrap();
        b.delete("packs/ab/abcd").unwrap();
        for e in [
            b.get("packs/ab/abcd").unwrap_err(),
            b.get_range("packs/ab/abcd", 0, 1).unwrap_err(),
            b.size("packs/ab/abcd").unwrap_err(),
        ] {
            assert!(is_missing(&e), "{e}");
            assert_eq!(e.errno(), libc::EIO);
        }
        for bad in ["", "/abs", "a/../b", "a//b", ".hidden", "a/.tmp", "a b"] {
            assert!(b.put_if_absent(bad, b"x").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mem_backend_behaves() {
        exercise(&MemBackend::new());
    }

    #[test]
    fn local_backend_behaves_and_is_private() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let b = LocalBackend::new(&root).unwrap();
        exercise(&b);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("packs/cd")), 0o700);
        assert_eq!(mode(&root.join("packs/cd/ef")), 0o600);
        // No temp file is left beside the objects.
        assert_eq!(fs::read_dir(root.join("packs/cd")).unwrap().count(), 1);
    }

    #[test]
    fn local_backend_ignores_and_sweeps_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path()).unwrap();
        b.put_if_absent("index/a", b"a").unwrap();
        fs::write(d.path().join("index/.b.tmp.1.0"), b"half").unwrap();
        assert_eq!(b.list("index/").unwrap(), vec!["index/a"]);
        b.sweep_temp();
        assert_eq!(fs::read_dir(d.path().join("index")).unwrap().count(), 1);
    }

    #[test]
    fn local_backend_racing_puts_make_one_object() {
        let d = tempfile::tempdir().unwrap();
        let b = Arc::new(LocalBackend::new(d.path()).unwrap());
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let b = b.clone();
                    s.spawn(move || b.put_if_absent("x/y", &[i as u8; 1000]).unwrap() as usize)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        let v = b.get("x/y").unwrap();
        assert!(v.iter().all(|&x| x == v[0]));
    }
}
