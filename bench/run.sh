#!/usr/bin/env bash
# bench/run.sh [--quick]: every benchmark row in one run, each figure beside the baseline a
# user would otherwise pick, measured in this same run, with its ratio and target. Prints one
# markdown table and writes it to bench/results/latest.md (--quick: bench/results/quick.md).
#
#   full:    2 GiB data disk, chains of depth 1/20/100, 1 TiB sparse disks, a 2 GiB ext4 image
#            against restic and borg, a 4 GiB image replicated (send | receive); about 15-18 minutes.
#   --quick: tiny sizes, about two minutes; proves the benchmark still works, never judges speed.
#
# Needs root (mounts, drop_caches, apt-get). Installs fio, qemu-utils, restic, borgbackup and
# time if missing. Knobs: SECTIONS (a subset of "backup reads restore live meta space scale replicate s3";
# a subset run replaces only those sections' rows in the result file), DISK (bytes of the data
# disk), BIG (bytes of the sparse disk), SPACE_DISK and SPACE_FILES (bytes of the ext4 image and
# of the files in it), SCALE_BIG (bytes of the scale section's big disk), REP_DISK (bytes of the
# replicate section's image, a multiple of 128 MiB), S3_DISK (bytes of the s3 section's disk;
# the section needs garage in PATH or ~/.cargo/bin and is skipped, saying so, without it), REPS, RUNTIME (s per
# fio job), DATA (half: each 4 KiB of the data disk half random, half zeros; random),
# COMPRESSION (vmref init --compression of the data disk's store), KEEP=1 keeps the work directory. See bench/README.md for what every row measures.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
GIB=$((1 << 30))
if [ $QUICK = 1 ]; then
    DISK=${DISK:-$((64 << 20))}; BIG=${BIG:-$((4 * GIB))}; REPS=${REPS:-1}; RUNTIME=${RUNTIME:-1}
    RESULT=bench/results/quick.md
else
    DISK=${DISK:-$((2 * GIB))}; BIG=${BIG:-$((1024 * GIB))}; REPS=${REPS:-3}; RUNTIME=${RUNTIME:-2}
    RESULT=bench/results/latest.md
fi
ALL_SECTIONS="backup reads restore live meta space scale replicate s3"
SECTIONS=${SECTIONS:-$ALL_SECTIONS}
for sec in $SECTIONS; do
    case " $ALL_SECTIONS " in *" $sec "*) ;; *) echo "bench/run.sh: unknown section $sec (known: $ALL_SECTIONS)" >&2; exit 2 ;; esac
done
want() { case " $SECTIONS " in *" $1 "*) return 0 ;; esac; return 1; }
if [ $QUICK = 1 ]; then
    SPACE_DISK=${SPACE_DISK:-$((64 << 20))}; SPACE_FILES=${SPACE_FILES:-$((20 << 20))}; SCALE_BIG=${SCALE_BIG:-$GIB}
    REP_DISK=${REP_DISK:-$((128 << 20))}; S3_DISK=${S3_DISK:-$((32 << 20))}; MANY_POINTS=${MANY_POINTS:-50}
else
    SPACE_DISK=${SPACE_DISK:-$((2 * GIB))}; SPACE_FILES=${SPACE_FILES:-$((1126 << 20))}; SCALE_BIG=${SCALE_BIG:-$((1024 * GIB))}
    REP_DISK=${REP_DISK:-$((4 * GIB))}; S3_DISK=${S3_DISK:-$((512 << 20))}; MANY_POINTS=${MANY_POINTS:-1000}
fi
DEPTHS="1 20 100"
DATA=${DATA:-half}          # the data disk's bytes: half (each 4 KiB half random, half zeros) or random
COMPRESSION=${COMPRESSION:-}   # the data disk's store: vmref init --compression (empty: vmref's default)
RAND_RUNTIME=1   # s per random-read job: QD1 4 KiB reads give tens of thousands of samples
RAND_REGION=$((DISK < (1 << 30) ? DISK / 4 : 256 << 20))   # bytes a random-order pass reads, every page once
EXT=$((64 << 10))
T_START=$(date +%s)

if [ "$(id -u)" != 0 ]; then echo "bench/run.sh: run as root (mounts, drop_caches)" >&2; exit 1; fi
need=()
command -v fio >/dev/null || need+=(fio)
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v fusermount3 >/dev/null || need+=(fuse3)
if want space; then
    command -v restic >/dev/null || need+=(restic)
    command -v borg >/dev/null || need+=(borgbackup)
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
fi
if want scale; then [ -x /usr/bin/time ] || need+=(time); fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; }
fi
cargo build --release --quiet --bin vmref --example plainfs --example bench_write
V="$PWD/target/release/vmref"
P="$PWD/target/release/examples/plainfs"
W="$PWD/target/release/examples/bench_write"

WORK=$(mktemp -d /var/tmp/vmref-run.XXXXXX)
OUT=$(mktemp -d /dev/shm/vmref-run.XXXXXX)
ROWS=$WORK/rows.tsv
: > "$ROWS"
MOUNTS=()
PIDS=()
cleanup() {
    set +e
    for m in "${MOUNTS[@]}"; do
        if mountpoint -q "$m"; then umount "$m" 2>/dev/null || umount -l "$m"; fi
    done
    [ -n "${GARAGE_PID:-}" ] && kill "$GARAGE_PID" 2>/dev/null
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    rm -rf "$OUT"
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
log() { echo "[$(($(date +%s) - T_START))s] $*" >&2; }

# ---------- helpers ----------
# The clock without a process: bash's $EPOCHREALTIME (seconds.microseconds; the separator
# follows the locale). `date +%s%N` cost a fork and exec, 1-2 ms on this VM, inside every timed
# span: enough to fail the 5 ms point-creation target on its own.
now_ns() { echo "${EPOCHREALTIME/[.,]/}000"; }
# rec SECTION NAME VALUE UNIT BASELINE_NAME BASELINE_VALUE TARGET
# UNIT: Bps (bytes/s), s, ms, B (bytes), t (seconds, but the ratio is baseline / value: how many
# times faster than the baseline). TARGET: comma list of r>=x, r<=x, r>x, v>=x, v<x (r = ratio).
rec() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$ROWS"; }
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(statistics.median(v))' "$@"; }
drop_fuse_cache() { dd if="$1" iflag=nocache count=0 status=none; }
drop_all_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# dd_bw FILE -> bytes/s of one sequential 1 MiB read of the whole file
dd_bw() {
    local size t0 t1
    size=$(stat -L -c %s "$1")
    t0=$(now_ns); dd if="$1" of=/dev/null bs=1M status=none; t1=$(now_ns)
    python3 -c "print($size * 1e9 / ($t1 - $t0))"
}
# fio_bw FILE RW BS DIRECT INVALIDATE [TIMED] -> bytes/s (psync, queue depth 1)
fio_bw() {
    local timed=()
    [ "${6:-0}" = 1 ] && timed=(--time_based --runtime="$RUNTIME")
    fio --name=b --filename="$1" --rw="$2" --bs="$3" --direct="$4" --invalidate="$5" \
        --ioengine=psync --size="${SIZE:-$(stat -L -c %s "$1")}" --fallocate=none --randrepeat=0 \
        "${timed[@]}" --output-format=json |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["read"]["bw_bytes"]+j["write"]["bw_bytes"])'
}
# secs CMD... -> wall seconds of the command; secs_sync: of the command and a sync after it
secs() { local t0=${EPOCHREALTIME/[.,]/} t1; "$@" >/dev/null; t1=${EPOCHREALTIME/[.,]/}; python3 -c "print(($t1 - $t0) / 1e6)"; }
secs_sync() { secs sh -c '"$@" && sync' - "$@"; }
daemon_pid() { # STORE -> pid of the vmref daemon serving it (it holds the store lock)
    head -n 1 "$1/lock"
}
store_bytes() { # STORE -> bytes of the store minus track/: its backup data, whatever the
    # layout (format 2: repo/ holds the compressed blocks and point maps; data/ only host-local state)
    local all tr=0
    all=$(du -sb "$1" | cut -f1)
    [ -d "$1/track" ] && tr=$(du -sb "$1/track" | cut -f1)
    echo $((all - tr))
}
wait_mounted() { for _ in $(seq 100); do mountpoint -q "$1" && return 0; sleep 0.05; done; echo "$1 did not mount" >&2; exit 1; }
plainfs() { # MOUNTPOINT FILE ARGS... : start a plainfs daemon in the background
    mkdir -p "$1"
    "$P" "$@" > "$WORK/plainfs.$(basename "$1").log" 2>&1 &
    PIDS+=($!); MOUNTS+=("$1")
    wait_mounted "$1"
}

