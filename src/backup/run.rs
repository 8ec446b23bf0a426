//! `backup NAME`: open checkpoint NAME, copy its blocks into a new pack per disk (all non-zero
//! blocks for a full backup, the blocks changed since the base point for an incremental one),
//! write each disk's complete index, commit the point as restorable, drop the checkpoint.
//!
//! The VM keeps writing through the live disks the whole time: the copy reads the checkpoint
//! image (`cow`). Cost of an incremental: the changed blocks plus one index copy. Commit
//! order: packs, then indexes, then the point's record (the commit point); a crash before the
//! record leaves only unreferenced files, collected later (`gc`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::ImageSource;
use crate::store::now_unix;
use crate::store::records::{BackupInfo, BackupKind, RefRecord, RefState};
use crate::track::seqmap::BlockRun;

use super::cow::{Checkpoint, CheckpointImage};
use super::index::{BlockIndex, Entry};
use super::pack::PackWriter;
use super::progress::Progress;
use super::{Owner, gc, is_zero, packs_dir};

/// Blocks are read from the checkpoint in chunks of about this many bytes.
const CHUNK: u64 = 4 << 20;

/// What one disk's copy did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskReport {
    pub disk: String,
    pub kind: BackupKind,
    /// Blocks read from the checkpoint.
    pub scanned_blocks: u64,
    /// Non-zero blocks stored in the new pack.
    pub stored_blocks: u64,
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
/// since `since` (default: the newest restorable point).
///
/// # Errors
/// A bad or existing name, a `since` that is not restorable, I/O failures (then no point
/// named `name` exists and the store is as before, less unreferenced files later collected).
pub fn backup(
    owner: &dyn Owner,
    name: &str,
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
    gc::mark_pending(store)?;
    let cp = owner.checkpoint_locked(name)?;
    let result = copy(owner, &cp, base.as_ref(), progress);
    // Demote: the copy is done (or failed); the saved blocks are no longer needed.
    owner.backup_state().end_checkpoint(name);
    match result {
        Ok(r) => {
            gc::clear_pending(store)?;
            Ok(r)
        }
        Err(e) => {
            if let Err(g) = gc::collect(store, Some(&owner.backup_state().packs))
                .and_then(|_| gc::clear_pending(store))
            {
                log::warn!("cleaning up after a failed backup: {g}");
            }
            Err(e)
        }
    }
}

fn copy(
    owner: &dyn Owner,
    cp: &Checkpoint,
    base: Option<&RefRecord>,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let store = owner.store();
    let mut warnings = Vec::new();
    let mut disks = Vec::new();
    let mut any_incremental = false;
    for (name, (live, _)) in &cp.disks {
        let image = cp.image(name)?;
        // Decide full or incremental for this disk; every way an incremental cannot be
        // trusted falls back to full, saying why.
        let mut plan: Option<(BlockIndex, Vec<BlockRun>)> = None;
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
                        Ok(runs) => match super::load_index(store, b, name) {
                            Ok(ix) => plan = Some((ix, runs)),
                            Err(e) => warnings.push(format!(
                                "the index of {} cannot be used ({e}): full copy of disk {name}",
                                b.name
                            )),
                        },
                    }
                }
            }
        }
        let incremental = plan.is_some();
        any_incremental |= incremental;
        let (ix, runs) = match plan {
            Some(p) => p,
            None => (
                BlockIndex::empty(store.block_size(), image.size()),
                data_runs(&image, store.block_size())?,
            ),
        };
        let (ix, report) = copy_disk(owner, name, &image, ix, &runs, incremental, progress)?;
        super::write_index(store, &cp.rec.id, name, &ix)?;
        disks.push(report);
    }
    progress.finish();
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
        ..cp.rec.clone()
    };
    // The commit point.
    store.write_ref(&point)?;
    Ok(BackupReport {
        point,
        disks,
        warnings,
    })
}

/// Block runs of the image's data extents (a full backup skips holes without reading them).
fn data_runs(image: &CheckpointImage, block_size: u32) -> Result<Vec<BlockRun>> {
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

fn copy_disk(
    owner: &dyn Owner,
    name: &str,
    image: &CheckpointImage,
    mut ix: BlockIndex,
    runs: &[BlockRun],
    incremental: bool,
    progress: &dyn Progress,
) -> Result<(BlockIndex, DiskReport)> {
    let store = owner.store();
    let bs = store.block_size() as u64;
    let size = image.size();
    let nblocks = ix.nblocks();
    let total: u64 = runs.iter().map(|r| r.count * bs).sum();
    progress.start(name, total);
    let mut report = DiskReport {
        disk: name.to_string(),
        kind: if incremental {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        },
        scanned_blocks: 0,
        stored_blocks: 0,
        stored_bytes: 0,
    };
    let mut writer: Option<(PackWriter, u32)> = None;
    let chunk_blocks = (CHUNK / bs).max(1);
    let mut buf = vec![0u8; (chunk_blocks * bs) as usize];
    for r in runs {
        let end = (r.start + r.count).min(nblocks);
        let mut b = r.start;
        while b < end {
            let n = (end - b).min(chunk_blocks);
            let off = b * bs;
            let len = (n * bs).min(size - off) as usize;
            let got = image.read_at(&mut buf[..len], off)?;
            if got != len {
                return Err(Error::ShortRead {
                    what: format!("checkpoint {name}"),
                    offset: off,
                });
            }
            for i in 0..n {
                let s = (i * bs) as usize;
                let block = &buf[s..(s + bs as usize).min(len)];
                let blk = (b + i) as usize;
                if is_zero(block) {
                    ix.entries[blk] = Entry::HOLE;
                    continue;
                }
                if writer.is_none() {
                    let w = PackWriter::create(&packs_dir(store), store.block_size())?;
                    let pos = ix.pack_slot(w.id());
                    writer = Some((w, pos));
                }
                let (w, pos) = writer.as_mut().expect("created above");
                let (slot, crc) = w.append(block)?;
                ix.entries[blk] = Entry {
                    pack: *pos,
                    slot,
                    crc,
                };
                report.stored_blocks += 1;
                report.stored_bytes += block.len() as u64;
            }
            report.scanned_blocks += n;
            progress.inc(n * bs);
            b += n;
        }
    }
    if let Some((w, _)) = writer {
        w.commit()?;
    }
    ix.compact();
    Ok((ix, report))
}
