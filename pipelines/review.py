# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``review``: the FiftyOne review datasets (see :mod:`anomalib_uas.stages.review`)."""

import sys

from anomalib_uas.stages.review import cli

if __name__ == "__main__":
    sys.exit(cli())
