#!/usr/bin/env bash
# The dashboards (desktop/ui, TypeScript): installs the toolchain from the npm registry (npm ci,
# versions pinned by package-lock.json; npm's cache lives outside the clone), type-checks and
# builds them into desktop/ui/dist, which the cloud's serve role serves ([serve] ui_dir).
#   scripts/ui.sh build       npm ci and npm run build
#   scripts/ui.sh chromium    install Debian's chromium for the browser test if missing; prints
#                             `export ACTIDASH_CHROMIUM=...`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../desktop/ui"

log() { printf 'ui.sh: %s\n' "$*" >&2; }

case "${1:-build}" in
  build)
    command -v npm >/dev/null 2>&1 || { log "npm is missing: install Node.js 20 or later"; exit 1; }
    npm ci --no-audit --no-fund >&2
    npm run --silent build >&2
    log "built $(pwd)/dist"
    ;;
  chromium)
    if ! command -v chromium >/dev/null 2>&1; then
      log "installing Debian's chromium"
      apt-get update -qq >&2
      apt-get install -y -qq --no-install-recommends chromium >&2
    fi
    echo "export ACTIDASH_CHROMIUM=$(command -v chromium)"
    ;;
  *)
    echo "usage: scripts/ui.sh build|chromium" >&2
    exit 2
    ;;
esac
