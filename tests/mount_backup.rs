//! Backed-up points through the real daemon and real clients: a chain deeper than 30 written
//! through `live/` and backed up while mounted, every point compared with a saved copy of the
//! disk at that moment by `cmp`, `qemu-img compare`, `cp --sparse=always`, `rsync --sparse`
//! and Rust reads; points appearing as soon as a backup returns and vanishing with `ref
//! delete` and `prune`; a checkpoint that keeps its bytes while the VM writes on; concurrent
//! readers of several points beside a writer and a backup; read-only point images; a point
//! name reused without a listing in between; and a damaged stored block that reads as EIO and
//! is named by `verify`.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use parking_lot::Mutex;

const MIB: usize = 1 << 20;
const BLOCK: usize = 65536;

fn open_rw(p: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap()
}

/// Names in the mount's root, sorted, `live` left out.
fn points_listed(mnt: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "live")
        .collect();
    v.sort();
    v
}

fn img(mnt: &Path, point: &str) -> PathBuf {
    mnt.join(point).join("disk0.img")
}

/// Save `bytes` as a sparse file (zero blocks left as holes), for `cmp` and friends.
fn save(path: &Path, bytes: &[u8]) {
    let f = File::create(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for (i, c) in bytes.chunks(BLOCK).enumerate() {
        if c.iter().any(|&b| b != 0) {
            f.write_all_at(c, (i * BLOCK) as u64).unwrap();
        }
    }
}

/// Read a whole file after dropping its cached pages, so the bytes come from the daemon.
fn read_uncached(p: &Path) -> std::io::Result<Vec<u8>> {
    let f = File::open(p)?;
    drop_cache(&f);
    let mut v = vec![0u8; f.metadata()?.len() as usize];
    f.read_exact_at(&mut v, 0)?;
    Ok(v)
}

fn drop_cache(f: &File) {
    // SAFETY: a valid open fd; fadvise only drops clean cached pages.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

/// A few random writes through the mounted live disk, mirrored in `model`: Rust pwrites of
/// random data or zeros within `region` bytes, and, when `qemu`, one `qemu-io write -P`.
fn write_batch(live: &File, live_path: &Path, model: &mut [u8], rng: &mut Rng, region: usize) {
    for _ in 0..1 + rng.below(3) {
        let len = 1 + rng.below(3 * BLOCK as u64) as usize;
        let off = rng.below((region - len) as u64) as usize;
        let mut data = vec![0u8; len];
        if rng.below(5) != 0 {
            rng.fill(&mut data);
        }
        live.write_all_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    if rng.below(3) == 0 {
        let off = rng.below((region / 512 - 256) as u64) as usize * 512;
        let len = (1 + rng.below(255) as usize) * 512;
        let byte = 1 + rng.below(255) as u8;
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {byte} {off} {len}"),
                live_path.to_str().unwrap(),
            ],
        );
        model[off..off + len].fill(byte);
    }
}

fn backup(s: &Setup, name: &str, want: &str) {
    let out = s.ok(&["backup", name]);
    assert!(out.contains(want), "backup {name}: {out}");
}

/// `ls -l` of a point image: its size column.
fn ls_size(p: &Path) -> u64 {
    let out = run_ok("ls", &["-l", p.to_str().unwrap()]);
    out.split_whitespace().nth(4).unwrap().parse().unwrap()
}

fn copy_with(tool: &str, from: &Path, to: &Path) {
    let flag = if tool == "cp" {
        "--sparse=always"
    } else {
        "--sparse"
    };
    run_ok(tool, &[flag, from.to_str().unwrap(), to.to_str().unwrap()]);
}

#[test]
fn a_chain_of_33_backed_up_through_the_mount_reads_exactly() {
    if !fuse_ok("a_chain_of_33_backed_up_through_the_mount_reads_exactly") {
        return;
    }
    // 16 MiB; the VM writes only the first 4 MiB, so every point is mostly holes.
    let size = 16 * MIB;
    let region = 4 * MIB;
    let mut rng = Rng(0x6d6f_756e_7431);
    let mut model = vec![0u8; size];
    rng.fill(&mut model[..MIB]);
    let s = Setup::new(&model);
    let _m = s.mount();
    let live_path = s.live();
    let live = open_rw(&live_path);
    let mut points: Vec<(String, PathBuf)> = Vec::new();
    for i in 0..33 {
        if i > 0 {
            write_batch(&live, &live_path, &mut model, &mut rng, region);
        }
        let name = format!("p{i:02}");
        backup(&s, &name, if i == 0 { "full" } else { "incremental" });
        // There as soon as the backup returned: no remount, no wait.
        assert!(points_listed(&s.mnt).contains(&name), "{name} listed");
        let saved = s.dir.path().join(format!("{name}.saved"));
        save(&saved, &model);
        if i % 4 == 0 {
            // Read right away, while later writes and backups are still to come.
            assert_same(&name, &std::fs::read(img(&s.mnt, &name)).unwrap(), &model);
        }
        points.push((name, saved));
    }
    assert_eq!(
        points_listed(&s.mnt),
        points.iter().map(|p| p.0.clone()).collect::<Vec<_>>()
    );

    for (i, (name, saved)) in points.iter().enumerate() {
        let image = img(&s.mnt, name);
        let (is, ss) = (image.to_str().unwrap(), saved.to_str().unwrap());
        run_ok("cmp", &[is, ss]);
        let md = std::fs::metadata(&image).unwrap();
        assert_eq!(md.len(), size as u64, "{name}: size");
        assert!(
            md.blocks() > 0 && md.blocks() * 512 <= size as u64,
            "{name}: st_blocks {}",
            md.blocks()
        );
        if i % 8 != 3 {
            continue;
        }
        assert_eq!(ls_size(&image), size as u64, "{name}: ls -l");
        run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", is, ss]);
        for tool in ["cp", "rsync"] {
            let out = s.dir.path().join(format!("{name}.{tool}"));
            copy_with(tool, &image, &out);
            run_ok("cmp", &[out.to_str().unwrap(), ss]);
            let alloc = std::fs::metadata(&out).unwrap().blocks() * 512;
            assert!(
                alloc <= (region + MIB) as u64,
                "{name}: the {tool} copy allocates {alloc} of {size} bytes"
            );
            std::fs::remove_file(&out).unwrap();
        }
    }

    // A point image is read-only in every way, and refusing changes nothing.
    let (name, saved) = &points[7];
    let image = img(&s.mnt, name);
    let w = std::fs::OpenOptions::new().write(true).open(&image);
    let e = w.unwrap_err().raw_os_error();
    assert!(
        e == Some(libc::EROFS) || e == Some(libc::EACCES),
        "open for write: {e:?}"
    );
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 9 0 64k",
            image.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success(), "qemu-io wrote to a point: {o:?}");
    let o = run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", image.display()),
            "bs=4096",
            "count=1",
            "conv=notrunc",
            "status=none",
        ],
    );
    assert!(!o.status.success(), "dd wrote to a point");
    let o = run("truncate", &["-s", "0", image.to_str().unwrap()]);
    assert!(!o.status.success(), "truncate of a point");
    assert_eq!(
        read_uncached(&image).unwrap(),
        std::fs::read(saved).unwrap()
    );

    // Deleted and pruned points vanish at once; the rest still read exactly.
    s.ok(&["ref", "delete", "p05"]);
    assert!(!points_listed(&s.mnt).contains(&"p05".to_string()));
    assert_eq!(
        std::fs::metadata(img(&s.mnt, "p05"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOENT)
    );
    points.retain(|p| p.0 != "p05");
    let out = s.ok(&["prune", "--keep-last", "6"]);
    assert!(out.contains("pruned 26 point(s)"), "{out}");
    let kept = points.split_off(points.len() - 6);
    assert_eq!(
        points_listed(&s.mnt),
        kept.iter().map(|p| p.0.clone()).collect::<Vec<_>>()
    );
    for (name, _) in &points {
        assert!(!img(&s.mnt, name).exists(), "{name} pruned but still there");
    }
    for (name, saved) in &kept {
        let got = read_uncached(&img(&s.mnt, name)).unwrap();
        assert_same(name, &got, &std::fs::read(saved).unwrap());
        run_ok(
            "cmp",
            &[img(&s.mnt, name).to_str().unwrap(), saved.to_str().unwrap()],
        );
    }
    // The live disk is still what was written.
    assert_same("live", &read_uncached(&live_path).unwrap(), &model);
}

