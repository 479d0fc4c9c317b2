#!/usr/bin/env bash
# Install what tests/test_browser.py needs: Debian's chromium at
# /usr/bin/chromium and the playwright python package (driver only: the
# browser is never downloaded, playwright is pointed at /usr/bin/chromium).
# Idempotent: does nothing that is already done.
set -euo pipefail

export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
export DEBIAN_FRONTEND=noninteractive

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

if [ ! -x /usr/bin/chromium ]; then
    echo "install-browser: installing Debian chromium" >&2
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
else
    echo "install-browser: /usr/bin/chromium present" >&2
fi

PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "install-browser: pip install playwright (python package only)" >&2
    "$PYTHON" -m pip install --quiet playwright
else
    echo "install-browser: playwright python package present" >&2
fi

/usr/bin/chromium --version >&2 2>/dev/null || true
