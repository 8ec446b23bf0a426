#!/usr/bin/env bash
# The vmref demo: build, create a store with a generated sample disk, write to it through the
# mount, take a full and two incremental backups, and leave every point mounted.
# Everything lives under one directory (default ./demo, or the first argument).
set -euo pipefail
cd "$(dirname "$0")"
DIR=$(realpath -m "${1:-demo}")
MNT="$DIR/mnt"
STORE="$DIR/store"
IMG="$DIR/disk0.img"

if ! command -v fusermount3 >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
fi
cargo build --release --quiet
VMREF="$PWD/target/release/vmref"
v() { "$VMREF" --store "$STORE" "$@"; }

# Start over: unmount and remove a previous demo under the same directory only.
if mountpoint -q "$MNT" 2>/dev/null; then "$VMREF" --store "$STORE" umount "$MNT" || fusermount3 -u -z "$MNT" || true; fi
rm -rf "$STORE" "$IMG" "$DIR/copies"
mkdir -p "$DIR" "$MNT" "$DIR/copies"

echo "== a 256 MiB sample disk with some data on it"
truncate -s 256M "$IMG"
python3 - "$IMG" <<'PY'
import sys, random
random.seed(1)
with open(sys.argv[1], "r+b") as f:
    for i in range(40):                       # a few MiB of "OS install" spread over the disk
        f.seek(random.randrange(0, 256 << 20, 65536))
        f.write(bytes(random.getrandbits(8) for _ in range(4096)) * 16)
PY
v init --block-size 64K
v disk add disk0 "$IMG"
v mount "$MNT"

write() { # write N random 64 KiB blocks through the live mount
  python3 - "$MNT/live/disk0.img" "$1" "$2" <<'PY'
import sys, os, random
random.seed(int(sys.argv[3]))
fd = os.open(sys.argv[1], os.O_WRONLY)
for _ in range(int(sys.argv[2])):
    os.pwrite(fd, os.urandom(65536), random.randrange(0, 256 << 20, 65536))
os.fsync(fd); os.close(fd)
PY
}

echo "== full backup"
v backup full-1 --full
cp --sparse=always "$MNT/live/disk0.img" "$DIR/copies/full-1.img"
echo "== write 100 blocks, incremental backup"
write 100 2
v backup inc-1
cp --sparse=always "$MNT/live/disk0.img" "$DIR/copies/inc-1.img"
echo "== write 50 blocks, incremental backup"
write 50 3
v backup inc-2
cp --sparse=always "$MNT/live/disk0.img" "$DIR/copies/inc-2.img"
write 10 4

echo
v ref list
echo
ls -l "$MNT" "$MNT"/*/
cat <<MSG

The store is mounted at $MNT. Try:
  ls -ls $MNT/inc-1/disk0.img                       # size and real blocks
  cmp $MNT/inc-1/disk0.img $DIR/copies/inc-1.img    # exact point-in-time bytes
  qemu-img compare -f raw -F raw $MNT/full-1/disk0.img $DIR/copies/full-1.img
  $VMREF --store $STORE changes --since inc-2       # what changed since the last backup
  $VMREF --store $STORE restore inc-1 --disk disk0 --to /tmp/inc-1.img
  $VMREF --store $STORE umount $MNT                 # when done
MSG
