//! The binary's progress bar for long operations: indicatif on stderr, hidden unless stderr
//! is a terminal and `-q` is not given. The library only knows the `Progress` trait.

use std::io::IsTerminal;
use std::sync::OnceLock;

use vmref::backup::Progress;

pub struct Bar {
    quiet: bool,
    /// Made at the first `start`: a command with nothing long to report draws nothing.
    bar: OnceLock<indicatif::ProgressBar>,
}

impl Bar {
    pub fn new(quiet: bool) -> Bar {
        Bar {
            quiet,
            bar: OnceLock::new(),
        }
    }

    fn bar(&self) -> &indicatif::ProgressBar {
        self.bar.get_or_init(|| {
            let bar = if self.quiet || !std::io::stderr().is_terminal() {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new(0)
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        })
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        let bar = self.bar();
        bar.set_message(what.to_string());
        bar.set_length(total);
        bar.set_position(0);
    }
    fn inc(&self, n: u64) {
        if let Some(bar) = self.bar.get() {
            bar.inc(n);
        }
    }
    fn finish(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}
