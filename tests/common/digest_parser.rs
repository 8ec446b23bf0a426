//! Properties of the block digest file parser (`track::digest`, STORE/track/NAME.dig), run on
//! arbitrary bytes by tests/parsers_never_panic.rs and by the `track_digest` cargo-fuzz target
//! (which includes this file by path). Each function panics when a property fails:
//! - garbage never panics: the header is refused or decoded, and a file that opens answers
//!   every region with its digests or "unknown", never a page whose checksum fails;
//! - a header that decodes re-encodes to a header that decodes to the same values;
//! - a file written with `set_region` reads back its digests, and a flipped byte in a page
//!   reads as "unknown", never as other digests.
#![allow(dead_code)]

use vmref::format::crc;
use vmref::track::digest::{DigestFile, UNKNOWN, ZERO, decode_header, encode_header};
use vmref::track::seqmap::REGION_BLOCKS;

const PAGE: usize = 4096;
const DIGEST_PAGE: usize = REGION_BLOCKS as usize * 8;

/// The digests of region `r` built from `data`: ZERO, UNKNOWN and hashes, all three kinds.
fn page_from(data: &[u8], r: u64) -> Vec<u64> {
    (0..REGION_BLOCKS as usize)
        .map(|i| {
            let b = data.get((i + r as usize * 7) % data.len().max(1)).copied();
            match b {
                None | Some(0) => ZERO,
                Some(1) => UNKNOWN,
                Some(v) => (v as u64) << 8 | i as u64,
            }
        })
        .collect()
}

/// `data[0]` picks the region count (0..4) the caller expects; with `data[1]` odd the file
/// gets a valid header, its full length, and table checksums that match its pages, so the
/// page reads are reached.
pub fn digest_file(data: &[u8]) {
    if let Ok((epoch, n)) = decode_header(data) {
        assert_eq!(decode_header(&encode_header(epoch, n)).unwrap(), (epoch, n));
    }
    if data.len() < 2 {
        return;
    }
    let nregions = data[0] as u64 % 4;
    let mut b = data[2..].to_vec();
    if data[1] & 1 == 1 {
        let total = 2 * PAGE + nregions as usize * DIGEST_PAGE;
        b.resize(b.len().max(total), 0);
        b[..PAGE].copy_from_slice(&encode_header(7, nregions));
        for r in 0..nregions as usize {
            let page = &b[2 * PAGE + r * DIGEST_PAGE..][..DIGEST_PAGE];
            let c = crc(page);
            let e = PAGE + r * 8;
            let state = u32::from_le_bytes(b[e..e + 4].try_into().unwrap());
            if state == 2 {
                b[e + 4..e + 8].copy_from_slice(&c.to_le_bytes());
            }
        }
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.dig");
    std::fs::write(&p, &b).unwrap();
    if let Ok(f) = DigestFile::open(&p, nregions) {
        for r in 0..nregions {
            if let Some(page) = f.region(r).unwrap() {
                assert_eq!(page.len(), REGION_BLOCKS as usize);
                let e = PAGE + r as usize * 8;
                let state = u32::from_le_bytes(b[e..e + 4].try_into().unwrap());
                assert!(state == 1 || state == 2, "region {r} state {state}");
                if state == 2 {
                    let raw = &b[2 * PAGE + r as usize * DIGEST_PAGE..][..DIGEST_PAGE];
                    assert_eq!(crc(raw).to_le_bytes(), b[e + 4..e + 8]);
                }
            }
        }
    }

    // Round trip of digests built from the input, and damage that reads as unknown.
    let n = 3;
    let p = d.path().join("g.dig");
    let mut f = DigestFile::create(&p, 11, n).unwrap();
    let pages: Vec<Vec<u64>> = (0..n).map(|r| page_from(data, r)).collect();
    for (r, page) in pages.iter().enumerate() {
        f.set_region(r as u64, page).unwrap();
    }
    f.sync().unwrap();
    drop(f);
    let f = DigestFile::open(&p, n).unwrap();
    for (r, page) in pages.iter().enumerate() {
        assert_eq!(f.region(r as u64).unwrap().as_ref(), Some(page));
    }
    drop(f);
    let at = data[1] as usize * 31 % DIGEST_PAGE;
    let mut raw = std::fs::read(&p).unwrap();
    let r = data[0] as usize % n as usize;
    if pages[r].iter().any(|&d| d != ZERO) {
        raw[2 * PAGE + r * DIGEST_PAGE + at] ^= 1 << (data[1] % 8);
        std::fs::write(&p, &raw).unwrap();
        let f = DigestFile::open(&p, n).unwrap();
        assert_eq!(
            f.region(r as u64).unwrap(),
            None,
            "flipped page of region {r}"
        );
    }
}
