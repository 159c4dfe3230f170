# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``calibrate@<model>``: thresholds from normal images only (see :mod:`anomalib_uas.stages.calibrate`)."""

import sys

from anomalib_uas.stages.calibrate import cli

if __name__ == "__main__":
    sys.exit(cli())
