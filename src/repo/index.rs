//! The on-disk index: from blob hash to where the blob is stored (pack, offset, lengths,
//! kind, codec, CRC). Index objects are immutable, each sorted by hash; a repository holds
//! several and consults them newest first (names sort by a sequence number).
//!
//! Layout of an index object (little-endian):
//! ```text
//! header  0 magic "VMREFIX2" | 8 major u16 | 10 minor u16 | 12 header_crc u32 (of 0..12)
//! entries count x 64 bytes, strictly ascending by hash:
//!         0 hash[32] | 32 pack number u32 | 36 kind u8 | 37 codec u8 | 38 zero u16 |
//!         40 offset u64 | 48 stored_len u32 | 52 raw_len u32 | 56 blob crc32c u32 |
//!         60 entry_crc u32 (of 0..60)
//! packs   pack_count x 16-byte pack ids (the pack numbers of the entries)
//! fanout  2^bits x u32: fanout[b] = entries whose hash's first `bits` bits are <= b
//! footer  0 count u64 | 8 pack_count u32 | 12 bits u8 | 13 zero[3] | 16 stored bytes u64 |
//!         24 raw bytes u64 | 32 magic "VMREFIXT" | 40 tail_crc u32 (of packs, fanout and
//!         footer 0..40)
//! ```
//! The entries come first so that an index is written in one streaming pass (merge and
//! garbage collection never hold all entries). Opening an index reads its footer and tail
//! (pack table and fanout: memory per pack and per bucket, about one u32 per 16 blobs);
//! a lookup reads one bucket with one ranged get, and each entry carries its own checksum so
//! a bucket is trusted without reading the rest.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io::Write;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::{FormatError, check_magic, crc, le_u16, le_u32, le_u64};
use crate::repo::backend::Backend;
use crate::repo::compress::Codec;
use crate::repo::pack::{MAX_BLOB, PackEntry, PackId};
use crate::repo::{BlobKind, Hash};

/// Do not modify: identifies index objects.
pub const INDEX_MAGIC: &[u8; 8] = b"VMREFIX2";
/// Do not modify: ends every index object.
pub const INDEX_TRAILER_MAGIC: &[u8; 8] = b"VMREFIXT";
pub const INDEX_MAJOR: u16 = 2;
pub const INDEX_MINOR: u16 = 0;
const HEADER_LEN: u64 = 16;
const ENTRY_LEN: usize = 64;
const FOOTER_LEN: usize = 44;
/// The fanout grows with the index up to 2^18 buckets (1 MiB in memory per opened index).
const MAX_BITS: u8 = 18;
/// Aim for buckets of about this many entries (one lookup reads ~1 KiB).
const BUCKET_TARGET: u64 = 16;
/// Entries read at a time when an index is streamed (merge, GC).
const STREAM_CHUNK: u64 = 1024;
/// Buckets kept by a set's lookup cache.
const CACHED_BUCKETS: usize = 4096;

/// Where one blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub pack: PackId,
    pub entry: PackEntry,
}

impl IndexEntry {
    pub fn hash(&self) -> &Hash {
        &self.entry.hash
    }
}

fn invalid(what: &'static str, why: String) -> FormatError {
    FormatError::Invalid { what, why }
}

fn fmt_err(name: &str, source: FormatError) -> Error {
    Error::Format {
        path: format!("repository object {name}").into(),
        source,
    }
}

/// The bucket of `h` in a fanout of 2^bits buckets: its first `bits` bits.
fn bucket_of(h: &Hash, bits: u8) -> usize {
    let top = u32::from_be_bytes([h.0[0], h.0[1], h.0[2], h.0[3]]);
    if bits == 0 {
        0
    } else {
        (top >> (32 - bits as u32)) as usize
    }
}

/// Sums kept in an index's footer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSummary {
    pub count: u64,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
}

/// Writes one index object in a single pass; entries must come in strictly ascending hash
/// order.
pub struct IndexWriter<'a> {
    out: &'a mut dyn Write,
    packs: Vec<PackId>,
    pack_no: HashMap<PackId, u32>,
    /// Entries per bucket at the finest fanout; coarsened at `finish`.
    fine: Vec<u32>,
    last: Option<Hash>,
    sum: IndexSummary,
}

