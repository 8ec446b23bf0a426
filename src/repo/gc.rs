//! Garbage collection of the repository: free the packs no live blob needs.
//!
//! The caller streams the hashes of every live blob (from all point maps) into a `Marker`,
//! which sets one bit per index entry (memory: a bit per stored blob, no set of hashes).
//! `Repository::collect` then
//! 1. sums live and total bytes per pack, and lists packs no index names (left by a crash);
//! 2. copies the live blobs of mostly-dead packs (live bytes below `rewrite_below`) into new
//!    packs, and writes those packs;
//! 3. writes one merged index object: the entries of kept packs and the new locations of the
//!    copied blobs, nothing of dead or rewritten packs;
//! 4. deletes the old index objects, then
//! 5. deletes the dead and rewritten packs.
//!
//! Every live blob stays reachable after a crash at any point: until step 3 the old indexes
//! and packs are untouched; from step 3 on the merged index (the newest) names every live
//! blob in packs that are never deleted; an old index left by a crash in step 4 names
//! packs that may be gone, but the merged index is consulted first and names every live blob.
//! At worst garbage remains (new packs named by no index, old packs) for the next run, which
//! deletes packs no index names.
//!
//! Collection must not run while another process writes to the repository (the caller holds
//! the store lock); within this process puts wait for it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::RwLockWriteGuard;

use crate::error::{Error, Result};
use crate::repo::Hash;
use crate::repo::backend::Backend;
use crate::repo::index::{self, IndexEntry, IndexSet, IndexWriter, Streamed};
use crate::repo::pack::{PackId, PackWriter};
use crate::repo::repository::Repository;

/// Where a collection may be stopped, to test crash safety.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GcStep {
    /// New packs written, merged index not.
    PacksWritten,
    /// Merged index written, nothing deleted.
    IndexWritten,
    /// One old index object deleted.
    OneIndexDeleted,
    /// All old index objects deleted, no pack.
    IndexesDeleted,
    /// One pack deleted.
    OnePackDeleted,
}

#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Packs whose live bytes are below this fraction of their blob bytes are rewritten.
    pub rewrite_below: f64,
    /// Test hook: stop (as a crash would) after this step.
    pub stop_after: Option<GcStep>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            rewrite_below: 0.5,
            stop_after: None,
        }
    }
}

/// What a collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub live_blobs: u64,
    /// Live hashes the repository does not hold (damage: a point names a missing blob).
    pub missing_marks: u64,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    pub packs_written: u64,
    pub blobs_copied: u64,
    pub index_objects_deleted: u64,
    /// Bytes of the packs and index objects deleted.
    pub freed_bytes: u64,
    /// Bytes of the packs and index object written.
    pub written_bytes: u64,
    /// Set when `stop_after` stopped the run.
    pub stopped: Option<GcStep>,
}

impl GcReport {
    /// What the repository shrank by.
    pub fn net_freed(&self) -> i64 {
        self.freed_bytes as i64 - self.written_bytes as i64
    }
}

/// Live marks over a snapshot of the repository's index objects: a bit per entry.
///
/// While a marker exists, puts to its repository wait: a put during marking could skip
/// storing a blob because a pack that the collection is about to delete holds it. (So the
/// thread that marks must not put.)
pub struct Marker<'r> {
    _excl: RwLockWriteGuard<'r, ()>,
    backend: Arc<dyn Backend>,
    set: Arc<IndexSet>,
    bits: Vec<Vec<u64>>,
    live: u64,
    missing: u64,
}

impl Marker<'_> {
    /// Mark blob `h` live. Returns false when the repository does not hold it.
    ///
    /// # Errors
    /// A damaged index; I/O failures.
    pub fn mark(&mut self, h: &Hash) -> Result<bool> {
        match self.set.lookup(&*self.backend, h)? {
            Some(f) => {
                let w = &mut self.bits[f.file][(f.ordinal / 64) as usize];
                let bit = 1u64 << (f.ordinal % 64);
                if *w & bit == 0 {
                    *w |= bit;
                    self.live += 1;
                }
                Ok(true)
            }
            None => {
                self.missing += 1;
                Ok(false)
            }
        }
    }

    /// Mark `h` and say whether this was its first mark: the `seen` of a map walk, which
    /// reads a node (and follows its children) only on its first visit. A hash the repository
    /// lacks answers false (nothing to follow) and counts in `missing_marks`.
    ///
    /// # Errors
    /// A damaged index; I/O failures.
    pub fn mark_first(&mut self, h: &Hash) -> Result<bool> {
        let before = self.live;
        self.mark(h)?;
        Ok(self.live > before)
    }

    /// Live blobs marked so far.
    pub fn live(&self) -> u64 {
        self.live
    }

    fn is_marked(&self, s: &Streamed) -> bool {
        self.bits[s.file][(s.ordinal / 64) as usize] & (1 << (s.ordinal % 64)) != 0
    }
}

