//! `Repository`: the `BlobStore` of store format v2 over a `Backend` of named objects.
//!
//! A put hashes the blob, skips it when the hash is already stored (in the open pack, in a
//! pack being written, or in the index), compresses it outside any lock and appends it to the
//! open pack. `flush` writes the open pack and then one index object naming every blob put
//! since the last flush, durably; only after it returns may a caller commit a point that
//! names those blobs (order: packs, index, the caller's point record). A crash before that
//! leaves at worst packs no index names, which garbage collection removes.
//!
//! A get finds the blob (pending writes first, then the index newest first), reads its stored
//! bytes with one ranged get, checks their CRC, decompresses and checks the BLAKE3 hash: any
//! damage is `Error::Format`, never other bytes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, Kind};
use crate::repo::backend::{Backend, is_missing};
use crate::repo::compress::{self, Compression, DEFAULT_COMPRESSION};
use crate::repo::index::{self, IndexEntry, IndexFile, IndexSet};
use crate::repo::key::RepoKey;
use crate::repo::pack::{DEFAULT_PACK_TARGET, PackId, PackWriter};
use crate::repo::seal::{Keys, SealedBackend};
use crate::repo::{BlobKind, BlobStore, Hash, damaged};

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// The repository's `config` object, as read. Do not modify the magic. Major 3: the
/// repository is encrypted (`encryption` in the record), which a release that knows only
/// major 2 must refuse rather than read sealed objects as damage; only encrypted
/// repositories are written at 3.0.
pub const REPO_CONFIG: Kind = Kind {
    magic: b"VMREFRPO",
    major: 3,
    minor: 0,
};
/// How an unencrypted repository's config is written: 2.0, byte for byte as before
/// encryption existed.
pub const REPO_CONFIG_PLAIN: Kind = Kind {
    major: 2,
    ..REPO_CONFIG
};
/// The cipher and id scheme of an encrypted repository (`seal.rs`), as its config names it.
pub const CIPHER: &str = "xchacha20poly1305-chunked16k";
pub const BLOB_IDS: &str = "blake3-keyed";
pub const CONFIG_NAME: &str = "config";
/// After this many blobs put without a flush, an index object is written anyway, so memory
/// for pending blobs stays bounded during a long full backup.
pub const DEFAULT_INDEX_BATCH: usize = 1 << 17;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConfigRecord {
    version: u16,
    id: String,
    compression: String,
    pack_target: u64,
    created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encryption: Option<EncryptionRecord>,
}

/// Present exactly when the repository is encrypted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EncryptionRecord {
    cipher: String,
    blob_ids: String,
    /// The public id of the key (`seal::Keys::key_id`), for messages.
    key_id: String,
    /// A known value sealed under the key, in hex: a wrong key fails to open it.
    key_check: String,
}

/// Settings fixed at `init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoConfig {
    pub id: String,
    pub compression: Compression,
    pub pack_target: usize,
    /// The public id of the key of an encrypted repository; `None`: not encrypted.
    pub key_id: Option<String>,
}

/// What `init` is asked for.
#[derive(Debug, Clone, Copy)]
pub struct RepoOptions {
    pub compression: Compression,
    pub pack_target: usize,
}

impl Default for RepoOptions {
    fn default() -> Self {
        RepoOptions {
            compression: DEFAULT_COMPRESSION,
            pack_target: DEFAULT_PACK_TARGET,
        }
    }
}

/// Sizes of what the repository holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepoStats {
    /// Distinct blobs the index names.
    pub blobs: u64,
    /// Their bytes as stored (compressed) and before compression.
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    pub packs: u64,
    pub pack_bytes: u64,
    pub index_objects: u64,
    pub index_bytes: u64,
}

pub(super) struct WriteState {
    pub(super) open: Option<(PackId, PackWriter)>,
    /// Blobs put since the last index object, by hash.
    pub(super) pending: HashMap<Hash, IndexEntry>,
    /// Finished packs whose upload runs outside the lock; their blobs read from here.
    pub(super) in_flight: HashMap<PackId, Arc<Vec<u8>>>,
    /// Packs whose upload failed: their pending blobs are lost; the next flush says so.
    pub(super) failed: Vec<(PackId, String)>,
}

