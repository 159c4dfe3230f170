# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``register@<model>``: register the calibrated model in MLflow (see :mod:`anomalib_uas.stages.register`)."""

import sys

from anomalib_uas.stages.register import cli

if __name__ == "__main__":
    sys.exit(cli())
