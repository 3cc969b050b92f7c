#!/usr/bin/env bash
# Install what the browser tier (tests/browser) needs: Debian's Chromium (Playwright drives it as the
# system browser; Playwright's own browser download is never used) and the dev extra's `playwright`.
#
#   bash scripts/setup_browser.sh
#
# Needs root for apt-get (CI runs as root). Does nothing that is already done. Exit status 1 when
# Chromium cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

have_chromium() { command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
  || command -v google-chrome >/dev/null || [ -n "${X2EDIT_CHROMIUM:-}" ]; }

if ! have_chromium; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup_browser: Chromium is missing and installing it needs root (apt-get install chromium)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # fonts-liberation: the frontend's text renders with metric-compatible fonts, as on a desktop.
  apt-get install -y -q --no-install-recommends chromium fonts-liberation
fi
have_chromium || { echo "setup_browser: Chromium still not found after installing" >&2; exit 1; }

if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import playwright" 2>/dev/null; then
  .venv/bin/pip install -q "playwright>=1.45"
fi
echo "setup_browser: $(command -v chromium || command -v chromium-browser || command -v google-chrome || echo "$X2EDIT_CHROMIUM")"
