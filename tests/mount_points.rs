//! Point directories over a real mount served in-process: from an in-memory `PointSource`
//! (exact st_blocks, SEEK_DATA/SEEK_HOLE positions, every read-only refusal, names that come
//! and go), and from the engine itself while a backup runs, so that a reader can be placed
//! deterministically inside the backup's copy (the daemon-served tests are in
//! `mount_backup.rs`).

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use common::*;
use vmref::engine::Engine;
use vmref::fs::Fs;
use vmref::fs::fuse::FuseFs;
use vmref::image::PointSource;
use vmref::store::Store;

const MIB: usize = 1 << 20;
const BLOCK: usize = 65536;

struct InProcess {
    _session: fuser::BackgroundSession,
    _guard: MountGuard,
}

fn mount_in_process(dir: &Path, points: Arc<MemPoints>) -> (InProcess, std::path::PathBuf) {
    let engine = engine_with_disk(dir, &pattern(2 * MIB, 3));
    mount_engine(dir, engine, points)
}

fn engine_with_disk(dir: &Path, bytes: &[u8]) -> Arc<Engine> {
    let store = Store::init(&dir.join("store"), BLOCK as u32).unwrap();
    let image = dir.join("disk0.raw");
    std::fs::write(&image, bytes).unwrap();
    let engine = Arc::new(Engine::open(store).unwrap());
    engine.disk_add("disk0", &image).unwrap();
    engine
}

fn mount_engine(
    dir: &Path,
    engine: Arc<Engine>,
    points: Arc<dyn PointSource>,
) -> (InProcess, std::path::PathBuf) {
    let (uid, gid) = vmref::sys::uid_gid();
    let fs = Arc::new(Fs::new(engine, points, uid, gid));
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let session =
        fuser::spawn_mount(FuseFs::new(fs), &mnt, &vmref::daemon::fuse_config(false)).unwrap();
    let guard = MountGuard {
        mnt: mnt.clone(),
        pid: None,
        child: None,
    };
    (
        InProcess {
            _session: session,
            _guard: guard,
        },
        mnt,
    )
}

/// 4 MiB: data in blocks 0, 5 and 63 only.
fn sparse_image(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4 * MIB];
    for b in [0usize, 5, 63] {
        v[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&pattern(BLOCK, seed + b as u64));
    }
    v
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> Option<i32> {
    r.unwrap_err().raw_os_error()
}

