//! `backup NAME`: open checkpoint NAME, copy its blocks into the repository (all non-zero
//! blocks for a full backup, the blocks changed since the base point for an incremental one),
//! make each disk's map (a full backup builds it, an incremental updates the base's: only the
//! nodes over changed blocks are new), commit the point as restorable, drop the checkpoint.
//!
//! The VM keeps writing through the live disks the whole time: the copy reads the checkpoint
//! image (`cow`). Cost of an incremental: the changed blocks not already stored, plus a few map
//! nodes per changed region, whatever the disk's size. Commit order: blocks and map nodes made
//! durable in the repository (`Repository::flush`), then the point's record (the commit
//! point); a crash before the record leaves only unreferenced blobs, collected by the next
//! prune (`gc`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::ImageSource;
use crate::store::now_unix;
use crate::store::records::{BackupInfo, BackupKind, RefRecord, RefState};
use crate::track::seqmap::BlockRun;

use crate::repo::map::{MapBuilder, MapRoot};
use crate::repo::repository::Repository;
use crate::repo::{BlobKind, Hash};

use super::cow::{Checkpoint, CheckpointImage};
use super::data::{Data, map_of, point_map};
use super::progress::Progress;
use super::{Owner, is_zero};

/// Blocks are read from the checkpoint in chunks of about this many bytes.
const CHUNK: u64 = 4 << 20;

/// What one disk's copy did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskReport {
    pub disk: String,
    pub kind: BackupKind,
    /// Blocks read from the checkpoint.
    pub scanned_blocks: u64,
    /// Non-zero blocks copied (read, hashed and put into the repository).
    pub stored_blocks: u64,
    /// Bytes the repository grew by for this disk: new blocks after dedup and compression,
    /// and map nodes.
    pub stored_bytes: u64,
}

/// What a backup did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupReport {
    pub point: RefRecord,
    pub disks: Vec<DiskReport>,
    /// For stderr: e.g. why an incremental fell back to full.
    pub warnings: Vec<String>,
}

/// Take a backup named `name`: full when `full` or when there is no base, else incremental
/// since `since` (default: the newest restorable point, of any owner). The point belongs to
/// `point_owner` (a `prune --owner` of that owner is the only prune that may remove it).
///
/// # Errors
/// A bad or existing name, a `since` that is not restorable, I/O failures (then no point
/// named `name` exists and the store is as before, less unreferenced files later collected).
pub fn backup(
    owner: &dyn Owner,
    name: &str,
    point_owner: Option<&str>,
    full: bool,
    since: Option<&str>,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    crate::names::validate(name)?;
    if full && since.is_some() {
        return Err(Error::BadArgument(
            "--full and --since exclude each other".into(),
        ));
    }
    let store = owner.store();
    let _op = owner.lock_ops();
    if store.ref_exists(name) {
        return Err(Error::RefExists(name.to_string()));
    }
    let base = match since {
        Some(s) => {
            let r = store.read_ref(s)?;
            if r.state != RefState::Restorable {
                return Err(Error::NotRestorable(s.to_string()));
            }
            Some(r)
        }
        None if full => None,
        None => store
            .refs()?
            .into_iter()
            .rfind(|r| r.state == RefState::Restorable),
    };
    super::ensure_dirs(store)?;
    // Before the first index lookup: no collection removes what this backup dedups against.
    let guard = super::shared::WriteGuard::take(store, &owner.backup_state().data, "backup")?;
    let cp = owner.checkpoint_locked(name, point_owner)?;
    let result = copy(owner, &cp, base.as_ref(), &guard, progress);
    // Demote: the copy is done (or failed); the saved blocks are no longer needed. Blobs a
    // failed copy stored are garbage for the next collection.
    owner.backup_state().end_checkpoint(name);
    result
}

