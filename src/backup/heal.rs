//! `verify --repair`: store damaged blocks and map nodes again from good bytes found elsewhere.
//!
//! Every repair is proven by the hash the repository names the blob by, checked before
//! anything is written (`Repository::store_again`): a block's bytes must hash to the block's
//! hash; a map node is rebuilt from the blocks of the range it covers and must hash to the
//! node's hash (maps are canonical, `repo::map`: a node's bytes are a function of the blocks
//! under it). Tracking only picks where to look:
//! - a live disk, at a block or a node's range that tracking says was not written since the
//!   point (the same proof as `changes`);
//! - a replica image (`receive --apply`) of the disk, at the point its record names, unmodified
//!   since its apply, where that point's map has the same hash at the same place (the same
//!   block, or the same subtree: maps share unchanged subtrees);
//! - another store named with `--from` (the sender or receiver of replication): its
//!   repository, by hash, and its replica images as above.
//!
//! A node hides the blocks and nodes under it until it is repaired, so repair goes in rounds
//! (verify, repair, verify again) until a round repairs nothing. What no source proves stays
//! damaged and is reported by the final verify, point by point.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::live::LiveDisk;
use crate::repo::map::{FANOUT, MapRoot, node};
use crate::repo::repository::Repository;
use crate::repo::{BlobKind, BlobStore, Hash};
use crate::store::Store;
use crate::track::seqmap::BlockRun;

use super::data::{Data, map_of};
use super::is_zero;
use super::progress::Progress;
use super::verify::{Damage, VerifyReport, verify};

/// Rounds of verify and repair at most: each round reaches one more level of nodes hidden
/// under a damaged one (a map of a 1 TiB disk has three levels).
const MAX_ROUNDS: usize = 6;

/// A replica image and the map of the point it holds.
struct Replica {
    disk: String,
    image: PathBuf,
    file: File,
    size: u64,
    map: MapRoot,
    /// The repository its point's map is read from (this store's or a `--from` store's).
    repo: Arc<Repository>,
    what: String,
}

/// Another store named with `--from`.
struct Other {
    repo: Arc<Repository>,
    what: String,
}

const LIVE: &str = "the live disk";

/// Where good bytes may be found.
pub struct Sources<'a> {
    live: &'a [Arc<LiveDisk>],
    replicas: Vec<Replica>,
    others: Vec<Other>,
}

impl<'a> Sources<'a> {
    /// The live disks, this store's replica images and those `from` stores hold, and the
    /// repositories of the `from` stores.
    ///
    /// # Errors
    /// A `from` store that does not open.
    pub fn new(
        store: &Store,
        data: &Arc<Data>,
        live: &'a [Arc<LiveDisk>],
        from: &[PathBuf],
    ) -> Result<Sources<'a>> {
        let mut s = Sources {
            live,
            replicas: replicas_of(store, &data.repo, "")?,
            others: Vec::new(),
        };
        for root in from {
            let other = Store::open(root)?;
            let od = Data::open(&other)?;
            let repo = od.repo.clone();
            s.replicas.extend(replicas_of(
                &other,
                &repo,
                &format!(" of {}", root.display()),
            )?);
            s.others.push(Other {
                repo,
                what: format!("store {}", root.display()),
            });
        }
        Ok(s)
    }
}

/// The replica images of `store` that hold exactly their recorded point: no apply under way,
/// unmodified since the last one. Any other is skipped (logged): it proves nothing.
fn replicas_of(store: &Store, repo: &Arc<Repository>, whose: &str) -> Result<Vec<Replica>> {
    let mut out = Vec::new();
    for r in store.replicas()? {
        let usable = || -> Result<Replica> {
            if r.applying.is_some() {
                return Err(Error::Replication("an apply is under way".into()));
            }
            crate::replicate::replica::check_unmodified(&r)?;
            let rec = store.read_ref(&r.point)?;
            if rec.id != r.point_id {
                return Err(Error::Replication(format!(
                    "point {} is not the one applied",
                    r.point
                )));
            }
            let (map, _) = map_of(store, &rec, &r.disk)?;
            let file = File::open(&r.image).map_err(Error::io("open", &r.image))?;
            Ok(Replica {
                disk: r.disk.clone(),
                image: r.image.clone(),
                file,
                size: rec.disks[&r.disk].size,
                map,
                repo: repo.clone(),
                what: format!(
                    "the replica image {} (point {}{whose})",
                    r.image.display(),
                    r.point
                ),
            })
        };
        match usable() {
            Ok(x) => out.push(x),
            Err(e) => log::info!(
                "repair: not using the replica image {} of disk {}: {e}",
                r.image.display(),
                r.disk
            ),
        }
    }
    Ok(out)
}

