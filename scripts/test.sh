#!/usr/bin/env bash
# Install the package with its test extras and the browser of the App test, check style, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
ruff check .
ruff format --check .
python -m pytest -q "$@"