impl<'a> IndexWriter<'a> {
    /// # Errors
    /// Failure to write the header.
    pub fn new(out: &'a mut dyn Write) -> Result<IndexWriter<'a>> {
        let mut h = Vec::with_capacity(HEADER_LEN as usize);
        h.extend_from_slice(INDEX_MAGIC);
        h.extend_from_slice(&INDEX_MAJOR.to_le_bytes());
        h.extend_from_slice(&INDEX_MINOR.to_le_bytes());
        let c = crc(&h);
        h.extend_from_slice(&c.to_le_bytes());
        out.write_all(&h).map_err(Error::io("write", "index"))?;
        Ok(IndexWriter {
            out,
            packs: Vec::new(),
            pack_no: HashMap::new(),
            fine: Vec::new(),
            last: None,
            sum: IndexSummary::default(),
        })
    }

    /// Append one entry.
    ///
    /// # Errors
    /// A write failure; an entry out of order is a bug and refused.
    pub fn push(&mut self, e: &IndexEntry) -> Result<()> {
        if self.last.is_some_and(|l| l >= e.entry.hash) {
            return Err(Error::Internal(format!(
                "index entries out of order at {}",
                e.entry.hash
            )));
        }
        self.last = Some(e.entry.hash);
        let n = self.packs.len() as u32;
        let no = *self.pack_no.entry(e.pack).or_insert_with(|| {
            self.packs.push(e.pack);
            n
        });
        if self.fine.is_empty() {
            self.fine = vec![0; 1 << MAX_BITS];
        }
        self.fine[bucket_of(&e.entry.hash, MAX_BITS)] += 1;
        self.sum.count += 1;
        self.sum.stored_bytes += e.entry.stored_len as u64;
        self.sum.raw_bytes += e.entry.raw_len as u64;
        let mut b = [0u8; ENTRY_LEN];
        b[..32].copy_from_slice(&e.entry.hash.0);
        b[32..36].copy_from_slice(&no.to_le_bytes());
        b[36] = e.entry.kind.code();
        b[37] = e.entry.codec.code();
        b[40..48].copy_from_slice(&e.entry.offset.to_le_bytes());
        b[48..52].copy_from_slice(&e.entry.stored_len.to_le_bytes());
        b[52..56].copy_from_slice(&e.entry.raw_len.to_le_bytes());
        b[56..60].copy_from_slice(&e.entry.crc.to_le_bytes());
        let c = crc(&b[..60]);
        b[60..].copy_from_slice(&c.to_le_bytes());
        self.out.write_all(&b).map_err(Error::io("write", "index"))
    }

    /// Write the pack table, fanout and footer.
    ///
    /// # Errors
    /// A write failure.
    pub fn finish(self) -> Result<IndexSummary> {
        let mut bits = 0u8;
        while bits < MAX_BITS && (self.sum.count >> bits) > BUCKET_TARGET {
            bits += 1;
        }
        let mut tail = Vec::with_capacity(self.packs.len() * 16 + (4 << bits) + FOOTER_LEN);
        for p in &self.packs {
            tail.extend_from_slice(&p.0);
        }
        let mut cum = 0u32;
        let per = 1usize << (MAX_BITS - bits);
        for b in 0..1usize << bits {
            if !self.fine.is_empty() {
                cum += self.fine[b * per..(b + 1) * per].iter().sum::<u32>();
            }
            tail.extend_from_slice(&cum.to_le_bytes());
        }
        tail.extend_from_slice(&self.sum.count.to_le_bytes());
        tail.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        tail.push(bits);
        tail.extend_from_slice(&[0; 3]);
        tail.extend_from_slice(&self.sum.stored_bytes.to_le_bytes());
        tail.extend_from_slice(&self.sum.raw_bytes.to_le_bytes());
        tail.extend_from_slice(INDEX_TRAILER_MAGIC);
        let c = crc(&tail);
        tail.extend_from_slice(&c.to_le_bytes());
        self.out
            .write_all(&tail)
            .map_err(Error::io("write", "index"))?;
        Ok(self.sum)
    }
}

static NEXT_UID: AtomicU64 = AtomicU64::new(0);

/// An opened index object: its pack table and fanout in memory, entries read on demand.
#[derive(Debug)]
pub struct IndexFile {
    pub name: String,
    /// Distinguishes opened indexes in caches.
    uid: u64,
    bits: u8,
    packs: Vec<PackId>,
    fanout: Vec<u32>,
    pub summary: IndexSummary,
    /// Bytes of the object.
    pub size: u64,
}

impl IndexFile {
    /// Open index object `name`: read and check its header, footer and tail.
    ///
    /// # Errors
    /// A missing or damaged object.
    pub fn open(backend: &dyn Backend, name: &str) -> Result<IndexFile> {
        let size = backend.size(name)?;
        let head_len = HEADER_LEN as usize;
        if size < (head_len + FOOTER_LEN) as u64 {
            return Err(fmt_err(
                name,
                FormatError::Truncated {
                    got: size as usize,
                    need: head_len + FOOTER_LEN,
                },
            ));
        }
        let head = backend.get_range(name, 0, head_len)?;
        check_magic(&head, INDEX_MAGIC, INDEX_MAJOR).map_err(|e| fmt_err(name, e))?;
        if le_u32(&head, 12) != crc(&head[..12]) {
            return Err(fmt_err(
                name,
                FormatError::BadChecksum {
                    what: "index header",
                    stored: le_u32(&head, 12),
                    computed: crc(&head[..12]),
                },
            ));
        }
        let f = backend.get_range(name, size - FOOTER_LEN as u64, FOOTER_LEN)?;
        if &f[32..40] != INDEX_TRAILER_MAGIC {
            return Err(fmt_err(
                name,
                FormatError::BadMagic {
                    got: f[32..40].to_vec(),
                    expected: String::from_utf8_lossy(INDEX_TRAILER_MAGIC).into_owned(),
                },
            ));
        }
        let (count, npacks, bits) = (le_u64(&f, 0), le_u32(&f, 8) as u64, f[12]);
        if bits > MAX_BITS || count > u32::MAX as u64 || f[13..16] != [0; 3] {
            return Err(fmt_err(
                name,
                invalid(
                    "index footer",
                    format!("{bits} fanout bits, {count} entries"),
                ),
            ));
        }
        let tail_len = npacks * 16 + (4u64 << bits);
        let need = HEADER_LEN
            .checked_add(count * ENTRY_LEN as u64)
            .and_then(|n| n.checked_add(tail_len))
            .and_then(|n| n.checked_add(FOOTER_LEN as u64));
        if need != Some(size) {
            return Err(fmt_err(
                name,
                invalid(
                    "index footer",
                    format!("{count} entries and {npacks} packs do not make {size} bytes"),
                ),
            ));
        }
        let tail_off = size - FOOTER_LEN as u64 - tail_len;
        let tail = backend.get_range(name, tail_off, tail_len as usize)?;
        let computed = crc32c::crc32c_append(crc32c::crc32c(&tail), &f[..40]);
        if computed != le_u32(&f, 40) {
            return Err(fmt_err(
                name,
                FormatError::BadChecksum {
                    what: "index tail",
                    stored: le_u32(&f, 40),
                    computed,
                },
            ));
        }
        let packs: Vec<PackId> = tail[..npacks as usize * 16]
            .chunks_exact(16)
            .map(|c| PackId(c.try_into().expect("16 bytes")))
            .collect();
        let fanout: Vec<u32> = tail[npacks as usize * 16..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if fanout.windows(2).any(|w| w[0] > w[1]) || *fanout.last().unwrap_or(&0) as u64 != count {
            return Err(fmt_err(
                name,
                invalid("index fanout", "not ascending to the count".into()),
            ));
        }
        Ok(IndexFile {
            name: name.to_string(),
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            bits,
            packs,
            fanout,
            summary: IndexSummary {
                count,
                stored_bytes: le_u64(&f, 16),
                raw_bytes: le_u64(&f, 24),
            },
            size,
        })
    }

    pub fn count(&self) -> u64 {
        self.summary.count
    }

    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    fn decode_entry(&self, b: &[u8], ordinal: u64) -> Result<IndexEntry> {
        let bad = |why: String| fmt_err(&self.name, invalid("index entry", why));
        let (stored, computed) = (le_u32(b, 60), crc(&b[..60]));
        if stored != computed {
            return Err(fmt_err(
                &self.name,
                FormatError::BadChecksum {
                    what: "index entry",
                    stored,
                    computed,
                },
            ));
        }
        let pack = *self
            .packs
            .get(le_u32(b, 32) as usize)
            .ok_or_else(|| bad(format!("entry {ordinal}: pack number {}", le_u32(b, 32))))?;
        let kind = BlobKind::from_code(b[36]).ok_or_else(|| bad(format!("kind {}", b[36])))?;
        let codec = Codec::from_code(b[37]).ok_or_else(|| bad(format!("codec {}", b[37])))?;
        let entry = PackEntry {
            hash: Hash(b[..32].try_into().expect("32 bytes")),
            kind,
            codec,
            offset: le_u64(b, 40),
            stored_len: le_u32(b, 48),
            raw_len: le_u32(b, 52),
            crc: le_u32(b, 56),
        };
        if le_u16(b, 38) != 0 || entry.stored_len > MAX_BLOB || entry.raw_len > MAX_BLOB {
            return Err(bad(format!(
                "entry {ordinal}: bad lengths or reserved bytes"
            )));
        }
        Ok(IndexEntry { pack, entry })
    }

    /// Entries `start..start + n`, checked (each entry's checksum, strictly ascending).
    ///
    /// # Errors
    /// A damaged or unreadable object.
    pub fn read_entries(
        &self,
        backend: &dyn Backend,
        start: u64,
        n: u64,
    ) -> Result<Vec<IndexEntry>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let b = backend.get_range(
            &self.name,
            HEADER_LEN + start * ENTRY_LEN as u64,
            (n as usize) * ENTRY_LEN,
        )?;
        let mut out: Vec<IndexEntry> = Vec::with_capacity(n as usize);
        for (i, c) in b.chunks_exact(ENTRY_LEN).enumerate() {
            let e = self.decode_entry(c, start + i as u64)?;
            if out.last().is_some_and(|l| l.entry.hash >= e.entry.hash) {
                return Err(fmt_err(
                    &self.name,
                    invalid(
                        "index",
                        format!("entries out of order at {}", start + i as u64),
                    ),
                ));
            }
            out.push(e);
        }
        Ok(out)
    }

