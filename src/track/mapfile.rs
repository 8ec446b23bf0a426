//! The sequence-number map on disk (`STORE/track/NAME.map`), updated in place:
//!
//! ```text
//! 0      header slot A (4 KiB)   two slots written alternately, so a torn header write
//! 4096   header slot B (4 KiB)   leaves the other one valid; the higher generation wins
//! 8192   CRC-32C per region page, padded to 4 KiB
//! ...    one 4 KiB page of u32 stamps per region
//! ```
//! A page is only rewritten while its region is durably marked in the dirty-region log, so a
//! torn page is always one that recovery re-stamps anyway; a bad page outside the log is damage.
//!
//! Header (little-endian): `0 magic "VMREFMAP" | 8 major u16 | 10 minor u16 | 16 generation u64 |
//! 24 block_size u32 | 28 region_blocks u32 | 32 disk_size u64 | 40 nblocks u64 |
//! 48 current_seq u32 | 52 base_seq u32 | 56 flags u32 | 64 identity (dev, ino, size, mtime_ns,
//! ctime_ns: 5 x u64) | 104 reason_len u16 | 106 reason (<= 256 bytes) | 368 digest_epoch u64 |
//! 376 settled u32 | 4092 crc u32`.
//!
//! Minor 1 added `digest_epoch` and `settled`. A release before it writes zeros there (it
//! builds each header from zeros), which reads as "no digests" and "not settled": the safe
//! answers, so a store that an older release touched in between is never trusted wrongly.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::durable::DurableFile;
use super::seqmap::{REGION_BLOCKS, SeqMap, regions_for};
use crate::error::{Error, Result};
use crate::format::{FormatError, check_header, crc, le_u16, le_u32, le_u64};
use crate::store::atomic;

/// Do not modify.
pub const MAGIC: &[u8; 8] = b"VMREFMAP";
pub const MAJOR: u16 = 1;
pub const MINOR: u16 = 1;
pub const PAGE: usize = 4096;
const MAX_REASON: usize = 256;

/// Set once a process that opened the disk for tracked writes has changed its tracking state,
/// cleared by its clean close. Informational: recovery relies on the log, not on this flag.
pub const FLAG_OPEN: u32 = 1;

/// What identifies the image file and its last tracked state: a change found at open that
/// tracking did not make means the image was written, replaced or resized outside the mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: u64,
    pub ctime_ns: u64,
}