#[test]
fn a_checkpoint_keeps_its_bytes_while_the_vm_writes_on() {
    if !fuse_ok("a_checkpoint_keeps_its_bytes_while_the_vm_writes_on") {
        return;
    }
    let size = 8 * MIB;
    let mut rng = Rng(0xc4ec_4b01);
    let mut model = vec![0u8; size];
    rng.fill(&mut model[..2 * MIB]);
    let s = Setup::new(&model);
    let _m = s.mount();
    let live_path = s.live();
    let live = open_rw(&live_path);
    write_batch(&live, &live_path, &mut model, &mut rng, size);

    s.ok(&["ref", "create", "plain0"]);
    s.ok(&["ref", "create", "CP", "--checkpoint"]);
    let at_cp = model.clone();
    let saved = s.dir.path().join("cp.saved");
    save(&saved, &at_cp);
    assert_eq!(
        points_listed(&s.mnt),
        ["CP"],
        "a plain point has no directory"
    );
    let cp = img(&s.mnt, "CP");
    assert_same("CP", &std::fs::read(&cp).unwrap(), &at_cp);
    // Held open across later writes and the demote.
    let held = File::open(&cp).unwrap();

    // Overwrite data blocks, fill holes, zero data, through both clients.
    for _ in 0..6 {
        write_batch(&live, &live_path, &mut model, &mut rng, size);
    }
    live.write_all_at(&vec![0u8; 3 * BLOCK], BLOCK as u64 / 2)
        .unwrap();
    model[BLOCK / 2..BLOCK / 2 + 3 * BLOCK].fill(0);
    live.write_all_at(&[0xee; 5000], (6 * MIB) as u64).unwrap();
    model[6 * MIB..6 * MIB + 5000].fill(0xee);
    assert_ne!(model, at_cp);
    assert_same("live", &read_uncached(&live_path).unwrap(), &model);

    assert_same("CP after writes", &read_uncached(&cp).unwrap(), &at_cp);
    drop_cache(&held);
    let mut buf = vec![0u8; size];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_same("CP through the held fd", &buf, &at_cp);
    let (cs, ss) = (cp.to_str().unwrap(), saved.to_str().unwrap());
    run_ok("cmp", &[cs, ss]);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", cs, ss]);
    for tool in ["cp", "rsync"] {
        let out = s.dir.path().join(format!("cp.{tool}"));
        copy_with(tool, &cp, &out);
        run_ok("cmp", &[out.to_str().unwrap(), ss]);
    }
    assert_eq!(std::fs::metadata(&cp).unwrap().len(), size as u64);
    let w = std::fs::OpenOptions::new().write(true).open(&cp);
    assert_eq!(w.unwrap_err().raw_os_error(), Some(libc::EROFS));

    // Changes since the checkpoint are the blocks written since.
    let ch = changed_extents(&s.json(&["changes", "--since", "CP", "--json"]));
    let covered = |b: usize| {
        ch.iter()
            .any(|&(o, l)| (o..o + l).contains(&((b * BLOCK) as u64)))
    };
    for b in 0..size / BLOCK {
        let r = b * BLOCK..(b + 1) * BLOCK;
        if model[r.clone()] != at_cp[r] {
            assert!(covered(b), "block {b} changed but not reported");
        }
    }

    // Demote: the directory goes, the held fd never shows other bytes, the point stays.
    s.ok(&["ref", "demote", "CP"]);
    assert!(points_listed(&s.mnt).is_empty());
    assert!(!cp.exists());
    // A block no write touched since the checkpoint (so it was never saved), written now.
    let b = (0..size / BLOCK)
        .rev()
        .find(|&b| !covered(b) && at_cp[b * BLOCK..(b + 1) * BLOCK].iter().any(|&x| x != 0))
        .expect("an untouched data block");
    let off = b * BLOCK;
    live.write_all_at(&[0x5a; 4096], off as u64).unwrap();
    model[off..off + 4096].fill(0x5a);
    drop_cache(&held);
    let mut got = vec![0u8; 4096];
    // Never the live disk's new bytes: the checkpoint is gone, so the open file is stale.
    let e = held.read_exact_at(&mut got, off as u64).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}");
    let shown: serde_json::Value = s.json(&["ref", "show", "CP", "--json"]);
    assert_eq!(shown["state"], "plain", "{shown}");
}