    /// The ordinals of bucket `b`.
    fn bucket_range(&self, b: usize) -> (u64, u64) {
        let end = self.fanout[b] as u64;
        let start = if b == 0 { 0 } else { self.fanout[b - 1] as u64 };
        (start, end)
    }

    /// Read and check bucket `b`: its entries must fall in it.
    fn read_bucket(&self, backend: &dyn Backend, b: usize) -> Result<Arc<Vec<IndexEntry>>> {
        let (start, end) = self.bucket_range(b);
        let es = self.read_entries(backend, start, end - start)?;
        if let Some(e) = es.iter().find(|e| bucket_of(&e.entry.hash, self.bits) != b) {
            return Err(fmt_err(
                &self.name,
                invalid("index", format!("{} is not in bucket {b}", e.entry.hash)),
            ));
        }
        Ok(Arc::new(es))
    }

    /// Check the whole object (every entry, order across buckets), streaming.
    ///
    /// # Errors
    /// Any damage.
    pub fn verify(&self, backend: &dyn Backend) -> Result<()> {
        for b in 0..self.fanout.len() {
            self.read_bucket(backend, b)?;
        }
        Ok(())
    }
}

/// A position found by a lookup: which index of the set, which entry in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub file: usize,
    pub ordinal: u64,
    pub entry: IndexEntry,
}

