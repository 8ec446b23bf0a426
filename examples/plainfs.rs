//! The "plain daemon-served FUSE file" baseline of bench/run.sh: one raw file served as
//! `MOUNTPOINT/disk.img` with vmref's own mount settings (`daemon::fuse_config`: 8 workers,
//! clone_fd; max_background 64; async direct I/O; readahead raised to 1 MiB on the mount's bdi) and the same read
//! path shape (pread into a reused per-thread buffer, then `reply.data`), but no tracking, no
//! index and no checksums. What vmref adds on top is the difference to this.
//!
//! ```text
//! plainfs MOUNTPOINT FILE [--rw] [--mode keep-cache|direct-io|cache|passthrough|mixed]
//! ```
//! - `keep-cache` (default): FOPEN_KEEP_CACHE, like a vmref point image.
//! - `direct-io`: FOPEN_DIRECT_IO (+ parallel direct writes), like a vmref live disk.
//! - `cache`: no open flags (the kernel drops the page cache at every open).
//! - `passthrough`: kernel FUSE passthrough (FUSE_PASSTHROUGH, `open_backing`): reads and
//!   writes never reach this daemon. Fails at open with the kernel's errno if refused.
//! - `mixed`: read-only opens as `passthrough`, writable ones as `direct-io` (what a live disk
//!   would need: readers in the kernel, every write through the daemon). Shows what the kernel
//!   allows when both kinds of open meet on one inode (docs/performance.md).
//!
//! Runs in the foreground until unmounted (`umount MOUNTPOINT`); prints `ready` once mounted.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, Session, WriteFlags,
};
use parking_lot::Mutex;

const TTL: Duration = Duration::from_secs(1);
const FILE_INO: u64 = 2;
const NAME: &str = "disk.img";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    KeepCache,
    DirectIo,
    Cache,
    Passthrough,
    Mixed,
}

struct Plain {
    file: File,
    size: u64,
    rw: bool,
    mode: Mode,
    uid: u32,
    gid: u32,
    /// One backing id for all opens (the kernel wants it reused while the file is open).
    backing: Mutex<Option<std::sync::Arc<BackingId>>>,
    passthrough_ok: AtomicBool,
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Plain {
    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == 1;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { self.size },
            blocks: if dir { 0 } else { self.size.div_ceil(512) },
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: match (dir, self.rw) {
                (true, _) => 0o755,
                (false, true) => 0o644,
                (false, false) => 0o444,
            },
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for Plain {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_background(64); // as vmref's FuseFs::init
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO); // likewise
        if matches!(self.mode, Mode::Passthrough | Mode::Mixed) {
            let cap = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok();
            let depth = config.set_max_stack_depth(2).is_ok();
            self.passthrough_ok.store(cap && depth, Ordering::Relaxed);
            if !cap {
                eprintln!("plainfs: the kernel does not offer FUSE_PASSTHROUGH");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == NAME {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            1 | FILE_INO => reply.attr(&TTL, &self.attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY && !self.rw {
            return reply.error(Errno::EROFS);
        }
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let mode = match self.mode {
            Mode::Mixed if write => Mode::DirectIo,
            Mode::Mixed => Mode::Passthrough,
            m => m,
        };
        match mode {
            Mode::KeepCache => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Mode::DirectIo => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            Mode::Cache => reply.opened(FileHandle(0), FopenFlags::empty()),
            Mode::Passthrough | Mode::Mixed => {
                if !self.passthrough_ok.load(Ordering::Relaxed) {
                    return reply.error(Errno::EOPNOTSUPP);
                }
                let mut slot = self.backing.lock();
                let id = match slot.as_ref() {
                    Some(id) => id.clone(),
                    None => match reply.open_backing(&self.file) {
                        Ok(id) => {
                            let id = std::sync::Arc::new(id);
                            *slot = Some(id.clone());
                            id
                        }
                        Err(e) => {
                            eprintln!("plainfs: the kernel refused open_backing: {e}");
                            return reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(5)));
                        }
                    },
                };
                reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), &id);
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if offset >= self.size {
            return reply.data(&[]);
        }
        let n = (size as u64).min(self.size - offset) as usize;
        BUF.with_borrow_mut(|buf| {
            if buf.len() < n {
                buf.resize(n, 0);
            }
            match self.file.read_exact_at(&mut buf[..n], offset) {
                Ok(()) => reply.data(&buf[..n]),
                Err(_) => reply.error(Errno::EIO),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.rw {
            return reply.error(Errno::EROFS);
        }
        if offset + data.len() as u64 > self.size {
            return reply.error(Errno::ENOSPC);
        }
        match self.file.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file.sync_data() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (1, FileType::Directory, "."),
            (1, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn raise_readahead(mp: &Path) {
    if let Some(m) = vmref::daemon::mounts::find(mp) {
        let knob = format!("/sys/class/bdi/{}/read_ahead_kb", m.dev);
        if let Err(e) = std::fs::write(&knob, "1024") {
            eprintln!("plainfs: {knob}: {e}");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut pos = Vec::new();
    let (mut rw, mut mode) = (false, Mode::KeepCache);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rw" => rw = true,
            "--mode" => {
                mode = match it.next().map(String::as_str) {
                    Some("keep-cache") => Mode::KeepCache,
                    Some("direct-io") => Mode::DirectIo,
                    Some("cache") => Mode::Cache,
                    Some("passthrough") => Mode::Passthrough,
                    Some("mixed") => Mode::Mixed,
                    m => {
                        eprintln!("plainfs: unknown mode {m:?}");
                        std::process::exit(2);
                    }
                }
            }
            _ => pos.push(PathBuf::from(a)),
        }
    }
    let [mp, path] = &pos[..] else {
        eprintln!(
            "usage: plainfs MOUNTPOINT FILE [--rw] [--mode keep-cache|direct-io|cache|passthrough|mixed]"
        );
        std::process::exit(2);
    };
    let file = OpenOptions::new()
        .read(true)
        .write(rw)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let size = file.metadata().expect("stat the file").len();
    let (uid, gid) = vmref::sys::uid_gid();
    let fs = Plain {
        file,
        size,
        rw,
        mode,
        uid,
        gid,
        backing: Mutex::new(None),
        passthrough_ok: AtomicBool::new(false),
    };
    let mut config = vmref::daemon::fuse_config(false);
    // Same options as vmref, under another name so that nothing mistakes it for a vmref mount.
    config.mount_options[0] = MountOption::FSName("plainfs".into());
    config.mount_options[1] = MountOption::Subtype("plainfs".into());
    let mp = std::fs::canonicalize(mp).expect("mount point");
    let session = Session::new(fs, &mp, &config).expect("mount");
    raise_readahead(&mp);
    println!("ready");
    if let Err(e) = session.run() {
        eprintln!("plainfs: {e}");
        std::process::exit(1);
    }
}
