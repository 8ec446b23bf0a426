//! The replication stream: what `vmref send` writes and `vmref receive` reads. Documented in
//! the man page (STREAM FORMAT) so that other tools can read it.
//!
//! ```text
//! stream  = header record* end
//! header  = "VMREFSTM" | version u16 | flags u16 (0) | json_len u32 | json | crc32c u32
//! record  = type u8 | len u32 | payload[len] | crc32c u32        (crc over type, len, payload)
//! ```
//! Little-endian throughout. The header's JSON is `StreamHeader`; the header CRC covers every
//! header byte before it. Record types (payloads):
//! - 1 `disk`: index u32 — the records up to the next `disk-end` are of disk `index` of the
//!   header's list, in increasing block order.
//! - 2 `block`: block u64 | codec u8 (0 raw, 1 zstd) | raw_len u32 | hash[32] | data — one
//!   whole block (the disk's short last block zero-padded), `hash` the BLAKE3 of its raw bytes.
//! - 3 `zero`: block u64 | count u64 — blocks that are holes (all zeros) at the point.
//! - 4 `disk-end`: index u32 | data_blocks u64 | has_root u8 | root[32] — the point map's root
//!   hash when the sender knows it (has_root 1; else 32 zero bytes): a receiver must build the
//!   same map, maps being canonical. An incremental sent from a checkpoint has no root (the
//!   sender has no base map), and its data_blocks counts the blocks sent.
//! - 5 `end`: records u64 | digest[32] — BLAKE3 of every byte of the stream before this record
//!   (header included), and the number of records before it.
//!
//! Damage is found at the record it hits (CRC, then the block hash), truncation at the missing
//! end record. Block data is compressed per block (zstd), so a resumed transfer can start at
//! any block.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::repo::Hash;

pub const MAGIC: &[u8; 8] = b"VMREFSTM";
pub const VERSION: u16 = 1;
/// Largest payload a record may claim: a 4 MiB block plus its fields. More is damage.
const MAX_PAYLOAD: u32 = (4 << 20) + 64;
/// Largest header JSON.
const MAX_HEADER: u32 = 1 << 20;

const T_DISK: u8 = 1;
const T_BLOCK: u8 = 2;
const T_ZERO: u8 = 3;
const T_DISK_END: u8 = 4;
const T_END: u8 = 5;

/// The point a stream carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPoint {
    pub name: String,
    pub id: String,
    pub created_unix: u64,
    pub owner: Option<String>,
}

/// The point a stream's differences are taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamBase {
    pub name: String,
    pub id: String,
}

/// One disk of the point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDisk {
    pub name: String,
    pub size: u64,
    /// The disk's sequence number in the point (what `replica promote` starts tracking from).
    pub seq: u32,
    /// True: the records apply to the base point's image of this disk; false: to an empty
    /// disk (a full copy: the disk is new or resized since the base).
    pub incremental: bool,
}

/// Where a resumed stream starts: disks before `disk` were sent whole before, and of disk
/// `disk` the blocks before `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub disk: u32,
    pub block: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    pub block_size: u32,
    /// The sending store's id.
    pub source_store: String,
    pub point: StreamPoint,
    pub base: Option<StreamBase>,
    pub disks: Vec<StreamDisk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Position>,
}

/// How a block's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Zstd,
}

impl Codec {
    fn code(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        }
    }
    fn from_code(c: u8) -> Option<Codec> {
        match c {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// One record as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Disk {
        index: u32,
    },
    Block {
        block: u64,
        codec: Codec,
        raw_len: u32,
        hash: Hash,
        data: Vec<u8>,
    },
    Zero {
        block: u64,
        count: u64,
    },
    DiskEnd {
        index: u32,
        data_blocks: u64,
        root: Option<Hash>,
    },
    End {
        records: u64,
        digest: Hash,
    },
}

fn stream_error(why: impl Into<String>) -> Error {
    Error::Replication(why.into())
}

