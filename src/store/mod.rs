//! The store: one directory holding everything vmref knows about one VM.
//!
//! ```text
//! STORE/vmref.store        store meta (envelope): block size, id
//! STORE/lock               flock of the owning process (see `lock`)
//! STORE/control.sock       the mounted daemon's control socket
//! STORE/disks/NAME.disk    disk records (envelope)
//! STORE/track/NAME.map     sequence-number map (binary, see `track::mapfile`)
//! STORE/track/NAME.log     durable dirty-region log (binary, see `track::log`)
//! STORE/track/NAME.dig     block digests of clean regions (binary, see `track::digest`)
//! STORE/refs/NAME.ref      reference points (envelope)
//! STORE/data/              host-local backup state (see `backup`)
//! STORE/repo/              the repository, unless the meta names one elsewhere
//! ```
//! Directories are 0700 and files 0600; every file is replaced atomically.

pub mod atomic;
pub mod lock;
pub mod records;
pub mod replication;

use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format;

pub const META_FILE: &str = "vmref.store";
pub const SOCKET_FILE: &str = "control.sock";
/// The store's repository directory (format 2).
pub const REPO_DIR: &str = "repo";
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;

/// What `vmref.store` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreMeta {
    pub id: String,
    pub block_size: u32,
    pub created_unix: u64,
    /// Layout of the backup data: 1 = a block index per point and packs of raw slots under
    /// `data/` (read only by `vmref upgrade`); 2 = the content-addressed repository under
    /// `repo/`. Stores written before the field existed are format 1.
    #[serde(default = "format_v1")]
    pub format: u32,
    /// Where the repository is when not under `STORE/repo`: an `s3://BUCKET/PREFIX` location.
    /// Absent for a local repository, so such a store's meta is what it always was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
}

impl StoreMeta {
    /// The envelope this meta is written in: 4.0 only when older releases must refuse it.
    fn kind(&self) -> format::Kind {
        if self.repository.is_some() {
            format::STORE_META
        } else {
            format::STORE_META_LOCAL
        }
    }
}

fn format_v1() -> u32 {
    1
}

/// The backup data layout this release writes.
pub const STORE_FORMAT: u32 = 2;

/// An opened store: its root and its fixed parameters. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    meta: StoreMeta,
    /// The highest point serial this process has read, assigned or written, once it needed
    /// one (`next_serial`); shared by clones. Every writer of point records holds the store
    /// lock, so none changes behind it.
    serial: std::sync::Arc<parking_lot::Mutex<Option<u64>>>,
}

/// Parse "64K", "1M", "65536" into bytes and check the allowed range.
///
/// # Errors
/// `Error::BadBlockSize` for anything but a power of two from 4 KiB to 4 MiB.
pub fn parse_block_size(s: &str) -> Result<u32> {
    let bad = || Error::BadBlockSize(s.to_string());
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1u64 << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1u64 << 20),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let v = n.checked_mul(mult).ok_or_else(bad)?;
    if !v.is_power_of_two() || !(4096..=(4 << 20)).contains(&v) {
        return Err(bad());
    }
    Ok(v as u32)
}

/// 16 bytes from the kernel's random source (getrandom(2)), for store, point and pack ids.
///
/// # Errors
/// `Error::Io` when the kernel gives none: an id must never silently become all zeros.
pub fn random_bytes() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| Error::io("read random bytes from", "the kernel (getrandom)")(e.into()))?;
    Ok(b)
}