#[test]
fn point_images_are_read_only_sparse_and_live_listed() {
    if !fuse_ok("point_images_are_read_only_sparse_and_live_listed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let points = Arc::new(MemPoints::default());
    let p1 = sparse_image(100);
    points.insert("p1", "disk0", p1.clone(), BLOCK);
    let (_m, mnt) = mount_in_process(dir.path(), points.clone());
    let img = mnt.join("p1/disk0.img");

    assert_eq!(names(&mnt), ["live", "p1"]);
    assert_eq!(names(&mnt.join("p1")), ["disk0.img"]);
    let md = std::fs::metadata(&img).unwrap();
    assert_eq!(md.len(), p1.len() as u64);
    assert_eq!(
        md.blocks(),
        (3 * BLOCK / 512) as u64,
        "st_blocks = data present"
    );
    assert_eq!(std::fs::read(&img).unwrap(), p1);
    // Re-reads of a point come from the kernel's cache but must stay exact.
    assert_eq!(std::fs::read(&img).unwrap(), p1);

    // SEEK_DATA / SEEK_HOLE.
    let f = std::fs::File::open(&img).unwrap();
    let fd = f.as_raw_fd();
    let sd = |off: u64| vmref::sys::seek_data_hole(fd, off, false).unwrap();
    let sh = |off: u64| vmref::sys::seek_data_hole(fd, off, true).unwrap();
    assert_eq!(sd(0), Some(0));
    assert_eq!(sh(0), Some(BLOCK as u64));
    assert_eq!(sd(BLOCK as u64 + 7), Some(5 * BLOCK as u64));
    assert_eq!(sh(5 * BLOCK as u64 + 9), Some(6 * BLOCK as u64));
    assert_eq!(sd(6 * BLOCK as u64), Some(63 * BLOCK as u64));
    assert_eq!(sh(63 * BLOCK as u64), Some(4 * MIB as u64));
    drop(f);

    // Sparse-aware copies skip the holes and copy the bytes exactly.
    for (tool, args) in [("cp", vec!["--sparse=always"]), ("rsync", vec!["--sparse"])] {
        let out = dir.path().join(format!("copy-{tool}.raw"));
        let mut a: Vec<&str> = args.clone();
        a.push(img.to_str().unwrap());
        a.push(out.to_str().unwrap());
        run_ok(tool, &a);
        assert_eq!(std::fs::read(&out).unwrap(), p1, "{tool} copy");
        let blocks = std::fs::metadata(&out).unwrap().blocks();
        assert!(
            blocks <= (4 * BLOCK / 512) as u64,
            "{tool} copy not sparse: {blocks} blocks"
        );
    }
    let model = dir.path().join("p1.raw");
    std::fs::write(&model, &p1).unwrap();
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            model.to_str().unwrap(),
        ],
    );
    run_ok("cmp", &[img.to_str().unwrap(), model.to_str().unwrap()]);

    // Read-only in every way, and nothing changes.
    let w = std::fs::OpenOptions::new().write(true).open(&img);
    assert_eq!(errno_of(w), Some(libc::EROFS));
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", img.to_str().unwrap()],
    );
    assert!(!o.status.success(), "qemu-io write to a point");
    let o = run("truncate", &["-s", "0", img.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Read-only file system"),
        "{o:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let chmod = std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o666));
    assert_eq!(errno_of(chmod), Some(libc::EROFS));
    assert_eq!(errno_of(std::fs::remove_file(&img)), Some(libc::EROFS));
    assert_eq!(
        errno_of(std::fs::write(mnt.join("p1/new.img"), b"x")),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno_of(std::fs::rename(&img, mnt.join("p1/x.img"))),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno_of(std::fs::remove_dir(mnt.join("p1"))),
        Some(libc::EROFS)
    );
    assert_eq!(std::fs::read(&img).unwrap(), p1);

    // Points appear and vanish without a remount.
    points.insert("p2", "disk0", sparse_image(200), BLOCK);
    assert_eq!(names(&mnt), ["live", "p1", "p2"]);
    assert!(mnt.join("p2/disk0.img").exists());
    points.remove("p1");
    assert_eq!(names(&mnt), ["live", "p2"]);
    assert_eq!(errno_of(std::fs::metadata(&img)), Some(libc::ENOENT));
    // Same name, different bytes: never the old point's cached pages.
    let p1b = sparse_image(300);
    points.insert("p1", "disk0", p1b.clone(), BLOCK);
    assert_eq!(std::fs::read(&img).unwrap(), p1b);
    // And when nothing listed or looked the name up between the delete and the new point.
    let held = std::fs::File::open(&img).unwrap();
    let p1c = sparse_image(400);
    points.remove("p1");
    points.insert("p1", "disk0", p1c.clone(), BLOCK);
    assert_eq!(std::fs::read(&img).unwrap(), p1c);
    // The file opened on the old point never shows the new one's bytes.
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; BLOCK];
    if held.read_exact_at(&mut b, 0).is_ok() {
        assert_eq!(b, p1b[..BLOCK]);
    }
}

/// Reads of a backup's point through the mount, from inside the backup's copy: the progress
/// callback runs while the checkpoint is open and the copy has not committed.
struct ReadDuring<F: Fn() + Sync>(F, std::sync::atomic::AtomicBool);
impl<F: Fn() + Sync> vmref::backup::Progress for ReadDuring<F> {
    fn inc(&self, _n: u64) {
        if !self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
            (self.0)();
        }
    }
}

fn drop_cache(f: &std::fs::File) {
    // SAFETY: a valid open fd; fadvise only drops clean cached pages.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

/// A point read (and held open) while its backup runs is the checkpoint's image; once the
/// backup commits, the same name and the same open file must go on reading the point's
/// bytes, not the live disk's, however the VM writes on.
#[test]
fn a_point_read_during_its_backup_stays_exact_after_it() {
    if !fuse_ok("a_point_read_during_its_backup_stays_exact_after_it") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let at_a = pattern(2 * MIB, 11);
    let engine = engine_with_disk(dir.path(), &at_a);
    let (_m, mnt) = mount_engine(dir.path(), engine.clone(), engine.clone());
    let img = mnt.join("a/disk0.img");
    let held: parking_lot::Mutex<Option<std::fs::File>> = Default::default();
    let progress = ReadDuring(
        || {
            assert_eq!(names(&mnt), ["a", "live"], "the checkpoint is listed");
            assert_eq!(std::fs::read(&img).unwrap(), at_a, "the checkpoint's bytes");
            *held.lock() = Some(std::fs::File::open(&img).unwrap());
        },
        Default::default(),
    );
    vmref::backup::run::backup(&engine, "a", None, false, None, &progress).unwrap();
    let held = held.lock().take().expect("read during the backup");

    // The VM writes every block after the commit.
    let live = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("live/disk0.img"))
        .unwrap();
    live.write_all_at(&pattern(2 * MIB, 12), 0).unwrap();

    let f = std::fs::File::open(&img).unwrap();
    drop_cache(&f);
    let mut got = vec![0u8; 2 * MIB];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == at_a, "the point reads the live disk's bytes");
    drop_cache(&held);
    held.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == at_a,
        "the fd opened during the backup reads other bytes"
    );
    assert_eq!(
        std::fs::metadata(&img).unwrap().blocks(),
        (2 * MIB / 512) as u64
    );
}
