//! A bounded local cache in front of an S3 repository, with read-ahead: `CachedBackend`.
//!
//! Every block a restore, `verify` or the mount reads is a ranged read of a pack, and an
//! object store answers each request tens of milliseconds late (Garage on loopback: about
//! 40 ms). Read one block at a time, a restore of a 64 KiB-block disk crawls at 1.6 MB/s. So
//! packs and index objects are read in fixed *segments* of `SEGMENT` bytes, each fetched by
//! one ranged GET and kept as a file under the cache directory (`STORE/cache/s3/`), and a
//! reader that moves through an object in order has the next `READ_AHEAD` segments fetched
//! by background threads, several at once, before it asks for them.
//!
//! Invariants:
//! - Caching by name is safe because a repository object is never changed and its name is
//!   never reused for other bytes (`repo::backend`): a cached segment is the object's bytes,
//!   or damage. Only packs and index objects are cached; the config and anything else go
//!   straight to the server.
//! - A cached file never gives wrong bytes: each holds a header with the payload's length and
//!   CRC-32C, checked the first time this process uses the file (a file that fails is removed
//!   and fetched again). Blocks are also checked above the backend (CRC and BLAKE3), so later
//!   damage to a file this process already checked is an error, never other bytes.
//! - Bounded: the bytes of the files this process knows stay under the configured size; the
//!   least recently used segments are removed first. A segment is written before older ones
//!   make room for it, so the bound is exceeded for a moment by the segments being written
//!   (at most one per fetching thread). Each process scans the directory when it
//!   opens the repository, so processes sharing it (the daemon and a command) each keep their
//!   own bound over what they add; a file another process removed is fetched again.
//! - A file appears whole or not at all: written beside, then renamed (no fsync: a cache file
//!   a crash damaged fails its CRC and is fetched again).
//! - One fetch per segment: a reader that needs a segment another thread is fetching waits
//!   for it instead of asking the server again.
//!
//! Segment file format (do not modify the magic): `VMREFSG1` (8 bytes), payload length (u32
//! LE), CRC-32C of the payload (u32 LE), payload. A segment shorter than `SEGMENT` ends its
//! object.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use lru::LruCache;
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::format::FormatError;
use crate::repo::backend::Backend;

use super::S3Backend;

/// Bytes per cached segment: large enough that a sequential read pays one round trip per MiB,
/// small enough that a random 4 KiB read through the mount does not fetch a whole 16 MiB pack.
pub const SEGMENT: u64 = 1 << 20;
/// Segments fetched ahead of a sequential reader (4 MiB, the most a 2-core restore consumes
/// while one round trip is under way).
pub const READ_AHEAD: u64 = 4;
/// Background fetch threads: requests in flight at once besides the readers' own.
const FETCHERS: usize = 4;
/// Queued read-ahead requests beyond which new ones are dropped (a reader that outruns the
/// fetchers fetches for itself).
const QUEUE_MAX: usize = 64;
/// Objects whose last read segment is remembered, to tell sequential readers.
const TRACKED: usize = 256;

const MAGIC: &[u8; 8] = b"VMREFSG1";
const HEADER: usize = 16;

/// The default `[s3] cache_size`.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

struct Entry {
    /// Payload bytes.
    len: u64,
    /// Whether this process checked the file's CRC (or wrote it).
    checked: bool,
}

struct State {
    /// Cached segments by key (`name@seg`), least recently used first out.
    lru: LruCache<String, Entry>,
    total: u64,
    /// Segments being fetched; waiters sleep on `State`'s condvar.
    fetching: HashSet<String>,
    /// The last segment read of each recently read object.
    last: LruCache<String, u64>,
    /// The number of segments of objects whose end a fetch found, so that read-ahead does
    /// not ask for segments past it.
    ends: LruCache<String, u64>,
}

struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when an item is queued or the backend is dropped.
    ready: Condvar,
    /// Signalled when a fetcher finishes an item.
    done: Condvar,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<(String, u64)>,
    /// Items a fetcher has taken and not finished.
    running: Vec<(String, u64)>,
    closed: bool,
}

