//! Client-side encryption of repository objects: a repository on storage that someone else
//! runs must not reveal the disks.
//!
//! An encrypted repository seals every object but its `config` (packs with their tables,
//! index objects, and whatever else goes through its backend) with XChaCha20-Poly1305, in
//! chunks, so that the ranged reads of a block or an index bucket stay ranged reads:
//!
//! ```text
//! header  0 magic "VMREFSEO" | 8 major u16 (1) | 10 minor u16 (0) | 12 nonce prefix [19] |
//!         31 zero u8                                             (32 bytes)
//! chunks  n x (ciphertext of 16 KiB of the object | tag [16]); the last one holds the rest
//!         (0 to 16 KiB), so an empty object is one empty chunk: the header and a tag
//! ```
//!
//! Chunk `i`'s nonce is the header's random prefix, `i` as u32 and a byte that is 1 only for
//! the last chunk (the STREAM construction); its associated data is the 32 header bytes and
//! the object's name. So a chunk cannot be moved within an object or to another object, a
//! cut after any chunk is found (the new last chunk was sealed as not last), and the header
//! is authenticated with every chunk. The plaintext length follows from the sealed length
//! alone (`plain_len`), so `size` needs no read.
//!
//! The keys come from one 32-byte master key (the key file, `key.rs`) by BLAKE3's key
//! derivation: one for the cipher, one for blob ids (`BLAKE3` keyed mode, so that equal
//! blocks have equal ids under one key and unrelated ones under another), and a public key
//! id that names the key in messages. The `config` holds a value sealed under the key
//! (`key_check`), so a wrong key is refused at open, before anything is read.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::Arc;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::FormatError;
use crate::repo::Hash;
use crate::repo::backend::Backend;

/// Do not modify: identifies a sealed object.
pub const SEAL_MAGIC: &[u8; 8] = b"VMREFSEO";
pub const SEAL_MAJOR: u16 = 1;
pub const SEAL_MINOR: u16 = 0;
pub const SEAL_HEADER_LEN: usize = 32;
/// Plaintext bytes per chunk. Small enough that reading one 4 KiB block decrypts little
/// more than it needs; large enough that the tags cost 0.1%.
pub const CHUNK: usize = 16 << 10;
pub const TAG_LEN: usize = 16;
const SEALED_CHUNK: usize = CHUNK + TAG_LEN;
const PREFIX_LEN: usize = 19;
/// The only object an encrypted repository keeps in the clear: it says the repository is
/// encrypted, and holds the key check.
pub const CLEAR_OBJECT: &str = "config";
/// What the key check seals. Do not modify.
const KEY_CHECK_PLAIN: &[u8] = b"vmref repository key check v1";
/// Domain strings of the key derivation. Do not modify: they make the keys.
const CONTEXT_CIPHER: &str = "vmref 2026-12 repository object encryption";
const CONTEXT_IDS: &str = "vmref 2026-12 repository blob ids";
const CONTEXT_KEY_ID: &str = "vmref 2026-12 repository key id";

/// The keys of one encrypted repository, derived from its master key.
pub struct Keys {
    cipher: XChaCha20Poly1305,
    ids: [u8; 32],
    key_id: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material: only its public id.
        write!(f, "Keys(id {})", self.key_id)
    }
}

impl Keys {
    pub fn derive(master: &[u8; 32]) -> Keys {
        let c = blake3::derive_key(CONTEXT_CIPHER, master);
        let id = blake3::derive_key(CONTEXT_KEY_ID, master);
        Keys {
            cipher: XChaCha20Poly1305::new(&c.into()),
            ids: blake3::derive_key(CONTEXT_IDS, master),
            key_id: Hash(id).to_hex()[..32].to_string(),
        }
    }

    /// A public name of the key (a one-way function of it): says which key a repository
    /// wants without revealing it.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The id of a blob of these bytes in a repository under this key.
    pub fn id_of(&self, data: &[u8]) -> Hash {
        Hash(*blake3::keyed_hash(&self.ids, data).as_bytes())
    }

