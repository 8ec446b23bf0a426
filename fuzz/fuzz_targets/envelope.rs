//! `format::decode`: the envelope of vmref.store, NAME.disk and NAME.ref files, and of the
//! repository's published points, store marks and lock objects.
//! Raw bytes first; then the same bytes with a valid envelope around them, so the fuzzer
//! reaches the length checks and the JSON payload parsers past the checksums.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmref::format::{self, DISK_RECORD, ENVELOPE_LEN, Kind, REF_RECORD, STORE_META, crc};
use vmref::repo::lock::{LOCK, LockInfo};
use vmref::repo::snapshot::{SNAPSHOT, STORE_MARK, Snapshot, StoreMark};
use vmref::store::StoreMeta;
use vmref::store::records::{DiskRecord, RefRecord};

fn all_kinds(b: &[u8]) {
    let _ = format::decode::<StoreMeta>(STORE_META, b);
    let _ = format::decode::<DiskRecord>(DISK_RECORD, b);
    let _ = format::decode::<RefRecord>(REF_RECORD, b);
    if let Ok(s) = format::decode::<Snapshot>(SNAPSHOT, b) {
        let _ = s.roots();
    }
    let _ = format::decode::<StoreMark>(STORE_MARK, b);
    let _ = format::decode::<LockInfo>(LOCK, b);
}

/// Keep the fuzzer's version and length fields but make magic and checksums right.
fn fix_up(kind: Kind, data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    if b.len() < ENVELOPE_LEN {
        b.resize(ENVELOPE_LEN, 0);
    }
    b[..8].copy_from_slice(kind.magic);
    let len = (u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize)
        .min(b.len() - ENVELOPE_LEN);
    let pc = crc(&b[ENVELOPE_LEN..ENVELOPE_LEN + len]);
    b[16..20].copy_from_slice(&pc.to_le_bytes());
    let hc = crc(&b[..24]);
    b[24..28].copy_from_slice(&hc.to_le_bytes());
    b
}

fuzz_target!(|data: &[u8]| {
    all_kinds(data);
    for kind in [STORE_META, DISK_RECORD, REF_RECORD, SNAPSHOT, STORE_MARK, LOCK] {
        all_kinds(&fix_up(kind, data));
    }
});
