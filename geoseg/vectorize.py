"""Polygons of the class regions of a class raster, made block by block (``geoseg predict --vector``).

Each block window is polygonised on its own (:func:`rasterio.features.shapes`, 4-connected,
nodata masked out), in pixel coordinates so that every vertex is an integer and blocks meet
exactly. A polygon that touches no internal block border is a whole region and is written at
once. The others are held back and joined with the same-class polygons they share an edge with
(an STRtree finds the candidates, a union-find groups them, :func:`shapely.union_all` merges each
group), so a region crossing block borders comes out as one polygon with no seam.

Blocks are taken in block rows, top to bottom. After each block row, a merged region that does
not reach the next block row is finished and written. Memory therefore holds one block row of
pixels plus the regions still open: those touching the line between the block row just done and
the next one, each with its whole extent so far (a single forest spanning the scene is held
whole, as it must be to write it as one polygon). Interior regions never accumulate.

Simplification uses :func:`shapely.coverage_simplify`, which simplifies the edges shared by
neighbouring polygons once, so no gaps or overlaps open between them. It needs the whole
coverage at once, so with ``simplify > 0`` every polygon (vertices, not pixels) is kept until
the end. Regions smaller than ``min_area`` are dropped (not merged into a neighbour): they
leave holes in the coverage, and the raster keeps their pixels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
from affine import Affine
from rasterio.windows import Window

from ._lazy import lazy_import
from .errors import OutputError
from .io import TMP_MARKER
from .modelfile import ClassSpec

log = logging.getLogger(__name__)

VECTOR_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
DEFAULT_BLOCK_PX = 1024
# NOTE: areas of geographic (lon/lat) polygons are measured in WGS 84 / NSIDC EASE-Grid 2.0 Global,
# an equal-area projection that covers the whole world.
EQUAL_AREA_CRS = "EPSG:6933"
WRITE_BATCH = 1000


@dataclass(frozen=True)
class VectorResult:
    """What :func:`vectorize_raster` wrote."""

    path: Path
    polygons: int
    dropped: int  # regions under the minimum area


def vector_driver(path: str | os.PathLike[str]) -> str:
    """The OGR driver for a polygon file, from its extension.

    Raises:
        OutputError: The extension is neither GeoPackage nor GeoJSON.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in VECTOR_DRIVERS:
        raise OutputError(f"{path}: polygon output must end in .gpkg or .geojson (got {suffix or 'no extension'!r})")
    return VECTOR_DRIVERS[suffix]


def iter_regions(
    path: str | os.PathLike[str], block_px: int = DEFAULT_BLOCK_PX
) -> Iterator[tuple[int, Any]]:
    """Yield ``(class value, polygon)`` for every connected region of a class raster.

    Polygons are shapely geometries in pixel coordinates (x = column, y = row, integer vertices),
    one per 4-connected region of equal valid pixels, merged across block borders. Nodata and
    masked pixels form no region. Reads one row of ``block_px`` square blocks at a time.
    """
    shapely = lazy_import("shapely", extra="vector")
    with rasterio.open(path) as ds:
        height, width = ds.height, ds.width
        open_regions: list[_Region] = []  # regions touching the bottom border of the last block row
        for row_off in range(0, height, block_px):
            rows = min(block_px, height - row_off)
            row_end = row_off + rows
            pending: list[tuple[int, Any]] = []
            for col_off in range(0, width, block_px):
                cols = min(block_px, width - col_off)
                window = Window(col_off, row_off, cols, rows)
                values = ds.read(1, window=window)
                valid = ds.read_masks(1, window=window) > 0
                for value, polygon in _block_shapes(values, valid, col_off, row_off):
                    minx, miny, maxx, maxy = polygon.bounds
                    crosses = (
                        (minx == col_off and col_off > 0)
                        or (maxx == col_off + cols and col_off + cols < width)
                        or (miny == row_off and row_off > 0)
                        or (maxy == row_end and row_end < height)
                    )
                    if crosses:
                        pending.append((value, polygon))
                    else:
                        yield value, polygon
            finished, open_regions = _join(open_regions, pending, row_off, row_end, height, shapely)
            for region in finished:
                yield from region.merged(shapely)
        for region in open_regions:  # only when the last block row left some (it never should)
            yield from region.merged(shapely)


