//! The fuzz targets' properties (fuzz/), run by `cargo test` on random inputs: every parser
//! of store bytes returns an error on garbage, never panics. Inputs are also re-framed with a
//! valid magic and checksum so the checks behind the checksums are reached.

use proptest::prelude::*;
use vmref::backup::index::{BlockIndex, INDEX_HEADER_LEN, INDEX_MAGIC};
use vmref::backup::pack::{PACK_HEADER_LEN, PACK_MAGIC, PackId, check_header};
use vmref::format::{self, DISK_RECORD, ENVELOPE_LEN, REF_RECORD, STORE_META, crc};
use vmref::store::StoreMeta;
use vmref::store::records::{DiskRecord, RefRecord};
use vmref::track::log::{DirtyLog, decode_header, encode_header};
use vmref::track::mapfile::{MAGIC, MapFile, MapHeader, PAGE};

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
    fn map_header(
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
        if let Ok(h) = MapHeader::decode(&valid_map_page(&b)) {
            prop_assert_eq!(MapHeader::decode(&h.encode()).unwrap(), h);
        }
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
    fn block_index(data in prop::collection::vec(any::<u8>(), 0..400), fields in prop::collection::vec(any::<u64>(), 4), fix in any::<bool>()) {
        let _ = BlockIndex::decode(&data);
        let mut b = data.clone();
        b.resize(b.len().max(INDEX_HEADER_LEN), 0);
        b[..8].copy_from_slice(INDEX_MAGIC);
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        if fix {
            // Plausible geometry, so the pack table and entries are reached.
            b[12..16].copy_from_slice(&4096u32.to_le_bytes());
            b[16..24].copy_from_slice(&(fields[0] % (1 << 20)).to_le_bytes());
            b[24..32].copy_from_slice(&(fields[0] % (1 << 20)).div_ceil(4096).to_le_bytes());
            b[32..40].copy_from_slice(&(fields[1] % 8).to_le_bytes());
        }
        let c = crc(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
        if let Ok(ix) = BlockIndex::decode(&b) {
            prop_assert_eq!(BlockIndex::decode(&ix.encode()).unwrap().nblocks(), ix.nblocks());
        }
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
}