struct Inner {
    s3: Arc<S3Backend>,
    dir: PathBuf,
    cap: u64,
    state: Mutex<State>,
    fetched: Condvar,
    queue: Arc<Queue>,
    tmp_seq: AtomicU64,
    /// Counters for tests and the bench: segment fetches and bytes fetched.
    gets: AtomicU64,
    got_bytes: AtomicU64,
}

/// An S3 backend whose pack and index reads go through the local cache.
pub struct CachedBackend {
    inner: Arc<Inner>,
    /// Joined on drop: `mount --repository` opens the repository once before it forks, and a
    /// thread still alive at the fork leaves its parking_lot record in the child's lock table;
    /// glibc hands that thread's stack (and the record in it) to the child's next thread, and
    /// the table's queues then loop forever (a daemon spinning in `grow_hashtable`).
    fetchers: Vec<std::thread::JoinHandle<()>>,
}

fn key(name: &str, seg: u64) -> String {
    format!("{name}@{seg}")
}

/// A cache file's name: the key with `/` as `%` (neither can be in an object name's part, so
/// keys and file names map one to one and all files sit in one directory).
fn file_name(key: &str) -> String {
    key.replace('/', "%")
}

fn cacheable(name: &str) -> bool {
    name.starts_with("packs/") || name.starts_with("index/")
}

fn truncated(name: &str, got: u64, need: u64) -> Error {
    Error::Format {
        path: format!("repository object {name}").into(),
        source: FormatError::Truncated {
            got: got as usize,
            need: need as usize,
        },
    }
}

impl CachedBackend {
    /// A cache of at most `cap` bytes under `dir` (created 0700 when first written) in front
    /// of `s3`. Files a
    /// previous process left are kept, oldest first out; temp files are removed.
    ///
    /// # Errors
    /// Failure to list the directory.
    pub fn new(s3: S3Backend, dir: &Path, cap: u64) -> Result<CachedBackend> {
        let mut found = Vec::new();
        // Made at the first write, so that a command that fails before reading anything
        // (an `init` the server refused) leaves no directory behind.
        let listing = match fs::read_dir(dir) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("list", dir)(e)),
        };
        for e in listing.into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') {
                let _ = fs::remove_file(e.path());
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            if !m.is_file() || m.len() < HEADER as u64 {
                let _ = fs::remove_file(e.path());
                continue;
            }
            let when = m.modified().ok();
            found.push((when, n.replace('%', "/"), m.len() - HEADER as u64));
        }
        found.sort();
        let mut lru = LruCache::unbounded();
        let mut total = 0;
        for (_, k, len) in found {
            total += len;
            lru.put(
                k,
                Entry {
                    len,
                    checked: false,
                },
            );
        }
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            done: Condvar::new(),
        });
        let inner = Arc::new(Inner {
            s3: Arc::new(s3),
            dir: dir.to_path_buf(),
            cap,
            state: Mutex::new(State {
                lru,
                total,
                fetching: HashSet::new(),
                last: LruCache::new(std::num::NonZeroUsize::new(TRACKED).unwrap()),
                ends: LruCache::new(std::num::NonZeroUsize::new(TRACKED).unwrap()),
            }),
            fetched: Condvar::new(),
            queue: queue.clone(),
            tmp_seq: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            got_bytes: AtomicU64::new(0),
        });
        inner.evict(None);
        let mut backend = CachedBackend {
            inner,
            fetchers: Vec::with_capacity(FETCHERS),
        };
        for i in 0..FETCHERS {
            let (weak, queue) = (Arc::downgrade(&backend.inner), queue.clone());
            let thread = std::thread::Builder::new()
                .name(format!("s3-ahead-{i}"))
                .spawn(move || fetcher(weak, queue))
                .map_err(Error::io("start a read-ahead thread for", dir))?;
            backend.fetchers.push(thread);
        }
        Ok(backend)
    }

    /// Segment fetches from the server so far, and their bytes.
    pub fn fetches(&self) -> (u64, u64) {
        (
            self.inner.gets.load(Ordering::Relaxed),
            self.inner.got_bytes.load(Ordering::Relaxed),
        )
    }

    /// Wait until the read-ahead threads have nothing queued or under way: until then the
    /// files may exceed the bound by the segments being written (for tests and the bench).
    pub fn wait_idle(&self) {
        let q = &self.inner.queue;
        let mut st = q.state.lock();
        while !st.closed && (!st.items.is_empty() || !st.running.is_empty()) {
            q.done.wait(&mut st);
        }
    }

    /// Bytes of cached segments this process knows.
    pub fn cached_bytes(&self) -> u64 {
        self.inner.state.lock().total
    }
}

