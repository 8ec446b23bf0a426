use super::*;
use crate::format::FormatError;
use crate::repo::backend::{LocalBackend, MemBackend};
use crate::repo::gc::{GcOptions, GcStep};

fn blob(i: u32, len: usize) -> Vec<u8> {
    // Compressible but distinct: a counter among repeated text.
    let mut v = format!("blob {i} ").repeat(len / 6 + 1).into_bytes();
    v.truncate(len);
    v
}

use crate::repo::test_bytes as random;

fn mem_repo(pack_target: usize) -> (Arc<MemBackend>, Repository) {
    let b = Arc::new(MemBackend::new());
    let r = Repository::init(
        b.clone(),
        RepoOptions {
            compression: Compression::Zstd { level: 3 },
            pack_target,
        },
    )
    .unwrap();
    (b, r)
}

#[test]
fn init_open_and_config_checks() {
    let (b, r) = mem_repo(1 << 20);
    let id = r.config().id.clone();
    assert!(matches!(
        Repository::init(b.clone(), RepoOptions::default()),
        Err(Error::StoreExists(_))
    ));
    let again = Repository::open(b.clone()).unwrap();
    assert_eq!(again.config().id, id);
    assert_eq!(again.config().compression, Compression::Zstd { level: 3 });
    assert!(matches!(
        Repository::open(Arc::new(MemBackend::new())),
        Err(Error::NotAStore(..))
    ));
    // A newer major version of the config is refused with a clear error.
    let mut c = b.get(CONFIG_NAME).unwrap();
    c[8] = 4;
    let h = crate::format::crc(&c[..24]);
    c[24..28].copy_from_slice(&h.to_le_bytes());
    b.overwrite(CONFIG_NAME, c);
    let e = Repository::open(b.clone()).err().unwrap();
    assert!(
        matches!(
            e,
            Error::Format {
                source: FormatError::TooNew { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("newer"), "{e}");
    b.flip(CONFIG_NAME, 40, 1);
    assert!(Repository::open(b).is_err());
}

#[test]
fn put_get_dedup_and_stats() {
    let (b, r) = mem_repo(1 << 20);
    let a = blob(1, 65536);
    let rnd = random(7, 65536);
    let ha = r.put(BlobKind::Data, &a).unwrap();
    assert_eq!(r.put(BlobKind::Data, &a).unwrap(), ha);
    let hr = r.put(BlobKind::Data, &rnd).unwrap();
    let hm = r.put(BlobKind::Map, b"a map node").unwrap();
    // Readable before the flush, from the open pack.
    assert_eq!(r.get(BlobKind::Data, &ha).unwrap(), a);
    assert!(r.flush().unwrap());
    assert!(!r.flush().unwrap());
    assert_eq!(r.put(BlobKind::Data, &a).unwrap(), ha);
    assert!(!r.flush().unwrap(), "a stored blob is not stored again");
    for r in [&r, &Repository::open(b.clone()).unwrap()] {
        assert_eq!(r.get(BlobKind::Data, &ha).unwrap(), a);
        assert_eq!(r.get(BlobKind::Data, &hr).unwrap(), rnd);
        assert_eq!(r.get(BlobKind::Map, &hm).unwrap(), b"a map node");
        assert!(r.get(BlobKind::Map, &ha).is_err(), "kind is checked");
        let e = r.get(BlobKind::Data, &Hash::of(b"nope")).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{e}");
        let st = r.stats().unwrap();
        assert_eq!(st.blobs, 3);
        assert_eq!(st.raw_bytes, 2 * 65536 + 10);
        assert!(st.stored_bytes < 65536 + 65536 / 4, "{st:?}");
        assert_eq!((st.packs, st.index_objects), (1, 1));
    }
}

#[test]
fn no_compression_setting_stores_raw() {
    let b = Arc::new(MemBackend::new());
    let r = Repository::init(
        b.clone(),
        RepoOptions {
            compression: Compression::None,
            pack_target: 1 << 20,
        },
    )
    .unwrap();
    let a = blob(1, 8192);
    let h = r.put(BlobKind::Data, &a).unwrap();
    r.flush().unwrap();
    assert_eq!(r.stats().unwrap().stored_bytes, 8192);
    assert_eq!(r.get(BlobKind::Data, &h).unwrap(), a);
}

#[test]
fn full_packs_and_batches_roll_over() {
    let b = Arc::new(MemBackend::new());
    let mut r = Repository::init(
        b.clone(),
        RepoOptions {
            compression: Compression::None,
            pack_target: 10_000,
        },
    )
    .unwrap();
    r.set_index_batch(25);
    let hs: Vec<_> = (0..100)
        .map(|i| r.put(BlobKind::Data, &random(i, 3000)).unwrap())
        .collect();
    // Every blob reads whether its pack is open, written, or indexed.
    for (i, h) in hs.iter().enumerate() {
        assert_eq!(r.get(BlobKind::Data, h).unwrap(), random(i as u64, 3000));
    }
    r.flush().unwrap();
    let st = r.stats().unwrap();
    assert_eq!(st.blobs, 100);
    assert!(st.packs >= 25, "{st:?}");
    assert_eq!(st.index_objects, 4);
    let r2 = Repository::open(b).unwrap();
    for (i, h) in hs.iter().enumerate() {
        assert_eq!(r2.get(BlobKind::Data, h).unwrap(), random(i as u64, 3000));
    }
}

#[test]
fn unflushed_blobs_vanish_cleanly_on_a_crash() {
    let (b, r) = mem_repo(4096);
    let kept = r.put(BlobKind::Data, &blob(1, 1000)).unwrap();
    r.flush().unwrap();
    let lost: Vec<_> = (2..40)
        .map(|i| r.put(BlobKind::Data, &random(i, 1000)).unwrap())
        .collect();
    drop(r); // a crash: some packs are written, no index names them
    let r = Repository::open(b).unwrap();
    assert_eq!(r.get(BlobKind::Data, &kept).unwrap(), blob(1, 1000));
    for h in &lost {
        assert!(!r.contains(h).unwrap());
        assert!(r.get(BlobKind::Data, h).is_err());
    }
    // Put again, they are stored again and read back.
    for i in 2..40 {
        r.put(BlobKind::Data, &random(i, 1000)).unwrap();
    }
    r.flush().unwrap();
    for (i, h) in lost.iter().enumerate() {
        assert_eq!(
            r.get(BlobKind::Data, h).unwrap(),
            random(i as u64 + 2, 1000)
        );
    }
}

#[test]
fn damage_is_an_error_never_other_bytes() {
    let (b, r) = mem_repo(1 << 20);
    let hs: Vec<_> = (0..4)
        .map(|i| r.put(BlobKind::Data, &blob(i, 5000)).unwrap())
        .collect();
    r.flush().unwrap();
    let pack = b.list("packs/").unwrap().pop().unwrap();
    let e = r.lookup(&hs[1]).unwrap().unwrap();
    // Flip each byte of blob 1's stored bytes in turn: always an error, others still read.
    for k in 0..e.entry.stored_len as usize {
        b.flip(&pack, e.entry.offset as usize + k, 0x10);
        let err = r.get(BlobKind::Data, &hs[1]).unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{err}");
        b.flip(&pack, e.entry.offset as usize + k, 0x10);
    }
    assert_eq!(r.get(BlobKind::Data, &hs[0]).unwrap(), blob(0, 5000));
    // A truncated or missing pack.
    let whole = b.get(&pack).unwrap();
    b.overwrite(&pack, whole[..e.entry.offset as usize + 3].to_vec());
    assert!(r.get(BlobKind::Data, &hs[1]).is_err());
    b.delete(&pack).unwrap();
    for h in &hs {
        assert!(r.get(BlobKind::Data, h).is_err());
    }
    // A damaged index object: open refuses it.
    let ix = b.list("index/").unwrap().pop().unwrap();
    let n = b.size(&ix).unwrap() as usize;
    b.flip(&ix, n - 2, 1);
    assert!(Repository::open(b).is_err());
}

/// Batch reads decode into the caller's buffers across packs, out of order, with duplicates,
/// pending (unflushed) blobs, and on a local backend; any damaged or missing blob fails the
/// batch, and the blobs around it still read alone.
#[test]
fn batch_reads_match_gets_and_fail_on_damage() {
    let d = tempfile::tempdir().unwrap();
    let be: Arc<dyn Backend> = Arc::new(LocalBackend::new(&d.path().join("data")).unwrap());
    let mem = mem_repo(200 << 10);
    let local = Repository::init(
        be,
        RepoOptions {
            compression: Compression::Zstd { level: 1 },
            pack_target: 200 << 10,
        },
    )
    .unwrap();
    for r in [&mem.1, &local] {
        // Compressible and incompressible blobs over several packs.
        let want: Vec<Vec<u8>> = (0..40u32)
            .map(|i| {
                if i % 3 == 0 {
                    random(i as u64, 16384)
                } else {
                    blob(i, 16384)
                }
            })
            .collect();
        let hs: Vec<Hash> = want
            .iter()
            .map(|b| r.put(BlobKind::Data, b).unwrap())
            .collect();
        r.flush().unwrap();
        let pending = blob(999, 16384);
        let hp = r.put(BlobKind::Data, &pending).unwrap();
        // Reversed, every third blob twice, and the pending one.
        let mut order: Vec<usize> = (0..40).rev().collect();
        order.extend((0..40).step_by(3));
        let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; 16384]; order.len() + 1];
        let mut ask: Vec<(Hash, &mut [u8])> = order
            .iter()
            .map(|&i| hs[i])
            .chain([hp])
            .zip(bufs.iter_mut().map(Vec::as_mut_slice))
            .collect();
        r.read_data_into(&mut ask).unwrap();
        for (k, &i) in order.iter().enumerate() {
            assert_eq!(bufs[k], want[i], "blob {i}");
        }
        assert_eq!(bufs[order.len()], pending);
        // A buffer of the wrong length is refused.
        let mut short = [0u8; 100];
        assert!(r.read_data_into(&mut [(hs[0], &mut short[..])]).is_err());
        // A blob not stored anywhere.
        let mut b = vec![0u8; 16384];
        let absent = Hash::of(b"absent");
        assert!(
            r.read_data_into(&mut [(hs[1], &mut b[..]), (absent, &mut vec![0u8; 16384][..])])
                .is_err()
        );
        r.flush().unwrap();
    }
    // Damage on the in-memory backend: one flipped byte in blob 7 fails any batch holding it.
    let (b, r) = mem;
    let e = r.lookup(&Hash::of(&blob(7, 16384))).unwrap().unwrap();
    let pack = e.pack.object_name();
    b.flip(&pack, e.entry.offset as usize + 3, 0x40);
    let hs: Vec<Hash> = (5..10u32).map(|i| Hash::of(&blob(i, 16384))).collect();
    let mut bufs = vec![vec![0u8; 16384]; hs.len()];
    let mut ask: Vec<(Hash, &mut [u8])> = hs
        .iter()
        .copied()
        .zip(bufs.iter_mut().map(Vec::as_mut_slice))
        .collect();
    let err = r.read_data_into(&mut ask).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    for i in [5u32, 8] {
        let mut one = vec![0u8; 16384];
        r.read_data_into(&mut [(Hash::of(&blob(i, 16384)), &mut one[..])])
            .unwrap();
        assert_eq!(one, blob(i, 16384));
    }
}

#[test]
fn parallel_puts_and_gets() {
    let (_b, r) = mem_repo(64 << 10);
    let r = Arc::new(r);
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let r = r.clone();
            s.spawn(move || {
                for i in 0..200u32 {
                    // Half the blobs are shared between threads.
                    let n = if i.is_multiple_of(2) { i } else { t * 1000 + i };
                    let d = blob(n, 4096);
                    let h = r.put(BlobKind::Data, &d).unwrap();
                    assert_eq!(r.get(BlobKind::Data, &h).unwrap(), d);
                }
            });
        }
    });
    r.flush().unwrap();
    assert_eq!(r.stats().unwrap().blobs, 100 + 4 * 100);
    for i in (0..200).step_by(2) {
        assert_eq!(
            r.get(BlobKind::Data, &Hash::of(&blob(i, 4096))).unwrap(),
            blob(i, 4096)
        );
    }
}

