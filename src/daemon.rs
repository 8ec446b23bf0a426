//! The mount's lifetime: `vmref mount` and `vmref umount`.
//!
//! A daemon owns the store's `Engine` (and so its lock) for as long as the mount lives, serves
//! the control socket, flushes tracking state every `flush_interval`, and on any kind of
//! unmount (`vmref umount`, `umount`, `fusermount3 -u`, SIGINT, SIGTERM) closes the engine so
//! the next open finds the tracking state clean. Without `--foreground` it forks before any
//! thread exists and the parent returns only once the child reports the mount ready (or why
//! it failed) through a pipe. A daemon killed with -9 leaves a dead mount (ENOTCONN) that
//! `vmref umount` and the next `vmref mount` detach; its lock died with it.

pub mod mounts;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};

use crate::control;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fs::fuse::FuseFs;
use crate::fs::page_store;
use crate::fs::{Fs, STORE_XATTR};
use crate::store::Store;
use crate::store::lock::StoreLock;
use crate::sys;

/// What `vmref mount` was asked for.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub allow_other: bool,
    pub flush_interval: Duration,
}

const SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// 1 MiB readahead: the kernel's largest FUSE request, and the best sequential reads measured.
const READ_AHEAD_KB: u32 = 1024;
/// How long `vmref umount` waits for the daemon to flush and let go of the store.
const UMOUNT_WAIT: Duration = Duration::from_secs(60);

fn mount_err(msg: String) -> Error {
    Error::Mount(msg)
}

/// A FUSE mount whose daemon is gone answers ENOTCONN, or ECONNABORTED when the kernel
/// aborted the connection with requests in flight.
fn is_dead(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED))
}

/// Detach a mount whose daemon is gone. Root can do it directly; others need fusermount3.
fn detach(point: &Path) -> Result<()> {
    match sys::umount(point, true) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let st = std::process::Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(point)
                .status()
                .map_err(Error::io("run fusermount3 for", point))?;
            if st.success() {
                Ok(())
            } else {
                Err(mount_err(format!(
                    "fusermount3 -u -z {} failed",
                    point.display()
                )))
            }
        }
        Err(e) => Err(Error::io("unmount", point)(e)),
    }
}

/// If `point` is a vmref mount whose daemon died, detach it. Returns whether it did.
fn clear_dead_mount(point: &Path) -> Result<bool> {
    match std::fs::metadata(point) {
        Err(e) if is_dead(&e) => {
            log::warn!(
                "{}: clearing a dead mount left by a killed daemon",
                point.display()
            );
            detach(point)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Mount the store at `opts.mountpoint`.
///
/// # Errors
/// A missing store or mount point, a store already mounted, a mount point already in use, or
/// the kernel refusing the mount; each as one line.
pub fn mount(root: &Path, opts: &MountOptions) -> Result<()> {
    // The daemon changes directory to `/`: a relative store path would stop resolving.
    let root = &std::fs::canonicalize(root).map_err(Error::io("store", root))?;
    let store = Store::open(root)?;
    let mp = mount_point(&opts.mountpoint)?;
    let what = root.display().to_string();
    let log = log_path(&store);
    run_daemon(&mp, opts.foreground, &what, &log, |ready| {
        serve(store, &mp, opts, ready)
    })
}

/// Check the mount point: it must be a directory and not mounted on (a dead vmref mount
/// there is cleared). Its canonical path.
fn mount_point(given: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(given).map_err(Error::io("resolve", given))?;
    clear_dead_mount(&abs)?;
    let mp = std::fs::canonicalize(&abs).map_err(Error::io("mount point", given))?;
    if !mp.is_dir() {
        return Err(mount_err(format!(
            "mount point {} is not a directory",
            mp.display()
        )));
    }
    if let Some(m) = mounts::find(&mp) {
        return Err(mount_err(format!(
            "{} is already a mount point ({} {}); unmount it first",
            mp.display(),
            m.fstype,
            m.source
        )));
    }
    Ok(mp)
}

/// Serve in this process (`foreground`), or fork a daemon that logs to `log` and return once
/// it reports the mount ready or why it failed.
fn run_daemon(
    mp: &Path,
    foreground: bool,
    what: &str,
    log: &Path,
    serve: impl FnOnce(Option<std::io::PipeWriter>) -> Result<()>,
) -> Result<()> {
    if foreground {
        return serve(None);
    }
    let (mut rx, tx) = std::io::pipe().map_err(Error::io("create a pipe for", mp))?;
    match sys::fork().map_err(Error::io("fork the daemon for", mp))? {
        Some(pid) => {
            drop(tx);
            let mut msg = String::new();
            let _ = rx.read_to_string(&mut msg);
            match msg.strip_prefix("ready") {
                Some(_) => {
                    log::info!("mounted {what} at {} (daemon pid {pid})", mp.display());
                    Ok(())
                }
                None if msg.is_empty() => Err(mount_err(format!(
                    "the daemon exited before mounting; see {}",
                    log.display()
                ))),
                None => Err(mount_err(msg.trim_end().to_string())),
            }
        }
        None => {
            drop(rx);
            let code = match daemonize(log).and_then(|()| serve(Some(tx))) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e}");
                    1
                }
            };
            std::process::exit(code);
        }
    }
}

