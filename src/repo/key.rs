//! The key file of an encrypted repository: 32 random bytes, the master key every other key
//! is derived from (`seal::Keys`). Kept beside the store (`STORE/repo.key`, mode 0600,
//! written beside and renamed into place), never in the repository and never printed: the
//! repository holds only a key check and the key's public id.
//!
//! Format: an envelope file (`format.rs`, magic "VMREFKEY", 1.0) with JSON payload `version`
//! (1), `key` (64 hex digits), `key_id` (the public id, so that a person can tell key files
//! apart without opening a repository) and `created_unix`.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, FormatError, Kind};
use crate::repo::Hash;
use crate::repo::seal::Keys;

/// Do not modify the magic.
pub const KEY_FILE: Kind = Kind {
    magic: b"VMREFKEY",
    major: 1,
    minor: 0,
};
/// The key file's name in the store directory.
pub const KEY_FILE_NAME: &str = "repo.key";

#[derive(Serialize, Deserialize)]
struct KeyRecord {
    version: u16,
    key: String,
    key_id: String,
    created_unix: u64,
}

/// A repository's master key. `Debug` shows only its public id.
pub struct RepoKey {
    master: [u8; 32],
    keys: Arc<Keys>,
}

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoKey(id {})", self.keys.key_id())
    }
}

impl RepoKey {
    pub fn from_bytes(master: [u8; 32]) -> RepoKey {
        RepoKey {
            keys: Arc::new(Keys::derive(&master)),
            master,
        }
    }

    /// A new random key.
    ///
    /// # Errors
    /// The system's random source failed.
    pub fn generate() -> Result<RepoKey> {
        let mut m = [0u8; 32];
        getrandom::fill(&mut m).map_err(|e| Error::Internal(format!("random: {e}")))?;
        Ok(RepoKey::from_bytes(m))
    }

    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }

    pub fn key_id(&self) -> &str {
        self.keys.key_id()
    }

    /// Read a key file.
    ///
    /// # Errors
    /// `KeyFile` for a missing, unreadable or damaged file.
    pub fn load(path: &Path) -> Result<RepoKey> {
        let bad = |why: String| Error::KeyFile {
            path: path.to_path_buf(),
            why,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        // Never the bytes or checksums a decoding error would show: in a key file (or a raw
        // key given by mistake) they are key material.
        let rec: KeyRecord = format::decode(KEY_FILE, &bytes).map_err(|e| {
            bad(match e {
                FormatError::BadMagic { .. } => "not a vmref key file".into(),
                FormatError::BadChecksum { .. } => "damaged (checksum mismatch)".into(),
                FormatError::Truncated { .. } => "damaged (too short)".into(),
                FormatError::Invalid { .. } => "damaged (does not parse)".into(),
                other => other.to_string(),
            })
        })?;
        let key = Hash::parse(&rec.key)
            .filter(|h| !h.is_zero())
            .ok_or_else(|| bad("not a key file (its key is not 64 hex digits)".into()))?;
        let k = RepoKey::from_bytes(key.0);
        if rec.key_id != k.key_id() {
            return Err(bad("damaged (its key does not match its key id)".into()));
        }
        Ok(k)
    }

    /// Write this key to a new file `path`, 0600, durably (temp file, fsync, hard link, fsync of
    /// the directory). Never replaces an existing file: a key file may be the only copy.
    ///
    /// # Errors
    /// `KeyFile` when `path` exists; I/O failures.
    pub fn save(&self, path: &Path) -> Result<()> {
        if path.exists() {
            return Err(Error::KeyFile {
                path: path.to_path_buf(),
                why: "exists already; not replacing a key file".into(),
            });
        }
        let rec = KeyRecord {
            version: KEY_FILE.major,
            key: Hash(self.master).to_hex(),
            key_id: self.key_id().to_string(),
            created_unix: crate::store::now_unix(),
        };
        // Linked into place, not renamed: a file made at `path` since the check above is
        // kept, never replaced.
        let tmp = crate::store::atomic::TempFile::new(path)?;
        tmp.write_all(&format::encode(KEY_FILE, &rec))?;
        tmp.commit_new()
    }
}

/// The key file of the store at `root`, if it has one.
///
/// # Errors
/// A key file that is there but does not read.
pub fn store_key(root: &Path) -> Result<Option<RepoKey>> {
    let p = root.join(KEY_FILE_NAME);
    match std::fs::symlink_metadata(&p) {
        Ok(_) => RepoKey::load(&p).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::KeyFile {
            path: p,
            why: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn key_file_round_trip_private_and_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(KEY_FILE_NAME);
        let k = RepoKey::generate().unwrap();
        k.save(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let l = RepoKey::load(&p).unwrap();
        assert_eq!(l.key_id(), k.key_id());
        assert_eq!(l.master, k.master);
        assert!(RepoKey::generate().unwrap().save(&p).is_err());
        assert_eq!(RepoKey::load(&p).unwrap().master, k.master);
        assert!(!format!("{k:?}").contains(&Hash(k.master).to_hex()));
        assert_eq!(store_key(d.path()).unwrap().unwrap().key_id(), k.key_id());
        assert!(store_key(&d.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn damaged_key_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        RepoKey::generate().unwrap().save(&p).unwrap();
        let good = std::fs::read(&p).unwrap();
        for i in (0..good.len()).step_by(7) {
            let mut b = good.clone();
            b[i] ^= 0x20;
            std::fs::write(&p, &b).unwrap();
            assert!(RepoKey::load(&p).is_err(), "byte {i}");
        }
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert!(RepoKey::load(&p).is_err());
        // A raw key given by mistake: refused without showing any of its bytes.
        let raw: Vec<u8> = (0u8..32)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        std::fs::write(&p, &raw).unwrap();
        let e = RepoKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("not a vmref key file"), "{e}");
        for w in raw.windows(2) {
            assert!(!e.contains(&format!("{:02x}, {:02x}", w[0], w[1])), "{e}");
        }
        assert!(RepoKey::load(&d.path().join("missing")).is_err());
    }
}
