# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``data``: build the evaluation dataset (see :mod:`anomalib_uas.stages.data`)."""

import sys

from anomalib_uas.stages.data import cli

if __name__ == "__main__":
    sys.exit(cli())