/// A new random id: 16 random bytes in lowercase hex.
///
/// # Errors
/// As `random_bytes`.
pub fn random_id() -> Result<String> {
    Ok(random_bytes()?.iter().map(|x| format!("{x:02x}")).collect())
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn mkdir_private(p: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(Error::io("create directory", p))
}

impl Store {
    /// Create a store in an empty or missing directory.
    ///
    /// # Errors
    /// `StoreExists` if one is there already, `InitNotEmpty` if other files are.
    pub fn init(root: &Path, block_size: u32) -> Result<Store> {
        Store::init_with(root, block_size, |_| Ok(()))
    }

    /// `init`, running `populate` on the new store's root before the meta file is written,
    /// so that what it makes (the repository, with its settings) exists once the store does.
    ///
    /// # Errors
    /// As `init`, and whatever `populate` fails with.
    pub fn init_with(
        root: &Path,
        block_size: u32,
        populate: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Store> {
        Store::init_at(root, block_size, None, populate)
    }

    /// `init_with` for a store whose repository is at `repository` (an `s3://` location)
    /// rather than under `STORE/repo` (None).
    ///
    /// # Errors
    /// As `init_with`.
    pub fn init_at(
        root: &Path,
        block_size: u32,
        repository: Option<String>,
        populate: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Store> {
        if root.join(META_FILE).exists() {
            return Err(Error::StoreExists(root.to_path_buf()));
        }
        if root.exists() {
            let mut rd = fs::read_dir(root).map_err(Error::io("read directory", root))?;
            if rd.next().is_some() {
                return Err(Error::InitNotEmpty(root.to_path_buf()));
            }
        }
        let made_root = !root.exists();
        mkdir_private(root)?;
        for d in ["disks", "track", "refs", "data"] {
            mkdir_private(&root.join(d))?;
        }
        if let Err(e) = populate(root) {
            // Leave the directory as it was, so that `init` can simply be run again (an
            // unreachable object store is the likely cause). Only empty directories go.
            for d in ["disks", "track", "refs", "data", REPO_DIR] {
                let _ = fs::remove_dir(root.join(d));
            }
            if made_root {
                let _ = fs::remove_dir(root);
            }
            return Err(e);
        }
        let meta = StoreMeta {
            id: random_id()?,
            block_size,
            created_unix: now_unix(),
            format: STORE_FORMAT,
            repository,
        };
        // The meta file is written last: a store exists only once it is in place.
        atomic::write_atomic(&root.join(META_FILE), &format::encode(meta.kind(), &meta))?;
        Ok(Store {
            root: root.to_path_buf(),
            meta,
            serial: Default::default(),
        })
    }

    /// Open an existing store.
    ///
    /// # Errors
    /// `NotAStore` for a missing directory or one without a store meta file; `Format` for a
    /// damaged meta file.
    pub fn open(root: &Path) -> Result<Store> {
        if !root.is_dir() {
            return Err(Error::NotAStore(root.to_path_buf(), "no such directory"));
        }
        let mp = root.join(META_FILE);
        let bytes = match fs::read(&mp) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotAStore(root.to_path_buf(), "no vmref.store file"));
            }
            Err(e) => return Err(Error::io("read", &mp)(e)),
        };
        let meta: StoreMeta =
            format::decode(format::STORE_META, &bytes).map_err(|source| Error::Format {
                path: mp.clone(),
                source,
            })?;
        if meta.format > STORE_FORMAT {
            return Err(Error::Format {
                path: mp,
                source: format::FormatError::Invalid {
                    what: "store format",
                    why: format!(
                        "{} is newer than this vmref understands ({STORE_FORMAT})",
                        meta.format
                    ),
                },
            });
        }
        if parse_block_size(&meta.block_size.to_string()).is_err() {
            return Err(Error::Format {
                path: mp,
                source: format::FormatError::Invalid {
                    what: "block size",
                    why: meta.block_size.to_string(),
                },
            });
        }
        Ok(Store {
            root: root.to_path_buf(),
            meta,
            serial: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }
    pub fn block_size(&self) -> u32 {
        self.meta.block_size
    }
    pub fn socket_path(&self) -> PathBuf {
        self.root.join(SOCKET_FILE)
    }
    pub fn disk_record_path(&self, name: &str) -> PathBuf {
        self.root.join("disks").join(format!("{name}.disk"))
    }
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.root.join("track").join(format!("{name}.map"))
    }
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.root.join("track").join(format!("{name}.log"))
    }
    pub fn digest_path(&self, name: &str) -> PathBuf {
        self.root.join("track").join(format!("{name}.dig"))
    }
    pub fn refs_dir(&self) -> PathBuf {
        self.root.join("refs")
    }
    pub fn ref_path(&self, name: &str) -> PathBuf {
        self.refs_dir().join(format!("{name}.ref"))
    }
    /// Host-local backup state: checkpoints' copy-on-write files, the prune journal (and in
    /// a format 1 store, its packs and indexes).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    /// The store's repository (format 2) when it is local: every stored block and point map.
    pub fn repo_dir(&self) -> PathBuf {
        self.root.join(REPO_DIR)
    }
    /// The repository's location when it is not `repo_dir` (an `s3://` location).
    pub fn repository(&self) -> Option<&str> {
        self.meta.repository.as_deref()
    }
    pub fn format(&self) -> u32 {
        self.meta.format
    }

    /// Rewrite the meta file with `format` (the commit point of `vmref upgrade`).
    ///
    /// # Errors
    /// I/O failures; then the meta file is as before.
    pub fn set_format(&mut self, format: u32) -> Result<()> {
        let meta = StoreMeta {
            format,
            ..self.meta.clone()
        };
        atomic::write_atomic(
            &self.root.join(META_FILE),
            &format::encode(meta.kind(), &meta),
        )?;
        self.meta = meta;
        Ok(())
    }

    /// Write the meta file again in the envelope this release writes it in, if it is in an
    /// older one (a store with a shared-capable repository moves from 3.0 to 4.0, so that
    /// releases without published points refuse it).
    ///
    /// # Errors
    /// I/O failures; then the meta file is as before.
    pub fn rewrite_meta_if_older(&self) -> Result<()> {
        let mp = self.root.join(META_FILE);
        let bytes = fs::read(&mp).map_err(Error::io("read", &mp))?;
        if bytes.len() >= 10 && format::le_u16(&bytes, 8) < self.meta.kind().major {
            // The same meta in the newer envelope: `self.meta` is unchanged.
            atomic::write_atomic(&mp, &format::encode(self.meta.kind(), &self.meta))?;
        }
        Ok(())
    }

    /// Remove temp files left by a writer that crashed before committing.
    pub fn sweep(&self) {
        for d in ["disks", "track", "refs", "data", ""] {
            atomic::sweep_temp_files(&self.root.join(d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes() {
        assert_eq!(parse_block_size("64K").unwrap(), 65536);
        assert_eq!(parse_block_size("4k").unwrap(), 4096);
        assert_eq!(parse_block_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_block_size("131072").unwrap(), 131072);
        for b in ["2K", "8M", "3K", "", "K", "-4K", "99999999999999999999K"] {
            assert!(parse_block_size(b).is_err(), "{b}");
        }
    }

    #[test]
    fn init_then_open() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("s");
        let s = Store::init(&root, 65536).unwrap();
        let o = Store::open(&root).unwrap();
        assert_eq!(o.meta().id, s.meta().id);
        assert!(matches!(
            Store::init(&root, 65536),
            Err(Error::StoreExists(_))
        ));
    }

    #[test]
    fn meta_major_is_4_only_with_a_remote_repository() {
        let d = tempfile::tempdir().unwrap();
        let major = |root: &Path| format::le_u16(&fs::read(root.join(META_FILE)).unwrap(), 8);
        let local = d.path().join("l");
        Store::init(&local, 65536).unwrap();
        assert_eq!(major(&local), 2, "older releases keep reading local stores");
        assert_eq!(Store::open(&local).unwrap().repository(), None);
        let remote = d.path().join("r");
        Store::init_at(&remote, 65536, Some("s3://b-1/p".into()), |_| Ok(())).unwrap();
        assert_eq!(major(&remote), 4, "older releases refuse remote ones");
        let mut s = Store::open(&remote).unwrap();
        assert_eq!(s.repository(), Some("s3://b-1/p"));
        s.set_format(STORE_FORMAT).unwrap();
        assert_eq!(major(&remote), 4);
        assert_eq!(
            Store::open(&remote).unwrap().repository(),
            Some("s3://b-1/p")
        );
    }

    #[test]
    fn open_refuses_non_stores() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(Store::open(d.path()), Err(Error::NotAStore(..))));
        assert!(matches!(
            Store::open(&d.path().join("missing")),
            Err(Error::NotAStore(..))
        ));
        fs::write(d.path().join("x"), b"1").unwrap();
        assert!(matches!(
            Store::init(d.path(), 65536),
            Err(Error::InitNotEmpty(_))
        ));
    }
}
