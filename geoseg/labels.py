"""Labels and regions on an image's pixel grid: class rasters, vector polygons, rows, windows and AOIs.

Everything here turns a user's reference data into per-window arrays on one grid:

- :class:`ClassMap` maps raster values or class names to class *indexes* ``0 .. K - 1`` (the
  model's output order), with :data:`IGNORE` for unlabelled pixels;
- :func:`open_labels` opens a class raster on the image's grid, or vector polygons with a class
  attribute that are rasterised window by window (``rasterio.features.rasterize``, pixel
  centres inside a polygon, later features drawn over earlier ones);
- :class:`Region` restricts work to rows, a window or polygons (an area of interest).

Vectors are read with fiona (any format OGR reads; GeoJSON with :mod:`json`) into shapely
geometries and reprojected to the image CRS with ``rasterio.warp``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError
from rasterio.windows import Window

from .errors import ConfigError, GeosegWarning, InputError
from .modelfile import ClassSpec

IGNORE = 255
"""Class index of unlabelled or ignored pixels in the arrays this module returns."""

VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".fgb", ".gml", ".kml", ".gdb")
_TRANSFORM_TOLERANCE = 1e-6  # of a pixel, when comparing grids


@dataclass(frozen=True)
class Grid:
    """A raster's pixel grid: size, CRS and affine transform."""

    width: int
    height: int
    crs: CRS | None
    transform: Affine

    @classmethod
    def of(cls, src: rasterio.io.DatasetReader) -> Grid:
        """The grid of an open dataset."""
        return cls(src.width, src.height, src.crs, src.transform)

    @property
    def window(self) -> Window:
        """The whole grid as a window."""
        return Window(0, 0, self.width, self.height)

    def difference(self, other: Grid) -> str | None:
        """Why ``other`` is not the same grid (``None`` when it is)."""
        if (self.width, self.height) != (other.width, other.height):
            return f"size {other.width}x{other.height} px, expected {self.width}x{self.height}"
        if (self.crs is None) != (other.crs is None) or (self.crs is not None and self.crs != other.crs):
            return f"CRS {_crs_name(other.crs)}, expected {_crs_name(self.crs)}"
        pixel = max(abs(self.transform.a), abs(self.transform.e), 1e-12)
        if not self.transform.almost_equals(other.transform, precision=_TRANSFORM_TOLERANCE * pixel):
            return f"transform {tuple(other.transform)[:6]}, expected {tuple(self.transform)[:6]}"
        return None


def _crs_name(crs: CRS | None) -> str:
    if crs is None:
        return "none"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else (crs.to_string()[:60] or "custom")