MV=$WORK/mnt-vmref
mkdir -p "$MV"
MOUNTS+=("$MV")
if want backup || want reads || want restore || want live; then
# ---------- the data disk and its chain of 100 points, and the equivalent qcow2 chain ----------
S=$WORK/store
IMG=$WORK/disk0.img
export VMREF_STORE=$S
log "making a $((DISK >> 20)) MiB disk full of data (DATA=$DATA)"
if [ "$DATA" = random ]; then
    "$W" fill "$IMG" "$DISK" "$DISK" 1
else
    # Every 4 KiB page: 2 KiB of seeded random bytes, then 2 KiB of zeros. zstd halves it, so
    # reads of points pay for decompression, as they would on a real guest's disk; no two
    # 64 KiB blocks are equal, so deduplication saves nothing.
    python3 - "$IMG" "$DISK" <<'PY'
import os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng, z = random.Random(1), bytes(2048)
with open(path, "wb") as f:
    for _ in range(size // (4 << 20)):
        r = rng.randbytes(2 << 20)
        f.write(b"".join(r[i:i + 2048] + z for i in range(0, len(r), 2048)))
    os.fsync(f.fileno())
PY
fi
"$V" -q init ${COMPRESSION:+--compression "$COMPRESSION"} >/dev/null
"$V" -q disk add disk0 "$IMG" >/dev/null
sync
t0=$(now_ns); "$V" -q backup p001 >/dev/null; t1=$(now_ns)
FULL_S=$(python3 -c "print(($t1 - $t0) / 1e9)")
STORED0=$(store_bytes "$S")
# The same disk in a second store with compression none (one full backup, n001): the reads
# section reads it beside p001, which shows what decompression costs a first read.
SN=$WORK/store-none
cp --sparse=always "$IMG" "$WORK/disk0-none.img"
"$V" -q --store "$SN" init --compression none >/dev/null
"$V" -q --store "$SN" disk add disk0 "$WORK/disk0-none.img" >/dev/null
sync
FULLN_S=$(secs "$V" -q --store "$SN" backup n001)
STOREDN=$(store_bytes "$SN")
qemu-img convert -f raw -O qcow2 "$IMG" "$WORK/q001.qcow2"

CHANGED=$((DISK / 100))
"$W" plan "$DISK" "$CHANGED" "$EXT" 2 > "$WORK/plan.002"
"$W" apply "$S" disk0 "$WORK/plan.002" 2
sync
t0=$(now_ns); "$V" -q backup p002 >/dev/null; t1=$(now_ns)
INC_S=$(python3 -c "print(($t1 - $t0) / 1e9)")
ADDED=$(( $(store_bytes "$S") - STORED0 ))
PLANNED=$(awk '{ s += $2 } END { print s }' "$WORK/plan.002")
if want backup; then
rec backup "incremental backup (1 % changed) vs full backup, time" "$INC_S" s "full backup" "$FULL_S" "r<=0.03"
rec backup "store bytes added by the incremental (random bytes: incompressible) vs bytes changed" "$ADDED" B "bytes changed" "$PLANNED" "r<=1.05"
rec backup "full backup, default compression, store bytes" "$STORED0" B "same disk, compression none" "$STOREDN" ""
rec backup "full backup, default compression, time" "$FULL_S" s "same disk, compression none" "$FULLN_S" ""
fi

qemu_apply() { # overlay n on n-1, then the plan's writes
    local n=$1 prev=$2 plan=$3 args=()
    qemu-img create -q -f qcow2 -F qcow2 -b "$WORK/q$prev.qcow2" "$WORK/q$n.qcow2"
    while read -r off len; do args+=(-c "write -P 0x5a $off $len"); done < "$plan"
    qemu-io -f qcow2 "${args[@]}" "$WORK/q$n.qcow2" >/dev/null
}
if want reads || want restore; then
qemu_apply 002 001 "$WORK/plan.002"
log "building chains of 100 points (vmref backups and qcow2 overlays)"
for i in $(seq 3 100); do
    n=$(printf %03d "$i"); p=$(printf %03d $((i - 1)))
    "$W" plan "$DISK" $((16 * EXT)) "$EXT" "$i" > "$WORK/plan.$n"
    "$W" apply "$S" disk0 "$WORK/plan.$n" "$i"
    "$V" -q backup "p$n" >/dev/null
    qemu_apply "$n" "$p" "$WORK/plan.$n"
done
fi   # reads or restore: the chains

# ---------- point image reads ----------
if want reads; then
"$V" -q mount "$MV"
plainfs "$WORK/mnt-keep" "$IMG" --mode keep-cache
plainfs "$WORK/mnt-direct" "$IMG" --mode direct-io
MN=$WORK/mnt-none
mkdir -p "$MN"; MOUNTS+=("$MN")
"$V" -q --store "$SN" mount "$MN"
PT_OK=1
plainfs "$WORK/mnt-pt" "$IMG" --mode passthrough
if ! dd if="$WORK/mnt-pt/disk.img" of=/dev/null bs=4k count=1 status=none 2>"$WORK/pt.err"; then
    PT_OK=0
    log "kernel FUSE passthrough refused: $(cat "$WORK/pt.err" "$WORK/plainfs.mnt-pt.log" | tr '\n' ' ')"
fi
# The point images and the raw file hold different bytes (points 1 and 10 are older), but the
# same amount of data: the rows compare paths, and the tests check bytes.
declare -A F=(
    [raw]=$IMG
    [keep]=$WORK/mnt-keep/disk.img
    [direct]=$WORK/mnt-direct/disk.img
    [pt]=$WORK/mnt-pt/disk.img
    [n1]=$MN/n001/disk0.img
)
PTS=""
for d in $DEPTHS; do F[p$d]=$MV/p$(printf %03d "$d")/disk0.img; PTS+=" p$d"; done
TARGETS="raw keep direct p1 n1$PTS"
[ $PT_OK = 1 ] && TARGETS="raw keep direct pt p1 n1$PTS"
for st in "$S" "$SN"; do find "$st" -path "$st/track" -prune -o -type f -exec cat {} + > /dev/null; done
cat "$IMG" > /dev/null   # warm: the raw file and every stored file (repo/ packs, indexes) in the page cache
declare -A DD1 DD2 FSEQ FRND FRNDW
log "point reads: $REPS repetitions of dd 1 MiB (first read, re-read), fio seq 1 MiB, fio rand 4 KiB"
for _ in $(seq "$REPS"); do
    for t in $TARGETS; do
        f=${F[$t]}
        inv=1; case $t in raw | pt) inv=0 ;; esac   # never drop the raw file's own cache
        [ $inv = 1 ] && drop_fuse_cache "$f"
        DD1[$t]+="$(dd_bw "$f") "
        DD2[$t]+="$(dd_bw "$f") "
        FSEQ[$t]+="$(fio_bw "$f" read 1M 0 "$inv") "
        FRND[$t]+="$(RUNTIME=$RAND_RUNTIME fio_bw "$f" randread 4k 0 "$inv" 1) "
        # Every page of a region once, in random order (fio's random map): how a tool reading
        # an image in small pieces goes through it. Blocks are revisited, unlike the 1 s run.
        [ $inv = 1 ] && drop_fuse_cache "$f"
        FRNDW[$t]+="$(SIZE=$RAND_REGION fio_bw "$f" randread 4k 0 "$inv") "
    done
