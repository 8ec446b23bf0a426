//! `receive`: make the point a stream carries in this store (same name and id, restorable),
//! and with `--apply DISK=IMAGE` keep a replica image of a disk at it (`replica`).
//!
//! Nothing half-applied:
//! - Everything the header can tell is checked before anything is written: the block size,
//!   a point that exists already, a base this store does not hold, a live disk of the same
//!   name, a pending partial receive the stream does not resume, a replica image modified
//!   since its last apply.
//! - Blocks go into the repository as they arrive (checked against their hashes), but the
//!   point's record is written only after the end record's digest checked out and every
//!   disk's map equals the sender's (maps are canonical: the same contents, the same root).
//! - A stream that stops short (cut, damaged) keeps what arrived as a partial receive (the
//!   maps built so far are protected from garbage collection) and the error names a resume
//!   token; `receive --abort` discards it.

use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::backup::Owner;
use crate::backup::data::{map_of, point_map};
use crate::error::{Error, Result};
use crate::repo::compress;
use crate::repo::map::MapRoot;
use crate::repo::repository::StoredBlob;
use crate::repo::{BlobKind, Hash};
use crate::store::records::{BackupInfo, BackupKind, RefDisk, RefRecord, RefState};
use crate::store::replication::{PartialDisk, PartialReceive};
use crate::store::{Store, now_unix};

use super::replica::{self, ApplyReport};
use super::stream::{Codec, Record, StreamHeader, StreamReader};
use super::token::ResumeToken;

/// Map updates applied at a time (as a backup does): bounds memory.
const UPDATE_BATCH: usize = 1 << 16;
/// Received bytes between two saves of the partial state: what a killed receiver redoes.
const SAVE_EVERY: u64 = 256 << 20;

/// What `receive` is asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveArgs {
    /// Keep a replica image of these disks at the received point.
    pub apply: Vec<(String, PathBuf)>,
}

/// What a receive did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReceiveReport {
    pub point: String,
    pub id: String,
    pub base: Option<String>,
    pub resumed: bool,
    pub blocks: u64,
    pub stream_bytes: u64,
    pub stored_bytes: u64,
    pub applied: Vec<ApplyReport>,
    /// Interrupted applies this receive finished first.
    pub finished: Vec<ApplyReport>,
}

fn refuse(why: impl Into<String>) -> Error {
    Error::Replication(why.into())
}

/// Receive one stream from `input`.
///
/// # Errors
/// `Replication` naming the reason for a refused or damaged stream (the store then holds no
/// new point; a damaged or cut one keeps what arrived for a resume); I/O failures.
pub fn receive(
    owner: &dyn Owner,
    args: &ReceiveArgs,
    input: &mut dyn Read,
) -> Result<ReceiveReport> {
    let store = owner.store();
    let data = &owner.backup_state().data;
    let _op = owner.lock_ops();
    // Held until the point is committed (or the partial receive kept and published).
    let guard = crate::backup::shared::WriteGuard::take(store, data, "receive")?;
    let finished = replica::finish_interrupted(store, data)?;
    let targets = replica::check_targets(store, &args.apply)?;
    let (mut reader, header) = StreamReader::new(input)?;
    let plan = check_header(store, &header, &args.apply)?;
    let mut rx = Receiver::start(store, &header, plan)?;
    let before = data.repo.added().1;
    let result = rx.run(owner, &mut reader);
    let resumed = header.resume.is_some();
    if let Err(e) = result {
        // Keep what arrived (every record before the failure was whole and checked).
        let kept = rx.save(owner, reader.offset());
        return Err(match kept {
            Ok(Some(token)) => refuse(format!(
                "{e}; the {} block(s) received are kept: on the sending host run `vmref send --resume {token}` \
                 and pipe it here, or discard them with `vmref receive --abort`",
                rx.blocks_total
            )),
            Ok(None) => e,
            Err(save) => refuse(format!(
                "{e} (and keeping the partial receive failed: {save})"
            )),
        });
    }
    // The stream checked out whole: blocks and maps durable, then the point (commit point).
    data.repo.flush()?;
    let rec = rx.record(store, &header, data.repo.added().1 - before)?;
    for t in &targets {
        replica::intend(store, t, &rec)?;
    }
    guard.publish(&rec)?;
    store.write_ref(&rec)?;
    store.remove_partial_receive()?;
    let mut applied = Vec::new();
    for t in targets {
        applied.push(replica::apply(store, data, &t, &rec)?);
    }
    Ok(ReceiveReport {
        point: rec.name.clone(),
        id: rec.id.clone(),
        base: header.base.as_ref().map(|b| b.name.clone()),
        resumed,
        blocks: rx.blocks_total,
        stream_bytes: reader.offset(),
        stored_bytes: rec.backup.as_ref().map_or(0, |b| b.stored_bytes),
        applied,
        finished,
    })
}

