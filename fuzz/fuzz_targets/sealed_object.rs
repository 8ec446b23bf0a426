//! `repo::seal::open` and `plain_len` on arbitrary bytes (never panics, never opens without
//! the key), and sealings of the input round-trip whole and by ranged reads and refuse a
//! flipped bit or a cut. The properties live in tests/common/v2_parsers.rs, shared with
//! tests/parsers_never_panic.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/v2_parsers.rs"]
mod v2_parsers;

fuzz_target!(|data: &[u8]| {
    v2_parsers::sealed_object(data, data.len().wrapping_mul(31), data.len().wrapping_mul(17));
});