fn log_path(store: &Store) -> PathBuf {
    store.root().join("daemon.log")
}

/// Detach from the terminal: own session, stdin and stdout on /dev/null, log to `path`.
fn daemonize(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    sys::setsid().map_err(Error::io("setsid for", path))?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(Error::io("open", "/dev/null"))?;
    // 0600 like every other store file: the log names images, points and errors.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("open", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io("chmod", &path))?;
    let redirect = |fd, to| sys::dup_onto(fd, to).map_err(Error::io("redirect stdio to", path));
    redirect(null.as_raw_fd(), 0)?;
    redirect(null.as_raw_fd(), 1)?;
    redirect(log.as_raw_fd(), 2)?;
    std::env::set_current_dir("/").map_err(Error::io("chdir", "/"))
}

/// Open the engine, or say who already has the store.
fn open_engine(store: Store) -> Result<Engine> {
    match Engine::open(store.clone()) {
        Err(Error::Locked(root)) => {
            let who = control::ping(&store)
                .map(|p| format!("vmref daemon pid {}", p.pid))
                .unwrap_or_else(|_| "another vmref process".into());
            Err(mount_err(format!(
                "store {} is already in use by {who}; a store is mounted at most once",
                root.display()
            )))
        }
        r => r,
    }
}

/// Run the daemon in this process until the filesystem is unmounted.
fn serve(
    store: Store,
    mp: &Path,
    opts: &MountOptions,
    ready: Option<std::io::PipeWriter>,
) -> Result<()> {
    let mut ready = ready;
    let result = serve_inner(store, mp, opts, &mut ready);
    if let (Err(e), Some(mut tx)) = (&result, ready) {
        let _ = writeln!(tx, "{e}");
    }
    result
}

fn serve_inner(
    store: Store,
    mp: &Path,
    opts: &MountOptions,
    ready: &mut Option<std::io::PipeWriter>,
) -> Result<()> {
    // Before any thread exists, so that every thread inherits the mask and only the signal
    // thread below ever sees these signals.
    sys::block_signals(&SIGNALS).map_err(Error::io("block signals in", mp))?;
    let engine = Arc::new(open_engine(store)?);
    for d in engine.disks() {
        // Before the live files appear, so that no VM write meets the pages cached before.
        d.drop_cached_pages();
        let t = d.tracker();
        let r = t.report();
        if let Some(reason) = &r.lost {
            log::warn!("disk {}: change tracking restarted: {reason}", d.name());
        } else if r.verified {
            log::warn!(
                "disk {}: unclean stop: checked the image against its block digests \
                 ({} bytes read), {} block(s) counted as changed",
                d.name(),
                r.bytes_read,
                r.unproven_blocks
            );
        }
    }
    let socket = engine.store().socket_path();
    let listener = control::bind(&socket)?;
    {
        let engine = engine.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::serve(engine, listener))
            .map_err(Error::io("start the control thread for", mp))?;
    }
    let (uid, gid) = sys::uid_gid();
    let fs = Arc::new(Fs::new(engine.clone(), engine.clone(), uid, gid));
    let config = fuse_config(opts.allow_other);
    let (pages, pending) = page_store::channel();
    let session =
        Session::new(FuseFs::new(fs).with_page_store(pages), mp, &config).map_err(|e| {
            let _ = std::fs::remove_file(&socket);
            mount_err(format!("cannot mount {}: {e}", mp.display()))
        })?;
    pending
        .start(session.notifier())
        .map_err(Error::io("start the page store thread for", mp))?;
    raise_readahead(mp);
    start_signal_thread(mp)?;
    let (stop, stopped) = mpsc::channel::<()>();
    let flusher = {
        let engine = engine.clone();
        let every = opts.flush_interval;
        std::thread::Builder::new()
            .name("flush".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    if let Err(e) = engine.flush_dirty() {
                        log::error!("periodic flush of tracking state: {e}");
                    }
                    crate::logfile::retry();
                }
            })
            .map_err(Error::io("start the flush thread for", mp))?
    };
    let (stop_watch, watch_stopped) = mpsc::channel::<()>();
    let watcher = {
        let engine = engine.clone();
        std::thread::Builder::new()
            .name("store-watch".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    watch_stopped.recv_timeout(crate::engine::watch::WATCH_EVERY)
                {
                    engine.check_store();
                }
            })
            .map_err(Error::io("start the store watch thread for", mp))?
    };
    if let Some(mut tx) = ready.take() {
        let _ = tx.write_all(b"ready\n");
    }
    log::info!(
        "serving {} at {}",
        engine.store().root().display(),
        mp.display()
    );
    let run = session.run();
    drop(stop);
    drop(stop_watch);
    let _ = flusher.join();
    let _ = watcher.join();
    // New commands fall back to working on the store directly once the lock is free.
    let _ = std::fs::remove_file(&socket);
    engine.close()?;
    log::info!("unmounted {}; tracking state flushed", mp.display());
    run.map_err(|e| mount_err(format!("serving {}: {e}", mp.display())))
}

