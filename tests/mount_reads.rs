//! Point images read through the real daemon the way backup tools and copies read them:
//! sequential passes in the kernel's request sizes, random small reads, reads across block
//! boundaries and of the short last block, two readers of one image at once; every byte
//! compared with the model of the disk at that point. Then one stored block is damaged and the
//! same reads run again: the damaged block reads as EIO every time, even after a sequential
//! reader's read-ahead reached it first, and every other byte still reads exactly.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;

const BLOCK: usize = 65536;
/// Not a multiple of the block size: the last block is short.
const SIZE: usize = 12 * (1 << 20) - 3000;

fn img(mnt: &Path, point: &str) -> PathBuf {
    mnt.join(point).join("disk0.img")
}

fn drop_cache(f: &File) {
    // SAFETY: a valid open fd; fadvise only drops clean cached pages.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

/// Every 4 KiB: random bytes, half random and half zeros (zstd halves it), or zeros; some
/// whole 64 KiB blocks left as holes.
fn initial(rng: &mut Rng) -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    for (i, page) in v.chunks_mut(4096).enumerate() {
        if (i / 16) % 7 == 3 {
            continue; // a hole block
        }
        match rng.below(4) {
            0 => {}
            1 => {
                let half = page.len().min(2048);
                rng.fill(&mut page[..half]);
            }
            _ => rng.fill(page),
        }
    }
    v
}

/// Rewrite a few ranges through the live disk (mirrored in `model`), then back up `name`.
fn change_and_backup(s: &Setup, model: &mut [u8], rng: &mut Rng, name: &str) {
    let live = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.live())
        .unwrap();
    for _ in 0..6 {
        let len = 1 + rng.below(3 * BLOCK as u64) as usize;
        let off = rng.below((SIZE - len) as u64) as usize;
        let mut data = vec![0u8; len];
        if rng.below(4) != 0 {
            rng.fill(&mut data);
        }
        live.write_all_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    drop(live);
    s.ok(&["backup", name]);
}

/// One read through the daemon (the file's cached pages dropped first); `Err(errno)` on failure.
fn read_fresh(f: &File, off: usize, len: usize) -> Result<Vec<u8>, i32> {
    drop_cache(f);
    let mut buf = vec![0u8; len];
    match f.read_exact_at(&mut buf, off as u64) {
        Ok(()) => Ok(buf),
        Err(e) => Err(e.raw_os_error().unwrap_or(0)),
    }
}

/// Whether `[off, off + len)` touches block `bad`.
fn touches(off: usize, len: usize, bad: Option<usize>) -> bool {
    bad.is_some_and(|b| off < (b + 1) * BLOCK && off + len > b * BLOCK)
}

/// Check one read against the model: exact bytes, or EIO exactly when it touches `bad`.
fn check(what: &str, got: Result<Vec<u8>, i32>, want: &[u8], off: usize, bad: Option<usize>) {
    let len = want.len();
    match got {
        Ok(b) => {
            assert!(
                !touches(off, len, bad),
                "{what}: read of {len} at {off} over the damaged block succeeded"
            );
            assert_same(&format!("{what}: {len} at {off}"), &b, want);
        }
        Err(e) => {
            assert!(
                touches(off, len, bad),
                "{what}: read of {len} at {off} failed (errno {e})"
            );
            assert_eq!(e, libc::EIO, "{what}: {len} at {off}");
        }
    }
}

