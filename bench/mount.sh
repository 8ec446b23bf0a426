#!/usr/bin/env bash
# bench/mount.sh: tracked live-disk I/O through a vmref mount against the raw image file,
# both measured in this run with the same fio job (psync, queue depth 1). Prints a markdown
# table. Environment: SIZE (default 1G), RUNTIME seconds per job (default 6), VMREF (binary).
# Needs root (or fuse access), fio, fusermount3. Takes about 1.5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-6}
BIN=${VMREF:-target/release/vmref}
if [ -z "${VMREF:-}" ]; then cargo build --release -q; fi
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/vmref-bench.XXXXXX")
MNT=$WORK/mnt
cleanup() {
    "$BIN" --store "$WORK/store" umount "$MNT" >/dev/null 2>&1 || fusermount3 -u -z "$MNT" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$MNT"

# Two images with the same bytes: the raw baseline never touches the tracked disk.
fio --name=fill --filename="$WORK/raw.img" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
    --output=/dev/null
cp "$WORK/raw.img" "$WORK/disk0.img"
"$BIN" --store "$WORK/store" init >/dev/null
"$BIN" --store "$WORK/store" disk add disk0 "$WORK/disk0.img" >/dev/null
"$BIN" --store "$WORK/store" mount "$MNT"
LIVE=$MNT/live/disk0.img

# fio FILE RW BS DIRECT -> bytes per second. invalidate=0: reads are of a warm page cache on
# both sides (the daemon reads the image through it), so the table compares the paths.
bw() {
    fio --name=b --filename="$1" --rw="$2" --bs="$3" --direct="$4" --ioengine=psync \
        --size="$SIZE" --runtime="$RUNTIME" --time_based --invalidate=0 --fallocate=none --randrepeat=0 \
        --output-format=json |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["read"]["bw_bytes"]+j["write"]["bw_bytes"])'
}
fmt() { python3 -c "import sys; b=float(sys.argv[1]); print(f'{b/1e9:.2f} GB/s' if b>=1e9 else f'{b/1e6:.0f} MB/s')" "$1"; }

echo "vmref mount benchmark: $(nproc) cores, $(uname -r), image $SIZE, ${RUNTIME}s per job, fio psync QD1"
echo
echo "| workload | raw file | vmref live (tracked) | ratio |"
echo "|---|---|---|---|"
row() { # name rw bs direct
    local raw live
    raw=$(bw "$WORK/raw.img" "$2" "$3" "$4")
    live=$(bw "$LIVE" "$2" "$3" "$4")
    echo "| $1 | $(fmt "$raw") | $(fmt "$live") | $(python3 -c "print(f'{$live/$raw:.2f}x')") |"
}
row "seq write 1 MiB, buffered" write 1M 0
row "seq write 1 MiB, O_DIRECT" write 1M 1
row "rand write 4 KiB, buffered" randwrite 4k 0
row "rand write 4 KiB, O_DIRECT" randwrite 4k 1
row "seq read 1 MiB (warm)" read 1M 0
row "rand read 4 KiB (warm)" randread 4k 0
echo
"$BIN" --store "$WORK/store" umount "$MNT" >/dev/null
echo "tracking after unmount: $("$BIN" --store "$WORK/store" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["disks"][0]["tracking"])')"