done
m() { local -n arr=$1; median ${arr[$2]}; }
for what in DD1 DD2 FSEQ FRND FRNDW; do
    case $what in
        # First sequential reads: >= 0.7x the FUSE limit with default compression (they
        # decompress), >= 0.9x with compression none (store format v2 targets).
        DD1) label="seq read dd 1 MiB, first read"; tgt="r>=0.7,v>=3e9"; tgtn="r>=0.9" ;;
        DD2) label="seq read dd 1 MiB, re-read (page cache)"; tgt="r>=0.9"; tgtn="r>=0.9" ;;
        FSEQ) label="seq read fio 1 MiB, first read"; tgt="r>=0.7,v>=3e9"; tgtn="r>=0.9" ;;
        FRND) label="rand read fio 4 KiB QD1, first read"; tgt="r>=0.9"; tgtn="r>=0.9" ;;
        FRNDW) label="rand read fio 4 KiB QD1, every page of $((RAND_REGION >> 20)) MiB once, first read"; tgt="r>=0.9"; tgtn="r>=0.9" ;;
    esac
    keep=$(m $what keep)
    comp="default compression"; [ -n "$COMPRESSION" ] && comp="compression $COMPRESSION"
    for d in $DEPTHS; do
        rec reads "point depth $d ($comp): $label" "$(m $what "p$d")" Bps "plainfs keep-cache" "$keep" "$tgt"
    done
    rec reads "point depth 1 (compression none): $label" "$(m $what n1)" Bps "plainfs keep-cache" "$keep" "$tgtn"
    rec reads "point depth 1, $comp vs compression none: $label" "$(m $what p1)" Bps "compression none" "$(m $what n1)" ""
    rec reads "point depth 100 vs depth 1: $label" "$(m $what p100)" Bps "point depth 1" "$(m $what p1)" "r>=0.9"
    rec reads "baseline plainfs keep-cache: $label" "$keep" Bps "raw file (page cache)" "$(m $what raw)" ""
    rec reads "baseline plainfs direct-io: $label" "$(m $what direct)" Bps "raw file (page cache)" "$(m $what raw)" ""
    if [ $PT_OK = 1 ]; then
        rec reads "baseline kernel passthrough: $label" "$(m $what pt)" Bps "raw file (page cache)" "$(m $what raw)" ""
    fi
done
[ $PT_OK = 1 ] || rec reads "kernel FUSE passthrough" "refused" - "" "" ""
"$V" -q --store "$SN" umount "$MN"
fi   # reads

# ---------- restore ----------
if want restore; then
mountpoint -q "$MV" || "$V" -q mount "$MV"
log "restore: vmref restore, cp --sparse=always from the mount, qemu-img convert, each + sync; warm x$REPS, cold x1"
declare -A RV RC RQ
restore_round() { # d cold
    local d=$1 cold=$2 n v c q
    n=$(printf %03d "$d")
    [ "$cold" = 1 ] && drop_all_caches
    v=$(secs_sync "$V" -q restore "p$n" --disk disk0 --to "$OUT/v.img")
    rm -f "$OUT/v.img"
    if [ "$cold" = 1 ]; then drop_all_caches; else drop_fuse_cache "$MV/p$n/disk0.img"; fi
    c=$(secs_sync cp --sparse=always "$MV/p$n/disk0.img" "$OUT/c.img")
    rm -f "$OUT/c.img"
    [ "$cold" = 1 ] && drop_all_caches
    q=$(secs_sync qemu-img convert -O raw "$WORK/q$n.qcow2" "$OUT/q.raw")
    rm -f "$OUT/q.raw"
    RV[$d$cold]+="$v "; RC[$d$cold]+="$c "; RQ[$d$cold]+="$q "
}
for d in $DEPTHS; do   # warm-up: every chain's files in the page cache once
    n=$(printf %03d "$d"); cat "$WORK/q$n.qcow2" > /dev/null
done
for _ in $(seq "$REPS"); do for d in $DEPTHS; do restore_round "$d" 0; done; done
for d in $DEPTHS; do restore_round "$d" 1; done
for cold in 0 1; do
    w="warm, + sync"; [ $cold = 1 ] && w="cold (drop_caches), + sync"
    for d in $DEPTHS; do
        q=$(median ${RQ[$d$cold]})
        qb=$(python3 -c "print($DISK / $q)")
        # Warm restores must at least match qemu-img, cold ones beat it by 1.2x; a cold copy out
        # of the mount must reach 0.8x of it (issue 12).
        tv="r>=1.0"; tc="r>=0.5"; [ $cold = 1 ] && { tv="r>=1.2"; tc="r>=0.8"; }
        rec restore "depth $d $w: vmref restore" "$(python3 -c "print($DISK / $(median ${RV[$d$cold]}))")" Bps "qemu-img convert -O raw (qcow2 chain)" "$qb" "$tv"
        rec restore "depth $d $w: cp --sparse=always from the mount" "$(python3 -c "print($DISK / $(median ${RC[$d$cold]}))")" Bps "qemu-img convert -O raw (qcow2 chain)" "$qb" "$tc"
    done
done
# Cold sequential reads: dd of a point image through the mount against dd of a raw file holding
# the same bytes (the point restored beside the store, on the same disk), caches dropped before each.
log "restore: cold dd bs=1M of point images vs raw files of the same bytes, x$REPS"
declare -A DCP DCR
for d in $DEPTHS; do
    n=$(printf %03d "$d")
    "$V" -q restore "p$n" --disk disk0 --to "$WORK/raw$n.img" >/dev/null
done
for _ in $(seq "$REPS"); do
    for d in $DEPTHS; do
        n=$(printf %03d "$d")
        drop_all_caches; DCR[$d]+="$(dd_bw "$WORK/raw$n.img") "
        drop_all_caches; DCP[$d]+="$(dd_bw "$MV/p$n/disk0.img") "
    done
done
for d in $DEPTHS; do
    rec restore "depth $d: dd bs=1M of the point image from the mount, cold (drop_caches)" "$(median ${DCP[$d]})" Bps "dd bs=1M of a raw file of the same bytes, cold" "$(median ${DCR[$d]})" "r>=0.9"
    rm -f "$WORK/raw$(printf %03d "$d").img"
done
"$V" -q umount "$MV"
cat "$IMG" > /dev/null
fi   # restore

# ---------- live writes (and reads) ----------
if want live; then
log "live writes: vmref live (tracked) vs plainfs direct-io (untracked) vs raw file, $REPS x ${RUNTIME}s each"
# All three write the very same image file, one at a time: two different files (a copy for the
# baselines) start in different page-cache and writeback states, which moved 4 KiB random
# write figures by 2x on their own. Writes by plainfs and the raw jobs are outside writes to
# vmref, so it restarts tracking at each remount: that costs nothing on the write path.
cat "$IMG" > /dev/null
LIVE=$MV/live/disk0.img
PLAIN=$WORK/mnt-rw/disk.img
use() { # live | plain | raw: mount what serves that target, unmount the rest
    if [ "$1" != live ] && mountpoint -q "$MV"; then "$V" -q umount "$MV" >/dev/null; fi
    if [ "$1" != plain ] && mountpoint -q "$WORK/mnt-rw"; then fusermount3 -u "$WORK/mnt-rw"; fi
    case $1 in
        live) mountpoint -q "$MV" || "$V" -q mount "$MV" >/dev/null ;;
        plain) mountpoint -q "$WORK/mnt-rw" || plainfs "$WORK/mnt-rw" "$IMG" --rw --mode direct-io ;;
    esac
}
declare -A LW
order=(live plain raw)
for _ in $(seq "$REPS"); do
    order=("${order[@]:1}" "${order[0]}")   # rotate: no target always runs after another's writeback
    for job in "write 1M 0" "write 1M 1" "randwrite 4k 0" "randwrite 4k 1" "read 1M 0"; do
        set -- $job
        for t in "${order[@]}"; do
            use "$t"
            sync
            case $t in live) f=$LIVE ;; plain) f=$PLAIN ;; raw) f=$IMG ;; esac
            LW[$job$t]+="$(fio_bw "$f" "$1" "$2" "$3" 0 1) "
        done
    done
