# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``evaluate@<model>``: test a model on every category (see :mod:`anomalib_uas.stages.evaluate`)."""

import sys

from anomalib_uas.stages.evaluate import cli

if __name__ == "__main__":
    sys.exit(cli())
