//! The one module with `unsafe`: thin wrappers over libc calls the standard library lacks.

use std::io;
use std::os::fd::RawFd;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Take an exclusive `flock` without blocking.
pub fn flock_exclusive_nb(fd: RawFd) -> io::Result<()> {
    // SAFETY: flock takes a descriptor and flags; no memory is passed.
    check(unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) })
}

/// Release a `flock` held through `fd`.
pub fn flock_unlock(fd: RawFd) -> io::Result<()> {
    // SAFETY: flock takes a descriptor and flags; no memory is passed.
    check(unsafe { libc::flock(fd, libc::LOCK_UN) })
}

/// `lseek(fd, off, SEEK_DATA/SEEK_HOLE)`; `Ok(None)` when there is no more data (ENXIO).
pub fn seek_data_hole(fd: RawFd, off: u64, hole: bool) -> io::Result<Option<u64>> {
    let whence = if hole {
        libc::SEEK_HOLE
    } else {
        libc::SEEK_DATA
    };
    // SAFETY: lseek takes a descriptor and integers; no memory is passed.
    let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The effective user and group ids, for file ownership in the mount.
pub fn uid_gid() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// `fork()`: `Some(child pid)` in the parent, `None` in the child.
///
/// Refused while the process has another thread: the child gets a copy of just the calling
/// thread, so a lock another thread held stays locked forever, and a parked thread's record
/// stays linked in parking_lot's table while glibc reuses that thread's stack for the child's
/// next thread (a daemon that spun forever in `grow_hashtable`).
pub fn fork() -> io::Result<Option<i32>> {
    let threads = single_threaded()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "the process has {threads} threads; forking it would not be safe"
        )));
    }
    // SAFETY: fork takes no arguments; the process is single-threaded (checked above, and
    // only this thread could start another), so the child's copy of the address space has no lock held by a vanished thread.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        p => Ok(Some(p)),
    }
}