/// What `vmref mount --repository` was asked for.
#[derive(Debug, Clone)]
pub struct RepoMountOptions {
    pub location: String,
    pub key_file: Option<PathBuf>,
    /// Holds the S3 read cache and the daemon's log.
    pub cache_dir: PathBuf,
}

/// Mount the published points of every store in a repository, read-only, without any of
/// the stores (`backup::published`).
///
/// # Errors
/// A missing or unreadable repository, a wrong or missing key, and the mount point errors of
/// `mount`; each as one line.
pub fn mount_repository(r: &RepoMountOptions, opts: &MountOptions) -> Result<()> {
    let mp = mount_point(&opts.mountpoint)?;
    std::fs::create_dir_all(&r.cache_dir).map_err(Error::io("create", &r.cache_dir))?;
    let cache = std::fs::canonicalize(&r.cache_dir).map_err(Error::io("cache", &r.cache_dir))?;
    let key = r
        .key_file
        .as_deref()
        .map(crate::repo::key::RepoKey::load)
        .transpose()?;
    // Opened before the fork, so that a wrong location or key is the command's own error.
    let open = || -> Result<crate::repo::repository::Repository> {
        let backend = crate::backup::data::backend(&cache, Some(&r.location))?;
        crate::repo::repository::Repository::open_with_key(backend, key.as_ref())
    };
    let repo = open().map_err(|e| match e {
        Error::NotAStore(..) => Error::BadArgument(format!(
            "repository {}: there is none (no config)",
            r.location
        )),
        e => e,
    })?;
    // Dropped before the fork, which it allows only once the process is down to one thread:
    // the S3 cache joins its read-ahead threads here.
    drop(repo);
    let log = cache.join("mount.log");
    run_daemon(&mp, opts.foreground, &r.location, &log, |ready| {
        let mut ready = ready;
        let result = (|| {
            sys::block_signals(&SIGNALS).map_err(Error::io("block signals in", &mp))?;
            // Opened again here: a fork keeps no thread but the caller's.
            let data = Arc::new(crate::backup::data::Data::new(Arc::new(open()?)));
            let points = Arc::new(crate::backup::published::Published::new(data));
            let (uid, gid) = sys::uid_gid();
            let fs = Arc::new(Fs::points_only(points, uid, gid));
            let (pages, pending) = page_store::channel();
            let session = Session::new(
                FuseFs::new(fs).with_page_store(pages),
                &mp,
                &fuse_config(opts.allow_other),
            )
            .map_err(|e| mount_err(format!("cannot mount {}: {e}", mp.display())))?;
            pending
                .start(session.notifier())
                .map_err(Error::io("start the page store thread for", &mp))?;
            raise_readahead(&mp);
            start_signal_thread(&mp)?;
            if let Some(mut tx) = ready.take() {
                let _ = tx.write_all(b"ready\n");
            }
            log::info!("serving repository {} at {}", r.location, mp.display());
            session
                .run()
                .map_err(|e| mount_err(format!("serving {}: {e}", mp.display())))
        })();
        if let (Err(e), Some(mut tx)) = (&result, ready) {
            let _ = writeln!(tx, "{e}");
        }
        result
    })
}

