//! `backup::pack::check_header`, raw and with magic and checksum made right.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmref::upgrade::v1pack::{PACK_HEADER_LEN, PACK_MAGIC, PackId, check_header};
use vmref::format::crc;

fuzz_target!(|data: &[u8]| {
    let id = PackId([7; 16]);
    let _ = check_header(data, id, 65536);
    let mut b = data.to_vec();
    b.resize(PACK_HEADER_LEN.max(b.len()), 0);
    b[..8].copy_from_slice(PACK_MAGIC);
    let c = crc(&b[..60]);
    b[60..64].copy_from_slice(&c.to_le_bytes());
    let _ = check_header(&b, id, 65536);
});