def open_raster(path: str | os.PathLike[str], what: str = "raster") -> rasterio.io.DatasetReader:
    """Open a raster or raise :class:`InputError` naming the file."""
    path = os.fspath(path)
    if "://" not in path and not path.startswith("/vsi") and not Path(path).exists():
        raise InputError(f"{path}: {what} not found")
    try:
        return rasterio.open(path)
    except RasterioError as err:
        raise InputError(f"{path}: not a {what} GDAL can read ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


@dataclass(frozen=True)
class ClassMap:
    """Classes in model order, and how raster values and names map onto their indexes.

    Args:
        classes: The classes; index ``k`` is ``classes[k]``.
        ignore_index: Raster value meaning "no label" (not a class).
    """

    classes: tuple[ClassSpec, ...]
    ignore_index: int | None = None
    _lut: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < len(self.classes) < IGNORE:
            raise ConfigError(f"need 1 to {IGNORE - 1} classes, got {len(self.classes)}")
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "_lut", {c.id: k for k, c in enumerate(self.classes)})

    @property
    def num_classes(self) -> int:
        """K."""
        return len(self.classes)

    @property
    def ids(self) -> tuple[int, ...]:
        """Raster value of each class index."""
        return tuple(c.id for c in self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        """Name of each class index."""
        return tuple(c.name for c in self.classes)

    def unknown_values(self, values: npt.NDArray[Any], nodata: float | None = None) -> list[Any]:
        """The distinct values in ``values`` that are neither a class id, the ignore index nor ``nodata``."""
        distinct = np.unique(values)
        allowed = set(self._lut) | ({self.ignore_index} if self.ignore_index is not None else set())
        out = []
        for v in distinct.tolist():
            if nodata is not None and (
                v == nodata or (isinstance(v, float) and np.isnan(v) and np.isnan(nodata))
            ):
                continue
            if v not in allowed:
                out.append(v)
        return out

    def to_indexes(
        self, values: npt.NDArray[Any], valid: npt.NDArray[np.bool_] | None = None
    ) -> npt.NDArray[np.uint8]:
        """Map raster values to class indexes (uint8).

        The ignore index, unknown values and pixels where ``valid`` is False become :data:`IGNORE`.
        """
        out = np.full(values.shape, IGNORE, np.uint8)
        for cid, k in self._lut.items():
            out[values == cid] = k
        if valid is not None:
            out[~valid] = IGNORE
        return out

    def index_of_attribute(self, value: Any) -> int | None:
        """Class index for an attribute value: a class id (number) or a class name (case-insensitive)."""
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
            return self._lut.get(int(value))
        if isinstance(value, str):
            wanted = value.strip().casefold()
            for k, c in enumerate(self.classes):
                if c.name.strip().casefold() == wanted:
                    return k
            if re.fullmatch(r"\s*\d+\s*", value):
                return self._lut.get(int(value))
        return None


def _shapely() -> Any:
    """Shapely (with its ``geometry`` module loaded), or the pip hint for the ``vector`` extra."""
    from ._lazy import lazy_import

    shapely = lazy_import("shapely", extra="vector")
    lazy_import("shapely.geometry", extra="vector", package="shapely")
    return shapely


@dataclass(frozen=True)
class VectorData:
    """Features read from a vector file: shapely geometries, their attributes and the CRS."""

    geometries: tuple[Any, ...]
    properties: tuple[Mapping[str, Any], ...]
    crs: CRS | None
    path: str


def read_vector(path: str | os.PathLike[str], layer: str | None = None) -> VectorData:
    """Read features from a vector file: GeoJSON directly, any other format OGR reads with fiona.

    GeoJSON without a ``crs`` member is WGS 84 longitude/latitude (RFC 7946).
    NOTE: GeoJSON is parsed with :mod:`json` because OGR types a property column from its values,
    and a class attribute mixing names and ids ("forest", 5) then fails to read through fiona.

    Raises:
        InputError: Missing or unreadable file, unknown layer, or no features.
    """
    path = os.fspath(path)
    if not Path(path).exists():
        raise InputError(f"{path}: vector file not found")
    try:
        if Path(path).suffix.lower() in (".geojson", ".json"):
            data = _read_geojson(path)
        else:
            data = _read_with_fiona(path, layer)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, CRSError) as err:
        raise InputError(f"{path}: cannot read vector features ({_first_line(err)})") from err
    if not data.geometries:
        raise InputError(f"{path}: no features with a geometry")
    return data


def _read_geojson(path: str) -> VectorData:
    shapely = _shapely()
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict):
        raise InputError(f"{path}: not GeoJSON (the top level is a {_json_kind(doc)}, "
                         "expected a FeatureCollection, Feature or geometry)")
    if doc.get("type") == "FeatureCollection":
        features = doc.get("features") or []
    elif doc.get("type") == "Feature":
        features = [doc]
    elif "coordinates" in doc or doc.get("type") == "GeometryCollection":
        features = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        raise InputError(f"{path}: not GeoJSON (expected a FeatureCollection, Feature or geometry)")
    crs: CRS | None = CRS.from_epsg(4326)
    name = ((doc.get("crs") or {}).get("properties") or {}).get("name")
    if name:
        try:
            crs = CRS.from_user_input(name)
        except CRSError as err:
            raise InputError(f"{path}: unknown CRS {name!r}") from err
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise InputError(f"{path}: not GeoJSON (\"features\" must be a list of Feature objects)")
    geoms, props = [], []
    for feature in features:
        if not feature.get("geometry"):
            continue
        geoms.append(shapely.geometry.shape(feature["geometry"]))
        props.append(dict(feature.get("properties") or {}))
    return VectorData(tuple(geoms), tuple(props), crs, path)


