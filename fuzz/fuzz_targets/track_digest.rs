//! `track::digest` (STORE/track/NAME.dig): `decode_header` and `DigestFile::open`/`region` on
//! arbitrary file contents, raw and behind a valid header with matching page checksums; a file
//! written from the input reads back, and a flipped page reads as unknown. The properties live
//! in tests/common/digest_parser.rs, shared with tests/parsers_never_panic.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/digest_parser.rs"]
mod digest_parser;

fuzz_target!(|data: &[u8]| {
    digest_parser::digest_file(data);
});
