//! Block digests of clean regions (`STORE/track/NAME.dig`): what each block of the image held
//! when its region last went clean (its dirty-region mark was cleared), so that the open after
//! an unclean stop can prove which blocks nobody wrote since, and stamp the others. A write
//! made straight to the image while vmref was down leaves no mark and no stamp; only the
//! bytes themselves can show it (see "Change tracking" in docs/design.md).
//!
//! ```text
//! 0      header (4 KiB): 0 magic "VMREFDIG" | 8 major u16 | 10 minor u16 | 16 epoch u64 |
//!        24 nregions u64 | 32 region_blocks u32 | 4092 crc u32 (of 0..4092)
//! 4096   table: one u64 per region, padded to 4 KiB: state (low u32) | page crc (high u32)
//!        state 0: nothing known; 1: every block reads as zeros; 2: the page holds the digests
//! ...    one 8 KiB page per region: 1024 u64 block digests (UNKNOWN, ZERO or a hash)
//! ```
//! The epoch ties the file to one incarnation of the map: the map header records it, and a
//! map written by a release that kept no digests (or a new map after a restart) records
//! another, so stale digests are never trusted. Like map pages, a region's page and table
//! entry are rewritten only while its region is marked in the log, or by the open that
//! recovers it: a torn page fails its checksum, which reads as "nothing known", which the next
//! unclean open counts as changed.

use std::path::Path;

use super::durable::DurableFile;
use super::seqmap::REGION_BLOCKS;
use crate::error::{Error, Result};
use crate::format::{FormatError, check_header, crc, le_u32, le_u64};
use crate::store::atomic;

/// Do not modify.
pub const MAGIC: &[u8; 8] = b"VMREFDIG";
pub const MAJOR: u16 = 1;
pub const MINOR: u16 = 0;
const PAGE: usize = 4096;
const DIGEST_PAGE: usize = REGION_BLOCKS as usize * 8;

/// A block whose bytes were never digested: it counts as changed after an unclean stop.
pub const UNKNOWN: u64 = 0;
/// A block that reads as zeros (a hole, or written zeros: the same bytes to a reader).
pub const ZERO: u64 = 1;

const STATE_UNKNOWN: u32 = 0;
const STATE_ZERO: u32 = 1;
const STATE_PAGE: u32 = 2;

/// The digest of one block's bytes (a short last block as read, without padding): 64 bits of
/// BLAKE3, never UNKNOWN, and ZERO exactly for all-zero bytes.
pub fn block_digest(bytes: &[u8]) -> u64 {
    if bytes.iter().all(|&b| b == 0) {
        return ZERO;
    }
    let h = blake3::hash(bytes);
    let v = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    if v <= ZERO { v + 2 } else { v }
}

pub fn encode_header(epoch: u64, nregions: u64) -> [u8; PAGE] {
    let mut b = [0u8; PAGE];
    b[..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&MAJOR.to_le_bytes());
    b[10..12].copy_from_slice(&MINOR.to_le_bytes());
    b[16..24].copy_from_slice(&epoch.to_le_bytes());
    b[24..32].copy_from_slice(&nregions.to_le_bytes());
    b[32..36].copy_from_slice(&(REGION_BLOCKS as u32).to_le_bytes());
    let c = crc(&b[..PAGE - 4]);
    b[PAGE - 4..].copy_from_slice(&c.to_le_bytes());
    b
}

/// The epoch and the number of regions.
pub fn decode_header(b: &[u8]) -> Result<(u64, u64), FormatError> {
    check_header(b, PAGE, MAGIC, MAJOR, PAGE - 4, "digest header")?;
    let rb = le_u32(b, 32) as u64;
    if rb != REGION_BLOCKS {
        return Err(FormatError::Invalid {
            what: "region size",
            why: rb.to_string(),
        });
    }
    Ok((le_u64(b, 16), le_u64(b, 24)))
}

