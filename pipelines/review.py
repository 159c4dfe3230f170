# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``review``: FiftyOne review datasets (FP / FN / worst-mask views) of every evaluation."""

import sys

from anomalib_uas.cli import main

if __name__ == "__main__":
    sys.exit(main(["review"]))
