"""Polygons of the class regions of a class raster, made block by block (``geoseg predict --vector``).

Each block window is polygonised on its own (:func:`rasterio.features.shapes`, 4-connected,
nodata masked out), in pixel coordinates so that every vertex is an integer and blocks meet
exactly. A polygon that touches no internal block border is a whole region and is written at
once. The others are held back with the stretches of outline they have along the borders; where
the pixels facing each other across a border belong to two such polygons of the same class, a
union-find joins them (a shared edge: regions meeting at a corner point stay apart, as
4-connectivity says), and each group's outer rings are merged with :func:`shapely.union_all`,
so a region crossing block borders comes out as one polygon with no seam.

Blocks are taken in block rows, top to bottom. After each block row, a merged region that does
not reach the next block row is finished and written. Memory therefore holds one block row of
pixels plus the regions still open: those touching the line between the block row just done and
the next one, each with its whole extent so far (a single forest spanning the scene is held
whole, as it must be to write it as one polygon). Interior regions never accumulate.

Simplification uses :func:`shapely.coverage_simplify`, which simplifies the edges shared by
neighbouring polygons once, so no gaps or overlaps open between them. It runs on groups of
regions in the order they are finished; edges shared with another group, and the coverage's
outer edge (scene border, nodata), stay at pixel precision, so groups fit together exactly and
memory holds one group. Regions smaller than ``min_area`` are dropped (not merged into a neighbour): they
leave holes in the coverage, and the raster keeps their pixels.
"""

from __future__ import annotations

import itertools
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

VECTOR_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON"}
DEFAULT_BLOCK_PX = 1024
# NOTE: areas of geographic (lon/lat) polygons are measured in WGS 84 / NSIDC EASE-Grid 2.0 Global,
# an equal-area projection that covers the whole world.
EQUAL_AREA_CRS = "EPSG:6933"
WRITE_BATCH = 1000
# Regions simplified together: large enough that most shared edges fall inside a group.
SIMPLIFY_GROUP = 20_000


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
        open_regions: list[_Region] = []  # regions reaching the bottom border of the last block row
        for row_off in range(0, height, block_px):
            rows = min(block_px, height - row_off)
            pending: list[_Part] = []
            for col_off in range(0, width, block_px):
                cols = min(block_px, width - col_off)
                window = Window(col_off, row_off, cols, rows)
                values = ds.read(1, window=window)
                valid = ds.read_masks(1, window=window) > 0
                for value, polygon in _block_shapes(values, valid, col_off, row_off):
                    part = _Part.on_borders(value, polygon, window, height, width, shapely)
                    if part.crosses:
                        pending.append(part)
                    else:
                        yield value, polygon
            finished, open_regions = _join(open_regions, pending, row_off, rows, width)
            for region in finished:
                yield from region.merged(shapely)
        for region in open_regions:  # none: the last block row has no bottom border
            yield from region.merged(shapely)


@dataclass
class _Part:
    """A polygon of one block that reaches an internal block border, with the runs it has on each.

    A run ``(start, end)`` is a stretch of the polygon's outline along a border line: the
    pixels just inside the block along it belong to the polygon. Only the exterior ring can
    run along the block's border (a hole is surrounded by the polygon).
    """

    value: int
    polygon: Any
    left: list[tuple[int, int]]  # on x = col_off (rows)
    right: list[tuple[int, int]]  # on x = col_off + cols (rows)
    top: list[tuple[int, int]]  # on y = row_off (columns)
    bottom: list[tuple[int, int]]  # on y = row_off + rows (columns)
    window: Window

    @property
    def crosses(self) -> bool:
        return bool(self.left or self.right or self.top or self.bottom)

    @classmethod
    def on_borders(cls, value: int, polygon: Any, window: Window, height: int, width: int, shapely: Any) -> _Part:
        """Runs of ``polygon`` along its block's internal borders (the scene's edges do not count)."""
        x0, y0 = window.col_off, window.row_off
        x1, y1 = x0 + window.width, y0 + window.height
        minx, miny, maxx, maxy = polygon.bounds
        runs: dict[str, list[tuple[int, int]]] = {"left": [], "right": [], "top": [], "bottom": []}
        if (minx == x0 and x0 > 0) or (maxx == x1 and x1 < width) or (miny == y0 and y0 > 0) or (
            maxy == y1 and y1 < height
        ):
            xy = shapely.get_coordinates(polygon.exterior)
            a, b = xy[:-1], xy[1:]
            for name, axis, line, inside in (
                ("left", 0, x0, x0 > 0),
                ("right", 0, x1, x1 < width),
                ("top", 1, y0, y0 > 0),
                ("bottom", 1, y1, y1 < height),
            ):
                if not inside:
                    continue
                on = (a[:, axis] == line) & (b[:, axis] == line)
                if on.any():
                    ends = np.sort(np.stack([a[on, 1 - axis], b[on, 1 - axis]], axis=1), axis=1).astype(np.int64)
                    runs[name] = [(int(lo), int(hi)) for lo, hi in ends]
        return cls(value, polygon, window=window, **runs)


