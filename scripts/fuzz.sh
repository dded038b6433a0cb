#!/usr/bin/env bash
# Runs every fuzz target of the wire decoders for a fixed time each (default 60 s), with
# cargo-fuzz on the nightly toolchain (installed by this script if missing). Crashes are saved
# under shared/fuzz/artifacts/ and make the script fail.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../shared/fuzz"
seconds=${1:-60}
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi
for target in $(cargo +nightly fuzz list); do
  echo "==> fuzzing $target for ${seconds}s"
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048
done