#[test]
fn local_repository_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let be: Arc<dyn Backend> = Arc::new(LocalBackend::new(&d.path().join("data")).unwrap());
    let r = Repository::init(be.clone(), RepoOptions::default()).unwrap();
    let hs: Vec<_> = (0..50)
        .map(|i| r.put(BlobKind::Data, &blob(i, 65536)).unwrap())
        .collect();
    r.flush().unwrap();
    drop(r);
    let be2: Arc<dyn Backend> = Arc::new(LocalBackend::new(&d.path().join("data")).unwrap());
    let r = Repository::open(be2).unwrap();
    for (i, h) in hs.iter().enumerate() {
        assert_eq!(r.get(BlobKind::Data, h).unwrap(), blob(i as u32, 65536));
    }
    assert!(matches!(
        Repository::init(be, RepoOptions::default()),
        Err(Error::StoreExists(_))
    ));
}

/// A repository of 120 blobs in small packs over three flushes, and the live subset.
type Blobs = Vec<(u32, Hash)>;

fn gc_fixture() -> (Arc<MemBackend>, Blobs, Blobs) {
    let (b, r) = mem_repo(8000);
    let mut all = Vec::new();
    for round in 0..3u32 {
        for i in 0..40u32 {
            let n = round * 40 + i;
            all.push((n, r.put(BlobKind::Data, &random(n as u64, 2000)).unwrap()));
        }
        r.flush().unwrap();
    }
    // Live: all of round 0 but a few, a fifth of round 1, none of round 2.
    let (live, dead): (Vec<_>, Vec<_>) = all
        .iter()
        .partition(|(n, _)| (*n < 40 && n % 10 != 3) || (40..80).contains(n) && n % 5 == 0);
    (b, live, dead)
}