pub struct Repository {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) config: RepoConfig,
    /// Replaced whole (never mutated) so lookups run on a snapshot with no lock held.
    pub(super) index: RwLock<Arc<IndexSet>>,
    pub(super) next_seq: AtomicU64,
    pub(super) w: Mutex<WriteState>,
    pub(super) uploaded: Condvar,
    /// Puts hold it shared, garbage collection exclusive: a collection never races a put
    /// that dedups against a blob it is about to delete.
    pub(super) gc_lock: RwLock<()>,
    pub(super) index_batch: usize,
    /// Blobs and stored (compressed) bytes this handle added: what a backup reports.
    pub(super) added_blobs: AtomicU64,
    pub(super) added_bytes: AtomicU64,
    /// Blobs whose stored copy is known damaged (`verify` found them): a put stores them
    /// again instead of deduplicating against the bad copy (see `heal`).
    pub(super) damaged: RwLock<std::collections::HashSet<Hash>>,
    /// The keys of an encrypted repository (the backend above is then a `SealedBackend`):
    /// blob ids are keyed hashes.
    pub(super) keys: Option<Arc<Keys>>,
}

impl Repository {
    /// Make a new repository in an empty backend: writes its `config` object.
    ///
    /// # Errors
    /// `StoreExists` when the backend already holds a config; I/O failures.
    pub fn init(backend: Arc<dyn Backend>, opts: RepoOptions) -> Result<Repository> {
        Repository::init_with_key(backend, opts, None)
    }

    /// `init`, encrypted under `key` when one is given.
    ///
    /// # Errors
    /// As `init`.
    pub fn init_with_key(
        backend: Arc<dyn Backend>,
        opts: RepoOptions,
        key: Option<&RepoKey>,
    ) -> Result<Repository> {
        let encryption = key
            .map(|k| -> Result<EncryptionRecord> {
                Ok(EncryptionRecord {
                    cipher: CIPHER.into(),
                    blob_ids: BLOB_IDS.into(),
                    key_id: k.key_id().to_string(),
                    key_check: to_hex(&k.keys().key_check()?),
                })
            })
            .transpose()?;
        let kind = if encryption.is_some() {
            REPO_CONFIG
        } else {
            REPO_CONFIG_PLAIN
        };
        let rec = ConfigRecord {
            version: kind.major,
            id: crate::store::random_id()?,
            compression: opts.compression.to_string(),
            pack_target: opts.pack_target as u64,
            created_unix: crate::store::now_unix(),
            encryption,
        };
        if !backend.put_if_absent(CONFIG_NAME, &format::encode(kind, &rec))? {
            return Err(Error::StoreExists(backend.describe().into()));
        }
        Repository::open_with_key(backend, key)
    }

    /// Open the repository of `backend`, which must not be encrypted.
    ///
    /// # Errors
    /// As `open_with_key`.
    pub fn open(backend: Arc<dyn Backend>) -> Result<Repository> {
        Repository::open_with_key(backend, None)
    }

    /// Open the repository of `backend`, with the key of an encrypted one (a key given for
    /// an unencrypted repository is not used).
    ///
    /// # Errors
    /// `NotAStore` without a config; `Format` (`TooNew`) for a newer major version or damage;
    /// `Encrypted` for an encrypted repository without its key or with another one.
    pub fn open_with_key(backend: Arc<dyn Backend>, key: Option<&RepoKey>) -> Result<Repository> {
        let bytes = match backend.get(CONFIG_NAME) {
            Ok(b) => b,
            Err(e) if is_missing(&e) => {
                return Err(Error::NotAStore(
                    backend.describe().into(),
                    "no repository config",
                ));
            }
            Err(e) => return Err(e),
        };
        let path = || format!("{}/{CONFIG_NAME}", backend.describe());
        let rec: ConfigRecord =
            format::decode(REPO_CONFIG, &bytes).map_err(|source| Error::Format {
                path: path().into(),
                source,
            })?;
        let bad = |why: String| Error::Format {
            path: path().into(),
            source: format::FormatError::Invalid {
                what: "repository config",
                why,
            },
        };
        if rec.version > REPO_CONFIG.major {
            return Err(bad(format!(
                "repository version {} is newer than this vmref ({})",
                rec.version, REPO_CONFIG.major
            )));
        }
        let compression: Compression = rec.compression.parse().map_err(bad)?;
        if rec.pack_target == 0 || rec.pack_target > 1 << 32 {
            return Err(bad(format!("pack target {}", rec.pack_target)));
        }
        let (backend, keys, key_id) = match &rec.encryption {
            None => (backend, None, None),
            Some(enc) => {
                if enc.cipher != CIPHER || enc.blob_ids != BLOB_IDS {
                    return Err(bad(format!(
                        "encryption {} with ids {} is unknown to this vmref",
                        enc.cipher, enc.blob_ids
                    )));
                }
                let refuse = |why: String| Error::Encrypted {
                    repo: backend.describe(),
                    why,
                };
                let Some(k) = key else {
                    return Err(refuse(format!(
                        "its key file is needed (key id {})",
                        enc.key_id
                    )));
                };
                let check = from_hex(&enc.key_check).ok_or_else(|| bad("key check".into()))?;
                if !k.keys().opens_key_check(&check) {
                    return Err(refuse(format!(
                        "the key file given has key id {}, this repository wants key id {}",
                        k.key_id(),
                        enc.key_id
                    )));
                }
                let sealed: Arc<dyn Backend> =
                    Arc::new(SealedBackend::new(backend, k.keys().clone()));
                (sealed, Some(k.keys().clone()), Some(enc.key_id.clone()))
            }
        };
        let config = RepoConfig {
            id: rec.id,
            compression,
            pack_target: rec.pack_target as usize,
            key_id,
        };
        Repository::assemble(backend, config, keys)
    }