done
use raw
for job in "write 1M 0" "write 1M 1" "randwrite 4k 0" "randwrite 4k 1" "read 1M 0"; do
    set -- $job
    io=buffered; [ "$3" = 1 ] && io=O_DIRECT
    label="live $1 $2 $io"
    tgt="r>=0.95"; [ "$1" = read ] && tgt=""
    if [ "$1" = read ]; then
        rec live "$label: vmref (tracked)" "$(median ${LW[${job}live]})" Bps "raw file (page cache)" "$(median ${LW[${job}raw]})" ""
    else
        rec live "$label: vmref (tracked)" "$(median ${LW[${job}live]})" Bps "plainfs direct-io (untracked)" "$(median ${LW[${job}plain]})" "$tgt"
    fi
    rec live "$label: baseline plainfs (untracked)" "$(median ${LW[${job}plain]})" Bps "raw file" "$(median ${LW[${job}raw]})" ""
done

# What a VM with cache=none, aio=native does: O_DIRECT, Linux AIO, many requests in flight.
# qemu-img bench only writes sequentially, so the 4 KiB random rows use fio's libaio engine
# (the same syscalls). Each row against the raw file, one job after the other, alternated.
log "live VM-like writes: qemu-img bench 1 MiB QD8 into new space, fio libaio 4 KiB QD32, dd read-only"
qbench_s() { # FILE COUNT -> seconds that qemu-img bench reports for COUNT 1 MiB writes at depth 8
    qemu-img bench -w -t none -i native -f raw -s 1M -d 8 -c "$2" "$1" |
        sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'
}
fio_aio_bw() { # FILE -> bytes/s of 4 KiB random O_DIRECT writes at queue depth 32 (libaio)
    fio --name=b --filename="$1" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
        --iodepth=32 --size="$(stat -L -c %s "$1")" --fallocate=none --randrepeat=0 \
        --time_based --runtime="$RUNTIME" --output-format=json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"])'
}
NEWS=$WORK/new-store
NEWM=$WORK/mnt-new
mkdir -p "$NEWM"; MOUNTS+=("$NEWM")
declare -A VW
order=(live raw)
for _ in $(seq "$REPS"); do
    # Alternate which goes first: the one after the previous round's deletes and unmount
    # would otherwise always meet the disk still busy with them.
    order=("${order[1]}" "${order[0]}")
    # First writes: a fresh sparse disk of DISK bytes in a fresh store each time (every region
    # of it never written, never marked), and a fresh sparse raw file beside it.
    rm -rf "$NEWS" "$WORK/new.img" "$WORK/new-raw.img"
    truncate -s "$DISK" "$WORK/new.img" "$WORK/new-raw.img"
    "$V" -q --store "$NEWS" init >/dev/null
    "$V" -q --store "$NEWS" disk add new "$WORK/new.img" >/dev/null
    sync
    for t in "${order[@]}"; do
        if [ "$t" = live ]; then
            "$V" -q --store "$NEWS" mount "$NEWM" >/dev/null
            VW[firstlive]+="$(qbench_s "$NEWM/live/new.img" $((DISK >> 20))) "
            "$V" -q --store "$NEWS" umount "$NEWM" >/dev/null
        else
            VW[firstraw]+="$(qbench_s "$WORK/new-raw.img" $((DISK >> 20))) "
        fi
        sync
    done
    for t in "${order[@]}"; do
        use "$t"
        sync
        case $t in live) f=$LIVE ;; raw) f=$IMG ;; esac
        VW[rand$t]+="$(fio_aio_bw "$f") "
        # A reader that opens the live disk read-only (a backup tool, a checksum) beside the
        # mount, vs the raw file: both in the page cache.
        cat "$IMG" > /dev/null
        VW[ro$t]+="$(dd_bw "$f") "
    done
done
use raw
rm -rf "$NEWS" "$WORK/new.img" "$WORK/new-raw.img"
rec live "first writes to never-written space, qemu-img bench 1 MiB QD8 O_DIRECT native: vmref (tracked)" "$(median ${VW[firstlive]})" t "raw file (sparse)" "$(median ${VW[firstraw]})" "r>=0.8"
rec live "randwrite 4 KiB QD32 O_DIRECT libaio: vmref (tracked)" "$(median ${VW[randlive]})" Bps "raw file" "$(median ${VW[randraw]})" "r>=0.8"
rec live "read dd 1 MiB, opened read-only: vmref live disk" "$(median ${VW[rolive]})" Bps "raw file (page cache)" "$(median ${VW[roraw]})" "r>=0.9"
fi   # live
fi   # the data disk

# ---------- 1 TiB sparse disk: point creation, changes, memory ----------
if want meta; then
big_store() { # NAME SIZE -> a store with one sparse disk, a point p0 before 1 % of its blocks changed
    local s=$WORK/$1 size=$2
    mkdir -p "$s"
    truncate -s "$size" "$WORK/$1.img"
    "$V" -q --store "$s/store" init >/dev/null
    "$V" -q --store "$s/store" disk add big "$WORK/$1.img" >/dev/null
    "$V" -q --store "$s/store" ref create p0 >/dev/null
}
log "sparse disks: $((BIG >> 30)) GiB with 1 % of its blocks changed (4 KiB written into each), and 1 GiB"
big_store big "$BIG"
big_store small $GIB
"$W" plan "$BIG" $((BIG / 100)) "$EXT" 5 4096 > "$WORK/plan.big"
"$W" apply "$WORK/big/store" big "$WORK/plan.big" 5
"$W" plan $GIB $((GIB / 100)) "$EXT" 6 4096 > "$WORK/plan.small"
"$W" apply "$WORK/small/store" big "$WORK/plan.small" 6
declare -A CR CH HWM RSS
for which in small big; do
    s=$WORK/$which/store
    mkdir -p "$WORK/$which/mnt"
    "$V" -q --store "$s" mount "$WORK/$which/mnt"
    MOUNTS+=("$WORK/$which/mnt")
    pid=$(daemon_pid "$s")
    RSS[$which]=$(awk '/VmRSS/ { print $2 * 1024 }' "/proc/$pid/status")
    for i in $(seq 5); do
        CH[$which]+="$(secs "$V" -q --store "$s" changes --since p0 --json) "
    done
    # Each point follows a few tracked writes, so that its flush has work to do.
    for i in $(seq 7); do
        dd if=/dev/urandom of="$WORK/$which/mnt/live/big.img" bs=64k count=16 seek=$((i * 1000)) \
            conv=notrunc,fsync status=none
        CR[$which]+="$(secs "$V" -q --store "$s" ref create "c$i") "
    done
    if [ $which = small ]; then
        # The same beside many points: a point is a record, and making one must not read them all.
        for i in $(seq "$MANY_POINTS"); do "$V" -q --store "$s" ref create "m$i" >/dev/null; done
        for i in $(seq 7); do
            dd if=/dev/urandom of="$WORK/$which/mnt/live/big.img" bs=64k count=16 seek=$((i * 1000)) \
                conv=notrunc,fsync status=none
            CR[many]+="$(secs "$V" -q --store "$s" ref create "d$i") "
        done
    fi
    pid=$(daemon_pid "$s")
    HWM[$which]=$(awk '/VmHWM/ { print $2 * 1024 }' "/proc/$pid/status")
    "$V" -q --store "$s" umount "$WORK/$which/mnt"
done
BIGN="$((BIG >> 30)) GiB"
rec meta "point creation (ref create via the daemon), 1 GiB sparse disk" "$(median ${CR[small]})" s "" "" "v<0.005"
rec meta "point creation (ref create via the daemon), $BIGN sparse disk" "$(median ${CR[big]})" s "1 GiB disk" "$(median ${CR[small]})" "v<0.005"
rec meta "point creation beside $MANY_POINTS points, 1 GiB sparse disk" "$(median ${CR[many]})" s "beside 1-7 points" "$(median ${CR[small]})" "v<0.005,r<=1.2"
rec meta "changes --since p0 --json, $BIGN sparse disk, 1 % of blocks changed ($(wc -l < "$WORK/plan.big") extents)" "$(median ${CH[big]})" s "" "" "v<0.1"
rec meta "daemon RSS, $BIGN sparse disk mounted, 1 % of blocks changed (every tracking region allocated)" "${RSS[big]}" B "same daemon, 1 GiB disk" "${RSS[small]}" ""
tracker=$(python3 -c "print(max(0, ${RSS[big]} - ${RSS[small]}) * $((1024 * GIB)) / $BIG)")
rec meta "tracker memory per TiB (RSS minus the 1 GiB daemon's, scaled to 1 TiB)" "$tracker" B "" "" "v<=67108864"
rec meta "daemon peak RSS (VmHWM) after the changes queries, $BIGN disk" "${HWM[big]}" B "same daemon, 1 GiB disk" "${HWM[small]}" ""

