//! The crate's error type: one enum whose variants name what failed, carrying the path or
//! name involved, turned into one friendly line at the CLI edge and into one errno at the
//! FUSE edge (`Error::errno`).
//!
//! The enum is also what crosses the control socket (`control`): it serializes as its
//! variant and fields, and the client rebuilds the same variant, so a command prints the same
//! line whether it ran in its own process or in the mounted daemon.

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::format::FormatError;

/// Everything the library can report.
#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        #[serde(deserialize_with = "wire::interned")]
        op: wire::Literal,
        path: PathBuf,
        #[source]
        #[serde(with = "wire::io_error")]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        #[serde(with = "wire::FormatErrorDef")]
        source: FormatError,
    },
    #[error("{0} is not a vmref store ({1}); create one with `vmref init`")]
    NotAStore(
        PathBuf,
        #[serde(deserialize_with = "wire::interned")] wire::Literal,
    ),
    #[error("{0} already holds a vmref store")]
    StoreExists(PathBuf),
    #[error("{0} is not empty; `vmref init` wants an empty or missing directory")]
    InitNotEmpty(PathBuf),
    #[error("store {0} is locked by another vmref process")]
    Locked(PathBuf),
    #[error("invalid name {name:?}: {why}")]
    BadName {
        name: String,
        #[serde(deserialize_with = "wire::interned")]
        why: wire::Literal,
    },
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
    #[error(
        "disk {0}: write refused: the store's filesystem is not at its path (unmounted?), so the write could not be tracked"
    )]
    StoreAway(String),
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
    /// `disk remove` of a disk an open checkpoint still reads.
    #[error("disk {disk} is in open checkpoint {point}; `vmref ref demote {point}` first")]
    DiskInCheckpoint { disk: String, point: String },
    /// `ref demote` of a point that is not an open checkpoint.
    #[error("reference point {0:?} is not a checkpoint")]
    NotACheckpoint(String),
    /// A checkpoint whose copy-on-write failed (no space, a failed read of the live disk):
    /// its image cannot be rebuilt any more, so reads fail instead of returning wrong bytes.
    #[error("checkpoint {point} of disk {disk} is broken: {why}")]
    CheckpointBroken {
        point: String,
        disk: String,
        why: String,
    },
    /// An image source returned fewer bytes than its size promised.
    #[error("short read of {what} at {offset}")]
    ShortRead { what: String, offset: u64 },
    /// A pack's slot numbers are `u32`.
    #[error("a pack holds at most 2^32 - 1 blocks")]
    PackFull,
    /// `restore --to` naming a registered live image.
    #[error("{} is the live image of disk {disk}; restore to another path", path.display())]
    RestoreOverLive { path: PathBuf, disk: String },
    /// Arguments that exclude each other or are out of range (the CLI catches most of these
    /// first; the library checks again for its other callers).
    #[error("{0}")]
    BadArgument(String),
    /// A caller broke a library contract (e.g. map changes out of order): a bug, not damage.
    #[error("internal error: {0}")]
    Internal(String),
    /// `status --check` found problems; the text lists them.
    #[error("check failed: {0}")]
    CheckFailed(String),
    /// A store in an older format, opened by a command that does not upgrade it.
    #[error("store {0} holds backup data in format 1; run `vmref upgrade` (or mount it) first")]
    NeedsUpgrade(PathBuf),
    /// The repository could not complete an operation for a reason other than one I/O call
    /// (packs of a backup that failed to write, a collection that raced a writer).
    #[error("repository: {0}")]
    Repo(String),
    /// A request to the object store holding the repository failed (after its retries), or
    /// the store cannot be reached as configured; the text names the repository, the
    /// request and the reason.
    #[error("object store {0}")]
    ObjectStore(String),
    /// A key file that is missing, unreadable, damaged or would be replaced. Never carries
    /// key material.
    #[error("key file {}: {why}", path.display())]
    KeyFile { path: PathBuf, why: String },
    /// An encrypted repository opened without a key, or with the wrong one: nothing was read
    /// or changed. The text says which key the repository wants (its public id).
    #[error("repository {repo} is encrypted: {why}")]
    Encrypted { repo: String, why: String },
    /// A checkpoint's image read after the checkpoint was demoted or its backup committed.
    #[error("checkpoint {0:?} is closed: its copy-on-write data is gone")]
    CheckpointClosed(String),
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("reference point {0:?} has no backup data (it is not restorable)")]
    NotRestorable(String),
    #[error("verify found {0} damaged block(s) or file(s)")]
    VerifyFailed(u64),
    /// The daemon's reply could not be understood (a garbled line, or a daemon from another
    /// vmref version); the text says what came back.
    /// A replication stream refused or damaged, or a replica that cannot be used; the text
    /// names the reason (and the ids or the record involved).
    #[error("{0}")]
    Replication(String),
    #[error("daemon: {0}")]
    Daemon(String),
    /// The daemon speaks another version of the control protocol.
    #[error(
        "the daemon speaks control protocol {daemon}, this vmref speaks {client}: unmount with the vmref that mounted it"
    )]
    Protocol { daemon: u32, client: u32 },
    /// A request on a path in the mount that the filesystem refuses or cannot find.
    #[error("{path}: {kind}")]
    Fs { kind: FsKind, path: String },
    /// Mounting or unmounting failed; the text says why.
    #[error("{0}")]
    Mount(String),
}