@dataclass
class _Region:
    """Parts of one region, polygonised in different blocks, not yet merged."""

    value: int
    parts: list[Any]
    frontier: list[Any]  # the parts touching the bottom border of the last block row

    def merged(self, shapely: Any) -> Iterator[tuple[int, Any]]:
        geometry = self.parts[0] if len(self.parts) == 1 else shapely.union_all(self.parts)
        # Parts joined by shared edges make one polygon; get_parts also copes with anything else.
        for polygon in shapely.get_parts(geometry):
            yield self.value, polygon


def _block_shapes(
    values: np.ndarray, valid: np.ndarray, col_off: int, row_off: int
) -> Iterator[tuple[int, Any]]:
    from shapely.geometry import shape

    transform = Affine.translation(col_off, row_off)
    for geometry, value in rasterio.features.shapes(values, mask=valid, connectivity=4, transform=transform):
        yield int(value), shape(geometry)


def _join(
    open_regions: list[_Region],
    pending: list[tuple[int, Any]],
    row_off: int,
    row_end: int,
    height: int,
    shapely: Any,
) -> tuple[list[_Region], list[_Region]]:
    """Join one block row's border-touching polygons with each other and with the open regions.

    Returns ``(finished, still_open)``: regions that do not reach the next block row are finished.
    """
    # Items: the frontier parts of the open regions first, then the new parts.
    items: list[Any] = []
    owners: list[int] = []  # index into open_regions, or -1 for a new part
    for index, region in enumerate(open_regions):
        items += region.frontier
        owners += [index] * len(region.frontier)
    first_new = len(items)
    items += [polygon for _, polygon in pending]
    values = np.array([open_regions[o].value for o in owners] + [v for v, _ in pending], dtype=np.int64)

    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def link(i: int, j: int) -> None:
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[root_j] = root_i

    first_item_of_region: dict[int, int] = {}
    for i, owner in enumerate(owners):
        link(first_item_of_region.setdefault(owner, i), i)
    if items:
        geometries = np.array(items, dtype=object)
        left, right = shapely.STRtree(geometries).query(geometries, predicate="touches")
        keep = (left < right) & (values[left] == values[right])
        left, right = left[keep], right[keep]
        # NOTE: 4-connected regions join only through a shared edge; polygons meeting at a corner
        # point are different regions (the boundaries' intersection is a line, dimension 1).
        shares_edge = shapely.relate_pattern(geometries[left], geometries[right], "****1****")
        for i, j in zip(left[shares_edge], right[shares_edge]):
            link(int(i), int(j))

    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    finished: list[_Region] = []
    still_open: list[_Region] = []
    for members in groups.values():
        old = {owners[i] for i in members if i < first_new}
        new_parts = [items[i] for i in members if i >= first_new]
        parts = [part for o in sorted(old) for part in open_regions[o].parts] + new_parts
        frontier = [p for p in new_parts if p.bounds[3] == row_end] if row_end < height else []
        region = _Region(int(values[members[0]]), parts, frontier)
        (still_open if frontier else finished).append(region)
    return finished, still_open