/// Read block `b` of an image of `size` bytes, zero-padded to a whole block as it is stored.
fn read_block(file: &File, path: &Path, size: u64, b: u64, bs: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; bs as usize];
    let off = b * bs;
    if off < size {
        let len = bs.min(size - off) as usize;
        file.read_exact_at(&mut buf[..len], off)
            .map_err(Error::io("read", path))?;
    }
    Ok(buf)
}

/// A block's id as the repository names it (keyed in an encrypted one); zeros are holes.
fn block_hash(repo: &Repository, bytes: &[u8]) -> Hash {
    if is_zero(bytes) {
        Hash::ZERO
    } else {
        repo.id_of(bytes)
    }
}

fn entry_span(level: u8) -> u64 {
    1u64 << (node::FANOUT_BITS * level as u32)
}

/// Read node `h` straight from storage and check its level.
fn fetch_node(repo: &Repository, h: &Hash, level: u8) -> Result<node::Node> {
    let bytes = repo.get(BlobKind::Map, h)?;
    let n = node::decode(&bytes).map_err(|e| crate::repo::damaged(h, e.to_string()))?;
    if n.level != level {
        return Err(crate::repo::damaged(h, "map node at the wrong level"));
    }
    Ok(n)
}

/// The hash at `level`/`start` in `map`: a node's hash (the block's for level -1, written as
/// `None`), found by reading the nodes above it.
fn hash_at(repo: &Repository, map: &MapRoot, level: Option<u8>, pos: u64) -> Result<Hash> {
    if pos >= map.nblocks {
        return Ok(Hash::ZERO);
    }
    let mut h = map.root;
    let mut l = map.root_level();
    loop {
        if Some(l) == level || h.is_zero() {
            return Ok(h);
        }
        let n = fetch_node(repo, &h, l)?;
        let i = ((pos >> (node::FANOUT_BITS * l as u32)) as usize) & (FANOUT - 1);
        h = n.get(i);
        if l == 0 {
            return Ok(h);
        }
        l -= 1;
    }
}

/// A map node a point needs whose stored copy is unreadable.
#[derive(Debug, Clone)]
struct BadNode {
    hash: Hash,
    level: u8,
    start: u64,
}

/// Every node of `map` whose stored copy fails (nodes under it are not reached).
fn bad_nodes(repo: &Repository, map: &MapRoot, seen: &mut HashSet<Hash>) -> Vec<BadNode> {
    fn walk(
        repo: &Repository,
        map: &MapRoot,
        h: Hash,
        level: u8,
        start: u64,
        seen: &mut HashSet<Hash>,
        out: &mut Vec<BadNode>,
    ) {
        if h.is_zero() || !seen.insert(h) {
            return;
        }
        match fetch_node(repo, &h, level) {
            Err(_) => out.push(BadNode {
                hash: h,
                level,
                start,
            }),
            Ok(n) if level > 0 => {
                for (i, c) in n.entries.iter().enumerate() {
                    let s = start + i as u64 * entry_span(level);
                    if s < map.nblocks {
                        walk(repo, map, *c, level - 1, s, seen, out);
                    }
                }
            }
            Ok(_) => {}
        }
    }
    let mut out = Vec::new();
    walk(repo, map, map.root, map.root_level(), 0, seen, &mut out);
    out
}

/// A source of one point's bytes over a range: a file known to hold them there.
struct Bytes<'f> {
    file: &'f File,
    path: &'f Path,
    size: u64,
}

/// What one repair run did.
struct Healer<'s, 'a> {
    store: &'s Store,
    data: &'s Arc<Data>,
    src: &'s Sources<'a>,
    bs: u64,
    /// Blocks known damaged: re-stored whenever their bytes pass by.
    bad_blocks: HashSet<Hash>,
    /// Blobs stored again, and from where.
    fixed: HashMap<Hash, String>,
    /// Blobs every source was tried for.
    tried: HashSet<Hash>,
    /// Changed-since lists of the live disks, per (point, disk): None when unusable.
    changed: HashMap<(String, String), Option<Vec<BlockRun>>>,
    repaired: Vec<Damage>,
}

impl Healer<'_, '_> {
    /// The live disk `disk`, with the runs written since `point`, when tracking can say.
    fn live(&mut self, point: &str, disk: &str) -> Option<(Arc<LiveDisk>, Vec<BlockRun>)> {
        let l = self.src.live.iter().find(|l| l.name() == disk)?.clone();
        let store = self.store;
        let runs = self
            .changed
            .entry((point.to_string(), disk.to_string()))
            .or_insert_with(|| {
                let rec = store.read_ref(point).ok()?;
                let d = rec.disks.get(disk)?;
                (d.size == l.size())
                    .then(|| l.tracker().changed_since(point, d.seq).ok())
                    .flatten()
            })
            .clone()?;
        Some((l, runs))
    }

