#!/usr/bin/env bash
# The demo: builds the binaries, then runs the cloud side embedded (no Kafka), an agent tailing
# a live generated e-commerce data set, and prints the dashboard's URL. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/actidash/target}
echo "Building ActiDash (the first build takes a few minutes)…"
cargo build --bins --locked   # the default members: not the desktop app, which needs WebKitGTK
echo "Building the dashboards (npm)…"
scripts/ui.sh build
exec "$CARGO_TARGET_DIR/debug/actidash-demo" "$@"
