//! Published points: what a store tells the other users of a shared repository about its
//! restorable points, so that their garbage collection keeps the blobs those points need and
//! another host can mount them without the store.
//!
//! Objects (in the repository's backend, sealed like everything else when it is encrypted):
//! - `snapshots/<store-id>/<point-id>`: one restorable point (or, with `partial`, the maps of
//!   a receive cut short, which a resume builds on) — its name, owner, creation time and per
//!   disk the size, block size and map root.
//! - `stores/<store-id>`: the store has published every point it holds. `init --attach`
//!   refuses a repository that holds data but no such object: a store made before points were
//!   published may still have unpublished points, which another store's collection would
//!   take for garbage.
//!
//! Both are envelopes (`format.rs`) with their own magics. Names are never reused for other
//! bytes: a point's id is random and a point is never changed once restorable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, Kind};
use crate::repo::Hash;
use crate::repo::backend::{Backend, is_missing};
use crate::repo::map::MapRoot;

pub const SNAPSHOT: Kind = Kind {
    magic: b"VMREFSNP",
    major: 1,
    minor: 0,
};
pub const STORE_MARK: Kind = Kind {
    magic: b"VMREFSMK",
    major: 1,
    minor: 0,
};

pub const SNAPSHOTS: &str = "snapshots/";
pub const STORES: &str = "stores/";

/// One published point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub store_id: String,
    pub point_id: String,
    pub name: String,
    pub created_unix: u64,
    #[serde(default)]
    pub owner: Option<String>,
    pub block_size: u32,
    /// The maps of a partial receive: roots for collection, not a point to restore.
    #[serde(default)]
    pub partial: bool,
    pub disks: BTreeMap<String, SnapDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapDisk {
    pub size: u64,
    /// Hex id of the root node of the disk's map.
    pub root: String,
    /// Blocks that hold data (not holes).
    #[serde(default)]
    pub data_blocks: u64,
}

/// What `stores/<id>` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMark {
    pub store_id: String,
    pub host: String,
    pub path: String,
    pub since_unix: u64,
}

impl Snapshot {
    pub fn object_name(&self) -> String {
        object_name(&self.store_id, &self.point_id)
    }

    /// The map of each disk, by name.
    ///
    /// # Errors
    /// `Format` for a root that is not a hash.
    pub fn roots(&self) -> Result<Vec<(String, MapRoot)>> {
        let bs = self.block_size.max(1) as u64;
        self.disks
            .iter()
            .map(|(name, d)| {
                let root = Hash::parse(&d.root).ok_or_else(|| {
                    invalid(
                        &self.object_name(),
                        format!("disk {name}: map root {:?}", d.root),
                    )
                })?;
                Ok((
                    name.clone(),
                    MapRoot {
                        root,
                        nblocks: d.size.div_ceil(bs),
                    },
                ))
            })
            .collect()
    }
}

pub fn object_name(store_id: &str, point_id: &str) -> String {
    format!("{SNAPSHOTS}{store_id}/{point_id}")
}

fn invalid(name: &str, why: String) -> Error {
    Error::Format {
        path: format!("repository object {name}").into(),
        source: format::FormatError::Invalid {
            what: "published point",
            why,
        },
    }
}

pub fn encode(s: &Snapshot) -> Vec<u8> {
    format::encode(SNAPSHOT, s)
}

/// # Errors
/// `FormatError` for damaged bytes.
pub fn decode(bytes: &[u8]) -> std::result::Result<Snapshot, format::FormatError> {
    format::decode(SNAPSHOT, bytes)
}

/// Publish `s` (durable when it returns). Publishing the same point twice is not an error.
///
/// # Errors
/// I/O or server failures.
pub fn publish(backend: &dyn Backend, s: &Snapshot) -> Result<()> {
    backend.put_if_absent(&s.object_name(), &encode(s))?;
    Ok(())
}

/// Read one published point.
///
/// # Errors
/// `missing` when it is gone (deleted meanwhile); `Format` for damage; I/O failures.
pub fn read(backend: &dyn Backend, name: &str) -> Result<Snapshot> {
    let bytes = backend.get(name)?;
    let s = decode(&bytes).map_err(|source| Error::Format {
        path: format!("repository object {name}").into(),
        source,
    })?;
    if s.object_name() != name {
        return Err(invalid(
            name,
            format!("it names itself {}", s.object_name()),
        ));
    }
    Ok(s)
}