fn check_live(b: &Arc<MemBackend>, live: &[(u32, Hash)]) {
    let r = Repository::open(b.clone()).unwrap();
    for (n, h) in live {
        assert_eq!(
            r.get(BlobKind::Data, h).unwrap(),
            random(*n as u64, 2000),
            "blob {n}"
        );
    }
}

fn run_gc(
    b: &Arc<MemBackend>,
    live: &[(u32, Hash)],
    stop: Option<GcStep>,
) -> crate::repo::gc::GcReport {
    let r = Repository::open(b.clone()).unwrap();
    let mut m = r.gc_marker().unwrap();
    for (_, h) in live {
        assert!(m.mark(h).unwrap());
    }
    r.collect(
        m,
        &GcOptions {
            stop_after: stop,
            ..GcOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn gc_frees_dead_packs_and_compacts() {
    let (b, live, dead) = gc_fixture();
    let before = b.bytes();
    let rep = run_gc(&b, &live, None);
    let after = b.bytes();
    assert_eq!(rep.stopped, None);
    assert_eq!(rep.live_blobs, live.len() as u64);
    assert!(
        rep.packs_deleted > 0 && rep.packs_rewritten > 0 && rep.blobs_copied > 0,
        "{rep:?}"
    );
    assert_eq!(rep.index_objects_deleted, 3);
    assert_eq!(before as i64 - after as i64, rep.net_freed(), "{rep:?}");
    assert!(after < before / 2, "{before} -> {after}");
    check_live(&b, &live);
    let r = Repository::open(b.clone()).unwrap();
    assert_eq!(r.stats().unwrap().index_objects, 1);
    // Most dead blobs are gone (those sharing a mostly-live pack may stay).
    let gone = dead.iter().filter(|(_, h)| !r.contains(h).unwrap()).count();
    assert!(gone >= dead.len() * 3 / 4, "{gone} of {}", dead.len());
    // A second run finds nothing more to do.
    let rep2 = run_gc(&b, &live, None);
    assert_eq!(rep2.freed_bytes, 0, "{rep2:?}");
    check_live(&b, &live);
    // Marking a blob the repository lacks is reported, not fatal.
    let r = Repository::open(b.clone()).unwrap();
    let mut m = r.gc_marker().unwrap();
    assert!(!m.mark(&Hash::of(b"absent")).unwrap());
    assert_eq!(
        r.collect(m, &GcOptions::default()).unwrap().missing_marks,
        1
    );
}

#[test]
fn gc_stopped_at_any_step_keeps_every_live_blob() {
    for stop in [
        GcStep::PacksWritten,
        GcStep::IndexWritten,
        GcStep::OneIndexDeleted,
        GcStep::IndexesDeleted,
        GcStep::OnePackDeleted,
    ] {
        let (b, live, _) = gc_fixture();
        let full = {
            let (b2, live2, _) = gc_fixture();
            let before = b2.bytes();
            run_gc(&b2, &live2, None);
            before - b2.bytes()
        };
        let rep = run_gc(&b, &live, Some(stop));
        assert_eq!(rep.stopped, Some(stop));
        check_live(&b, &live);
        // The next run finishes the job: every live blob reads, garbage is gone.
        let before = b.bytes();
        run_gc(&b, &live, None);
        check_live(&b, &live);
        let r = Repository::open(b.clone()).unwrap();
        assert_eq!(r.stats().unwrap().index_objects, 1, "{stop:?}");
        assert!(
            before > b.bytes() || stop == GcStep::OnePackDeleted,
            "{stop:?}"
        );
        assert!(full > 0);
    }
}

#[test]
fn gc_refuses_a_repository_changed_since_marking() {
    let (b, live, _) = gc_fixture();
    let r = Repository::open(b.clone()).unwrap();
    let mut m = r.gc_marker().unwrap();
    for (_, h) in &live {
        m.mark(h).unwrap();
    }
    let other = Repository::open(b.clone()).unwrap();
    other.put(BlobKind::Data, b"new from elsewhere").unwrap();
    other.flush().unwrap();
    assert!(r.collect(m, &GcOptions::default()).is_err());
    check_live(&b, &live);
}

#[test]
fn reader_follows_compaction_by_another_handle() {
    let (b, live, _) = gc_fixture();
    let reader = Repository::open(b.clone()).unwrap();
    run_gc(&b, &live, None);
    // The reader's index snapshot names deleted packs; it re-reads the index and finds them.
    for (n, h) in &live {
        assert_eq!(
            reader.get(BlobKind::Data, h).unwrap(),
            random(*n as u64, 2000)
        );
    }
}

#[test]
fn a_put_during_collection_waits_and_is_not_lost() {
    let (b, live, dead) = gc_fixture();
    let r = Repository::open(b.clone()).unwrap();
    let (n, h) = dead[dead.len() - 1]; // in a pack the collection deletes
    let mut m = r.gc_marker().unwrap();
    for (_, h) in &live {
        m.mark(h).unwrap();
    }
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            // Without the wait this put would dedup against the doomed copy.
            let got = r.put(BlobKind::Data, &random(n as u64, 2000)).unwrap();
            r.flush().unwrap();
            got
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        r.collect(m, &GcOptions::default()).unwrap();
        assert_eq!(t.join().unwrap(), h);
    });
    let r = Repository::open(b.clone()).unwrap();
    assert_eq!(r.get(BlobKind::Data, &h).unwrap(), random(n as u64, 2000));
    check_live(&b, &live);
}

mod model {
    //! Random sequences of put, get, flush, crash-and-reopen and collection, compared after
    //! every step with a simple model of what must, may and must not be readable.
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8),
        Get(u8),
        Flush,
        Crash,
        Collect(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..24).prop_map(Op::Put),
            4 => (0u8..24).prop_map(Op::Get),
            2 => Just(Op::Flush),
            1 => Just(Op::Crash),
            1 => any::<u32>().prop_map(Op::Collect),
        ]
    }

    fn content(id: u8) -> (BlobKind, Vec<u8>) {
        let kind = if id % 4 == 3 {
            BlobKind::Map
        } else {
            BlobKind::Data
        };
        let len = (id as usize * 397) % 3000;
        let d = if id.is_multiple_of(2) {
            random(id as u64, len)
        } else {
            blob(id as u32, len)
        };
        (kind, d)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn repository_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
            let b = Arc::new(MemBackend::new());
            let mut r = Repository::init(
                b.clone(),
                RepoOptions { compression: Compression::Zstd { level: 1 }, pack_target: 3000 },
            )
            .unwrap();
            let mut durable: HashSet<u8> = HashSet::new();
            let mut pending: HashSet<u8> = HashSet::new();
            for op in ops {
                match op {
                    Op::Put(id) => {
                        let (k, d) = content(id);
                        prop_assert_eq!(r.put(k, &d).unwrap(), Hash::of(&d));
                        if !durable.contains(&id) {
                            pending.insert(id);
                        }
                    }
                    Op::Get(id) => {
                        let (k, d) = content(id);
                        let got = r.get(k, &Hash::of(&d));
                        if durable.contains(&id) || pending.contains(&id) {
                            prop_assert_eq!(got.unwrap(), d);
                        } else {
                            // Collected blobs may linger in kept packs: right bytes or an error.
                            if let Ok(g) = got {
                                prop_assert_eq!(g, d);
                            }
                        }
                    }
                    Op::Flush => {
                        r.flush().unwrap();
                        durable.extend(pending.drain());
                    }
                    Op::Crash => {
                        drop(r);
                        pending.clear();
                        r = Repository::open(b.clone()).unwrap();
                    }
                    Op::Collect(mask) => {
                        durable.extend(pending.drain());
                        let mut m = r.gc_marker().unwrap();
                        let live: HashSet<u8> =
                            durable.iter().copied().filter(|id| mask >> (id % 32) & 1 == 1).collect();
                        for id in &live {
                            prop_assert!(m.mark(&Hash::of(&content(*id).1)).unwrap());
                        }
                        r.collect(m, &GcOptions::default()).unwrap();
                        durable = live;
                    }
                }
            }
            r.flush().unwrap();
            let r = Repository::open(b.clone()).unwrap();
            for id in durable.iter().chain(pending.iter()) {
                let (k, d) = content(*id);
                prop_assert_eq!(r.get(k, &Hash::of(&d)).unwrap(), d);
            }
        }
    }
}

