"""Build real-sized benchmark scenes by mosaicking the shared Zion Landsat 8 scene.

The 1128 x 1428 px scene is tiled with mirror flips (so there are no hard seams) into squares of
the requested size, written block row by block row (never the whole mosaic in memory), tiled
256 x 256 and deflate-compressed like the source, with the source's CRS and pixel size.

    python bench/scenes.py 2048 8192        # writes bench/out/zion_2048.tif, zion_8192.tif
    python bench/scenes.py 40000x1024       # a strip 40,000 px wide: bench/out/zion_40000x1024.tif
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
ZION = ROOT.parent / "shared" / "data" / "zion-landsat8-nlcd" / "image_rgbn.tif"
OUT = ROOT / "bench" / "out"


def mirrored_indices(length: int, period: int) -> np.ndarray:
    """Index into a period-long axis that runs forward, then backward, then forward ..."""
    i = np.arange(length) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def parse_size(text: str) -> tuple[int, int]:
    """``"2048"`` -> (2048, 2048); ``"40000x1024"`` -> (40000, 1024): width and height in pixels."""
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def build_mosaic(size_px: int, path: Path | None = None, source: Path = ZION, height_px: int | None = None) -> Path:
    """Write a mosaic of ``source``, ``size_px`` wide and ``height_px`` (default: as wide) tall;
    reuse it if it already exists."""
    height_px = height_px or size_px
    name = f"zion_{size_px}" if height_px == size_px else f"zion_{size_px}x{height_px}"
    path = path or OUT / f"{name}.tif"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(source) as src:
        image = src.read()  # 13 MB: the small source is fine in memory; the mosaic is not
        profile = src.profile | {
            "width": size_px,
            "height": height_px,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
    cols = mirrored_indices(size_px, image.shape[2])
    tmp = path.with_suffix(".partial.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for top in range(0, height_px, 256):
            rows = mirrored_indices(height_px, image.shape[1])[top : top + 256]
            block = image[:, rows][:, :, cols]
            dst.write(block, window=Window(0, top, size_px, len(rows)))
    tmp.rename(path)
    return path


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["2048", "8192"]:
        width, height = parse_size(arg)
        print(build_mosaic(width, height_px=height))
