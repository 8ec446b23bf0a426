//! Reading a disk image to digest its blocks (`digest::block_digest`). Only allocated extents
//! are read (`SEEK_DATA`/`SEEK_HOLE`): a block no extent touches reads as zeros, so digesting a
//! sparse 1 TiB image costs what it holds. Large scans run on every core (at most four).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::digest::{ZERO, block_digest};
use super::seqmap::REGION_BLOCKS;
use crate::error::{Error, Result};

/// Bytes read per `pread`.
const CHUNK: u64 = 4 << 20;

/// What one scan worker digested: (index into the regions asked for, page, bytes read).
type Scanned = Vec<(usize, Vec<u64>, u64)>;

/// A handle on the image for digesting, with the geometry tracking gives it.
#[derive(Debug)]
pub struct ImageReader {
    file: File,
    path: PathBuf,
    size: u64,
    block_size: u64,
}

impl ImageReader {
    /// # Errors
    /// Duplicating the descriptor failing.
    pub fn new(file: &File, path: &Path, size: u64, block_size: u32) -> Result<ImageReader> {
        Ok(ImageReader {
            // Digest reads must not leave large folios for the VM's small writes to pay for
            // (`sys::reopen_random_reader`); a duplicate where the reopen fails.
            file: crate::sys::reopen_random_reader(file).map_or_else(
                || file.try_clone().map_err(Error::io("duplicate", path)),
                Ok,
            )?,
            path: path.to_path_buf(),
            size,
            block_size: block_size as u64,
        })
    }

    fn nblocks(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }

