# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``weights@<model>``: train or fetch a model's checkpoint (see :mod:`anomalib_uas.stages.weights`)."""

import sys

from anomalib_uas.stages.weights import cli

if __name__ == "__main__":
    sys.exit(cli())
