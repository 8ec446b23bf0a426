//! A property test of the filesystem core without FUSE: random writes, reads, reference
//! points (served as in-memory point images), point deletions and SEEK_DATA/SEEK_HOLE,
//! compared with a model of the disk after every step. Tracking is checked too: changes
//! since the newest point are exactly the blocks written since.

mod common;

use std::sync::Arc;

use common::{MemPoints, block_extents};
use proptest::prelude::*;
use vmref::engine::Engine;
use vmref::fs::{Fs, LIVE_INO, ROOT_INO, Whence};
use vmref::store::Store;
use vmref::store::records::RefState;

const SIZE: usize = 256 * 1024;
const BLOCK: usize = 4096;

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: usize,
        len: usize,
        seed: u8,
    },
    Zero {
        off: usize,
        len: usize,
    },
    Read {
        off: usize,
        len: usize,
    },
    RefCreate,
    ReadPoint {
        which: usize,
        off: usize,
        len: usize,
    },
    Seek {
        point: Option<usize>,
        off: usize,
        hole: bool,
    },
    DropPoint {
        which: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let off = 0..SIZE;
    prop_oneof![
        4 => (off.clone(), 1..40_000usize, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        1 => (off.clone(), 1..40_000usize).prop_map(|(off, len)| Op::Zero { off, len }),
        2 => (off.clone(), 1..70_000usize).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::RefCreate),
        2 => (any::<usize>(), off.clone(), 1..70_000usize).prop_map(|(which, off, len)| Op::ReadPoint { which, off, len }),
        2 => (proptest::option::of(any::<usize>()), off.clone(), any::<bool>()).prop_map(|(point, off, hole)| Op::Seek { point, off, hole }),
        1 => any::<usize>().prop_map(|which| Op::DropPoint { which }),
    ]
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 7 % 251) as u8) | 1)
        .collect()
}

fn file_of(fs: &Fs, dir: u64, name: &str, write: bool) -> vmref::Result<u64> {
    let ino = fs.lookup(dir, name)?.ino;
    Ok(fs.open(ino, write)?.0)
}

/// Check one seek answer against the bytes it describes.
fn check_seek(model: &[u8], off: usize, hole: bool, got: vmref::Result<u64>) {
    let zero = |a: usize, b: usize| model[a..b].iter().all(|&x| x == 0);
    match (hole, got) {
        (false, Ok(d)) => {
            let d = d as usize;
            assert!(off <= d && d < model.len(), "SEEK_DATA {off} -> {d}");
            assert!(zero(off, d), "SEEK_DATA {off} skipped data before {d}");
        }
        (false, Err(e)) => {
            assert_eq!(e.errno(), libc::ENXIO);
            assert!(
                zero(off, model.len()),
                "SEEK_DATA {off}: ENXIO but data follows"
            );
        }
        (true, Ok(h)) => {
            let h = h as usize;
            assert!(off <= h && h <= model.len(), "SEEK_HOLE {off} -> {h}");
            assert!(
                h == model.len() || model[h] == 0,
                "SEEK_HOLE {off} -> {h} lands on data"
            );
        }
        (true, Err(e)) => panic!("SEEK_HOLE {off}: {e}"),
    }
}

