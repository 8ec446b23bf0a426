//! `send`: write a point as a stream (`stream`), whole or as its differences from a base.
//!
//! - A restorable point's differences come from the point maps: `MapReader::diff` skips every
//!   subtree the two maps share, so the cost follows what changed, and each block travels as
//!   stored in the repository (no recompression).
//! - `--checkpoint NAME` streams a running disk without any local backup: a checkpoint (the
//!   same copy-on-write a backup uses) gives a stable image, tracking gives the blocks changed
//!   since the base, and once the whole stream is written NAME is recorded as a plain point,
//!   so the next send can be `--since NAME`. A send that fails leaves no point NAME behind:
//!   the receiver never got it.

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::backup::Owner;
use crate::backup::data::map_of;
use crate::backup::run::data_runs;
use crate::error::{Error, Result};
use crate::image::ImageSource;
use crate::repo::compress::{self, Compression};
use crate::repo::map::{MapBuilder, MapRoot};
use crate::repo::{BlobKind, BlobStore, Hash};
use crate::store::Store;
use crate::store::records::{RefRecord, RefState};
use crate::track::seqmap::BlockRun;

use super::stream::{
    Codec, Position, StreamBase, StreamDisk, StreamHeader, StreamPoint, StreamWriter,
};
use super::token::ResumeToken;

/// Blocks read from a checkpoint at a time.
const CHUNK: u64 = 4 << 20;
/// zstd level of blocks read from a running disk: the sender's CPU is the VM host's.
const LIVE_LEVEL: i32 = 1;

/// What to send.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendArgs {
    /// A restorable point.
    pub point: Option<String>,
    /// Or: checkpoint the live disks as this new point and send that.
    pub checkpoint: Option<String>,
    /// Owner of the checkpoint's point.
    pub owner: Option<String>,
    pub since: Option<String>,
    /// Or: continue the transfer a `receive` stopped, from its token.
    pub resume: Option<String>,
}

/// What a send wrote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendReport {
    pub point: String,
    pub base: Option<String>,
    pub blocks: u64,
    pub zero_blocks: u64,
    pub bytes: u64,
}

/// Counts and the writer, shared by both kinds of send.
struct Out<W: Write> {
    w: StreamWriter<W>,
    blocks: u64,
    zero_blocks: u64,
    /// A run of zero blocks not yet written (coalesced).
    zeros: Option<(u64, u64)>,
}

impl<W: Write> Out<W> {
    fn zero(&mut self, b: u64) -> Result<()> {
        self.zero_blocks += 1;
        match &mut self.zeros {
            Some((s, n)) if *s + *n == b => *n += 1,
            _ => {
                self.flush_zeros()?;
                self.zeros = Some((b, 1));
            }
        }
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if let Some((s, n)) = self.zeros.take() {
            self.w.zero(s, n)?;
        }
        Ok(())
    }

    fn block(&mut self, b: u64, codec: Codec, raw_len: u32, h: &Hash, data: &[u8]) -> Result<()> {
        self.flush_zeros()?;
        self.blocks += 1;
        self.w.block(b, codec, raw_len, h, data)
    }
}

fn stream_codec(c: compress::Codec) -> Codec {
    match c {
        compress::Codec::Raw => Codec::Raw,
        compress::Codec::Zstd => Codec::Zstd,
    }
}

fn find_by_id(store: &Store, id: &str) -> Result<Option<RefRecord>> {
    Ok(store.refs()?.into_iter().find(|r| r.id == id))
}

