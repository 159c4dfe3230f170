# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``data``: build the evaluation dataset named in ``params.yaml`` at ``data/dataset``."""

import sys

from anomalib_uas.cli import main

if __name__ == "__main__":
    sys.exit(main(["data"]))
