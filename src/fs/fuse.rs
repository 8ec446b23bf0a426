//! The fuser adapter: translates kernel requests into `Fs` calls and results into replies.
//! No filesystem logic lives here. Errors become errnos through `Error::errno` and are logged
//! once, here.
//!
//! Caching: point images never change, so they are opened with FOPEN_KEEP_CACHE and re-reads
//! come from the page cache. Live disks are opened with FOPEN_DIRECT_IO: every write must
//! reach the tracker before it is acknowledged anyway, a VM keeps its own cache, and direct
//! requests are the fastest daemon-served path measured on this machine (docs/performance.md).
//! Root entries have a zero TTL so points appear and vanish without a remount.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use super::page_store::PageStore;
use super::{Attr, Fs, Kind, Opened, ROOT_INO, SetAttr, Whence};
use crate::error::{Error, FsKind};
use crate::image::Decoded;

/// Attributes of files and of everything below a point directory: sizes never change.
const TTL: Duration = Duration::from_secs(1);
/// Entries in the root (points, `live`): looked up afresh every time, so no stale listing.
const ROOT_TTL: Duration = Duration::ZERO;

pub struct FuseFs {
    fs: Arc<Fs>,
    pages: Option<PageStore>,
}

impl FuseFs {
    pub fn new(fs: Arc<Fs>) -> FuseFs {
        FuseFs { fs, pages: None }
    }

    /// Hand the rest of each block a small point read decoded to the kernel's page cache.
    pub fn with_page_store(self, pages: PageStore) -> FuseFs {
        FuseFs {
            pages: Some(pages),
            ..self
        }
    }
}

thread_local! {
    /// One read buffer per FUSE worker thread, reused across requests.
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The blocks a point read decoded, per worker thread, reused across requests.
    static DECODED: RefCell<Vec<Decoded>> = const { RefCell::new(Vec::new()) };
}

fn errno(op: &str, e: &Error) -> Errno {
    let code = e.errno();
    match e {
        Error::Fs {
            kind: FsKind::NotFound | FsKind::NoMoreData | FsKind::NoAttr | FsKind::Unsupported,
            ..
        } => log::debug!("{op}: {e}"),
        Error::Fs { .. } | Error::OutOfRange { .. } => log::info!("{op}: {e}"),
        _ => log::warn!("{op}: {e}"),
    }
    Errno::from_i32(code)
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::ENOENT)
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Readahead and several readers keep more requests in flight than the default 16.
        let _ = config.set_max_background(64);
        // Without it the kernel runs an AIO direct request (qemu's aio=native with cache=none)
        // to completion inside io_submit, so a VM's queue depth collapses to one.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match self.fs.lookup(parent.0, name) {
            Ok(a) => {
                let ttl = if parent.0 == ROOT_INO { ROOT_TTL } else { TTL };
                reply.entry(&ttl, &file_attr(&a), Generation(0));
            }
            Err(e) => reply.error(errno("lookup", &e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => {
                let ttl = if a.kind == Kind::Dir { ROOT_TTL } else { TTL };
                reply.attr(&ttl, &file_attr(&a));
            }
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            size,
            mode,
            uid,
            gid,
            times: atime.is_some() || mtime.is_some() || ctime.is_some(),
        };
        match self.fs.setattr(ino.0, set) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno("setattr", &e)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("mknod", parent, name));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("mkdir", parent, name));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse("unlink", parent, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse("rmdir", parent, name));
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("symlink", parent, link_name));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse("rename", parent, name));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse("link", newparent, newname));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(self.refuse("create", parent, name));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.fs.open(ino.0, write) {
            Ok((fh, Opened::Live)) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            Ok((fh, Opened::Point)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno("open", &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        BUF.with_borrow_mut(|buf| {
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            DECODED.with_borrow_mut(|decoded| {
                match self
                    .fs
                    .read_decoding(fh.0, offset, &mut buf[..size as usize], decoded)
                {
                    Ok(n) => {
                        reply.data(&buf[..n]);
                        // After the reply: the kernel fills this request's pages itself.
                        for d in decoded.drain(..) {
                            if let Some(p) = &self.pages {
                                p.offer(ino.0, d, offset..offset + n as u64);
                            }
                        }
                    }
                    Err(e) => {
                        decoded.clear();
                        reply.error(errno("read", &e));
                    }
                }
            });
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno("write", &e)),
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
        // Writes are acknowledged only once they reached the image: nothing is buffered here.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsync(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir_at(fh.0, offset) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate() {
                    let kind = match e.kind {
                        Kind::Dir => FileType::Directory,
                        Kind::File => FileType::RegularFile,
                    };
                    if reply.add(INodeNo(e.ino), offset + i as u64 + 1, kind, &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdir", &e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.to_str().unwrap_or("");
        match self.fs.getxattr(ino.0, name) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno("getxattr", &e)),
        }
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        // The store xattr is for vmref itself; listing none keeps `cp -a` from copying it.
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let e = self.fs.xattr_change_error(ino.0, &name.to_string_lossy());
        reply.error(errno("setxattr", &e));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let e = self.fs.xattr_change_error(ino.0, &name.to_string_lossy());
        reply.error(errno("removexattr", &e));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Punching or zeroing would change bytes behind the tracker's back; callers such as
        // qemu fall back to writing zeros, which is tracked.
        let e = Error::Fs {
            kind: FsKind::Unsupported,
            path: format!("fallocate at {offset}"),
        };
        reply.error(errno("fallocate", &e));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = Whence::from_raw(whence).and_then(|w| self.fs.lseek(fh.0, offset.max(0) as u64, w));
        match r {
            Ok(p) => reply.offset(p as i64),
            Err(e) => reply.error(errno("lseek", &e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let e = Error::Fs {
            kind: FsKind::Unsupported,
            path: format!("copy_file_range at {offset_in}"),
        };
        reply.error(errno("copy_file_range", &e));
    }
}

impl FuseFs {
    fn refuse(&self, op: &str, parent: INodeNo, name: &OsStr) -> Errno {
        let e = self.fs.refuse_change(parent.0, &name.to_string_lossy());
        errno(op, &e)
    }
}
