# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``evaluate@<model>``: ``Engine.test`` on every category; metrics, curves and predictions."""

import sys

from anomalib_uas.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", sys.argv[1]]))