/// Sequential passes in several request sizes, then random reads of every shape, then two
/// readers at once; `bad` is the damaged block, if any.
fn read_every_way(path: &Path, want: &[u8], rng: &mut Rng, bad: Option<usize>) -> usize {
    let f = File::open(path).unwrap();
    let mut reads = 0;
    // Sequential, as cp (128 KiB), dd bs=1M and a tool reading 4 KiB at a time: the page cache
    // is dropped once per pass, so the kernel's read-ahead and the daemon's run ahead of us.
    for step in [128 << 10, 1 << 20, 4096 * 9] {
        drop_cache(&f);
        let mut off = 0;
        while off < SIZE {
            let len = step.min(SIZE - off);
            let mut buf = vec![0u8; len];
            let got = f
                .read_exact_at(&mut buf, off as u64)
                .map(|()| buf)
                .map_err(|e| e.raw_os_error().unwrap_or(0));
            check(
                &format!("sequential {step}"),
                got,
                &want[off..off + len],
                off,
                bad,
            );
            off += len;
            reads += 1;
        }
    }
    // Random: 4 KiB aligned, single bytes, odd lengths across block boundaries, the short last
    // block, and reads inside the damaged block (if any) again and again.
    for i in 0..300 {
        let (off, len) = match i % 6 {
            0 => (rng.below((SIZE / 4096) as u64) as usize * 4096, 4096),
            1 => (rng.below(SIZE as u64) as usize, 1),
            2 => {
                let b = 1 + rng.below((SIZE / BLOCK - 1) as u64) as usize;
                let len = 1 + rng.below(2 * BLOCK as u64) as usize;
                (b * BLOCK - len / 2, len)
            }
            3 => (SIZE - 1 - rng.below(BLOCK as u64) as usize, 1),
            4 if bad.is_some() => (
                bad.unwrap() * BLOCK + rng.below(BLOCK as u64 - 100) as usize,
                100,
            ),
            _ => {
                let len = 1 + rng.below(3 * BLOCK as u64) as usize;
                (rng.below((SIZE - len) as u64) as usize, len)
            }
        };
        let len = len.min(SIZE - off);
        check(
            "random",
            read_fresh(&f, off, len),
            &want[off..off + len],
            off,
            bad,
        );
        reads += 1;
    }
    // Two readers of the one image at once: a sequential one and a random one, each with its
    // own handle, so neither's pattern hides the other's.
    std::thread::scope(|s| {
        let seq = s.spawn(|| {
            let g = File::open(path).unwrap();
            drop_cache(&g);
            let mut off = 0;
            while off < SIZE {
                let len = (256 << 10).min(SIZE - off);
                let mut buf = vec![0u8; len];
                let got = g
                    .read_exact_at(&mut buf, off as u64)
                    .map(|()| buf)
                    .map_err(|e| e.raw_os_error().unwrap_or(0));
                check(
                    "concurrent sequential",
                    got,
                    &want[off..off + len],
                    off,
                    bad,
                );
                off += len;
            }
        });
        let mut r = Rng(rng.next());
        let g = File::open(path).unwrap();
        for _ in 0..100 {
            let len = 1 + r.below(BLOCK as u64) as usize;
            let off = r.below((SIZE - len) as u64) as usize;
            let mut buf = vec![0u8; len];
            let got = g
                .read_exact_at(&mut buf, off as u64)
                .map(|()| buf)
                .map_err(|e| e.raw_os_error().unwrap_or(0));
            check("concurrent random", got, &want[off..off + len], off, bad);
        }
        seq.join().unwrap();
    });
    reads + 100
}

#[test]
fn point_images_read_exactly_in_every_pattern_and_damage_reads_as_eio() {
    if !fuse_ok("point_images_read_exactly_in_every_pattern_and_damage_reads_as_eio") {
        return;
    }
    let seed = test_seed("point_images_read_exactly_in_every_pattern_and_damage_reads_as_eio");
    let mut rng = Rng(seed | 1);
    let mut model = initial(&mut rng);
    let s = Setup::new(&model);
    let m = s.mount();
    s.ok(&["backup", "full"]);
    let mut points = vec![("full", model.clone())];
    change_and_backup(&s, &mut model, &mut rng, "inc1");
    points.push(("inc1", model.clone()));
    change_and_backup(&s, &mut model, &mut rng, "inc2");
    points.push(("inc2", model.clone()));

    let mut reads = 0;
    for (p, want) in &points {
        reads += read_every_way(&img(&s.mnt, p), want, &mut rng, None);
    }

    // Damage a data block that every point shares (unchanged since the full backup), in the
    // middle of the disk so that a sequential reader's read-ahead reaches it before the reader.
    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    drop(m);
    let bad = (SIZE / BLOCK / 2..SIZE / BLOCK)
        .find(|&b| {
            let r = b * BLOCK..(b + 1) * BLOCK;
            let h = point_block_hash(&s.store, "full", "disk0", b as u64);
            !h.is_zero()
                && points.iter().all(|(p, m)| {
                    m[r.clone()] == points[0].1[r.clone()]
                        && point_block_hash(&s.store, p, "disk0", b as u64) == h
                })
        })
        .expect("a data block all points share");
    flip_blob(
        &s.store,
        &point_block_hash(&s.store, "full", "disk0", bad as u64),
    );
    let _m = s.mount();
    for (p, want) in &points {
        reads += read_every_way(&img(&s.mnt, p), want, &mut rng, Some(bad));
    }
    // A whole-image copy fails instead of copying wrong bytes.
    let out = s.dir.path().join("copy.img");
    let o = run(
        "dd",
        &[
            &format!("if={}", img(&s.mnt, "inc2").display()),
            &format!("of={}", out.display()),
            "bs=1M",
            "status=none",
        ],
    );
    assert!(!o.status.success(), "dd of a damaged image succeeded");
    eprintln!("{reads} reads checked");
}

