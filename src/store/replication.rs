//! What replication keeps in a receiving store (envelope-framed JSON, replaced atomically):
//!
//! ```text
//! STORE/receive.partial          a receive cut short: what arrived, where to resume
//! STORE/replicas/DISK.replica    a replica image kept at the newest received point
//! ```
//! Both live in the store layer because garbage collection (the maps a partial receive built
//! are not a point's yet) and point deletion (a replica's point must stay) read them.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::records::read_record;
use super::{Store, atomic, mkdir_private};
use crate::error::{Error, Result};
use crate::format::{self, Kind};

/// Do not modify the magics.
pub const PARTIAL_RECEIVE: Kind = Kind {
    magic: b"VMREFPRV",
    major: 1,
    minor: 0,
};
pub const REPLICA_RECORD: Kind = Kind {
    magic: b"VMREFRPL",
    major: 1,
    minor: 0,
};

/// One disk of a partial receive: its map as far as it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialDisk {
    pub name: String,
    pub size: u64,
    /// Hex root of the map built so far (all of it when `done`).
    pub root: String,
    pub data_blocks: u64,
    pub done: bool,
}

/// A receive that stopped before its end record: the blocks and map nodes it stored are
/// durable, and this says what they make and where the stream must resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialReceive {
    /// The stream's header as JSON (the stream module's type; the store does not read it).
    pub header: String,
    pub point_name: String,
    pub point_id: String,
    pub source_store: String,
    pub base_id: Option<String>,
    /// Resume at this disk index and block.
    pub next_disk: u32,
    pub next_block: u64,
    pub disks: Vec<PartialDisk>,
    /// Records and bytes received so far, over every attempt.
    pub received_bytes: u64,
    pub updated_unix: u64,
}

/// A file's identity as a replica record keeps it: a change of any field means the image
/// was touched since vmref last wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    /// # Errors
    /// `stat` failures.
    pub fn of(path: &Path) -> Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).map_err(Error::io("stat", path))?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        })
    }
}

/// A replica image of one disk, kept at a received point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub disk: String,
    pub image: PathBuf,
    /// The point the image holds exactly.
    pub point: String,
    pub point_id: String,
    /// The image's identity right after vmref last wrote it.
    pub stamp: FileStamp,
    /// An apply to this point began and has not finished: the image is between `point` and
    /// it, and the next `receive` (or `receive --abort`) finishes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applying: Option<Applying>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applying {
    pub point: String,
    pub point_id: String,
}

impl Store {
    pub fn partial_receive_path(&self) -> PathBuf {
        self.root().join("receive.partial")
    }

    fn replicas_dir(&self) -> PathBuf {
        self.root().join("replicas")
    }

    pub fn replica_path(&self, disk: &str) -> PathBuf {
        self.replicas_dir().join(format!("{disk}.replica"))
    }

    /// # Errors
    /// A damaged file; I/O failures.
    pub fn partial_receive(&self) -> Result<Option<PartialReceive>> {
        read_record(PARTIAL_RECEIVE, &self.partial_receive_path())
    }

    /// # Errors
    /// I/O failures.
    pub fn write_partial_receive(&self, p: &PartialReceive) -> Result<()> {
        atomic::write_atomic(
            &self.partial_receive_path(),
            &format::encode(PARTIAL_RECEIVE, p),
        )
    }

    /// # Errors
    /// I/O failures.
    pub fn remove_partial_receive(&self) -> Result<()> {
        let p = self.partial_receive_path();
        if p.exists() {
            atomic::remove_durable(&p)?;
        }
        Ok(())
    }

    /// # Errors
    /// A damaged record; I/O failures.
    pub fn replica(&self, disk: &str) -> Result<Option<ReplicaRecord>> {
        crate::names::validate(disk)?;
        read_record(REPLICA_RECORD, &self.replica_path(disk))
    }

    /// Every replica record.
    ///
    /// # Errors
    /// A damaged record; I/O failures.
    pub fn replicas(&self) -> Result<Vec<ReplicaRecord>> {
        let dir = self.replicas_dir();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read directory", &dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(Error::io("read directory", &dir))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".replica")
                && !n.starts_with('.')
                && let Some(r) = read_record(REPLICA_RECORD, &dir.join(&n))?
            {
                out.push(r);
            }
        }
        out.sort_by(|a: &ReplicaRecord, b| a.disk.cmp(&b.disk));
        Ok(out)
    }

    /// # Errors
    /// I/O failures.
    pub fn write_replica(&self, r: &ReplicaRecord) -> Result<()> {
        mkdir_private(&self.replicas_dir())?;
        atomic::write_atomic(
            &self.replica_path(&r.disk),
            &format::encode(REPLICA_RECORD, r),
        )
    }

    /// # Errors
    /// I/O failures.
    pub fn remove_replica(&self, disk: &str) -> Result<()> {
        let p = self.replica_path(disk);
        if p.exists() {
            atomic::remove_durable(&p)?;
        }
        Ok(())
    }

    /// Points that replication still needs: each replica's point (and the one it is being
    /// applied to). Deleting one would leave the replica without a base for its next apply.
    ///
    /// # Errors
    /// As `replicas`.
    pub fn replica_points(&self) -> Result<Vec<(String, String)>> {
        let mut v = Vec::new();
        for r in self.replicas()? {
            v.push((r.point.clone(), r.disk.clone()));
            if let Some(a) = r.applying {
                v.push((a.point, r.disk.clone()));
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::init(&d.path().join("s"), 65536).unwrap();
        assert!(s.partial_receive().unwrap().is_none());
        assert!(s.replicas().unwrap().is_empty());
        let p = PartialReceive {
            header: "{}".into(),
            point_name: "p".into(),
            point_id: "i".into(),
            source_store: "s".into(),
            base_id: None,
            next_disk: 0,
            next_block: 7,
            disks: vec![],
            received_bytes: 9,
            updated_unix: 1,
        };
        s.write_partial_receive(&p).unwrap();
        assert_eq!(s.partial_receive().unwrap(), Some(p));
        s.remove_partial_receive().unwrap();
        assert!(s.partial_receive().unwrap().is_none());
        let img = d.path().join("img");
        fs::write(&img, b"x").unwrap();
        let r = ReplicaRecord {
            disk: "disk0".into(),
            image: img.clone(),
            point: "p".into(),
            point_id: "i".into(),
            stamp: FileStamp::of(&img).unwrap(),
            applying: Some(Applying {
                point: "q".into(),
                point_id: "j".into(),
            }),
        };
        s.write_replica(&r).unwrap();
        assert_eq!(s.replicas().unwrap(), vec![r.clone()]);
        assert_eq!(s.replica("disk0").unwrap(), Some(r));
        assert_eq!(s.replica_points().unwrap().len(), 2);
        s.remove_replica("disk0").unwrap();
        assert!(s.replicas().unwrap().is_empty());
    }
}