    /// A handle on `backend` (already sealed when `keys` is given) with its index loaded.
    fn assemble(
        backend: Arc<dyn Backend>,
        config: RepoConfig,
        keys: Option<Arc<Keys>>,
    ) -> Result<Repository> {
        let set = IndexSet::load(&*backend)?;
        let seq = set
            .files()
            .iter()
            .filter_map(|f| index::index_seq(&f.name))
            .max()
            .unwrap_or(0);
        Ok(Repository {
            config,
            backend,
            index: RwLock::new(Arc::new(set)),
            next_seq: AtomicU64::new(seq + 1),
            w: Mutex::new(WriteState {
                open: None,
                pending: HashMap::new(),
                in_flight: HashMap::new(),
                failed: Vec::new(),
            }),
            uploaded: Condvar::new(),
            gc_lock: RwLock::new(()),
            index_batch: DEFAULT_INDEX_BATCH,
            added_blobs: AtomicU64::new(0),
            added_bytes: AtomicU64::new(0),
            damaged: RwLock::new(std::collections::HashSet::new()),
            keys,
        })
    }

    /// The same repository read without a local cache in front (an S3 repository's read
    /// cache), sealed with the same keys: `verify` checks what the repository holds, not a
    /// copy of it. `None`: this backend has no cache.
    ///
    /// # Errors
    /// Reading the index objects.
    pub fn uncached(&self) -> Result<Option<Repository>> {
        match self.backend.uncached() {
            None => Ok(None),
            Some(b) => Repository::assemble(b, self.config.clone(), self.keys.clone()).map(Some),
        }
    }

    /// The id of a blob of these bytes here: their BLAKE3 hash, keyed in an encrypted
    /// repository.
    pub fn id_of(&self, data: &[u8]) -> Hash {
        match &self.keys {
            Some(k) => k.id_of(data),
            None => Hash::of(data),
        }
    }

    /// Whether blob ids are the plain BLAKE3 of the bytes (what replication streams carry).
    pub fn plain_ids(&self) -> bool {
        self.keys.is_none()
    }