def _json_kind(value: Any) -> str:
    """How a JSON value is called in messages: list, string, number, ..."""
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _read_with_fiona(path: str, layer: str | None) -> VectorData:
    from ._lazy import lazy_import

    fiona = lazy_import("fiona", extra="vector")
    shapely = _shapely()
    try:
        if layer is not None and layer not in fiona.listlayers(path):
            raise InputError(f"{path}: no feature layer named {layer!r}")
        with fiona.open(path, layer=layer) as features:
            crs = CRS.from_wkt(features.crs_wkt) if features.crs_wkt else None
            geoms, props = [], []
            for feature in features:
                if feature.geometry is None:
                    continue
                geoms.append(shapely.geometry.shape(feature.geometry))
                props.append(dict(feature.properties))
    except fiona.errors.FionaError as err:
        raise InputError(f"{path}: cannot read vector features ({_first_line(err)})") from err
    return VectorData(tuple(geoms), tuple(props), crs, path)


def geometries_on_grid(data: VectorData, grid: Grid) -> list[Any]:
    """The features' geometries in the grid's CRS (unchanged when either CRS is unknown)."""
    shapely = _shapely()
    if data.crs is not None and data.geometries:
        from .aoi import check_lonlat

        check_lonlat(tuple(shapely.total_bounds(list(data.geometries))), data.crs, data.path)
    if data.crs is None or grid.crs is None or data.crs == grid.crs:
        return list(data.geometries)
    from rasterio.warp import transform_geom

    from .aoi import reprojection_errors

    try:
        return [
            shapely.geometry.shape(transform_geom(data.crs, grid.crs, g.__geo_interface__))
            for g in data.geometries
        ]
    except reprojection_errors() as err:
        raise InputError(f"{data.path}: cannot reproject to the image CRS ({_first_line(err)})") from err


def _window_transform(grid: Grid, window: Window) -> Affine:
    return grid.transform @ Affine.translation(window.col_off, window.row_off)


