//! Disk records and reference point records: small envelope-framed JSON files, one per disk
//! and one per point, each replaced atomically. A point exists once its file is renamed in.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Store, atomic};
use crate::error::{Error, Result};
use crate::format::{self, Kind};

/// A registered disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub name: String,
    /// Absolute path of the live raw image.
    pub image: PathBuf,
    pub added_unix: u64,
}

/// What a reference point is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefState {
    /// Metadata only: sequence numbers, no data.
    Plain,
    /// An open checkpoint: the daemon keeps copy-on-write data so its image stays readable.
    Checkpoint,
    /// Backup data exists: its image can be synthesized.
    Restorable,
}

/// One disk's entry in a reference point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefDisk {
    /// The disk's sequence number when the point was created: blocks stamped higher changed since.
    pub seq: u32,
    /// The disk's size in bytes at that moment.
    pub size: u64,
    /// A restorable point's map of this disk in the store's repository (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<PointMap>,
}

/// Where a restorable point's image of one disk is: the root of its block map in the
/// repository. Kept as text so records stay independent of the repository's types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMap {
    /// BLAKE3 hash of the map's root node, 64 hex digits (all zeros: every block a hole).
    pub root: String,
    /// Blocks that hold data (not holes): the image's allocated size.
    pub data_blocks: u64,
}

/// Whether a backup copied every block or only those changed since a base point. Serialized
/// as the words "full" and "incremental" (the text records and `--json` always had).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Incremental,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
        }
    }
}

impl std::fmt::Display for BackupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with the word it serializes as (`kind == "full"`).
impl PartialEq<&str> for BackupKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What a backup stored for a point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub kind: BackupKind,
    /// Name of the point an incremental was taken since.
    pub since: Option<String>,
    /// Blocks and bytes this backup copied into the store.
    pub stored_blocks: u64,
    pub stored_bytes: u64,
    pub finished_unix: u64,
}

/// A reference point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefRecord {
    pub name: String,
    pub id: String,
    /// Strictly increasing across the store: orders points even within one second.
    pub serial: u64,
    pub created_unix: u64,
    pub owner: Option<String>,
    pub state: RefState,
    pub disks: BTreeMap<String, RefDisk>,
    pub backup: Option<BackupInfo>,
    /// Id of the store a received point came from (`vmref receive`); none for points made here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// An envelope record, or none when the file is missing; damage is `Error::Format`.
pub(super) fn read_record<T: serde::de::DeserializeOwned>(
    kind: Kind,
    path: &Path,
) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => format::decode(kind, &b)
            .map(Some)
            .map_err(|source| Error::Format {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path)(e)),
    }
}

fn list_names(dir: &Path, ext: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(Error::io("read directory", dir))? {
        let e = e.map_err(Error::io("read directory", dir))?;
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with('.') {
            continue;
        }
        if let Some(stem) = n.strip_suffix(ext) {
            out.push(stem.to_string());
        }
    }
    out.sort();
    Ok(out)
}

impl Store {
    pub fn disk_names(&self) -> Result<Vec<String>> {
        list_names(&self.root.join("disks"), ".disk")
    }

    pub fn read_disk(&self, name: &str) -> Result<DiskRecord> {
        read_record(format::DISK_RECORD, &self.disk_record_path(name))?
            .ok_or_else(|| Error::NoSuchDisk(name.to_string()))
    }

    pub fn disks(&self) -> Result<Vec<DiskRecord>> {
        self.disk_names()?
            .iter()
            .map(|n| self.read_disk(n))
            .collect()
    }

    pub fn write_disk(&self, rec: &DiskRecord) -> Result<()> {
        atomic::write_atomic(
            &self.disk_record_path(&rec.name),
            &format::encode(format::DISK_RECORD, rec),
        )
    }

    pub fn remove_disk_record(&self, name: &str) -> Result<()> {
        atomic::remove_durable(&self.disk_record_path(name))
    }

    pub fn read_ref(&self, name: &str) -> Result<RefRecord> {
        crate::names::validate(name)?;
        read_record(format::REF_RECORD, &self.ref_path(name))?
            .ok_or_else(|| Error::NoSuchRef(name.to_string()))
    }

    pub fn ref_exists(&self, name: &str) -> bool {
        self.ref_path(name).exists()
    }

    /// Every point, oldest first.
    pub fn refs(&self) -> Result<Vec<RefRecord>> {
        let mut v: Vec<RefRecord> = list_names(&self.refs_dir(), ".ref")?
            .iter()
            .filter_map(|n| match self.read_ref(n) {
                // Deleted between listing and reading: it is simply gone.
                Err(Error::NoSuchRef(_)) => None,
                r => Some(r),
            })
            .collect::<Result<_>>()?;
        v.sort_by_key(|r| r.serial);
        Ok(v)
    }

    /// The serial for a new point: one above every point's. One scan of the records finds the
    /// highest; after it this process keeps it (store lock: no other writes records), so
    /// making a point costs the same beside ten points or ten thousand. A serial handed out
    /// for a point that then fails is simply skipped.
    pub fn next_serial(&self) -> Result<u64> {
        let mut hi = self.serial.lock();
        let top = match *hi {
            Some(s) => s,
            None => self.refs()?.iter().map(|r| r.serial).max().unwrap_or(0),
        };
        *hi = Some(top + 1);
        Ok(top + 1)
    }

