//! The durable dirty-region log (`STORE/track/NAME.log`): one bit per region of the map.
//! Before the first write to a region since the last flush is acknowledged, its bit is written
//! and fdatasync'ed (write-through), so after any crash every region written since the last
//! flush is known. A flush of the map clears the bits of regions not written in the interval
//! it flushed (a busy region stays marked, so it pays no new sync per interval); a clean stop
//! clears them all. Bits only go from 0 to 1 between clears, so a torn bitmap write can lose
//! only the bit of a write not yet acknowledged.
//!
//! Layout: `0 magic "VMREFLOG" | 8 major u16 | 10 minor u16 | 16 nregions u64 | 4092 crc u32`,
//! then the bitmap from offset 4096, padded to 4 KiB.

use std::path::Path;

use super::durable::DurableFile;
use crate::error::{Error, Result};
use crate::format::{FormatError, check_header, crc, le_u64};
use crate::store::atomic;

/// Do not modify.
pub const MAGIC: &[u8; 8] = b"VMREFLOG";
pub const MAJOR: u16 = 1;
pub const MINOR: u16 = 0;
const PAGE: usize = 4096;
const BITS_PER_PAGE: u64 = PAGE as u64 * 8;

pub fn encode_header(nregions: u64) -> [u8; PAGE] {
    let mut b = [0u8; PAGE];
    b[..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&MAJOR.to_le_bytes());
    b[10..12].copy_from_slice(&MINOR.to_le_bytes());
    b[16..24].copy_from_slice(&nregions.to_le_bytes());
    let c = crc(&b[..PAGE - 4]);
    b[PAGE - 4..].copy_from_slice(&c.to_le_bytes());
    b
}

/// The number of regions the log covers.
pub fn decode_header(b: &[u8]) -> Result<u64, FormatError> {
    check_header(b, PAGE, MAGIC, MAJOR, PAGE - 4, "log header")?;
    Ok(le_u64(b, 16))
}

fn bitmap_bytes(nregions: u64) -> usize {
    (nregions.div_ceil(BITS_PER_PAGE) as usize).max(1) * PAGE
}

#[derive(Debug)]
pub struct DirtyLog {
    file: DurableFile,
    bits: Vec<u8>,
}

impl DirtyLog {
    /// Create an empty log atomically.
    pub fn create(path: &Path, nregions: u64) -> Result<DirtyLog> {
        let tmp = atomic::TempFile::new(path)?;
        tmp.write_all(&encode_header(nregions))?;
        tmp.write_all(&vec![0u8; bitmap_bytes(nregions)])?;
        tmp.commit()?;
        Ok(DirtyLog {
            file: DurableFile::open(path)?,
            bits: vec![0u8; bitmap_bytes(nregions)],
        })
    }

    /// Open and read the log; returns it and the regions marked in it.
    ///
    /// # Errors
    /// `Format` for a damaged header or a region count other than `nregions`.
    pub fn open(path: &Path, nregions: u64) -> Result<(DirtyLog, Vec<u64>)> {
        let file = DurableFile::open(path)?;
        let ferr = |source| Error::Format {
            path: path.to_path_buf(),
            source,
        };
        let mut h = vec![0u8; PAGE];
        let got = file.read_at(&mut h, 0)?;
        if got < PAGE {
            return Err(ferr(FormatError::Truncated { got, need: PAGE }));
        }
        let n = decode_header(&h).map_err(ferr)?;
        if n != nregions {
            return Err(ferr(FormatError::Invalid {
                what: "region count",
                why: format!("log has {n}, map has {nregions}"),
            }));
        }
        let mut bits = vec![0u8; bitmap_bytes(nregions)];
        let got = file.read_at(&mut bits, PAGE as u64)?;
        if got < bits.len() {
            return Err(ferr(FormatError::Truncated {
                got: PAGE + got,
                need: PAGE + bits.len(),
            }));
        }
        let marked = (0..nregions)
            .filter(|&r| bits[(r / 8) as usize] & (1 << (r % 8)) != 0)
            .collect();
        Ok((DirtyLog { file, bits }, marked))
    }

    pub fn is_marked(&self, region: u64) -> bool {
        self.bits[(region / 8) as usize] & (1 << (region % 8)) != 0
    }

    /// Mark regions and make the marks durable before returning.
    ///
    /// # Errors
    /// A failed write or sync. The regions then stay unmarked in memory, so the next write
    /// to them marks them again (rewriting the page) instead of trusting a mark that may
    /// never have reached the disk.
    pub fn mark(&mut self, regions: &[u64]) -> Result<()> {
        let mut pages: Vec<u64> = Vec::new();
        let mut new: Vec<u64> = Vec::new();
        for &r in regions {
            if !self.is_marked(r) {
                self.bits[(r / 8) as usize] |= 1 << (r % 8);
                new.push(r);
            }
            pages.push(r / BITS_PER_PAGE);
        }
        pages.dedup();
        let res = self.write_pages(&pages);
        if res.is_err() {
            for r in new {
                self.bits[(r / 8) as usize] &= !(1 << (r % 8));
            }
        }
        res
    }

    /// Clear every mark durably (after the map flush that covers them is durable).
    pub fn clear(&mut self) -> Result<()> {
        self.retain_only(&[])
    }

    /// Clear every mark but those of `keep` durably (after the map flush that covers the
    /// cleared ones is durable). Writes only the pages that change.
    pub fn retain_only(&mut self, keep: &[u64]) -> Result<()> {
        let mut next = vec![0u8; self.bits.len()];
        for &r in keep {
            if self.is_marked(r) {
                next[(r / 8) as usize] |= 1 << (r % 8);
            }
        }
        let pages: Vec<u64> = (0..(self.bits.len() / PAGE) as u64)
            .filter(|p| {
                let (s, e) = (*p as usize * PAGE, (*p as usize + 1) * PAGE);
                self.bits[s..e] != next[s..e]
            })
            .collect();
        if pages.is_empty() {
            return Ok(());
        }
        self.bits = next;
        self.write_pages(&pages)
    }

    fn write_pages(&mut self, pages: &[u64]) -> Result<()> {
        for &p in pages {
            let s = p as usize * PAGE;
            self.file
                .write_at(&self.bits[s..s + PAGE], PAGE as u64 + s as u64)?;
        }
        self.file.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen_and_clear() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        let mut l = DirtyLog::create(&p, 40000).unwrap();
        l.mark(&[3, 39999]).unwrap();
        drop(l);
        let (mut l, marked) = DirtyLog::open(&p, 40000).unwrap();
        assert_eq!(marked, vec![3, 39999]);
        assert!(l.is_marked(3) && !l.is_marked(4));
        l.clear().unwrap();
        assert!(DirtyLog::open(&p, 40000).unwrap().1.is_empty());
    }

    #[test]
    fn damaged_or_mismatched_log_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        DirtyLog::create(&p, 10).unwrap();
        assert!(DirtyLog::open(&p, 11).is_err());
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(DirtyLog::open(&p, 10).is_err());
        std::fs::write(&p, &b[..100]).unwrap();
        assert!(DirtyLog::open(&p, 10).is_err());
    }
}
