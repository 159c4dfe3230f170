# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""DVC stage ``weights@<model>``: train or fetch the model's checkpoint into ``checkpoints/<model>``."""

import sys

from anomalib_uas.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", sys.argv[1]]))