    /// The byte extents that may hold data, in order. A filesystem without `SEEK_DATA` has
    /// one extent: the whole image.
    pub fn data_extents(&self) -> Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut off = 0;
        while off < self.size {
            let start = match crate::sys::seek_data_hole(fd, off, false) {
                Ok(Some(s)) if s < self.size => s,
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok(vec![(0, self.size)]);
                }
                Err(e) => return Err(Error::io("seek data in", &self.path)(e)),
            };
            let end = crate::sys::seek_data_hole(fd, start, true)
                .map_err(Error::io("seek a hole in", &self.path))?
                .unwrap_or(self.size)
                .min(self.size);
            out.push((start, end - start));
            off = end.max(start + 1);
        }
        Ok(out)
    }

    /// Runs of blocks of `region` that some extent touches, as (first block, count).
    fn data_runs(&self, extents: &[(u64, u64)], region: u64) -> Vec<(u64, u64)> {
        let bs = self.block_size;
        let first = region * REGION_BLOCKS;
        let end = ((region + 1) * REGION_BLOCKS).min(self.nblocks());
        let (lo, hi) = (first * bs, end * bs);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let at = extents.partition_point(|&(s, l)| s + l <= lo);
        for &(s, l) in &extents[at..] {
            if s >= hi {
                break;
            }
            let b0 = s.max(lo) / bs;
            let b1 = (s + l).min(hi).div_ceil(bs);
            match runs.last_mut() {
                Some((rs, rc)) if *rs + *rc >= b0 => *rc = (*rc).max(b1 - *rs),
                _ => runs.push((b0, b1 - b0)),
            }
        }
        runs
    }

    /// Digest blocks `start..start+count` into `out` (one entry each); returns bytes read.
    fn digest_run(
        &self,
        start: u64,
        count: u64,
        buf: &mut Vec<u8>,
        out: &mut [u64],
    ) -> Result<u64> {
        let bs = self.block_size;
        let per = (CHUNK / bs).max(1);
        let mut read = 0;
        let mut b = start;
        while b < start + count {
            let n = per.min(start + count - b);
            let off = b * bs;
            let len = (n * bs).min(self.size.saturating_sub(off)) as usize;
            buf.resize(len, 0);
            let mut got = 0;
            while got < len {
                match self.file.read_at(&mut buf[got..len], off + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io("read", &self.path)(e)),
                }
            }
            // Past the end of a file that shrank under us: zeros, as a reader would see.
            buf[got..len].fill(0);
            for i in 0..n {
                let s = (i * bs) as usize;
                let e = (s + bs as usize).min(len);
                out[(b - start + i) as usize] = block_digest(&buf[s.min(len)..e]);
            }
            read += len as u64;
            b += n;
        }
        Ok(read)
    }

    /// Digest every block of `region` as it is now: one entry per block of the region (ZERO
    /// past the end of the disk). Returns the page and the bytes read.
    pub fn scan_region(&self, extents: &[(u64, u64)], region: u64) -> Result<(Vec<u64>, u64)> {
        let mut page = vec![ZERO; REGION_BLOCKS as usize];
        let base = region * REGION_BLOCKS;
        let mut buf = Vec::new();
        let mut read = 0;
        for (s, c) in self.data_runs(extents, region) {
            let at = (s - base) as usize;
            read += self.digest_run(s, c, &mut buf, &mut page[at..at + c as usize])?;
        }
        Ok((page, read))
    }

    /// `scan_region` for many regions on every core; pages in the order of `regions`.
    pub fn scan_regions(
        &self,
        extents: &[(u64, u64)],
        regions: &[u64],
    ) -> Result<(Vec<Vec<u64>>, u64)> {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4)
            .min(regions.len().max(1));
        if workers == 1 {
            let mut pages = Vec::with_capacity(regions.len());
            let mut read = 0;
            for &r in regions {
                let (p, n) = self.scan_region(extents, r)?;
                pages.push(p);
                read += n;
            }
            return Ok((pages, read));
        }
        let next = AtomicUsize::new(0);
        let results: Vec<Result<Scanned>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    sc.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= regions.len() {
                                return Ok(mine);
                            }
                            let (p, n) = self.scan_region(extents, regions[i])?;
                            mine.push((i, p, n));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a scan worker panicked"))
                .collect()
        });
        let mut pages = vec![Vec::new(); regions.len()];
        let mut read = 0;
        for r in results {
            for (i, p, n) in r? {
                pages[i] = p;
                read += n;
            }
        }
        Ok((pages, read))
    }

    /// Re-digest the blocks of `region` whose bits are set in `bits` (bit i: block i of the
    /// region) into `page`, reading each whole. Returns bytes read.
    pub fn digest_blocks(&self, region: u64, bits: &[u64], page: &mut [u64]) -> Result<u64> {
        let base = region * REGION_BLOCKS;
        let nb = self.nblocks().saturating_sub(base).min(REGION_BLOCKS) as usize;
        let set = |i: usize| bits[i / 64] & (1 << (i % 64)) != 0;
        let mut buf = Vec::new();
        let mut read = 0;
        let mut i = 0;
        while i < nb {
            if !set(i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < nb && set(j) {
                j += 1;
            }
            read += self.digest_run(base + i as u64, (j - i) as u64, &mut buf, &mut page[i..j])?;
            i = j;
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_read_only_data_and_digest_by_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let bs = 4096u64;
        let size = 3 * REGION_BLOCKS * bs - 100; // a short last block
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(b"x", 5 * bs + 7).unwrap();
        f.write_all_at(&[0u8; 4096], 9 * bs).unwrap(); // allocated zeros
        f.write_all_at(b"end", size - 3).unwrap();
        let img = ImageReader::new(&f, &p, size, bs as u32).unwrap();
        let ext = img.data_extents().unwrap();
        let (pages, read) = img.scan_regions(&ext, &[0, 1, 2]).unwrap();
        assert!(read < 64 * bs, "holes are not read: {read}");
        assert!(pages[0][5] > ZERO);
        assert_eq!(pages[0][9], ZERO);
        assert_eq!(pages[0][4], ZERO);
        assert!(pages[1].iter().all(|&x| x == ZERO));
        assert!(pages[2][1023] > ZERO);

        // Re-digesting chosen blocks agrees with a scan, and sees a change.
        f.write_all_at(b"y", 5 * bs + 7).unwrap();
        let mut page = pages[0].clone();
        let mut bits = [0u64; 16];
        bits[0] = 1 << 5;
        img.digest_blocks(0, &bits, &mut page).unwrap();
        assert_ne!(page[5], pages[0][5]);
        let ext = img.data_extents().unwrap();
        assert_eq!(img.scan_region(&ext, 0).unwrap().0, page);
    }
}