def vectorize_raster(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    classes: Sequence[ClassSpec],
    *,
    simplify: float = 0.0,
    min_area: float = 0.0,
    block_px: int = DEFAULT_BLOCK_PX,
) -> VectorResult:
    """Write one polygon per connected class region of the class raster ``src`` to ``dst``.

    Args:
        src: A single-band class raster (nodata or masked pixels are left out).
        dst: ``.gpkg`` (GeoPackage, layer named after the file) or ``.geojson``; written under
            a temporary name, then renamed.
        classes: Names for the class values (a value without one is named ``class <value>``).
        simplify: Tolerance in map units for :func:`shapely.coverage_simplify` (0: exact pixel edges).
        min_area: Regions smaller than this, in square map units, are dropped.
        block_px: Edge of the square blocks polygonised one at a time.

    Fields: ``class_id`` (int), ``class_name`` (str), ``area`` (square map units) and, when the
    CRS's unit is not the metre, ``area_m2``. The CRS is the raster's.

    Raises:
        OutputError: Unknown extension, or ``dst`` cannot be written.
        DependencyNotFoundError: shapely or fiona is missing (``pip install 'geoseg[vector]'``).
    """
    shapely = lazy_import("shapely", extra="vector")
    fiona = lazy_import("fiona", extra="vector")
    dst = Path(dst)
    driver = vector_driver(dst)
    names = {c.id: c.name for c in classes}
    with rasterio.open(src) as ds:
        crs, transform = ds.crs, ds.transform
    to_map = [transform.a, transform.b, transform.d, transform.e, transform.xoff, transform.yoff]
    pixel_area = abs(transform.determinant)
    metres = _metres_per_unit(crs)
    schema: dict[str, Any] = {
        "geometry": "Polygon",
        "properties": {"class_id": "int", "class_name": "str", "area": "float"}
        | ({"area_m2": "float"} if metres != 1.0 else {}),
    }

    kept = dropped = 0

    def large_enough() -> Iterator[tuple[int, Any]]:
        """Regions at or above the minimum area, in map coordinates."""
        nonlocal kept, dropped
        for value, polygon in iter_regions(src, block_px):
            if polygon.area * pixel_area < min_area:
                dropped += 1
                continue
            kept += 1
            yield value, shapely.affinity.affine_transform(polygon, to_map)

    regions = _simplified(large_enough(), simplify, shapely) if simplify > 0 else large_enough()
    records = (_record(value, names, polygon, metres, crs) for value, polygon in regions)
    tmp = dst.with_name(f".{dst.stem}{TMP_MARKER}{os.getpid()}{dst.suffix}")
    fiona_crs = fiona.crs.CRS.from_wkt(crs.to_wkt()) if crs is not None else None
    try:
        with fiona.open(tmp, "w", driver=driver, schema=schema, crs=fiona_crs, layer=dst.stem) as out:
            batch: list[dict[str, Any]] = []
            for record in records:
                batch.append(record)
                if len(batch) == WRITE_BATCH:
                    out.writerecords(batch)
                    batch = []
            out.writerecords(batch)
        os.replace(tmp, dst)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, fiona.errors.FionaError):
            raise OutputError(f"{dst}: cannot write polygons ({err})") from err
        raise
    log.info("%s: %d polygons (%d under the minimum area dropped)", dst, kept, dropped)
    return VectorResult(dst, kept, dropped)


def _simplified(regions: Iterator[tuple[int, Any]], tolerance: float, shapely: Any) -> Iterator[tuple[int, Any]]:
    """Coverage-simplify all regions together; every polygon is held until the last is read."""
    values, polygons = [], []
    for value, polygon in regions:
        values.append(value)
        polygons.append(polygon)
    if not polygons:
        return
    simplified = shapely.coverage_simplify(np.array(polygons, dtype=object), tolerance)
    for value, polygon in zip(values, simplified):
        if not polygon.is_empty:
            yield value, polygon


def _record(value: int, names: dict[int, str], geometry: Any, metres: float, crs: Any) -> dict[str, Any]:
    area = float(geometry.area)
    properties: dict[str, Any] = {
        "class_id": value,
        "class_name": names.get(value, f"class {value}"),
        "area": area,
    }
    if metres != 1.0:
        properties["area_m2"] = _area_m2(geometry, metres, crs)
    return {"geometry": geometry.__geo_interface__, "properties": properties}


def _metres_per_unit(crs: Any) -> float:
    """Metres in the CRS's linear unit; NaN for geographic CRSs (areas need an equal-area projection)."""
    if crs is None:
        return 1.0  # pixel space: no metres known; ``area`` is in square pixels
    if crs.is_geographic:
        return float("nan")
    return float(crs.linear_units_factor[1])


def _area_m2(geometry: Any, metres: float, crs: Any) -> float:
    if not np.isnan(metres):
        return float(geometry.area) * metres * metres
    from shapely.geometry import shape

    equal_area = rasterio.warp.transform_geom(crs, EQUAL_AREA_CRS, geometry.__geo_interface__)
    return float(shape(equal_area).area)
