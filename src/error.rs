//! The crate's error type: one enum whose variants name what failed, carrying the path or
//! name involved, turned into one friendly line at the CLI edge and into one errno at the
//! FUSE edge (`Error::errno`).

use std::io;
use std::path::PathBuf;

use crate::format::FormatError;

/// Everything the library can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("{0} is not a vmref store ({1}); create one with `vmref init`")]
    NotAStore(PathBuf, &'static str),
    #[error("{0} already holds a vmref store")]
    StoreExists(PathBuf),
    #[error("{0} is not empty; `vmref init` wants an empty or missing directory")]
    InitNotEmpty(PathBuf),
    #[error("store {0} is locked by another vmref process")]
    Locked(PathBuf),
    #[error("invalid name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("invalid block size {0:?}: a power of two from 4K to 4M")]
    BadBlockSize(String),
    #[error("reference point {0:?} already exists")]
    RefExists(String),
    #[error("no reference point named {0:?}")]
    NoSuchRef(String),
    #[error("disk {0:?} is already registered")]
    DiskExists(String),
    #[error("no disk named {0:?}")]
    NoSuchDisk(String),
    #[error("disk {disk} is unavailable ({why}); put the image back or `vmref disk remove {disk}`")]
    DiskUnavailable { disk: String, why: String },
    #[error("disk {0} was removed from the store; its live file no longer takes writes")]
    DiskRemoved(String),
    #[error("image {path} cannot be used: {why}")]
    BadImage { path: PathBuf, why: String },
    #[error(
        "changes since {since:?} are unknown for disk {disk}: {reason}; the next backup must be full"
    )]
    TrackingLost {
        disk: String,
        since: String,
        reason: String,
    },
    #[error("offset {offset} length {len} is outside disk {disk} of {size} bytes")]
    OutOfRange {
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{0}")]
    Refused(String),
    /// A checkpoint's image read after the checkpoint was demoted or its backup committed.
    #[error("checkpoint {0:?} is closed: its copy-on-write data is gone")]
    CheckpointClosed(String),
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("reference point {0:?} has no backup data (it is not restorable)")]
    NotRestorable(String),
    #[error("verify found {0} damaged block(s) or file(s)")]
    VerifyFailed(u64),
    #[error("daemon: {0}")]
    Daemon(String),
    /// A request on a path in the mount that the filesystem refuses or cannot find.
    #[error("{path}: {kind}")]
    Fs { kind: FsKind, path: String },
    /// Mounting or unmounting failed; the text says why.
    #[error("{0}")]
    Mount(String),
}

/// Why the mounted filesystem refused a request; each maps to one errno in `Error::errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    NotFound,
    /// Point images and directories never change.
    ReadOnly,
    /// A live disk keeps its size: the tracker and the points depend on it.
    NoResize,
    /// Permissions and ownership come from the mount, not from requests.
    NotPermitted,
    IsDir,
    NotDir,
    BadHandle,
    /// SEEK_DATA past the last data, or any seek past the end.
    NoMoreData,
    BadWhence,
    NoAttr,
    /// An operation the mount does not offer (fallocate, copy_file_range): callers fall back.
    Unsupported,
    /// An open point image whose point is gone (a demoted checkpoint, a deleted point).
    Stale,
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsKind::NotFound => "no such file or directory",
            FsKind::ReadOnly => "read-only: points and the layout of the mount never change",
            FsKind::NoResize => "a live disk cannot be resized through the mount",
            FsKind::NotPermitted => "permissions and ownership are fixed by the mount",
            FsKind::IsDir => "is a directory",
            FsKind::NotDir => "not a directory",
            FsKind::BadHandle => "stale or unknown file handle",
            FsKind::NoMoreData => "no data at or after this offset",
            FsKind::BadWhence => "only SEEK_DATA and SEEK_HOLE reach the filesystem",
            FsKind::NoAttr => "no such attribute",
            FsKind::Unsupported => "not supported by the mount",
            FsKind::Stale => "the point this file was opened on is gone",
        })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an I/O error with the operation and path it came from.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// The one errno the FUSE adapter answers with.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Format { .. } | Error::TrackingLost { .. } => libc::EIO,
            Error::NoSuchRef(_) | Error::NoSuchDisk(_) | Error::NotRestorable(_) => libc::ENOENT,
            Error::Exists(_) => libc::EEXIST,
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::Locked(_) => libc::EBUSY,
            Error::Refused(_) => libc::EROFS,
            Error::CheckpointClosed(_) => libc::ESTALE,
            Error::Fs { kind, .. } => match kind {
                FsKind::NotFound => libc::ENOENT,
                FsKind::ReadOnly => libc::EROFS,
                FsKind::NoResize | FsKind::NotPermitted => libc::EPERM,
                FsKind::IsDir => libc::EISDIR,
                FsKind::NotDir => libc::ENOTDIR,
                FsKind::BadHandle => libc::EBADF,
                FsKind::NoMoreData => libc::ENXIO,
                FsKind::BadWhence => libc::EINVAL,
                FsKind::NoAttr => libc::ENODATA,
                FsKind::Unsupported => libc::EOPNOTSUPP,
                FsKind::Stale => libc::ESTALE,
            },
            _ => libc::EIO,
        }
    }
}
