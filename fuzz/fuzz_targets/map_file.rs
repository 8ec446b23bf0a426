//! `track::mapfile::MapFile::open` on arbitrary file contents. The input's first page is
//! given a valid magic and checksum when its first byte is odd, so the fuzzer gets past the
//! header and into the geometry, length and page checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmref::format::crc;
use vmref::track::mapfile::{MAGIC, MapFile, PAGE};

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    if b.first().is_some_and(|x| x & 1 == 1) {
        b.resize(PAGE.max(b.len()), 0);
        b[..8].copy_from_slice(MAGIC);
        let c = crc(&b[..PAGE - 4]);
        b[PAGE - 4..PAGE].copy_from_slice(&c.to_le_bytes());
    }
    let dir = std::env::temp_dir().join(format!("vmref-fuzz-map-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("f.map");
    std::fs::write(&p, &b).unwrap();
    if let Ok(l) = MapFile::open(&p) {
        assert!(l.map.nblocks() == l.header.nblocks);
        for r in l.damaged {
            assert!(r < l.map.nregions());
        }
    }
});