/// The mount options and worker setup every vmref mount uses (tests mount with it too).
pub fn fuse_config(allow_other: bool) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(mounts::FSNAME.into()),
        MountOption::Subtype("vmref".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ];
    config.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    // Workers with their own /dev/fuse clones: several readers (or a reader beside the VM's
    // writes) proceed in parallel (+34 % on random reads with two), and each large live write
    // holds its worker for the whole O_DIRECT write, so a VM's queue depth reaches the disk
    // only with as many workers (docs/performance.md).
    config.n_threads = Some(8);
    config.clone_fd = true;
    config
}

/// Best effort: a failure only costs read speed.
fn raise_readahead(mp: &Path) {
    let Some(m) = mounts::find(mp) else { return };
    let knob = PathBuf::from(format!("/sys/class/bdi/{}/read_ahead_kb", m.dev));
    if let Err(e) = std::fs::write(&knob, READ_AHEAD_KB.to_string()) {
        log::debug!("{}: {e}", knob.display());
    }
}

/// SIGINT, SIGTERM and SIGHUP unmount, which ends `Session::run` like any other unmount.
fn start_signal_thread(point: &Path) -> Result<()> {
    let mp = point.to_path_buf();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = sys::wait_signal(&SIGNALS) {
                log::info!("signal {sig}: unmounting {}", mp.display());
                match sys::umount(&mp, false) {
                    Ok(()) => {}
                    // Files still open (a running VM): detach now, finish when they close.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        log::warn!("{} is busy; detaching it lazily", mp.display());
                        let _ = detach(&mp);
                    }
                    Err(_) => {
                        let _ = detach(&mp);
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(Error::io("start the signal thread for", point))
}

/// Unmount a vmref mount and wait until its daemon has flushed and released the store.
///
/// # Errors
/// Not a vmref mount; busy (files open under it); the daemon not finishing in time.
pub fn umount(mountpoint: &Path) -> Result<String> {
    let mp = std::path::absolute(mountpoint).map_err(Error::io("resolve", mountpoint))?;
    let mp = std::fs::canonicalize(&mp)
        .or_else(|e| if is_dead(&e) { Ok(mp.clone()) } else { Err(e) })
        .map_err(Error::io("mount point", mountpoint))?;
    match mounts::find(&mp) {
        Some(m) if m.is_vmref() => {}
        Some(m) => {
            return Err(mount_err(format!(
                "{} is not a vmref mount ({} {})",
                mp.display(),
                m.fstype,
                m.source
            )));
        }
        None => return Err(mount_err(format!("{} is not mounted", mp.display()))),
    }
    if clear_dead_mount(&mp)? {
        return Ok(format!("cleared the dead mount at {}", mp.display()));
    }
    let store = sys::getxattr(&mp, STORE_XATTR)
        .ok()
        .map(|v| PathBuf::from(String::from_utf8_lossy(&v).into_owned()));
    match sys::umount(&mp, false) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(mount_err(format!(
                "{} is busy: close what uses it (VMs, shells, open files) and retry",
                mp.display()
            )));
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let st = std::process::Command::new("fusermount3")
                .args(["-u", "--"])
                .arg(&mp)
                .status()
                .map_err(Error::io("run fusermount3 for", &mp))?;
            if !st.success() {
                return Err(mount_err(format!("fusermount3 -u {} failed", mp.display())));
            }
        }
        Err(e) => return Err(Error::io("unmount", &mp)(e)),
    }
    if let Some(store) = store {
        wait_for_release(&store)?;
    }
    Ok(format!("unmounted {}", mp.display()))
}

/// The daemon holds the store lock until it has closed the engine; taking it proves that.
fn wait_for_release(store: &Path) -> Result<()> {
    let start = Instant::now();
    loop {
        match StoreLock::try_acquire(store) {
            Ok(lock) => {
                drop(lock);
                return Ok(());
            }
            Err(Error::Locked(_)) if start.elapsed() < UMOUNT_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(Error::Locked(_)) => {
                return Err(mount_err(format!(
                    "unmounted, but the daemon of {} has not finished flushing after {}s",
                    store.display(),
                    UMOUNT_WAIT.as_secs()
                )));
            }
            Err(e) => return Err(e),
        }
    }
}