    /// A value only this key opens: random nonce | sealed known text | tag.
    ///
    /// # Errors
    /// The system's random source failed.
    pub fn key_check(&self) -> Result<Vec<u8>> {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(|e| Error::Internal(format!("random: {e}")))?;
        let mut buf = KEY_CHECK_PLAIN.to_vec();
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                CLEAR_OBJECT.as_bytes(),
                &mut buf,
            )
            .map_err(|_| Error::Internal("sealing the key check failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Whether `sealed` (from `key_check`) was made by this key.
    pub fn opens_key_check(&self, sealed: &[u8]) -> bool {
        if sealed.len() != 24 + KEY_CHECK_PLAIN.len() + TAG_LEN {
            return false;
        }
        let (nonce, rest) = sealed.split_at(24);
        let (ct, tag) = rest.split_at(KEY_CHECK_PLAIN.len());
        let mut buf = ct.to_vec();
        self.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                CLEAR_OBJECT.as_bytes(),
                &mut buf,
                Tag::from_slice(tag),
            )
            .is_ok()
            && buf == KEY_CHECK_PLAIN
    }

    fn nonce(prefix: &[u8], index: u32, last: bool) -> XNonce {
        let mut n = [0u8; 24];
        n[..PREFIX_LEN].copy_from_slice(prefix);
        n[PREFIX_LEN..PREFIX_LEN + 4].copy_from_slice(&index.to_le_bytes());
        n[23] = last as u8;
        n.into()
    }

    fn seal_chunk(&self, header: &[u8], name: &str, index: u32, last: bool, buf: &mut Vec<u8>) {
        let aad = [header, name.as_bytes()].concat();
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                &Keys::nonce(&header[12..12 + PREFIX_LEN], index, last),
                &aad,
                buf,
            )
            .expect("a chunk is far below the cipher's length limit");
        buf.extend_from_slice(&tag);
    }

    /// Open one sealed chunk in place: on success its first `len - TAG_LEN` bytes are the
    /// plaintext, whose length is returned (no copy: block reads open every chunk they touch).
    fn open_chunk(
        &self,
        header: &[u8],
        name: &str,
        index: u32,
        last: bool,
        sealed: &mut [u8],
    ) -> Result<usize, FormatError> {
        if sealed.len() < TAG_LEN {
            return Err(FormatError::Truncated {
                got: sealed.len(),
                need: TAG_LEN,
            });
        }
        let (ct, tag) = sealed.split_at_mut(sealed.len() - TAG_LEN);
        let aad = [header, name.as_bytes()].concat();
        self.cipher
            .decrypt_in_place_detached(
                &Keys::nonce(&header[12..12 + PREFIX_LEN], index, last),
                &aad,
                ct,
                Tag::from_slice(tag),
            )
            .map_err(|_| FormatError::Invalid {
                what: "sealed object",
                why: format!(
                    "chunk {index} fails authentication (damaged, cut, moved, or sealed by another key)"
                ),
            })?;
        Ok(ct.len())
    }
}

fn new_header() -> Result<[u8; SEAL_HEADER_LEN]> {
    let mut h = [0u8; SEAL_HEADER_LEN];
    h[..8].copy_from_slice(SEAL_MAGIC);
    h[8..10].copy_from_slice(&SEAL_MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&SEAL_MINOR.to_le_bytes());
    getrandom::fill(&mut h[12..12 + PREFIX_LEN])
        .map_err(|e| Error::Internal(format!("random: {e}")))?;
    Ok(h)
}

/// Check a sealed object's header (its authenticity is checked with each chunk).
///
/// # Errors
/// Truncation, a foreign magic, a newer major version, a reserved byte set.
pub fn check_header(h: &[u8]) -> Result<(), FormatError> {
    if h.len() < SEAL_HEADER_LEN {
        return Err(FormatError::Truncated {
            got: h.len(),
            need: SEAL_HEADER_LEN,
        });
    }
    crate::format::check_magic(h, SEAL_MAGIC, SEAL_MAJOR)?;
    // The reserved byte is authenticated with every chunk; a set one is a format we do not
    // know, whatever the minor version says.
    if h[31] != 0 {
        return Err(FormatError::Invalid {
            what: "sealed object header",
            why: "reserved byte set".into(),
        });
    }
    Ok(())
}

