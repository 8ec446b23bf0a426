//! Compression of stored blobs: a per-repository setting (`none` or `zstd:<level>`) and a
//! per-blob codec recorded beside each blob. A blob is stored raw whenever compression does
//! not make it smaller, so the codec of a blob is not always the repository's setting.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

/// The repository's compression setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd { level: i32 },
}

/// Until the benchmark decides: level 3, zstd's own default.
pub const DEFAULT_COMPRESSION: Compression = Compression::Zstd { level: 3 };

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Compression, String> {
        if s == "none" {
            return Ok(Compression::None);
        }
        if s == "zstd" {
            return Ok(DEFAULT_COMPRESSION);
        }
        let level = s
            .strip_prefix("zstd:")
            .and_then(|l| l.parse::<i32>().ok())
            .filter(|l| (1..=19).contains(l))
            .ok_or_else(|| format!("compression {s:?}: want none, zstd or zstd:1 to zstd:19"))?;
        Ok(Compression::Zstd { level })
    }
}

/// How one stored blob is encoded. Codes are on disk: do not renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Zstd,
}

impl Codec {
    pub fn code(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        }
    }
    pub fn from_code(c: u8) -> Option<Codec> {
        match c {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

thread_local! {
    /// One compression context per thread and level: making a zstd context per 64 KiB block
    /// costs more than compressing it at level 1.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Encode `data` under `setting`: compressed if that makes it smaller, else raw.
pub fn compress(setting: Compression, data: &[u8]) -> (Codec, Vec<u8>) {
    let Compression::Zstd { level } = setting else {
        return (Codec::Raw, data.to_vec());
    };
    let packed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
        }
        let (_, z) = c.as_mut()?;
        z.compress(data).ok()
    });
    match packed {
        Some(p) if p.len() < data.len() => (Codec::Zstd, p),
        _ => (Codec::Raw, data.to_vec()),
    }
}

/// Decode stored bytes back to the `raw_len` bytes they were made from.
///
/// # Errors
/// Undecodable bytes or a length other than `raw_len`, as text for the caller's damage error.
pub fn decompress(codec: Codec, stored: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    let out = match codec {
        Codec::Raw => stored.to_vec(),
        Codec::Zstd => DECOMPRESSOR.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
            }
            let d = d.as_mut().expect("made above");
            // The capacity bounds the output: damaged input cannot make us allocate more.
            d.decompress(stored, raw_len)
                .map_err(|e| format!("zstd: {e}"))
        })?,
    };
    if out.len() != raw_len {
        return Err(format!(
            "decoded to {} bytes, expected {raw_len}",
            out.len()
        ));
    }
    Ok(out)
}

