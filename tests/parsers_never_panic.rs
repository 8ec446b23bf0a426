//! The fuzz targets' properties (fuzz/), run by `cargo test` on random inputs: every parser
//! of store bytes returns an error on garbage, never panics. Inputs are also re-framed with a
//! valid magic and checksum so the checks behind the checksums are reached.
//!
//! Garbage almost never decodes, so the round trips do not rely on it: they build valid block
//! indexes, map headers and log headers directly, encode them, and insist that they decode to
//! the same value and that any truncation or flipped bit is refused.

use proptest::prelude::*;

#[path = "common/digest_parser.rs"]
mod digest_parser;
#[path = "common/v2_parsers.rs"]
mod v2_parsers;
use vmref::format::{self, DISK_RECORD, ENVELOPE_LEN, REF_RECORD, STORE_META, crc};
use vmref::store::StoreMeta;
use vmref::store::records::{DiskRecord, RefRecord};
use vmref::track::log::{DirtyLog, decode_header, encode_header};
use vmref::track::mapfile::{Identity, MAGIC, MapFile, MapHeader, PAGE};
use vmref::upgrade::v1index::{BlockIndex, ENTRY_LEN, Entry, INDEX_HEADER_LEN, INDEX_MAGIC};
use vmref::upgrade::v1pack::{PACK_HEADER_LEN, PACK_MAGIC, PackId, check_header};

fn envelopes(b: &[u8]) {
    let _ = format::decode::<StoreMeta>(STORE_META, b);
    let _ = format::decode::<DiskRecord>(DISK_RECORD, b);
    let _ = format::decode::<RefRecord>(REF_RECORD, b);
}

fn valid_map_page(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    b.resize(PAGE.max(b.len()), 0);
    b[..8].copy_from_slice(MAGIC);
    let c = crc(&b[..PAGE - 4]);
    b[PAGE - 4..PAGE].copy_from_slice(&c.to_le_bytes());
    b
}

/// A valid block index: 4 KiB to 4 MiB blocks, up to 40 blocks, up to 5 packs, and entries
/// that are holes or name a pack of the table.
fn valid_index() -> impl Strategy<Value = BlockIndex> {
    (12u32..=22, 0u64..40, any::<u32>(), 0usize..6).prop_flat_map(|(shift, nfull, tail, np)| {
        let bs = 1u32 << shift;
        // A whole number of blocks, or a short last block.
        let disk_size = nfull * bs as u64 + (tail % bs) as u64 * u64::from(tail % 2);
        let nblocks = disk_size.div_ceil(bs as u64) as usize;
        let entry = (0..np as u32 + 1, any::<u32>(), any::<u32>()).prop_map(move |(p, slot, c)| {
            // `np` (one past the table) stands for a hole.
            if p == np as u32 {
                Entry::HOLE
            } else {
                Entry {
                    pack: p,
                    slot,
                    crc: c,
                }
            }
        });
        (
            prop::collection::vec(any::<[u8; 16]>(), np),
            prop::collection::vec(entry, nblocks),
        )
            .prop_map(move |(packs, entries)| BlockIndex {
                block_size: bs,
                disk_size,
                packs: packs.into_iter().map(PackId).collect(),
                entries,
            })
    })
}

/// A valid map header; the reason may be longer than the 256 bytes a header keeps.
fn valid_map_header() -> impl Strategy<Value = MapHeader> {
    (
        (any::<u64>(), 12u32..=26, any::<u64>()),
        (any::<u32>(), any::<u32>(), any::<u32>()),
        any::<[u64; 5]>(),
        prop::collection::vec(any::<char>(), 0..300),
        (any::<u64>(), any::<bool>()),
    )
        .prop_map(
            |((generation, shift, disk_size), (cur, base, flags), id, reason, (epoch, settled))| {
                let block_size = 1u32 << shift;
                MapHeader {
                    generation,
                    block_size,
                    disk_size,
                    nblocks: disk_size.div_ceil(block_size as u64),
                    current_seq: cur,
                    base_seq: base,
                    flags,
                    identity: Identity {
                        dev: id[0],
                        ino: id[1],
                        size: id[2],
                        mtime_ns: id[3],
                        ctime_ns: id[4],
                    },
                    reason: reason.into_iter().collect(),
                    digest_epoch: epoch,
                    settled,
                }
            },
        )
}