/// Put and get speed on a local repository: `cargo test --release --lib
/// repo::repository::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let d =
        tempfile::tempdir_in(std::env::var("VMREF_BENCH_DIR").unwrap_or("/tmp".into())).unwrap();
    // 128 MiB of 64 KiB blocks of real files of this machine (programs, libraries, docs).
    let mut files = Vec::new();
    for dir in ["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share/doc"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if files.len() >= 128 << 20 {
                break;
            }
            if let Ok(b) = std::fs::read(e.path()) {
                files.extend_from_slice(&b);
            }
        }
    }
    files.resize(128 << 20, 0);
    let data: Vec<&[u8]> = files.chunks(65536).collect();
    let hashes: Vec<Hash> = data.iter().map(|b| Hash::of(b)).collect();
    let blocks = data.len() as u32;
    for compression in [
        Compression::None,
        Compression::Zstd { level: 1 },
        Compression::Zstd { level: 3 },
    ] {
        let sub: Arc<dyn Backend> =
            Arc::new(LocalBackend::new(&d.path().join(compression.to_string())).unwrap());
        let r = Arc::new(
            Repository::init(
                sub,
                RepoOptions {
                    compression,
                    pack_target: 16 << 20,
                },
            )
            .unwrap(),
        );
        let data = &data;
        let t = std::time::Instant::now();
        std::thread::scope(|s| {
            for th in 0..2u32 {
                let r = r.clone();
                s.spawn(move || {
                    for i in (th..blocks).step_by(2) {
                        r.put(BlobKind::Data, data[i as usize]).unwrap();
                    }
                });
            }
        });
        r.flush().unwrap();
        let put = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let mut n = 0usize;
        for h in &hashes {
            n += r.get(BlobKind::Data, h).unwrap().len();
        }
        let get = t.elapsed().as_secs_f64();
        let st = r.stats().unwrap();
        let mb = n as f64 / 1e6;
        println!(
            "{compression:7}: put {:6.0} MB/s (2 threads, incl. hashing and flush), get {:6.0} MB/s (1 thread, page cache warm), stored/raw {:.3}, index {} B",
            mb / put,
            mb / get,
            st.stored_bytes as f64 / st.raw_bytes as f64,
            st.index_bytes
        );
    }
}