    /// Store `bytes` (from `from`) again as blob `h` if they are its bytes: the hash is
    /// checked before anything is written.
    fn offer(&mut self, kind: BlobKind, h: &Hash, bytes: &[u8], from: &str) -> Result<bool> {
        if self.fixed.contains_key(h) {
            return Ok(true);
        }
        if self.data.repo.store_again(kind, h, bytes)? {
            self.fixed.insert(*h, from.to_string());
            return Ok(true);
        }
        Ok(false)
    }

    /// Repair data block `h`, needed by `d.point` at block `b`. Returns whether it was.
    fn block(&mut self, d: &Damage, b: u64, h: Hash) -> Result<bool> {
        let src = self.src;
        if let Some((l, runs)) = self.live(&d.point, &d.disk)
            && !runs.iter().any(|r| r.start <= b && b < r.start + r.count)
        {
            let bytes = read_block(l.reader(), l.image(), l.size(), b, self.bs)?;
            if self.offer(BlobKind::Data, &h, &bytes, LIVE)? {
                return Ok(true);
            }
        }
        for r in &src.replicas {
            if r.disk != d.disk || hash_at(&r.repo, &r.map, None, b).ok() != Some(h) {
                continue;
            }
            let bytes = read_block(&r.file, &r.image, r.size, b, self.bs)?;
            if self.offer(BlobKind::Data, &h, &bytes, &r.what)? {
                return Ok(true);
            }
        }
        for o in &src.others {
            if let Ok(bytes) = o.repo.get(BlobKind::Data, &h)
                && self.offer(BlobKind::Data, &h, &bytes, &o.what)?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Rebuild the subtree at `n` from `src`'s blocks, storing again every node of it (and
    /// every block under it) whose stored copy is damaged, once the subtree's hash proves
    /// the bytes. Returns whether `n` was proven and stored.
    fn rebuild(&mut self, n: &BadNode, nblocks: u64, src: Bytes<'_>, from: &str) -> Result<bool> {
        let mut nodes: Vec<(Hash, Vec<u8>)> = Vec::new();
        let mut blocks: Vec<(Hash, Vec<u8>)> = Vec::new();
        let top = self.subtree(n.level, n.start, nblocks, &src, &mut nodes, &mut blocks)?;
        if top != n.hash {
            return Ok(false);
        }
        for (h, bytes) in blocks {
            self.offer(BlobKind::Data, &h, &bytes, from)?;
        }
        for (h, bytes) in nodes {
            self.offer(BlobKind::Map, &h, &bytes, from)?;
        }
        Ok(self.fixed.contains_key(&n.hash))
    }

    /// The hash of the subtree at `level`/`start` built from `src`; keeps the nodes whose
    /// stored copy fails and the known-damaged blocks met on the way.
    fn subtree(
        &self,
        level: u8,
        start: u64,
        nblocks: u64,
        src: &Bytes<'_>,
        nodes: &mut Vec<(Hash, Vec<u8>)>,
        blocks: &mut Vec<(Hash, Vec<u8>)>,
    ) -> Result<Hash> {
        let span = entry_span(level);
        let mut entries = Vec::with_capacity(FANOUT);
        for i in 0..FANOUT as u64 {
            let pos = start + i * span;
            if pos >= nblocks {
                break;
            }
            let h = if level == 0 {
                let bytes = read_block(src.file, src.path, src.size, pos, self.bs)?;
                let h = block_hash(&self.data.repo, &bytes);
                if self.bad_blocks.contains(&h) && !self.fixed.contains_key(&h) {
                    blocks.push((h, bytes));
                }
                h
            } else {
                self.subtree(level - 1, pos, nblocks, src, nodes, blocks)?
            };
            entries.push(h);
        }
        let Some(bytes) = node::encode(level, &entries) else {
            return Ok(Hash::ZERO);
        };
        let h = self.data.repo.id_of(&bytes);
        if !self.fixed.contains_key(&h) && self.data.repo.get(BlobKind::Map, &h).is_err() {
            nodes.push((h, bytes));
        }
        Ok(h)
    }

    /// Repair map node `n` of `point`'s map of `disk`. Returns whether it was.
    fn node(&mut self, point: &str, disk: &str, map: &MapRoot, n: &BadNode) -> Result<bool> {
        let src = self.src;
        for o in &src.others {
            if let Ok(bytes) = o.repo.get(BlobKind::Map, &n.hash)
                && self.offer(BlobKind::Map, &n.hash, &bytes, &o.what)?
            {
                return Ok(true);
            }
        }
        let end = (n.start + entry_span(n.level) * FANOUT as u64).min(map.nblocks);
        if let Some((l, runs)) = self.live(point, disk)
            && !runs
                .iter()
                .any(|r| r.start < end && n.start < r.start + r.count)
        {
            let bytes = Bytes {
                file: l.reader(),
                path: l.image(),
                size: l.size(),
            };
            if self.rebuild(n, map.nblocks, bytes, LIVE)? {
                return Ok(true);
            }
        }
        for r in &src.replicas {
            if r.disk != disk
                || r.map.nblocks != map.nblocks
                || hash_at(&r.repo, &r.map, Some(n.level), n.start).ok() != Some(n.hash)
            {
                continue;
            }
            let bytes = Bytes {
                file: &r.file,
                path: &r.image,
                size: r.size,
            };
            if self.rebuild(n, map.nblocks, bytes, &r.what)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One round: repair what `report` names. Returns whether anything was repaired.
    fn round(&mut self, report: &VerifyReport) -> Result<bool> {
        let before = self.fixed.len();
        self.bad_blocks.extend(
            report
                .damaged
                .iter()
                .filter_map(|d| d.hash.as_deref().and_then(Hash::parse)),
        );
        let mut maps: Vec<(String, String)> = Vec::new();
        for d in &report.damaged {
            match (d.block, d.hash.as_deref().and_then(Hash::parse)) {
                (Some(b), Some(h)) => {
                    if !self.fixed.contains_key(&h) && self.tried.insert(h) {
                        self.block(d, b, h)?;
                    }
                    if let Some(from) = self.fixed.get(&h) {
                        self.repaired.push(Damage {
                            what: format!("from {from}"),
                            ..d.clone()
                        });
                    }
                }
                _ => maps.push((d.point.clone(), d.disk.clone())),
            }
        }
        for (point, disk) in maps {
            // Per map: a node shared by points may be proven for one and not another.
            let mut seen = HashSet::new();
            let rec = self.store.read_ref(&point)?;
            let Ok((map, _)) = map_of(self.store, &rec, &disk) else {
                continue;
            };
            for n in bad_nodes(&self.data.repo, &map, &mut seen) {
                if !self.fixed.contains_key(&n.hash) {
                    self.node(&point, &disk, &map, &n)?;
                }
                if let Some(from) = self.fixed.get(&n.hash) {
                    let last = (n.start + entry_span(n.level) * FANOUT as u64).min(map.nblocks);
                    self.repaired.push(Damage {
                        point: point.clone(),
                        disk: disk.clone(),
                        block: None,
                        what: format!(
                            "map node of level {} (blocks {}..{last}) from {from}",
                            n.level, n.start
                        ),
                        hash: Some(n.hash.to_hex()),
                    });
                }
            }
        }
        self.data.repo.flush()?;
        Ok(self.fixed.len() > before)
    }
}

/// Verify, store damaged blocks and map nodes again from every source that proves their
/// bytes, in rounds until one repairs nothing, then verify again. The report's `damaged` is
/// what stays damaged, `repaired` what was stored again and from where.
///
/// # Errors
/// As `verify`; I/O failures storing repaired blobs.
pub fn repair(
    store: &Store,
    data: &Arc<Data>,
    sources: &Sources<'_>,
    point: Option<&str>,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    // Blobs stored again are needed by committed points: no collection may run meanwhile.
    let _guard = super::shared::WriteGuard::take(store, data, "verify --repair")?;
    let mut h = Healer {
        store,
        data,
        src: sources,
        bs: store.block_size() as u64,
        bad_blocks: HashSet::new(),
        fixed: HashMap::new(),
        tried: HashSet::new(),
        changed: HashMap::new(),
        repaired: Vec::new(),
    };
    let mut report = verify(store, data, point, &super::NoProgress)?;
    for _ in 0..MAX_ROUNDS {
        if report.damaged.is_empty() || !h.round(&report)? {
            break;
        }
        // Nodes repaired this round uncover what is under them: try those too.
        h.tried.clear();
        report = verify(store, data, point, &super::NoProgress)?;
    }
    let mut report = verify(store, data, point, progress)?;
    super::data::save_damaged(store, &data.repo)?;
    h.repaired
        .sort_by(|a, b| (&a.point, &a.disk, a.block).cmp(&(&b.point, &b.disk, b.block)));
    h.repaired.dedup();
    report.repaired = h.repaired;
    Ok(report)
}