    /// Blobs and stored bytes put through this handle since it was opened (not counting
    /// puts of blobs already held): a caller takes the difference around an operation.
    pub fn added(&self) -> (u64, u64) {
        (
            self.added_blobs.load(Ordering::Relaxed),
            self.added_bytes.load(Ordering::Relaxed),
        )
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Write an index object after this many pending blobs (tests use small values).
    pub fn set_index_batch(&mut self, n: usize) {
        self.index_batch = n.max(1);
    }

    /// Re-read the list of index objects (after another process wrote or collected).
    ///
    /// # Errors
    /// A damaged index object; I/O failures.
    pub fn refresh(&self) -> Result<()> {
        let set = IndexSet::load(&*self.backend)?;
        *self.index.write() = Arc::new(set);
        Ok(())
    }

    /// Where blob `h` is, by the index snapshot; an index object gone since the snapshot was
    /// taken (another store sharing the repository folded or collected it) makes it re-read
    /// the list of index objects once.
    pub(super) fn lookup(&self, h: &Hash) -> Result<Option<IndexEntry>> {
        let set = self.index.read().clone();
        match set.lookup(&*self.backend, h) {
            Err(e) if is_missing(&e) => {
                self.refresh()?;
                let set = self.index.read().clone();
                Ok(set.lookup(&*self.backend, h)?.map(|f| f.entry))
            }
            r => Ok(r?.map(|f| f.entry)),
        }
    }

    /// Forget the blobs put since the last index object: a failed writer's leftovers, named
    /// by no index, whose packs another store's collection may have deleted while this
    /// handle held no repository lock. A writer calls it when it takes the lock, before its
    /// first dedup, so that it never names a blob on the word of `pending` alone.
    pub fn forget_unindexed(&self) {
        let mut g = self.w.lock();
        while !g.in_flight.is_empty() {
            self.uploaded.wait(&mut g);
        }
        if !g.pending.is_empty() || g.open.is_some() {
            log::info!(
                "forgetting {} blob(s) an earlier writer put but never indexed",
                g.pending.len()
            );
        }
        g.pending.clear();
        g.open = None;
        g.failed.clear();
    }

    /// Whether blob `h` is stored (or pending).
    ///
    /// # Errors
    /// A damaged index; I/O failures.
    pub fn contains(&self, h: &Hash) -> Result<bool> {
        if self.w.lock().pending.contains_key(h) {
            return Ok(true);
        }
        Ok(self.lookup(h)?.is_some())
    }

    /// Upload a finished pack with the write lock released; record a failure for `flush`.
    fn upload(&self, id: PackId, bytes: Arc<Vec<u8>>) -> Result<()> {
        let r = self
            .backend
            .put_if_absent(&id.object_name(), &bytes)
            .map(|_| ());
        let mut g = self.w.lock();
        g.in_flight.remove(&id);
        if r.is_err() {
            // The put that filled the pack returns this error, failing its backup; the pack's
            // blobs are forgotten here so that the next backup stores them again instead of
            // failing on this one's loss at its flush.
            g.pending.retain(|_, e| e.pack != id);
        }
        self.uploaded.notify_all();
        r
    }

    /// Make every blob put so far durable and findable: write the open pack, wait for packs
    /// being uploaded, then write one index object naming them. Returns whether anything was
    /// written.
    ///
    /// # Errors
    /// A failed pack upload since the last flush (its blobs are lost: do not commit a point
    /// that names them; put them again) or a failed index write.
    pub fn flush(&self) -> Result<bool> {
        let mut g = self.w.lock();
        loop {
            if let Some((id, w)) = g.open.take() {
                let (bytes, _) = w.finish();
                // Under the lock: flush is the commit point, and a put meanwhile would only
                // start another pack to wait for.
                if let Err(e) = self.backend.put_if_absent(&id.object_name(), &bytes) {
                    g.failed.push((id, e.to_string()));
                }
            }
            if g.in_flight.is_empty() {
                break;
            }
            self.uploaded.wait(&mut g);
        }
        if !g.failed.is_empty() {
            let failed = std::mem::take(&mut g.failed);
            g.pending
                .retain(|_, e| !failed.iter().any(|(id, _)| *id == e.pack));
            return Err(Error::Repo(format!(
                "{} pack(s) of this backup could not be written: {}",
                failed.len(),
                failed[0].1
            )));
        }
        if g.pending.is_empty() {
            return Ok(false);
        }
        let entries: Vec<IndexEntry> = g.pending.values().copied().collect();
        let name = index::index_name(self.next_seq.fetch_add(1, Ordering::Relaxed))?;
        self.backend
            .put_if_absent(&name, &index::encode(&entries))?;
        let f = Arc::new(IndexFile::open(&*self.backend, &name)?);
        {
            let mut ix = self.index.write();
            let mut files = ix.files().to_vec();
            files.insert(0, f);
            *ix = Arc::new(ix.with_files(files));
        }
        // A known-damaged blob put again now has a good copy, durable and indexed first.
        if !self.damaged.read().is_empty() {
            let mut d = self.damaged.write();
            d.retain(|h| !g.pending.contains_key(h));
        }
        g.pending.clear();
        Ok(true)
    }

    /// Read, check and decode a stored blob.
    fn read_stored(&self, e: &IndexEntry, stored: &[u8], kind: BlobKind) -> Result<Vec<u8>> {
        let h = &e.entry.hash;
        if stored.len() != e.entry.stored_len as usize {
            return Err(damaged(h, "short read"));
        }
        let c = crc32c::crc32c(stored);
        if c != e.entry.crc {
            return Err(damaged(
                h,
                format!(
                    "stored bytes in pack {} at {} fail their checksum",
                    e.pack, e.entry.offset
                ),
            ));
        }
        if e.entry.kind != kind {
            return Err(damaged(
                h,
                format!("stored as {:?}, wanted {kind:?}", e.entry.kind),
            ));
        }
        let raw = compress::decompress(e.entry.codec, stored, e.entry.raw_len as usize)
            .map_err(|why| damaged(h, why))?;
        if self.id_of(&raw) != *h {
            return Err(damaged(h, "bytes do not match the hash"));
        }
        Ok(raw)
    }

    pub(super) fn read_from_pack(&self, e: &IndexEntry, kind: BlobKind) -> Result<Vec<u8>> {
        crate::repo::faults::before_read(kind, &e.pack.object_name())?;
        let stored = self.backend.get_range(
            &e.pack.object_name(),
            e.entry.offset,
            e.entry.stored_len as usize,
        )?;
        self.read_stored(e, &stored, kind)
    }

    fn locate_and_read(&self, kind: BlobKind, hash: &Hash) -> Result<Vec<u8>> {
        let e = self
            .lookup(hash)?
            .ok_or_else(|| damaged(hash, NOT_STORED))?;
        self.read_from_pack(&e, kind)
    }

    /// Sizes of what is stored (after a flush: pending blobs are not counted). Streams every
    /// index object once.
    ///
    /// # Errors
    /// A damaged index; I/O failures.
    pub fn stats(&self) -> Result<RepoStats> {
        let set = self.index.read().clone();
        let mut st = RepoStats::default();
        let mut s = set.stream(&*self.backend);
        let mut last = None;
        while let Some(x) = s.next_entry()? {
            if last == Some(x.entry.entry.hash) {
                continue;
            }
            last = Some(x.entry.entry.hash);
            st.blobs += 1;
            st.stored_bytes += x.entry.entry.stored_len as u64;
            st.raw_bytes += x.entry.entry.raw_len as u64;
        }
        for n in self.backend.list("packs/")? {
            st.packs += 1;
            st.pack_bytes += self.backend.size(&n)?;
        }
        for f in set.files() {
            st.index_objects += 1;
            st.index_bytes += f.size;
        }
        Ok(st)
    }
}

const NOT_STORED: &str = "not stored";

fn is_absent(e: &Error) -> bool {
    matches!(e, Error::Format { source: crate::format::FormatError::Invalid { what: "blob", why }, .. } if why == NOT_STORED)
}

/// A blob ready to be appended: already held, or hashed and compressed.
enum Prepared {
    Held(Hash),
    New {
        hash: Hash,
        codec: compress::Codec,
        stored: Vec<u8>,
    },
}

impl Repository {
    /// Store several blobs of one kind: hashed and compressed on up to `threads` threads,
    /// appended to packs in the order given. So blocks that a reader reads in order lie in
    /// order in the packs, whatever the threads' timing.
    ///
    /// # Errors
    /// As `put`.
    pub fn put_many(&self, kind: BlobKind, blobs: &[&[u8]], threads: usize) -> Result<Vec<Hash>> {
        let _gc = self.gc_lock.read();
        let threads = threads.clamp(1, blobs.len().max(1));
        let prepared: Vec<Result<Prepared>> = if threads == 1 {
            blobs.iter().map(|b| self.prepare(b)).collect()
        } else {
            let per = blobs.len().div_ceil(threads);
            std::thread::scope(|s| {
                let parts: Vec<_> = blobs
                    .chunks(per)
                    .map(|part| {
                        s.spawn(move || part.iter().map(|b| self.prepare(b)).collect::<Vec<_>>())
                    })
                    .collect();
                parts
                    .into_iter()
                    .flat_map(|p| p.join().expect("compression thread panicked"))
                    .collect()
            })
        };
        let mut out = Vec::with_capacity(blobs.len());
        for (p, b) in prepared.into_iter().zip(blobs) {
            out.push(match p? {
                Prepared::Held(h) => h,
                Prepared::New {
                    hash,
                    codec,
                    stored,
                } => self.insert(kind, hash, codec, &stored, b.len())?,
            });
        }
        Ok(out)
    }

