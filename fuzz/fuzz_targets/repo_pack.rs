//! `repo::pack::decode_pack` and `decode_table`: garbage never panics; valid packs round-trip and refuse a flipped bit.
//! The properties live in tests/common/v2_parsers.rs, shared with tests/parsers_never_panic.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/v2_parsers.rs"]
mod v2_parsers;

fuzz_target!(|data: &[u8]| {
    v2_parsers::pack(data, data.len().wrapping_mul(31));
});
