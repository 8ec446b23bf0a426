//! The envelope every small store file is written in: an 8-byte magic, a major/minor version,
//! the payload length and two CRC-32C checksums (header and payload), then a JSON payload.
//! Readers reject a higher major version and accept a higher minor one.
//!
//! Layout (little-endian, 28 bytes):
//! `0 magic[8] | 8 major u16 | 10 minor u16 | 12 payload_len u32 | 16 payload_crc u32 |
//!  20 reserved u32 | 24 header_crc u32` then the payload.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub const ENVELOPE_LEN: usize = 28;
/// Payloads are small metadata; a larger length is damage, not data.
const MAX_PAYLOAD: u32 = 64 << 20;

/// Why bytes read from the store were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: {got} bytes, need {need}")]
    Truncated { got: usize, need: usize },
    #[error("bad magic {got:02x?}, expected {expected:?}")]
    BadMagic { got: Vec<u8>, expected: String },
    #[error("format version {major}.{minor} is newer than this vmref understands ({supported}.x)")]
    TooNew {
        major: u16,
        minor: u16,
        supported: u16,
    },
    #[error("bad {what} checksum: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("bad {what}: {why}")]
    Invalid { what: &'static str, why: String },
}

/// Magic values and versions of the envelope-framed files. Do not modify the magics.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub magic: &'static [u8; 8],
    pub major: u16,
    pub minor: u16,
}

/// What a store's metadata is read as. Major 2: the store's backup data may be a format 2
/// repository, which releases that understand only major 1 must not open. Major 3: the
/// repository is elsewhere (`repository`, an `s3://` location), and a release that knows only
/// major 2 would look for it under `STORE/repo`; only such stores are written at 3.0 (see
/// `STORE_META_LOCAL`). Major 4: that repository may be shared with other stores, whose
/// points only their published snapshots name; a release that knows only major 3 would
/// collect their blocks as garbage. Stores with a repository elsewhere are written at 4.0
/// (one written at 3.0 by an older release moves to 4.0 when it first publishes its points).
pub const STORE_META: Kind = Kind {
    magic: b"VMREFSTO",
    major: 4,
    minor: 0,
};
/// How the metadata of a store whose repository is `STORE/repo` is written: 2.0, as before
/// remote repositories existed, so that every format 2 release still opens it.
pub const STORE_META_LOCAL: Kind = Kind {
    major: 2,
    ..STORE_META
};
pub const DISK_RECORD: Kind = Kind {
    magic: b"VMREFDSK",
    major: 1,
    minor: 0,
};
pub const REF_RECORD: Kind = Kind {
    magic: b"VMREFREF",
    major: 1,
    minor: 0,
};

