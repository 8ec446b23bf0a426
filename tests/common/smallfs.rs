//! A size-limited tmpfs for tests of full filesystems (root only: it mounts).

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

/// A size-limited tmpfs, unmounted (lazily, so a busy one never lingers) on drop.
pub struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    pub fn new(at: PathBuf, size: &str) -> SmallFs {
        std::fs::create_dir_all(&at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", at.display());
        SmallFs { dir: at }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Fill the filesystem with `filler` until ENOSPC, then give back `room` bytes.
    pub fn fill(&self, room: u64) {
        let p = self.path("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        // Big chunks first, then pages, so the filesystem ends truly full.
        for chunk in [1 << 20, 4096] {
            let buf = vec![0xa5u8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(n) if n == buf.len() => {}
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => panic!("filler: {e}"),
                }
            }
        }
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(room)).unwrap();
    }

    pub fn unfill(&self) {
        let _ = std::fs::remove_file(self.path("filler"));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
