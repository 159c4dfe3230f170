# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Data: the offline demo dataset, auxiliary training data and robust image reading (imported on first use).

Example:
    >>> from anomalib_uas.data import generate_demo_dataset
    >>> root = generate_demo_dataset("./datasets/uas_demo")  # doctest: +SKIP
"""

from typing import TYPE_CHECKING

from anomalib_uas.lazy import lazy_exports

if TYPE_CHECKING:
    from anomalib_uas.data.auxiliary import AuxiliaryDataModule, AuxiliaryDataset
    from anomalib_uas.data.demo import DEMO_CATEGORIES, DEMO_DEFECT_TYPES, DEMO_SOURCES, generate_demo_dataset
    from anomalib_uas.data.images import IMAGE_EXTENSIONS, ImageFolderDataset, list_images, read_image

__all__ = [
    "DEMO_CATEGORIES",
    "DEMO_DEFECT_TYPES",
    "DEMO_SOURCES",
    "IMAGE_EXTENSIONS",
    "AuxiliaryDataModule",
    "AuxiliaryDataset",
    "ImageFolderDataset",
    "generate_demo_dataset",
    "list_images",
    "read_image",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(("AuxiliaryDataModule", "AuxiliaryDataset"), "anomalib_uas.data.auxiliary"),
        **dict.fromkeys(
            ("DEMO_CATEGORIES", "DEMO_DEFECT_TYPES", "DEMO_SOURCES", "generate_demo_dataset"), "anomalib_uas.data.demo"
        ),
        **dict.fromkeys(
            ("IMAGE_EXTENSIONS", "ImageFolderDataset", "list_images", "read_image"), "anomalib_uas.data.images"
        ),
    },
)
