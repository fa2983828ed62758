"""Per-class pixel counts and areas, counted row block by row block (never the whole map).

Areas are exact for projected CRSs (pixel area from the transform, in metres through the CRS's
linear unit). For geographic CRSs (degrees) a pixel's area shrinks with latitude; it is
computed per row on the authalic sphere of WGS 84, within about 0.5 % of the ellipsoid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine

from .modelfile import ClassSpec
from .stream import RowBlock

AUTHALIC_RADIUS_M = 6371007.181  # radius of the sphere with the WGS 84 ellipsoid's surface area


@dataclass(frozen=True)
class ClassArea:
    """One class's share of the valid pixels."""

    id: int
    name: str
    pixels: int
    area_m2: float
    hectares: float
    percent: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_pixel_areas_m2(transform: Affine, crs: Any, row: int, n: int) -> npt.NDArray[np.float64]:
    """Area in m² of one pixel in each of the rows ``row .. row + n`` (constant unless geographic)."""
    if crs is not None and crs.is_geographic:
        # Area of a lat/lon cell on a sphere: R² · Δλ · |sin φ1 − sin φ2|.
        ys = np.arange(row, row + n + 1, dtype=np.float64)
        lat = np.radians(transform.f + ys * transform.e)
        dlon = np.radians(abs(transform.a))
        return AUTHALIC_RADIUS_M**2 * dlon * np.abs(np.diff(np.sin(lat)))
    metres = crs.linear_units_factor[1] if crs is not None and crs.is_projected else 1.0
    return np.full(n, abs(transform.determinant) * metres * metres)


class ClassAreaCounter:
    """Counts pixels and area per class from finished row blocks (a :class:`geoseg.stream.RowSink`).

    Writes nothing itself: :meth:`table` gives the figures.
    """

    needs_probabilities = False

    def __init__(self, classes: Sequence[ClassSpec], transform: Affine, crs: Any):
        self.classes = sorted(classes, key=lambda c: c.id)
        self.transform = transform
        self.crs = crs
        size = max(c.id for c in self.classes) + 1
        self.pixels = np.zeros(size, np.int64)
        self.area_m2 = np.zeros(size, np.float64)

    def add(self, row: int, classes: npt.NDArray[np.integer], valid: npt.NDArray[np.bool_]) -> None:
        """Count the valid pixels of rows ``row .. row + len(classes)``."""
        size = self.pixels.size
        row_areas = row_pixel_areas_m2(self.transform, self.crs, row, classes.shape[0])
        keep = valid & (classes < size)
        if np.ptp(row_areas) == 0:  # projected: one pixel area for all
            counts = np.bincount(classes[keep].ravel(), minlength=size)
            self.pixels += counts
            self.area_m2 += counts * row_areas[0]
            return
        for r in range(classes.shape[0]):
            counts = np.bincount(classes[r][keep[r]], minlength=size)
            self.pixels += counts
            self.area_m2 += counts * row_areas[r]

    def write(self, block: RowBlock) -> None:
        self.add(block.row, block.classes, block.valid)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def table(self) -> list[ClassArea]:
        """One row per model class (zero counts included), in class id order."""
        total = self.area_m2.sum()
        return [
            ClassArea(
                id=c.id,
                name=c.name,
                pixels=int(self.pixels[c.id]),
                area_m2=float(self.area_m2[c.id]),
                hectares=float(self.area_m2[c.id] / 1e4),
                percent=float(100 * self.area_m2[c.id] / total) if total else 0.0,
            )
            for c in self.classes
        ]


def count_raster(path: str | Path, classes: Sequence[ClassSpec]) -> list[ClassArea]:
    """Class areas of a class raster on disk, read one block row at a time.

    Valid pixels are those that are not the raster's nodata value (and inside its mask).
    """
    with rasterio.open(path) as ds:
        counter = ClassAreaCounter(classes, ds.transform, ds.crs)
        block_rows = ds.block_shapes[0][0]
        for row in range(0, ds.height, block_rows):
            window = rasterio.windows.Window(0, row, ds.width, min(block_rows, ds.height - row))
            values = ds.read(1, window=window)
            valid = ds.read_masks(1, window=window) > 0
            counter.add(row, values, valid)
    return counter.table()