fn run_ops(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("store"), BLOCK as u32).unwrap();
    let image = dir.path().join("disk0.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();
    let engine = Arc::new(Engine::open(store).unwrap());
    engine.disk_add("disk0", &image).unwrap();
    engine.ref_create("base", None, RefState::Plain).unwrap();
    let points = Arc::new(MemPoints::default());
    let fs = Fs::new(engine.clone(), points.clone(), 0, 0);
    let live = file_of(&fs, LIVE_INO, "disk0.img", true).unwrap();

    let mut model = vec![0u8; SIZE];
    let mut since = "base".to_string();
    let mut written: Vec<(u64, u64)> = Vec::new();
    let mut shown: Vec<(String, Vec<u8>)> = Vec::new();
    let mut serial = 0;

    for op in ops {
        match op {
            Op::Write { off, len, .. } | Op::Zero { off, len } if off + len <= SIZE => {
                let data = match op {
                    Op::Write { seed, .. } => bytes(len, seed),
                    _ => vec![0u8; len],
                };
                assert_eq!(fs.write(live, off as u64, &data).unwrap(), len);
                model[off..off + len].copy_from_slice(&data);
                written.push((off as u64, len as u64));
            }
            Op::Write { off, len, .. } | Op::Zero { off, len } => {
                let e = fs.write(live, off as u64, &vec![1u8; len]).unwrap_err();
                assert_eq!(
                    e.errno(),
                    libc::EINVAL,
                    "a write past the end is refused whole"
                );
            }
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len];
                let n = fs.read(live, off as u64, &mut buf).unwrap();
                assert_eq!(n, len.min(SIZE - off));
                assert_eq!(&buf[..n], &model[off..off + n]);
            }
            Op::RefCreate => {
                serial += 1;
                let name = format!("p{serial}");
                engine.ref_create(&name, None, RefState::Plain).unwrap();
                points.insert(&name, "disk0", model.clone(), BLOCK);
                shown.push((name.clone(), model.clone()));
                since = name;
                written.clear();
            }
            Op::ReadPoint { which, off, len } if !shown.is_empty() => {
                let (name, bytes) = &shown[which % shown.len()];
                let d = fs.lookup(ROOT_INO, name).unwrap().ino;
                let ino = fs.lookup(d, "disk0.img").unwrap().ino;
                let e = fs.open(ino, true).unwrap_err();
                assert_eq!(e.errno(), libc::EROFS);
                let fh = fs.open(ino, false).unwrap().0;
                assert_eq!(fs.write(fh, 0, b"x").unwrap_err().errno(), libc::EROFS);
                let mut buf = vec![0u8; len];
                let n = fs.read(fh, off as u64, &mut buf).unwrap();
                assert_eq!(n, len.min(SIZE - off));
                assert_eq!(&buf[..n], &bytes[off..off + n], "point {name}");
                fs.release(fh);
            }
            Op::ReadPoint { .. } => {}
            Op::Seek { point, off, hole } => {
                let w = if hole { Whence::Hole } else { Whence::Data };
                match point {
                    Some(which) if !shown.is_empty() => {
                        let (name, bytes) = shown[which % shown.len()].clone();
                        let d = fs.lookup(ROOT_INO, &name).unwrap().ino;
                        let fh = file_of(&fs, d, "disk0.img", false).unwrap();
                        check_seek(&bytes, off, hole, fs.lseek(fh, off as u64, w));
                        fs.release(fh);
                    }
                    _ => check_seek(&model, off, hole, fs.lseek(live, off as u64, w)),
                }
            }
            Op::DropPoint { which } if !shown.is_empty() => {
                let (name, _) = shown.remove(which % shown.len());
                points.remove(&name);
                let e = fs.lookup(ROOT_INO, &name).unwrap_err();
                assert_eq!(e.errno(), libc::ENOENT);
            }
            Op::DropPoint { .. } => {}
        }
        // The root lists exactly the current points besides live.
        let mut listed: Vec<String> = fs
            .readdir(ROOT_INO)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n != "." && n != ".." && n != "live")
            .collect();
        listed.sort();
        let mut want: Vec<String> = shown.iter().map(|(n, _)| n.clone()).collect();
        want.sort();
        assert_eq!(listed, want);
        // Exact tracking: the blocks written since the newest point, no more, no fewer.
        let ch = engine.changes(&since, Some("disk0")).unwrap();
        let got: Vec<(u64, u64)> = ch[0].extents.iter().map(|e| (e.offset, e.length)).collect();
        assert_eq!(got, block_extents(&written, BLOCK as u64, SIZE as u64));
    }
    let mut all = vec![0u8; SIZE];
    assert_eq!(fs.read(live, 0, &mut all).unwrap(), SIZE);
    assert_eq!(all, model);
    fs.release(live);
    engine.close().unwrap();
    assert_eq!(std::fs::read(&image).unwrap(), model, "the backing image");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn fs_core_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run_ops(ops);
    }
}