/// Writes a stream: the header, then records, then `end`. Keeps the running digest.
pub struct StreamWriter<W: Write> {
    out: W,
    hasher: blake3::Hasher,
    records: u64,
    bytes: u64,
    scratch: Vec<u8>,
}

impl<W: Write> StreamWriter<W> {
    /// # Errors
    /// Write failures of `out`.
    pub fn new(mut out: W, header: &StreamHeader) -> Result<StreamWriter<W>> {
        let json = serde_json::to_vec(header).expect("headers serialize");
        let mut h = Vec::with_capacity(json.len() + 20);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&(json.len() as u32).to_le_bytes());
        h.extend_from_slice(&json);
        let crc = crc32c::crc32c(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        out.write_all(&h).map_err(write_error)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&h);
        Ok(StreamWriter {
            out,
            hasher,
            records: 0,
            bytes: h.len() as u64,
            scratch: Vec::new(),
        })
    }

    fn record(&mut self, kind: u8, fields: &[&[u8]]) -> Result<()> {
        let len: usize = fields.iter().map(|f| f.len()).sum();
        let s = &mut self.scratch;
        s.clear();
        s.push(kind);
        s.extend_from_slice(&(len as u32).to_le_bytes());
        for f in fields {
            s.extend_from_slice(f);
        }
        let crc = crc32c::crc32c(s);
        s.extend_from_slice(&crc.to_le_bytes());
        self.out.write_all(s).map_err(write_error)?;
        self.hasher.update(s);
        self.records += 1;
        self.bytes += s.len() as u64;
        Ok(())
    }

    /// # Errors
    /// Write failures.
    pub fn disk(&mut self, index: u32) -> Result<()> {
        self.record(T_DISK, &[&index.to_le_bytes()])
    }

    /// # Errors
    /// Write failures.
    pub fn block(
        &mut self,
        block: u64,
        codec: Codec,
        raw_len: u32,
        hash: &Hash,
        data: &[u8],
    ) -> Result<()> {
        self.record(
            T_BLOCK,
            &[
                &block.to_le_bytes(),
                &[codec.code()],
                &raw_len.to_le_bytes(),
                &hash.0,
                data,
            ],
        )
    }

    /// # Errors
    /// Write failures.
    pub fn zero(&mut self, block: u64, count: u64) -> Result<()> {
        self.record(T_ZERO, &[&block.to_le_bytes(), &count.to_le_bytes()])
    }

    /// # Errors
    /// Write failures.
    pub fn disk_end(&mut self, index: u32, data_blocks: u64, root: Option<Hash>) -> Result<()> {
        let (has, r) = match root {
            Some(h) => (1u8, h.0),
            None => (0u8, [0u8; 32]),
        };
        self.record(
            T_DISK_END,
            &[&index.to_le_bytes(), &data_blocks.to_le_bytes(), &[has], &r],
        )
    }

    /// Write the end record and flush. Returns the stream's length in bytes.
    ///
    /// # Errors
    /// Write failures.
    pub fn end(mut self) -> Result<u64> {
        let digest = *self.hasher.finalize().as_bytes();
        let records = self.records;
        self.record(T_END, &[&records.to_le_bytes(), &digest])?;
        self.out.flush().map_err(write_error)?;
        Ok(self.bytes)
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn write_error(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        stream_error("the receiving end closed the stream")
    } else {
        Error::io("write", "the stream")(e)
    }
}

/// Reads a stream, checking every record's CRC and the end record's digest.
pub struct StreamReader<R: Read> {
    input: R,
    hasher: blake3::Hasher,
    records: u64,
    offset: u64,
    ended: bool,
}

