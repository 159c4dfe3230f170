#!/usr/bin/env bash
# Install the package with its test extras (torch pinned to the local build) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -c constraints.txt -e ".[dev]"
python -m pytest -q "$@"