def _window_bounds(grid: Grid, window: Window) -> tuple[float, float, float, float]:
    """``(xmin, ymin, xmax, ymax)`` of a window's four corners in map coordinates (any rotation)."""
    c0, r0 = window.col_off, window.row_off
    c1, r1 = c0 + window.width, r0 + window.height
    xs, ys = zip(*(grid.transform @ (c, r) for c, r in ((c0, r0), (c1, r0), (c0, r1), (c1, r1))), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


class _ShapeIndex:
    """Geometries on a grid with an STR-tree, to pick those touching a window quickly."""

    def __init__(self, geometries: Sequence[Any], values: Sequence[int] | None = None):
        shapely = _shapely()
        self.geometries = list(geometries)
        self.values = list(values) if values is not None else [1] * len(self.geometries)
        self._tree = shapely.STRtree(self.geometries)

    def shapes(self, grid: Grid, window: Window) -> list[tuple[Any, int]]:
        shapely = _shapely()
        hits = self._tree.query(shapely.box(*_window_bounds(grid, window)))
        # NOTE: keep file order so later features are drawn over earlier ones, whatever the tree returns.
        return [(self.geometries[i], self.values[i]) for i in sorted(hits.tolist())]


class LabelSource(Protocol):
    """Reference labels on an image's grid, read window by window."""

    path: str

    def read(self, window: Window) -> npt.NDArray[np.uint8]:
        """Class indexes ``(h, w)`` uint8 for ``window``; :data:`IGNORE` where unlabelled."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...


class RasterLabels:
    """A class raster on exactly the image's grid; raster values are class ids.

    Its nodata value and the classes file's ignore index mean "no label".
    """

    def __init__(self, path: str, grid: Grid, class_map: ClassMap, check_values: bool = True):
        self.path = path
        self.class_map = class_map
        self._src = open_raster(path, "label raster")
        try:
            if self._src.count != 1:
                raise InputError(f"{path}: a label raster needs exactly one band, found {self._src.count}")
            if np.dtype(self._src.dtypes[0]).kind not in "ui":
                raise InputError(f"{path}: label raster must hold integers, found {self._src.dtypes[0]}")
            why = grid.difference(Grid.of(self._src))
            if why:
                raise InputError(
                    f"{path}: label raster is not on the image's grid: {why} "
                    "(resample it onto the image first)"
                )
            self._nodata = self._src.nodata
            if check_values:
                self._check_values()
        except BaseException:
            self._src.close()
            raise

    def _check_values(self) -> None:
        unknown: set[Any] = set()
        for window in row_blocks(Grid.of(self._src).window, 512):
            unknown.update(self.class_map.unknown_values(self._src.read(1, window=window), self._nodata))
            if len(unknown) > 20:
                break
        if unknown:
            listed = ", ".join(str(v) for v in sorted(unknown)[:10])
            ids = ", ".join(str(i) for i in self.class_map.ids)
            hint = (
                f" or the ignore index {self.class_map.ignore_index}"
                if self.class_map.ignore_index is not None
                else ""
            )
            raise InputError(
                f"{self.path}: label values {listed} are not in the classes file (class ids: {ids}{hint}); "
                "add them to the classes file or set them to the ignore index"
            )

    def read(self, window: Window) -> npt.NDArray[np.uint8]:
        """Class indexes for ``window`` (see :class:`LabelSource`)."""
        values = self._src.read(1, window=window)
        valid = values != self._nodata if self._nodata is not None else None
        return self.class_map.to_indexes(values, valid)

    def close(self) -> None:
        """Close the raster."""
        self._src.close()


class VectorLabels:
    """Polygons with a class attribute, rasterised onto the image's grid one window at a time.

    A pixel takes the class of the last feature (in file order) that contains its centre;
    pixels in no polygon are unlabelled.
    """

    def __init__(
        self, path: str, grid: Grid, class_map: ClassMap, attribute: str | None, layer: str | None = None
    ):
        self.path = path
        self.grid = grid
        data = read_vector(path, layer)
        available = sorted({k for p in data.properties for k in p})
        if not attribute:
            raise InputError(
                f"{path}: vector labels need a class attribute (--label-attribute); this file has: "
                + (", ".join(available) or "no attributes")
            )
        missing = sum(1 for p in data.properties if p.get(attribute) is None)
        if missing == len(data.properties):
            raise InputError(
                f"{path}: no feature has the class attribute {attribute!r}; attributes here: "
                + (", ".join(available) or "none")
            )
        values, unknown = [], set()
        for props in data.properties:
            raw = props.get(attribute)
            k = class_map.index_of_attribute(raw)
            if k is None:
                unknown.add(repr(raw))
            values.append(k)
        if unknown:
            listed = ", ".join(sorted(unknown)[:10])
            known = ", ".join(f"{c.id}={c.name!r}" for c in class_map.classes)
            raise InputError(
                f"{path}: {attribute!r} values {listed} match no class "
                f"(use a class id or name from the classes file: {known})"
            )
        geoms = geometries_on_grid(data, grid)
        if _clip(grid, _geometry_window(grid, geoms)) is None:
            shapely = _shapely()
            bounds = ", ".join(f"{v:.6g}" for v in shapely.total_bounds(geoms))
            raise InputError(
                f"{path}: the polygons ({bounds} in the image's CRS) do not overlap the "
                f"{grid.width}x{grid.height} px image"
            )
        self._index = _ShapeIndex(geoms, values)

    def read(self, window: Window) -> npt.NDArray[np.uint8]:
        """Class indexes for ``window`` (see :class:`LabelSource`)."""
        from rasterio.features import rasterize

        h, w = int(window.height), int(window.width)
        shapes = self._index.shapes(self.grid, window)
        if not shapes:
            return np.full((h, w), IGNORE, np.uint8)
        return rasterize(
            shapes,
            out_shape=(h, w),
            transform=_window_transform(self.grid, window),
            fill=IGNORE,
            dtype="uint8",
        )

    def close(self) -> None:
        """Nothing to release."""


def is_vector_path(path: str | os.PathLike[str]) -> bool:
    """True for the file types read as vector features."""
    return Path(os.fspath(path)).suffix.lower() in VECTOR_SUFFIXES


def open_labels(
    path: str | os.PathLike[str],
    grid: Grid,
    class_map: ClassMap,
    attribute: str | None = None,
) -> LabelSource:
    """Open reference labels for an image: a class raster on its grid, or vector polygons.

    Raises:
        InputError: Missing file, a raster on another grid, values or names missing from the
            classes, or vector labels without the class attribute.
    """
    path = os.fspath(path)
    if is_vector_path(path):
        return VectorLabels(path, grid, class_map, attribute)
    return RasterLabels(path, grid, class_map)


def row_blocks(window: Window, rows: int) -> Iterator[Window]:
    """Split ``window`` into full-width windows of at most ``rows`` rows, top to bottom."""
    top, bottom = int(window.row_off), int(window.row_off + window.height)
    for y in range(top, bottom, rows):
        yield Window(int(window.col_off), y, int(window.width), min(rows, bottom - y))


RegionKind = Literal["all", "rows", "window", "polygon"]


class RegionOutsideError(InputError):
    """A region lies wholly outside a grid (a training region may miss one image of several)."""


@dataclass(frozen=True)
class Region:
    """A part of a pixel grid: all of it, a range of rows, a window or polygons.

    Build one with :meth:`rows`, :meth:`window`, :meth:`aoi` or :func:`parse_region`;
    :meth:`on` binds it to a grid.
    """

    kind: RegionKind = "all"
    row_range: tuple[int, int] | None = None
    window_px: tuple[int, int, int, int] | None = None  # col_off, row_off, width, height
    aoi_path: str | None = None

    @classmethod
    def rows(cls, text: str) -> Region:
        """``"A:B"``: rows A (inclusive) to B (exclusive), 0-based like Python slices.

        Raises:
            ConfigError: Not ``A:B`` with ``0 <= A < B``.
        """
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not match or int(match[1]) >= int(match[2]):
            raise ConfigError(f"rows must be A:B with 0 <= A < B (B exclusive), got {text!r}")
        return cls("rows", row_range=(int(match[1]), int(match[2])))

    @classmethod
    def window(cls, text: str) -> Region:
        """``"col_off,row_off,width,height"`` in pixels.

        Raises:
            ConfigError: Not four non-negative integers with positive width and height.
        """
        try:
            values = tuple(int(v) for v in str(text).split(","))
        except ValueError:
            values = ()
        if len(values) != 4 or min(values) < 0 or values[2] < 1 or values[3] < 1:
            raise ConfigError(f"window must be col_off,row_off,width,height in pixels, got {text!r}")
        return cls("window", window_px=values)  # type: ignore[arg-type]

    @classmethod
    def aoi(cls, path: str | os.PathLike[str]) -> Region:
        """Polygons from a vector file (GeoJSON, GeoPackage); pixels whose centre is inside count."""
        return cls("polygon", aoi_path=os.fspath(path))

    def describe(self) -> str:
        """Short text for logs, errors and provenance."""
        if self.kind == "rows":
            return f"rows {self.row_range[0]}:{self.row_range[1]}"  # type: ignore[index]
        if self.kind == "window":
            return "window " + ",".join(map(str, self.window_px))  # type: ignore[arg-type]
        if self.kind == "polygon":
            return f"polygons of {self.aoi_path}"
        return "whole grid"

    def on(self, grid: Grid, what: str = "region") -> BoundRegion:
        """Bind to a grid.

        Rows or a window running past the grid are clipped to it, with a warning; the bound
        region's :attr:`BoundRegion.region` describes the clipped part.

        Raises:
            RegionOutsideError: The region lies outside the grid (it would be empty).
            InputError: The region's polygon file is unreadable or cannot be placed on the grid.
        """
        region = self
        if self.kind == "rows":
            a, b = self.row_range  # type: ignore[misc]
            bbox = _clip(grid, Window(0, a, grid.width, b - a))
            index = None
            if bbox is not None and bbox.height != b - a:
                region = Region("rows", row_range=(int(bbox.row_off), int(bbox.row_off + bbox.height)))
        elif self.kind == "window":
            c, r, w, h = self.window_px  # type: ignore[misc]
            bbox = _clip(grid, Window(c, r, w, h))
            index = None
            if bbox is not None and (bbox.width, bbox.height) != (w, h):
                region = Region("window", window_px=(int(bbox.col_off), int(bbox.row_off),
                                                     int(bbox.width), int(bbox.height)))
        elif self.kind == "polygon":
            geoms = geometries_on_grid(read_vector(self.aoi_path), grid)  # type: ignore[arg-type]
            index = _ShapeIndex(geoms)
            bbox = _clip(grid, _geometry_window(grid, geoms))
        else:
            bbox, index = grid.window, None
        if bbox is None:
            raise RegionOutsideError(
                f"{what} ({self.describe()}) lies outside the {grid.width}x{grid.height} px image"
            )
        if region is not self:  # a typo such as 1032:14280 should not pass unnoticed
            warnings.warn(
                f"{what} ({self.describe()}) runs past the {grid.width}x{grid.height} px image; "
                f"using {region.describe()}",
                GeosegWarning,
                stacklevel=2,
            )
        return BoundRegion(region, grid, bbox, index)


def parse_region(rows: str | None = None, window: str | None = None, aoi: str | None = None) -> Region:
    """One region from at most one of ``rows``, ``window`` and ``aoi``; the whole grid when none is given.

    Raises:
        ConfigError: More than one is given, or one is malformed.
    """
    given = [(k, v) for k, v in (("rows", rows), ("window", window), ("aoi", aoi)) if v]
    if len(given) > 1:
        raise ConfigError(f"give at most one of rows, window and aoi, got {', '.join(k for k, _ in given)}")
    if not given:
        return Region()
    kind, value = given[0]
    return {"rows": Region.rows, "window": Region.window, "aoi": Region.aoi}[kind](value)


def _clip(grid: Grid, window: Window) -> Window | None:
    r0, c0 = max(int(window.row_off), 0), max(int(window.col_off), 0)
    r1 = min(int(window.row_off + window.height), grid.height)
    c1 = min(int(window.col_off + window.width), grid.width)
    if r1 <= r0 or c1 <= c0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def _geometry_window(grid: Grid, geoms: Sequence[Any]) -> Window:
    shapely = _shapely()
    from rasterio.windows import from_bounds

    left, bottom, right, top = shapely.GeometryCollection(list(geoms)).bounds
    if any(np.isnan([left, bottom, right, top])):
        return Window(0, 0, 0, 0)
    window = from_bounds(left, bottom, right, top, grid.transform)
    row0, col0 = int(np.floor(window.row_off)), int(np.floor(window.col_off))
    row1 = int(np.ceil(window.row_off + window.height))
    col1 = int(np.ceil(window.col_off + window.width))
    return Window(col0, row0, col1 - col0, row1 - row0)


@dataclass(frozen=True)
class BoundRegion:
    """A region on a particular grid: its bounding window and, for polygons, a per-window mask."""

    region: Region
    grid: Grid
    bbox: Window
    _index: _ShapeIndex | None = field(default=None, repr=False)

    def mask(self, window: Window) -> npt.NDArray[np.bool_]:
        """True for the pixels of ``window`` inside the region ``(h, w)``."""
        h, w = int(window.height), int(window.width)
        r0, c0 = int(window.row_off), int(window.col_off)
        b = self.bbox
        rows = (np.arange(r0, r0 + h) >= b.row_off) & (np.arange(r0, r0 + h) < b.row_off + b.height)
        cols = (np.arange(c0, c0 + w) >= b.col_off) & (np.arange(c0, c0 + w) < b.col_off + b.width)
        inside = rows[:, None] & cols[None, :]
        if self._index is None or not inside.any():
            return inside
        from rasterio.features import geometry_mask

        shapes = self._index.shapes(self.grid, window)
        if not shapes:
            return np.zeros((h, w), bool)
        polygon = geometry_mask(
            [g for g, _ in shapes],
            out_shape=(h, w),
            transform=_window_transform(self.grid, window),
            invert=True,
        )
        return inside & polygon

    def intersects(self, window: Window) -> bool:
        """True when any pixel of ``window`` is inside the region."""
        b = self.bbox
        if (
            window.row_off >= b.row_off + b.height
            or window.row_off + window.height <= b.row_off
            or window.col_off >= b.col_off + b.width
            or window.col_off + window.width <= b.col_off
        ):
            return False
        return self._index is None or bool(self.mask(window).any())

    @property
    def is_rectangular(self) -> bool:
        """True when the region is exactly its bounding window."""
        return self._index is None