/// Send per `args` to `out`.
///
/// # Errors
/// A point that does not exist or is not restorable, a bad token, write failures (a broken
/// pipe is one line: the receiving end closed the stream).
pub fn send(owner: &dyn Owner, args: &SendArgs, out: &mut dyn Write) -> Result<SendReport> {
    match (&args.point, &args.checkpoint, &args.resume) {
        (Some(p), None, None) => send_point(owner, p, args.since.as_deref(), None, out),
        (None, Some(c), None) => {
            send_checkpoint(owner, c, args.owner.as_deref(), args.since.as_deref(), out)
        }
        (None, None, Some(t)) => {
            if args.since.is_some() {
                return Err(Error::BadArgument(
                    "--resume takes the base from the token: drop --since".into(),
                ));
            }
            let t = ResumeToken::decode(t)?;
            let store = owner.store();
            if t.store != store.meta().id {
                return Err(Error::BadArgument(format!(
                    "the resume token is for store {}, this is store {}",
                    t.store,
                    store.meta().id
                )));
            }
            let point = match find_by_id(store, &t.point_id)? {
                Some(r) if r.name == t.point && r.state == RefState::Restorable => r,
                _ => {
                    return Err(Error::BadArgument(format!(
                        "the resume token names point {} (id {}), which is not a restorable point here",
                        t.point, t.point_id
                    )));
                }
            };
            let base = match (&t.base, &t.base_id) {
                (Some(n), Some(id)) => match find_by_id(store, id)? {
                    Some(r) if &r.name == n && r.state == RefState::Restorable => Some(r.name),
                    _ => {
                        return Err(Error::BadArgument(format!(
                            "the resume token names base {n} (id {id}), which is not a restorable point here"
                        )));
                    }
                },
                (None, None) => None,
                _ => return Err(Error::BadArgument("the resume token is not valid".into())),
            };
            if t.disk as usize > point.disks.len() {
                return Err(Error::BadArgument(format!(
                    "the resume token's disk {} is not in point {}",
                    t.disk, point.name
                )));
            }
            let pos = Position {
                disk: t.disk,
                block: t.block,
            };
            send_point(owner, &point.name, base.as_deref(), Some(pos), out)
        }
        _ => Err(Error::BadArgument(
            "send wants one of POINT, --checkpoint NAME or --resume TOKEN".into(),
        )),
    }
}

fn header_of(store: &Store, rec: &RefRecord, base: Option<&RefRecord>) -> StreamHeader {
    StreamHeader {
        block_size: store.block_size(),
        source_store: store.meta().id.clone(),
        point: StreamPoint {
            name: rec.name.clone(),
            id: rec.id.clone(),
            created_unix: rec.created_unix,
            owner: rec.owner.clone(),
        },
        base: base.map(|b| StreamBase {
            name: b.name.clone(),
            id: b.id.clone(),
        }),
        disks: rec
            .disks
            .iter()
            .map(|(name, d)| StreamDisk {
                name: name.clone(),
                size: d.size,
                seq: d.seq,
                incremental: base
                    .and_then(|b| b.disks.get(name))
                    .is_some_and(|bd| bd.size == d.size),
            })
            .collect(),
        resume: None,
    }
}