/// `receive --abort`: finish interrupted applies, discard a partial receive and reclaim its
/// blocks.
///
/// # Errors
/// I/O failures; a replica whose apply cannot be finished.
pub fn abort(owner: &dyn Owner) -> Result<AbortReport> {
    let store = owner.store();
    let data = &owner.backup_state().data;
    let _op = owner.lock_ops();
    let finished = replica::finish_interrupted(store, data)?;
    let partial = store.partial_receive()?;
    store.remove_partial_receive()?;
    let freed_bytes = if partial.is_some() {
        match crate::backup::gc::collect(store, data) {
            Ok(r) => r.freed_bytes,
            Err(e) => {
                log::warn!("partial receive discarded, but its space was not reclaimed: {e}");
                0
            }
        }
    } else {
        0
    };
    Ok(AbortReport {
        discarded: partial.map(|p| p.point_name),
        freed_bytes,
        finished,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AbortReport {
    /// The point whose partial receive was discarded.
    pub discarded: Option<String>,
    pub freed_bytes: u64,
    pub finished: Vec<ApplyReport>,
}

/// Per disk: the map the records apply to.
struct Plan {
    starts: Vec<(MapRoot, u64)>,
    partial: Option<PartialReceive>,
}

fn check_header(store: &Store, h: &StreamHeader, apply: &[(String, PathBuf)]) -> Result<Plan> {
    if h.block_size != store.block_size() {
        return Err(refuse(format!(
            "the stream's block size is {} bytes, this store's {}: receive into a store made with \
             `vmref init --block-size {}`",
            h.block_size,
            store.block_size(),
            h.block_size
        )));
    }
    crate::names::validate(&h.point.name)?;
    let refs = store.refs()?;
    if let Some(r) = refs
        .iter()
        .find(|r| r.name == h.point.name || r.id == h.point.id)
    {
        return Err(refuse(format!(
            "point {} (id {}) already exists in this store (as {}, id {})",
            h.point.name, h.point.id, r.name, r.id
        )));
    }
    let live = store.disk_names()?;
    for d in &h.disks {
        crate::names::validate(&d.name)?;
        if live.contains(&d.name) {
            return Err(refuse(format!(
                "disk {} is a live disk of this store: received points of it would mix two disks' \
                 tracking; receive into another store",
                d.name
            )));
        }
    }
    for (disk, _) in apply {
        if !h.disks.iter().any(|d| &d.name == disk) {
            return Err(refuse(format!(
                "--apply {disk}=...: the stream has no disk {disk} (it has {})",
                h.disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let base = match &h.base {
        None => None,
        Some(b) => {
            let held = refs
                .iter()
                .find(|r| r.id == b.id && r.state == RefState::Restorable);
            match held {
                Some(r) => Some(r.clone()),
                None => {
                    let newest = refs
                        .iter()
                        .rfind(|r| r.state == RefState::Restorable)
                        .map_or("none".to_string(), |r| format!("{} (id {})", r.name, r.id));
                    return Err(refuse(format!(
                        "the stream holds the changes since point {} (id {}), which this store does not hold \
                         (its newest restorable point: {newest}); send with --since one of this store's points, \
                         or a full stream",
                        b.name, b.id
                    )));
                }
            }
        }
    };
    let bs = store.block_size() as u64;
    let mut starts = Vec::new();
    for d in &h.disks {
        let nblocks = d.size.div_ceil(bs);
        if d.incremental {
            let b = base.as_ref().ok_or_else(|| {
                refuse(format!(
                    "stream damaged: disk {} is incremental but the stream has no base",
                    d.name
                ))
            })?;
            match b.disks.get(&d.name) {
                Some(bd) if bd.size == d.size => starts.push(map_of(store, b, &d.name)?),
                _ => {
                    return Err(refuse(format!(
                        "the stream holds disk {}'s changes since {}, whose copy here has no such disk \
                         of {} bytes",
                        d.name, b.name, d.size
                    )));
                }
            }
        } else {
            starts.push((MapRoot::empty(nblocks), 0));
        }
    }
    let mut partial = store.partial_receive()?;
    if let Some(p) = &partial
        && refs.iter().any(|r| r.id == p.point_id)
    {
        // Its point was committed and the receive died before removing it.
        store.remove_partial_receive()?;
        partial = None;
    }
    let plan = match (partial, h.resume) {
        (None, None) => Plan {
            starts,
            partial: None,
        },
        (Some(p), Some(pos))
            if p.point_id == h.point.id
                && p.base_id == h.base.as_ref().map(|b| b.id.clone())
                && p.next_disk == pos.disk
                && p.next_block == pos.block =>
        {
            Plan {
                starts,
                partial: Some(p),
            }
        }
        (Some(p), _) => {
            return Err(refuse(format!(
                "a receive of point {} (id {}) stopped part way; resume it with the token `vmref receive` \
                 printed then (`vmref send --resume TOKEN`), or discard it with `vmref receive --abort`{}",
                p.point_name,
                p.point_id,
                match h.resume {
                    Some(pos) => format!(
                        " (this stream resumes at disk {} block {}; the partial receive is at disk {} block {})",
                        pos.disk, pos.block, p.next_disk, p.next_block
                    ),
                    None => String::new(),
                }
            )));
        }
        (None, Some(_)) => {
            return Err(refuse(format!(
                "the stream resumes a transfer of point {} (id {}) that this store has no partial receive of; \
                 send the point again without --resume",
                h.point.name, h.point.id
            )));
        }
    };
    Ok(plan)
}

/// The receive in progress: per disk the map so far.
struct Receiver {
    header: StreamHeader,
    header_json: String,
    maps: Vec<(MapRoot, u64)>,
    done: Vec<bool>,
    /// The disk records go to now, and the next block expected (records come in order).
    disk: Option<usize>,
    next_block: u64,
    batch: Vec<(u64, Hash)>,
    blocks_total: u64,
    /// Bytes received in earlier attempts (resume) and at the last save.
    earlier_bytes: u64,
    saved_at: u64,
    /// Whether anything arrived worth keeping.
    progressed: bool,
}

impl Receiver {
    fn start(store: &Store, header: &StreamHeader, plan: Plan) -> Result<Receiver> {
        let bs = store.block_size() as u64;
        let mut maps = plan.starts;
        let mut done = vec![false; header.disks.len()];
        let mut earlier_bytes = 0;
        let mut next_block = 0;
        let mut disk = None;
        let mut blocks_total = 0;
        if let Some(p) = &plan.partial {
            earlier_bytes = p.received_bytes;
            if p.disks.len() != header.disks.len() {
                return Err(refuse(
                    "the partial receive does not match the stream's disks",
                ));
            }
            for (i, pd) in p.disks.iter().enumerate() {
                let root = Hash::parse(&pd.root)
                    .ok_or_else(|| refuse("the partial receive's state is damaged"))?;
                maps[i] = (
                    MapRoot {
                        root,
                        nblocks: pd.size.div_ceil(bs),
                    },
                    pd.data_blocks,
                );
                done[i] = pd.done;
            }
            disk = Some(p.next_disk as usize);
            next_block = p.next_block;
            blocks_total = 0;
        }
        Ok(Receiver {
            header_json: serde_json::to_string(&StreamHeader {
                resume: None,
                ..header.clone()
            })
            .expect("headers serialize"),
            header: header.clone(),
            maps,
            done,
            disk,
            next_block,
            batch: Vec::new(),
            blocks_total,
            earlier_bytes,
            saved_at: 0,
            progressed: false,
        })
    }

    fn damaged(&self, at: u64, why: impl std::fmt::Display) -> Error {
        refuse(format!("stream damaged at record {at}: {why}"))
    }

    /// Fold the batch into the current disk's map.
    fn apply(&mut self, owner: &dyn Owner) -> Result<()> {
        let Some(i) = self.disk else {
            return Ok(());
        };
        if self.batch.is_empty() {
            return Ok(());
        }
        let maps = &owner.backup_state().data.maps;
        let (mut map, mut data_blocks) = self.maps[i];
        for (b, h) in &self.batch {
            let old = maps.lookup(&map, *b)?;
            match (old.is_zero(), h.is_zero()) {
                (true, false) => data_blocks += 1,
                (false, true) => data_blocks -= 1,
                _ => {}
            }
        }
        map = maps.update(&map, self.batch.drain(..))?;
        self.maps[i] = (map, data_blocks);
        Ok(())
    }

    fn run(&mut self, owner: &dyn Owner, r: &mut StreamReader<&mut dyn Read>) -> Result<()> {
        let repo = &owner.backup_state().data.repo;
        let bs = owner.store().block_size();
        loop {
            let rec = r.next_record()?;
            let at = r.records();
            match rec {
                Record::Disk { index } => {
                    let i = index as usize;
                    if i >= self.header.disks.len() || self.done[i] {
                        return Err(self.damaged(at, format!("unexpected disk {index}")));
                    }
                    if self.disk != Some(i) {
                        if self.disk.is_some_and(|d| !self.done[d]) {
                            return Err(self.damaged(at, "a disk began before the last ended"));
                        }
                        self.disk = Some(i);
                        self.next_block = 0;
                    }
                }
                Record::Block {
                    block,
                    codec,
                    raw_len,
                    hash,
                    data,
                } => {
                    let i = self.current(at)?;
                    self.check_block(at, i, block, 1)?;
                    if raw_len != bs || hash.is_zero() {
                        return Err(self.damaged(at, format!("block {block} of {raw_len} bytes")));
                    }
                    let blob = StoredBlob {
                        codec: match codec {
                            Codec::Raw => compress::Codec::Raw,
                            Codec::Zstd => compress::Codec::Zstd,
                        },
                        bytes: data,
                        raw_len,
                    };
                    // The stream names blocks by their plain BLAKE3; the map names them by
                    // this repository's id (keyed when it is encrypted).
                    let Some(id) = repo.put_stored(BlobKind::Data, &hash, &blob)? else {
                        return Err(self.damaged(
                            at,
                            format!(
                                "block {block} of disk {} does not match its hash",
                                self.header.disks[i].name
                            ),
                        ));
                    };
                    self.batch.push((block, id));
                    self.next_block = block + 1;
                    self.blocks_total += 1;
                    self.progressed = true;
                }
                Record::Zero { block, count } => {
                    let i = self.current(at)?;
                    self.check_block(at, i, block, count)?;
                    for b in block..block + count {
                        self.batch.push((b, Hash::ZERO));
                        if self.batch.len() >= UPDATE_BATCH {
                            self.apply(owner)?;
                        }
                    }
                    self.next_block = block + count;
                    self.progressed = true;
                }
                Record::DiskEnd {
                    index,
                    data_blocks,
                    root,
                } => {
                    let i = self.current(at)?;
                    if index as usize != i {
                        return Err(
                            self.damaged(at, format!("end of disk {index} inside disk {i}"))
                        );
                    }
                    self.apply(owner)?;
                    let (map, ours) = self.maps[i];
                    // The sender's root is in the plain id space; an encrypted repository's
                    // map is in its keyed one, so only the counts compare there (each block
                    // was checked against its plain hash, and the stream by its digest).
                    let plain = repo.plain_ids();
                    if let Some(root) = root
                        && ((plain && root != map.root) || data_blocks != ours)
                    {
                        return Err(self.damaged(
                            at,
                            format!(
                                "disk {}'s map here ({}, {ours} data blocks) is not the sender's ({root}, {data_blocks})",
                                self.header.disks[i].name, map.root
                            ),
                        ));
                    }
                    self.done[i] = true;
                    self.next_block = 0;
                    self.progressed = true;
                }
                Record::End { .. } => {
                    if let Some(i) = self.done.iter().position(|d| !d) {
                        return Err(self.damaged(
                            at,
                            format!(
                                "the stream ended without disk {}",
                                self.header.disks[i].name
                            ),
                        ));
                    }
                    return r.expect_eof();
                }
            }
            if self.batch.len() >= UPDATE_BATCH {
                self.apply(owner)?;
            }
            if r.offset() - self.saved_at >= SAVE_EVERY {
                self.save(owner, r.offset())?;
            }
        }
    }

    fn current(&self, at: u64) -> Result<usize> {
        match self.disk {
            Some(i) if !self.done[i] => Ok(i),
            _ => Err(self.damaged(at, "a block record outside any disk")),
        }
    }

    fn check_block(&self, at: u64, i: usize, block: u64, count: u64) -> Result<()> {
        let nblocks = self.header.disks[i]
            .size
            .div_ceil(self.header.block_size as u64);
        if block < self.next_block || count == 0 || block.saturating_add(count) > nblocks {
            return Err(self.damaged(
                at,
                format!(
                    "blocks {block}+{count} out of order or outside disk {} of {nblocks} blocks",
                    self.header.disks[i].name
                ),
            ));
        }
        Ok(())
    }

    /// Make what arrived durable and record where to resume. Returns the resume token, or
    /// none when nothing arrived worth keeping.
    fn save(&mut self, owner: &dyn Owner, offset: u64) -> Result<Option<String>> {
        let store = owner.store();
        if !self.progressed && store.partial_receive()?.is_none() {
            return Ok(None);
        }
        self.apply(owner)?;
        owner.backup_state().data.repo.flush()?;
        let bs = store.block_size() as u64;
        let (next_disk, next_block) = match self.disk {
            Some(i) if !self.done[i] => (i as u32, self.next_block),
            _ => match self.done.iter().position(|d| !d) {
                Some(i) => (i as u32, 0),
                None => (self.done.len() as u32, 0),
            },
        };
        let received_bytes = self.earlier_bytes + offset;
        let p = PartialReceive {
            header: self.header_json.clone(),
            point_name: self.header.point.name.clone(),
            point_id: self.header.point.id.clone(),
            source_store: self.header.source_store.clone(),
            base_id: self.header.base.as_ref().map(|b| b.id.clone()),
            next_disk,
            next_block,
            disks: self
                .header
                .disks
                .iter()
                .zip(&self.maps)
                .zip(&self.done)
                .map(|((d, (m, n)), done)| PartialDisk {
                    name: d.name.clone(),
                    size: d.size,
                    root: m.root.to_hex(),
                    data_blocks: *n,
                    done: *done,
                })
                .collect(),
            received_bytes,
            updated_unix: now_unix(),
        };
        crate::backup::shared::publish_partial(store, &owner.backup_state().data, &p)?;
        store.write_partial_receive(&p)?;
        self.saved_at = offset;
        let _ = bs;
        Ok(Some(
            ResumeToken {
                store: self.header.source_store.clone(),
                point: self.header.point.name.clone(),
                point_id: self.header.point.id.clone(),
                base: self.header.base.as_ref().map(|b| b.name.clone()),
                base_id: self.header.base.as_ref().map(|b| b.id.clone()),
                disk: next_disk,
                block: next_block,
            }
            .encode(),
        ))
    }

    /// The point's record, once every disk is done.
    fn record(&self, store: &Store, h: &StreamHeader, stored_bytes: u64) -> Result<RefRecord> {
        let serial = store.next_serial()?;
        let incremental = h.disks.iter().any(|d| d.incremental);
        Ok(RefRecord {
            name: h.point.name.clone(),
            id: h.point.id.clone(),
            serial,
            created_unix: h.point.created_unix,
            owner: h.point.owner.clone(),
            state: RefState::Restorable,
            disks: h
                .disks
                .iter()
                .zip(&self.maps)
                .map(|(d, (m, n))| {
                    (
                        d.name.clone(),
                        RefDisk {
                            seq: d.seq,
                            size: d.size,
                            map: Some(point_map(m, *n)),
                        },
                    )
                })
                .collect(),
            backup: Some(BackupInfo {
                kind: if incremental {
                    BackupKind::Incremental
                } else {
                    BackupKind::Full
                },
                since: h
                    .base
                    .as_ref()
                    .filter(|_| incremental)
                    .map(|b| b.name.clone()),
                stored_blocks: self.blocks_total,
                stored_bytes,
                finished_unix: now_unix(),
            }),
            origin: Some(h.source_store.clone()),
        })
    }
}
