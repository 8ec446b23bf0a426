//! Properties of the store format 2 parsers, run on arbitrary bytes: by the proptest cases in
//! tests/parsers_never_panic.rs and by the cargo-fuzz targets in fuzz/ (which include this
//! file by path). Each function panics when a property fails:
//! - garbage never panics (and never allocates without bound): it is refused or decoded;
//! - a map node that decodes re-encodes to the same bytes (its encoding is canonical);
//! - a valid encoding built from the input round-trips, and any bit flipped in it (where the
//!   format checks every bit) is refused.
#![allow(dead_code)]

use vmref::repo::backend::{Backend, MemBackend};
use vmref::repo::compress::Codec;
use vmref::repo::index::{IndexEntry, IndexFile, encode};
use vmref::repo::map::node;
use vmref::repo::pack::{
    PACK_FOOTER_LEN, PackEntry, PackId, PackWriter, decode_footer, decode_pack, decode_table,
    table_range,
};
use vmref::repo::{BlobKind, Hash};

/// Blob `i` of a valid pack made from `data`: its bytes are a run of `data`.
fn blobs(data: &[u8]) -> Vec<(BlobKind, Vec<u8>)> {
    data.chunks(7)
        .enumerate()
        .map(|(i, c)| {
            let kind = if i % 3 == 1 {
                BlobKind::Map
            } else {
                BlobKind::Data
            };
            (kind, c.to_vec())
        })
        .collect()
}

/// A pack's bytes: `decode_pack` and the ranged reader's `decode_table` never panic and agree;
/// a valid pack built from the bytes round-trips, and a bit flipped at `bit` is refused.
pub fn pack(data: &[u8], bit: usize) {
    let whole = decode_pack(data);
    if data.len() >= PACK_FOOTER_LEN {
        let footer = &data[data.len() - PACK_FOOTER_LEN..];
        if let Ok(count) = decode_footer(footer)
            && let Ok((off, len)) = table_range(data.len() as u64, count)
        {
            let table = decode_table(&data[off as usize..][..len], footer, off);
            if let Ok(w) = &whole {
                assert_eq!(table.as_ref().ok(), Some(w));
            }
        }
    }
    let mut w = PackWriter::new();
    let mut want = Vec::new();
    for (kind, b) in blobs(data) {
        want.push(w.add(Hash::of(&b), kind, Codec::Raw, &b, b.len() as u32));
    }
    let (bytes, entries) = w.finish();
    assert_eq!(entries, want);
    assert_eq!(decode_pack(&bytes).unwrap(), want);
    let bit = bit % (bytes.len() * 8);
    let mut c = bytes.clone();
    c[bit / 8] ^= 1 << (bit % 8);
    assert!(
        decode_pack(&c).is_err(),
        "pack bit {bit} flipped was accepted"
    );
    assert!(decode_pack(&bytes[..bytes.len() - 1]).is_err());
}

/// Open `bytes` as an index object and read all of it; returns its entries when it is valid.
fn read_index(bytes: &[u8]) -> Option<Vec<IndexEntry>> {
    let m = MemBackend::new();
    m.put_if_absent("index/1-00", bytes).unwrap();
    let f = IndexFile::open(&m, "index/1-00").ok()?;
    let verified = f.verify(&m);
    let all = f.read_entries(&m, 0, f.count().min(1 << 16));
    if verified.is_ok() && f.count() <= 1 << 16 {
        return all.ok();
    }
    None
}

/// An index object's bytes: opening and reading them never panics (the decoder accepts some
/// encodings the writer would not make, e.g. an unused pack in the table, so there is no
/// re-encoding check); a valid index built from the bytes round-trips.
pub fn index(data: &[u8]) {
    if let Some(es) = read_index(data) {
        assert!(es.windows(2).all(|w| w[0].entry.hash < w[1].entry.hash));
    }
    let packs = [PackId([1; 16]), PackId([2; 16])];
    let entries: Vec<IndexEntry> = blobs(data)
        .into_iter()
        .enumerate()
        .map(|(i, (kind, b))| IndexEntry {
            pack: packs[i % 2],
            entry: PackEntry {
                hash: Hash::of(&b),
                kind,
                codec: if i % 2 == 0 { Codec::Raw } else { Codec::Zstd },
                offset: 16 + 7 * i as u64,
                stored_len: b.len() as u32,
                raw_len: b.len() as u32 + i as u32,
                crc: i as u32 * 0x9e37,
            },
        })
        .collect();
    let bytes = encode(&entries);
    let mut want = entries;
    want.sort_by_key(|e| e.entry.hash);
    want.dedup_by(|b, a| a.entry.hash == b.entry.hash);
    assert_eq!(read_index(&bytes), Some(want));
}

/// A map node's bytes: decoding never panics, a decoded node re-encodes to the same bytes,
/// and a node built from the bytes (hashes, holes where a run of them is zero) round-trips.
/// The garbage is also tried behind a valid magic and version, to reach the checks after them.
pub fn map_node(data: &[u8]) {
    let mut framed = node::MAGIC.to_vec();
    framed.push(node::VERSION);
    framed.extend_from_slice(data);
    for b in [data, &framed[..]] {
        if let Ok(n) = node::decode(b) {
            assert!(n.entries.len() <= node::FANOUT);
            assert_eq!(node::encode(n.level, &n.entries).as_deref(), Some(b));
        }
    }
    let level = data.first().map_or(0, |b| b % (node::MAX_LEVEL + 1));
    let entries: Vec<Hash> = data
        .chunks(3)
        .take(node::FANOUT)
        .map(|c| {
            if c[0] % 2 == 0 {
                Hash::ZERO
            } else {
                Hash::of(c)
            }
        })
        .collect();
    match node::encode(level, &entries) {
        None => assert!(entries.iter().all(Hash::is_zero)),
        Some(b) => {
            let n = node::decode(&b).unwrap();
            assert_eq!(n.level, level);
            for (i, h) in entries.iter().enumerate() {
                assert_eq!(n.get(i), *h);
            }
            assert!(n.entries.last().is_some_and(|h| !h.is_zero()));
        }
    }
}
