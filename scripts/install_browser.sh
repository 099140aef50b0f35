#!/usr/bin/env bash
# What tests/test_serve_browser.py needs besides pip packages: Chromium and its driver from the
# system's packages (Debian/Ubuntu: chromium, chromium-driver). Playwright (in the dev extra) drives
# this Chromium through executable_path, so no browser is downloaded. Idempotent and
# non-interactive (CI=true): does nothing when chromium is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  SUDO="sudo -n"
fi
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
else
  echo "scripts/install_browser.sh: no apt-get here; install Chromium from your system's packages" >&2
  exit 1
fi
