# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Building blocks shared by the models: encoders, reference images and pre-processing."""
