//! Property test of change tracking against a model (invariant 2 in docs/design.md).
//!
//! Random sequences of tracked writes (`LiveDisk::write_at`), point creations and deletions,
//! explicit flushes, a disk added part-way, clean close/reopen, and simulated crashes
//! (`Engine::crash`: no flush, no close, as kill -9). The model keeps, for every point and
//! disk, the blocks written since the point (`must`) and the blocks a crash may add
//! (`may`: every block of a region still marked in the log: written since that disk's last
//! flush, or in the interval that flush closed, whose marks it keeps). After every step,
//! changes since every live point must satisfy `must ⊆ reported ⊆ must ∪ may`; with no crash
//! since the point, `may` is empty and the answer is exact. At the end, the command line
//! (`vmref changes --json`) must give the same answer as the library.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use proptest::prelude::*;
use vmref::engine::{DiskChanges, Engine};
use vmref::store::Store;
use vmref::store::records::RefState;
use vmref::track::seqmap::REGION_BLOCKS;

const BS: u64 = 4096;
/// disk0: 2.5 regions and a partial last block; disk1 (added later): under one region.
const DISKS: [(&str, u64); 2] = [("disk0", 2560 * BS + 1000), ("disk1", 700 * BS)];

#[derive(Debug, Clone)]
enum Op {
    /// A write to disk `disk % 2` at block `block % nblocks` plus `skew` bytes, `len` long.
    Write {
        disk: u8,
        block: u64,
        skew: u16,
        len: u16,
    },
    Create,
    /// Delete the live point at this index (mod the number of points).
    Delete(usize),
    Flush,
    Reopen,
    Crash,
    AddDisk1,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (any::<u8>(), any::<u64>(), 0u16..4096, 1u16..12000)
            .prop_map(|(disk, block, skew, len)| Op::Write { disk, block, skew, len }),
        3 => Just(Op::Create),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => Just(Op::AddDisk1),
    ]
}

#[derive(Debug, Default)]
struct PointModel {
    name: String,
    /// Blocks written since the point, per disk the point holds.
    must: BTreeMap<String, BTreeSet<u64>>,
    /// Blocks a crash may report on top of `must`.
    may: BTreeMap<String, BTreeSet<u64>>,
}

#[derive(Debug, Default)]
struct Model {
    /// Registered disks and their sizes.
    disks: BTreeMap<String, u64>,
    points: Vec<PointModel>,
    /// Regions written since each disk's last flush.
    dirty: BTreeMap<String, BTreeSet<u64>>,
    /// Regions whose log marks a flush kept (written in the interval it closed).
    kept: BTreeMap<String, BTreeSet<u64>>,
    next_point: usize,
}

impl Model {
    fn write(&mut self, disk: &str, first: u64, last: u64) {
        for p in &mut self.points {
            if let Some(s) = p.must.get_mut(disk) {
                s.extend(first..=last);
            }
        }
        self.dirty
            .entry(disk.to_string())
            .or_default()
            .extend(first / REGION_BLOCKS..=last / REGION_BLOCKS);
    }

    /// A flush of every disk (a point): each keeps the marks of the interval it closes.
    fn flushed_all(&mut self) {
        self.kept = std::mem::take(&mut self.dirty);
    }

    /// A periodic flush: only disks with something written since their last flush flush.
    fn flushed_dirty(&mut self) {
        for (disk, regions) in std::mem::take(&mut self.dirty) {
            if !regions.is_empty() {
                self.kept.insert(disk, regions);
            }
        }
    }

    /// A clean close or an open: the log is empty afterwards.
    fn closed(&mut self) {
        self.dirty.clear();
        self.kept.clear();
    }

    /// Regions marked in the log now: what a crash recovers.
    fn logged(&self) -> BTreeMap<String, BTreeSet<u64>> {
        let mut all = self.kept.clone();
        for (d, r) in &self.dirty {
            all.entry(d.clone()).or_default().extend(r);
        }
        all
    }