fn copy(
    owner: &dyn Owner,
    cp: &Checkpoint,
    base: Option<&RefRecord>,
    guard: &super::shared::WriteGuard<'_>,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let store = owner.store();
    let mut warnings = Vec::new();
    let mut disks = Vec::new();
    let mut any_incremental = false;
    let mut points = cp.rec.disks.clone();
    for (name, (live, _)) in &cp.disks {
        let image = cp.image(name)?;
        // Decide full or incremental for this disk; every way an incremental cannot be
        // trusted falls back to full, saying why.
        let mut plan: Option<(MapRoot, u64, Vec<BlockRun>)> = None;
        if let Some(b) = base {
            match b.disks.get(name) {
                None => warnings.push(format!(
                    "disk {name} was not in {}: full copy of it",
                    b.name
                )),
                Some(bd) if bd.size != image.size() => warnings.push(format!(
                    "disk {name} changed size since {}: full copy of it",
                    b.name
                )),
                Some(bd) => {
                    let changed = live.tracker().changed_since(&b.name, bd.seq);
                    match changed {
                        Err(e) => warnings.push(format!("{e}: full copy of disk {name}")),
                        Ok(runs) => match map_of(store, b, name) {
                            Ok((map, data_blocks)) => plan = Some((map, data_blocks, runs)),
                            Err(e) => warnings.push(format!(
                                "the map of {} cannot be used ({e}): full copy of disk {name}",
                                b.name
                            )),
                        },
                    }
                }
            }
        }
        let incremental = plan.is_some();
        any_incremental |= incremental;
        let data = &owner.backup_state().data;
        let before = data.repo.added().1;
        let mut copier = Copier {
            data,
            name,
            image: &image,
            bs: store.block_size() as u64,
            scanned: 0,
            stored: 0,
        };
        let (map, data_blocks) = match plan {
            Some((base_map, base_blocks, runs)) => {
                copier.changes(base_map, base_blocks, &runs, progress)?
            }
            None => {
                let runs = data_runs(&image, store.block_size())?;
                copier.full(&runs, progress)?
            }
        };
        let (scanned_blocks, stored_blocks) = (copier.scanned, copier.stored);
        let mut rd = cp.rec.disks.get(name).cloned().ok_or_else(|| {
            Error::Internal(format!("checkpoint {} has no disk {name}", cp.rec.name))
        })?;
        rd.map = Some(point_map(&map, data_blocks));
        points.insert(name.clone(), rd);
        disks.push(DiskReport {
            disk: name.clone(),
            kind: if incremental {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            scanned_blocks,
            stored_blocks,
            stored_bytes: data.repo.added().1 - before,
        });
    }
    progress.finish();
    // Blocks and map nodes durable before the record that names them.
    owner.backup_state().data.repo.flush()?;
    let point = RefRecord {
        state: RefState::Restorable,
        backup: Some(BackupInfo {
            kind: if any_incremental {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            since: base.filter(|_| any_incremental).map(|b| b.name.clone()),
            stored_blocks: disks.iter().map(|d| d.stored_blocks).sum(),
            stored_bytes: disks.iter().map(|d| d.stored_bytes).sum(),
            finished_unix: now_unix(),
        }),
        disks: points,
        ..cp.rec.clone()
    };
    // Published before the commit point, so that no other store's collection can miss it.
    guard.publish(&point)?;
    // The commit point.
    store.write_ref(&point)?;
    // Every flush adds an index object and a dedup lookup that misses reads one bucket of
    // each: fold them now and then, so backups stay as fast as the first.
    if let Err(e) = owner
        .backup_state()
        .data
        .repo
        .merge_index(MAX_INDEX_OBJECTS)
    {
        warnings.push(format!("merging the repository's index objects: {e}"));
    }
    Ok(BackupReport {
        point,
        disks,
        warnings,
    })
}

/// Block runs of the image's data extents (a full backup skips holes without reading them).
pub fn data_runs(image: &CheckpointImage, block_size: u32) -> Result<Vec<BlockRun>> {
    let bs = block_size as u64;
    let size = image.size();
    let mut runs: Vec<BlockRun> = Vec::new();
    let mut pos = 0;
    while let Some(d) = image.next_data(pos)? {
        let h = image.next_hole(d)?.max(d + 1).min(size);
        let (first, end) = (d / bs, h.div_ceil(bs));
        match runs.last_mut() {
            Some(r) if r.start + r.count >= first => r.count = r.count.max(end - r.start),
            _ => runs.push(BlockRun {
                start: first,
                count: end - first,
            }),
        }
        pos = end * bs;
        if pos >= size {
            break;
        }
    }
    Ok(runs)
}

/// One disk's copy: the repository it writes to and what it did.
struct Copier<'a> {
    data: &'a Data,
    name: &'a str,
    image: &'a CheckpointImage,
    bs: u64,
    scanned: u64,
    stored: u64,
}

impl Copier<'_> {
    /// Read `runs` of the checkpoint in large chunks and hand each block (zero-padded to a
    /// whole block at the disk's end) with its number to `each`.
    fn for_each_block(
        &mut self,
        runs: &[BlockRun],
        progress: &dyn Progress,
        mut each: impl FnMut(u64, Hash) -> Result<()>,
    ) -> Result<()> {
        let bs = self.bs;
        let size = self.image.size();
        let nblocks = size.div_ceil(bs);
        let chunk_blocks = (CHUNK / bs).max(1);
        let mut buf = vec![0u8; (chunk_blocks * bs) as usize];
        for r in runs {
            let end = (r.start + r.count).min(nblocks);
            let mut b = r.start;
            while b < end {
                let n = (end - b).min(chunk_blocks);
                let off = b * bs;
                let len = (n * bs).min(size - off) as usize;
                let got = self.image.read_at(&mut buf[..len], off)?;
                if got != len {
                    return Err(Error::ShortRead {
                        what: format!("checkpoint of disk {}", self.name),
                        offset: off + got as u64,
                    });
                }
                // The short last block is stored zero-padded, as a whole block.
                buf[len..(n * bs) as usize].fill(0);
                let chunk = &buf[..(n * bs) as usize];
                let hashes = put_blocks(&self.data.repo, chunk, bs as usize)?;
                for (i, h) in hashes.into_iter().enumerate() {
                    if !h.is_zero() {
                        self.stored += 1;
                    }
                    each(b + i as u64, h)?;
                }
                self.scanned += n;
                progress.inc(len as u64);
                b += n;
            }
        }
        Ok(())
    }

    /// A full copy: every data run, streamed into a new map (one node per level in memory).
    fn full(&mut self, runs: &[BlockRun], progress: &dyn Progress) -> Result<(MapRoot, u64)> {
        progress.start(self.name, runs.iter().map(|r| r.count * self.bs).sum());
        let nblocks = self.image.size().div_ceil(self.bs);
        let repo = self.data.repo.clone();
        let mut builder = MapBuilder::new(&*repo, nblocks);
        let mut data_blocks = 0u64;
        self.for_each_block(runs, progress, |b, h| {
            if !h.is_zero() {
                data_blocks += 1;
                builder.push(b, h)?;
            }
            Ok(())
        })?;
        Ok((builder.finish()?, data_blocks))
    }

    /// An incremental copy: the changed blocks, applied to the base's map in batches, so
    /// memory holds one chunk and one batch however many blocks changed. The data-block count
    /// follows each change's old hash, read from the (cached) leaves the update reads anyway.
    fn changes(
        &mut self,
        base: MapRoot,
        base_blocks: u64,
        runs: &[BlockRun],
        progress: &dyn Progress,
    ) -> Result<(MapRoot, u64)> {
        progress.start(self.name, runs.iter().map(|r| r.count * self.bs).sum());
        let maps = self.data.maps.clone();
        let mut data_blocks = base_blocks;
        let mut map = base;
        let mut batch: Vec<(u64, Hash)> = Vec::new();
        let mut apply = |batch: &mut Vec<(u64, Hash)>, map: &mut MapRoot| -> Result<()> {
            for (b, h) in batch.iter() {
                let old = maps.lookup(map, *b)?;
                match (old.is_zero(), h.is_zero()) {
                    (true, false) => data_blocks += 1,
                    (false, true) => data_blocks -= 1,
                    _ => {}
                }
            }
            *map = maps.update(map, batch.drain(..))?;
            Ok(())
        };
        self.for_each_block(runs, progress, |b, h| {
            batch.push((b, h));
            if batch.len() >= UPDATE_BATCH {
                apply(&mut batch, &mut map)?;
            }
            Ok(())
        })?;
        apply(&mut batch, &mut map)?;
        Ok((map, data_blocks))
    }
}

/// Hash, compress and store the blocks of `chunk` (zero blocks become holes), the compression
/// spread over the cores (where a backup spends its CPU), the blocks appended to packs in block
/// order. Hashes come back in block order.
fn put_blocks(repo: &Repository, chunk: &[u8], bs: usize) -> Result<Vec<Hash>> {
    let blocks: Vec<&[u8]> = chunk.chunks(bs).collect();
    let data: Vec<&[u8]> = blocks.iter().copied().filter(|b| !is_zero(b)).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let mut stored = repo.put_many(BlobKind::Data, &data, threads)?.into_iter();
    Ok(blocks
        .iter()
        .map(|b| {
            if is_zero(b) {
                Hash::ZERO
            } else {
                stored.next().expect("one hash per data block")
            }
        })
        .collect())
}

/// Index objects the repository may hold before a backup folds them into one.
const MAX_INDEX_OBJECTS: usize = 16;

/// Changed blocks applied to a map at a time: bounds memory (40 bytes each) for a large
/// incremental, at the price of rewriting a few upper nodes once per batch.
const UPDATE_BATCH: usize = 1 << 16;
