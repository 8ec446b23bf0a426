//! vmref: resilient change tracking, reference points and point-in-time images for raw VM
//! disks on Linux. See docs/design.md for the concepts and the eight invariants; every
//! "invariant N" in the code refers to its numbering there.

// `unsafe` lives only in `sys`, the small module that wraps libc calls; anywhere else it is an
// error, so a new libc call has to go through there with its SAFETY comment.
#![deny(unsafe_code)]

pub mod backup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod format;
pub mod fs;
pub mod image;
pub mod live;
pub mod logfile;
pub mod names;
pub mod replicate;
pub mod repo;
pub mod s3;
pub mod store;
#[allow(unsafe_code)]
pub mod sys;
pub mod track;
pub mod upgrade;

pub use error::{Error, Result};
