# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Cost of keeping the reviewer's work: a review dataset updated in place against one built from scratch.

Builds ``--images`` synthetic predictions (random maps and masks, PNG images) in a temporary folder and a private
FiftyOne database, then times, in one run: the first build, an in-place update from the same predictions, an
in-place update after 10 % of the images left the predictions (they move to the ``removed`` view), and a rebuild
(``rebuild=True``, what every run did before). Reported: seconds per run and the ratio to the rebuild.

Example:
    $ python benchmarks/review_update.py --images 400 --size 128
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _predictions(folder: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / "images" / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    labels = (np.arange(count) % 2).astype(np.int64)
    saved = folder / "predictions.npz"
    np.savez(
        saved,
        image_path=np.array(paths),
        gt_label=labels,
        pred_score=rng.random(count).astype(np.float32),
        anomaly_map=rng.random((count, size, size)).astype(np.float32),
        gt_mask=(rng.random((count, size, size)) > 0.9) & labels[:, None, None].astype(bool),
    )
    return saved


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="Images in the dataset (%(default)s).")
    parser.add_argument("--size", type=int, default=128, help="Map side in pixels (%(default)s).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="uas-review-bench-") as work:
        root = Path(work)
        os.environ["FIFTYONE_DATABASE_DIR"] = str(root / "db")
        from anomalib_uas.calibration import decide
        from anomalib_uas.review import build_review_dataset, fo

        load = os.getloadavg()[0]
        saved = _predictions(root, args.images, args.size)
        arrays = np.load(saved)
        keep = np.arange(args.images) % 10 != 0
        changed = root / "changed.npz"
        np.savez(changed, **{key: arrays[key][keep] for key in arrays.files})
        one_normal = {"group": ["held_out_normal"], "pred_score": [0.5], "map_max": [0.5], "map_min": [0.0]}
        decision = decide({key: np.asarray(value) for key, value in one_normal.items()}, 0.05, 0.95)
        common = {"decision": decision, "media_dir": root / "media"}
        runs = [
            ("first build", saved, False),
            ("update in place, same predictions", saved, False),
            ("update in place, 10 % removed", changed, False),
            ("rebuild (rebuild=True)", saved, True),
        ]
        timings = {}
        for name, predictions, rebuild in runs:
            start = time.perf_counter()
            dataset = build_review_dataset("bench", "synthetic", predictions, rebuild=rebuild, **common)
            timings[name] = (time.perf_counter() - start, len(dataset), len(dataset.load_saved_view("removed")))
        dataset.delete()
        fo.delete_non_persistent_datasets()
    reference = timings["rebuild (rebuild=True)"][0]
    print(f"review_update: {args.images} images, {args.size} px maps; load average {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}")  # fmt: skip
    print("| run | seconds | / rebuild | samples | removed |\n|---|---:|---:|---:|---:|")
    for name, (seconds, samples, removed) in timings.items():
        print(f"| {name} | {seconds:.2f} | {seconds / reference:.2f} | {samples} | {removed} |")


if __name__ == "__main__":
    main()