/// `s` cut to at most `max` bytes at a character boundary (what a header keeps of a reason).
fn truncated(s: &str, max: usize) -> &str {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn envelope(data in prop::collection::vec(any::<u8>(), 0..300), len in 0u32..400) {
        envelopes(&data);
        for kind in [STORE_META, DISK_RECORD, REF_RECORD] {
            let mut b = data.clone();
            b.resize(b.len().max(ENVELOPE_LEN), 0);
            b[..8].copy_from_slice(kind.magic);
            b[12..16].copy_from_slice(&len.to_le_bytes());
            let end = (ENVELOPE_LEN + len as usize).min(b.len());
            let pc = crc(&b[ENVELOPE_LEN..end]);
            b[16..20].copy_from_slice(&pc.to_le_bytes());
            let hc = crc(&b[..24]);
            b[24..28].copy_from_slice(&hc.to_le_bytes());
            envelopes(&b);
        }
    }

    #[test]
    fn map_header_garbage(
        data in prop::collection::vec(any::<u8>(), 0..PAGE + 10),
        fields in (any::<u32>(), any::<u64>(), any::<u64>(), any::<u16>()),
    ) {
        let _ = MapHeader::decode(&data);
        let mut b = data.clone();
        b.resize(PAGE, 0);
        // Fields the fuzzer would have to guess: block size, disk size, block count, reason length.
        let (bs, size, n, rlen) = fields;
        b[24..28].copy_from_slice(&(bs % 2 * 4096 + bs % 4 * (1 << (bs % 24))).to_le_bytes());
        b[28..32].copy_from_slice(&1024u32.to_le_bytes());
        b[32..40].copy_from_slice(&size.to_le_bytes());
        b[40..48].copy_from_slice(&(if n % 2 == 0 { size.div_ceil(4096) } else { n }).to_le_bytes());
        b[104..106].copy_from_slice(&(rlen % 300).to_le_bytes());
        // Rarely decodes; `map_header_round_trip` is the test of what does.
        if let Ok(h) = MapHeader::decode(&valid_map_page(&b)) {
            prop_assert_eq!(MapHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn map_header_round_trip(h in valid_map_header(), flips in prop::collection::vec(0..PAGE * 8, 8)) {
        let b = h.encode();
        let mut want = h.clone();
        want.reason = truncated(&h.reason, 256).to_string();
        prop_assert_eq!(MapHeader::decode(&b).unwrap(), want);
        // A short read and any flipped bit (all 4092 bytes before the CRC are under it) fail.
        prop_assert!(MapHeader::decode(&b[..PAGE - 1 - flips[0] % PAGE]).is_err());
        for bit in flips {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(MapHeader::decode(&c).is_err(), "bit {} accepted", bit);
        }
    }

    #[test]
    fn log_header_round_trip(n in any::<u64>(), bit in 0..PAGE * 8) {
        let b = encode_header(n);
        prop_assert_eq!(decode_header(&b).unwrap(), n);
        let mut c = b;
        c[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode_header(&c).is_err(), "bit {} accepted", bit);
    }

    #[test]
    fn map_and_log_files(data in prop::collection::vec(any::<u8>(), 0..3 * PAGE), nregions in 0u64..70000, fix in any::<bool>()) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let bytes = if fix { valid_map_page(&data) } else { data.clone() };
        std::fs::write(&p, &bytes).unwrap();
        let _ = MapFile::open(&p);

        let _ = decode_header(&data);
        let mut b = data.clone();
        if fix {
            let h = encode_header(nregions);
            b.resize(b.len().max(h.len()), 0);
            b[..h.len()].copy_from_slice(&h);
        }
        std::fs::write(&p, &b).unwrap();
        if let Ok((log, marked)) = DirtyLog::open(&p, nregions) {
            for r in marked {
                prop_assert!(r < nregions && log.is_marked(r));
            }
        }
    }

    #[test]
    fn block_index_garbage(data in prop::collection::vec(any::<u8>(), 0..400), fields in prop::collection::vec(any::<u64>(), 4), fix in any::<bool>()) {
        let _ = BlockIndex::decode(&data);
        let mut b = data.clone();
        b.resize(b.len().max(INDEX_HEADER_LEN), 0);
        b[..8].copy_from_slice(INDEX_MAGIC);
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        if fix {
            // Plausible geometry and valid table and entry checksums, so the length check, the
            // pack table and the entries are reached.
            let size = fields[0] % (1 << 16);
            let npacks = (fields[1] % 4) as usize;
            let nblocks = size.div_ceil(4096) as usize;
            b[12..16].copy_from_slice(&4096u32.to_le_bytes());
            b[16..24].copy_from_slice(&size.to_le_bytes());
            b[24..32].copy_from_slice(&(nblocks as u64).to_le_bytes());
            b[32..36].copy_from_slice(&(npacks as u32).to_le_bytes());
            b[36..40].copy_from_slice(&(ENTRY_LEN as u32).to_le_bytes());
            b[48..56].copy_from_slice(&(fields[2] % (nblocks as u64 + 1)).to_le_bytes());
            let packs_end = INDEX_HEADER_LEN + npacks * 16;
            // Usually the exact length; now and then one byte short or long.
            let len = (packs_end + nblocks * ENTRY_LEN).wrapping_add([0, 0, 1, usize::MAX][(fields[3] % 4) as usize]);
            b.resize(len.max(packs_end), 0);
            let pc = crc(&b[INDEX_HEADER_LEN..packs_end]);
            b[40..44].copy_from_slice(&pc.to_le_bytes());
            let ec = crc(&b[packs_end..]);
            b[44..48].copy_from_slice(&ec.to_le_bytes());
        }
        let c = crc(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
        // Rarely decodes; `block_index_round_trip` is the test of what does.
        if let Ok(ix) = BlockIndex::decode(&b) {
            prop_assert_eq!(BlockIndex::decode(&ix.encode()).unwrap(), ix);
        }
    }

    #[test]
    fn block_index_round_trip(ix in valid_index(), cut in any::<usize>(), bit in any::<usize>()) {
        let b = ix.encode();
        prop_assert_eq!(&BlockIndex::decode(&b).unwrap(), &ix);
        // Every byte is under a checksum (header, pack table or entries) and the length is
        // exact: a truncated or extended file and any flipped bit are refused.
        prop_assert!(BlockIndex::decode(&b[..cut % b.len()]).is_err());
        let mut long = b.clone();
        long.push(0);
        prop_assert!(BlockIndex::decode(&long).is_err());
        let bit = bit % (b.len() * 8);
        let mut c = b.clone();
        c[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(BlockIndex::decode(&c).is_err(), "bit {} accepted", bit);
    }

    #[test]
    fn pack_header(data in prop::collection::vec(any::<u8>(), 0..200)) {
        let id = PackId([7; 16]);
        let _ = check_header(&data, id, 65536);
        let mut b = data.clone();
        b.resize(b.len().max(PACK_HEADER_LEN), 0);
        b[..8].copy_from_slice(PACK_MAGIC);
        let c = crc(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
        let _ = check_header(&b, id, 65536);
    }

    #[test]
    fn track_digest(data in prop::collection::vec(any::<u8>(), 0..3 * 4096), big in any::<bool>()) {
        // Large inputs reach the pages behind a valid header; small ones the header checks.
        let data = if big { data } else { data[..data.len().min(64)].to_vec() };
        digest_parser::digest_file(&data);
    }

    #[test]
    fn repo_pack(data in prop::collection::vec(any::<u8>(), 0..400), bit in any::<usize>()) {
        v2_parsers::pack(&data, bit);
    }

    #[test]
    fn repo_index(data in prop::collection::vec(any::<u8>(), 0..600)) {
        v2_parsers::index(&data);
    }

    #[test]
    fn repo_map_node(data in prop::collection::vec(any::<u8>(), 0..400)) {
        v2_parsers::map_node(&data);
    }

    #[test]
    fn sealed_object(
        data in prop::collection::vec(any::<u8>(), 0..40_000),
        bit in any::<usize>(),
        cut in any::<usize>(),
    ) {
        v2_parsers::sealed_object(&data, bit, cut);
    }

    #[test]
    fn replication_stream(
        data in prop::collection::vec(any::<u8>(), 0..600),
        bit in any::<usize>(),
        cut in any::<usize>(),
    ) {
        v2_parsers::stream(&data, bit, cut);
    }
}
