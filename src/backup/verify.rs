//! `verify [REF]`: read every map node and stored block the chosen points need and check each
//! against its hash (invariant 5), naming each damaged block with every point and disk that
//! needs it. A block shared by many points (or stored once for many identical blocks) is read
//! once. Read-only: needs no store lock.
//!
//! Memory: one entry per distinct stored block the chosen points use (about 40 bytes), so a
//! verify of a multi-TiB repository holds a few hundred MiB; the daemon's read paths never do.

use serde::{Deserialize, Serialize};

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::repo::{BlobKind, BlobStore, Hash};
use crate::store::Store;
use crate::store::records::{RefRecord, RefState};

use super::data::{Data, map_of};
use super::progress::Progress;

/// One damaged block or file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Damage {
    pub point: String,
    pub disk: String,
    /// The disk block, or None when a whole map or map node is unreadable.
    pub block: Option<u64>,
    pub what: String,
    /// The damaged block's hash (hex), when a block is damaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// What verify found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub points: Vec<String>,
    pub checked_blocks: u64,
    pub checked_bytes: u64,
    pub damaged: Vec<Damage>,
    /// With `--repair`: the damaged blocks stored again from good bytes (then checked again:
    /// `damaged` is what stays damaged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<Damage>,
}

/// Verify one point, or every restorable point.
///
/// # Errors
/// `NoSuchRef`, `NotRestorable`, I/O failures listing the store. Damage is reported in the
/// result, not as an error.
pub fn verify(
    store: &Store,
    data: &Arc<Data>,
    point: Option<&str>,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let points: Vec<RefRecord> = match point {
        Some(p) => {
            let r = store.read_ref(p)?;
            if r.state != RefState::Restorable {
                return Err(crate::Error::NotRestorable(p.to_string()));
            }
            vec![r]
        }
        None => store
            .refs()?
            .into_iter()
            .filter(|r| r.state == RefState::Restorable)
            .collect(),
    };
    let mut report = VerifyReport {
        points: points.iter().map(|r| r.name.clone()).collect(),
        ..Default::default()
    };
    let bs = store.block_size() as u64;
    let total: u64 = points
        .iter()
        .flat_map(|r| r.disks.values())
        .filter_map(|d| d.map.as_ref().map(|m| m.data_blocks * bs))
        .sum();
    progress.start("verify", total);
    // From the repository itself, never from a local copy of its objects (an S3
    // repository's read cache): an object damaged or lost after it was cached must be named.
    let direct;
    let (maps, repo) = match data.repo.uncached()? {
        Some(r) => {
            direct = Data::new(Arc::new(r));
            (&direct.maps, &direct.repo)
        }
        None => (&data.maps, &data.repo),
    };
    // Each distinct block once: None = good, Some(why) = damaged.
    let mut seen: HashMap<Hash, Option<String>> = HashMap::new();
    for r in &points {
        for disk in r.disks.keys() {
            let damage = |block: Option<u64>, what: String| Damage {
                point: r.name.clone(),
                disk: disk.clone(),
                block,
                what,
                hash: None,
            };
            let map = match map_of(store, r, disk) {
                Ok((m, _)) => m,
                Err(e) => {
                    report.damaged.push(damage(None, e.to_string()));
                    continue;
                }
            };
            for run in maps.data_runs(&map, 0..map.nblocks) {
                let (b, h) = match run {
                    Ok(x) => x,
                    Err(e) => {
                        // A damaged map node hides the blocks under it: name the map.
                        report.damaged.push(damage(None, format!("point map: {e}")));
                        break;
                    }
                };
                let verdict = seen.entry(h).or_insert_with(|| {
                    report.checked_blocks += 1;
                    report.checked_bytes += bs;
                    progress.inc(bs);
                    // From storage, never from the read cache: a block cached before its
                    // stored copy was damaged must still be reported.
                    repo.get(BlobKind::Data, &h).err().map(|e| e.to_string())
                });
                if let Some(why) = verdict {
                    report.damaged.push(Damage {
                        hash: Some(h.to_hex()),
                        ..damage(Some(b), why.clone())
                    });
                }
            }
        }
    }
    progress.finish();
    report
        .damaged
        .sort_by(|a, b| (&a.point, &a.disk, a.block).cmp(&(&b.point, &b.disk, b.block)));
    // Known damaged from now on: the next backup of these bytes stores them again.
    let bad: Vec<Hash> = report
        .damaged
        .iter()
        .filter_map(|d| d.hash.as_deref().and_then(Hash::parse))
        .collect();
    if !bad.is_empty() {
        data.repo.mark_damaged(bad);
        if let Err(e) = super::data::save_damaged(store, &data.repo) {
            log::warn!("recording the damaged blocks: {e}");
        }
    }
    Ok(report)
}