impl<R: Read> StreamReader<R> {
    /// Read and check the header.
    ///
    /// # Errors
    /// `Replication` for anything that is not a stream header of a version we read.
    pub fn new(mut input: R) -> Result<(StreamReader<R>, StreamHeader)> {
        let mut fixed = [0u8; 16];
        let got = read_full(&mut input, &mut fixed)?;
        if got == 0 {
            return Err(stream_error("the stream is empty"));
        }
        if got < 16 || &fixed[..8] != MAGIC {
            return Err(stream_error("not a vmref stream (bad magic)"));
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if version != VERSION {
            return Err(stream_error(format!(
                "stream format version {version}; this vmref reads version {VERSION}"
            )));
        }
        let flags = u16::from_le_bytes([fixed[10], fixed[11]]);
        if flags != 0 {
            return Err(stream_error(format!(
                "stream flags {flags:#x}: made by a newer vmref than this one"
            )));
        }
        let json_len = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
        if json_len > MAX_HEADER {
            return Err(stream_error("stream header damaged (length)"));
        }
        let mut rest = vec![0u8; json_len as usize + 4];
        if read_full(&mut input, &mut rest)? < rest.len() {
            return Err(stream_error("stream truncated in its header"));
        }
        let (json, crc) = rest.split_at(json_len as usize);
        let mut all = fixed.to_vec();
        all.extend_from_slice(json);
        if crc32c::crc32c(&all) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(stream_error("stream header damaged (checksum)"));
        }
        let header: StreamHeader = serde_json::from_slice(json)
            .map_err(|e| stream_error(format!("stream header damaged: {e}")))?;
        all.extend_from_slice(crc);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&all);
        Ok((
            StreamReader {
                input,
                hasher,
                records: 0,
                offset: all.len() as u64,
                ended: false,
            },
            header,
        ))
    }

    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn damaged(&self, why: impl std::fmt::Display) -> Error {
        stream_error(format!(
            "stream damaged at record {} (byte {}): {why}",
            self.records + 1,
            self.offset
        ))
    }

    /// The next record; `End` is returned once its digest checked out, and is the last.
    ///
    /// # Errors
    /// `Replication` naming the record for damage or truncation; I/O failures.
    pub fn next_record(&mut self) -> Result<Record> {
        if self.ended {
            return Err(stream_error("read past the end record"));
        }
        let mut head = [0u8; 5];
        let got = read_full(&mut self.input, &mut head)?;
        if got < head.len() {
            return Err(stream_error(format!(
                "stream truncated at byte {} after {} record(s): the end record is missing",
                self.offset + got as u64,
                self.records
            )));
        }
        let kind = head[0];
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD || !(T_DISK..=T_END).contains(&kind) {
            return Err(self.damaged(format!("record type {kind} of length {len}")));
        }
        let mut body = vec![0u8; len as usize + 4];
        let got = read_full(&mut self.input, &mut body)?;
        if got < body.len() {
            return Err(stream_error(format!(
                "stream truncated at byte {} in record {}: the end record is missing",
                self.offset + 5 + got as u64,
                self.records + 1
            )));
        }
        let (payload, crc) = body.split_at(len as usize);
        let mut c = crc32c::crc32c(&head);
        c = crc32c::crc32c_append(c, payload);
        if c != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(self.damaged("checksum mismatch"));
        }
        let digest_before = kind == T_END;
        let rec = self.parse(kind, payload)?;
        if digest_before {
            if let Record::End { records, digest } = &rec {
                if *records != self.records {
                    return Err(self.damaged(format!(
                        "end record counts {records} records, {} came",
                        self.records
                    )));
                }
                if *digest != Hash(*self.hasher.finalize().as_bytes()) {
                    return Err(self.damaged("the stream's digest does not match"));
                }
            }
            self.ended = true;
        }
        self.hasher.update(&head);
        self.hasher.update(&body);
        self.offset += 5 + body.len() as u64;
        self.records += 1;
        Ok(rec)
    }

    /// After the end record: the input must end too (a second stream behind the first, or
    /// anything else, is refused rather than ignored).
    ///
    /// # Errors
    /// `Replication` when bytes follow; I/O failures.
    pub fn expect_eof(&mut self) -> Result<()> {
        let mut b = [0u8; 1];
        if read_full(&mut self.input, &mut b)? != 0 {
            return Err(stream_error(format!(
                "bytes follow the end record at byte {}: one stream at a time",
                self.offset
            )));
        }
        Ok(())
    }

    fn parse(&self, kind: u8, p: &[u8]) -> Result<Record> {
        let need = |n: usize| -> Result<()> {
            if p.len() < n {
                Err(self.damaged(format!("record of type {kind} too short")))
            } else {
                Ok(())
            }
        };
        let u32at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().expect("4 bytes"));
        let u64at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
        let hashat = |o: usize| Hash(p[o..o + 32].try_into().expect("32 bytes"));
        Ok(match kind {
            T_DISK => {
                need(4)?;
                Record::Disk { index: u32at(0) }
            }
            T_BLOCK => {
                need(45)?;
                let codec = Codec::from_code(p[8])
                    .ok_or_else(|| self.damaged(format!("unknown codec {}", p[8])))?;
                Record::Block {
                    block: u64at(0),
                    codec,
                    raw_len: u32at(9),
                    hash: hashat(13),
                    data: p[45..].to_vec(),
                }
            }
            T_ZERO => {
                need(16)?;
                Record::Zero {
                    block: u64at(0),
                    count: u64at(8),
                }
            }
            T_DISK_END => {
                need(45)?;
                Record::DiskEnd {
                    index: u32at(0),
                    data_blocks: u64at(4),
                    root: (p[12] == 1).then(|| hashat(13)),
                }
            }
            _ => {
                need(40)?;
                Record::End {
                    records: u64at(0),
                    digest: hashat(8),
                }
            }
        })
    }
}

