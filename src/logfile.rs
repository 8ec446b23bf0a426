//! Where log lines go: standard error, which the daemon points at `STORE/daemon.log`. The log
//! lives in the store, so it fills up with it: a line that cannot be written (ENOSPC, or EIO
//! from a failing disk) is held in memory instead of being dropped as the logger would, and
//! written before the next line, or by `retry` (the daemon calls it with every tracking flush)
//! once space is back, under a line that says when and why it was held. At most `MAX_HELD`
//! lines are held; past that the oldest are dropped and counted, and the count is written too.
//! `held` tells `status` how many lines wait.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Lines held at most while the log cannot be written (warnings and errors: a few KiB).
pub const MAX_HELD: usize = 1000;

#[derive(Default)]
struct Held {
    lines: VecDeque<Vec<u8>>,
    dropped: u64,
    /// When the first held line failed, and why.
    since: Option<(u64, String)>,
}

static HELD: Mutex<Held> = Mutex::new(Held {
    lines: VecDeque::new(),
    dropped: 0,
    since: None,
});

/// A writer for `env_logger::Target::Pipe`: whole lines to standard error, held on failure.
#[derive(Default)]
pub struct LogWriter {
    partial: Vec<u8>,
}

fn write_err(line: &[u8]) -> io::Result<()> {
    let mut e = io::stderr().lock();
    e.write_all(line)?;
    e.flush()
}

/// Write the held lines if the log takes them now. Returns whether none is left.
fn drain(h: &mut Held) -> bool {
    if h.lines.is_empty() && h.dropped == 0 {
        return true;
    }
    let (at, why) = h.since.clone().unwrap_or_default();
    let note = format!(
        "[vmref] the {} line(s) below could not be written to this log when logged (from unix \
         time {at}: {why}); {} older one(s) were dropped\n",
        h.lines.len(),
        h.dropped
    );
    if write_err(note.as_bytes()).is_err() {
        return false;
    }
    while let Some(l) = h.lines.front() {
        if write_err(l).is_err() {
            return false;
        }
        h.lines.pop_front();
    }
    h.dropped = 0;
    h.since = None;
    true
}

fn deliver(line: Vec<u8>) {
    let mut h = HELD.lock();
    if drain(&mut h) {
        match write_err(&line) {
            Ok(()) => return,
            Err(e) => {
                let at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                h.since = Some((at, e.to_string()));
            }
        }
    }
    if h.lines.len() >= MAX_HELD {
        h.lines.pop_front();
        h.dropped += 1;
    }
    h.lines.push_back(line);
}

/// Write the held lines if the log takes them now.
pub fn retry() {
    drain(&mut HELD.lock());
}

/// Lines waiting to be written, and why they could not be.
pub fn held() -> Option<(u64, String)> {
    let h = HELD.lock();
    let n = h.lines.len() as u64 + h.dropped;
    (n > 0).then(|| (n, h.since.clone().map(|s| s.1).unwrap_or_default()))
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            deliver(line);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
