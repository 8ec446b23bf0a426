#!/usr/bin/env bash
# kill -9 stress: the scenario of tests/crash_daemon.rs (mount, point R, heavy random writes
# through the mount, SIGKILL of the daemon at a random moment, then: every changed block is in
# `changes --since R`, tracking not lost, an incremental backup restores exactly) run N times
# with the release build, in batches of fresh stores. Prints a pass/fail count; the output of
# every failed batch (with its seed, to replay the writes) is kept under the log directory.
#
# usage: bench/crash-stress.sh [N=200] [BATCH=10]
# About 1.5 s a trial on 2 cores: 200 trials take about 5 minutes. Needs /dev/fuse, python3.
set -euo pipefail

N=${1:-200}
BATCH=${2:-10}
cd "$(dirname "$0")/.."

bin=$(cargo test --release --no-run --test crash_daemon --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "crash_daemon" and m.get("executable"):
        print(m["executable"])')
[ -x "$bin" ] || { echo "crash-stress: could not build the crash_daemon test" >&2; exit 2; }
logs=$(mktemp -d /tmp/vmref-crash-stress.XXXXXX)

pass=0 fail=0 batch=0
start=$(date +%s)
while [ $((pass + fail)) -lt "$N" ]; do
    batch=$((batch + 1))
    n=$((N - pass - fail))
    [ "$n" -gt "$BATCH" ] && n=$BATCH
    seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
    log="$logs/batch-$batch.log"
    if VMREF_REQUIRE_FUSE=1 VMREF_CRASH_TRIALS=$n VMREF_TEST_SEED=$seed \
        "$bin" kill_9_under_heavy_writes_misses_no_change --exact --nocapture >"$log" 2>&1; then
        ok=1
    else
        ok=0
    fi
    done_here=$(grep -cE '^trial [0-9]+: kill after' "$log" || true)
    pass=$((pass + done_here))
    if [ "$ok" = 1 ]; then
        rm -f "$log"
    else
        fail=$((fail + 1))
        echo "FAIL in batch $batch (seed $seed), after $done_here good trials; see $log"
        grep -m3 -E 'panicked|assertion|trial' "$log" | sed 's/^/    /' || true
    fi
    echo "$((pass + fail))/$N trials: $pass passed, $fail failed ($(($(date +%s) - start)) s)"
done

echo "crash-stress: $pass passed, $fail failed of $((pass + fail)) kill -9 trials in $(($(date +%s) - start)) s"
[ "$fail" -eq 0 ] && rmdir "$logs" 2>/dev/null
[ "$fail" -eq 0 ]
