"""Batch throughput on 1 and 2 workers against ``geoseg predict`` run scene by scene.

Prints figures; asserts nothing. Run from the repository root:

    python bench/bench_batch.py                       # 8 scenes of 2048 x 2048 px, bundled model
    python bench/bench_batch.py --scenes 8 --scene-px 4096 --workers 1,2

The scenes are copies of a real-sized Zion Landsat 8 mosaic (bench/scenes.py) under different
names, so every scene costs the same. Three ways to predict them all:

(a) ``geoseg predict`` one scene after another, each a fresh process (what a shell loop does):
    the sum of their wall-clock times;
(b) ``geoseg batch`` with N worker processes (a local dask cluster), wall clock of the whole
    command including start-up, cluster start and the manifest.
Overhead of the batch machinery = (b with 1 worker) / (a) - 1; and, within (b), the wall time
not spent in predict_scene (start-up, cluster start, model loads, manifest, scheduling).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's geoseg, not an installed one
from scenes import OUT, build_mosaic  # noqa: E402

from geoseg.manifest import read_manifest  # noqa: E402
from geoseg.pipeline import default_model_path  # noqa: E402


def make_scenes(count: int, size_px: int) -> list[Path]:
    """``count`` copies of the ``size_px`` Zion mosaic, in a folder of their own."""
    mosaic = build_mosaic(size_px)
    folder = OUT / f"batch_scenes_{size_px}"
    folder.mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in range(count):
        path = folder / f"zion_{size_px}_{i:02d}.tif"
        if not path.exists():
            shutil.copyfile(mosaic, path)
        scenes.append(path)
    return scenes


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--scene-px", type=int, default=2048)
    parser.add_argument("--workers", default="1,2", help="Comma-separated worker counts.")
    parser.add_argument("--model", type=Path, default=default_model_path())
    args = parser.parse_args()

    scenes = make_scenes(args.scenes, args.scene_px)
    megapixels = args.scenes * args.scene_px**2 / 1e6
    geoseg = [sys.executable, "-m", "geoseg"]
    print(
        f"{args.scenes} scenes of {args.scene_px} x {args.scene_px} px ({megapixels:.1f} MP), "
        f"model {args.model.name}, {len(os.sched_getaffinity(0))} cores"
    )

    singles_dir = OUT / "batch_single"
    singles_dir.mkdir(exist_ok=True)
    single = 0.0
    for scene in scenes:
        single += run(
            [
                *geoseg,
                "predict",
                str(scene),
                str(singles_dir / f"{scene.stem}_landcover.tif"),
                "--model",
                str(args.model),
                "--overwrite",
                "-q",
            ]
        )
    rows = [("(a) geoseg predict one by one", single)]

    for workers in (int(w) for w in args.workers.split(",")):
        out_dir = OUT / f"batch_{workers}w"
        shutil.rmtree(out_dir, ignore_errors=True)
        wall = run(
            [
                *geoseg,
                "batch",
                *map(str, scenes),
                "--out-dir",
                str(out_dir),
                "--workers",
                str(workers),
                "--model",
                str(args.model),
                "-q",
            ]
        )
        records = read_manifest(out_dir)
        if {r.status for r in records} != {"done"}:
            raise SystemExit(f"batch on {workers} worker(s) did not finish every scene: see {out_dir}")
        for scene, record in zip(scenes, records, strict=True):
            with (
                rasterio.open(singles_dir / f"{scene.stem}_landcover.tif") as a,
                rasterio.open(record.output) as b,
            ):
                if not (np.array_equal(a.read(), b.read()) and a.transform == b.transform and a.crs == b.crs):
                    print(f"  note: {record.output} differs from the single predict's output")
        predict = sum(r.predict_seconds or 0 for r in records)
        rows.append((f"(b) geoseg batch, {workers} worker(s)", wall))
        print(
            f"  {workers} worker(s): predict_scene time summed over scenes {predict:.1f} s, "
            f"model loads {sum(bool(r.model_loaded) for r in records)}, wall minus predict time per worker "
            f"(start-up, cluster, model loads, manifest, scheduling) {wall - predict / workers:.1f} s"
        )

    print(f"\n{'':34} {'wall s':>8} {'scenes/h':>9} {'MP/s':>6}")
    for name, seconds in rows:
        print(f"{name:34} {seconds:8.1f} {args.scenes * 3600 / seconds:9.0f} {megapixels / seconds:6.2f}")
    one_worker = dict(rows).get("(b) geoseg batch, 1 worker(s)")
    if one_worker:
        print(
            "\noverhead of batch (1 worker) against the sum of single predicts: "
            f"{one_worker / single - 1:+.1%}"
        )


if __name__ == "__main__":
    main()