fn table_bytes(nregions: u64) -> u64 {
    (nregions * 8).div_ceil(PAGE as u64).max(1) * PAGE as u64
}

fn encode_page(page: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; DIGEST_PAGE];
    for (i, d) in page.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
    b
}

#[derive(Debug)]
pub struct DigestFile {
    file: DurableFile,
    epoch: u64,
    nregions: u64,
    table: Vec<u64>,
    /// Table pages written since the last sync.
    table_dirty: Vec<u64>,
}

impl DigestFile {
    fn pages_offset(&self) -> u64 {
        PAGE as u64 + table_bytes(self.nregions)
    }

    /// Create a file in which nothing is known, atomically, replacing any old one.
    pub fn create(path: &Path, epoch: u64, nregions: u64) -> Result<DigestFile> {
        let tmp = atomic::TempFile::new(path)?;
        tmp.write_all(&encode_header(epoch, nregions))?;
        // Sparse: a zero table says "nothing known", and unwritten pages are never read.
        tmp.file()
            .set_len(PAGE as u64 + table_bytes(nregions) + nregions * DIGEST_PAGE as u64)
            .map_err(Error::io("resize", tmp.path()))?;
        tmp.commit()?;
        Ok(DigestFile {
            file: DurableFile::open(path)?,
            epoch,
            nregions,
            table: vec![0; nregions as usize],
            table_dirty: Vec::new(),
        })
    }