/// The process's thread count, waiting up to 2 s for it to fall to one: a thread just joined
/// can stay listed for a moment after `join` returns. 1 where there is no /proc to ask.
fn single_threaded() -> io::Result<usize> {
    let mut waited = 0;
    loop {
        let n = match std::fs::read_dir("/proc/self/task") {
            Ok(d) => d.count(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(1),
            Err(e) => return Err(e),
        };
        if n == 1 || waited >= 2000 {
            return Ok(n);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        waited += 1;
    }
}

/// Start a new session so the daemon outlives the terminal it was started from.
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments and touches no memory.
    let rc = unsafe { libc::setsid() };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Make `target` (0, 1 or 2) refer to the same file as `fd`.
pub fn dup_onto(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 takes two descriptors; no memory is passed.
    let rc = unsafe { libc::dup2(fd, target) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset write only into the sigset_t we own on our stack, which
    // sigemptyset fully initialises before sigaddset reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block `signals` in the calling thread and every thread it spawns afterwards, so that
/// only `wait_signal` ever sees them.
pub fn block_signals(signals: &[i32]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: pthread_sigmask reads the set we pass and writes nothing (old set is null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Wait for one of `signals` (which must be blocked) and return it.
pub fn wait_signal(signals: &[i32]) -> io::Result<i32> {
    let set = sigset(signals);
    let mut sig: libc::c_int = 0;
    // SAFETY: sigwait reads our set and writes one int into `sig` on our stack.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(sig)
}

fn cpath(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `umount2(path, 0)`, or with `MNT_DETACH` when `lazy`.
pub fn umount(path: &std::path::Path, lazy: bool) -> io::Result<()> {
    let p = cpath(path)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 reads the NUL-terminated path, which outlives the call.
    check(unsafe { libc::umount2(p.as_ptr(), flags) })
}

/// Read one extended attribute of `path` (at most 4 KiB).
pub fn getxattr(path: &std::path::Path, name: &str) -> io::Result<Vec<u8>> {
    let p = cpath(path)?;
    let n = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: getxattr reads the two NUL-terminated strings and writes at most buf.len()
    // bytes into buf, which lives until after the call.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// Deallocate `[off, off + len)` of a file, keeping its size: the range reads as zeros.
pub fn punch_hole(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes a descriptor and integers; no memory is passed.
    check(unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    })
}

/// Ask the kernel to start reading `[off, off + len)` of a file into the page cache now, without
/// waiting for it: a reader about to need it then finds it there (or in flight) instead of
/// issuing one small synchronous read at a time.
pub fn fadvise_willneed(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    fadvise(fd, off, len, libc::POSIX_FADV_WILLNEED)
}

/// Tell the kernel that reads through this open file description come in no order worth
/// reading ahead for. Besides skipping read-ahead, it makes the page cache fill with single
/// pages: read-ahead allocates large folios, and a later 4 KiB buffered write into a large
/// folio dirties (and makes the filesystem walk) the whole folio. On ext4 (kernel 6.18) a
/// scan that read the image ahead made a VM's small writes through the mount 3-8 times slower
/// until the folios left the cache (docs/performance.md).
pub fn fadvise_random(fd: RawFd) -> io::Result<()> {
    fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM)
}

/// Drop the file's clean pages from the page cache; writeback of dirty ones is started, not
/// waited for.
pub fn fadvise_dontneed(fd: RawFd) -> io::Result<()> {
    fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED)
}

/// Whether the page of the file at `off` is in the page cache (`mincore` of a one-page mapping).
#[cfg(test)]
pub fn page_resident(fd: RawFd, off: u64) -> io::Result<bool> {
    let page = page_size() as usize;
    let at = off - off % page as u64;
    // SAFETY: a fresh read-only shared mapping of one page of an open file, looked at only
    // through mincore (which writes one byte into `v`) and unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            at as libc::off_t,
        );
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut v = 0u8;
        let rc = libc::mincore(p, page, &mut v);
        let err = io::Error::last_os_error();
        libc::munmap(p, page);
        if rc != 0 {
            return Err(err);
        }
        Ok(v & 1 == 1)
    }
}

/// The file opened again read-only, as an open file description of its own, advised random
/// (`fadvise_random`): for reads that must not fill the page cache with large folios, while
/// other descriptors of the same file keep their read-ahead (the advice holds per open file
/// description). None where the reopen or the advice fails.
pub fn reopen_random_reader(file: &std::fs::File) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    fadvise_random(f.as_raw_fd()).ok()?;
    Some(f)
}

fn fadvise(fd: RawFd, off: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: posix_fadvise takes a descriptor and integers; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(fd, off as libc::off_t, len as libc::off_t, advice) };
    // posix_fadvise returns the error number instead of setting errno.
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Lower the calling thread's CPU priority to the lowest (nice 19): work that is only a
/// hint then runs on cores the threads serving requests leave idle.
pub fn lowest_priority_for_this_thread() -> io::Result<()> {
    // SAFETY: gettid takes no arguments; setpriority takes integers and, on Linux, applies
    // PRIO_PROCESS with a thread id to that thread alone.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19)
    };
    check(rc)
}

/// The system's memory page size (4096 where sysconf cannot say).
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system setting.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

/// Time since boot, counting time suspended (CLOCK_BOOTTIME): how long a lock went without a
/// refresh, even across a suspend that stops CLOCK_MONOTONIC.
pub fn boottime() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for the call to fill.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if r != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Whether process `pid` is gone (ESRCH from `kill(pid, 0)`). A process we may not signal
/// (EPERM) exists.
pub fn process_gone(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(p, 0) };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fork_is_refused_while_another_thread_runs() {
        // The test harness already runs this test on a thread of its own; one more that is
        // certainly alive for the whole call makes the point without relying on that.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let err = super::fork().expect_err("fork with two threads must be refused");
        assert!(err.to_string().contains("threads"), "{err}");
        drop(tx);
        other.join().unwrap();
    }
}