/// Why the mounted filesystem refused a request; each maps to one errno in `Error::errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
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

    /// The one errno the FUSE adapter answers with. Exhaustive on purpose: a new variant
    /// must choose its errno here.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            // Damaged or unreadable data: never wrong bytes, never a refusal.
            Error::Format { .. }
            | Error::TrackingLost { .. }
            | Error::CheckpointBroken { .. }
            | Error::ShortRead { .. } => libc::EIO,
            Error::NoSuchRef(_) | Error::NoSuchDisk(_) | Error::NotRestorable(_) => libc::ENOENT,
            Error::NotAStore(..) => libc::ENOENT,
            Error::Exists(_)
            | Error::StoreExists(_)
            | Error::RefExists(_)
            | Error::DiskExists(_) => libc::EEXIST,
            Error::InitNotEmpty(_) => libc::ENOTEMPTY,
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::BadName { .. }
            | Error::BadBlockSize(_)
            | Error::BadImage { .. }
            | Error::NotACheckpoint(_)
            | Error::BadArgument(_) => libc::EINVAL,
            Error::Locked(_) | Error::DiskInCheckpoint { .. } | Error::RestoreOverLive { .. } => {
                libc::EBUSY
            }
            Error::DiskUnavailable { .. } => libc::ENODEV,
            // No key, no data: like a permission the caller lacks.
            Error::KeyFile { .. } | Error::Encrypted { .. } => libc::EACCES,
            // A write through a removed disk's live file still open in the mount.
            Error::DiskRemoved(_) => libc::EIO,
            // Refused rather than accepted untracked (`engine::watch`).
            Error::StoreAway(_) => libc::EIO,
            Error::CheckpointClosed(_) => libc::ESTALE,
            Error::PackFull => libc::EFBIG,
            Error::VerifyFailed(_) => libc::EIO,
            Error::Replication(_) => libc::EINVAL,
            Error::Daemon(_) | Error::Protocol { .. } => libc::EPROTO,
            Error::Mount(_)
            | Error::Internal(_)
            | Error::Repo(_)
            | Error::ObjectStore(_)
            | Error::NeedsUpgrade(_)
            | Error::CheckFailed(_) => libc::EIO,
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
        }
    }
}

/// How the parts of `Error` that are not plain data cross the control socket.
mod wire {
    use std::collections::BTreeSet;
    use std::io;

    use parking_lot::Mutex;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::format::FormatError;

    /// A `&'static str` field, named through an alias: serde's derive borrows a field spelled
    /// `&str` from the input (which would tie every `Error` to `'static` input), while
    /// `interned` gives it an owned-input path.
    pub type Literal = &'static str;

    /// A `&'static str` field read back from the daemon. These fields hold literals from a
    /// small fixed set (operation names, what was checked), so each distinct text is leaked
    /// once and shared: a bounded few bytes, for the variant to come back exactly as it left.
    pub fn interned<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
        static SEEN: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
        let s = String::deserialize(d)?;
        let mut seen = SEEN.lock();
        if let Some(&t) = seen.get(s.as_str()) {
            return Ok(t);
        }
        let t: &'static str = Box::leak(s.into_boxed_str());
        seen.insert(t);
        Ok(t)
    }

    /// An `io::Error` as its errno when it has one (rebuilt exactly, text included), else
    /// its text.
    #[derive(Serialize, Deserialize)]
    struct IoWire {
        errno: Option<i32>,
        message: String,
    }

    pub mod io_error {
        use super::*;

        pub fn serialize<S: Serializer>(e: &io::Error, s: S) -> Result<S::Ok, S::Error> {
            IoWire {
                errno: e.raw_os_error(),
                message: e.to_string(),
            }
            .serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<io::Error, D::Error> {
            let w = IoWire::deserialize(d)?;
            Ok(match w.errno {
                Some(n) => io::Error::from_raw_os_error(n),
                None => io::Error::other(w.message),
            })
        }
    }

    /// `FormatError` field for field (serde's remote derive: `format` stays free of serde).
    #[derive(Serialize, Deserialize)]
    #[serde(remote = "FormatError", rename_all = "kebab-case")]
    pub enum FormatErrorDef {
        Truncated {
            got: usize,
            need: usize,
        },
        BadMagic {
            got: Vec<u8>,
            expected: String,
        },
        TooNew {
            major: u16,
            minor: u16,
            supported: u16,
        },
        BadChecksum {
            #[serde(deserialize_with = "interned")]
            what: Literal,
            stored: u32,
            computed: u32,
        },
        Invalid {
            #[serde(deserialize_with = "interned")]
            what: Literal,
            why: String,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of field survives the trip: the line printed is the same on both sides.
    #[test]
    fn errors_cross_the_wire_unchanged() {
        let cases = vec![
            Error::NoSuchRef("nosuch".into()),
            Error::io("read", "/x/y")(io::Error::from_raw_os_error(libc::ENOSPC)),
            Error::io("write", "stdout")(io::Error::other("custom text")),
            Error::Format {
                path: "/s/refs/a.ref".into(),
                source: FormatError::Invalid {
                    what: "block index",
                    why: "cannot read".into(),
                },
            },
            Error::NotAStore("/nowhere".into(), "no such directory"),
            Error::BadName {
                name: "a/b".into(),
                why: "has a slash",
            },
            Error::TrackingLost {
                disk: "d".into(),
                since: "r".into(),
                reason: "why".into(),
            },
            Error::Fs {
                kind: FsKind::ReadOnly,
                path: "/p".into(),
            },
            Error::DiskInCheckpoint {
                disk: "d".into(),
                point: "cp".into(),
            },
        ];
        for e in cases {
            let json = serde_json::to_string(&e).unwrap();
            let back: Error = serde_json::from_str(&json).unwrap();
            assert_eq!(back.to_string(), e.to_string(), "{json}");
            assert_eq!(back.errno(), e.errno(), "{json}");
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&e),
                "{json}"
            );
        }
    }
}
