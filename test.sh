#!/usr/bin/env bash
# Run every test: unit, integration and real-mount tests. Installs the test clients
# (fuse3, qemu-utils, rsync, fio, and QEMU, a kernel and busybox for the real VM test) first
# when they are missing and we are root.
set -euo pipefail
cd "$(dirname "$0")"
need=()
for t in fusermount3:fuse3 qemu-io:qemu-utils qemu-img:qemu-utils rsync:rsync fio:fio \
  qemu-system-x86_64:qemu-system-x86 busybox:busybox-static; do
  command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t##*:}")
done
# tests/real_vm.rs boots the host's kernel in QEMU.
compgen -G '/boot/vmlinuz-*' >/dev/null || need+=(linux-image-amd64)
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
cargo test --release --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the last for doctests).
# A test that cannot run here (no /dev/fuse, no QEMU or kernel, no garage binary) returns early, which cargo
# counts as passed; it prints "SKIP: <test>: <why>" (tests/common::fuse_ok, tests/real_vm.rs,
# tests/common/garage.rs),
# so those move from passed to skipped, together with cargo's own ignored tests.
awk '{ s += gsub(/SKIP: [^ ]+: /, "&") }
     /^test result:/ {
       for (i = 1; i <= NF; i++) {
         if ($i == "passed;") p += $(i-1)
         if ($i == "failed;") f += $(i-1)
         if ($i == "ignored;") ig += $(i-1)
       }
     }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - s, f, s + ig }' "$log"
exit "$rc"
