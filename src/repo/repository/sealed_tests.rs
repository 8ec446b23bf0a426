//! The repository encrypted under a key: what reaches the backend reveals nothing of the
//! blobs, a wrong or missing key is refused at open with nothing changed, and everything else
//! (dedup, collection, rebuilding the index, damage detection) works as unencrypted.

use super::*;
use crate::repo::backend::MemBackend;
use crate::repo::gc::GcOptions;
use crate::repo::key::RepoKey;
use crate::repo::repair::rebuild_index;

const MARKER: &[u8] = b"VMREF-PLAINTEXT-MARKER-0123456789";

/// Distinct blobs that each hold the marker, uncompressed so that it is there to find.
fn marked(i: u32) -> Vec<u8> {
    let mut v = crate::repo::test_bytes(i as u64, 8192);
    v[100..100 + MARKER.len()].copy_from_slice(MARKER);
    v
}

fn repo(b: &Arc<MemBackend>, key: Option<&RepoKey>) -> Repository {
    Repository::init_with_key(
        b.clone(),
        RepoOptions {
            compression: Compression::None,
            pack_target: 64 << 10,
        },
        key,
    )
    .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every object the backend holds, by name.
fn objects(b: &MemBackend) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for prefix in ["config", "packs/", "index/"] {
        for n in b.list(prefix).unwrap() {
            let bytes = b.get(&n).unwrap();
            out.push((n, bytes));
        }
    }
    out
}

#[test]
fn an_encrypted_repository_reveals_no_blob_and_no_id() {
    for encrypted in [false, true] {
        let b = Arc::new(MemBackend::new());
        let key = RepoKey::generate().unwrap();
        let r = repo(&b, encrypted.then_some(&key));
        let ids: Vec<Hash> = (0..40)
            .map(|i| r.put(BlobKind::Data, &marked(i)).unwrap())
            .collect();
        r.flush().unwrap();
        let objs = objects(&b);
        assert!(objs.len() > 3, "several packs and an index");
        let found = objs.iter().any(|(_, o)| contains(o, MARKER));
        let named = objs.iter().any(|(_, o)| contains(o, &ids[7].0));
        let plain_named = objs
            .iter()
            .any(|(_, o)| contains(o, &Hash::of(&marked(7)).0));
        // The control finds the marker and the ids; the encrypted one neither them nor the
        // plain hashes.
        assert_eq!(found, !encrypted, "marker, encrypted {encrypted}");
        assert_eq!(named, !encrypted, "ids, encrypted {encrypted}");
        assert_eq!(
            plain_named, !encrypted,
            "plain hashes, encrypted {encrypted}"
        );
        assert_eq!(r.config().key_id.is_some(), encrypted);
        // The config's version says whether older releases may read it.
        assert_eq!(
            b.get(CONFIG_NAME).unwrap()[8],
            if encrypted { 3 } else { 2 }
        );
        let again = Repository::open_with_key(b.clone(), Some(&key)).unwrap();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(again.get(BlobKind::Data, id).unwrap(), marked(i as u32));
        }
    }
}

#[test]
fn ids_are_keyed_dedup_works_within_a_key_only() {
    let (ka, kb) = (RepoKey::generate().unwrap(), RepoKey::generate().unwrap());
    let (b1, b2, b3) = (
        Arc::new(MemBackend::new()),
        Arc::new(MemBackend::new()),
        Arc::new(MemBackend::new()),
    );
    let (r1, r2, r3) = (
        repo(&b1, Some(&ka)),
        repo(&b2, Some(&ka)),
        repo(&b3, Some(&kb)),
    );
    let d = marked(1);
    let (i1, i2, i3) = (
        r1.put(BlobKind::Data, &d).unwrap(),
        r2.put(BlobKind::Data, &d).unwrap(),
        r3.put(BlobKind::Data, &d).unwrap(),
    );
    assert_eq!(i1, i2, "one key, one id");
    assert_ne!(i1, i3, "two keys, unrelated ids");
    assert_ne!(i1, Hash::of(&d));
    assert_eq!(r1.put(BlobKind::Data, &d).unwrap(), i1);
    r1.flush().unwrap();
    assert_eq!(r1.stats().unwrap().blobs, 1, "stored once");
}

