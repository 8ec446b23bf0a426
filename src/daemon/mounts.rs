//! The kernel's mount table (`/proc/self/mountinfo`), read to find a mount's device number
//! (for its readahead knob) and to tell a vmref mount, a dead one and no mount apart, all
//! without sending a request to a FUSE daemon that may be hung or gone.

use std::path::{Path, PathBuf};

/// The source name vmref mounts carry (`fsname=vmref`).
pub const FSNAME: &str = "vmref";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    pub dev: String,
    pub point: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    pub fn is_vmref(&self) -> bool {
        self.fstype.starts_with("fuse") && self.source == FSNAME
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse mountinfo text.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: l.get(2)?.to_string(),
                point: PathBuf::from(unescape(l.get(4)?)),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// The topmost mount at `point`, if any.
pub fn find(point: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse(&text).into_iter().rev().find(|m| m.point == point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fuse_lines_and_escapes() {
        let t = "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw\n\
                 52 30 0:48 / /tmp/a\\040b rw,nosuid,nodev - fuse vmref rw,user_id=0\n";
        let m = parse(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].point, Path::new("/tmp/a b"));
        assert_eq!(m[1].dev, "0:48");
        assert!(m[1].is_vmref());
        assert!(!m[0].is_vmref());
    }
}