@dataclass
class _Region:
    """Parts of one region, polygonised in different blocks, not yet merged."""

    value: int
    parts: list[Any]
    frontier: list[_Part]  # the parts on the bottom border of the last block row

    def merged(self, shapely: Any) -> Iterator[tuple[int, Any]]:
        if len(self.parts) == 1:
            yield self.value, self.parts[0]
            return
        # NOTE: a part's holes never touch its block's border (the pixels beyond are outside the
        # part), so they stay holes of the region unchanged: only the outer rings need the union,
        # which is several times cheaper than overlaying parts full of holes.
        shells = shapely.polygons(shapely.get_exterior_ring(self.parts))
        union = shapely.union_all(shells)
        if union.geom_type != "Polygon":  # parts joined by shared edges make one polygon
            for polygon in shapely.get_parts(shapely.union_all(self.parts)):
                yield self.value, polygon
            return
        holes = [*union.interiors, *(hole for part in self.parts for hole in part.interiors)]
        yield self.value, shapely.Polygon(union.exterior, holes)


def _block_shapes(
    values: np.ndarray, valid: np.ndarray, col_off: int, row_off: int
) -> Iterator[tuple[int, Any]]:
    """The regions of one block, in scene pixel coordinates."""
    from shapely.geometry import shape

    # NOTE: one shape() per region. Building them as arrays (all rings, then polygons) took half
    # the time but raised the peak memory of a 64 MP map from 256 to 483 MiB.
    transform = Affine.translation(col_off, row_off)
    for geometry, value in rasterio.features.shapes(values, mask=valid, connectivity=4, transform=transform):
        yield int(value), shape(geometry)


def _join(
    open_regions: list[_Region], pending: list[_Part], row_off: int, rows: int, width: int
) -> tuple[list[_Region], list[_Region]]:
    """Join one block row's border parts with each other and with the regions left open above.

    Two parts are one region where the pixels on either side of a border line belong to them
    and have the same class (a shared edge; 4-connected regions meeting at a corner stay apart).
    Returns ``(finished, still_open)``: regions not reaching the next block row are finished.
    """
    # Items: the frontier parts of the open regions first, then the new parts.
    items: list[_Part] = []
    owners: list[int] = []  # index into open_regions, or -1 for a new part
    for index, region in enumerate(open_regions):
        items += region.frontier
        owners += [index] * len(region.frontier)
    first_new = len(items)
    items += pending
    owners += [-1] * len(pending)
    values = np.array([item.value for item in items], dtype=np.int64)

    parent = np.arange(len(items))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def link(i: int, j: int) -> None:
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[root_j] = root_i

    first_item_of_region: dict[int, int] = {}
    for i, owner in enumerate(owners[:first_new]):
        link(first_item_of_region.setdefault(owner, i), i)

    def connect(before: np.ndarray, after: np.ndarray) -> None:
        """Link the owners of the pixels facing each other across one border line."""
        both = (before >= 0) & (after >= 0)
        if both.any():
            pairs = np.unique(np.stack([before[both], after[both]], axis=1), axis=0)
            for i, j in pairs[values[pairs[:, 0]] == values[pairs[:, 1]]]:
                link(int(i), int(j))

    # Vertical borders inside this block row: pixels left and right of x = c, rows row_off...
    lefts: dict[int, np.ndarray] = {}
    rights: dict[int, np.ndarray] = {}
    for i in range(first_new, len(items)):
        part = items[i]
        x0, x1 = part.window.col_off, part.window.col_off + part.window.width
        for lo, hi in part.right:
            lefts.setdefault(x1, np.full(rows, -1))[lo - row_off : hi - row_off] = i
        for lo, hi in part.left:
            rights.setdefault(x0, np.full(rows, -1))[lo - row_off : hi - row_off] = i
    for line, before in lefts.items():
        if line in rights:
            connect(before, rights[line])
    # The horizontal border y = row_off: open parts above, new parts below.
    above, below = np.full(width, -1), np.full(width, -1)
    for i in range(first_new):
        for lo, hi in items[i].bottom:
            above[lo:hi] = i
    for i in range(first_new, len(items)):
        for lo, hi in items[i].top:
            below[lo:hi] = i
    connect(above, below)

    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    finished: list[_Region] = []
    still_open: list[_Region] = []
    for members in groups.values():
        old = sorted({owners[i] for i in members if i < first_new})
        new_parts = [items[i] for i in members if i >= first_new]
        parts = [polygon for o in old for polygon in open_regions[o].parts] + [p.polygon for p in new_parts]
        frontier = [p for p in new_parts if p.bottom]
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
    matrix = np.array([[transform.a, transform.b], [transform.d, transform.e]])
    offset = np.array([transform.xoff, transform.yoff])

    def to_map(xy: np.ndarray) -> np.ndarray:  # (n, 2) column, row -> (n, 2) x, y
        return xy @ matrix.T + offset

    pixel_area = abs(transform.determinant)
    metres = _metres_per_unit(crs)
    schema: dict[str, Any] = {
        "geometry": "Polygon",
        "properties": {"class_id": "int", "class_name": "str", "area": "float"}
        | ({"area_m2": "float"} if metres != 1.0 else {}),
    }

    kept = dropped = 0

    def large_enough() -> Iterator[tuple[int, Any]]:
        """Regions at or above the minimum area (pixel coordinates)."""
        nonlocal kept, dropped
        for value, polygon in iter_regions(src, block_px):
            if polygon.area * pixel_area < min_area:
                dropped += 1
                continue
            kept += 1
            yield value, polygon

    def in_map_units(regions: Iterator[tuple[int, Any]]) -> Iterator[list[tuple[int, Any]]]:
        """Batches of regions with map coordinates (transformed an array at a time)."""
        while batch := list(itertools.islice(regions, WRITE_BATCH)):
            polygons = shapely.transform(np.array([p for _, p in batch], dtype=object), to_map)
            yield [(value, polygon) for (value, _), polygon in zip(batch, polygons)]

    batches = in_map_units(large_enough())
    if simplify > 0:
        batches = _simplified_groups(batches, simplify, shapely)
    tmp = dst.with_name(f".{dst.stem}{TMP_MARKER}{os.getpid()}{dst.suffix}")
    fiona_crs = fiona.crs.CRS.from_wkt(crs.to_wkt()) if crs is not None else None
    try:
        with fiona.open(tmp, "w", driver=driver, schema=schema, crs=fiona_crs, layer=dst.stem) as out:
            for batch in batches:
                out.writerecords([_record(value, names, polygon, metres, crs) for value, polygon in batch])
        os.replace(tmp, dst)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, fiona.errors.FionaError):
            raise OutputError(f"{dst}: cannot write polygons ({err})") from err
        raise
    log.info("%s: %d polygons (%d under the minimum area dropped)", dst, kept, dropped)
    return VectorResult(dst, kept, dropped)