/// `decompress` into `out`, which must be exactly the blob's raw length: a reader that decodes
/// many blocks writes each where it belongs instead of allocating it. On error `out` holds
/// garbage and must not be used.
///
/// # Errors
/// As `decompress`.
pub fn decompress_into(codec: Codec, stored: &[u8], out: &mut [u8]) -> Result<(), String> {
    let n = match codec {
        Codec::Raw if stored.len() == out.len() => {
            out.copy_from_slice(stored);
            out.len()
        }
        Codec::Raw => stored.len(),
        Codec::Zstd => DECOMPRESSOR.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
            }
            let d = d.as_mut().expect("made above");
            // Bounded by `out`: damaged input cannot write past it.
            d.decompress_to_buffer(stored, out)
                .map_err(|e| format!("zstd: {e}"))
        })?,
    };
    if n != out.len() {
        return Err(format!("decoded to {n} bytes, expected {}", out.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text-like bytes: words from a small vocabulary, as files and logs on a disk are.
    fn text_like(seed: u64, len: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "the", "disk", "block", "vmref", "point", "backup", "kernel", "module", "error",
            "return", "value", "struct", "function", "0x7f3a", "include", "static", "int", "char",
            "while", "for", "if", "else", "{", "}", ";", "\n", "    ", "=", "==",
        ];
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
            out.push(b' ');
        }
        out.truncate(len);
        out
    }

    use crate::repo::test_bytes as random;

    #[test]
    fn settings_parse_and_print() {
        for s in ["none", "zstd:1", "zstd:3", "zstd:19"] {
            assert_eq!(s.parse::<Compression>().unwrap().to_string(), s);
        }
        assert_eq!("zstd".parse::<Compression>().unwrap(), DEFAULT_COMPRESSION);
        for s in ["", "gzip", "zstd:0", "zstd:20", "zstd:x"] {
            assert!(s.parse::<Compression>().is_err(), "{s}");
        }
    }

    #[test]
    fn round_trip_and_raw_when_not_smaller() {
        let text = text_like(1, 65536);
        let (c, s) = compress(Compression::Zstd { level: 3 }, &text);
        assert_eq!(c, Codec::Zstd);
        assert!(s.len() < text.len() / 2);
        assert_eq!(decompress(c, &s, text.len()).unwrap(), text);
        let rnd = random(2, 65536);
        let (c, s) = compress(Compression::Zstd { level: 1 }, &rnd);
        assert_eq!((c, &s), (Codec::Raw, &rnd));
        let (c, s) = compress(Compression::None, &text);
        assert_eq!((c, &s), (Codec::Raw, &text));
        assert_eq!(decompress(Codec::Raw, &s, s.len()).unwrap(), text);
    }

    #[test]
    fn damaged_compressed_bytes_are_errors() {
        let text = text_like(3, 8192);
        let (_, s) = compress(Compression::Zstd { level: 1 }, &text);
        assert!(decompress(Codec::Zstd, &s, text.len() - 1).is_err());
        assert!(decompress(Codec::Zstd, &s[..s.len() - 1], text.len()).is_err());
        assert!(decompress(Codec::Raw, &s, s.len() + 1).is_err());
        for i in 0..s.len() {
            let mut d = s.clone();
            d[i] ^= 0x5a;
            // Never a panic; either an error or (rarely) other bytes, which the hash catches.
            let _ = decompress(Codec::Zstd, &d, text.len());
        }
    }

    #[test]
    fn decompress_into_fills_exactly_or_fails() {
        let text = text_like(4, 65536);
        let (c, s) = compress(Compression::Zstd { level: 3 }, &text);
        let mut out = vec![0u8; text.len()];
        decompress_into(c, &s, &mut out).unwrap();
        assert_eq!(out, text);
        decompress_into(Codec::Raw, &text, &mut out).unwrap();
        assert_eq!(out, text);
        // Too small, too large, or cut short: an error, never a partial fill taken as whole.
        assert!(decompress_into(c, &s, &mut vec![0u8; text.len() - 1]).is_err());
        assert!(decompress_into(c, &s, &mut vec![0u8; text.len() + 1]).is_err());
        assert!(decompress_into(c, &s[..s.len() - 1], &mut out).is_err());
        assert!(decompress_into(Codec::Raw, &text[1..], &mut out).is_err());
    }

    /// Compression speed on 64 KiB blocks: `cargo test --release --lib
    /// repo::compress::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        let blocks: usize = 512; // 32 MiB per case
        // Real files of this machine, as a disk holds them (programs and libraries).
        let mut files = Vec::new();
        for dir in ["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share/doc"] {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if files.len() >= blocks * 65536 {
                    break;
                }
                if let Ok(b) = std::fs::read(e.path()) {
                    files.extend_from_slice(&b);
                }
            }
        }
        files.resize(blocks * 65536, 0);
        for (what, data) in [
            (
                "files",
                files.chunks(65536).map(<[u8]>::to_vec).collect::<Vec<_>>(),
            ),
            (
                "text-like",
                (0..blocks)
                    .map(|i| text_like(i as u64, 65536))
                    .collect::<Vec<_>>(),
            ),
            (
                "random",
                (0..blocks)
                    .map(|i| random(i as u64, 65536))
                    .collect::<Vec<_>>(),
            ),
        ] {
            for level in [1, 3] {
                let t = std::time::Instant::now();
                let packed: Vec<_> = data
                    .iter()
                    .map(|b| compress(Compression::Zstd { level }, b))
                    .collect();
                let ct = t.elapsed().as_secs_f64();
                let stored: usize = packed.iter().map(|(_, s)| s.len()).sum();
                let t = std::time::Instant::now();
                for (c, s) in &packed {
                    decompress(*c, s, 65536).unwrap();
                }
                let dt = t.elapsed().as_secs_f64();
                let mb = (blocks * 65536) as f64 / 1e6;
                println!(
                    "{what:9} zstd:{level}: compress {:7.0} MB/s, decompress {:7.0} MB/s, ratio {:.3}",
                    mb / ct,
                    mb / dt,
                    stored as f64 / (blocks * 65536) as f64
                );
            }
        }
    }
}
