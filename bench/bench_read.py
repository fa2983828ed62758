"""How fast the reader delivers model-ready tiles, with one or several reading threads.

Prints figures; asserts nothing. From the repository root:

    python bench/bench_read.py                     # the 8192 px Zion mosaic, 1, 2 and 4 threads
    python bench/bench_read.py --scene-px 4096 --threads 1,2,4,8

Every tile of the bundled model's grid is read in grid order (decoded, masked, normalised) as
``geoseg predict`` reads it; with N threads, thread i reads the batches i, i + N, ... through a
dataset handle of its own. The figure is unique scene megapixels per second, comparable with
bench/bench_predict.py's: the ceiling the reader puts on end-to-end throughput.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenes import build_mosaic  # noqa: E402

from geoseg.config import PredictConfig  # noqa: E402
from geoseg.io import SceneReader, open_scene  # noqa: E402
from geoseg.modelfile import load_model  # noqa: E402
from geoseg.pipeline import block_cache_bytes, default_model_path, gdal_options, plan_grid  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene-px", type=int, default=8192)
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    model = load_model(default_model_path())
    meta = model.metadata
    multiplier, bias = meta.normalization.multiplier_and_bias()
    scene_path = build_mosaic(args.scene_px)
    for threads in [int(t) for t in args.threads.split(",")]:
        with rasterio.Env(**gdal_options()):
            scene = open_scene(scene_path, meta)
            grid = plan_grid(scene, meta, PredictConfig())
            rasterio.env.setenv(GDAL_CACHEMAX=block_cache_bytes(scene, grid, None, threads))
            tiles = list(grid)
            batches = [tiles[i : i + args.batch_size] for i in range(0, len(tiles), args.batch_size)]

            def read(first: int) -> None:
                with SceneReader(scene, multiplier, bias) as reader:
                    for batch in batches[first::threads]:
                        for tile in batch:
                            reader.read_tile(tile.y, tile.x, tile.size)

            workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
            start = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            seconds = time.perf_counter() - start
        print(f"{threads} reading thread(s): {len(tiles)} tiles in {seconds:.2f} s = "
              f"{len(tiles) / seconds:.0f} tiles/s = {scene.width * scene.height / 1e6 / seconds:.1f} unique MP/s",
              flush=True)


if __name__ == "__main__":
    main()