impl Drop for CachedBackend {
    fn drop(&mut self) {
        {
            let mut q = self.inner.queue.state.lock();
            q.closed = true;
            q.items.clear();
            self.inner.queue.ready.notify_all();
        }
        // A fetcher finishes the segment it is fetching first (bounded by the client's
        // timeouts); none of them holds a `CachedBackend`, so none can be waiting for this.
        for t in self.fetchers.drain(..) {
            let _ = t.join();
        }
    }
}

/// A read-ahead thread: fetches queued segments until the backend is dropped.
fn fetcher(weak: Weak<Inner>, queue: Arc<Queue>) {
    loop {
        let item = {
            let mut q = queue.state.lock();
            loop {
                if q.closed {
                    return;
                }
                if let Some(it) = q.items.pop_front() {
                    q.running.push(it.clone());
                    break it;
                }
                // Wakes now and then to notice a dropped backend whose queue it missed.
                queue.ready.wait_for(&mut q, Duration::from_secs(5));
            }
        };
        if let Some(inner) = weak.upgrade() {
            // A failed read-ahead is only a lost hint: the reader fetches for itself and
            // gets the error then.
            let _ = inner.segment(&item.0, item.1, None);
        }
        let mut q = queue.state.lock();
        if let Some(i) = q.running.iter().position(|r| *r == item) {
            q.running.swap_remove(i);
        }
        queue.done.notify_all();
        if q.closed {
            return;
        }
    }
}

/// A segment under fetch: taken off the fetching set when dropped, even by a panic, so that
/// no reader (or a drop joining the fetchers) waits for it forever.
struct Fetching<'a>(&'a Inner, &'a str);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.fetching.remove(self.1);
        self.0.fetched.notify_all();
    }
}

impl Inner {
    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    /// Remove least recently used segments until the total fits, sparing `keep`.
    fn evict(&self, keep: Option<&str>) {
        let mut gone = Vec::new();
        {
            let mut st = self.state.lock();
            while st.total > self.cap {
                let Some((k, e)) = st.lru.pop_lru() else {
                    break;
                };
                if Some(k.as_str()) == keep {
                    st.lru.put(k, e);
                    if st.lru.len() == 1 {
                        break;
                    }
                    continue;
                }
                st.total -= e.len;
                gone.push(k);
            }
        }
        for k in gone {
            let _ = fs::remove_file(self.path(&k));
        }
    }

    fn forget(&self, key: &str) {
        let mut st = self.state.lock();
        if let Some(e) = st.lru.pop(key) {
            st.total -= e.len;
        }
    }

    /// Bytes `from..to` of segment `seg` of `name` (`want: None`: only make sure the segment
    /// is cached). The returned bytes may be short where the object ends.
    fn segment(&self, name: &str, seg: u64, want: Option<(usize, usize)>) -> Result<Vec<u8>> {
        let k = key(name, seg);
        loop {
            let cached = {
                let mut st = self.state.lock();
                loop {
                    if let Some(e) = st.lru.get(&k) {
                        break Some((e.len, e.checked));
                    }
                    if !st.fetching.contains(&k) {
                        break None;
                    }
                    self.fetched.wait(&mut st);
                }
            };
            match cached {
                Some((len, checked)) => {
                    let Some((from, to)) = want else {
                        return Ok(Vec::new());
                    };
                    match self.read_file(&k, len, checked, from, to) {
                        Ok(Some(b)) => return Ok(b),
                        // Gone or damaged: dropped, fetched again below on the next turn.
                        Ok(None) => self.forget(&k),
                        Err(e) => return Err(e),
                    }
                }
                None => {
                    {
                        let mut st = self.state.lock();
                        if st.lru.contains(&k) || !st.fetching.insert(k.clone()) {
                            continue;
                        }
                    }
                    let r = {
                        let _fetching = Fetching(self, &k);
                        self.fetch(name, seg, &k)
                    };
                    let bytes = r?;
                    let Some((from, to)) = want else {
                        return Ok(Vec::new());
                    };
                    let to = to.min(bytes.len());
                    return Ok(bytes.get(from..to).unwrap_or_default().to_vec());
                }
            }
        }
    }

