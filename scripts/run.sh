#!/usr/bin/env bash
# Main job: install the package with the pipeline tools, then run the inspection pipeline (`dvc repro`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh pipeline
dvc repro "$@"
