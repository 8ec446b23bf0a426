//! `vmref upgrade`: convert a store's backup data from format 1 (a complete block index per
//! point and disk under `data/index`, raw slots in `data/packs`) to format 2 (the
//! content-addressed repository under `repo/`, one shared map per point and disk). Opening a
//! format 1 store with the engine (mount, backup, ...) runs it too.
//!
//! Nothing half-applied (invariant 8): the format 1 files are only read until the end. Each
//! point's blocks and map go into the repository (made durable), then its record gains its map
//! roots (renamed in; format 1 readers ignore the new field); the store's meta file switching
//! to format 2 is the commit point; only then are the format 1 files removed. A kill at any
//! moment leaves a format 1 store that opens and upgrades again from the start (blocks already
//! stored dedup), or a format 2 store whose leftover format 1 files the next open removes.
//! Every block is checked against its format 1 CRC before it is stored: a damaged point stops
//! the upgrade, naming it, with the store still in format 1.

pub mod v1index;
pub mod v1pack;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::backup::Progress;
use crate::backup::data::{Data, point_map};
use crate::error::{Error, Result};
use crate::format::{FormatError, crc};
use crate::repo::map::{MapBuilder, MapRoot};
use crate::repo::{BlobKind, BlobStore, Hash};
use crate::store::records::{RefRecord, RefState};
use crate::store::{STORE_FORMAT, Store, atomic};

use v1index::BlockIndex;
use v1pack::PackCache;

/// What an upgrade did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// The store's format before (equal to `to` when there was nothing to do).
    pub from: u32,
    pub to: u32,
    /// Restorable points converted.
    pub points: u64,
    /// Stored blocks read from format 1 packs (each once per point that changed it).
    pub blocks: u64,
}

fn v1_packs(store: &Store) -> PathBuf {
    store.data_dir().join("packs")
}
fn v1_index(store: &Store) -> PathBuf {
    store.data_dir().join("index")
}
fn v1_index_path(store: &Store, ref_id: &str, disk: &str) -> PathBuf {
    v1_index(store).join(format!("{ref_id}.{disk}.idx"))
}

/// Upgrade `store` to the current format if it is older; remove format 1 leftovers of an
/// upgrade that committed but did not finish. Needs the store lock.
///
/// # Errors
/// `Format` naming a damaged format 1 point or index (the store stays in format 1); I/O
/// failures (likewise).
pub fn upgrade(store: &mut Store, progress: &dyn Progress) -> Result<UpgradeReport> {
    let from = store.format();
    let mut report = UpgradeReport {
        from,
        to: STORE_FORMAT,
        ..Default::default()
    };
    if from >= STORE_FORMAT {
        remove_v1(store)?;
        return Ok(report);
    }
    log::info!(
        "upgrading store {} from format {from}",
        store.root().display()
    );
    let data = Data::open_repo(store, true)?;
    let packs = PackCache::new(v1_packs(store), store.block_size());
    // Per disk: the previous point's index and map, so a point reads only the blocks whose
    // slot differs from the point before it (an incremental's changes), not the whole disk.
    let mut prev: BTreeMap<String, (BlockIndex, MapRoot, u64)> = BTreeMap::new();
    let points: Vec<RefRecord> = store
        .refs()?
        .into_iter()
        .filter(|r| r.state == RefState::Restorable)
        .collect();
    let total: u64 = points.len() as u64;
    progress.start("upgrade", total);
    test_abort_hook(&report.points.to_string());
    for rec in points {
        let mut disks = rec.disks.clone();
        for (disk, rd) in disks.iter_mut() {
            let ix = load_v1_index(store, &rec, disk, rd.size)?;
            let (map, data_blocks, read) = convert(&data, &packs, &rec, disk, &ix, prev.get(disk))?;
            report.blocks += read;
            rd.map = Some(point_map(&map, data_blocks));
            prev.insert(disk.clone(), (ix, map, data_blocks));
        }
        data.repo.flush()?;
        store.write_ref(&RefRecord { disks, ..rec })?;
        report.points += 1;
        progress.inc(1);
        test_abort_hook(&report.points.to_string());
    }
    progress.finish();
    // The commit point.
    store.set_format(STORE_FORMAT)?;
    test_abort_hook("commit");
    remove_v1(store)?;
    Ok(report)
}