def _simplified_groups(
    batches: Iterator[list[tuple[int, Any]]], tolerance: float, shapely: Any
) -> Iterator[list[tuple[int, Any]]]:
    """Coverage-simplify the regions :data:`SIMPLIFY_GROUP` at a time, in the order they are made.

    Within a group, an edge two regions share is simplified once for both. An edge a region shares
    with a region of another group, and the coverage's outer edge, stay exact
    (``simplify_boundary=False``): both groups keep it as it is, so the groups still fit together
    with no gap or overlap, and only one group of polygons is held at a time.
    """
    group: list[tuple[int, Any]] = []
    for batch in batches:
        group.extend(batch)
        if len(group) >= SIMPLIFY_GROUP:
            yield _simplified(group, tolerance, shapely)
            group = []
    if group:
        yield _simplified(group, tolerance, shapely)


def _simplified(regions: list[tuple[int, Any]], tolerance: float, shapely: Any) -> list[tuple[int, Any]]:
    """Coverage-simplify ``regions`` together, keeping the edges they share with anything else."""
    polygons = np.array([p for _, p in regions], dtype=object)
    simplified = shapely.coverage_simplify(polygons, tolerance, simplify_boundary=False)
    return [(value, polygon) for (value, _), polygon in zip(regions, simplified) if not polygon.is_empty]


def _record(value: int, names: dict[int, str], geometry: Any, metres: float, crs: Any) -> dict[str, Any]:
    area = float(geometry.area)
    properties: dict[str, Any] = {
        "class_id": value,
        "class_name": names.get(value, f"class {value}"),
        "area": area,
    }
    if metres != 1.0:
        properties["area_m2"] = _area_m2(geometry, metres, crs)
    return {"geometry": _geojson(geometry), "properties": properties}


def _geojson(polygon: Any) -> dict[str, Any]:
    """GeoJSON mapping of a polygon; ``ndarray.tolist`` per ring is several times faster than
    ``__geo_interface__``'s point-by-point iteration."""
    import shapely

    rings = [polygon.exterior, *polygon.interiors]
    return {"type": "Polygon", "coordinates": [shapely.get_coordinates(ring).tolist() for ring in rings]}


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

    equal_area = rasterio.warp.transform_geom(crs, EQUAL_AREA_CRS, _geojson(geometry))
    return float(shape(equal_area).area)
