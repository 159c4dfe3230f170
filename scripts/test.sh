#!/usr/bin/env bash
# Install the package with its test extras (torch pinned to the local build), check style, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -c constraints.txt -e ".[dev]"
ruff check .
ruff format --check .
python -m pytest -q "$@"
