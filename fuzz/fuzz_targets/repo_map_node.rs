//! `repo::map::node::decode`: garbage never panics; what decodes re-encodes identically.
//! The properties live in tests/common/v2_parsers.rs, shared with tests/parsers_never_panic.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/v2_parsers.rs"]
mod v2_parsers;

fuzz_target!(|data: &[u8]| {
    v2_parsers::map_node(data);
});
