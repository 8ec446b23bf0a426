//! Progress reporting for long operations (backup, restore, verify): a small trait the library
//! calls, and a no-op for the daemon and tests. The terminal bar is the binary's (`src/bar.rs`).

/// Told how much work there is and how much is done, in bytes.
pub trait Progress: Sync {
    fn start(&self, _what: &str, _total: u64) {}
    fn inc(&self, _n: u64) {}
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}
