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

/// Read a whole replication stream from `bytes`; the records read, or the error.
fn read_stream(bytes: &[u8]) -> Result<usize, String> {
    use vmref::replicate::stream::{Record, StreamReader};
    let (mut r, _) = StreamReader::new(bytes).map_err(|e| e.to_string())?;
    let mut n = 0;
    loop {
        match r.next_record().map_err(|e| e.to_string())? {
            Record::End { .. } => return Ok(n),
            _ => n += 1,
        }
    }
}

/// A replication stream's bytes: reading never panics, also behind a valid header (to reach
/// the record checks); a valid stream built from the bytes reads back whole, and a bit flipped
/// at `bit` or a cut at `cut` is refused. Resume tokens made of the bytes never panic either.
pub fn stream(data: &[u8], bit: usize, cut: usize) {
    use vmref::replicate::stream::{
        Codec as SCodec, StreamDisk, StreamHeader, StreamPoint, StreamWriter,
    };
    let _ = read_stream(data);
    let _ = vmref::replicate::token::ResumeToken::decode(&String::from_utf8_lossy(data));
    let header = StreamHeader {
        block_size: 4096,
        source_store: "s".into(),
        point: StreamPoint {
            name: "p".into(),
            id: "i".into(),
            created_unix: 1,
            owner: None,
        },
        base: None,
        disks: vec![StreamDisk {
            name: "disk0".into(),
            size: 1 << 20,
            seq: 1,
            incremental: false,
        }],
        resume: None,
    };
    let mut valid = Vec::new();
    let w = StreamWriter::new(&mut valid, &header).unwrap();
    drop(w);
    // Garbage behind a valid header.
    let mut framed = valid.clone();
    framed.extend_from_slice(data);
    let _ = read_stream(&framed);
    // A valid stream whose blocks are runs of the input.
    let mut valid = Vec::new();
    let mut w = StreamWriter::new(&mut valid, &header).unwrap();
    w.disk(0).unwrap();
    for (i, chunk) in data.chunks(97).enumerate() {
        let mut block = vec![0u8; 4096];
        block[..chunk.len()].copy_from_slice(chunk);
        w.block(i as u64, SCodec::Raw, 4096, &Hash::of(&block), &block)
            .unwrap();
    }
    w.zero(1000, 3).unwrap();
    w.disk_end(0, 0, None).unwrap();
    w.end().unwrap();
    assert!(read_stream(&valid).is_ok(), "a valid stream reads back");
    let mut flipped = valid.clone();
    let b = bit % (flipped.len() * 8);
    flipped[b / 8] ^= 1 << (b % 8);
    assert!(
        read_stream(&flipped).is_err(),
        "bit {b} flipped went unnoticed"
    );
    let c = cut % valid.len();
    assert!(
        read_stream(&valid[..c]).is_err(),
        "cut at {c} went unnoticed"
    );
}

/// A sealed object (`repo::seal`): garbage never panics and never opens; a length that
/// `plain_len` accepts agrees with what `open` returns; a valid sealing of the input (whole,
/// and through the sealed backend's ranged reads) round-trips, and a bit flipped at `bit` or a
/// cut at `cut` is refused.
pub fn sealed_object(data: &[u8], bit: usize, cut: usize) {
    use std::sync::Arc;
    use vmref::repo::seal::{Keys, SealedBackend, open, plain_len, seal};
    let keys = Keys::derive(&[7; 32]);
    let name = "packs/00/0123456789abcdef0123456789abcdef";
    // Forged bytes cannot open (that would need the key); they must not panic either.
    assert!(open(&keys, name, data).is_err(), "garbage opened");
    let _ = plain_len(data.len() as u64);
    let s = seal(&keys, name, data).expect("seal");
    assert_eq!(plain_len(s.len() as u64).unwrap(), data.len() as u64);
    assert_eq!(open(&keys, name, &s).unwrap(), data);
    let mut f = s.clone();
    let i = bit % (f.len() * 8);
    f[i / 8] ^= 1 << (i % 8);
    assert!(open(&keys, name, &f).is_err(), "bit {i} flipped");
    assert!(
        open(&keys, name, &s[..cut % s.len()]).is_err(),
        "cut at {cut}"
    );
    assert!(
        open(&Keys::derive(&[8; 32]), name, &s).is_err(),
        "other key"
    );
    let inner = Arc::new(MemBackend::new());
    inner.put_if_absent(name, &s).unwrap();
    let b = SealedBackend::new(inner, Arc::new(keys));
    let (off, len) = if data.is_empty() {
        (0, 0)
    } else {
        let off = cut % data.len();
        (off, (bit % (data.len() - off + 1)).min(data.len() - off))
    };
    assert_eq!(
        b.get_range(name, off as u64, len).unwrap(),
        &data[off..off + len]
    );
    assert!(b.get_range(name, data.len() as u64, 1).is_err());
}