/// A writer that failed before indexing what it put leaves blobs only `pending` names; the
/// next writer must not dedup against them (another store may have collected their packs).
#[test]
fn forget_unindexed_drops_pending_blobs() {
    let (_b, r) = mem_repo(1 << 20);
    let h = r.put(BlobKind::Data, &blob(1, 4096)).unwrap();
    assert!(r.contains(&h).unwrap(), "pending counts as stored");
    r.forget_unindexed();
    assert!(!r.contains(&h).unwrap());
    // Put again, it is stored and indexed like any new blob.
    assert_eq!(r.put(BlobKind::Data, &blob(1, 4096)).unwrap(), h);
    r.flush().unwrap();
    assert_eq!(r.get(BlobKind::Data, &h).unwrap(), blob(1, 4096));
}

/// Another handle (another store) folds the index objects this one's snapshot names: a
/// lookup re-reads the list instead of failing.
#[test]
fn lookups_survive_another_handle_folding_the_index() {
    let (b, r) = mem_repo(1 << 20);
    let mut hashes = Vec::new();
    for i in 0..3 {
        hashes.push(r.put(BlobKind::Data, &blob(i, 4096)).unwrap());
        r.flush().unwrap();
    }
    let other = Repository::open(b.clone()).unwrap();
    assert!(r.merge_index(1).unwrap() > 0);
    for h in &hashes {
        assert!(other.contains(h).unwrap());
        let found = other.locate_data(std::slice::from_ref(h)).unwrap();
        assert!(found[0].is_some());
    }
}
