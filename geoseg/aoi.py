"""Area of interest: polygons from a vector file or GeoJSON text, placed on the scene's pixel grid.

Only tiles that touch the area are read and predicted, and pixels outside it are nodata in every
output. A pixel is inside when its centre is (GDAL's rasterisation rule without ``all_touched``),
so areas computed from the output match the polygon's area within half a pixel along its edge.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from affine import Affine

from ._lazy import lazy_import
from .errors import InputError
from .io import Scene

log = logging.getLogger(__name__)

GEOJSON_TEXT_LABEL = "--aoi GeoJSON"


@dataclass(frozen=True)
class AreaOfInterest:
    """Polygons in the scene's pixel coordinates: x = column, y = row, pixel corners at integers.

    Attributes:
        geometry: A valid shapely (Multi)Polygon in pixel coordinates.
        label: The source as messages name it (a file, or ``--aoi GeoJSON``).
    """

    geometry: Any
    label: str

    def __post_init__(self) -> None:
        _shapely().prepare(self.geometry)  # fast repeated intersects/contains tests against tile boxes

    def mask(self, y: int, x: int, height: int, width: int) -> npt.NDArray[np.bool_]:
        """``(height, width)``: True where a pixel's centre lies inside the area."""
        box = _shapely().box(x, y, x + width, y + height)
        if self.geometry.contains(box):
            return np.ones((height, width), bool)
        if not self.geometry.intersects(box):
            return np.zeros((height, width), bool)
        from rasterio.features import geometry_mask

        # NOTE: only the polygon parts of the clip: where the area merely touches the tile, the
        # intersection has lines, which GDAL would burn whatever all_touched says.
        clipped = _polygonal(self.geometry.intersection(box))
        if clipped.is_empty:
            return np.zeros((height, width), bool)
        return geometry_mask(
            [clipped],
            out_shape=(height, width),
            transform=Affine.translation(x, y),  # window pixel (col, row) -> scene pixel (x + col, y + row)
            invert=True,
            all_touched=False,
        )


def load_aoi(spec: str | os.PathLike[str], scene: Scene) -> AreaOfInterest:
    """Read an area of interest and place it on a scene's grid.

    Args:
        spec: A vector file any GDAL/OGR driver reads (GeoPackage, Shapefile, GeoJSON, ...; all
            features of its first layer), or GeoJSON text (starting with ``{``). GeoJSON
            without a ``crs`` member is WGS 84 longitude/latitude (RFC 7946). A file without a
            CRS is taken to be in the scene's CRS.
        scene: The checked scene.

    Returns:
        The area in the scene's pixel coordinates. An invalid polygon (self-intersecting, ...)
        is repaired with ``shapely.make_valid``, and geoseg logs it.

    Raises:
        InputError: The file is missing or unreadable, holds no polygons, or the area does not
            overlap the scene; the message names the source.
    """
    shapely = _shapely()
    geometries, crs, label = _read_polygons(spec)
    invalid = [g for g in geometries if not g.is_valid]
    if invalid:
        log.warning("%s: invalid polygon (%s); repaired with shapely.make_valid",
                    label, shapely.is_valid_reason(invalid[0]))
        geometries = [_polygonal(shapely.make_valid(g)) for g in geometries]
    geometry = shapely.union_all(geometries)
    if geometry.is_empty or geometry.area == 0:
        raise InputError(f"{label}: the area of interest has no area")
    if crs is not None:
        check_lonlat(geometry.bounds, crs, label)
    if crs is None:
        log.warning("%s: no CRS; taking the area of interest to be in the scene's CRS", label)
    elif scene.crs is None:
        raise InputError(f"{label}: the scene {scene.label} has no CRS, so the area of interest cannot be placed on it")
    elif crs != scene.crs:
        geometry = _reproject(geometry, crs, scene.crs, label)
    inverse = ~scene.transform
    pixels = shapely.affinity.affine_transform(geometry, [inverse.a, inverse.b, inverse.d, inverse.e, inverse.c, inverse.f])
    if not pixels.is_valid:  # reprojection can make a valid polygon touch itself
        pixels = _polygonal(shapely.make_valid(pixels))
    footprint = shapely.box(0, 0, scene.width, scene.height)
    if pixels.intersection(footprint).area == 0:
        bounds = ", ".join(f"{v:.6g}" for v in geometry.bounds)
        raise InputError(
            f"{label}: the area of interest ({bounds} in the scene's CRS) does not overlap the scene {scene.label}"
        )
    inside = 100 * pixels.intersection(footprint).area / pixels.area
    if inside < 100 - 1e-6:
        log.info("%s: %.1f %% of the area of interest lies inside the scene", label, inside)
    return AreaOfInterest(pixels, label)


def aoi_label(spec: str | os.PathLike[str] | None) -> str | None:
    """The area of interest as messages and reports name it: the file, or ``--aoi GeoJSON``."""
    if spec is None:
        return None
    text = os.fspath(spec)
    return GEOJSON_TEXT_LABEL if text.lstrip().startswith("{") else text