    /// Hash a blob and, unless it is held already, compress it (no lock held: this is where a
    /// backup spends its CPU).
    fn prepare(&self, data: &[u8]) -> Result<Prepared> {
        if data.len() > crate::repo::pack::MAX_BLOB as usize {
            return Err(Error::Internal(format!(
                "blob of {} bytes is larger than a repository blob may be",
                data.len()
            )));
        }
        let hash = self.id_of(data);
        if self.contains(&hash)? && !self.is_damaged(&hash) {
            return Ok(Prepared::Held(hash));
        }
        let (codec, stored) = compress::compress(self.config.compression, data);
        Ok(Prepared::New {
            hash,
            codec,
            stored,
        })
    }

    /// Append a prepared blob to the open pack (unless a racing put did), writing the pack
    /// out when full and an index object when the batch is. The caller holds `gc_lock`.
    fn insert(
        &self,
        kind: BlobKind,
        h: Hash,
        codec: compress::Codec,
        stored: &[u8],
        raw_len: usize,
    ) -> Result<Hash> {
        let mut g = self.w.lock();
        if g.pending.contains_key(&h) {
            return Ok(h);
        }
        if g.open.is_none() {
            g.open = Some((PackId::random()?, PackWriter::new()));
        }
        let (id, w) = g.open.as_mut().expect("set above");
        let id = *id;
        let entry = w.add(h, kind, codec, stored, raw_len as u32);
        let full = w.len() >= self.config.pack_target;
        g.pending.insert(h, IndexEntry { pack: id, entry });
        self.added_blobs.fetch_add(1, Ordering::Relaxed);
        self.added_bytes
            .fetch_add(stored.len() as u64, Ordering::Relaxed);
        let batch_full = g.pending.len() >= self.index_batch;
        if full {
            let (id, w) = g.open.take().expect("open pack");
            let bytes = Arc::new(w.finish().0);
            g.in_flight.insert(id, bytes.clone());
            drop(g);
            self.upload(id, bytes)?;
        } else {
            drop(g);
        }
        if batch_full {
            self.flush()?;
        }
        Ok(h)
    }
}

impl BlobStore for Repository {
    fn id_of(&self, data: &[u8]) -> Hash {
        Repository::id_of(self, data)
    }