#[test]
fn a_missing_or_wrong_key_is_one_clear_error_and_changes_nothing() {
    let b = Arc::new(MemBackend::new());
    let key = RepoKey::generate().unwrap();
    let r = repo(&b, Some(&key));
    r.put(BlobKind::Data, &marked(3)).unwrap();
    r.flush().unwrap();
    let before = objects(&b);
    let e = Repository::open(b.clone()).err().unwrap();
    assert!(matches!(e, Error::Encrypted { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("key file") && msg.contains(key.key_id()),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    let other = RepoKey::generate().unwrap();
    let e = Repository::open_with_key(b.clone(), Some(&other))
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Encrypted { .. })
            && msg.contains(other.key_id())
            && msg.contains(key.key_id()),
        "{msg}"
    );
    assert_eq!(objects(&b), before);
    // A key given to an unencrypted repository is not used: its format does not change.
    let p = Arc::new(MemBackend::new());
    let rp = repo(&p, None);
    let h = rp.put(BlobKind::Data, &marked(4)).unwrap();
    rp.flush().unwrap();
    let rk = Repository::open_with_key(p.clone(), Some(&key)).unwrap();
    assert_eq!(h, Hash::of(&marked(4)));
    assert_eq!(rk.get(BlobKind::Data, &h).unwrap(), marked(4));
    assert!(rk.config().key_id.is_none());
}

#[test]
fn collection_and_index_rebuild_work_sealed() {
    let b = Arc::new(MemBackend::new());
    let key = RepoKey::generate().unwrap();
    let r = repo(&b, Some(&key));
    let ids: Vec<Hash> = (0..60)
        .map(|i| r.put(BlobKind::Data, &marked(i)).unwrap())
        .collect();
    r.flush().unwrap();
    let mut m = r.gc_marker().unwrap();
    for id in ids.iter().step_by(3) {
        assert!(m.mark(id).unwrap());
    }
    let rep = r.collect(m, &GcOptions::default()).unwrap();
    assert!(rep.freed_bytes > 0, "{rep:?}");
    let r = Repository::open_with_key(b.clone(), Some(&key)).unwrap();
    for (i, id) in ids.iter().enumerate().step_by(3) {
        assert_eq!(r.get(BlobKind::Data, id).unwrap(), marked(i as u32));
    }
    // Drop the index and make it again from the sealed packs.
    for n in b.list("index/").unwrap() {
        b.delete(&n).unwrap();
    }
    rebuild_index(r.backend()).unwrap();
    let r = Repository::open_with_key(b.clone(), Some(&key)).unwrap();
    for (i, id) in ids.iter().enumerate().step_by(3) {
        assert_eq!(r.get(BlobKind::Data, id).unwrap(), marked(i as u32));
    }
    assert!(objects(&b).iter().all(|(_, o)| !contains(o, MARKER)));
}

#[test]
fn damage_anywhere_in_a_sealed_object_is_an_error_never_other_bytes() {
    let b = Arc::new(MemBackend::new());
    let key = RepoKey::generate().unwrap();
    let r = repo(&b, Some(&key));
    let ids: Vec<Hash> = (0..8)
        .map(|i| r.put(BlobKind::Data, &marked(i)).unwrap())
        .collect();
    r.flush().unwrap();
    let packs = b.list("packs/").unwrap();
    let size = b.size(&packs[0]).unwrap() as usize;
    for off in (0..size).step_by(997).chain([size - 1]) {
        b.flip(&packs[0], off, 0x10);
        let r = Repository::open_with_key(b.clone(), Some(&key)).unwrap();
        let mut failed = 0;
        for (i, id) in ids.iter().enumerate() {
            match r.get(BlobKind::Data, id) {
                Ok(d) => assert_eq!(d, marked(i as u32), "offset {off}"),
                Err(_) => failed += 1,
            }
        }
        assert!(failed > 0, "a flip at {off} went unnoticed");
        b.flip(&packs[0], off, 0x10);
    }
}