/// Bytes of `path` in the page cache (`fincore`).
fn resident(path: &Path) -> u64 {
    let out = run_ok(
        "fincore",
        &[
            "--bytes",
            "--noheadings",
            "--output",
            "RES",
            path.to_str().unwrap(),
        ],
    );
    out.trim().parse().unwrap()
}

#[test]
fn a_small_read_leaves_its_whole_block_in_the_page_cache() {
    if !fuse_ok("a_small_read_leaves_its_whole_block_in_the_page_cache") {
        return;
    }
    let seed = test_seed("a_small_read_leaves_its_whole_block_in_the_page_cache");
    let mut rng = Rng(seed | 1);
    let model = initial(&mut rng);
    let s = Setup::new(&model);
    let _m = s.mount();
    s.ok(&["backup", "full"]);
    let path = img(&s.mnt, "full");
    let f = File::open(&path).unwrap();
    // As `fio` and backup tools reading at random do: no kernel read-ahead, so the kernel
    // itself asks the daemon for only the page it reads.
    // SAFETY: a valid open fd; the advice changes only read-ahead.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(r, 0, "posix_fadvise");
    let b = (5..SIZE / BLOCK)
        .find(|b| model[b * BLOCK..(b + 1) * BLOCK].iter().any(|&x| x != 0))
        .unwrap();
    let mut page = vec![0u8; 4096];
    f.read_exact_at(&mut page, (b * BLOCK + 8192) as u64)
        .unwrap();
    assert!(page == model[b * BLOCK + 8192..b * BLOCK + 12288]);
    assert_eq!(resident(&path) % 4096, 0);
    // The daemon decoded the whole block for that page and hands the kernel the rest of it
    // (after the reply, from a thread of its own).
    wait_until(
        || resident(&path) >= BLOCK as u64,
        "the rest of the block in the page cache",
    );
    // What the kernel holds is the block's bytes.
    let mut block = vec![0u8; BLOCK];
    f.read_exact_at(&mut block, (b * BLOCK) as u64).unwrap();
    assert!(block == model[b * BLOCK..(b + 1) * BLOCK], "block {b}");
    // The short last block: a few bytes read inside it leave the file its size, and its tail
    // (whose last page is partial) reads exactly.
    let last = SIZE / BLOCK * BLOCK;
    let before = resident(&path);
    let mut few = [0u8; 10];
    f.read_exact_at(&mut few, (last + 100) as u64).unwrap();
    assert!(few[..] == model[last + 100..last + 110]);
    wait_until(
        || resident(&path) >= before + (SIZE - last) as u64 / 4096 * 4096,
        "the rest of the last block in the page cache",
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE as u64);
    let mut tail = vec![0u8; SIZE - last];
    f.read_exact_at(&mut tail, last as u64).unwrap();
    assert!(tail[..] == model[last..], "the last block");
    assert_eq!(
        f.read_at(&mut few, SIZE as u64).unwrap(),
        0,
        "a read past the end"
    );
}
