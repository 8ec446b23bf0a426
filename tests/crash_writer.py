#!/usr/bin/env python3
"""Heavy random writer for the kill -9 tests (tests/crash_daemon.rs, bench/crash-stress.sh).

usage: crash_writer.py IMAGE LOG SEED SIZE ZONE...   (ZONE = OFFSET:LENGTH, bytes)

Writes random extents of 4 KiB to 256 KiB, mostly inside the hot zones (so some tracking
regions stay untouched) and now and then anywhere, through a buffered and an O_DIRECT
descriptor, with an fsync now and then, until a write fails. Before each write it appends
"OFFSET LENGTH" to LOG and flushes it, so LOG always covers every byte the writer may have
changed. Exits 0 when the mount goes away under it (ENOTCONN, ECONNABORTED, ENODEV),
non-zero on anything else.
"""
import errno
import mmap
import os
import random
import sys

GONE = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV}
PAGE = 4096
MAX = 256 * 1024


def main():
    image, log, seed, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    zones = [tuple(int(x) for x in z.split(":")) for z in sys.argv[5:]] or [(0, size)]
    rng = random.Random(seed)
    out = open(log, "w", buffering=1)
    buf = mmap.mmap(-1, MAX)  # page aligned, as O_DIRECT wants
    try:
        fds = [os.open(image, os.O_WRONLY), os.open(image, os.O_WRONLY | os.O_DIRECT)]
        while True:
            zoff, zlen = rng.choice(zones) if rng.random() < 0.95 else (0, size)
            length = rng.randrange(1, MAX // PAGE + 1) * PAGE
            length = min(length, zlen)
            off = zoff + rng.randrange(0, max(1, (zlen - length) // PAGE + 1)) * PAGE
            direct = rng.random() < 0.4
            if not direct and rng.random() < 0.3:
                # Unaligned: a partial first and last block.
                off = min(off + rng.randrange(1, PAGE), size - length)
            off, length = max(0, off), min(length, size)
            buf[:length] = os.urandom(length)
            out.write(f"{off} {length}\n")
            fd = fds[1] if direct else fds[0]
            os.pwrite(fd, memoryview(buf)[:length], off)
            if rng.random() < 0.05:
                os.fsync(fd)
    except OSError as e:
        if e.errno in GONE or mount_is_gone(image):
            # A request in flight when the daemon died can fail with another errno (EIO,
            # EINTR); what matters is that the mount is gone, not how the kernel said so.
            return 0
        print(f"crash_writer: {e}", file=sys.stderr)
        return 3


def mount_is_gone(image):
    try:
        os.stat(image)
    except OSError as e:
        return e.errno in GONE
    return False


if __name__ == "__main__":
    sys.exit(main())