impl Identity {
    pub fn of(meta: &std::fs::Metadata) -> Identity {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| {
            (s as u64)
                .wrapping_mul(1_000_000_000)
                .wrapping_add(n as u64)
        };
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapHeader {
    pub generation: u64,
    pub block_size: u32,
    pub disk_size: u64,
    pub nblocks: u64,
    pub current_seq: u32,
    /// Changes are known only since points whose sequence number is at least this.
    pub base_seq: u32,
    pub flags: u32,
    pub identity: Identity,
    /// Why tracking last restarted (shown when a query reaches back before `base_seq`).
    pub reason: String,
    /// The epoch of the digest file that belongs to this map (`track::digest`); 0: none.
    pub digest_epoch: u64,
    /// The identity was recorded long enough after the image's last tracked change that any
    /// later change shows in its times, even with coarse timestamps (see `Tracker::settle`).
    pub settled: bool,
}

impl MapHeader {
    pub fn encode(&self) -> [u8; PAGE] {
        let mut b = [0u8; PAGE];
        b[..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&MAJOR.to_le_bytes());
        b[10..12].copy_from_slice(&MINOR.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..28].copy_from_slice(&self.block_size.to_le_bytes());
        b[28..32].copy_from_slice(&(REGION_BLOCKS as u32).to_le_bytes());
        b[32..40].copy_from_slice(&self.disk_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.nblocks.to_le_bytes());
        b[48..52].copy_from_slice(&self.current_seq.to_le_bytes());
        b[52..56].copy_from_slice(&self.base_seq.to_le_bytes());
        b[56..60].copy_from_slice(&self.flags.to_le_bytes());
        let id = &self.identity;
        for (i, v) in [id.dev, id.ino, id.size, id.mtime_ns, id.ctime_ns]
            .iter()
            .enumerate()
        {
            b[64 + i * 8..72 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let mut reason = self.reason.as_bytes();
        if reason.len() > MAX_REASON {
            let mut n = MAX_REASON;
            while !self.reason.is_char_boundary(n) {
                n -= 1;
            }
            reason = &reason[..n];
        }
        b[104..106].copy_from_slice(&(reason.len() as u16).to_le_bytes());
        b[106..106 + reason.len()].copy_from_slice(reason);
        b[368..376].copy_from_slice(&self.digest_epoch.to_le_bytes());
        b[376..380].copy_from_slice(&u32::from(self.settled).to_le_bytes());
        let c = crc(&b[..PAGE - 4]);
        b[PAGE - 4..].copy_from_slice(&c.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<MapHeader, FormatError> {
        check_header(b, PAGE, MAGIC, MAJOR, PAGE - 4, "map header")?;
        let invalid = |what, why: String| FormatError::Invalid { what, why };
        let region_blocks = le_u32(b, 28) as u64;
        if region_blocks != REGION_BLOCKS {
            return Err(invalid("region size", region_blocks.to_string()));
        }
        let block_size = le_u32(b, 24);
        let disk_size = le_u64(b, 32);
        let nblocks = le_u64(b, 40);
        if !block_size.is_power_of_two()
            || block_size < 4096
            || nblocks != disk_size.div_ceil(block_size as u64)
        {
            return Err(invalid(
                "geometry",
                format!("block size {block_size}, size {disk_size}, {nblocks} blocks"),
            ));
        }
        let rlen = le_u16(b, 104) as usize;
        if rlen > MAX_REASON {
            return Err(invalid("reason length", rlen.to_string()));
        }
        let reason = String::from_utf8(b[106..106 + rlen].to_vec())
            .map_err(|_| invalid("reason", "not UTF-8".into()))?;
        Ok(MapHeader {
            generation: le_u64(b, 16),
            block_size,
            disk_size,
            nblocks,
            current_seq: le_u32(b, 48),
            base_seq: le_u32(b, 52),
            flags: le_u32(b, 56),
            identity: Identity {
                dev: le_u64(b, 64),
                ino: le_u64(b, 72),
                size: le_u64(b, 80),
                mtime_ns: le_u64(b, 88),
                ctime_ns: le_u64(b, 96),
            },
            reason,
            digest_epoch: le_u64(b, 368),
            settled: le_u32(b, 376) == 1,
        })
    }
}

fn crc_table_bytes(nregions: u64) -> u64 {
    (nregions * 4).div_ceil(PAGE as u64) * PAGE as u64
}

fn zero_page_crc() -> u32 {
    crc(&[0u8; PAGE])
}

fn page_bytes(page: Option<&[u32]>) -> Vec<u8> {
    let mut out = vec![0u8; PAGE];
    if let Some(p) = page {
        for (i, s) in p.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&s.to_le_bytes());
        }
    }
    out
}

/// The open map file.
#[derive(Debug)]
pub struct MapFile {
    file: DurableFile,
    nregions: u64,
    crcs: Vec<u32>,
    generation: u64,
}

/// What `MapFile::open` found.
#[derive(Debug)]
pub struct Loaded {
    pub file: MapFile,
    pub header: MapHeader,
    pub map: SeqMap,
    /// Regions whose page does not match its checksum.
    pub damaged: Vec<u64>,
}

impl MapFile {
    fn pages_offset(&self) -> u64 {
        2 * PAGE as u64 + crc_table_bytes(self.nregions)
    }

    /// Write a fresh map (all stamps zero) atomically, replacing any old one.
    pub fn create(path: &Path, header: &MapHeader) -> Result<MapFile> {
        let nregions = regions_for(header.nblocks);
        let tmp = atomic::TempFile::new(path)?;
        let mut h = header.clone();
        h.generation = 1;
        let hb = h.encode();
        let zc = zero_page_crc().to_le_bytes();
        let mut table = vec![0u8; crc_table_bytes(nregions) as usize];
        for i in 0..nregions as usize {
            table[i * 4..i * 4 + 4].copy_from_slice(&zc);
        }
        let f = tmp.file();
        f.write_all_at(&hb, 0)
            .map_err(Error::io("write", tmp.path()))?;
        f.write_all_at(&hb, PAGE as u64)
            .map_err(Error::io("write", tmp.path()))?;
        f.write_all_at(&table, 2 * PAGE as u64)
            .map_err(Error::io("write", tmp.path()))?;
        f.set_len(2 * PAGE as u64 + table.len() as u64 + nregions * PAGE as u64)
            .map_err(Error::io("resize", tmp.path()))?;
        tmp.commit()?;
        Ok(MapFile {
            file: DurableFile::open(path)?,
            nregions,
            crcs: vec![zero_page_crc(); nregions as usize],
            generation: 1,
        })
    }

    /// Read and check the whole map.
    ///
    /// # Errors
    /// `Format` when neither header slot is valid or the file is shorter than its geometry.
    pub fn open(path: &Path) -> Result<Loaded> {
        let file = DurableFile::open(path)?;
        let ferr = |source| Error::Format {
            path: path.to_path_buf(),
            source,
        };
        let mut hb = vec![0u8; 2 * PAGE];
        let got = file.read_at(&mut hb, 0)?;
        let a = MapHeader::decode(&hb[..PAGE.min(got)]);
        let b = if got >= 2 * PAGE {
            MapHeader::decode(&hb[PAGE..])
        } else {
            Err(FormatError::Truncated {
                got,
                need: 2 * PAGE,
            })
        };
        let header = match (a, b) {
            (Ok(a), Ok(b)) => {
                if a.generation >= b.generation {
                    a
                } else {
                    b
                }
            }
            (Ok(a), Err(_)) => a,
            (Err(_), Ok(b)) => b,
            (Err(e), Err(_)) => return Err(ferr(e)),
        };
        let nregions = regions_for(header.nblocks);
        let tlen = crc_table_bytes(nregions) as usize;
        let total = 2 * PAGE as u64 + tlen as u64 + nregions * PAGE as u64;
        let len = file.len()?;
        if len < total {
            return Err(ferr(FormatError::Truncated {
                got: len as usize,
                need: total as usize,
            }));
        }
        let mut table = vec![0u8; tlen];
        file.read_at(&mut table, 2 * PAGE as u64)?;
        let crcs: Vec<u32> = (0..nregions as usize)
            .map(|i| le_u32(&table, i * 4))
            .collect();
        let mut mf = MapFile {
            file,
            nregions,
            crcs,
            generation: header.generation,
        };
        let mut map = SeqMap::new(header.nblocks);
        let mut damaged = Vec::new();
        let zc = zero_page_crc();
        // Only pages whose checksum is not that of a zero page are read, in runs of up to
        // CHUNK: the open of a 1 TiB disk's map then costs what its written regions hold, not
        // 64 MiB of zeros. Skipping is safe because the table is the authority: a page is
        // rewritten only while its region is durably marked in the dirty-region log, so a page
        // whose table entry still says "zero" but whose bytes were torn mid-write belongs to a
        // region that recovery re-stamps anyway. (A damaged table entry is still caught when
        // it disagrees with its page, unless the damage turns it into exactly the zero-page
        // checksum: one chance in 2^32.)
        const CHUNK: u64 = 256;
        let mut buf = vec![0u8; CHUNK as usize * PAGE];
        let mut r = 0;
        while r < nregions {
            if mf.crcs[r as usize] == zc {
                r += 1;
                continue;
            }
            let mut e = r + 1;
            while e < nregions && e - r < CHUNK && mf.crcs[e as usize] != zc {
                e += 1;
            }
            let n = e - r;
            let bytes = &mut buf[..n as usize * PAGE];
            mf.file
                .read_at(bytes, mf.pages_offset() + r * PAGE as u64)?;
            for i in 0..n {
                let page = &bytes[i as usize * PAGE..(i as usize + 1) * PAGE];
                let region = r + i;
                let c = crc(page);
                if c != mf.crcs[region as usize] {
                    damaged.push(region);
                    continue;
                }
                if c == zc && page.iter().all(|&x| x == 0) {
                    continue;
                }
                let stamps: Vec<u32> = (0..REGION_BLOCKS as usize)
                    .map(|k| le_u32(page, k * 4))
                    .collect();
                map.set_region(region, &stamps);
            }
            r += n;
        }
        mf.generation = header.generation;
        Ok(Loaded {
            file: mf,
            header,
            map,
            damaged,
        })
    }

    /// Write the pages of `regions` and their checksums (not yet durable).
    pub fn write_regions(&mut self, map: &SeqMap, regions: &[u64]) -> Result<()> {
        let poff = self.pages_offset();
        let mut table_pages = Vec::new();
        for &r in regions {
            let bytes = page_bytes(map.region_page(r).as_deref());
            self.file.write_at(&bytes, poff + r * PAGE as u64)?;
            self.crcs[r as usize] = crc(&bytes);
            table_pages.push(r * 4 / PAGE as u64);
        }
        table_pages.sort_unstable();
        table_pages.dedup();
        for tp in table_pages {
            let first = (tp * PAGE as u64 / 4) as usize;
            let last = (first + PAGE / 4).min(self.nregions as usize);
            let mut b = vec![0u8; PAGE];
            for (k, c) in self.crcs[first..last].iter().enumerate() {
                b[k * 4..k * 4 + 4].copy_from_slice(&c.to_le_bytes());
            }
            self.file.write_at(&b, 2 * PAGE as u64 + tp * PAGE as u64)?;
        }
        Ok(())
    }

    /// Write `header` into the older slot and make everything written so far durable.
    pub fn commit_header(&mut self, header: &MapHeader) -> Result<()> {
        let mut h = header.clone();
        self.generation += 1;
        h.generation = self.generation;
        let slot = self.generation % 2;
        self.file.write_at(&h.encode(), slot * PAGE as u64)?;
        self.file.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> MapHeader {
        MapHeader {
            generation: 0,
            block_size: 65536,
            disk_size: 3000 * 65536 - 100,
            nblocks: 3000,
            current_seq: 4,
            base_seq: 1,
            flags: FLAG_OPEN,
            identity: Identity {
                dev: 1,
                ino: 2,
                size: 3,
                mtime_ns: 4,
                ctime_ns: 5,
            },
            reason: "written outside the mount".into(),
            digest_epoch: 0xfeed,
            settled: true,
        }
    }

    #[test]
    fn header_round_trip_and_damage() {
        let mut h = header();
        h.generation = 9;
        let b = h.encode();
        assert_eq!(MapHeader::decode(&b).unwrap(), h);
        for i in (0..PAGE * 8).step_by(61) {
            let mut c = b;
            c[i / 8] ^= 1 << (i % 8);
            assert!(MapHeader::decode(&c).is_err(), "bit {i}");
        }
        assert!(MapHeader::decode(&b[..100]).is_err());
    }

    #[test]
    fn pages_round_trip_and_damage_is_found() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        let mut f = MapFile::create(&p, &header()).unwrap();
        let mut m = SeqMap::new(3000);
        m.stamp(0, 5, 2);
        m.stamp(2100, 900, 3);
        f.write_regions(&m, &[0, 2]).unwrap();
        let mut h = header();
        h.current_seq = 7;
        f.commit_header(&h).unwrap();
        let l = MapFile::open(&p).unwrap();
        assert_eq!(l.header.current_seq, 7);
        assert!(l.damaged.is_empty());
        assert_eq!(l.map.changed_since(0), m.changed_since(0));

        // A torn header slot leaves the other one in force.
        let raw = std::fs::read(&p).unwrap();
        let mut bad = raw.clone();
        let slot = (l.header.generation % 2) as usize * PAGE;
        bad[slot + 50] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        let l2 = MapFile::open(&p).unwrap();
        assert_eq!(l2.header.current_seq, 4);

        // A flipped stamp is reported as a damaged region.
        let mut bad = raw.clone();
        let off = 2 * PAGE + PAGE + 2 * PAGE + 10; // pages start after 1 table page
        bad[off] ^= 0x40;
        std::fs::write(&p, &bad).unwrap();
        assert_eq!(MapFile::open(&p).unwrap().damaged, vec![2]);

        // Truncation is refused.
        std::fs::write(&p, &raw[..raw.len() - 1]).unwrap();
        assert!(MapFile::open(&p).is_err());
    }
}