    /// Keep `next_serial` above a record written with a serial it did not hand out.
    fn note_serial(&self, serial: u64) {
        if let Some(hi) = self.serial.lock().as_mut() {
            *hi = (*hi).max(serial);
        }
    }

    pub fn write_ref(&self, rec: &RefRecord) -> Result<()> {
        self.note_serial(rec.serial);
        atomic::write_atomic(
            &self.ref_path(&rec.name),
            &format::encode(format::REF_RECORD, rec),
        )
    }

    /// A point's record written and synced under a temp name, for a caller that overlaps this
    /// sync with the others a new point needs; `commit` on the result publishes it. Dropped
    /// uncommitted, it leaves nothing.
    pub fn stage_ref(&self, rec: &RefRecord) -> Result<atomic::TempFile> {
        self.note_serial(rec.serial);
        let mut tmp = atomic::TempFile::new(&self.ref_path(&rec.name))?;
        tmp.write_all(&format::encode(format::REF_RECORD, rec))?;
        tmp.sync()?;
        Ok(tmp)
    }

    pub fn remove_ref_record(&self, name: &str) -> Result<()> {
        atomic::remove_durable(&self.ref_path(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::init(&d.path().join("s"), 65536).unwrap();
        (d, s)
    }

    #[test]
    fn ref_round_trip_and_order() {
        let (_d, s) = store();
        for (i, n) in ["b", "a", "c"].iter().enumerate() {
            let mut disks = BTreeMap::new();
            disks.insert(
                "disk0".into(),
                RefDisk {
                    seq: i as u32 + 1,
                    size: 1 << 20,
                    map: None,
                },
            );
            s.write_ref(&RefRecord {
                name: n.to_string(),
                id: crate::store::random_id().unwrap(),
                serial: i as u64 + 1,
                created_unix: 5,
                owner: Some("veeam".into()),
                state: RefState::Plain,
                disks,
                backup: None,
                origin: None,
            })
            .unwrap();
        }
        let names: Vec<_> = s.refs().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["b", "a", "c"]);
        assert_eq!(s.read_ref("a").unwrap().disks["disk0"].seq, 2);
        s.remove_ref_record("a").unwrap();
        assert!(matches!(s.read_ref("a"), Err(Error::NoSuchRef(_))));
    }

    /// A point's staged record is no point until committed, and leaves nothing when dropped:
    /// the engine stages it beside the tracker's flush and publishes it only after.
    #[test]
    fn a_staged_ref_exists_only_once_committed() {
        let (_d, s) = store();
        let rec = |name: &str| RefRecord {
            name: name.to_string(),
            id: crate::store::random_id().unwrap(),
            serial: 1,
            created_unix: 5,
            owner: None,
            state: RefState::Plain,
            disks: BTreeMap::new(),
            backup: None,
            origin: None,
        };
        let dropped = s.stage_ref(&rec("gone")).unwrap();
        assert!(dropped.path().exists());
        assert!(s.refs().unwrap().is_empty());
        drop(dropped);
        let kept = s.stage_ref(&rec("kept")).unwrap();
        assert!(matches!(s.read_ref("kept"), Err(Error::NoSuchRef(_))));
        kept.commit().unwrap();
        let names: Vec<_> = s.refs().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["kept"]);
        let left: Vec<_> = fs::read_dir(s.ref_path("kept").parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("kept.ref")]);
    }

    /// Serials stay above every point's once remembered: records written with serials handed
    /// out elsewhere (a received or upgraded point) move the remembered one, and a store
    /// opened again scans for it.
    #[test]
    fn next_serial_stays_above_every_point() {
        let (d, s) = store();
        let rec = |name: &str, serial: u64| RefRecord {
            name: name.to_string(),
            id: crate::store::random_id().unwrap(),
            serial,
            created_unix: 5,
            owner: None,
            state: RefState::Plain,
            disks: BTreeMap::new(),
            backup: None,
            origin: None,
        };
        s.write_ref(&rec("old", 4)).unwrap();
        assert_eq!(s.next_serial().unwrap(), 5);
        assert_eq!(s.clone().next_serial().unwrap(), 6, "clones share it");
        s.write_ref(&rec("received", 9)).unwrap();
        assert_eq!(s.next_serial().unwrap(), 10);
        s.stage_ref(&rec("staged", 12)).unwrap().commit().unwrap();
        assert_eq!(s.next_serial().unwrap(), 13);
        let again = Store::open(&d.path().join("s")).unwrap();
        assert_eq!(again.next_serial().unwrap(), 13);
    }

    #[test]
    fn damaged_ref_is_a_format_error() {
        let (_d, s) = store();
        fs::write(s.ref_path("x"), b"VMREFREF garbage").unwrap();
        assert!(matches!(s.read_ref("x"), Err(Error::Format { .. })));
    }
}