    /// Read a cached file: `Ok(None)` when it is gone or fails its check (it is removed).
    fn read_file(
        &self,
        k: &str,
        len: u64,
        checked: bool,
        from: usize,
        to: usize,
    ) -> Result<Option<Vec<u8>>> {
        let p = self.path(k);
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open", &p)(e)),
        };
        if !checked {
            let mut all = Vec::with_capacity(HEADER + len as usize);
            use std::io::Read;
            (&f).read_to_end(&mut all).map_err(Error::io("read", &p))?;
            let ok = all.len() == HEADER + len as usize
                && &all[..8] == MAGIC
                && u32::from_le_bytes(all[8..12].try_into().unwrap()) as u64 == len
                && u32::from_le_bytes(all[12..16].try_into().unwrap())
                    == crc32c::crc32c(&all[HEADER..]);
            if !ok {
                log::warn!("cache file {} is damaged; fetching it again", p.display());
                let _ = fs::remove_file(&p);
                return Ok(None);
            }
            if let Some(e) = self.state.lock().lru.peek_mut(k) {
                e.checked = true;
            }
            let to = to.min(len as usize);
            return Ok(Some(all[HEADER..][from.min(to)..to].to_vec()));
        }
        let to = to.min(len as usize);
        let from = from.min(to);
        let mut buf = vec![0u8; to - from];
        match f.read_exact_at(&mut buf, (HEADER + from) as u64) {
            Ok(()) => Ok(Some(buf)),
            // Shorter than when it was checked: someone else's damage; fetch again.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                let _ = fs::remove_file(&p);
                Ok(None)
            }
            Err(e) => Err(Error::io("read", &p)(e)),
        }
    }

    /// Fetch one segment from the server and keep it (an empty one, past the object's end,
    /// is not kept).
    fn fetch(&self, name: &str, seg: u64, k: &str) -> Result<Vec<u8>> {
        let bytes = self.s3.get_upto(name, seg * SEGMENT, SEGMENT as usize)?;
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.got_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if (bytes.len() as u64) < SEGMENT {
            let n = seg + u64::from(!bytes.is_empty());
            self.state.lock().ends.put(name.to_string(), n);
        }
        if bytes.is_empty() || self.cap == 0 {
            return Ok(bytes);
        }
        // A cache that cannot be written costs speed, never the read.
        match self.write_file(k, &bytes) {
            Ok(()) => {
                let mut st = self.state.lock();
                let old = st.lru.put(
                    k.to_string(),
                    Entry {
                        len: bytes.len() as u64,
                        checked: true,
                    },
                );
                st.total += bytes.len() as u64;
                if let Some(o) = old {
                    st.total -= o.len;
                }
                drop(st);
                self.evict(Some(k));
            }
            Err(e) => log::warn!("{e}"),
        }
        Ok(bytes)
    }

    fn write_file(&self, k: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!(
            ".tmp.{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            let mut head = [0u8; HEADER];
            head[..8].copy_from_slice(MAGIC);
            head[8..12].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            head[12..16].copy_from_slice(&crc32c::crc32c(bytes).to_le_bytes());
            f.write_all(&head)?;
            f.write_all(bytes)?;
            fs::rename(&tmp, self.path(k))
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io("write cache file", &tmp)(e)
        })
    }

    /// Note a read of `seg` of `name`; for a sequential reader (the segment after the last
    /// one read, or an object's first), queue the segments ahead that are neither cached nor
    /// being fetched.
    fn read_ahead(&self, name: &str, seg: u64) {
        let ahead: Vec<u64> = {
            let mut st = self.state.lock();
            let seq = seg == 0 || st.last.get(name).is_some_and(|&l| l + 1 == seg || l == seg);
            st.last.put(name.to_string(), seg);
            if !seq {
                return;
            }
            let end = st.ends.get(name).copied().unwrap_or(u64::MAX);
            let mut ahead = Vec::new();
            for s in seg + 1..(seg + 1 + READ_AHEAD).min(end) {
                // A cached short segment (found on disk by this process) ends the object too.
                if st
                    .lru
                    .peek(&key(name, s - 1))
                    .is_some_and(|e| e.len < SEGMENT)
                {
                    break;
                }
                let k = key(name, s);
                if !st.lru.contains(&k) && !st.fetching.contains(&k) {
                    ahead.push(s);
                }
            }
            ahead
        };
        if ahead.is_empty() {
            return;
        }
        let mut q = self.queue.state.lock();
        for s in ahead {
            if q.items.len() >= QUEUE_MAX {
                break;
            }
            if !q.items.iter().any(|(n, x)| *x == s && n == name) {
                q.items.push_back((name.to_string(), s));
            }
        }
        self.queue.ready.notify_all();
    }
}

