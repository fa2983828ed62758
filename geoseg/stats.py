"""Per-class pixel counts and areas, counted row block by row block (never the whole map).

Areas are exact for projected CRSs (pixel area from the transform, in metres through the CRS's
linear unit). For geographic CRSs (degrees) a pixel's area shrinks with latitude; it is
computed per row on the authalic sphere of WGS 84, within about 0.5 % of the ellipsoid.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine

from .errors import OutputError
from .io import temporary_path
from .modelfile import ClassSpec
from .stream import RowBlock

AUTHALIC_RADIUS_M = 6371007.181  # radius of the sphere with the WGS 84 ellipsoid's surface area
STATS_FORMATS = {".json": "json", ".csv": "csv"}
CSV_COLUMNS = ("id", "name", "pixels", "area_m2", "hectares", "percent")


@dataclass(frozen=True)
class ClassArea:
    """One class's share of the valid pixels."""

    id: int
    name: str
    pixels: int
    area_m2: float | None  # None for a scene without a CRS: its pixels have no known size
    hectares: float | None
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
        """One row per model class (zero counts included), in class id order.

        Without a CRS the pixels have no known size (a transform alone may be in any unit, or
        the identity): areas are ``None`` and percentages are shares of the valid pixels.
        """
        sized = self.crs is not None
        weights = self.area_m2 if sized else self.pixels.astype(np.float64)
        total = weights.sum()
        return [
            ClassArea(
                id=c.id,
                name=c.name,
                pixels=int(self.pixels[c.id]),
                area_m2=float(self.area_m2[c.id]) if sized else None,
                hectares=float(self.area_m2[c.id] / 1e4) if sized else None,
                percent=float(100 * weights[c.id] / total) if total else 0.0,
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


def stats_format(path: str | os.PathLike[str]) -> str:
    """``json`` or ``csv``, from the file's extension.

    Raises:
        OutputError: Any other extension.
    """
    fmt = STATS_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: statistics are written as .json or .csv; give one of those extensions")
    return fmt


def stats_document(table: Sequence[ClassArea], transform: Affine, crs: Any, info: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON statistics: ``info`` (scene, model, ...), grid, totals and one entry per class."""
    unit = "degree" if crs is not None and crs.is_geographic else (
        crs.linear_units if crs is not None and crs.is_projected else "pixel"
    )
    return {
        **info,
        "crs": crs.to_string() if crs is not None else None,
        "pixel_size": [abs(transform.a), abs(transform.e)],
        "pixel_size_unit": unit,
        "valid_pixels": sum(c.pixels for c in table),
        "area_m2": _total(c.area_m2 for c in table),
        "hectares": _total(c.hectares for c in table),
        "classes": [c.as_dict() for c in table],
    }


def _total(values: Iterable[float | None]) -> float | None:
    values = list(values)
    return None if None in values else sum(v for v in values if v is not None)


def _cell(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"  # empty: no CRS, so no area


def stats_csv(table: Sequence[ClassArea]) -> str:
    """One row per class (``CSV_COLUMNS``) and a last ``total`` row with an empty id."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in table:
        writer.writerow([c.id, c.name, c.pixels, _cell(c.area_m2, 2), _cell(c.hectares, 4),
                         f"{c.percent:.4f}"])
    total_m2 = _total(c.area_m2 for c in table)
    total_pct = 100.0 if sum(c.pixels for c in table) else 0.0
    total_ha = None if total_m2 is None else total_m2 / 1e4
    writer.writerow(["", "total", sum(c.pixels for c in table), _cell(total_m2, 2), _cell(total_ha, 4),
                     f"{total_pct:.4f}"])
    return out.getvalue()


class StatsWriter(ClassAreaCounter):
    """Counts class areas from the finished rows and writes them as JSON or CSV on commit.

    The format follows ``dst``'s extension (:func:`stats_format`). JSON carries the totals, CRS,
    pixel size, model and scene beside the per-class figures; CSV is the per-class table with a
    total row. Percentages are shares of the valid area (the pixel share in a projected CRS).
    """

    def __init__(
        self,
        dst: str | os.PathLike[str],
        classes: Sequence[ClassSpec],
        transform: Affine,
        crs: Any,
        info: Mapping[str, Any],
    ):
        super().__init__(classes, transform, crs)
        self.dst = Path(dst)
        self.format = stats_format(self.dst)
        self.info = dict(info)
        self.tmp = temporary_path(self.dst)

    def text(self) -> str:
        """The file's content for the rows counted so far."""
        table = self.table()
        if self.format == "csv":
            return stats_csv(table)
        return json.dumps(stats_document(table, self.transform, self.crs, self.info), indent=2) + "\n"

    def commit(self) -> None:
        """Write the file under a temporary name, then rename it."""
        try:
            self.tmp.write_text(self.text())
        except OSError as err:
            self.tmp.unlink(missing_ok=True)
            raise OutputError(f"{self.dst}: cannot write ({err.strerror or err})") from err
        os.replace(self.tmp, self.dst)

    def abort(self) -> None:
        """Remove the temporary file, if a failed commit left one."""
        self.tmp.unlink(missing_ok=True)
