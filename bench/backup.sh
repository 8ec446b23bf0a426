#!/usr/bin/env bash
# Backup benchmark, one command:  bench/backup.sh [SIZE_GIB] [DATA_GIB]
#
# On a sparse disk of SIZE_GIB (default 8) holding DATA_GIB of data (default 4):
#  - full backup vs incremental after 1 % of the disk changed (target: incremental <= 3 %),
#  - store bytes the incremental added vs the bytes changed,
#  - `vmref restore` of the points at depth 1, 10 and 100 of a chain of incrementals vs
#    `qemu-img convert -O raw` of an equivalent qcow2 chain (same writes, made with qemu-io).
# Everything lives under $BENCH_DIR (default a new /var/tmp/vmref-bench.*), restored images go
# to /dev/shm so the figures measure reading and synthesis, not this VM's disk. Warm caches.
# Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${1:-8}
DATA_GIB=${2:-4}
GIB=$((1 << 30))
SIZE=$((SIZE_GIB * GIB))
DATA=$((DATA_GIB * GIB))
DEPTH=100
EXT=$((64 << 10))
WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/vmref-bench.XXXXXX)}
OUT=$(mktemp -d /dev/shm/vmref-bench-out.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
mkdir -p "$WORK"
echo "working in $WORK" >&2

cargo build --release --quiet --bin vmref --example bench_write
V="$PWD/target/release/vmref"
W="$PWD/target/release/examples/bench_write"
S="$WORK/store"
IMG="$WORK/disk0.img"
export VMREF_STORE="$S"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "-" }'; }
bytes() { du -sb "$1" | cut -f1; }
mib() { awk -v a="$1" 'BEGIN { printf "%.1f MiB", a / 1048576 }'; }

rm -rf "$S" "$WORK"/*.qcow2 "$WORK"/plan.*
echo "making a ${SIZE_GIB} GiB disk with ${DATA_GIB} GiB of data" >&2
"$W" fill "$IMG" "$SIZE" "$DATA" 1
"$V" -q init >/dev/null
"$V" -q disk add disk0 "$IMG" >/dev/null
qemu-img convert -f raw -O qcow2 "$IMG" "$WORK/q001.qcow2"

# Point 1: full backup.
sync
t0=$(now); "$V" -q backup p001 >/dev/null; t1=$(now)
FULL=$(secs "$t0" "$t1")
PACKS0=$(bytes "$S/data")

# Point 2: 1 % of the disk changed.
CHANGED=$((SIZE / 100))
"$W" plan "$SIZE" "$CHANGED" "$EXT" 2 > "$WORK/plan.002"
"$W" apply "$S" disk0 "$WORK/plan.002" 2
sync
t0=$(now); "$V" -q backup p002 >/dev/null; t1=$(now)
INC=$(secs "$t0" "$t1")
PACKS1=$(bytes "$S/data")
ADDED=$((PACKS1 - PACKS0))
PLANNED=$(awk '{ s += $2 } END { print s }' "$WORK/plan.002")

qemu_apply() { # overlay n on n-1, then the plan's writes
    local n=$1 prev=$2 plan=$3 args=()
    qemu-img create -q -f qcow2 -F qcow2 -b "$WORK/q$prev.qcow2" "$WORK/q$n.qcow2"
    while read -r off len; do args+=(-c "write -P 0x5a $off $len"); done < "$plan"
    qemu-io -f qcow2 "${args[@]}" "$WORK/q$n.qcow2" >/dev/null
}
qemu_apply 002 001 "$WORK/plan.002"

echo "building a chain of $DEPTH points" >&2
for i in $(seq 3 $DEPTH); do
    n=$(printf %03d "$i"); p=$(printf %03d $((i - 1)))
    "$W" plan "$SIZE" $((16 * EXT)) "$EXT" "$i" > "$WORK/plan.$n"
    "$W" apply "$S" disk0 "$WORK/plan.$n" "$i"
    "$V" -q backup "p$n" >/dev/null
    qemu_apply "$n" "$p" "$WORK/plan.$n"
done
STORE_TOTAL=$(bytes "$S/data")

declare -A VR QR
for d in 1 10 100; do
    n=$(printf %03d "$d")
    "$V" -q restore "p$n" --disk disk0 --to "$OUT/warm.img" --force >/dev/null   # warm
    rm -f "$OUT/warm.img"
    t0=$(now); "$V" -q restore "p$n" --disk disk0 --to "$OUT/v.img" >/dev/null; t1=$(now)
    VR[$d]=$(secs "$t0" "$t1")
    qemu-img convert -O raw "$WORK/q$n.qcow2" "$OUT/warm.raw"; rm -f "$OUT/warm.raw"
    t0=$(now); qemu-img convert -O raw "$WORK/q$n.qcow2" "$OUT/q.raw"; t1=$(now)
    QR[$d]=$(secs "$t0" "$t1")
    if [ "$d" = 100 ] || [ "$d" = 1 ]; then
        # The two tools must agree on the disk's layout; contents differ (random vs pattern)
        # so only sizes are compared here; exactness is the tests' job.
        [ "$(stat -c %s "$OUT/v.img")" = "$(stat -c %s "$OUT/q.raw")" ]
    fi
    rm -f "$OUT/v.img" "$OUT/q.raw"
done

echo
echo "vmref backup benchmark: ${SIZE_GIB} GiB sparse disk, ${DATA_GIB} GiB of data, block 64 KiB, $(nproc) cores"
echo
echo "| measure | value | ratio |"
echo "|---|---|---|"
echo "| full backup | ${FULL} s | |"
echo "| incremental, 1 % of the disk changed ($(mib "$PLANNED")) | ${INC} s | $(awk -v a="$INC" -v b="$FULL" 'BEGIN { printf "%.1f %%", 100 * a / b }') of full (target <= 3 %) |"
echo "| store bytes of the full backup | $(mib "$PACKS0") | |"
echo "| store bytes the incremental added | $(mib "$ADDED") | $(ratio "$ADDED" "$PLANNED") x changed bytes |"
echo "| store bytes after $DEPTH points | $(mib "$STORE_TOTAL") | |"
for d in 1 10 100; do
    echo "| restore depth $d: vmref restore / qemu-img convert (qcow2 chain) | ${VR[$d]} s / ${QR[$d]} s | $(ratio "${VR[$d]}" "${QR[$d]}") |"
done
echo "| depth 100 vs depth 1: vmref | | $(ratio "${VR[100]}" "${VR[1]}") x time (read speed $(ratio "${VR[1]}" "${VR[100]}") x) |"
echo "| depth 100 vs depth 1: qemu-img | | $(ratio "${QR[100]}" "${QR[1]}") x time |"