fi   # meta

# ---------- space: a real ext4 image, a full and five 1 % rewrites, vs restic and borg ----------
if want space; then
SP=$WORK/space
SS=$SP/store
mkdir -p "$SP/files" "$SP/mnt" "$OUT/space"
log "space: a $((SPACE_DISK >> 20)) MiB ext4 image of $((SPACE_FILES >> 20)) MiB of this machine's files"
# Regular files of /usr/bin, /usr/share, then /usr/lib, each in name order, skipping any that
# would take the total past SPACE_FILES.
: > "$SP/files.list"
left=$SPACE_FILES
for d in /usr/bin /usr/share /usr/lib; do
    [ "$left" -ge $((1 << 20)) ] || break   # full enough: do not walk the next tree
    find "$d" -xdev -type f -printf '%s %p\n' 2>/dev/null | LC_ALL=C sort -k2 |
        awk -v cap="$left" -v tf="$SP/files.took" \
            't + $1 > cap { next } { t += $1; print substr($0, length($1) + 2) } END { print t + 0 > tf }' >> "$SP/files.list"
    left=$((left - $(cat "$SP/files.took")))
done
tar -C / --no-recursion --verbatim-files-from -T "$SP/files.list" -cf - 2>/dev/null | tar -C "$SP/files" -xf -
FILES_B=$(du -sb --apparent-size "$SP/files" | cut -f1)
truncate -s "$SPACE_DISK" "$SP/disk.img"
mkfs.ext4 -q -F -b 4096 -E nodiscard -d "$SP/files" "$SP/disk.img"
rm -rf "$SP/files"
cp --sparse=always "$SP/disk.img" "$SP/plain.img"   # restic's and borg's copy: same bytes, same writes
"$V" -q --store "$SS" init --block-size 64K >/dev/null
"$V" -q --store "$SS" disk add vm "$SP/disk.img" >/dev/null
"$V" -q --store "$SS" mount "$SP/mnt"
MOUNTS+=("$SP/mnt")
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$SP/restic-cache
export BORG_BASE_DIR=$SP/borg-base BORG_PASSPHRASE="" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
restic -q init --repo "$SP/restic" >/dev/null
borg init -e none "$SP/borg"
bk_vmref() { "$V" -q --store "$SS" backup "s$1"; }
bk_restic() { restic -q --repo "$SP/restic" backup "$SP/plain.img"; }
bk_borg() { (cd "$SP" && borg create "$SP/borg::s$1" plain.img); }
# rewrite STEP: 1 % of the disk's 64 KiB blocks, at random aligned offsets (seeded): half of them
# new random bytes, half copies of other non-zero blocks of the same disk; the same bytes go to
# vmref's live file (through the mount) and to the plain copy. Prints the bytes written.
rewrite() {
    python3 - "$SP/mnt/live/vm.img" "$SP/plain.img" "$SPACE_DISK" "$EXT" "$1" <<'EOF'
import os, random, sys
live, plain, size, bs, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(1000 + step)
nblocks = size // bs
n = max(2, round(nblocks / 100))
fl, fp = os.open(live, os.O_RDWR), os.open(plain, os.O_RDWR)
zero = bytes(bs)
for k, t in enumerate(rng.sample(range(nblocks), n)):
    if k < n // 2:
        buf = rng.randbytes(bs)
    else:
        for _ in range(1000):
            s = rng.randrange(nblocks)
            buf = os.pread(fp, bs, s * bs)
            if s != t and buf != zero:
                break
    assert os.pwrite(fl, buf, t * bs) == bs and os.pwrite(fp, buf, t * bs) == bs
os.fsync(fl); os.fsync(fp)
print(n * bs)
EOF
}
sync
FV=$(secs bk_vmref 0); FR=$(secs bk_restic); FB=$(secs bk_borg 0)
SV0=$(store_bytes "$SS"); SR0=$(du -sb "$SP/restic" | cut -f1); SB0=$(du -sb "$SP/borg" | cut -f1)
log "space: five 1 % rewrites, each followed by vmref backup, restic backup, borg create"
IV=""; IR=""; IB=""
for i in 1 2 3 4 5; do
    STEP_B=$(rewrite "$i")
    sync
    IV+="$(secs bk_vmref "$i") "; IR+="$(secs bk_restic) "; IB+="$(secs bk_borg "$i") "
done
SV5=$(store_bytes "$SS"); SR5=$(du -sb "$SP/restic" | cut -f1); SB5=$(du -sb "$SP/borg" | cut -f1)
mean() { python3 -c 'import sys; v=[float(x) for x in sys.argv[1:]]; print(sum(v) / len(v))' "$@"; }
log "space: cold restores of the last point (drop_caches before each, sync included), checked against the image"
# restore_check NAME CMD...: time CMD plus a sync, cold; then compare the file it made with the
# plain copy: a figure that restored other bytes is recorded as "wrong".
restore_check() {
    local name=$1 file=$2 t; shift 2
    drop_all_caches
    t=$(secs sh -c '"$@" && sync' - "$@")
    if cmp -s "$file" "$SP/plain.img"; then echo "$t"; else log "space: $name restored other bytes"; echo wrong; fi
    rm -rf "$OUT/space"; mkdir -p "$OUT/space"
}
RV5=$(restore_check vmref "$OUT/space/v.img" "$V" -q --store "$SS" restore s5 --disk vm --to "$OUT/space/v.img")
RR5=$(restore_check restic "$OUT/space/r$SP/plain.img" restic -q --repo "$SP/restic" restore latest --target "$OUT/space/r")
mkdir -p "$OUT/space/b"
RB5=$(restore_check borg "$OUT/space/b/plain.img" sh -c 'cd "$1" && borg extract --sparse "$2::s5"' - "$OUT/space/b" "$SP/borg")
"$V" -q --store "$SS" umount "$SP/mnt"
info="$((SPACE_DISK >> 20)) MiB ext4 image, $((FILES_B >> 20)) MiB of files"
rec space "input: bytes of the files in the ext4 image ($info)" "$FILES_B" B "" "" ""
rec space "input: bytes rewritten by each of the five steps (1 % of the disk)" "$STEP_B" B "" "" ""
rec space "repository after the full backup: vmref store (minus track/)" "$SV0" B "restic repository" "$SR0" "r<=1.0"
rec space "repository after the full backup: vmref store (minus track/)" "$SV0" B "borg repository" "$SB0" "r<=1.0"
rec space "repository after the full and five 1 % incrementals: vmref store" "$SV5" B "restic repository" "$SR5" "r<=1.0"
rec space "repository after the full and five 1 % incrementals: vmref store" "$SV5" B "borg repository" "$SB5" "r<=1.0"
rec space "full backup time (ratio = their time / vmref's)" "$FV" t "restic backup" "$FR" "r>1.0"
rec space "full backup time (ratio = their time / vmref's)" "$FV" t "borg create" "$FB" "r>1.0"
rec space "mean incremental backup time, 1 % rewritten (ratio = their time / vmref's)" "$(mean $IV)" t "restic backup" "$(mean $IR)" "r>1.0"
rec space "mean incremental backup time, 1 % rewritten (ratio = their time / vmref's)" "$(mean $IV)" t "borg create" "$(mean $IB)" "r>1.0"
rec space "cold restore of the last point + sync (ratio = their time / vmref's)" "$RV5" t "restic restore" "$RR5" "r>=2.0"
rec space "cold restore of the last point + sync (ratio = their time / vmref's)" "$RV5" t "borg extract --sparse" "$RB5" "r>=2.0"
rm -rf "$SP"
fi   # space