impl Backend for CachedBackend {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        self.inner.s3.get(name)
    }

    fn get_range(&self, name: &str, off: u64, len: usize) -> Result<Vec<u8>> {
        if len == 0 || !cacheable(name) {
            return self.inner.s3.get_range(name, off, len);
        }
        let end = off + len as u64;
        let mut out = Vec::with_capacity(len);
        let (first, last) = (off / SEGMENT, (end - 1) / SEGMENT);
        for seg in first..=last {
            let base = seg * SEGMENT;
            let from = (off.max(base) - base) as usize;
            let to = (end.min(base + SEGMENT) - base) as usize;
            if seg == first {
                self.inner.read_ahead(name, seg);
            }
            let b = self.inner.segment(name, seg, Some((from, to)))?;
            let short = b.len() < to - from;
            out.extend_from_slice(&b);
            if short {
                if out.is_empty() && from == 0 && seg == first && first == 0 {
                    // Nothing at all: an empty object, or none (a GET tells them apart).
                    return self.inner.s3.get_range(name, off, len);
                }
                return Err(truncated(name, off + out.len() as u64, end));
            }
        }
        Ok(out)
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        self.inner.s3.put_if_absent(name, bytes)
    }

    fn put_stream(
        &self,
        name: &str,
        write: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
    ) -> Result<bool> {
        self.inner.s3.put_stream(name, write)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.s3.list(prefix)
    }

    fn list_aged(&self, prefix: &str) -> Result<Vec<(String, std::time::Duration)>> {
        self.inner.s3.list_aged(prefix)
    }

    fn delete(&self, name: &str) -> Result<()> {
        // Read-ahead of the object must not put a segment back after it is gone: drop what is
        // queued and wait for what is under way.
        {
            let q = &self.inner.queue;
            let mut st = q.state.lock();
            st.items.retain(|(n, _)| n != name);
            while st.running.iter().any(|(n, _)| n == name) {
                q.done.wait(&mut st);
            }
        }
        self.inner.s3.delete(name)?;
        let at = format!("{name}@");
        let gone: Vec<String> = {
            let mut st = self.inner.state.lock();
            let keys: Vec<String> = st
                .lru
                .iter()
                .map(|(k, _)| k.clone())
                .filter(|k| k.starts_with(&at))
                .collect();
            for k in &keys {
                if let Some(e) = st.lru.pop(k) {
                    st.total -= e.len;
                }
            }
            keys
        };
        for k in gone {
            let _ = fs::remove_file(self.inner.path(&k));
        }
        Ok(())
    }

    fn size(&self, name: &str) -> Result<u64> {
        self.inner.s3.size(name)
    }

    fn describe(&self) -> String {
        self.inner.s3.describe()
    }

    fn uncached(&self) -> Option<Arc<dyn Backend>> {
        Some(self.inner.s3.clone())
    }
}
