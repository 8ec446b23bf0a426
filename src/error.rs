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
    #[error("daemon: {0}")]
    Daemon(String),
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
            Error::NoSuchRef(_) | Error::NoSuchDisk(_) => libc::ENOENT,
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::Locked(_) => libc::EBUSY,
            Error::Refused(_) => libc::EROFS,
            _ => libc::EIO,
        }
    }
}
