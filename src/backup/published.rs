//! A repository's published points (`snapshots/`, see `shared`) as the mount's point
//! directories: `vmref mount --repository` on a host that has none of the stores, to restore
//! or look at files after the VM's host is lost.
//!
//! A directory is named `STORE@POINT`. STORE is the last component of the store's path as its
//! mark (`stores/<id>`) records it where that is unique among the repository's stores, and that
//! name with the first 8 hex digits of the store's id otherwise (or the digits alone, for a
//! store without a readable mark). Published points never change under their object name, so
//! the listing reads only new ones, and lists again at most every `LIST_EVERY`: a point its
//! store deletes disappears within that time, and reads of it fail with EIO, never with
//! another point's bytes, once a collection removed its blocks.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::image::{ImageSource, PointEntry, PointList, PointSource};
use crate::repo::Hash;
use crate::repo::backend::{Backend, is_missing};
use crate::repo::map::MapRoot;
use crate::repo::snapshot::{self, Snapshot};

use super::data::Data;
use super::image::PointImage;

/// How long one listing of the repository's published points is served.
const LIST_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Listing {
    at: Option<Instant>,
    /// Every published point read so far, by object name.
    read: HashMap<String, Arc<Snapshot>>,
    /// Store ids and their names (see `store_name`; empty when unknown), read once.
    names: HashMap<String, String>,
    /// Directory name to point, as last listed.
    dirs: BTreeMap<String, Arc<Snapshot>>,
    list: PointList,
}

/// The published points of one repository.
pub struct Published {
    data: Arc<Data>,
    listing: Mutex<Listing>,
}

/// What a store's directories are called, before telling apart stores of one name.
fn store_name(backend: &dyn Backend, store_id: &str) -> Option<String> {
    let mark = snapshot::read_mark(backend, store_id).ok()?;
    Path::new(&mark.path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && !n.contains('@'))
}

/// The point's id in the mount: unique across stores.
fn entry_id(s: &Snapshot) -> String {
    format!("{}-{}", s.store_id, s.point_id)
}

impl Published {
    pub fn new(data: Arc<Data>) -> Published {
        Published {
            data,
            listing: Mutex::new(Listing::default()),
        }
    }

    fn relist(&self, l: &mut Listing) -> Result<()> {
        let backend = self.data.repo.backend().clone();
        let names: Vec<String> = snapshot::list(&*backend, None)?
            .into_iter()
            .map(|(s, p)| snapshot::object_name(&s, &p))
            .collect();
        l.read.retain(|n, _| names.contains(n));
        for n in &names {
            if l.read.contains_key(n) {
                continue;
            }
            match snapshot::read(&*backend, n) {
                Ok(s) => {
                    l.read.insert(n.clone(), Arc::new(s));
                }
                Err(e) if is_missing(&e) => {}
                // One damaged published point must not hide the others.
                Err(e) => log::warn!("skipping published point {n}: {e}"),
            }
        }
        let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in l.read.values() {
            if !l.names.contains_key(&s.store_id) {
                let n = store_name(&*backend, &s.store_id).unwrap_or_default();
                l.names.insert(s.store_id.clone(), n);
            }
            let ids = by_name.entry(l.names[&s.store_id].clone()).or_default();
            if !ids.contains(&s.store_id) {
                ids.push(s.store_id.clone());
            }
        }
        let mut labels: HashMap<String, String> = HashMap::new();
        for (name, ids) in by_name {
            for id in &ids {
                let short = &id[..id.len().min(8)];
                let label = match (name.as_str(), ids.len()) {
                    ("", _) => short.to_string(),
                    (n, 1) => n.to_string(),
                    (n, _) => format!("{n}-{short}"),
                };
                labels.insert(id.clone(), label);
            }
        }
        let mut points: Vec<&Arc<Snapshot>> = l.read.values().filter(|s| !s.partial).collect();
        points.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
        l.dirs.clear();
        l.list.clear();
        for s in points {
            let dir = format!("{}@{}", labels[&s.store_id], s.name);
            l.list.push(PointEntry {
                name: dir.clone(),
                id: entry_id(s),
                disks: s.disks.iter().map(|(d, x)| (d.clone(), x.size)).collect(),
            });
            l.dirs.insert(dir, s.clone());
        }
        l.at = Some(Instant::now());
        Ok(())
    }
}

impl PointSource for Published {
    fn points(&self) -> Result<PointList> {
        let mut l = self.listing.lock();
        if l.at.is_none_or(|t| t.elapsed() >= LIST_EVERY) {
            self.relist(&mut l)?;
        }
        Ok(l.list.clone())
    }

    fn open(&self, point: &str, id: &str, disk: &str) -> Result<Arc<dyn ImageSource>> {
        let snap = {
            let l = self.listing.lock();
            l.dirs
                .get(point)
                .filter(|s| entry_id(s) == id)
                .cloned()
                .ok_or_else(|| Error::NoSuchRef(point.to_string()))?
        };
        let d = snap
            .disks
            .get(disk)
            .ok_or_else(|| Error::NoSuchDisk(format!("{disk} (in point {point})")))?;
        let root = Hash::parse(&d.root).ok_or_else(|| Error::Format {
            path: format!("repository object {}", snap.object_name()).into(),
            source: crate::format::FormatError::Invalid {
                what: "published point",
                why: format!("disk {disk}: map root {:?}", d.root),
            },
        })?;
        let bs = u64::from(snap.block_size.max(1));
        let map = MapRoot {
            root,
            nblocks: d.size.div_ceil(bs),
        };
        Ok(Arc::new(PointImage::from_map(
            self.data.clone(),
            map,
            d.size,
            bs,
            d.data_blocks,
        )))
    }
}
