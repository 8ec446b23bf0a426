#!/usr/bin/env bash
# Run every test: unit, integration and real-mount tests. Installs the test clients
# (fuse3, qemu-utils, rsync, fio) first when they are missing and we are root.
set -euo pipefail
cd "$(dirname "$0")"
need=()
for t in fusermount3:fuse3 qemu-io:qemu-utils qemu-img:qemu-utils rsync:rsync fio:fio; do
  command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "test.sh: missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root" >&2
  fi
fi
# Release build: the mount tests move real bytes through FUSE.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the last for doctests).
# A mount test that finds no /dev/fuse, or an S3 test that finds no garage binary, returns
# early, which cargo counts as passed; it prints "SKIP: <test>: /dev/fuse missing"
# (tests/common::fuse_ok) or "SKIP: <test>: garage missing" (tests/common/garage.rs), so those
# move from passed to skipped, together with cargo's own ignored tests.
awk '{ s += gsub(/SKIP: [^ ]+: (\/dev\/fuse|garage) missing/, "&") }
     /^test result:/ {
       for (i = 1; i <= NF; i++) {
         if ($i == "passed;") p += $(i-1)
         if ($i == "failed;") f += $(i-1)
         if ($i == "ignored;") ig += $(i-1)
       }
     }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - s, f, s + ig }' "$log"
exit "$rc"