/// `(store id, point id)` of every published point, of one store or of all.
///
/// # Errors
/// I/O or server failures.
pub fn list(backend: &dyn Backend, store_id: Option<&str>) -> Result<Vec<(String, String)>> {
    let prefix = match store_id {
        Some(id) => format!("{SNAPSHOTS}{id}/"),
        None => SNAPSHOTS.to_string(),
    };
    Ok(backend
        .list(&prefix)?
        .into_iter()
        .filter_map(|n| {
            let rest = n.strip_prefix(SNAPSHOTS)?;
            let (s, p) = rest.split_once('/')?;
            (!p.contains('/')).then(|| (s.to_string(), p.to_string()))
        })
        .collect())
}

/// Every published point of every store but `except`, read. A point deleted between the
/// listing and the read is skipped (its store deleted it: nothing of it is needed).
///
/// # Errors
/// A damaged published point (a collection must not guess what it needs); I/O failures.
pub fn read_all(backend: &dyn Backend, except: Option<&str>) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    for (s, p) in list(backend, None)? {
        if Some(s.as_str()) == except {
            continue;
        }
        match read(backend, &object_name(&s, &p)) {
            Ok(snap) => out.push(snap),
            Err(e) if is_missing(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

pub fn store_mark_name(store_id: &str) -> String {
    format!("{STORES}{store_id}")
}

/// Record that `m.store_id` has published every point it holds.
///
/// # Errors
/// I/O or server failures.
pub fn mark_store(backend: &dyn Backend, m: &StoreMark) -> Result<()> {
    backend.put_if_absent(
        &store_mark_name(&m.store_id),
        &format::encode(STORE_MARK, m),
    )?;
    Ok(())
}

/// What `stores/<id>` says.
///
/// # Errors
/// `Format` for a damaged mark; I/O or server failures (missing included).
pub fn read_mark(backend: &dyn Backend, store_id: &str) -> Result<StoreMark> {
    let name = store_mark_name(store_id);
    format::decode(STORE_MARK, &backend.get(&name)?).map_err(|source| Error::Format {
        path: format!("repository object {name}").into(),
        source,
    })
}

/// Ids of the stores that have published their points.
///
/// # Errors
/// I/O or server failures.
pub fn marked_stores(backend: &dyn Backend) -> Result<Vec<String>> {
    Ok(backend
        .list(STORES)?
        .into_iter()
        .filter_map(|n| n.strip_prefix(STORES).map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::backend::MemBackend;

    fn sample() -> Snapshot {
        let mut disks = BTreeMap::new();
        disks.insert(
            "disk0".into(),
            SnapDisk {
                size: (1 << 20) + 1,
                root: Hash([7; 32]).to_hex(),
                data_blocks: 3,
            },
        );
        Snapshot {
            store_id: "00ff".into(),
            point_id: "abcd".into(),
            name: "nightly-1".into(),
            created_unix: 1_700_000_000,
            owner: Some("veeam".into()),
            block_size: 65536,
            partial: false,
            disks,
        }
    }

    #[test]
    fn round_trip_and_roots() {
        let s = sample();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        let roots = s.roots().unwrap();
        assert_eq!(roots[0].1.nblocks, 17);
        assert_eq!(roots[0].1.root, Hash([7; 32]));
    }

    #[test]
    fn every_flip_and_cut_is_refused() {
        let b = encode(&sample());
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x10;
            assert!(decode(&d).is_err(), "flip at {i}");
        }
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn publish_list_read_and_misnamed() {
        let be = MemBackend::default();
        let s = sample();
        publish(&be, &s).unwrap();
        publish(&be, &s).unwrap();
        let mut other = sample();
        other.store_id = "11ee".into();
        publish(&be, &other).unwrap();
        assert_eq!(
            list(&be, Some("00ff")).unwrap(),
            vec![("00ff".into(), "abcd".into())]
        );
        assert_eq!(list(&be, None).unwrap().len(), 2);
        assert_eq!(read_all(&be, Some("00ff")).unwrap(), vec![other.clone()]);
        // A point copied under another store's name is not that store's.
        be.put_if_absent(&object_name("22dd", "abcd"), &encode(&s))
            .unwrap();
        assert!(read(&be, &object_name("22dd", "abcd")).is_err());
        assert!(read_all(&be, None).is_err());
    }

    #[test]
    fn store_marks() {
        let be = MemBackend::default();
        assert!(marked_stores(&be).unwrap().is_empty());
        let m = StoreMark {
            store_id: "00ff".into(),
            host: "h".into(),
            path: "/s".into(),
            since_unix: 1,
        };
        mark_store(&be, &m).unwrap();
        mark_store(&be, &m).unwrap();
        assert_eq!(marked_stores(&be).unwrap(), vec!["00ff".to_string()]);
    }
}