/// The plaintext length of a sealed object of `sealed` bytes.
///
/// # Errors
/// A length no sealed object has (cut inside a tag, or an empty chunk after others).
pub fn plain_len(sealed: u64) -> Result<u64, FormatError> {
    let min = (SEAL_HEADER_LEN + TAG_LEN) as u64;
    if sealed < min {
        return Err(FormatError::Truncated {
            got: sealed as usize,
            need: min as usize,
        });
    }
    let body = sealed - SEAL_HEADER_LEN as u64;
    let n = body.div_ceil(SEALED_CHUNK as u64);
    let rest = body - (n - 1) * SEALED_CHUNK as u64;
    if rest < TAG_LEN as u64 || (rest == TAG_LEN as u64 && n > 1) {
        return Err(FormatError::Invalid {
            what: "sealed object",
            why: format!("{sealed} bytes is not the length of a sealed object"),
        });
    }
    Ok(body - n * TAG_LEN as u64)
}

/// How many chunks an object of `plain` bytes is sealed in.
fn chunks_of(plain: u64) -> u64 {
    plain.div_ceil(CHUNK as u64).max(1)
}

/// Seal a whole object.
///
/// # Errors
/// The system's random source failed.
pub fn seal(keys: &Keys, name: &str, plain: &[u8]) -> Result<Vec<u8>> {
    let mut w = SealWriter::new(Vec::with_capacity(plain.len() + 64), keys, name)?;
    w.write_all(plain)
        .map_err(|e| Error::Internal(format!("sealing to memory: {e}")))?;
    w.finish_inner()
        .map_err(|e| Error::Internal(format!("sealing to memory: {e}")))
}

/// Open a whole sealed object: every chunk authenticated, the last one as last.
///
/// # Errors
/// Any damage, a cut, or another key: a `FormatError` naming the first bad chunk.
pub fn open(keys: &Keys, name: &str, sealed: &[u8]) -> Result<Vec<u8>, FormatError> {
    check_header(sealed)?;
    let plain = plain_len(sealed.len() as u64)?;
    let n = chunks_of(plain);
    let header = &sealed[..SEAL_HEADER_LEN];
    let mut body = sealed[SEAL_HEADER_LEN..].to_vec();
    for (i, c) in body.chunks_mut(SEALED_CHUNK).enumerate() {
        keys.open_chunk(header, name, i as u32, i as u64 + 1 == n, c)?;
    }
    // Close the gaps the tags leave, in place.
    let mut w = 0;
    for i in 0..n as usize {
        let start = i * SEALED_CHUNK;
        let len = (body.len() - start).min(SEALED_CHUNK) - TAG_LEN;
        body.copy_within(start..start + len, w);
        w += len;
    }
    body.truncate(w);
    debug_assert_eq!(w as u64, plain);
    Ok(body)
}

/// Seals an object as it is written: a chunk goes out once the next byte shows it is not the
/// last, and `finish` seals the last one.
pub struct SealWriter<'k, W: Write> {
    out: W,
    keys: &'k Keys,
    name: String,
    header: [u8; SEAL_HEADER_LEN],
    buf: Vec<u8>,
    index: u32,
}

impl<'k, W: Write> SealWriter<'k, W> {
    /// # Errors
    /// The random source failed.
    pub fn new(out: W, keys: &'k Keys, name: &str) -> Result<SealWriter<'k, W>> {
        Ok(SealWriter {
            out,
            keys,
            name: name.to_string(),
            header: new_header()?,
            buf: Vec::with_capacity(SEALED_CHUNK),
            index: 0,
        })
    }

    fn emit(&mut self, last: bool) -> io::Result<()> {
        if self.index == 0 {
            self.out.write_all(&self.header)?;
        }
        let mut chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(SEALED_CHUNK));
        self.keys
            .seal_chunk(&self.header, &self.name, self.index, last, &mut chunk);
        self.out.write_all(&chunk)?;
        self.index = self
            .index
            .checked_add(1)
            .ok_or_else(|| io::Error::other("object too large to seal"))?;
        Ok(())
    }