# ---------- scale: a point costs what changed, not what the disk holds ----------
if want scale; then
SCALE_DATA=$((64 << 20))
# scale_disk NAME SIZE SEED: a store with one sparse disk holding SCALE_DATA bytes in 64 KiB
# blocks at random offsets; a full backup under /usr/bin/time, then REPS rounds of an
# incremental with nothing changed and one with one block changed (store bytes added, time);
# then mounted, three points' images copied out with cp --sparse=always, and the daemon's VmHWM.
declare -A SC_RSS SC_A0 SC_A1 SC_T0 SC_T1 SC_HWM SC_FULL
scale_disk() {
    local name=$1 size=$2 seed=$3 d=$WORK/scale-$1 s b0 b1 a0="" a1="" t0="" t1="" r pid
    s=$d/store
    mkdir -p "$d/mnt"
    truncate -s "$size" "$d/disk.img"
    "$V" -q --store "$s" init --block-size 64K >/dev/null
    "$V" -q --store "$s" disk add d "$d/disk.img" >/dev/null
    "$W" plan "$size" "$SCALE_DATA" "$EXT" "$seed" > "$d/plan.data"
    "$W" apply "$s" d "$d/plan.data" "$seed"
    sync
    SC_FULL[$name]=$(secs /usr/bin/time -f %M -o "$d/rss" "$V" -q --store "$s" backup --full f0)
    SC_RSS[$name]=$(( $(tail -n 1 "$d/rss") * 1024 ))
    for r in $(seq "$REPS"); do
        b0=$(store_bytes "$s")
        t0+="$(secs "$V" -q --store "$s" backup "e$r") "
        b1=$(store_bytes "$s"); a0+="$((b1 - b0)) "
        "$W" plan "$size" "$EXT" "$EXT" $((seed * 100 + r)) > "$d/plan.one"
        "$W" apply "$s" d "$d/plan.one" $((seed * 100 + r))
        sync
        b0=$(store_bytes "$s")
        t1+="$(secs "$V" -q --store "$s" backup "o$r") "
        b1=$(store_bytes "$s"); a1+="$((b1 - b0)) "
    done
    SC_A0[$name]=$(median $a0); SC_A1[$name]=$(median $a1)
    SC_T0[$name]=$(median $t0); SC_T1[$name]=$(median $t1)
    "$V" -q --store "$s" mount "$d/mnt"
    MOUNTS+=("$d/mnt")
    for p in f0 e1 o1; do cp --sparse=always "$d/mnt/$p/d.img" "$OUT/scale.img"; rm -f "$OUT/scale.img"; done
    pid=$(daemon_pid "$s")
    SC_HWM[$name]=$(awk '/VmHWM/ { print $2 * 1024 }' "/proc/$pid/status")
    "$V" -q --store "$s" umount "$d/mnt"
    rm -rf "$d"
}
SBN="$((SCALE_BIG >> 30)) GiB"
log "scale: $SBN and 1 GiB sparse disks with $((SCALE_DATA >> 20)) MiB of data: full, then $REPS x (0, 1 changed block) incrementals"
scale_disk small "$GIB" 7
scale_disk big "$SCALE_BIG" 8
rec scale "full backup of $((SCALE_DATA >> 20)) MiB on a $SBN sparse disk, time" "${SC_FULL[big]}" s "same on a 1 GiB disk" "${SC_FULL[small]}" ""
rec scale "store bytes added by an incremental with 0 changed blocks, $SBN disk" "${SC_A0[big]}" B "same on a 1 GiB disk" "${SC_A0[small]}" "v<=1048576"
rec scale "store bytes added by an incremental with 1 changed block, $SBN disk" "${SC_A1[big]}" B "same on a 1 GiB disk" "${SC_A1[small]}" "v<=1048576"
rec scale "time of an incremental with 0 changed blocks, $SBN disk" "${SC_T0[big]}" s "same on a 1 GiB disk" "${SC_T0[small]}" "r<=3"
rec scale "time of an incremental with 1 changed block, $SBN disk" "${SC_T1[big]}" s "same on a 1 GiB disk" "${SC_T1[small]}" "r<=3"
rec scale "peak RSS of backup --full (no daemon), $SBN disk" "${SC_RSS[big]}" B "same on a 1 GiB disk" "${SC_RSS[small]}" "v<=134217728"
rec scale "daemon VmHWM after cp --sparse=always of three points' images, $SBN disk" "${SC_HWM[big]}" B "same on a 1 GiB disk" "${SC_HWM[small]}" "v<=134217728"
fi   # scale

