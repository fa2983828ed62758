"""A STAC Item describing a class raster (``geoseg predict --stac FILE``).

The Item (STAC 1.1) has the raster's footprint in WGS 84, one ``data`` asset (the class
raster), a ``derived_from`` link to each input, the model's name and SHA-256, and three
extensions: projection (CRS, shape, transform, bbox in the raster's CRS), raster (nodata, data
type, resolution) and classification (value, name and colour of each class). It is plain JSON,
written without pystac (which reads it back: ``pystac.Item.from_file``).

The Item's ``datetime`` is the scene's acquisition time when the input says it
(``ACQUISITIONDATETIME`` or ``TIFFTAG_DATETIME`` tags, or a STAC Item input's own datetime);
otherwise the time of the prediction, marked by ``geoseg:datetime_source: "prediction"``.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.warp

from ._version import __version__
from .errors import OutputError
from .io import TMP_MARKER, Scene
from .modelfile import ClassSpec

STAC_VERSION = "1.1.0"
PROJECTION_SCHEMA = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER_SCHEMA = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
CLASSIFICATION_SCHEMA = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
FOOTPRINT_POINTS_PER_EDGE = 21  # the raster's edges are curved in WGS 84; sample them
DATETIME_TAGS = ("ACQUISITIONDATETIME", "TIFFTAG_DATETIME")


def build_item(
    class_raster: str | os.PathLike[str],
    classes: Sequence[ClassSpec],
    *,
    item_path: str | os.PathLike[str],
    inputs: Sequence[str] = (),
    model_name: str = "",
    model_sha256: str = "",
    model_file: str = "",
    acquired: datetime.datetime | None = None,
) -> dict[str, Any]:
    """The STAC Item (a JSON-ready dict) for ``class_raster``.

    Args:
        class_raster: The finished class raster.
        classes: The model's classes.
        item_path: Where the Item will be written: local hrefs are made relative to its folder.
        inputs: Paths or URIs of the input scene (one, several band files, or a STAC Item).
        model_name: The model's name.
        model_sha256: The model file's SHA-256.
        model_file: The model file's name.
        acquired: Acquisition time of the scene; ``None``: the prediction time is used.

    The asset's media type says ``profile=cloud-optimized`` when GDAL's COG driver wrote the raster.
    """
    class_raster = Path(class_raster)
    folder = Path(item_path).resolve().parent
    with rasterio.open(class_raster) as ds:
        crs, transform = ds.crs, ds.transform
        width, height = ds.width, ds.height
        nodata = ds.nodata
        dtype = ds.dtypes[0]
        bounds = ds.bounds
        cog = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT", "").upper() == "COG"
    # Without a CRS nothing places the raster on the Earth: STAC's null geometry, and no bbox.
    geometry = footprint(bounds, crs) if crs is not None else None
    now = datetime.datetime.now(datetime.timezone.utc)
    epsg = crs.to_epsg() if crs is not None else None
    media_type = "image/tiff; application=geotiff" + ("; profile=cloud-optimized" if cog else "")
    band: dict[str, Any] = {
        "data_type": dtype,
        "spatial_resolution": abs(transform.a),
        "sampling": "area",
    }
    if nodata is not None:
        band["nodata"] = int(nodata) if float(nodata).is_integer() else nodata
    properties: dict[str, Any] = {
        "datetime": _iso(acquired or now),
        "created": _iso(now),
        "geoseg:datetime_source": "scene" if acquired else "prediction",
        "geoseg:model": {"name": model_name, "sha256": model_sha256, "file": model_file},
        "processing:software": {"geoseg": __version__},
        "proj:code": f"EPSG:{epsg}" if epsg else None,
        "proj:shape": [height, width],
        "proj:transform": list(transform)[:6],
        "proj:bbox": [bounds.left, bounds.bottom, bounds.right, bounds.top],
    }
    if crs is not None and epsg is None:
        properties["proj:wkt2"] = crs.to_wkt()
    links = [
        {
            "rel": "derived_from",
            "href": _href(src, folder),
            "type": "application/geo+json" if src.lower().endswith(".json") else media_type_of(src),
            "title": "input scene",
        }
        for src in inputs
    ]
    placed: dict[str, Any] = {"geometry": geometry}
    if geometry is not None:
        lons = [x for x, _ in geometry["coordinates"][0]]
        lats = [y for _, y in geometry["coordinates"][0]]
        placed["bbox"] = [min(lons), min(lats), max(lons), max(lats)]
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [PROJECTION_SCHEMA, RASTER_SCHEMA, CLASSIFICATION_SCHEMA, PROCESSING_SCHEMA],
        "id": class_raster.stem,
        **placed,
        "properties": properties,
        "links": links,
        "assets": {
            "classes": {
                "href": _href(str(class_raster), folder),
                "type": media_type,
                "title": "land-cover classes",
                "roles": ["data"],
                "raster:bands": [band],
                "classification:classes": [
                    {"value": c.id, "name": c.name, "color_hint": c.color.lstrip("#").upper()} for c in classes
                ],
            }
        },
    }


def footprint(bounds: Any, crs: Any) -> dict[str, Any]:
    """The raster's outline as a GeoJSON Polygon in WGS 84 (longitude, latitude), edges sampled.

    Without a CRS the outline stays in the raster's own coordinates (the Item itself then has no
    geometry: STAC's is WGS 84).
    """
    t = np.linspace(0.0, 1.0, FOOTPRINT_POINTS_PER_EDGE)[:-1]
    left, bottom, right, top = bounds.left, bounds.bottom, bounds.right, bounds.top
    xs = np.concatenate([left + t * (right - left), np.full_like(t, right), right - t * (right - left),
                         np.full_like(t, left)])
    ys = np.concatenate([np.full_like(t, top), top - t * (top - bottom), np.full_like(t, bottom),
                         bottom + t * (top - bottom)])
    ring = [[float(x), float(y)] for x, y in zip(xs, ys)]
    polygon = {"type": "Polygon", "coordinates": [ring + [ring[0]]]}
    if crs is None:
        return polygon
    return dict(rasterio.warp.transform_geom(crs, "EPSG:4326", polygon, precision=7))


def scene_datetime(scene: Scene, inputs: Sequence[str]) -> datetime.datetime | None:
    """The acquisition time the input states, if any (GeoTIFF tags, or a STAC Item input's datetime)."""
    for src in inputs:
        if src.lower().endswith(".json") and Path(src).is_file():
            try:
                value = json.loads(Path(src).read_text())["properties"]["datetime"]
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except (ValueError, KeyError, TypeError):
                pass
    try:
        with rasterio.open(scene.path) as src_ds:
            tags = src_ds.tags()
    except rasterio.errors.RasterioError:
        return None
    for key in DATETIME_TAGS:
        if key in tags:
            parsed = _parse_datetime(tags[key])
            if parsed is not None:
                return parsed
    return None


def _parse_datetime(text: str) -> datetime.datetime | None:
    text = text.strip()
    for pattern in ("%Y:%m:%d %H:%M:%S",):  # TIFF's own format
        try:
            return datetime.datetime.strptime(text, pattern).replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            pass
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def scene_inputs(scene: Scene) -> list[str]:
    """Paths or URIs the scene was read from (band files listed one by one)."""
    if scene.path.lstrip().startswith("<"):  # VRT text: stacked band files, or a STAC Item's assets
        return [part for part in (scene.name or "").split(",") if part]
    return [scene.name or scene.path]


def media_type_of(src: str) -> str:
    """A media type for an input file, from its extension."""
    return "image/tiff; application=geotiff" if src.lower().split("?")[0].endswith((".tif", ".tiff")) else \
        "application/octet-stream"


def write_item(item: dict[str, Any], dst: str | os.PathLike[str]) -> Path:
    """Write the Item as JSON under a temporary name, then rename it to ``dst``.

    Raises:
        OutputError: ``dst`` cannot be written.
    """
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}{TMP_MARKER}{os.getpid()}")
    try:
        tmp.write_text(json.dumps(item, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, dst)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{dst}: cannot write the STAC Item ({err.strerror or err})") from err
    return dst


def _href(src: str, folder: Path) -> str:
    """A local path relative to the Item's folder (portable with it); URIs and /vsi paths unchanged."""
    if "://" in src or src.startswith("/vsi"):
        return src
    try:
        return os.path.relpath(Path(src).resolve(), folder)
    except ValueError:  # another drive on Windows
        return str(Path(src).resolve())


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