/// Stream restorable point `name` from the repository.
fn send_point(
    owner: &dyn Owner,
    name: &str,
    since: Option<&str>,
    resume: Option<Position>,
    out: &mut dyn Write,
) -> Result<SendReport> {
    let store = owner.store();
    let rec = store.read_ref(name)?;
    if rec.state != RefState::Restorable {
        return Err(Error::NotRestorable(name.to_string()));
    }
    let base = match since {
        Some(s) => {
            let b = store.read_ref(s)?;
            if b.state != RefState::Restorable {
                return Err(Error::BadArgument(format!(
                    "--since {s}: a point's differences come from its backup data, and {s} has none; \
                     send it with --checkpoint NAME --since {s} from the live disks instead"
                )));
            }
            Some(b)
        }
        None => None,
    };
    let data = &owner.backup_state().data;
    let mut header = header_of(store, &rec, base.as_ref());
    header.resume = resume;
    let disks = header.disks.clone();
    let mut o = Out {
        w: StreamWriter::new(out, &header)?,
        blocks: 0,
        zero_blocks: 0,
        zeros: None,
    };
    let first = resume.map_or(0, |p| p.disk as usize);
    for (i, d) in disks.iter().enumerate().skip(first) {
        let from = match resume {
            Some(p) if p.disk as usize == i => p.block,
            _ => 0,
        };
        o.w.disk(i as u32)?;
        let (map, data_blocks) = map_of(store, &rec, &d.name)?;
        // A stream names blocks by their plain BLAKE3 and carries the plain map's root. An
        // encrypted repository's ids and roots are keyed, so it builds the plain map of a
        // whole disk as it goes (hash-only: nothing stored); an incremental or resumed disk
        // goes without a root (the receiver checks each block and the stream's digest).
        let plain = data.repo.plain_ids();
        let mut plain_map = (!plain && !d.incremental && from == 0)
            .then(|| MapBuilder::new(&HashOnly, map.nblocks));
        let send_hash = |o: &mut Out<&mut dyn Write>,
                         pm: &mut Option<MapBuilder<'_, HashOnly>>,
                         b: u64,
                         h: Hash|
         -> Result<()> {
            if h.is_zero() {
                return o.zero(b);
            }
            let s = data.repo.get_stored(BlobKind::Data, &h)?;
            let ph = data.repo.stream_hash(&h, &s)?;
            if let Some(m) = pm.as_mut() {
                m.push(b, ph)?;
            }
            o.block(b, stream_codec(s.codec), s.raw_len, &ph, &s.bytes)
        };
        if d.incremental {
            let b = base.as_ref().expect("incremental disks have a base");
            let (bmap, _) = map_of(store, b, &d.name)?;
            data.maps.diff(&bmap, &map, |blk, _, h| {
                if blk < from {
                    return Ok(());
                }
                send_hash(&mut o, &mut plain_map, blk, h)
            })?;
        } else {
            for x in data.maps.data_runs(&map, from..map.nblocks) {
                let (blk, h) = x?;
                send_hash(&mut o, &mut plain_map, blk, h)?;
            }
        }
        o.flush_zeros()?;
        let root = if plain {
            Some(map.root)
        } else {
            plain_map
                .map(|m| m.finish())
                .transpose()?
                .map(|m: MapRoot| m.root)
        };
        o.w.disk_end(i as u32, data_blocks, root)?;
    }
    let (blocks, zero_blocks) = (o.blocks, o.zero_blocks);
    let bytes = o.w.end()?;
    Ok(SendReport {
        point: rec.name,
        base: base.map(|b| b.name),
        blocks,
        zero_blocks,
        bytes,
    })
}

/// A `BlobStore` that only names blobs: builds a map's root hash without storing it.
struct HashOnly;

impl BlobStore for HashOnly {
    fn put(&self, _: BlobKind, data: &[u8]) -> Result<Hash> {
        Ok(Hash::of(data))
    }
    fn get(&self, _: BlobKind, h: &Hash) -> Result<Vec<u8>> {
        Err(Error::Internal(format!("a hash-only map has no node {h}")))
    }
}