/// Buckets by (index uid, bucket number).
type BucketCache = LruCache<(u64, usize), Arc<Vec<IndexEntry>>>;

/// The index objects of a repository, newest first, with a bounded cache of buckets.
pub struct IndexSet {
    files: Vec<Arc<IndexFile>>,
    /// Recently read buckets by (index uid, bucket). A plain mutex: it is held only to look
    /// up or insert, never during the read of a bucket.
    /// Shared with the sets made from this one by `with_files`.
    cache: Arc<Mutex<BucketCache>>,
}

impl IndexSet {
    /// The set of the given opened indexes, newest first.
    pub fn new(files: Vec<Arc<IndexFile>>) -> IndexSet {
        IndexSet {
            files,
            cache: Arc::new(Mutex::new(LruCache::new(
                NonZeroUsize::new(CACHED_BUCKETS).unwrap(),
            ))),
        }
    }

    /// Another set of indexes (newest first) sharing this one's bucket cache.
    pub fn with_files(&self, files: Vec<Arc<IndexFile>>) -> IndexSet {
        IndexSet {
            files,
            cache: self.cache.clone(),
        }
    }

    /// Open every `index/` object of the backend, newest (highest name) first.
    ///
    /// # Errors
    /// A damaged index object; I/O failures.
    pub fn load(backend: &dyn Backend) -> Result<IndexSet> {
        let mut tries = 0;
        loop {
            let mut names = backend.list(INDEX_PREFIX)?;
            names.reverse();
            match names
                .iter()
                .map(|n| IndexFile::open(backend, n).map(Arc::new))
                .collect::<Result<Vec<_>>>()
            {
                Ok(files) => return Ok(IndexSet::new(files)),
                // Deleted between the listing and the open by a collection that merged it
                // into a newer index: list again.
                Err(e) if crate::repo::backend::is_missing(&e) && tries < 3 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn files(&self) -> &[Arc<IndexFile>] {
        &self.files
    }

    /// Find `h` in the newest index that holds it.
    ///
    /// # Errors
    /// A damaged bucket; I/O failures.
    pub fn lookup(&self, backend: &dyn Backend, h: &Hash) -> Result<Option<Found>> {
        for (i, f) in self.files.iter().enumerate() {
            let b = bucket_of(h, f.bits);
            let (start, end) = f.bucket_range(b);
            if start == end {
                continue;
            }
            let key = (f.uid, b);
            let cached = self.cache.lock().get(&key).cloned();
            let bucket = match cached {
                Some(x) => x,
                None => {
                    let x = f.read_bucket(backend, b)?;
                    self.cache.lock().put(key, x.clone());
                    x
                }
            };
            if let Ok(k) = bucket.binary_search_by(|e| e.entry.hash.cmp(h)) {
                return Ok(Some(Found {
                    file: i,
                    ordinal: start + k as u64,
                    entry: bucket[k],
                }));
            }
        }
        Ok(None)
    }

    /// Every entry of every index in hash order; for a hash held by several indexes, once per
    /// index, newest first. Bounded memory: a chunk of entries per index.
    pub fn stream<'a>(&'a self, backend: &'a dyn Backend) -> MergeStream<'a> {
        MergeStream::new(backend, &self.files)
    }
}

/// Names of index objects: `index/<sequence, 16 hex digits>-<random>`; a higher sequence is
/// newer.
pub const INDEX_PREFIX: &str = "index/";

/// # Errors
/// The system's random source failed.
pub fn index_name(seq: u64) -> Result<String> {
    Ok(format!(
        "{INDEX_PREFIX}{seq:016x}-{}",
        crate::store::random_id()?
    ))
}

/// The sequence number of an index name.
pub fn index_seq(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(INDEX_PREFIX)?;
    u64::from_str_radix(rest.get(..16)?, 16).ok()
}

/// One entry of a merge: from which index (0 = newest) and where in it.
#[derive(Debug, Clone, Copy)]
pub struct Streamed {
    pub file: usize,
    pub ordinal: u64,
    pub entry: IndexEntry,
}

struct Cursor {
    next: u64,
    buf: std::vec::IntoIter<IndexEntry>,
    buf_start: u64,
    consumed: u64,
}

/// K-way merge of the entries of several indexes, in (hash, newest first) order.
pub struct MergeStream<'a> {
    backend: &'a dyn Backend,
    files: &'a [Arc<IndexFile>],
    cursors: Vec<Cursor>,
    heap: BinaryHeap<Reverse<(Hash, usize, u64)>>,
    heads: Vec<Option<IndexEntry>>,
    started: bool,
}

impl<'a> MergeStream<'a> {
    fn new(backend: &'a dyn Backend, files: &'a [Arc<IndexFile>]) -> MergeStream<'a> {
        MergeStream {
            backend,
            files,
            cursors: files
                .iter()
                .map(|_| Cursor {
                    next: 0,
                    buf: Vec::new().into_iter(),
                    buf_start: 0,
                    consumed: 0,
                })
                .collect(),
            heap: BinaryHeap::new(),
            heads: vec![None; files.len()],
            started: false,
        }
    }

    /// Advance index `i` and put its next entry on the heap.
    fn advance(&mut self, i: usize) -> Result<()> {
        let files = self.files;
        let f = &files[i];
        let c = &mut self.cursors[i];
        let e = match c.buf.next() {
            Some(e) => Some(e),
            None if c.next < f.count() => {
                let n = STREAM_CHUNK.min(f.count() - c.next);
                let es = f.read_entries(self.backend, c.next, n)?;
                c.buf_start = c.next;
                c.consumed = 0;
                c.next += n;
                c.buf = es.into_iter();
                c.buf.next()
            }
            None => None,
        };
        if let Some(e) = e {
            let ord = c.buf_start + c.consumed;
            c.consumed += 1;
            if let Some(prev) = self.heads[i]
                && prev.entry.hash >= e.entry.hash
            {
                return Err(fmt_err(
                    &f.name,
                    invalid("index", format!("entries out of order at {ord}")),
                ));
            }
            self.heads[i] = Some(e);
            self.heap.push(Reverse((e.entry.hash, i, ord)));
        }
        Ok(())
    }

    /// The next entry, or None at the end.
    ///
    /// # Errors
    /// Damage found while reading an index.
    pub fn next_entry(&mut self) -> Result<Option<Streamed>> {
        if !self.started {
            self.started = true;
            for i in 0..self.files.len() {
                self.advance(i)?;
            }
        }
        let Some(Reverse((_, i, ordinal))) = self.heap.pop() else {
            return Ok(None);
        };
        let entry = self.heads[i].expect("a heap item has a head");
        self.advance(i)?;
        Ok(Some(Streamed {
            file: i,
            ordinal,
            entry,
        }))
    }
}

/// Write one index object `name` holding, for every hash in `set`, its newest entry whose pack
/// is not in `dead`. Streaming: memory holds a chunk per input index, not the entries.
///
/// # Errors
/// Damage in an input; I/O failures (then no object `name` exists).
pub fn merge(
    backend: &dyn Backend,
    set: &IndexSet,
    dead: &HashSet<PackId>,
    name: &str,
) -> Result<IndexSummary> {
    let mut sum = IndexSummary::default();
    backend.put_stream(name, &mut |out| {
        let mut w = IndexWriter::new(out)?;
        let mut s = set.stream(backend);
        let mut last: Option<Hash> = None;
        while let Some(x) = s.next_entry()? {
            if dead.contains(&x.entry.pack) || last == Some(x.entry.entry.hash) {
                continue;
            }
            last = Some(x.entry.entry.hash);
            w.push(&x.entry)?;
        }
        sum = w.finish()?;
        Ok(())
    })?;
    Ok(sum)
}

/// Encode entries (any order; duplicates keep the first) as one index object in memory.
pub fn encode(entries: &[IndexEntry]) -> Vec<u8> {
    let mut es = entries.to_vec();
    es.sort_by_key(|a| a.entry.hash);
    es.dedup_by(|b, a| a.entry.hash == b.entry.hash);
    let mut out = Vec::with_capacity(es.len() * ENTRY_LEN + 1024);
    let mut w = IndexWriter::new(&mut out).expect("writing to memory");
    for e in &es {
        w.push(e).expect("sorted, writing to memory");
    }
    w.finish().expect("writing to memory");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::backend::MemBackend;

    pub(crate) fn entry(i: u32, pack: PackId) -> IndexEntry {
        IndexEntry {
            pack,
            entry: PackEntry {
                hash: Hash::of(&i.to_le_bytes()),
                kind: if i.is_multiple_of(3) {
                    BlobKind::Map
                } else {
                    BlobKind::Data
                },
                codec: if i.is_multiple_of(2) {
                    Codec::Zstd
                } else {
                    Codec::Raw
                },
                offset: 16 + i as u64 * 100,
                stored_len: 100,
                raw_len: 4096,
                crc: i.wrapping_mul(2654435761),
            },
        }
    }

    fn sample(n: u32) -> (MemBackend, Vec<IndexEntry>) {
        let b = MemBackend::new();
        let (p, q) = (PackId([1; 16]), PackId([2; 16]));
        let es: Vec<_> = (0..n)
            .map(|i| entry(i, if i.is_multiple_of(2) { p } else { q }))
            .collect();
        b.put_if_absent("index/0000000000000001-x", &encode(&es))
            .unwrap();
        (b, es)
    }

    #[test]
    fn round_trip_and_lookups() {
        for n in [0u32, 1, 2, 17, 300, 5000] {
            let (b, es) = sample(n);
            let set = IndexSet::load(&b).unwrap();
            let f = &set.files()[0];
            assert_eq!(f.count(), n as u64);
            assert_eq!(f.summary.raw_bytes, 4096 * n as u64);
            f.verify(&b).unwrap();
            for e in &es {
                let found = set.lookup(&b, e.hash()).unwrap().unwrap();
                assert_eq!(found.entry, *e);
            }
            assert_eq!(set.lookup(&b, &Hash::of(b"absent")).unwrap(), None);
            let mut s = set.stream(&b);
            let mut k = 0;
            while let Some(x) = s.next_entry().unwrap() {
                assert_eq!(x.ordinal, k);
                k += 1;
            }
            assert_eq!(k, n as u64);
        }
    }

    #[test]
    fn fanout_stays_small_for_small_indexes() {
        let (b, _) = sample(1);
        let size = b.size("index/0000000000000001-x").unwrap();
        assert!(size < 200, "{size}");
    }

    #[test]
    fn newest_first_and_merge_drops_dead_packs() {
        let b = MemBackend::new();
        let (p, q, r) = (PackId([1; 16]), PackId([2; 16]), PackId([3; 16]));
        let old: Vec<_> = (0..100).map(|i| entry(i, p)).collect();
        let new: Vec<_> = (50..150).map(|i| entry(i, q)).collect();
        let other: Vec<_> = (200..210).map(|i| entry(i, r)).collect();
        b.put_if_absent(&index_name(1).unwrap(), &encode(&old))
            .unwrap();
        b.put_if_absent(&index_name(2).unwrap(), &encode(&new))
            .unwrap();
        b.put_if_absent(&index_name(3).unwrap(), &encode(&other))
            .unwrap();
        let set = IndexSet::load(&b).unwrap();
        assert_eq!(index_seq(&set.files()[0].name), Some(3));
        assert_eq!(
            set.lookup(&b, entry(60, p).hash())
                .unwrap()
                .unwrap()
                .entry
                .pack,
            q
        );
        assert_eq!(
            set.lookup(&b, entry(10, p).hash())
                .unwrap()
                .unwrap()
                .entry
                .pack,
            p
        );
        let name = index_name(4).unwrap();
        let sum = merge(&b, &set, &HashSet::from([r]), &name).unwrap();
        assert_eq!(sum.count, 150);
        let f = IndexFile::open(&b, &name).unwrap();
        f.verify(&b).unwrap();
        let merged = IndexSet::new(vec![Arc::new(f)]);
        assert_eq!(
            merged
                .lookup(&b, entry(60, p).hash())
                .unwrap()
                .unwrap()
                .entry
                .pack,
            q
        );
        assert_eq!(
            merged
                .lookup(&b, entry(10, p).hash())
                .unwrap()
                .unwrap()
                .entry
                .pack,
            p
        );
        assert_eq!(merged.lookup(&b, entry(200, p).hash()).unwrap(), None);
    }

    /// Open + verify: the whole check a reader of an index object can make.
    fn check(bytes: &[u8]) -> Result<()> {
        let b = MemBackend::new();
        b.overwrite("index/x", bytes.to_vec());
        IndexFile::open(&b, "index/x")?.verify(&b)
    }

    #[test]
    fn every_truncation_is_refused() {
        let (b, _) = sample(40);
        let bytes = b.get("index/0000000000000001-x").unwrap();
        check(&bytes).unwrap();
        for n in 0..bytes.len() {
            assert!(check(&bytes[..n]).is_err(), "len {n}");
        }
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let (b, _) = sample(40);
        let bytes = b.get("index/0000000000000001-x").unwrap();
        for i in 0..bytes.len() * 8 {
            let mut c = bytes.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(check(&c).is_err(), "bit {i}");
        }
    }

    #[test]
    fn a_damaged_bucket_fails_its_lookups_only() {
        let (b, es) = sample(300);
        let name = "index/0000000000000001-x";
        let set = IndexSet::load(&b).unwrap();
        // Damage the first entry: its bucket fails, others still answer.
        b.flip(name, HEADER_LEN as usize + 5, 1);
        let first = es.iter().min_by_key(|e| e.entry.hash).unwrap();
        let last = es.iter().max_by_key(|e| e.entry.hash).unwrap();
        assert!(set.lookup(&b, first.hash()).is_err());
        assert_eq!(set.lookup(&b, last.hash()).unwrap().unwrap().entry, *last);
    }

    #[test]
    fn newer_major_is_refused() {
        let (b, _) = sample(3);
        let mut bytes = b.get("index/0000000000000001-x").unwrap();
        bytes[8] = 3;
        let c = crc(&bytes[..12]);
        bytes[12..16].copy_from_slice(&c.to_le_bytes());
        let e = check(&bytes).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Format {
                    source: FormatError::TooNew { .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Scale: an index of 2 million blobs (128 GiB of 64 KiB blocks) on a local backend:
    /// `cargo test --release --lib repo::index::tests::scale -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn scale() {
        use crate::repo::backend::LocalBackend;
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path()).unwrap();
        let n = 2_000_000u32;
        let t = std::time::Instant::now();
        let mut es: Vec<IndexEntry> = (0..n)
            .map(|i| entry(i, PackId([(i / 256) as u8; 16])))
            .collect();
        es.sort_by_key(|e| e.entry.hash);
        let name = index_name(1).unwrap();
        b.put_stream(&name, &mut |out| {
            let mut w = IndexWriter::new(out)?;
            for e in &es {
                w.push(e)?;
            }
            w.finish().map(|_| ())
        })
        .unwrap();
        let write = t.elapsed();
        drop(es);
        let t = std::time::Instant::now();
        let set = IndexSet::load(&b).unwrap();
        let open = t.elapsed();
        let f = &set.files()[0];
        let t = std::time::Instant::now();
        let k = 100_000u32;
        for i in 0..k {
            let h = entry(i.wrapping_mul(7919) % n, PackId([0; 16]));
            assert!(set.lookup(&b, h.hash()).unwrap().is_some());
        }
        let hit = t.elapsed();
        let t = std::time::Instant::now();
        for i in 0..k {
            assert!(
                set.lookup(&b, &Hash::of(format!("miss {i}").as_bytes()))
                    .unwrap()
                    .is_none()
            );
        }
        let miss = t.elapsed();
        let t = std::time::Instant::now();
        merge(&b, &set, &HashSet::new(), &index_name(2).unwrap()).unwrap();
        let merged = t.elapsed();
        println!(
            "{n} entries: object {} MiB, written in {write:.2?}, opened in {open:.2?} \
             (fanout 2^{} = {} KiB and {} pack ids in memory), lookup hit {:.1} us, \
             miss {:.1} us, merged in {merged:.2?}",
            f.size >> 20,
            f.bits,
            f.fanout.len() * 4 / 1024,
            f.packs().len(),
            hit.as_secs_f64() * 1e6 / k as f64,
            miss.as_secs_f64() * 1e6 / k as f64,
        );
    }
}