    fn finish_inner(mut self) -> io::Result<W> {
        self.emit(true)?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Seal the last chunk and flush.
    ///
    /// # Errors
    /// A write to the sink failed.
    pub fn finish(self) -> Result<()> {
        let name = self.name.clone();
        self.finish_inner()
            .map(|_| ())
            .map_err(Error::io("write", format!("repository object {name}")))
    }
}

impl<W: Write> Write for SealWriter<'_, W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            if self.buf.len() == CHUNK {
                self.emit(false)?;
            }
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Cached facts of one sealed object: names are never reused for other bytes, so they stay
/// true until the object is deleted (after which reads fail as missing anyway).
#[derive(Clone, Copy)]
struct Meta {
    header: [u8; SEAL_HEADER_LEN],
    sealed_len: u64,
}

/// How many objects' headers are remembered: one per pack of a busy mount; cleared whole
/// when full, which only costs a re-read.
const META_CACHE: usize = 8192;

/// A `Backend` that seals what it stores in another and opens what it reads: the repository
/// above it sees plaintext objects; the backend below holds only sealed ones (and `config`).
pub struct SealedBackend {
    inner: Arc<dyn Backend>,
    keys: Arc<Keys>,
    meta: Mutex<HashMap<String, Meta>>,
}

impl SealedBackend {
    pub fn new(inner: Arc<dyn Backend>, keys: Arc<Keys>) -> SealedBackend {
        SealedBackend {
            inner,
            keys,
            meta: Mutex::new(HashMap::new()),
        }
    }

    fn err(name: &str) -> impl Fn(FormatError) -> Error + '_ {
        move |source| Error::Format {
            path: format!("repository object {name}").into(),
            source,
        }
    }

    fn meta(&self, name: &str) -> Result<Meta> {
        if let Some(m) = self.meta.lock().get(name) {
            return Ok(*m);
        }
        let sealed_len = self.inner.size(name)?;
        let hb = self
            .inner
            .get_range(name, 0, SEAL_HEADER_LEN.min(sealed_len as usize))?;
        check_header(&hb).map_err(Self::err(name))?;
        let m = Meta {
            header: hb[..SEAL_HEADER_LEN].try_into().expect("checked length"),
            sealed_len,
        };
        let mut g = self.meta.lock();
        if g.len() >= META_CACHE {
            g.clear();
        }
        g.insert(name.to_string(), m);
        Ok(m)
    }
}