    /// Open a digest file and read its table.
    ///
    /// # Errors
    /// `Format` for a damaged header, a region count other than `nregions` or a short file.
    pub fn open(path: &Path, nregions: u64) -> Result<DigestFile> {
        let file = DurableFile::open(path)?;
        let ferr = |source| Error::Format {
            path: path.to_path_buf(),
            source,
        };
        let mut h = vec![0u8; PAGE];
        let got = file.read_at(&mut h, 0)?;
        let (epoch, n) = decode_header(&h[..got]).map_err(ferr)?;
        if n != nregions {
            return Err(ferr(FormatError::Invalid {
                what: "region count",
                why: format!("digests have {n}, map has {nregions}"),
            }));
        }
        let total = PAGE as u64 + table_bytes(n) + n * DIGEST_PAGE as u64;
        let len = file.len()?;
        if len < total {
            return Err(ferr(FormatError::Truncated {
                got: len as usize,
                need: total as usize,
            }));
        }
        let mut t = vec![0u8; table_bytes(n) as usize];
        file.read_at(&mut t, PAGE as u64)?;
        let table = (0..n as usize).map(|i| le_u64(&t, i * 8)).collect();
        Ok(DigestFile {
            file,
            epoch,
            nregions: n,
            table,
            table_dirty: Vec::new(),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether anything is recorded for `region` (its page may still fail its checksum).
    pub fn is_known(&self, region: u64) -> bool {
        self.table[region as usize] as u32 != STATE_UNKNOWN
    }

    /// The digests of `region`'s blocks, or None when nothing trustworthy is recorded (never
    /// recorded, or a page that fails its checksum: both mean "unknown").
    pub fn region(&self, region: u64) -> Result<Option<Vec<u64>>> {
        let e = self.table[region as usize];
        match e as u32 {
            STATE_ZERO => Ok(Some(vec![ZERO; REGION_BLOCKS as usize])),
            STATE_PAGE => {
                let mut b = vec![0u8; DIGEST_PAGE];
                let got = self
                    .file
                    .read_at(&mut b, self.pages_offset() + region * DIGEST_PAGE as u64)?;
                if got < DIGEST_PAGE || crc(&b) != (e >> 32) as u32 {
                    return Ok(None);
                }
                Ok(Some(
                    (0..REGION_BLOCKS as usize)
                        .map(|i| le_u64(&b, i * 8))
                        .collect(),
                ))
            }
            _ => Ok(None),
        }
    }

    /// Record `region`'s digests (durable at the next `sync`).
    pub fn set_region(&mut self, region: u64, page: &[u64]) -> Result<()> {
        debug_assert_eq!(page.len(), REGION_BLOCKS as usize);
        let entry = if page.iter().all(|&d| d == ZERO) {
            STATE_ZERO as u64
        } else {
            let b = encode_page(page);
            self.file
                .write_at(&b, self.pages_offset() + region * DIGEST_PAGE as u64)?;
            STATE_PAGE as u64 | (crc(&b) as u64) << 32
        };
        if self.table[region as usize] != entry {
            self.table[region as usize] = entry;
            self.table_dirty.push(region * 8 / PAGE as u64);
        }
        Ok(())
    }

    /// Write the changed table pages and make everything written so far durable.
    pub fn sync(&mut self) -> Result<()> {
        self.table_dirty.sort_unstable();
        self.table_dirty.dedup();
        for &tp in &self.table_dirty {
            let first = (tp * PAGE as u64 / 8) as usize;
            let last = (first + PAGE / 8).min(self.nregions as usize);
            let mut b = vec![0u8; PAGE];
            for (k, e) in self.table[first..last].iter().enumerate() {
                b[k * 8..k * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
            self.file.write_at(&b, PAGE as u64 + tp * PAGE as u64)?;
        }
        self.table_dirty.clear();
        self.file.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_damage() {
        let b = encode_header(0x1234_5678_9abc, 77);
        assert_eq!(decode_header(&b).unwrap(), (0x1234_5678_9abc, 77));
        for i in (0..PAGE * 8).step_by(53) {
            let mut c = b;
            c[i / 8] ^= 1 << (i % 8);
            assert!(decode_header(&c).is_err(), "bit {i}");
        }
        for n in [0, 11, 100, PAGE - 1] {
            assert!(decode_header(&b[..n]).is_err());
        }
    }

    #[test]
    fn digests_of_zeros_and_data_differ_and_never_say_unknown() {
        assert_eq!(block_digest(&[0u8; 4096]), ZERO);
        assert_eq!(block_digest(&[]), ZERO);
        let a = block_digest(b"a");
        assert!(a > ZERO);
        assert_ne!(a, block_digest(b"b"));
        assert_ne!(block_digest(&[0, 1]), block_digest(&[1, 0]));
    }

    #[test]
    fn pages_round_trip_and_damage_reads_as_unknown() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g");
        let mut f = DigestFile::create(&p, 9, 600).unwrap();
        assert!(!f.is_known(3) && f.region(3).unwrap().is_none());
        let mut page = vec![ZERO; REGION_BLOCKS as usize];
        page[5] = 1234;
        page[1023] = UNKNOWN;
        f.set_region(3, &page).unwrap();
        f.set_region(599, &[ZERO; REGION_BLOCKS as usize]).unwrap();
        f.sync().unwrap();
        drop(f);

        let f = DigestFile::open(&p, 600).unwrap();
        assert_eq!(f.epoch(), 9);
        assert_eq!(f.region(3).unwrap().unwrap(), page);
        assert!(f.is_known(599));
        assert_eq!(f.region(599).unwrap().unwrap()[7], ZERO);
        assert!(f.region(4).unwrap().is_none());
        assert!(
            DigestFile::open(&p, 601).is_err(),
            "region count is checked"
        );

        // A flipped digest fails the page's checksum: unknown, never another digest.
        let raw = std::fs::read(&p).unwrap();
        let page_off = PAGE + table_bytes(600) as usize + 3 * DIGEST_PAGE;
        let mut bad = raw.clone();
        bad[page_off + 5 * 8] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        let f = DigestFile::open(&p, 600).unwrap();
        assert!(f.is_known(3) && f.region(3).unwrap().is_none());

        // Header damage and truncation are format errors.
        let mut bad = raw.clone();
        bad[20] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        assert!(DigestFile::open(&p, 600).is_err());
        std::fs::write(&p, &raw[..raw.len() - 1]).unwrap();
        assert!(DigestFile::open(&p, 600).is_err());
    }
}
