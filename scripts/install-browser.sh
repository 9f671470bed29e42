#!/usr/bin/env bash
# Install headless Chromium from Debian for the web demo test (tests/service/test_web.py).
# Idempotent: does nothing when chromium is already installed. Never downloads browsers any other way
# (no `playwright install`): the test drives this executable through Playwright's Python driver.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  echo "chromium already installed: $(command -v chromium)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
else
  SUDO=""
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "installed: $(command -v chromium)"
