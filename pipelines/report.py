# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``report``: the comparison report (see :mod:`anomalib_uas.stages.report`)."""

import sys

from anomalib_uas.stages.report import cli

if __name__ == "__main__":
    sys.exit(cli())
