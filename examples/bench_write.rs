//! Helper for bench/run.sh: make a sparse test image, plan random writes, and apply a plan
//! through the library (as the mount would: tracked, not an outside write).
//!
//! ```text
//! bench_write fill IMAGE SIZE DATA_BYTES SEED   sparse image, data in every other 64 MiB
//! bench_write plan SIZE BYTES EXTENT SEED [LEN]  print "offset length" lines (aligned extents;
//!                                               with LEN, write only LEN bytes at each)
//! bench_write apply STORE DISK PLANFILE SEED    write random bytes at every planned extent
//! ```

use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::Path;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn num(s: &str) -> u64 {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s}"))
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("fill") => {
            let (size, data, mut rng) = (num(&a[3]), num(&a[4]), Rng(num(&a[5]) | 1));
            let f = std::fs::File::create(&a[2]).unwrap();
            f.set_len(size).unwrap();
            let chunk = 64u64 << 20;
            let mut buf = vec![0u8; 4 << 20];
            let mut written = 0;
            let mut at = 0;
            while written < data && at < size {
                let end = (at + chunk).min(size);
                let mut off = at;
                while off < end && written < data {
                    rng.fill(&mut buf);
                    let n = (buf.len() as u64).min(end - off).min(data - written) as usize;
                    f.write_all_at(&buf[..n], off).unwrap();
                    off += n as u64;
                    written += n as u64;
                }
                at += 2 * chunk;
                if at >= size && written < data {
                    at = chunk; // second pass over the odd chunks
                }
            }
            f.sync_all().unwrap();
        }
        Some("plan") => {
            let (size, bytes, extent, mut rng) =
                (num(&a[2]), num(&a[3]), num(&a[4]), Rng(num(&a[5]) | 1));
            let len = a.get(6).map_or(extent, |s| num(s));
            let slots = size / extent;
            let mut seen = std::collections::BTreeSet::new();
            while (seen.len() as u64) * extent < bytes && (seen.len() as u64) < slots {
                seen.insert(rng.next() % slots);
            }
            for s in seen {
                println!("{} {}", s * extent, len);
            }
        }
        Some("apply") => {
            let store = vmref::store::Store::open(Path::new(&a[2])).unwrap();
            let engine = vmref::engine::Engine::open(store).unwrap();
            let disk = engine.disk(&a[3]).unwrap();
            let mut rng = Rng(num(&a[5]) | 1);
            let plan = std::io::BufReader::new(std::fs::File::open(&a[4]).unwrap());
            let mut buf = Vec::new();
            for line in plan.lines() {
                let line = line.unwrap();
                let mut it = line.split_whitespace();
                let (off, len) = (num(it.next().unwrap()), num(it.next().unwrap()));
                buf.resize(len as usize, 0);
                rng.fill(&mut buf);
                disk.write_at(&buf, off).unwrap();
            }
            engine.close().unwrap();
        }
        _ => {
            eprintln!("usage: see the top of examples/bench_write.rs");
            std::process::exit(2);
        }
    }
}
