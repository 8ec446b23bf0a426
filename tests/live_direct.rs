//! The live disk's write paths through a real mount, as a VM with `cache=none` and other
//! clients drive them at once: large aligned O_DIRECT writes (the daemon writes them O_DIRECT
//! too), small O_DIRECT writes and unaligned buffered writes (the daemon writes those through
//! the page cache) landing on pages the others just wrote, from several threads, with a reader
//! holding its own read-only open beside them. Every read is compared with a model of the
//! bytes every acknowledged write left; at the end the image, `changes` and a clean reopen
//! must agree with the model too.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 65536;
/// One area per writer thread: writers never overlap each other, so the model is exact.
const AREA: u64 = 8 * MIB;
const WRITERS: u64 = 3;

/// A buffer whose bytes start on a 4 KiB boundary, as O_DIRECT wants.
struct Aligned {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(data: &[u8]) -> Aligned {
        let mut buf = vec![0u8; data.len() + 4096];
        let at = buf.as_ptr().align_offset(4096);
        buf[at..at + data.len()].copy_from_slice(data);
        Aligned {
            buf,
            at,
            len: data.len(),
        }
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }
}

/// One write: offset inside the area, bytes, whether through an O_DIRECT descriptor.
fn plan(rng: &mut u64, step: u64) -> (u64, Vec<u8>, bool) {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let seed = next();
    match step % 3 {
        // Large and aligned: the daemon writes it O_DIRECT.
        0 => {
            let len = (next() % 8 + 1) * 128 * 1024;
            let off = (next() % ((AREA - len) / 4096)) * 4096;
            (off, pattern(len as usize, seed), true)
        }
        // Small O_DIRECT: aligned, but the daemon writes it through the page cache.
        1 => {
            let len = (next() % 4 + 1) * 4096;
            let off = (next() % ((AREA - len) / 4096)) * 4096;
            (off, pattern(len as usize, seed), true)
        }
        // Unaligned buffered, straddling pages a large write may have just written.
        _ => {
            let len = next() % 20000 + 1;
            let off = next() % (AREA - len);
            (off, pattern(len as usize, seed), false)
        }
    }
}

#[test]
fn direct_and_buffered_writes_beside_a_reader_match_a_model() {
    let test = "direct_and_buffered_writes_beside_a_reader_match_a_model";
    if !fuse_ok(test) {
        return;
    }
    let size = (WRITERS * AREA) as usize;
    // Data in the first MiB of each area, holes elsewhere: first writes land in new space.
    let mut initial = vec![0u8; size];
    for a in 0..WRITERS as usize {
        let s = a * AREA as usize;
        initial[s..s + MIB as usize].copy_from_slice(&pattern(MIB as usize, 100 + a as u64));
    }
    let s = Setup::new(&initial);
    let m = s.mount();
    s.ok(&["ref", "create", "r0"]);
    let live = s.live();

    let model = Arc::new(Mutex::new(initial));
    // A writer holds its area's lock for write while its write is in flight and the model is
    // updated; the reader holds it for read around its read, so every read must show exactly
    // the writes acknowledged before it.
    let areas: Arc<Vec<RwLock<()>>> = Arc::new((0..WRITERS).map(|_| RwLock::new(())).collect());
    let written = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let seed = test_seed(test);

    let reader = {
        let (model, areas, stop, live) = (model.clone(), areas.clone(), stop.clone(), live.clone());
        std::thread::spawn(move || {
            let f = File::open(&live).unwrap();
            let mut rng = seed ^ 0x5555;
            let mut reads = 0u64;
            let mut buf = vec![0u8; 512 * 1024];
            while !stop.load(Ordering::Acquire) || reads < 20 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let a = rng % WRITERS;
                let len = (rng >> 8) % (buf.len() as u64) + 1;
                let off = a * AREA + (rng >> 32) % (AREA - len);
                let _g = areas[a as usize].read().unwrap();
                f.read_exact_at(&mut buf[..len as usize], off).unwrap();
                let want = model.lock().unwrap()[off as usize..(off + len) as usize].to_vec();
                assert!(
                    buf[..len as usize] == want[..],
                    "read-only reader: {len} bytes at {off} differ from the model"
                );
                reads += 1;
            }
            reads
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|a| {
            let (model, areas, written, live) =
                (model.clone(), areas.clone(), written.clone(), live.clone());
            std::thread::spawn(move || {
                let direct = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&live)
                    .unwrap();
                let buffered = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&live)
                    .unwrap();
                let mut rng = (seed.wrapping_add(a) | 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for step in 0..60 {
                    let (off, data, is_direct) = plan(&mut rng, step + a);
                    let off = a * AREA + off;
                    let _g = areas[a as usize].write().unwrap();
                    if is_direct {
                        direct
                            .write_all_at(Aligned::new(&data).bytes(), off)
                            .unwrap();
                    } else {
                        buffered.write_all_at(&data, off).unwrap();
                    }
                    model.lock().unwrap()[off as usize..off as usize + data.len()]
                        .copy_from_slice(&data);
                    written.lock().unwrap().push((off, data.len() as u64));
                    // The writer reads its own write back through the other descriptor.
                    let mut back = vec![0u8; data.len()];
                    if is_direct {
                        buffered.read_exact_at(&mut back, off).unwrap();
                    } else {
                        let a = Aligned::new(&vec![0u8; (data.len() + 8191) / 4096 * 4096]);
                        let (lo, hi) = (
                            off / 4096 * 4096,
                            (off + data.len() as u64).div_ceil(4096) * 4096,
                        );
                        let mut al = a.buf;
                        let at = a.at;
                        direct
                            .read_exact_at(&mut al[at..at + (hi - lo) as usize], lo)
                            .unwrap();
                        let s = (off - lo) as usize;
                        back.copy_from_slice(&al[at + s..at + s + data.len()]);
                    }
                    assert!(back == data, "writer {a}: write at {off} read back differs");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("a writer failed");
    }
    stop.store(true, Ordering::Release);
    let reads = reader.join().expect("the reader failed");
    assert!(reads >= 20, "the reader ran {reads} reads");

    let model = model.lock().unwrap().clone();
    assert!(
        std::fs::read(&live).unwrap() == model,
        "bytes through the mount differ from the model"
    );
    // Tracking: exactly the 64 KiB blocks the writes touched (no crash, so no allowance).
    let want = block_extents(&written.lock().unwrap(), BLOCK, size as u64);
    let ch = s.json(&["changes", "--since", "r0", "--json"]);
    assert_eq!(changed_extents(&ch), want, "changes since r0 while mounted");

    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    assert!(
        std::fs::read(&s.image).unwrap() == model,
        "the image after unmount differs from the model"
    );
    // The clean stop digested every written block from the image: the reopen finds no
    // outside write, so changes stay exact (a restart would fail this query).
    let ch = s.json(&["changes", "--since", "r0", "--json"]);
    assert_eq!(
        changed_extents(&ch),
        want,
        "changes since r0 after a clean stop"
    );
    drop(m);
}