impl Backend for SealedBackend {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let b = self.inner.get(name)?;
        if name == CLEAR_OBJECT {
            return Ok(b);
        }
        open(&self.keys, name, &b).map_err(Self::err(name))
    }

    fn get_range(&self, name: &str, off: u64, len: usize) -> Result<Vec<u8>> {
        if name == CLEAR_OBJECT {
            return self.inner.get_range(name, off, len);
        }
        let m = self.meta(name)?;
        let plain = plain_len(m.sealed_len).map_err(Self::err(name))?;
        if off.checked_add(len as u64).is_none_or(|end| end > plain) {
            return Err(Self::err(name)(FormatError::Truncated {
                got: plain.saturating_sub(off) as usize,
                need: len,
            }));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let n = chunks_of(plain);
        let first = off / CHUNK as u64;
        let last = (off + len as u64 - 1) / CHUNK as u64;
        let c_off = SEAL_HEADER_LEN as u64 + first * SEALED_CHUNK as u64;
        let c_end = (SEAL_HEADER_LEN as u64 + (last + 1) * SEALED_CHUNK as u64).min(m.sealed_len);
        let mut sealed = self
            .inner
            .get_range(name, c_off, (c_end - c_off) as usize)?;
        let mut out = Vec::with_capacity(len);
        // Where the wanted bytes start in the first chunk; later chunks from their start.
        let mut skip = (off - first * CHUNK as u64) as usize;
        for (k, c) in sealed.chunks_mut(SEALED_CHUNK).enumerate() {
            let i = first + k as u64;
            let got = self
                .keys
                .open_chunk(&m.header, name, i as u32, i + 1 == n, c)
                .map_err(Self::err(name))?;
            let from = skip.min(got);
            let take = (got - from).min(len - out.len());
            out.extend_from_slice(&c[from..from + take]);
            skip = 0;
        }
        Ok(out)
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        if name == CLEAR_OBJECT {
            return self.inner.put_if_absent(name, bytes);
        }
        self.inner
            .put_if_absent(name, &seal(&self.keys, name, bytes)?)
    }

    fn put_stream(
        &self,
        name: &str,
        write: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
    ) -> Result<bool> {
        if name == CLEAR_OBJECT {
            return self.inner.put_stream(name, write);
        }
        let keys = self.keys.clone();
        self.inner.put_stream(name, &mut |sink| {
            let mut w = SealWriter::new(sink, &keys, name)?;
            write(&mut w)?;
            w.finish()
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }

    fn list_aged(&self, prefix: &str) -> Result<Vec<(String, std::time::Duration)>> {
        self.inner.list_aged(prefix)
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.meta.lock().remove(name);
        self.inner.delete(name)
    }

    fn size(&self, name: &str) -> Result<u64> {
        if name == CLEAR_OBJECT {
            return self.inner.size(name);
        }
        let m = self.meta(name)?;
        plain_len(m.sealed_len).map_err(Self::err(name))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    // The objects below a cache are sealed the same way: `verify` must open them too.
    fn uncached(&self) -> Option<Arc<dyn Backend>> {
        let inner = self.inner.uncached()?;
        Some(Arc::new(SealedBackend::new(inner, self.keys.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::backend::MemBackend;
    use crate::repo::test_bytes;

    fn keys(seed: u8) -> Keys {
        Keys::derive(&[seed; 32])
    }

    /// Lengths around every chunk boundary case: empty, short, one exact chunk, one byte
    /// over, several.
    const LENS: &[usize] = &[
        0,
        1,
        100,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        2 * CHUNK,
        3 * CHUNK + 7,
    ];

    #[test]
    fn round_trip_and_lengths() {
        let k = keys(1);
        for &n in LENS {
            let p = test_bytes(n as u64, n);
            let s = seal(&k, "packs/00/x", &p).unwrap();
            assert_eq!(plain_len(s.len() as u64).unwrap(), n as u64, "len {n}");
            assert_eq!(open(&k, "packs/00/x", &s).unwrap(), p, "len {n}");
            assert_eq!(
                s.len(),
                SEAL_HEADER_LEN + n + TAG_LEN * chunks_of(n as u64) as usize
            );
        }
    }

    #[test]
    fn every_bit_flip_and_truncation_is_refused() {
        let k = keys(2);
        for &n in &[0usize, 33, CHUNK + 5] {
            let p = test_bytes(7, n);
            let s = seal(&k, "index/1", &p).unwrap();
            for i in 0..s.len() * 8 {
                let mut c = s.clone();
                c[i / 8] ^= 1 << (i % 8);
                assert!(open(&k, "index/1", &c).is_err(), "len {n} bit {i}");
            }
            for cut in 0..s.len() {
                assert!(open(&k, "index/1", &s[..cut]).is_err(), "len {n} cut {cut}");
            }
        }
    }

    #[test]
    fn cut_at_a_chunk_boundary_is_refused() {
        // The dangerous cut: whole chunks remain, each authentic, but the new last one was
        // sealed as not last.
        let k = keys(3);
        let s = seal(&k, "n", &test_bytes(1, 3 * CHUNK)).unwrap();
        let cut = SEAL_HEADER_LEN + 2 * SEALED_CHUNK;
        assert!(plain_len(cut as u64).is_ok());
        assert!(open(&k, "n", &s[..cut]).is_err());
    }

    #[test]
    fn wrong_key_name_or_swapped_chunks_are_refused() {
        let (a, b) = (keys(4), keys(5));
        let p = test_bytes(3, 2 * CHUNK + 9);
        let s = seal(&a, "packs/aa/1", &p).unwrap();
        assert!(open(&b, "packs/aa/1", &s).is_err());
        assert!(open(&a, "packs/aa/2", &s).is_err());
        let mut sw = s.clone();
        let (c0, c1) = sw[SEAL_HEADER_LEN..].split_at_mut(SEALED_CHUNK);
        c0.swap_with_slice(&mut c1[..SEALED_CHUNK]);
        assert!(open(&a, "packs/aa/1", &sw).is_err());
        // Same bytes sealed twice differ (random nonce prefix).
        assert_ne!(seal(&a, "packs/aa/1", &p).unwrap(), s);
    }

    #[test]
    fn key_check_and_ids() {
        let (a, b) = (keys(6), keys(7));
        let c = a.key_check().unwrap();
        assert!(a.opens_key_check(&c));
        assert!(!b.opens_key_check(&c));
        for i in 0..c.len() * 8 {
            let mut d = c.clone();
            d[i / 8] ^= 1 << (i % 8);
            assert!(!a.opens_key_check(&d), "bit {i}");
        }
        assert!(!a.opens_key_check(&c[..c.len() - 1]));
        assert_eq!(a.id_of(b"x"), a.id_of(b"x"));
        assert_ne!(a.id_of(b"x"), b.id_of(b"x"));
        assert_ne!(a.id_of(b"x"), Hash::of(b"x"));
        assert_ne!(a.key_id(), b.key_id());
        assert!(!format!("{a:?}").contains(&Hash(a.ids).to_hex()));
    }

    #[test]
    fn sealed_backend_ranges_match_the_plaintext() {
        let inner = Arc::new(MemBackend::new());
        let sb = SealedBackend::new(inner.clone(), Arc::new(keys(8)));
        let p = test_bytes(9, 3 * CHUNK + 100);
        assert!(sb.put_if_absent("packs/01/a", &p).unwrap());
        assert_eq!(sb.size("packs/01/a").unwrap(), p.len() as u64);
        assert_eq!(sb.get("packs/01/a").unwrap(), p);
        for (off, len) in [
            (0, 0),
            (0, 1),
            (5, CHUNK),
            (CHUNK - 1, 2),
            (CHUNK, CHUNK),
            (3 * CHUNK, 100),
            (0, p.len()),
        ] {
            assert_eq!(
                sb.get_range("packs/01/a", off as u64, len).unwrap(),
                &p[off..off + len]
            );
        }
        assert!(sb.get_range("packs/01/a", p.len() as u64 - 1, 2).is_err());
        // Streamed objects read the same.
        assert!(
            sb.put_stream("index/2", &mut |w| {
                for c in p.chunks(1000) {
                    w.write_all(c).unwrap();
                }
                Ok(())
            })
            .unwrap()
        );
        assert_eq!(sb.get("index/2").unwrap(), p);
        // Below, nothing of the plaintext; the config stays clear.
        let raw = inner.get("packs/01/a").unwrap();
        assert!(!raw.windows(64).any(|w| w == &p[1000..1064]));
        sb.put_if_absent("config", b"clear").unwrap();
        assert_eq!(inner.get("config").unwrap(), b"clear");
        // A damaged chunk fails the ranged read that covers it, not the others.
        inner.flip("packs/01/a", SEAL_HEADER_LEN + SEALED_CHUNK + 3, 1);
        let sb = SealedBackend::new(inner.clone(), Arc::new(keys(8)));
        assert!(sb.get_range("packs/01/a", CHUNK as u64, 10).is_err());
        assert_eq!(sb.get_range("packs/01/a", 0, 10).unwrap(), &p[..10]);
        assert!(sb.get("packs/01/a").is_err());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release --lib seal::speed -- --ignored --nocapture`: seal and open rates.
    #[test]
    #[ignore]
    fn throughput() {
        let k = Keys::derive(&[1; 32]);
        let p = crate::repo::test_bytes(1, 64 << 20);
        let t = std::time::Instant::now();
        let s = seal(&k, "packs/00/x", &p).unwrap();
        let ts = t.elapsed();
        let t = std::time::Instant::now();
        let o = open(&k, "packs/00/x", &s).unwrap();
        let to = t.elapsed();
        assert_eq!(o, p);
        let t = std::time::Instant::now();
        let h = Hash::of(&p);
        let th = t.elapsed();
        let mb = 64.0;
        // BLAKE3 of the same bytes on one thread, as a yardstick on a loaded machine.
        eprintln!(
            "seal {:.0} MB/s, open {:.0} MB/s, blake3 {:.0} MB/s ({})",
            mb / ts.as_secs_f64(),
            mb / to.as_secs_f64(),
            mb / th.as_secs_f64(),
            &h.to_hex()[..4]
        );
    }
}