    fn put(&self, kind: BlobKind, data: &[u8]) -> Result<Hash> {
        let _gc = self.gc_lock.read();
        match self.prepare(data)? {
            Prepared::Held(h) => Ok(h),
            Prepared::New {
                hash,
                codec,
                stored,
            } => self.insert(kind, hash, codec, &stored, data.len()),
        }
    }

    fn get(&self, kind: BlobKind, hash: &Hash) -> Result<Vec<u8>> {
        let pending = {
            let g = self.w.lock();
            match g.pending.get(hash) {
                Some(e) => {
                    let local = match (&g.open, g.in_flight.get(&e.pack)) {
                        (Some((id, w)), _) if *id == e.pack => Some(w.stored(&e.entry).to_vec()),
                        (_, Some(b)) => Some(
                            b[e.entry.offset as usize..][..e.entry.stored_len as usize].to_vec(),
                        ),
                        _ => None,
                    };
                    Some((*e, local))
                }
                None => None,
            }
        };
        match pending {
            Some((e, Some(stored))) => return self.read_stored(&e, &stored, kind),
            Some((e, None)) => return self.read_from_pack(&e, kind),
            None => {}
        }
        match self.locate_and_read(kind, hash) {
            // Our snapshot of the index may be stale: another handle or process compacted
            // packs or replaced index objects, or wrote the blob since. Re-read the index
            // list once and look again.
            Err(err) if is_missing(&err) || is_absent(&err) => {
                self.refresh()?;
                self.locate_and_read(kind, hash)
            }
            r => r,
        }
    }
}

mod heal;
mod read;
mod transfer;
pub use transfer::StoredBlob;

#[cfg(test)]
mod points;
#[cfg(test)]
mod sealed_tests;
#[cfg(test)]
mod tests;