    /// A crash: every block of every region marked in the log may show up.
    fn crashed(&mut self) {
        let logged = self.logged();
        self.closed();
        for (disk, regions) in logged {
            let nblocks = self.disks[&disk].div_ceil(BS);
            let blocks: Vec<u64> = regions
                .iter()
                .flat_map(|r| r * REGION_BLOCKS..((r + 1) * REGION_BLOCKS).min(nblocks))
                .collect();
            for p in &mut self.points {
                if p.must.contains_key(&disk) {
                    p.may.entry(disk.clone()).or_default().extend(&blocks);
                }
            }
        }
    }
}

fn blocks_of(d: &DiskChanges) -> BTreeSet<u64> {
    // Extents are sorted, merged, non-empty and inside the disk.
    let mut end = None;
    for e in &d.extents {
        assert!(e.length > 0, "{d:?}");
        assert!(e.offset + e.length <= d.size, "extent past the end: {d:?}");
        if let Some(end) = end {
            assert!(e.offset > end, "extents unsorted or unmerged: {d:?}");
        }
        end = Some(e.offset + e.length);
    }
    assert_eq!(
        d.changed_bytes,
        d.extents.iter().map(|e| e.length).sum::<u64>()
    );
    d.extents
        .iter()
        .flat_map(|e| e.offset / BS..=(e.offset + e.length - 1) / BS)
        .collect()
}

fn check(engine: &Engine, model: &Model) -> Result<(), TestCaseError> {
    for p in &model.points {
        let got = engine.changes(&p.name, None).expect("changes");
        prop_assert_eq!(
            got.iter().map(|d| d.disk.as_str()).collect::<Vec<_>>(),
            model.disks.keys().map(String::as_str).collect::<Vec<_>>()
        );
        for d in &got {
            let size = model.disks[&d.disk];
            prop_assert_eq!(d.size, size);
            let blocks = blocks_of(d);
            match p.must.get(&d.disk) {
                None => {
                    prop_assert!(!d.in_point, "{} not in point {}", d.disk, p.name);
                    prop_assert_eq!(blocks.len() as u64, size.div_ceil(BS));
                }
                Some(must) => {
                    prop_assert!(d.in_point);
                    let empty = BTreeSet::new();
                    let may = p.may.get(&d.disk).unwrap_or(&empty);
                    let missed: Vec<_> = must.difference(&blocks).collect();
                    prop_assert!(
                        missed.is_empty(),
                        "since {} on {}: missed blocks {:?}",
                        p.name,
                        d.disk,
                        missed
                    );
                    let extra: Vec<_> = blocks
                        .iter()
                        .filter(|b| !must.contains(b) && !may.contains(b))
                        .collect();
                    prop_assert!(
                        extra.is_empty(),
                        "since {} on {}: over-reported {:?} (crash allowance {})",
                        p.name,
                        d.disk,
                        extra,
                        may.len()
                    );
                }
            }
        }
    }
    Ok(())
}

