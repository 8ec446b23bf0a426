#!/usr/bin/env bash
# bench/unclean-open.sh [--quick]: what the open after a kill -9 costs (issue 13): a sparse
# disk of BIG bytes holding DATA bytes of random data in 1 MiB extents spread over it, 64 KiB
# blocks. Prints, as markdown rows: `disk add` (it digests the image's data once), the open
# after a kill -9 while writing (every clean region's data is read and checked, page cache warm
# and, with COLD=1, dropped), the open after a kill -9 of a settled idle disk, and after a clean
# stop. The bytes read are the tracker's own count (`vmref -v`). The daemon flushes every second.
#
#   BIG (default 1 TiB; --quick 4 GiB), DATA (default 1 GiB; --quick 64 MiB), COLD=1 (root:
#   drop the page cache before the cold open), VMREF (the binary; default target/release/vmref).
# Needs root for the mount (FUSE). Example: DATA=$((10<<30)) COLD=1 bench/unclean-open.sh
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
if [ $QUICK = 1 ]; then BIG=${BIG:-$((4 << 30))}; DATA=${DATA:-$((64 << 20))}
else BIG=${BIG:-$((1 << 40))}; DATA=${DATA:-$((1 << 30))}; fi
COLD=${COLD:-0}
V=${VMREF:-$PWD/target/release/vmref}
[ -x "$V" ] || cargo build --release --quiet --bin vmref
WORK=$(mktemp -d /var/tmp/vmref-unclean.XXXXXX)
MNT=$WORK/mnt
cleanup() {
    set +e
    mountpoint -q "$MNT" && { umount "$MNT" 2>/dev/null || umount -l "$MNT"; }
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$MNT"
echo "flush_interval_secs = 1" > "$WORK/config.toml"
S=(--store "$WORK/store" --config "$WORK/config.toml")
IMG=$WORK/disk.img
python3 - "$IMG" "$BIG" "$DATA" <<'EOF'
import os, sys
path, big, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
n = data >> 20
stride = (big // n) & ~((1 << 20) - 1)
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(fd, big)
chunk = os.urandom(1 << 20)
for i in range(n):
    # A different MiB each time, cheaply: rotate the random chunk.
    k = (i * 4099) % (1 << 20)
    os.pwrite(fd, chunk[k:] + chunk[:k], i * stride)
os.fsync(fd)
os.close(fd)
EOF
secs() { python3 -c "import sys; print(f'{float(sys.argv[1]):.2f} s')" "$1"; }
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/err"; t1=$(date +%s.%N); python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$t1"; }
read_bytes() { grep -o '[0-9]* bytes read' "$WORK/err" | head -1 | awk '{printf "%.2f GiB", $1 / 2^30}'; }
"$V" "${S[@]}" init >/dev/null
t=$(timed "$V" -v "${S[@]}" disk add d "$IMG")
echo "| disk | data | step | time | read |"
echo "|---|---|---|---|---|"
row() { echo "| $((BIG >> 30)) GiB | $(awk "BEGIN{printf \"%.2f GiB\", $DATA/2^30}") | $1 | $(secs "$2") | ${3:-0} |"; }
row "disk add (digests every data block)" "$t" "$(read_bytes)"

crash_open() { # $1: label; $2: settle first (1) or kill while writing (0); $3: drop caches
    "$V" "${S[@]}" mount "$MNT" >/dev/null
    local pid; pid=$(cat "$WORK/store/lock")
    dd if=/dev/urandom of="$MNT/live/d.img" bs=64k count=16 seek=100 conv=notrunc status=none
    [ "$2" = 1 ] && sleep 4 # flushes every second: settled 2 s after the last write
    kill -9 "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    "$V" "${S[@]}" umount "$MNT" >/dev/null 2>&1 || true
    [ "$3" = 1 ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
    t=$(timed "$V" -v "${S[@]}" status)
    row "$1" "$t" "$(read_bytes)"
}
crash_open "open after kill -9 while writing (warm cache)" 0 0
[ "$COLD" = 1 ] && crash_open "open after kill -9 while writing (cold cache)" 0 1
crash_open "open after kill -9 of a settled idle disk" 1 0
"$V" "${S[@]}" mount "$MNT" >/dev/null
dd if=/dev/urandom of="$MNT/live/d.img" bs=64k count=16 seek=200 conv=notrunc status=none
"$V" "${S[@]}" umount "$MNT" >/dev/null
t=$(timed "$V" -v "${S[@]}" status)
row "open after a clean stop" "$t" "$(read_bytes)"
