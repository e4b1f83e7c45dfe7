#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine with Python 3.11 and pip: the pinned Python
# packages (requirements-dev.txt) and Debian's chromium for the browser tests. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
