//! A hung mount must fail the suite, not hang it. A test that reads a mount in its own process
//! waits in the kernel for the daemon's answer, and no `timeout` around a client command can
//! reach it; a daemon that never answers (a livelock, a deadlock) would hold the whole run.
//! The first FUSE check of a test binary starts one watchdog thread: if the binary is still
//! running after `VMREF_TEST_WATCHDOG_SECS` (600 unless set), it aborts the FUSE connection of
//! every mount under the temp dir and kills their daemons, so the blocked reads fail with
//! ENOTCONN and the tests report; a minute later it ends the process if it is still there.
//! cargo runs one test binary at a time, so the mounts under the temp dir are this binary's.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

const DEFAULT_SECS: u64 = 600;

/// Start the watchdog once per test binary.
pub fn start() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let secs = std::env::var("VMREF_TEST_WATCHDOG_SECS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_SECS);
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watch(secs));
    });
}

fn say(line: &str) {
    // Straight to the process's stderr: the harness keeps a running test's eprintln! output
    // until that test ends, and a hung test never ends.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
}

fn watch(secs: u64) {
    std::thread::sleep(Duration::from_secs(secs));
    let mounts = fuse_mounts_under(&std::env::temp_dir());
    say(&format!(
        "WATCHDOG: this test binary is still running after {secs} s; aborting {} FUSE mount(s) \
         under the temp dir and killing their daemons: {mounts:?}",
        mounts.len()
    ));
    for (conn, mnt) in &mounts {
        abort_connection(*conn);
        kill_daemons_of(mnt);
    }
    std::thread::sleep(Duration::from_secs(60));
    say("WATCHDOG: still running a minute after the abort; exiting");
    std::process::exit(101);
}

/// `(connection number, mount point)` of each FUSE mount below `dir`, from mountinfo.
fn fuse_mounts_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if !right.starts_with("fuse") {
                return None;
            }
            let f: Vec<&str> = left.split(' ').collect();
            let (major, minor) = f.get(2)?.split_once(':')?;
            // mountinfo escapes spaces and the like as octal; temp dirs need none.
            let mnt = PathBuf::from(f.get(4)?);
            // A FUSE connection is named by its device number; anonymous devices have
            // major 0, where that number is the minor.
            if major != "0" || !mnt.starts_with(dir) {
                return None;
            }
            Some((minor.parse().ok()?, mnt))
        })
        .collect()
}

/// Abort a FUSE connection through fusectl (mounted here first if it is not).
fn abort_connection(conn: u32) {
    let ctl = Path::new("/sys/fs/fuse/connections");
    if !ctl.join(conn.to_string()).exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(ctl)
            .status();
    }
    if let Err(e) = std::fs::write(ctl.join(conn.to_string()).join("abort"), "1") {
        say(&format!(
            "WATCHDOG: cannot abort FUSE connection {conn}: {e}"
        ));
    }
}

/// Kill every process whose command line names `mnt`: the daemon serving it.
fn kill_daemons_of(mnt: &Path) {
    let want = mnt.as_os_str().as_encoded_bytes();
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        if cmd.split(|&b| b == 0).any(|arg| arg == want) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid])
                .status();
        }
    }
}
