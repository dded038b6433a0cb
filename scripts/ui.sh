#!/usr/bin/env bash
# The dashboards (desktop/ui, TypeScript): installs the toolchain from the npm registry (npm ci,
# versions pinned by package-lock.json; npm's cache lives outside the clone), type-checks and
# builds them into desktop/ui/dist, which the cloud's serve role serves ([serve] ui_dir).
#   scripts/ui.sh build       npm ci and npm run build
#   scripts/ui.sh chromium    install Debian's chromium for the browser test if missing; prints
#                             `export ACTIDASH_CHROMIUM=...`
#   scripts/ui.sh desktop     install what the desktop app (Tauri 2) builds and runs with — Debian's
#                             WebKitGTK 4.1 and librsvg development packages — and Xvfb,
#                             xauth and ImageMagick for its test, Debian's WebKitWebDriver and
#                             tauri-driver (crates.io, built outside the clone) for its WebDriver
#                             test; prints `export ACTIDASH_DESKTOP=1 ACTIDASH_TAURI_DRIVER=...`
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
  desktop)
    want=()
    command -v pkg-config >/dev/null 2>&1 || want+=(pkg-config)
    pkg-config --exists webkit2gtk-4.1 2>/dev/null || want+=(libwebkit2gtk-4.1-dev)
    pkg-config --exists librsvg-2.0 2>/dev/null || want+=(librsvg2-dev)
    command -v xvfb-run >/dev/null 2>&1 || want+=(xvfb)
    command -v xauth >/dev/null 2>&1 || want+=(xauth)
    command -v import >/dev/null 2>&1 || want+=(imagemagick)
    command -v WebKitWebDriver >/dev/null 2>&1 || want+=(webkit2gtk-driver)
    command -v curl >/dev/null 2>&1 || want+=(curl)
    # The desktop's notifications, for real: a D-Bus session, a notification service, a monitor.
    command -v dbus-run-session >/dev/null 2>&1 || want+=(dbus-daemon)
    command -v dbus-monitor >/dev/null 2>&1 || want+=(dbus-bin)
    command -v dunst >/dev/null 2>&1 || want+=(dunst)
    if [ ${#want[@]} -gt 0 ]; then
      log "installing ${want[*]} (Debian's packages)"
      apt-get update -qq >&2
      apt-get install -y -qq --no-install-recommends "${want[@]}" >&2
    fi
    tools=${ACTIDASH_CACHE:-$HOME/.cache/actidash}/tools
    if [ ! -x "$tools/bin/tauri-driver" ]; then
      log "building tauri-driver 2.1.0 into $tools"
      cargo install tauri-driver --locked --version 2.1.0 --root "$tools" >&2
    fi
    echo "export ACTIDASH_DESKTOP=1 ACTIDASH_TAURI_DRIVER=$tools/bin/tauri-driver"
    ;;
  *)
    echo "usage: scripts/ui.sh build|chromium|desktop" >&2
    exit 2
    ;;
esac
