//! Replication: `send` a point (whole, or its differences from a base) as a stream, `receive`
//! it into another store as the same point, keep a bootable replica image of a disk at the
//! newest received point, and `replica promote` that image to a live disk whose tracking
//! starts exactly at that point (failover, migration).
//!
//! - `stream`: the stream format (documented in the man page), writer and reader.
//! - `send`: from a restorable point's maps, or from a checkpoint of the live disks.
//! - `receive`: checks, stores blocks, commits the point once the whole stream checked out;
//!   keeps a partial receive for `send --resume`.
//! - `replica`: crash-safe in-place apply of a point to a replica image.
//! - `token`: resume tokens. `framing`: a stream carried over the control socket.

pub mod framing;
pub mod receive;
pub mod replica;
pub mod send;
pub mod stream;
pub mod token;
