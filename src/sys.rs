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

/// Punch a hole (keep size) so a restored or cached file stays sparse.
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

/// The effective user and group ids, for file ownership in the mount.
pub fn uid_gid() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// Size of a block device (or 0 when `fd` is not one).
pub fn block_device_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into the pointer we pass, which lives on our stack.
    let rc = unsafe { libc::ioctl(fd, 0x8008_1272, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}