/// Read until `buf` is full or the input ends; the count read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", "the stream")(e)),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> StreamHeader {
        StreamHeader {
            block_size: 4096,
            source_store: "s1".into(),
            point: StreamPoint {
                name: "p".into(),
                id: "id1".into(),
                created_unix: 5,
                owner: None,
            },
            base: Some(StreamBase {
                name: "b".into(),
                id: "id0".into(),
            }),
            disks: vec![StreamDisk {
                name: "disk0".into(),
                size: 1 << 20,
                seq: 3,
                incremental: true,
            }],
            resume: None,
        }
    }

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = StreamWriter::new(&mut out, &header()).unwrap();
        w.disk(0).unwrap();
        let data = vec![7u8; 4096];
        w.block(3, Codec::Raw, 4096, &Hash::of(&data), &data)
            .unwrap();
        w.zero(4, 10).unwrap();
        w.disk_end(0, 1, Some(Hash::of(b"root"))).unwrap();
        w.end().unwrap();
        out
    }

    fn read_all(bytes: &[u8]) -> Result<(StreamHeader, Vec<Record>)> {
        let (mut r, h) = StreamReader::new(bytes)?;
        let mut v = Vec::new();
        loop {
            let rec = r.next_record()?;
            let end = matches!(rec, Record::End { .. });
            v.push(rec);
            if end {
                return Ok((h, v));
            }
        }
    }

    #[test]
    fn round_trip() {
        let (h, recs) = read_all(&sample()).unwrap();
        assert_eq!(h, header());
        assert_eq!(recs.len(), 5);
        assert_eq!(recs[0], Record::Disk { index: 0 });
        assert!(matches!(&recs[1], Record::Block { block: 3, data, .. } if data.len() == 4096));
        assert_eq!(
            recs[2],
            Record::Zero {
                block: 4,
                count: 10
            }
        );
        assert_eq!(
            recs[3],
            Record::DiskEnd {
                index: 0,
                data_blocks: 1,
                root: Some(Hash::of(b"root"))
            }
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let s = sample();
        for n in 0..s.len() {
            let e = read_all(&s[..n]).unwrap_err().to_string();
            assert!(
                e.contains("truncated") || e.contains("empty") || e.contains("magic"),
                "at {n}: {e}"
            );
        }
    }

    #[test]
    fn every_bit_flip_is_an_error() {
        let s = sample();
        for i in 0..s.len() {
            for bit in [0u8, 3, 7] {
                let mut d = s.clone();
                d[i] ^= 1 << bit;
                assert!(
                    read_all(&d).is_err(),
                    "flip at byte {i} bit {bit} undetected"
                );
            }
        }
    }
}