fn open(root: &Path) -> Engine {
    Engine::open(Store::open(root).unwrap()).unwrap()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    Store::init(&root, BS as u32).unwrap();
    for (name, size) in DISKS {
        std::fs::File::create(dir.path().join(format!("{name}.img")))
            .unwrap()
            .set_len(size)
            .unwrap();
    }
    let image = |name: &str| dir.path().join(format!("{name}.img"));
    let mut engine = open(&root);
    let mut model = Model::default();
    engine.disk_add("disk0", &image("disk0")).unwrap();
    model.disks.insert("disk0".into(), DISKS[0].1);

    for op in ops {
        match op {
            Op::Write {
                disk,
                block,
                skew,
                len,
            } => {
                let names: Vec<String> = model.disks.keys().cloned().collect();
                let name = &names[disk as usize % names.len()];
                let size = model.disks[name];
                let off = ((block % size.div_ceil(BS)) * BS + skew as u64).min(size - 1);
                let len = (len as u64).min(size - off);
                engine
                    .disk(name)
                    .unwrap()
                    .write_at(&vec![0x5A; len as usize], off)
                    .unwrap();
                model.write(name, off / BS, (off + len - 1) / BS);
            }
            Op::Create => {
                let name = format!("p{}", model.next_point);
                model.next_point += 1;
                engine.ref_create(&name, None, RefState::Plain).unwrap();
                model.flushed_all();
                model.points.push(PointModel {
                    name,
                    must: model
                        .disks
                        .keys()
                        .map(|d| (d.clone(), BTreeSet::new()))
                        .collect(),
                    may: BTreeMap::new(),
                });
            }
            Op::Delete(i) => {
                if !model.points.is_empty() {
                    let p = model.points.remove(i % model.points.len());
                    engine.ref_delete(&p.name).unwrap();
                    prop_assert!(engine.changes(&p.name, None).is_err());
                }
            }
            Op::Flush => {
                engine.flush_dirty().unwrap();
                model.flushed_dirty();
            }
            Op::Reopen => {
                engine.close().unwrap();
                drop(engine);
                engine = open(&root);
                model.closed();
                for d in engine.disks() {
                    let t = d.tracker();
                    prop_assert_eq!(t.report().recovered_regions, 0);
                    prop_assert!(t.report().lost.is_none());
                }
            }
            Op::Crash => {
                let dirty: BTreeMap<String, usize> = model
                    .logged()
                    .iter()
                    .map(|(d, r)| (d.clone(), r.len()))
                    .collect();
                engine.crash();
                engine = open(&root);
                model.crashed();
                for d in engine.disks() {
                    let t = d.tracker();
                    prop_assert!(t.report().lost.is_none(), "{:?}", t.report());
                    prop_assert_eq!(
                        t.report().recovered_regions as usize,
                        dirty.get(d.name()).copied().unwrap_or(0),
                        "regions recovered on {}",
                        d.name()
                    );
                }
            }
            Op::AddDisk1 => {
                if !model.disks.contains_key("disk1") {
                    engine.disk_add("disk1", &image("disk1")).unwrap();
                    model.disks.insert("disk1".into(), DISKS[1].1);
                }
            }
        }
        check(&engine, &model)?;
    }
    let lib: BTreeMap<String, Vec<DiskChanges>> = model
        .points
        .iter()
        .map(|p| (p.name.clone(), engine.changes(&p.name, None).unwrap()))
        .collect();
    engine.close().unwrap();
    drop(engine);

    // The command line gives the library's answer, extent for extent.
    for (name, disks) in lib {
        let out = Command::new(env!("CARGO_BIN_EXE_vmref"))
            .args(["--store", root.to_str().unwrap()])
            .args(["changes", "--since", &name, "--json"])
            .env_remove("VMREF_STORE")
            .output()
            .unwrap();
        prop_assert!(out.status.success(), "{:?}", out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        prop_assert_eq!(&v["disks"], &serde_json::to_value(&disks).unwrap());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn changes_since_every_point_match_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}

/// A fixed sequence that crosses every kind of step, so the interesting paths run even if
/// the random cases happen to miss one.
#[test]
fn fixed_sequence_through_every_step() {
    use Op::*;
    let w = |disk, block, len| Write {
        disk,
        block,
        skew: 17,
        len,
    };
    run(vec![
        Create,
        w(0, 5, 100),
        w(0, 2559, 9000),
        Create,
        w(0, 1500, 1),
        Crash,
        AddDisk1,
        w(1, 3, 5000),
        Create,
        w(1, 699, 1),
        w(0, 0, 4096),
        Flush,
        w(0, 1024, 1),
        Reopen,
        Delete(1),
        w(0, 2047, 2),
        Crash,
        Create,
        w(0, 7, 1),
    ])
    .unwrap();
}