/// Points and their bytes, shared with the reader threads.
type Saved = Vec<(String, Arc<Vec<u8>>)>;
/// One write of the writer thread: offset and data.
type Write = (usize, Vec<u8>);

/// Concurrent readers of several points compare random ranges with the saved copies, while a
/// writer writes the live disk and another backup runs. The new backup must equal the disk
/// after some prefix of the writer's writes (each write is one FUSE request).
#[test]
fn concurrent_readers_while_the_vm_writes_and_a_backup_runs() {
    if !fuse_ok("concurrent_readers_while_the_vm_writes_and_a_backup_runs") {
        return;
    }
    let size = 8 * MIB;
    let mut rng = Rng(0xc0c0_7e57);
    let mut model = vec![0u8; size];
    rng.fill(&mut model[..3 * MIB]);
    let s = Setup::new(&model);
    let _m = s.mount();
    let live_path = s.live();
    let live = open_rw(&live_path);
    let saved: Arc<Mutex<Saved>> = Arc::default();
    for i in 0..4 {
        for _ in 0..3 {
            write_batch(&live, &live_path, &mut model, &mut rng, size);
        }
        let name = format!("c{i}");
        backup(&s, &name, if i == 0 { "full" } else { "incremental" });
        saved.lock().push((name, Arc::new(model.clone())));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mnt = s.mnt.clone();
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (stop, reads, saved, mnt) =
                (stop.clone(), reads.clone(), saved.clone(), mnt.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(1000 + t);
                while !stop.load(Ordering::Relaxed) {
                    let (name, want) = {
                        let v = saved.lock();
                        v[rng.below(v.len() as u64) as usize].clone()
                    };
                    let f = File::open(img(&mnt, &name)).unwrap();
                    if rng.below(4) == 0 {
                        drop_cache(&f);
                    }
                    for _ in 0..8 {
                        let len = 1 + rng.below(300_000) as usize;
                        let off = rng.below((size - len) as u64) as usize;
                        let mut buf = vec![0u8; len];
                        f.read_exact_at(&mut buf, off as u64).unwrap();
                        if buf[..] != want[off..off + len] {
                            panic!("reader {t}: {name} differs in {off}+{len}");
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let log: Arc<Mutex<Vec<Write>>> = Arc::default();
    let writer = {
        let (stop, log, live) = (stop.clone(), log.clone(), live.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut rng = Rng(77);
            while !stop.load(Ordering::Relaxed) {
                // At most 64 KiB: one request, so a checkpoint sees all of it or none.
                let len = 1 + rng.below(BLOCK as u64) as usize;
                let off = rng.below((size - len) as u64) as usize;
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                live.write_all_at(&data, off as u64).unwrap();
                log.lock().push((off, data));
            }
        })
    };
    wait_until(|| log.lock().len() >= 20, "the writer to start");
    let before_backup = reads.load(Ordering::Relaxed);
    backup(&s, "c4", "incremental");
    let during = log.lock().len();
    wait_until(
        || log.lock().len() >= during + 20 && reads.load(Ordering::Relaxed) >= before_backup + 50,
        "more writes and reads after the backup",
    );
    // The new point joins the readers' set once its bytes are known; the writer goes on.
    let c4 = read_uncached(&img(&s.mnt, "c4")).unwrap();
    let writes = log.lock().clone();
    let mut m = model.clone();
    let mut found = m == c4;
    for (off, data) in &writes {
        if found {
            break;
        }
        m[*off..off + data.len()].copy_from_slice(data);
        found = m == c4;
    }
    assert!(found, "c4 is not the disk after any prefix of the writes");
    saved.lock().push(("c4".into(), Arc::new(c4)));
    let now = reads.load(Ordering::Relaxed);
    wait_until(
        || reads.load(Ordering::Relaxed) >= now + 50,
        "reads of c4 too",
    );

    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    for (off, data) in log.lock().iter() {
        model[*off..off + data.len()].copy_from_slice(data);
    }
    assert_same("live", &read_uncached(&live_path).unwrap(), &model);
    for (name, want) in saved.lock().iter() {
        assert_same(name, &read_uncached(&img(&s.mnt, name)).unwrap(), want);
    }
    eprintln!("{} concurrent reads checked", reads.load(Ordering::Relaxed));
}

#[test]
fn a_damaged_stored_block_reads_as_eio_and_verify_names_it() {
    if !fuse_ok("a_damaged_stored_block_reads_as_eio_and_verify_names_it") {
        return;
    }
    // Blocks 0..16 hold data.
    let size = 4 * MIB;
    let mut model = vec![0u8; size];
    Rng(0x0da3_a6ed).fill(&mut model[..16 * BLOCK]);
    let s = Setup::new(&model);
    let m = s.mount();
    let live_path = s.live();
    backup(&s, "full", "full");
    let at_full = model.clone();
    let live = open_rw(&live_path);
    live.write_all_at(&[7u8; BLOCK], 3 * BLOCK as u64).unwrap();
    model[3 * BLOCK..4 * BLOCK].fill(7);
    drop(live);
    backup(&s, "inc", "incremental");
    // A clean unmount: `vmref umount` returns once the daemon released the store.
    s.ok(&["umount", s.mnt.to_str().unwrap()]);
    drop(m);

    // Damage block 9's stored bytes, found through its pack's table; both points need it.
    let bad = 9u64;
    let h = point_block_hash(&s.store, "full", "disk0", bad);
    assert_eq!(h, point_block_hash(&s.store, "inc", "disk0", bad));
    flip_blob(&s.store, &h);

    let _m = s.mount();
    for point in ["full", "inc"] {
        let image = img(&s.mnt, point);
        let want = if point == "full" { &at_full } else { &model };
        // dd of the damaged range fails with EIO.
        let o = run(
            "dd",
            &[
                &format!("if={}", image.display()),
                "of=/dev/null",
                &format!("bs={BLOCK}"),
                &format!("skip={bad}"),
                "count=1",
                "iflag=direct",
                "status=none",
            ],
        );
        assert!(!o.status.success(), "{point}: dd of the damaged block");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("Input/output error"), "{point}: {err}");
        // A Rust read of any part of it fails with EIO, never with other bytes.
        let f = File::open(&image).unwrap();
        let mut buf = vec![0u8; 100];
        let e = f
            .read_exact_at(&mut buf, bad * BLOCK as u64 + 5000)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{point}: {e}");
        // Everything else reads exactly, before and after the damaged block.
        for (off, len) in [
            (0, 8 * BLOCK),
            (10 * BLOCK, size - 10 * BLOCK),
            (8 * BLOCK, 100),
        ] {
            drop_cache(&f);
            let mut got = vec![0u8; len];
            f.read_exact_at(&mut got, off as u64).unwrap();
            assert_same(&format!("{point} at {off}"), &got, &want[off..off + len]);
        }
        // A whole-image copy fails instead of copying wrong bytes.
        let out = s.dir.path().join(format!("{point}.copy"));
        let o = run("cp", &[image.to_str().unwrap(), out.to_str().unwrap()]);
        assert!(
            !o.status.success(),
            "{point}: cp of a damaged image succeeded"
        );
    }

    let o = s.vmref(&["verify"]);
    assert!(!o.status.success(), "verify of a damaged store succeeded");
    let out = String::from_utf8_lossy(&o.stdout);
    for point in ["full", "inc"] {
        assert!(
            out.contains(&format!("damaged: point {point} disk disk0 block {bad}:")),
            "{out}"
        );
    }
    assert_eq!(out.matches("damaged:").count(), 2, "{out}");
}

/// A backup tool that rotates one name (`ref delete daily; backup daily`) with no listing of
/// the mount in between must read the new point's bytes, never the old point's.
#[test]
fn a_point_name_reused_without_a_listing_shows_the_new_bytes() {
    if !fuse_ok("a_point_name_reused_without_a_listing_shows_the_new_bytes") {
        return;
    }
    let size = 2 * MIB;
    let mut model = vec![0u8; size];
    Rng(0xda11).fill(&mut model[..MIB]);
    let s = Setup::new(&model);
    let _m = s.mount();
    let live = open_rw(&s.live());
    let daily = img(&s.mnt, "daily");
    let mut held: Option<File> = None;
    for round in 0..3u8 {
        if round > 0 {
            s.ok(&["ref", "delete", "daily"]);
        }
        live.write_all_at(&[round + 1; 3 * BLOCK], BLOCK as u64)
            .unwrap();
        model[BLOCK..4 * BLOCK].fill(round + 1);
        backup(&s, "daily", "");
        assert_same(
            &format!("daily, round {round}"),
            &std::fs::read(&daily).unwrap(),
            &model,
        );
        // An fd of the deleted point never shows the new point's bytes.
        if let Some(f) = held.take() {
            let mut b = vec![0u8; BLOCK];
            if f.read_exact_at(&mut b, BLOCK as u64).is_ok() {
                assert_eq!(b, vec![round; BLOCK], "the old fd reads the old point");
            }
        }
        held = Some(File::open(&daily).unwrap());
    }
}
