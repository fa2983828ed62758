"""Dense-CRF refinement: speed, the cost on top of ``geoseg predict``, and what it does to accuracy.

Prints figures; asserts nothing. Run from the repository root:

    python bench/bench_crf.py                  # everything, on the shared Zion scene
    python bench/bench_crf.py --skip-accuracy  # speed only

(a) CRF megapixels per second: the CRF stage (geoseg.crf.CrfStage, 512 px blocks with a 64 px
    halo) over the whole Zion scene, fed the bundled model's real probabilities row band by row
    band, with 1 worker process and with one per core (scene megapixels / wall clock);
(b) the overhead of ``geoseg predict --crf`` over ``geoseg predict`` on the Zion scene
    (1128 x 1428 px), each in a subprocess, wall clock including start-up;
(c) accuracy with and without the CRF (bundled model, default CRF settings): the validation rows
    800-999 (where the defaults were chosen) and the test strip 1032-1427 (reported only);
(d) peak memory of one worker process running one default-sized block (1024 px + 64 px halo on
    every side; the Zion scene is 1128 px wide, so 1128 x 1152 px).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ZION = REPO.parent / "shared" / "data" / "zion-landsat8-nlcd"
if not ZION.is_dir():
    ZION = Path("/work/shared/data/zion-landsat8-nlcd")
IMAGE, LABELS, CLASSES = ZION / "image_rgbn.tif", ZION / "label_8class.tif", ZION / "classes.json"


def recorded_rows(scene_path: Path) -> list:
    """The row blocks the engine hands to its stages for ``scene_path`` (bundled model), with probabilities."""
    import geoseg.pipeline as pipeline
    from geoseg.config import PredictConfig

    blocks = []

    class Recorder:
        needs_probabilities = True

        def push(self, block):
            blocks.append(block)
            yield block

        def finish(self):
            return iter(())

        def close(self):
            pass

    build = pipeline.build_stages
    pipeline.build_stages = lambda *args: [Recorder()]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pipeline.predict_scene(scene_path, Path(tmp) / "out.tif", PredictConfig())
    finally:
        pipeline.build_stages = build
    return blocks


def crf_megapixels_per_s(blocks: list, workers: int, block_px: int, halo: int) -> float:
    """Run the CRF stage over recorded rows; scene megapixels per second of wall clock."""
    from geoseg.config import PredictConfig
    from geoseg.crf import CrfConfig, CrfStage
    from geoseg.io import open_scene, output_dtype
    from geoseg.modelfile import load_model
    from geoseg.pipeline import default_model_path

    meta = load_model(default_model_path()).metadata
    scene = open_scene(str(IMAGE), meta)
    class_ids = np.array([c.id for c in meta.classes], dtype=output_dtype(meta.classes, 255))
    stage = CrfStage(scene, class_ids, PredictConfig().output_nodata,
                     CrfConfig(block=block_px, halo=halo, workers=workers))
    try:
        stage._executor().submit(int, 0).result()  # start the worker processes outside the clock
        start = time.perf_counter()
        out = [b for block in blocks for b in stage.push(block)]
        out.extend(stage.finish())
        seconds = time.perf_counter() - start
    finally:
        stage.close()
    assert sum(b.height for b in out) == scene.height
    return scene.width * scene.height / 1e6 / seconds


def _block_peak_rss(*args) -> int:
    """Runs in a fresh worker: one CRF block, then the process's peak RSS in bytes."""
    import resource

    from geoseg.crf import refine_block

    refine_block(*args)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_peak_rss(blocks: list, rows: int) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from geoseg.crf import CrfConfig, _pool_context, scene_stretch, stretch_to_bytes
    from geoseg.io import open_scene
    from geoseg.modelfile import load_model
    from geoseg.pipeline import default_model_path

    import rasterio

    scene = open_scene(str(IMAGE), load_model(default_model_path()).metadata)
    probabilities = np.concatenate([b.probabilities for b in blocks], axis=1)[:, :rows]
    with rasterio.open(IMAGE) as src:
        features = stretch_to_bytes(src.read()[:, :rows], *scene_stretch(scene))
    valid = np.ones(probabilities.shape[1:], bool)
    with ProcessPoolExecutor(1, mp_context=_pool_context()) as pool:
        return pool.submit(_block_peak_rss, np.ascontiguousarray(probabilities), features, valid,
                           CrfConfig().params()).result()


def predict_seconds(out: Path, *extra: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "geoseg", "predict", str(IMAGE), str(out), "--overwrite", "-q", *extra],
                   check=True, cwd=REPO)
    return time.perf_counter() - start


def accuracy(pred: Path, rows: str) -> tuple[float, float, list[tuple[str, float]]]:
    from geoseg.evaluate import evaluate_rasters
    from geoseg.labels import ClassMap, parse_region
    from geoseg.modelfile import load_classes

    metrics = evaluate_rasters(pred, LABELS, ClassMap(*load_classes(CLASSES)), parse_region(rows, None, None))
    return metrics.miou, metrics.overall_accuracy, list(zip(metrics.class_names, metrics.iou.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=512, help="CRF block edge for (a) [512]")
    parser.add_argument("--halo", type=int, default=64, help="CRF halo for (a) [64]")
    parser.add_argument("--skip-accuracy", action="store_true", help="only (a) and (b)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} cores; scene: {IMAGE.name}")

    blocks = recorded_rows(IMAGE)
    for workers in sorted({1, cores}):
        rate = crf_megapixels_per_s(blocks, workers, args.block, args.halo)
        print(f"(a) CRF, {workers} worker(s), {args.block} px blocks + {args.halo} px halo: {rate:.3f} MP/s")

    rss = worker_peak_rss(blocks, rows=1024 + 2 * 64)
    print(f"(d) one worker, one {blocks[0].classes.shape[1]} x 1152 px block: peak RSS {rss / 2**20:.0f} MiB")

    with tempfile.TemporaryDirectory() as tmp:
        plain, refined = Path(tmp) / "plain.tif", Path(tmp) / "crf.tif"
        t_plain = predict_seconds(plain)
        t_crf = predict_seconds(refined, "--crf")
        print(f"(b) geoseg predict: {t_plain:.1f} s; with --crf: {t_crf:.1f} s; "
              f"overhead {t_crf - t_plain:.1f} s (x{t_crf / t_plain:.2f})")
        if args.skip_accuracy:
            return
        for label, rows in (("validation rows 800-999", "800:1000"), ("TEST strip rows 1032-1427", "1032:1428")):
            for name, path in (("without CRF", plain), ("with CRF", refined)):
                miou, oa, ious = accuracy(path, rows)
                per_class = ", ".join(f"{n} {v:.3f}" for n, v in ious if v == v)
                print(f"(c) {label}, {name}: mIoU {miou:.4f}, OA {oa:.4f}; IoU {per_class}")


if __name__ == "__main__":
    main()
