//! A hung mount must fail the suite, not hang it. A test that reads a mount in its own process
//! waits in the kernel for the daemon's answer, and no `timeout` around a client command can
//! reach it; a daemon that never answers (a livelock, a deadlock) would hold the whole run.
//! The first FUSE check of a test binary starts one watchdog thread. Once the binary has run
//! for `VMREF_TEST_WATCHDOG_SECS` (600 unless set; the slowest binary takes under a minute),
//! it looks every 10 s for vmref mounts under the temp dir with requests waiting in two looks
//! in a row, aborts their FUSE connections and kills their daemons, so the blocked reads fail
//! with ECONNABORTED and the tests report; a minute after an abort it ends the process if it
//! is still there. It assumes the vmref mounts under the temp dir are this run's (cargo runs
//! one test binary at a time): do not run two test suites on one host past the deadline.

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
    mount_fusectl();
    let mut waited_before: Vec<u32> = Vec::new();
    loop {
        let waiting: Vec<(u32, PathBuf)> = vmref_mounts_under(&temp_dir())
            .into_iter()
            .filter(|(conn, _)| requests_waiting(*conn) > 0)
            .collect();
        let hung: Vec<&(u32, PathBuf)> = waiting
            .iter()
            .filter(|(c, _)| waited_before.contains(c))
            .collect();
        if !hung.is_empty() {
            say(&format!(
                "WATCHDOG: this test binary is still running after {secs} s, and these mounts \
                 had requests waiting 10 s apart; aborting them and killing their daemons: {hung:?}"
            ));
            for (conn, mnt) in &hung {
                abort_connection(*conn);
                kill_daemons_of(mnt);
            }
            std::thread::sleep(Duration::from_secs(60));
            say("WATCHDOG: still running a minute after the abort; exiting");
            std::process::exit(101);
        }
        waited_before = waiting.into_iter().map(|(c, _)| c).collect();
        std::thread::sleep(Duration::from_secs(10));
    }
}

fn temp_dir() -> PathBuf {
    let t = std::env::temp_dir();
    std::fs::canonicalize(&t).unwrap_or(t)
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Mount fusectl where it is not (it is how a connection's requests are counted and aborted).
fn mount_fusectl() {
    let mounted = std::fs::read_dir(FUSECTL).is_ok_and(|mut d| d.next().is_some());
    if !mounted {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none", FUSECTL])
            .status();
    }
}

/// Requests of a FUSE connection the daemon has not answered yet (0 where fusectl cannot say).
fn requests_waiting(conn: u32) -> u64 {
    std::fs::read_to_string(Path::new(FUSECTL).join(conn.to_string()).join("waiting"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `(connection number, mount point)` of each vmref mount below `dir`, from mountinfo.
fn vmref_mounts_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            // "fuse vmref ...": the type, then the source every vmref mount names itself by.
            let mut r = right.split(' ');
            if r.next()? != "fuse" || r.next()? != "vmref" {
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

/// Abort a FUSE connection through fusectl.
fn abort_connection(conn: u32) {
    if let Err(e) = std::fs::write(Path::new(FUSECTL).join(conn.to_string()).join("abort"), "1") {
        say(&format!(
            "WATCHDOG: cannot abort FUSE connection {conn}: {e}"
        ));
    }
}

/// Kill every vmref process whose command line names `mnt`: the daemon serving it.
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
        let vmref = std::fs::read_link(p.path().join("exe"))
            .is_ok_and(|e| e.file_name().is_some_and(|n| n == "vmref"));
        if vmref && cmd.split(|&b| b == 0).any(|arg| arg == want) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid])
                .status();
        }
    }
}
