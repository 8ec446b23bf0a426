//! `track::log::decode_header` and `DirtyLog::open` on arbitrary file contents. The first two
//! bytes pick the region count the caller expects; the header is made valid for it when the
//! third byte is odd, so the fuzzer reaches the bitmap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmref::track::log::{DirtyLog, decode_header, encode_header};

fuzz_target!(|data: &[u8]| {
    let _ = decode_header(data);
    if data.len() < 3 {
        return;
    }
    let nregions = u16::from_le_bytes([data[0], data[1]]) as u64;
    let mut b = data[3..].to_vec();
    if data[2] & 1 == 1 {
        let h = encode_header(nregions);
        if b.len() < h.len() {
            b.resize(h.len(), 0);
        }
        b[..h.len()].copy_from_slice(&h);
    }
    let _ = decode_header(&b);
    let dir = std::env::temp_dir().join(format!("vmref-fuzz-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("f.log");
    std::fs::write(&p, &b).unwrap();
    if let Ok((log, marked)) = DirtyLog::open(&p, nregions) {
        for r in marked {
            assert!(r < nregions && log.is_marked(r));
        }
    }
});