/// The test hook's stop inside the index write, told apart from real failures.
const STOPPED: &str = "collection stopped after writing packs (test hook)";

#[derive(Default, Clone, Copy)]
struct PackUse {
    total: u64,
    live: u64,
}

/// Entries of one hash from the merged stream, newest first.
fn next_group(
    s: &mut index::MergeStream<'_>,
    peek: &mut Option<Streamed>,
) -> Result<Vec<Streamed>> {
    let mut g = Vec::new();
    if peek.is_none() {
        *peek = s.next_entry()?;
    }
    while let Some(x) = peek.take() {
        if g.first()
            .is_some_and(|f: &Streamed| f.entry.entry.hash != x.entry.entry.hash)
        {
            *peek = Some(x);
            break;
        }
        g.push(x);
        *peek = s.next_entry()?;
    }
    Ok(g)
}

impl Repository {
    /// Start a collection: flush pending blobs and snapshot the index for marking.
    ///
    /// # Errors
    /// A failed flush.
    pub fn gc_marker(&self) -> Result<Marker<'_>> {
        let excl = self.gc_lock.write();
        self.flush()?;
        let set = self.index.read().clone();
        let bits = set
            .files()
            .iter()
            .map(|f| vec![0u64; f.count().div_ceil(64) as usize])
            .collect();
        Ok(Marker {
            _excl: excl,
            backend: self.backend.clone(),
            set,
            bits,
            live: 0,
            missing: 0,
        })
    }

    /// Free what the marks say is dead. See the module doc for the order of steps.
    ///
    /// # Errors
    /// I/O failures or damage met on the way (the repository then holds at worst garbage),
    /// and a repository that changed since the marker was made.
    pub fn collect(&self, marker: Marker<'_>, opts: &GcOptions) -> Result<GcReport> {
        let backend = &*self.backend;
        let mut rep = GcReport {
            live_blobs: marker.live,
            missing_marks: marker.missing,
            ..GcReport::default()
        };
        let set = marker.set.clone();
        let now: Vec<String> = backend.list(index::INDEX_PREFIX)?;
        let snap: HashSet<&str> = set.files().iter().map(|f| f.name.as_str()).collect();
        if now.iter().any(|n| !snap.contains(n.as_str())) || !self.w.lock().pending.is_empty() {
            return Err(Error::Repo(
                "the repository changed since marking began; collect again".into(),
            ));
        }

        // 1. Live and total bytes per pack. Entries of one pack at one offset named by
        // several indexes count once.
        let mut usage: HashMap<PackId, PackUse> = HashMap::new();
        {
            let mut s = set.stream(backend);
            let mut peek = None;
            loop {
                let g = next_group(&mut s, &mut peek)?;
                if g.is_empty() {
                    break;
                }
                let live = g.iter().any(|x| marker.is_marked(x));
                let mut seen: Vec<(PackId, u64)> = Vec::new();
                for x in &g {
                    let key = (x.entry.pack, x.entry.entry.offset);
                    if !seen.contains(&key) {
                        seen.push(key);
                        usage.entry(key.0).or_default().total += x.entry.entry.stored_len as u64;
                    }
                }
                if live {
                    usage.entry(g[0].entry.pack).or_default().live +=
                        g[0].entry.entry.stored_len as u64;
                }
            }
        }
        let mut dead: HashSet<PackId> = HashSet::new();
        let mut rewrite: HashSet<PackId> = HashSet::new();
        for (id, u) in &usage {
            if u.live == 0 {
                dead.insert(*id);
            } else if (u.live as f64) < opts.rewrite_below * u.total as f64 {
                rewrite.insert(*id);
            }
        }
        // Packs no index names: left by a crash before their index was written.
        for n in backend.list("packs/")? {
            if let Some(id) = PackId::from_object_name(&n)
                && !usage.contains_key(&id)
            {
                dead.insert(id);
            }
        }
        if dead.is_empty() && rewrite.is_empty() && set.files().len() <= 1 {
            return Ok(rep);
        }

        // 2 and 3. Copy live blobs out of rewritten packs and write the merged index in one
        // pass over the indexes; the index object is committed only after its packs.
        let name = index::index_name(self.next_seq.fetch_add(1, Ordering::Relaxed))?;
        let target = self.config.pack_target;
        let mut written = 0u64;
        let mut new_packs = 0u64;
        let mut copied = 0u64;
        let stop = opts.stop_after;
        let r = backend.put_stream(&name, &mut |out| {
            let mut w = IndexWriter::new(out)?;
            let mut s = set.stream(backend);
            let mut peek = None;
            let mut open: Option<(PackId, PackWriter)> = None;
            let mut write_pack = |p: (PackId, PackWriter)| -> Result<()> {
                let (bytes, _) = p.1.finish();
                backend.put_if_absent(&p.0.object_name(), &bytes)?;
                written += bytes.len() as u64;
                new_packs += 1;
                Ok(())
            };
            loop {
                let g = next_group(&mut s, &mut peek)?;
                if g.is_empty() {
                    break;
                }
                let live = g.iter().any(|x| marker.is_marked(x));
                // The newest entry in a pack that stays; else a copy if the blob is live.
                let keep = g
                    .iter()
                    .find(|x| !dead.contains(&x.entry.pack) && !rewrite.contains(&x.entry.pack));
                let e: IndexEntry = match keep {
                    Some(x) => x.entry,
                    None if live => {
                        let src = g
                            .iter()
                            .find(|x| !dead.contains(&x.entry.pack))
                            .unwrap_or(&g[0])
                            .entry;
                        let stored = backend.get_range(
                            &src.pack.object_name(),
                            src.entry.offset,
                            src.entry.stored_len as usize,
                        )?;
                        if crc32c::crc32c(&stored) != src.entry.crc {
                            return Err(crate::repo::damaged(
                                &src.entry.hash,
                                "damaged in its pack; not copied",
                            ));
                        }
                        let p = match open {
                            Some(ref mut p) => p,
                            None => open.insert((PackId::random()?, PackWriter::new())),
                        };
                        let ne = p.1.add(
                            src.entry.hash,
                            src.entry.kind,
                            src.entry.codec,
                            &stored,
                            src.entry.raw_len,
                        );
                        let id = p.0;
                        if p.1.len() >= target {
                            write_pack(open.take().expect("open"))?;
                        }
                        copied += 1;
                        IndexEntry {
                            pack: id,
                            entry: ne,
                        }
                    }
                    None => continue,
                };
                w.push(&e)?;
            }
            if let Some(p) = open.take() {
                write_pack(p)?;
            }
            if stop == Some(GcStep::PacksWritten) {
                return Err(Error::Internal(STOPPED.into()));
            }
            w.finish()?;
            Ok(())
        });
        rep.packs_written = new_packs;
        rep.blobs_copied = copied;
        rep.written_bytes = written;
        rep.packs_rewritten = rewrite.len() as u64;
        match r {
            Err(Error::Internal(m)) if m == STOPPED => {
                rep.stopped = stop;
                return Ok(rep);
            }
            r => r?,
        };
        rep.written_bytes += backend.size(&name)?;
        if self.stop_at(&mut rep, opts, GcStep::IndexWritten)? {
            return Ok(rep);
        }

        // 4. Old index objects.
        for (i, f) in set.files().iter().enumerate() {
            backend.delete(&f.name)?;
            rep.freed_bytes += f.size;
            rep.index_objects_deleted += 1;
            if i == 0 && self.stop_at(&mut rep, opts, GcStep::OneIndexDeleted)? {
                return Ok(rep);
            }
        }
        if self.stop_at(&mut rep, opts, GcStep::IndexesDeleted)? {
            return Ok(rep);
        }

        // 5. Dead and rewritten packs.
        let mut gone: Vec<PackId> = dead.iter().chain(rewrite.iter()).copied().collect();
        gone.sort();
        for (i, id) in gone.iter().enumerate() {
            let n = id.object_name();
            match backend.size(&n) {
                Ok(sz) => rep.freed_bytes += sz,
                Err(e) if crate::repo::backend::is_missing(&e) => continue,
                Err(e) => return Err(e),
            }
            backend.delete(&n)?;
            rep.packs_deleted += 1;
            if i == 0 && self.stop_at(&mut rep, opts, GcStep::OnePackDeleted)? {
                return Ok(rep);
            }
        }
        self.refresh()?;
        Ok(rep)
    }

    /// At a stop point: refresh the view (as a restarted process would see the repository)
    /// and say whether to stop.
    fn stop_at(&self, rep: &mut GcReport, opts: &GcOptions, step: GcStep) -> Result<bool> {
        if opts.stop_after == Some(step) {
            rep.stopped = Some(step);
            self.refresh()?;
            return Ok(true);
        }
        Ok(false)
    }
}
