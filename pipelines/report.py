# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``report``: the comparison table of models x categories x metrics, Markdown and offline HTML."""

import sys

from anomalib_uas.cli import main

if __name__ == "__main__":
    sys.exit(main(["report"]))
