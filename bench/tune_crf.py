"""How the CRF defaults were chosen: a grid over the CRF's parameters on the Zion VALIDATION rows.

Prints mIoU, overall accuracy and per-class IoU for each setting; asserts nothing. Run from the
repository root:

    python bench/tune_crf.py            # the final grid around the chosen defaults (~5 min on 2 cores)
    python bench/tune_crf.py --wide     # also the wider grids searched first (~15 min)

Scores count rows 800-999 only: the bundled model was trained on rows 0-799 and selected on
800-999. The CRF runs on rows 736-1063 (a 64 px halo) as one block, with the scene's own stretch.
The test strip (rows 1032-1427) is never looked at here.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_crf import IMAGE, LABELS, recorded_rows  # noqa: E402

from geoseg.crf import CrfConfig, refine_block, scene_stretch, stretch_to_bytes  # noqa: E402
from geoseg.io import open_scene  # noqa: E402
from geoseg.metrics import confusion_matrix, metrics_from_confusion  # noqa: E402
from geoseg.modelfile import load_model  # noqa: E402
from geoseg.pipeline import default_model_path  # noqa: E402

ROWS, HALO = (800, 1000), 64
# (iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_schan, bilateral_compat)
FINAL = [
    *itertools.product([1, 2, 3, 5], [3.0], [0.0, 1.0], [40.0], [5.0, 10.0], [6.0, 8.0]),
    (1, 3.0, 1.0, 30.0, 10.0, 8.0), (1, 3.0, 1.0, 40.0, 8.0, 8.0), (1, 3.0, 1.0, 40.0, 10.0, 12.0),
]
WIDE = [
    *itertools.product([5], [3.0], [1.0, 3.0], [10.0, 20.0, 40.0], [5.0, 10.0, 20.0], [1.0, 2.0, 4.0, 8.0]),
    *itertools.product([5], [3.0], [0.0, 1.0], [30.0, 50.0, 80.0], [3.0, 5.0, 7.0, 10.0], [8.0, 16.0]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wide", action="store_true", help="also the wide grids searched first")
    args = parser.parse_args()
    meta = load_model(default_model_path()).metadata
    scene = open_scene(str(IMAGE), meta)
    probabilities = np.concatenate([b.probabilities for b in recorded_rows(IMAGE)], axis=1)
    top, bottom = ROWS[0] - HALO, ROWS[1] + HALO
    with rasterio.open(IMAGE) as src:
        features = stretch_to_bytes(src.read()[:, top:bottom], *scene_stretch(scene))
    with rasterio.open(LABELS) as src:
        labels = src.read(1)[ROWS[0]:ROWS[1]]
    ids = np.array([c.id for c in meta.classes])
    lookup = np.full(256, -1)
    lookup[ids] = np.arange(len(ids))
    reference = lookup[labels]
    unary = np.ascontiguousarray(probabilities[:, top:bottom])
    valid = np.ones(unary.shape[1:], bool)
    crop = (HALO, 0, ROWS[1] - ROWS[0], unary.shape[2])

    def score(indexes: np.ndarray) -> str:
        m = metrics_from_confusion(confusion_matrix(reference, indexes, len(ids), reference >= 0), ids)
        per_class = " ".join(f"{v:.3f}" for v in m.iou if v == v)
        return f"mIoU {m.miou:.4f} OA {m.overall_accuracy:.4f} IoU {per_class}"

    print(f"validation rows {ROWS[0]}-{ROWS[1] - 1}, no CRF: {score(probabilities[:, ROWS[0]:ROWS[1]].argmax(0))}")
    for setting in [*(WIDE if args.wide else []), *FINAL]:
        it, g_sxy, g_compat, b_sxy, b_schan, b_compat = setting
        config = CrfConfig(iterations=it, gaussian_sxy=g_sxy, gaussian_compat=g_compat,
                           bilateral_sxy=b_sxy, bilateral_schan=b_schan, bilateral_compat=b_compat)
        start = time.perf_counter()
        result = score(refine_block(unary, features, valid, config.params(), crop))
        print(f"it={it} gaussian=({g_sxy:g}, {g_compat:g}) bilateral=({b_sxy:g}, {b_schan:g}, {b_compat:g}): "
              f"{result} ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
