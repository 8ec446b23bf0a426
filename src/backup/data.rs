//! The store's backup data (format 2): its repository under `STORE/repo` and the point maps in
//! it, opened once per engine (or per read-only command) and shared by every backup, restore,
//! verify and mount read.
//!
//! A restorable point's record names, per disk, the root of the disk's map (`PointMap`); the
//! map gives each block's hash; the repository gives the block's bytes, checked against the
//! hash. Both caches are bounded: map nodes through `NodeCache`, pack reads through the
//! repository's own bounded file cache, so memory does not grow with the disk or the points
//! served (invariant 7).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::FormatError;
use crate::repo::Hash;
use crate::repo::backend::{Backend, LocalBackend, is_missing};
use crate::repo::map::{MapReader, MapRoot, NodeCache};
use crate::repo::repository::{RepoOptions, Repository};

use super::blocks::{BLOCK_CACHE_BYTES, BlockCache};
use crate::store::Store;
use crate::store::records::{PointMap, RefRecord, RefState};

/// Map nodes kept decoded in memory, shared by every point a daemon serves: 32 MiB holds the
/// upper levels of every map plus about a thousand leaves (64 GiB of disk at 64 KiB blocks).
pub const NODE_CACHE_BYTES: usize = 32 << 20;

/// The repository of a store and a reader of its maps.
pub struct Data {
    pub repo: Arc<Repository>,
    pub maps: MapReader<Repository>,
    /// Verified, decompressed blocks for point reads (see `blocks`).
    pub blocks: Arc<BlockCache>,
}

impl Data {
    /// Open the repository of a format 2 store. A store whose repository was never made (a
    /// crash between `init` writing the store and making its repository) gets an empty one,
    /// but only while it has no restorable point: a missing repository under points that need
    /// it is damage, reported, never papered over.
    ///
    /// # Errors
    /// `NeedsUpgrade` for a format 1 store; `Format` for a damaged or missing repository;
    /// I/O failures.
    pub fn open(store: &Store) -> Result<Data> {
        if store.format() < crate::store::STORE_FORMAT {
            return Err(Error::NeedsUpgrade(store.root().to_path_buf()));
        }
        Data::open_repo(store, false)
    }

    /// `open` without the format check, for the upgrade, which fills the repository of a
    /// store still in format 1 (`for_upgrade`: make it even though points exist).
    ///
    /// # Errors
    /// As `open`.
    pub fn open_repo(store: &Store, for_upgrade: bool) -> Result<Data> {
        let backend = backend(store.root(), store.repository())?;
        let key = crate::repo::key::store_key(store.root())?;
        let fresh = match backend.size(crate::repo::repository::CONFIG_NAME) {
            Ok(_) => false,
            Err(e) if is_missing(&e) => true,
            Err(e) => return Err(e),
        };
        let kp = store.root().join(crate::repo::key::KEY_FILE_NAME);
        // Say where this store looks for its key: the repository does not know.
        let where_key = |e: Error| match e {
            Error::Encrypted { repo, why } => Error::Encrypted {
                repo,
                why: match &key {
                    None => format!("{why}, and there is none at {}", kp.display()),
                    Some(_) => format!("{why} (key file {})", kp.display()),
                },
            },
            e => e,
        };
        let repo = if fresh {
            if !for_upgrade
                && store
                    .refs()?
                    .iter()
                    .any(|r| r.state == RefState::Restorable)
            {
                return Err(Error::Format {
                    path: backend.describe().into(),
                    source: FormatError::Invalid {
                        what: "repository",
                        why: "missing, but restorable points need it".into(),
                    },
                });
            }
            Repository::init_with_key(backend, RepoOptions::default(), key.as_ref())?
        } else {
            Repository::open_with_key(backend, key.as_ref()).map_err(where_key)?
        };
        // A store with a key wrote its repository encrypted: a config that now says otherwise
        // was replaced, and following it would send the disks out in the clear.
        if key.is_some() && repo.config().key_id.is_none() {
            return Err(Error::Encrypted {
                repo: repo.backend().describe(),
                why: format!(
                    "this store has a key file ({}) but the repository's config says it is not \
                     encrypted; refusing to read or write it in the clear",
                    kp.display()
                ),
            });
        }
        load_damaged(store, &repo);
        Ok(Data::new(Arc::new(repo)))
    }

    pub fn new(repo: Arc<Repository>) -> Data {
        let maps = MapReader::new(repo.clone(), Arc::new(NodeCache::new(NODE_CACHE_BYTES)));
        Data {
            repo,
            maps,
            blocks: Arc::new(BlockCache::new(BLOCK_CACHE_BYTES)),
        }
    }

    /// The bytes of one stored block (a whole block; a disk's short last block comes back
    /// zero-padded), checked against its hash.
    ///
    /// # Errors
    /// `Format` for a missing or damaged block; I/O failures.
    pub fn block(&self, hash: &Hash) -> Result<Arc<Vec<u8>>> {
        super::blocks::fetch(&self.repo, &self.blocks, hash)
    }
}

