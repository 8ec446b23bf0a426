//! `backup::index::BlockIndex::decode` (and its header), raw and with magic and header
//! checksum made right so the pack table and entry checks are reached.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmref::upgrade::v1index::{BlockIndex, INDEX_HEADER_LEN, INDEX_MAGIC};
use vmref::format::crc;

fuzz_target!(|data: &[u8]| {
    let _ = BlockIndex::decode(data);
    let mut b = data.to_vec();
    b.resize(INDEX_HEADER_LEN.max(b.len()), 0);
    b[..8].copy_from_slice(INDEX_MAGIC);
    b[8..10].copy_from_slice(&1u16.to_le_bytes());
    let c = crc(&b[..60]);
    b[60..64].copy_from_slice(&c.to_le_bytes());
    if let Ok(ix) = BlockIndex::decode(&b) {
        // What decodes must encode back to bytes that decode the same.
        let again = BlockIndex::decode(&ix.encode()).expect("a decoded index re-encodes");
        assert_eq!(again.nblocks(), ix.nblocks());
    }
});