def _shapely() -> Any:
    shapely = lazy_import("shapely", extra="vector")
    for module in ("shapely.geometry", "shapely.affinity"):
        lazy_import(module, extra="vector", package="shapely")
    return shapely


def _read_polygons(spec: str | os.PathLike[str]) -> tuple[list[Any], Any, str]:
    """The source's polygons (shapely), their CRS (rasterio) or None, and the source's label."""
    fiona = lazy_import("fiona", extra="vector")
    text = os.fspath(spec)
    label = aoi_label(text)
    is_text = label == GEOJSON_TEXT_LABEL
    if not is_text and "://" not in text and not text.startswith("/vsi") and not Path(text).exists():
        raise InputError(f"{label}: area of interest file not found")
    try:
        if is_text:
            with fiona.MemoryFile(text.encode()) as memory, memory.open(driver="GeoJSON") as layer:
                geometries, crs_wkt = _layer_geometries(layer)
        else:
            with fiona.open(text) as layer:
                geometries, crs_wkt = _layer_geometries(layer)
    except (fiona.errors.FionaError, OSError, ValueError, TypeError) as err:
        what = "not valid GeoJSON" if is_text else "not a vector file GDAL can read"
        raise InputError(f"{label}: {what} ({_first_line(err)})") from err
    if not geometries:
        raise InputError(f"{label}: no features with a geometry")
    kinds = {g.geom_type for g in geometries}
    if not kinds <= {"Polygon", "MultiPolygon"}:
        other = sorted(kinds - {"Polygon", "MultiPolygon"})
        raise InputError(f"{label}: an area of interest needs polygons, found {', '.join(other)}")
    return geometries, _crs(crs_wkt), label


def _layer_geometries(layer: Any) -> tuple[list[Any], str | None]:
    shapely = _shapely()
    geometries = [shapely.geometry.shape(f.geometry) for f in layer if f.geometry is not None]
    crs_wkt = layer.crs.to_wkt() if layer.crs else None
    return geometries, crs_wkt


def _crs(wkt: str | None) -> Any:
    if not wkt:
        return None
    from rasterio.crs import CRS

    return CRS.from_wkt(wkt)


def _polygonal(geometry: Any) -> Any:
    """The polygon parts of a geometry (make_valid may add lines or points where edges touched)."""
    shapely = _shapely()
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = [g for g in shapely.get_parts(geometry) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _reproject(geometry: Any, src_crs: Any, dst_crs: Any, label: str) -> Any:
    """The geometry in ``dst_crs``; long edges are densified first so they may curve."""
    shapely = _shapely()
    from rasterio.warp import transform_geom

    xmin, ymin, xmax, ymax = geometry.bounds
    # NOTE: a straight edge in one CRS is a curve in another; 1/512 of the extent keeps the
    # error far below a pixel for any AOI that fits a scene, and adds no vertex to a detailed outline.
    densified = shapely.segmentize(geometry, max(xmax - xmin, ymax - ymin) / 512)
    try:
        moved = transform_geom(src_crs, dst_crs, densified.__geo_interface__)
    except reprojection_errors() as err:
        raise InputError(f"{label}: cannot reproject the area of interest to the scene's CRS ({_first_line(err)})") from err
    return shapely.geometry.shape(moved)


def check_lonlat(bounds: tuple[float, float, float, float], crs: Any, label: str) -> None:
    """Refuse coordinates outside longitude/latitude range in a geographic CRS.

    A GeoJSON without a ``crs`` member is WGS 84 (RFC 7946), but exports of projected layers
    often hold metres there; PROJ then fails deep inside the reprojection with no hint why.

    Raises:
        InputError: ``crs`` is geographic and the bounds leave -360..360 (0..360 longitudes
            are common) or -90..90.
    """
    if not getattr(crs, "is_geographic", False):
        return
    xmin, ymin, xmax, ymax = bounds
    if xmin >= -360 and xmax <= 360 and ymin >= -90 - 1e-9 and ymax <= 90 + 1e-9:
        return
    shown = ", ".join(f"{v:.6g}" for v in bounds)
    raise InputError(
        f"{label}: coordinates ({shown}) are not longitude/latitude, but its CRS is geographic "
        '(a GeoJSON without a "crs" member is WGS 84); add a crs or reproject the file'
    )


def reprojection_errors() -> tuple[type[BaseException], ...]:
    """What rasterio's ``transform_geom`` raises for coordinates PROJ cannot move.

    PROJ's own failures come as GDAL's ``CPLE_*`` exceptions, which are not ``RasterioError`` s.
    """
    from rasterio.errors import CRSError, RasterioError

    try:
        from rasterio._err import CPLE_BaseError
    except ImportError:  # a rasterio that moved it: its errors are RasterioErrors there
        return (CRSError, RasterioError, ValueError)
    return (CRSError, RasterioError, ValueError, CPLE_BaseError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