/// Where `verify` records the blocks it found damaged (hex hashes, one a line), so that the
/// next backup of their bytes stores them again whichever process runs it.
pub fn damaged_path(store: &Store) -> std::path::PathBuf {
    store.data_dir().join("damaged-blocks")
}

/// Record the repository's known-damaged blocks (or remove the record when none are left).
///
/// # Errors
/// I/O failures.
pub fn save_damaged(store: &Store, repo: &Repository) -> Result<()> {
    let mut hashes: Vec<String> = repo.damaged().iter().map(Hash::to_hex).collect();
    let path = damaged_path(store);
    if hashes.is_empty() {
        if path.exists() {
            crate::store::atomic::remove_durable(&path)?;
        }
        return Ok(());
    }
    hashes.sort();
    let mut text = hashes.join("\n");
    text.push('\n');
    crate::store::atomic::write_atomic(&path, text.as_bytes())
}

/// Load the record `save_damaged` wrote (lines that are not hashes are ignored: it is a hint
/// that makes a backup store a block again, never a source of data).
fn load_damaged(store: &Store, repo: &Repository) {
    if let Ok(text) = std::fs::read_to_string(damaged_path(store)) {
        repo.mark_damaged(text.lines().filter_map(Hash::parse));
    }
}

/// The backend of a store's repository: `repository` (an `s3://` location or a directory)
/// when set, else `ROOT/repo` (created if missing).
///
/// # Errors
/// A bad location or S3 settings; failure to create the directory.
pub fn backend(root: &std::path::Path, repository: Option<&str>) -> Result<Arc<dyn Backend>> {
    Ok(match repository {
        Some(loc) if crate::s3::is_location(loc) => crate::s3::open_cached(loc, root)?,
        Some(dir) => Arc::new(LocalBackend::new(std::path::Path::new(dir))?),
        None => Arc::new(LocalBackend::new(&root.join(crate::store::REPO_DIR))?),
    })
}

/// The map of `disk` in restorable point `rec`.
///
/// # Errors
/// `NotRestorable`, `NoSuchDisk`, or `Format` for a record without a readable map root.
pub fn map_of(store: &Store, rec: &RefRecord, disk: &str) -> Result<(MapRoot, u64)> {
    if rec.state != RefState::Restorable {
        return Err(Error::NotRestorable(rec.name.clone()));
    }
    let d = rec
        .disks
        .get(disk)
        .ok_or_else(|| Error::NoSuchDisk(format!("{disk} (in point {})", rec.name)))?;
    let bad = |why: String| Error::Format {
        path: store.ref_path(&rec.name),
        source: FormatError::Invalid {
            what: "point map",
            why,
        },
    };
    let m = d
        .map
        .as_ref()
        .ok_or_else(|| bad(format!("disk {disk} has no map")))?;
    let root = Hash::parse(&m.root).ok_or_else(|| bad(format!("root {:?}", m.root)))?;
    let bs = store.block_size() as u64;
    Ok((
        MapRoot {
            root,
            nblocks: d.size.div_ceil(bs),
        },
        m.data_blocks,
    ))
}

/// The record form of a map.
pub fn point_map(root: &MapRoot, data_blocks: u64) -> PointMap {
    PointMap {
        root: root.root.to_hex(),
        data_blocks,
    }
}

/// Space in `vmref status`: the repository's bytes against the bytes of the points' images.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Space {
    /// Bytes the repository takes: packs and index objects.
    pub stored_bytes: u64,
    /// Distinct blobs (blocks and map nodes) and their bytes before compression.
    pub blobs: u64,
    pub raw_bytes: u64,
    /// Data (non-hole) bytes of every restorable point's images: what the store would take
    /// with neither compression nor dedup.
    pub logical_bytes: u64,
    /// `logical_bytes / stored_bytes` (0 for an empty repository).
    pub ratio: f64,
}

/// # Errors
/// A damaged index object; I/O failures.
pub fn space(store: &Store, data: &Data, refs: &[RefRecord]) -> Result<Space> {
    let st = data.repo.stats()?;
    let bs = store.block_size() as u64;
    let logical_bytes = refs
        .iter()
        .filter(|r| r.state == RefState::Restorable)
        .flat_map(|r| r.disks.values())
        .filter_map(|d| d.map.as_ref().map(|m| (m.data_blocks * bs).min(d.size)))
        .sum();
    let stored_bytes = st.pack_bytes + st.index_bytes;
    Ok(Space {
        stored_bytes,
        blobs: st.blobs,
        raw_bytes: st.raw_bytes,
        logical_bytes,
        ratio: if stored_bytes == 0 {
            0.0
        } else {
            logical_bytes as f64 / stored_bytes as f64
        },
    })
}