/// Checkpoint the live disks as point `name`, stream them (the blocks changed since `since`
/// where tracking knows them, else every data block), then record `name` as a plain point.
fn send_checkpoint(
    owner: &dyn Owner,
    name: &str,
    point_owner: Option<&str>,
    since: Option<&str>,
    out: &mut dyn Write,
) -> Result<SendReport> {
    crate::names::validate(name)?;
    let store = owner.store();
    let _op = owner.lock_ops();
    if store.ref_exists(name) {
        return Err(Error::RefExists(name.to_string()));
    }
    let base = since.map(|s| store.read_ref(s)).transpose()?;
    let cp = owner.checkpoint_locked(name, point_owner)?;
    let result = (|| -> Result<SendReport> {
        // Which disks go as differences: tracking must vouch for every change since the base.
        let mut plans: Vec<Option<Vec<BlockRun>>> = Vec::new();
        let mut header = header_of(store, &cp.rec, base.as_ref());
        for d in header.disks.iter_mut() {
            let (live, _) = cp.disks.get(&d.name).ok_or_else(|| {
                Error::Internal(format!("checkpoint {name} has no disk {}", d.name))
            })?;
            let plan = match (&base, d.incremental) {
                (Some(b), true) => {
                    let bd = &b.disks[&d.name];
                    match live.tracker().changed_since(&b.name, bd.seq) {
                        Ok(runs) => Some(runs),
                        Err(e) => {
                            log::warn!("{e}: sending disk {} whole", d.name);
                            None
                        }
                    }
                }
                _ => None,
            };
            d.incremental = plan.is_some();
            plans.push(plan);
        }
        let bs = store.block_size() as u64;
        let mut o = Out {
            w: StreamWriter::new(&mut *out, &header)?,
            blocks: 0,
            zero_blocks: 0,
            zeros: None,
        };
        for (i, (d, plan)) in header.disks.iter().zip(plans).enumerate() {
            o.w.disk(i as u32)?;
            let image = cp.image(&d.name)?;
            let nblocks = d.size.div_ceil(bs);
            let (runs, incremental) = match plan {
                Some(r) => (r, true),
                None => (data_runs(&image, store.block_size())?, false),
            };
            let mut builder = (!incremental).then(|| MapBuilder::new(&HashOnly, nblocks));
            let mut data_blocks = 0u64;
            for r in &runs {
                let end = (r.start + r.count).min(nblocks);
                let mut b = r.start;
                while b < end {
                    let n = (end - b).min((CHUNK / bs).max(1));
                    let off = b * bs;
                    let len = (n * bs).min(d.size - off) as usize;
                    let mut buf = vec![0u8; (n * bs) as usize];
                    let got = image.read_at(&mut buf[..len], off)?;
                    if got != len {
                        return Err(Error::ShortRead {
                            what: format!("checkpoint of disk {}", d.name),
                            offset: off + got as u64,
                        });
                    }
                    for (k, enc) in encode_blocks(&buf, bs as usize).into_iter().enumerate() {
                        let blk = b + k as u64;
                        match enc {
                            None if incremental => o.zero(blk)?,
                            None => {}
                            Some((h, codec, bytes)) => {
                                data_blocks += 1;
                                if let Some(m) = builder.as_mut() {
                                    m.push(blk, h)?;
                                }
                                o.block(blk, stream_codec(codec), bs as u32, &h, &bytes)?;
                            }
                        }
                    }
                    b += n;
                }
            }
            o.flush_zeros()?;
            let root = builder
                .map(|m| m.finish())
                .transpose()?
                .map(|m: MapRoot| m.root);
            // An incremental's data-block count is the receiver's to work out (it has the
            // base's map); the field then carries the blocks sent.
            o.w.disk_end(i as u32, data_blocks, root)?;
        }
        let (blocks, zero_blocks) = (o.blocks, o.zero_blocks);
        let bytes = o.w.end()?;
        Ok(SendReport {
            point: name.to_string(),
            base: base.as_ref().map(|b| b.name.clone()),
            blocks,
            zero_blocks,
            bytes,
        })
    })();
    owner.backup_state().end_checkpoint(name);
    let report = result?;
    // Streamed whole: the point exists from now on, as metadata (its data is the receiver's).
    store.write_ref(&RefRecord {
        state: RefState::Plain,
        ..cp.rec.clone()
    })?;
    Ok(report)
}

/// Hash and compress the blocks of `chunk` on every core; `None` for an all-zero block.
fn encode_blocks(chunk: &[u8], bs: usize) -> Vec<Option<(Hash, compress::Codec, Vec<u8>)>> {
    let blocks: Vec<&[u8]> = chunk.chunks(bs).collect();
    let one = |b: &[u8]| {
        if crate::backup::is_zero(b) {
            None
        } else {
            let (c, bytes) = compress::compress(Compression::Zstd { level: LIVE_LEVEL }, b);
            Some((Hash::of(b), c, bytes))
        }
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
        .min(blocks.len().max(1));
    if threads <= 1 {
        return blocks.into_iter().map(one).collect();
    }
    let per = blocks.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = blocks
            .chunks(per)
            .map(|p| s.spawn(move || p.iter().map(|b| one(b)).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("compression thread panicked"))
            .collect()
    })
}
