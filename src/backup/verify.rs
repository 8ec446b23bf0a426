//! `verify [REF]`: read every stored block the chosen points need and check it against the
//! checksum in their indexes (invariant 5), naming each damaged block with every point and
//! disk that needs it. Each stored slot is read once however many points share it. Read-only:
//! needs no store lock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::format::crc;
use crate::store::Store;
use crate::store::records::{RefRecord, RefState};

use super::pack::{PackCache, PackId};
use super::progress::Progress;

/// Slots read per pread.
const RUN_SLOTS: u32 = 64;

/// One damaged block or file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Damage {
    pub point: String,
    pub disk: String,
    /// The disk block, or None when a whole index is unreadable.
    pub block: Option<u64>,
    pub what: String,
}

/// What verify found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub points: Vec<String>,
    pub checked_blocks: u64,
    pub checked_bytes: u64,
    pub damaged: Vec<Damage>,
}

struct Need {
    crc: u32,
    users: Vec<(usize, u64)>,
}

/// Verify one point, or every restorable point.
///
/// # Errors
/// `NoSuchRef`, `NotRestorable`, I/O failures listing the store. Damage is reported in the
/// result, not as an error.
pub fn verify(store: &Store, point: Option<&str>, progress: &dyn Progress) -> Result<VerifyReport> {
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
    // (point, disk) pairs, and for every pack slot the CRC and the blocks that need it.
    let mut users: Vec<(String, String)> = Vec::new();
    let mut needs: BTreeMap<PackId, BTreeMap<u32, Need>> = BTreeMap::new();
    for r in &points {
        for disk in r.disks.keys() {
            match super::load_index(store, r, disk) {
                Ok(ix) => {
                    let u = users.len();
                    users.push((r.name.clone(), disk.clone()));
                    for (b, e) in ix.entries.iter().enumerate().filter(|(_, e)| !e.is_hole()) {
                        let n = needs
                            .entry(ix.packs[e.pack as usize])
                            .or_default()
                            .entry(e.slot)
                            .or_insert(Need {
                                crc: e.crc,
                                users: Vec::new(),
                            });
                        if n.crc != e.crc {
                            // Two indexes disagree on one slot: one of them is wrong.
                            report.damaged.push(Damage {
                                point: r.name.clone(),
                                disk: disk.clone(),
                                block: Some(b as u64),
                                what: format!(
                                    "index checksum {:#010x} disagrees with another point's {:#010x} for pack {} slot {}",
                                    e.crc,
                                    n.crc,
                                    ix.packs[e.pack as usize],
                                    e.slot
                                ),
                            });
                        }
                        n.users.push((u, b as u64));
                    }
                }
                Err(e) => report.damaged.push(Damage {
                    point: r.name.clone(),
                    disk: disk.clone(),
                    block: None,
                    what: e.to_string(),
                }),
            }
        }
    }
    let bs = store.block_size();
    let total: u64 = needs.values().map(|m| m.len() as u64 * bs as u64).sum();
    progress.start("verify", total);
    let cache = PackCache::new(super::packs_dir(store), bs);
    let mut buf = vec![0u8; RUN_SLOTS as usize * bs as usize];
    for (id, slots) in &needs {
        let damage = |n: &Need, why: String, out: &mut Vec<Damage>| {
            for &(u, b) in &n.users {
                out.push(Damage {
                    point: users[u].0.clone(),
                    disk: users[u].1.clone(),
                    block: Some(b),
                    what: why.clone(),
                });
            }
        };
        let pack = match cache.get(*id) {
            Ok(p) => p,
            Err(e) => {
                for n in slots.values() {
                    damage(n, e.to_string(), &mut report.damaged);
                }
                continue;
            }
        };
        let list: Vec<(&u32, &Need)> = slots.iter().collect();
        let mut i = 0;
        while i < list.len() {
            // A run of consecutive slots: one read.
            let first = *list[i].0;
            let mut k = 1;
            while i + k < list.len() && k < RUN_SLOTS as usize && *list[i + k].0 == first + k as u32
            {
                k += 1;
            }
            let mut read = pack.read_slots(first, &mut buf[..k * bs as usize], bs);
            if read.is_err() && k > 1 {
                // Find exactly which slots are unreadable (a truncated pack).
                k = 1;
                read = pack.read_slots(first, &mut buf[..bs as usize], bs);
            }
            let dst = &buf[..k * bs as usize];
            for (j, (slot, n)) in list[i..i + k].iter().enumerate() {
                let why = match &read {
                    Err(e) => Some(format!("pack {id} slot {slot}: {e}")),
                    Ok(()) => {
                        let c = crc(&dst[j * bs as usize..(j + 1) * bs as usize]);
                        (c != n.crc).then(|| {
                            format!(
                                "pack {id} slot {slot}: checksum {c:#010x}, expected {:#010x}",
                                n.crc
                            )
                        })
                    }
                };
                if let Some(why) = why {
                    damage(n, why, &mut report.damaged);
                }
                report.checked_blocks += 1;
                report.checked_bytes += bs as u64;
            }
            progress.inc(k as u64 * bs as u64);
            i += k;
        }
    }
    progress.finish();
    report
        .damaged
        .sort_by(|a, b| (&a.point, &a.disk, a.block).cmp(&(&b.point, &b.disk, b.block)));
    Ok(report)
}
