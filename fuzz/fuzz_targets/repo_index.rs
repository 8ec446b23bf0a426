//! `repo::index::IndexFile::open`, `verify` and `read_entries` on arbitrary object bytes; valid indexes round-trip.
//! The properties live in tests/common/v2_parsers.rs, shared with tests/parsers_never_panic.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/v2_parsers.rs"]
mod v2_parsers;

fuzz_target!(|data: &[u8]| {
    v2_parsers::index(data);
});
