//! `track::mapfile::MapHeader::decode`, raw and with magic and checksum made right.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmref::format::crc;
use vmref::track::mapfile::{MAGIC, MapHeader, PAGE};

fuzz_target!(|data: &[u8]| {
    let _ = MapHeader::decode(data);
    let mut b = data.to_vec();
    b.resize(PAGE.max(b.len()), 0);
    b[..8].copy_from_slice(MAGIC);
    let c = crc(&b[..PAGE - 4]);
    b[PAGE - 4..PAGE].copy_from_slice(&c.to_le_bytes());
    if let Ok(h) = MapHeader::decode(&b) {
        // What decodes must encode back to a header that decodes the same.
        let again = MapHeader::decode(&h.encode()).expect("a decoded header re-encodes");
        assert_eq!(again, h);
    }
});