# ---------- replicate: send | receive of a full, an incremental and a checkpoint ----------
if want replicate; then
R=$WORK/rep
RI=$R/disk0.img
RS=$R/src
mkdir -p "$R"
RN="$((REP_DISK >> 20)) MiB"
log "replicate: a $RN image, half allocated, data half random and half compressible"
# The layouts of the other sections' generators combined: 64 MiB of data, then a 64 MiB hole (as
# bench_write fill lays out its sparse images: half the image allocated); the data's 64 KiB
# blocks alternately all random and DATA=half blocks (each 4 KiB: 2 KiB random, 2 KiB zeros), so
# zstd saves about a quarter of the data and no two blocks are equal.
python3 - "$RI" "$REP_DISK" <<'PY'
import os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng, z, ch = random.Random(3), bytes(2048), 64 << 20
with open(path, "wb") as f:
    f.truncate(size)
    for c in range(0, size // ch, 2):
        r = rng.randbytes(48 << 20)
        whole, half = r[:32 << 20], r[32 << 20:]
        out = []
        for b in range(512):
            out.append(whole[b << 16:(b + 1) << 16])
            h = half[b << 15:(b + 1) << 15]
            out.append(b"".join(h[i:i + 2048] + z for i in range(0, 32768, 2048)))
        os.pwrite(f.fileno(), b"".join(out), c * ch)
    os.fsync(f.fileno())
PY
REP_ALLOC=$(du -B1 "$RI" | cut -f1)
"$V" -q --store "$RS" init --block-size 64K >/dev/null
"$V" -q --store "$RS" disk add disk0 "$RI" >/dev/null
"$V" -q --store "$RS" backup FULL >/dev/null
rep_init() { rm -rf "$1"; "$V" -q --store "$1" init --block-size 64K >/dev/null; }
rep_warm() { cat "$RI" > /dev/null; find "$RS" -path "$RS/track" -prune -o -type f -exec cat {} + > /dev/null; }
# rep_pipe DEST JSON SEND_ARGS...: T = wall seconds of `vmref send ARGS | vmref --store DEST
# receive --json > JSON` and a sync (not in a $(...): a failed send or receive stops the bench)
rep_pipe() {
    local dst=$1 js=$2 t0 t1; shift 2
    t0=$(now_ns)
    "$V" -q --store "$RS" send "$@" | "$V" -q --store "$dst" receive --json > "$js"
    sync
    t1=$(now_ns)
    T=$(python3 -c "print(($t1 - $t0) / 1e9)")
}
# rep_recv DEST JSON RECEIVE_ARGS...: T = wall seconds of `vmref --store DEST receive ARGS` + sync
rep_recv() {
    local dst=$1 js=$2 t0 t1; shift 2
    t0=$(now_ns)
    "$V" -q --store "$dst" receive --json "$@" > "$js"
    sync
    t1=$(now_ns)
    T=$(python3 -c "print(($t1 - $t0) / 1e9)")
}
json() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
# rep_check STORE POINT FILE: POINT's disk0 restored from STORE must hold FILE's bytes
rep_check() {
    rm -f "$OUT/rep-check.img"
    "$V" -q --store "$1" restore "$2" --disk disk0 --to "$OUT/rep-check.img" >/dev/null
    if ! cmp "$OUT/rep-check.img" "$3"; then
        echo "bench/run.sh: replicate: point $2 as received in $1 differs from $3" >&2
        exit 1
    fi
    rm -f "$OUT/rep-check.img"
}
log "replicate: $REPS x (send FULL | receive into a fresh store; cat IMAGE | cat > COPY; send > /dev/null; receive --input)"
"$V" -q --store "$RS" send FULL --output "$OUT/full.stream"
FULL_SB=$(stat -c %s "$OUT/full.stream")
RF=""; RC=""; RSO=""; RRO=""
for r in $(seq "$REPS"); do
    rep_init "$R/dst$r"; rep_warm; sync
    rep_pipe "$R/dst$r" "$R/full.json" FULL; RF+="$T "
    rep_warm; sync
    RC+="$(secs_sync sh -c 'cat "$1" | cat > "$2"' - "$RI" "$R/copy") "
    rm -f "$R/copy"; sync
    rep_warm
    RSO+="$(secs "$V" -q --store "$RS" send FULL) "   # secs sends stdout to /dev/null
    rep_init "$R/dstf"; sync
    rep_recv "$R/dstf" "$R/fullf.json" --input "$OUT/full.stream"; RRO+="$T "
done
rep_check "$R/dst1" FULL "$RI"
# A replica image at FULL, for the incremental's --apply below (store dsta).
rep_init "$R/dsta"; sync
rep_recv "$R/dsta" "$R/fulla.json" --input "$OUT/full.stream" --apply "disk0=$R/replica.img"
RFA=$T
rm -f "$OUT/full.stream"

log "replicate: 1 % of the blocks rewritten, backup INC, $REPS x send INC --since FULL | receive"
"$W" plan "$REP_DISK" $((REP_DISK / 100)) "$EXT" 21 > "$R/plan.inc"
"$W" apply "$RS" disk0 "$R/plan.inc" 21
REP_CHANGED=$(awk '{ s += $2 } END { print s }' "$R/plan.inc")
"$V" -q --store "$RS" backup INC >/dev/null
"$V" -q --store "$RS" send INC --since FULL --output "$OUT/inc.stream"
INC_SB=$(stat -c %s "$OUT/inc.stream")
RI1=""
for r in $(seq "$REPS"); do   # each dst holds FULL only: each takes the same incremental once
    rep_warm; sync
    rep_pipe "$R/dst$r" "$R/inc.json" INC --since FULL; RI1+="$T "
done
rep_check "$R/dst1" INC "$RI"
# The same stream from a file, into a store at FULL, without and with --apply (replica in place)
rep_recv "$R/dstf" "$R/incf.json" --input "$OUT/inc.stream"; RIN=$T
rep_recv "$R/dsta" "$R/inca.json" --input "$OUT/inc.stream" --apply "disk0=$R/replica.img"; RIA=$T
if ! cmp "$R/replica.img" "$RI"; then
    echo "bench/run.sh: replicate: the replica image applied to INC differs from the source image" >&2
    exit 1
fi
rm -f "$OUT/inc.stream"

log "replicate: another 1 % rewritten, send --checkpoint c2 --since INC | receive (once)"
"$W" plan "$REP_DISK" $((REP_DISK / 100)) "$EXT" 22 > "$R/plan.c2"
"$W" apply "$RS" disk0 "$R/plan.c2" 22
rep_warm; sync
rep_pipe "$R/dst1" "$R/c2.json" --checkpoint c2 --since INC; RCP=$T
CP_SB=$(json "$R/c2.json" stream_bytes)
rep_check "$R/dst1" c2 "$RI"

FULL_T=$(median $RF)
info="$RN image, $((REP_ALLOC >> 20)) MiB allocated"
rec replicate "full: send FULL \| receive into a fresh store, + sync ($info; logical bytes / time)" \
    "$(python3 -c "print($REP_DISK / $FULL_T)")" Bps "cat IMAGE \| cat > COPY, + sync" "$(python3 -c "print($REP_DISK / $(median $RC))")" "r>=0.5"
rec replicate "full: send FULL > /dev/null alone, time" "$(median $RSO)" s "send \| receive" "$FULL_T" ""
rec replicate "full: receive --input STREAM (in /dev/shm) alone, + sync, time" "$(median $RRO)" s "send \| receive" "$FULL_T" ""
rec replicate "full: stream bytes" "$FULL_SB" B "bytes allocated in the image" "$REP_ALLOC" ""
rec replicate "incremental, 1 % of 64 KiB blocks rewritten: send INC --since FULL \| receive, + sync, time" "$(median $RI1)" s "full send \| receive" "$FULL_T" "r<=0.05"
rec replicate "incremental: stream bytes" "$INC_SB" B "bytes changed" "$REP_CHANGED" ""
rec replicate "checkpoint, another 1 % rewritten: send --checkpoint c2 --since INC \| receive, + sync, time (one run)" "$RCP" s "full send \| receive" "$FULL_T" ""
rec replicate "checkpoint: stream bytes" "$CP_SB" B "bytes changed" "$(awk '{ s += $2 } END { print s }' "$R/plan.c2")" ""
rec replicate "full: receive --input --apply disk0=REPLICA (new replica), + sync, time (one run)" "$RFA" s "receive --input, no --apply" "$(median $RRO)" ""
rec replicate "incremental: receive --input --apply disk0=REPLICA (replica at FULL, applied in place), + sync, time (one run)" "$RIA" s "receive --input, no --apply" "$RIN" ""
rm -rf "$R"
fi   # replicate

# ---------- s3: the same disk backed up to a local repository and to one on Garage ----------
if want s3; then
GARAGE=$(command -v garage || true)
[ -z "$GARAGE" ] && [ -x "$HOME/.cargo/bin/garage" ] && GARAGE=$HOME/.cargo/bin/garage
if [ -z "$GARAGE" ]; then
    log "s3: SKIPPED: garage missing (cargo install garage, or put it in PATH)"
else
G=$WORK/garage
mkdir -p "$G"
read -r G_S3 G_RPC < <(python3 -c 'import socket
def p():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); return s.getsockname()[1]
print(p(), p())')
cat > "$G/garage.toml" <<TOML
metadata_dir = "$G/meta"
data_dir = "$G/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$G_RPC"
rpc_public_addr = "127.0.0.1:$G_RPC"
rpc_secret = "$(printf 'ab%.0s' $(seq 32))"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$G_S3"
TOML
GARAGE_DEFAULT_ACCESS_KEY=GK0123456789abcdef01234567 \
GARAGE_DEFAULT_SECRET_KEY=$(printf '0f%.0s' $(seq 32)) \
GARAGE_DEFAULT_BUCKET=vmref-bench RUST_LOG=warn \
    "$GARAGE" -c "$G/garage.toml" server --single-node --default-bucket > "$G/log" 2>&1 &
GARAGE_PID=$!
export AWS_ENDPOINT_URL=http://127.0.0.1:$G_S3 AWS_REGION=garage
export AWS_ACCESS_KEY_ID=GK0123456789abcdef01234567 AWS_SECRET_ACCESS_KEY=$(printf '0f%.0s' $(seq 32))
SL=$WORK/s3-local; SR=$WORK/s3-remote
# init writes the repository's config object: retried until the server answers.
for _ in $(seq 100); do
    "$V" -q --store "$SR" init --block-size 64K --repository s3://vmref-bench/run >/dev/null 2>&1 && break
    sleep 0.2
done
[ -f "$SR/vmref.store" ] || { echo "bench/run.sh: s3: garage did not come up:" >&2; cat "$G/log" >&2; exit 1; }
"$V" -q --store "$SL" init --block-size 64K >/dev/null
log "s3: a $((S3_DISK >> 20)) MiB disk (half random, half zeros) backed up to $SL and to s3://vmref-bench/run on Garage"
python3 - "$WORK/s3-l.img" "$S3_DISK" <<'PY'
import os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng, z = random.Random(3), bytes(2048)
with open(path, "wb") as f:
    for _ in range(size // (4 << 20)):
        r = rng.randbytes(2 << 20)
        f.write(b"".join(r[i:i + 2048] + z for i in range(0, len(r), 2048)))
    os.fsync(f.fileno())
PY
cp "$WORK/s3-l.img" "$WORK/s3-r.img"
"$V" -q --store "$SL" disk add disk0 "$WORK/s3-l.img" >/dev/null
"$V" -q --store "$SR" disk add disk0 "$WORK/s3-r.img" >/dev/null
sync
S3_FULL_L=$(secs_sync "$V" -q --store "$SL" backup FULL)
S3_FULL_R=$(secs_sync "$V" -q --store "$SR" backup FULL)
stored() { "$V" -q --store "$1" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["space"]["stored_bytes"])'; }
S3_B0=$(stored "$SR")
"$W" plan "$S3_DISK" $((S3_DISK / 100)) "$EXT" 31 > "$WORK/s3.plan"
"$W" apply "$SL" disk0 "$WORK/s3.plan" 31
"$W" apply "$SR" disk0 "$WORK/s3.plan" 31
S3_CHANGED=$(awk '{ s += $2 } END { print s }' "$WORK/s3.plan")
S3_INC_L=$(secs_sync "$V" -q --store "$SL" backup INC)
S3_INC_R=$(secs_sync "$V" -q --store "$SR" backup INC)
S3_SENT=$(( $(stored "$SR") - S3_B0 ))
log "s3: restores and cold sequential reads through the mount ($REPS x each)"
RL=""; RR=""; ML=""; MR=""
for _ in $(seq "$REPS"); do
    rm -f "$OUT/s3-restore.img"; drop_all_caches
    RL+="$(secs_sync "$V" -q --store "$SL" restore INC --disk disk0 --to "$OUT/s3-restore.img") "
    rm -f "$OUT/s3-restore.img"; rm -rf "$SR/cache"; drop_all_caches
    RR+="$(secs_sync "$V" -q --store "$SR" restore INC --disk disk0 --to "$OUT/s3-restore.img") "
    if ! cmp -s "$OUT/s3-restore.img" "$WORK/s3-r.img"; then
        echo "bench/run.sh: s3: INC restored from Garage differs from the disk" >&2; exit 1
    fi
    rm -f "$OUT/s3-restore.img"
done
for st in "$SL" "$SR"; do mkdir -p "$st.mnt"; "$V" -q --store "$st" mount "$st.mnt"; MOUNTS+=("$st.mnt"); done
for _ in $(seq "$REPS"); do
    drop_all_caches; ML+="$(dd_bw "$SL.mnt/INC/disk0.img") "
    rm -rf "$SR/cache"; drop_all_caches; MR+="$(dd_bw "$SR.mnt/INC/disk0.img") "
done
cmp "$SR.mnt/INC/disk0.img" "$WORK/s3-r.img" || { echo "bench/run.sh: s3: INC through the mount differs" >&2; exit 1; }
for st in "$SL" "$SR"; do "$V" -q --store "$st" umount "$st.mnt"; done
info="$((S3_DISK >> 20)) MiB disk, 64 KiB blocks, Garage on loopback"
rec s3 "full backup to Garage ($info; logical bytes / time, + sync)" "$(python3 -c "print($S3_DISK / $S3_FULL_R)")" Bps "to a local repository" "$(python3 -c "print($S3_DISK / $S3_FULL_L)")" ""
rec s3 "incremental backup (1 % of blocks rewritten) to Garage, time" "$S3_INC_R" s "to a local repository" "$S3_INC_L" ""
rec s3 "incremental: bytes uploaded (packs and index objects added)" "$S3_SENT" B "bytes changed" "$S3_CHANGED" "r<=1.1"
rec s3 "restore from Garage, cold cache (logical bytes / time)" "$(python3 -c "print($S3_DISK / $(median $RR))")" Bps "from a local repository, cold page cache" "$(python3 -c "print($S3_DISK / $(median $RL))")" ""
rec s3 "cold sequential read through the mount (dd bs=1M), Garage, empty cache" "$(median $MR)" Bps "local repository, cold page cache" "$(median $ML)" ""
kill "$GARAGE_PID"; wait "$GARAGE_PID" 2>/dev/null || true; GARAGE_PID=
unset AWS_ENDPOINT_URL AWS_REGION AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
fi
fi   # s3

# ---------- the table ----------
mkdir -p bench/results
python3 - "$ROWS" "$QUICK" "$(nproc)" "$(uname -r)" "$DISK" "$BIG" "$REPS" "$RUNTIME" "$(($(date +%s) - T_START))" \
    "$SECTIONS" "$ALL_SECTIONS" "$RESULT" "$SPACE_DISK" "$SPACE_FILES" "$SCALE_BIG" "$REP_DISK" > "$WORK/table.md" <<'EOF'
import os, sys, time
(rows_path, quick, cores, kernel, disk, big, reps, runtime, took, sections, all_sections, result,
 space_disk, space_files, scale_big, rep_disk) = sys.argv[1:]
quick = quick == "1"
sections = sections.split()
partial = set(sections) != set(all_sections.split())
def fmt(v, unit):
    if v == "": return ""
    try: x = float(v)
    except ValueError: return v
    if unit == "Bps": return f"{x/1e9:.2f} GB/s" if x >= 1e9 else f"{x/1e6:.0f} MB/s"
    if unit in ("s", "t"): return f"{x*1e3:.1f} ms" if x < 1 else f"{x:.2f} s"
    if unit == "B": return f"{x/2**20:.1f} MiB"
    return v
def ratio_of(v, b, unit):
    return b / v if unit == "t" else v / b
def verdict(v, b, tgt, unit):
    if not tgt: return ""
    try: x = float(v)
    except ValueError: return "MISS"
    ok = True
    for t in tgt.split(","):
        for op in (">=", "<=", "<", ">"):
            if op in t:
                k, lim = t.split(op); lim = float(lim); break
        y = ratio_of(x, float(b), unit) if k == "r" else x
        ok &= {">=": y >= lim, "<=": y <= lim, "<": y < lim, ">": y > lim}[op]
    return "PASS" if ok else "MISS"
def tgt_text(tgt, unit):
    out = []
    for t in tgt.split(","):
        if not t: continue
        for op in (">=", "<=", "<", ">"):
            if op in t:
                k, lim = t.split(op); break
        if k == "r": out.append(f"ratio {op} {lim}")
        else: out.append(f"{op} {fmt(lim, unit)}")
    return ", ".join(out)
print(f"# vmref benchmarks{' (--quick: proves the benchmark runs; figures are not judged)' if quick else ''}")
print()
print(f"{cores} cores, kernel {kernel}; data disk {int(disk)>>20} MiB, sparse disk {int(big)>>30} GiB; "
      f"space: ext4 image {int(space_disk)>>20} MiB holding up to {int(space_files)>>20} MiB of files; "
      f"scale: {int(scale_big)>>30} GiB and 1 GiB sparse disks; replicate: {int(rep_disk)>>20} MiB image; "
      f"medians of {reps} (cold restores: 1); fio psync QD1, {runtime} s per timed job.")
print()
# A run of a subset of the sections replaces only their rows in the result file: the others
# stay as the earlier run measured them, in the order of ALL_SECTIONS.
old = {}
if partial and os.path.exists(result):
    for line in open(result):
        if line.startswith("| ") and not line.startswith("| section "):
            sec = line.split("|")[1].strip()
            if sec not in sections:
                old.setdefault(sec, []).append(line.rstrip("\n"))
stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
if old:
    print(f"Sections {', '.join(sections)}: run of {stamp}, took {took} s. "
          f"Sections {', '.join(s for s in all_sections.split() if s in old)}: from an earlier run of the same file.")
else:
    print(f"Sections {', '.join(sections)}: run of {stamp}, took {took} s.")
print()
print("| section | measure | figure | baseline | ratio | target | verdict |")
print("|---|---|---|---|---|---|---|")
new = {}
for line in open(rows_path):
    sec, name, v, unit, bname, b, tgt = line.rstrip("\n").split("\t")
    ratio = ""
    if b not in ("", "0"):
        try: ratio = f"{ratio_of(float(v), float(b), unit):.2f}x"
        except (ValueError, ZeroDivisionError): pass
    base = f"{bname} {fmt(b, unit)}".strip()
    ver = verdict(v, b, tgt, unit)
    if quick and ver: ver = "(not judged)"
    new.setdefault(sec, []).append(f"| {sec} | {name} | {fmt(v, unit)} | {base} | {ratio} | {tgt_text(tgt, unit)} | {ver} |")
for sec in all_sections.split():
    for line in new.get(sec, []) + old.get(sec, []):
        print(line)
EOF
cp "$WORK/table.md" "$RESULT"
cat "$RESULT"
log "done; table in $RESULT"
