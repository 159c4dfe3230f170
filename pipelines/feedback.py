# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``feedback``: export the reviewers' marks (see :mod:`anomalib_uas.stages.feedback`)."""

import sys

from anomalib_uas.stages.feedback import cli

if __name__ == "__main__":
    sys.exit(cli())
