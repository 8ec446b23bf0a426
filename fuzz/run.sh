#!/usr/bin/env bash
# Run every fuzz target for SECS seconds (default 60) on its corpus, fuzz/corpus/TARGET/, which
# is kept in the repository: it holds a minimized set of interesting inputs and every input
# that once crashed a target (the regression inputs). A crash fails the run and leaves its
# input in fuzz/artifacts/TARGET/; fix the bug and copy the input into the target's corpus.
#
#   fuzz/run.sh [SECS] [TARGET...]
#
# cargo-fuzz needs nightly features; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
# No sanitizer (-s none): the parsers are safe Rust, where AddressSanitizer finds nothing a
# panic would not, and it doubles the build and slows every run.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
  exit 1
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build -s none --release
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  before=$(find "corpus/$t" -type f | wc -l)
  # New inputs go to a scratch dir: the committed corpus changes only by hand (cmin).
  scratch=$(mktemp -d)
  if cargo fuzz run -s none --release "$t" "$scratch" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 \
      >"$scratch.log" 2>&1; then
    runs=$(grep -o 'Done [0-9]* runs' "$scratch.log" | grep -o '[0-9]*' | head -1 || true)
    echo "fuzz $t: ${secs}s, ${before} corpus inputs, ${runs:-?} runs, no crash"
  else
    echo "fuzz $t: FAILED (input in fuzz/artifacts/$t/):" >&2
    tail -40 "$scratch.log" >&2
    failed+=("$t")
  fi
  rm -rf "$scratch" "$scratch.log"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz/run.sh: crashes in ${failed[*]}" >&2
  exit 1
fi