pub fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Frame `value` as JSON in an envelope of `kind`.
pub fn encode<T: Serialize>(kind: Kind, value: &T) -> Vec<u8> {
    let payload = serde_json::to_vec_pretty(value).expect("store records serialize");
    let mut out = Vec::with_capacity(ENVELOPE_LEN + payload.len());
    out.extend_from_slice(kind.magic);
    out.extend_from_slice(&kind.major.to_le_bytes());
    out.extend_from_slice(&kind.minor.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let hcrc = crc(&out[..24]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    debug_assert_eq!(out.len(), ENVELOPE_LEN);
    out.extend_from_slice(&payload);
    out
}

pub fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
pub fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
pub fn le_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Check magic and major version of a binary header.
pub fn check_magic(bytes: &[u8], magic: &[u8; 8], major: u16) -> Result<(), FormatError> {
    if bytes.len() < 12 {
        return Err(FormatError::Truncated {
            got: bytes.len(),
            need: 12,
        });
    }
    if &bytes[..8] != magic {
        return Err(FormatError::BadMagic {
            got: bytes[..8].to_vec(),
            expected: String::from_utf8_lossy(magic).into_owned(),
        });
    }
    let (maj, min) = (le_u16(bytes, 8), le_u16(bytes, 10));
    if maj > major {
        return Err(FormatError::TooNew {
            major: maj,
            minor: min,
            supported: major,
        });
    }
    Ok(())
}

/// Check a fixed header of at least `need` bytes: magic and major version (`check_magic`),
/// then the CRC-32C stored at `crc_at` over the bytes before it.
///
/// # Errors
/// Truncation, a foreign magic, a newer major version, a checksum mismatch.
pub fn check_header(
    b: &[u8],
    need: usize,
    magic: &[u8; 8],
    major: u16,
    crc_at: usize,
    what: &'static str,
) -> Result<(), FormatError> {
    if b.len() < need {
        return Err(FormatError::Truncated { got: b.len(), need });
    }
    check_magic(b, magic, major)?;
    check_crc(what, le_u32(b, crc_at), &b[..crc_at])
}

/// Compare a stored CRC-32C with that of `bytes`.
///
/// # Errors
/// `BadChecksum` naming `what`.
pub fn check_crc(what: &'static str, stored: u32, bytes: &[u8]) -> Result<(), FormatError> {
    let computed = crc(bytes);
    if stored != computed {
        return Err(FormatError::BadChecksum {
            what,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Verify and unframe an envelope of `kind`, then parse its JSON payload.
pub fn decode<T: DeserializeOwned>(kind: Kind, bytes: &[u8]) -> Result<T, FormatError> {
    if bytes.len() < ENVELOPE_LEN {
        return Err(FormatError::Truncated {
            got: bytes.len(),
            need: ENVELOPE_LEN,
        });
    }
    check_magic(bytes, kind.magic, kind.major)?;
    let stored = le_u32(bytes, 24);
    let computed = crc(&bytes[..24]);
    if stored != computed {
        return Err(FormatError::BadChecksum {
            what: "header",
            stored,
            computed,
        });
    }
    let len = le_u32(bytes, 12);
    if len > MAX_PAYLOAD {
        return Err(FormatError::Invalid {
            what: "payload length",
            why: format!("{len} bytes"),
        });
    }
    let need = ENVELOPE_LEN + len as usize;
    if bytes.len() < need {
        return Err(FormatError::Truncated {
            got: bytes.len(),
            need,
        });
    }
    let payload = &bytes[ENVELOPE_LEN..need];
    let (stored, computed) = (le_u32(bytes, 16), crc(payload));
    if stored != computed {
        return Err(FormatError::BadChecksum {
            what: "payload",
            stored,
            computed,
        });
    }
    serde_json::from_slice(payload).map_err(|e| FormatError::Invalid {
        what: "payload",
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        a: u64,
        b: String,
    }

    fn sample() -> Vec<u8> {
        encode(
            REF_RECORD,
            &Rec {
                a: 7,
                b: "x".into(),
            },
        )
    }

    #[test]
    fn round_trip() {
        let r: Rec = decode(REF_RECORD, &sample()).unwrap();
        assert_eq!(
            r,
            Rec {
                a: 7,
                b: "x".into()
            }
        );
    }

    #[test]
    fn wrong_kind_is_bad_magic() {
        let e = decode::<Rec>(DISK_RECORD, &sample()).unwrap_err();
        assert!(matches!(e, FormatError::BadMagic { .. }), "{e}");
    }

    #[test]
    fn every_truncation_is_refused() {
        let b = sample();
        for n in 0..b.len() {
            assert!(decode::<Rec>(REF_RECORD, &b[..n]).is_err(), "len {n}");
        }
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let b = sample();
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(decode::<Rec>(REF_RECORD, &c).is_err(), "bit {i}");
        }
    }

    #[test]
    fn newer_major_is_refused_newer_minor_accepted() {
        let mut b = sample();
        b[10] = 9; // minor
        let h = crc(&b[..24]);
        b[24..28].copy_from_slice(&h.to_le_bytes());
        assert!(decode::<Rec>(REF_RECORD, &b).is_ok());
        b[8] = 2; // major
        let h = crc(&b[..24]);
        b[24..28].copy_from_slice(&h.to_le_bytes());
        assert!(matches!(
            decode::<Rec>(REF_RECORD, &b),
            Err(FormatError::TooNew { .. })
        ));
    }
}