/// Crash tests (tests/upgrade.rs) kill an upgrade at each step: with
/// `VMREF_TEST_UPGRADE_ABORT_AFTER=N` the process aborts once N points are converted (0: with
/// the repository made, before the first point), with `=commit` right after the store switched
/// to format 2, before the format 1 files are removed. Unset, it costs one lookup per point.
fn test_abort_hook(step: &str) {
    if std::env::var_os("VMREF_TEST_UPGRADE_ABORT_AFTER").is_some_and(|v| v == step) {
        std::process::abort();
    }
}

/// The map of one disk of one point: built from scratch, or as the previous point's map
/// updated with the blocks whose stored slot differs.
fn convert(
    data: &Data,
    packs: &PackCache,
    rec: &RefRecord,
    disk: &str,
    ix: &BlockIndex,
    prev: Option<&(BlockIndex, MapRoot, u64)>,
) -> Result<(MapRoot, u64, u64)> {
    let bs = ix.block_size;
    let mut buf = vec![0u8; bs as usize];
    let mut read = 0u64;
    let mut hash_of = |b: usize| -> Result<Hash> {
        let e = ix.entries[b];
        if e.is_hole() {
            return Ok(Hash::ZERO);
        }
        let id = ix.packs[e.pack as usize];
        packs.get(id)?.read_slots(e.slot, &mut buf, bs)?;
        let c = crc(&buf);
        if c != e.crc {
            return Err(Error::Format {
                path: packs.dir().to_path_buf(),
                source: FormatError::Invalid {
                    what: "stored block",
                    why: format!(
                        "point {} disk {disk} block {b} (pack {id} slot {}): checksum {c:#010x}, expected {:#010x}; delete the point (`vmref ref delete {}`) and upgrade again",
                        rec.name, e.slot, e.crc, rec.name
                    ),
                },
            });
        }
        read += 1;
        data.repo.put(BlobKind::Data, &buf)
    };
    let nblocks = ix.entries.len() as u64;
    match prev {
        Some((pix, pmap, pdata)) if pix.entries.len() == ix.entries.len() => {
            let same = |b: usize| {
                let (e, p) = (ix.entries[b], pix.entries[b]);
                match (e.is_hole(), p.is_hole()) {
                    (true, true) => true,
                    (false, false) => {
                        ix.packs[e.pack as usize] == pix.packs[p.pack as usize]
                            && e.slot == p.slot
                            && e.crc == p.crc
                    }
                    _ => false,
                }
            };
            let mut changes = Vec::new();
            let mut data_blocks = *pdata as i64;
            for b in 0..ix.entries.len() {
                if same(b) {
                    continue;
                }
                let h = hash_of(b)?;
                let was_hole = pix.entries[b].is_hole();
                data_blocks += match (was_hole, h.is_zero()) {
                    (true, false) => 1,
                    (false, true) => -1,
                    _ => 0,
                };
                changes.push((b as u64, h));
            }
            let map = data.maps.update(pmap, changes)?;
            Ok((map, data_blocks.max(0) as u64, read))
        }
        _ => {
            let mut builder = MapBuilder::new(&*data.repo, nblocks);
            let mut data_blocks = 0;
            for b in 0..ix.entries.len() {
                let h = hash_of(b)?;
                if !h.is_zero() {
                    builder.push(b as u64, h)?;
                    data_blocks += 1;
                }
            }
            Ok((builder.finish()?, data_blocks, read))
        }
    }
}

/// Load and check a format 1 index.
fn load_v1_index(store: &Store, rec: &RefRecord, disk: &str, size: u64) -> Result<BlockIndex> {
    let path = v1_index_path(store, &rec.id, disk);
    let fmt = |source| Error::Format {
        path: path.clone(),
        source,
    };
    let bytes = std::fs::read(&path).map_err(|e| {
        fmt(FormatError::Invalid {
            what: "block index",
            why: format!("point {} disk {disk}: cannot read: {e}", rec.name),
        })
    })?;
    let ix = BlockIndex::decode(&bytes).map_err(fmt)?;
    if ix.block_size != store.block_size() || ix.disk_size != size {
        return Err(fmt(FormatError::Invalid {
            what: "block index",
            why: format!(
                "describes {} bytes in blocks of {}, point {} has {} bytes in blocks of {}",
                ix.disk_size,
                ix.block_size,
                rec.name,
                size,
                store.block_size()
            ),
        }));
    }
    Ok(ix)
}

/// Remove format 1 packs, indexes and markers (idempotent).
fn remove_v1(store: &Store) -> Result<()> {
    for d in [v1_packs(store), v1_index(store)] {
        match std::fs::remove_dir_all(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &d)(e)),
        }
    }
    let marker = store.data_dir().join("gc.pending");
    if marker.exists() {
        atomic::remove_durable(&marker)?;
    }
    Ok(())
}
