"""Where a scene comes from: a path or URI, files per band, or a STAC Item, resolved for GDAL to open.

:func:`resolve_source` turns what the user gave as SRC into a :class:`ResolvedSource`:

- a local path, a ``/vsi...`` path or a VRT file is passed through; ``https://``, ``http://``,
  ``s3://``, ``gs://`` and ``az://`` become GDAL's ``/vsicurl/``, ``/vsis3/``, ``/vsigs/`` and
  ``/vsiaz/`` paths, read in windows (HTTP range requests), never downloaded whole;
- several files (a list, or SRC with commas) are stacked band after band into a VRT built in
  memory (its XML text is what GDAL opens); they must share CRS and grid, except that coarser
  bands are resampled onto the finest grid when ``resample`` is given;
- a STAC Item (SRC ending in ``.json``, a local file or an http(s) URL, or a STAC API Item URL
  that answers with JSON) picks one asset per model band by ``eo:bands`` common name, or by asset
  key, and stacks them like band files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urljoin, urlsplit
from xml.sax.saxutils import escape

import rasterio
from rasterio.errors import RasterioError, RasterioIOError

from ._remote import display_name, gdal_path, is_remote, listing_off_if_remote, plain_message, split_list
from .errors import ConfigError, InputError
from .modelfile import LoadedModel, ModelMetadata, Normalization

log = logging.getLogger(__name__)

Resampling = Literal["nearest", "bilinear", "cubic"]

#: When no asset has the model band's common name, these stand in for it (Landsat calls its
#: near-infrared band ``nir08``; Sentinel-2 has both ``nir`` (B08) and ``nir08`` (B8A)).
COMMON_NAME_FALLBACKS = {"nir": ("nir08",)}
# Asset media types, best first, when several assets share a common name (Earth Search has a
# COG and a JPEG 2000 asset per Sentinel-2 band).
_MEDIA_RANK = ("profile=cloud-optimized", "image/tiff", "image/vnd.stac.geotiff")
_GDAL_TYPES = {
    "uint8": "Byte",
    "int8": "Int8",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "uint64": "UInt64",
    "int64": "Int64",
    "float32": "Float32",
    "float64": "Float64",
    "complex_int16": "CInt16",
    "complex64": "CFloat32",
    "complex128": "CFloat64",
}
_FETCH_ATTEMPTS = 3


@dataclass(frozen=True)
class ResolvedSource:
    """A scene source ready for :func:`geoseg.io.open_scene`.

    Attributes:
        path: What GDAL opens: a path, a ``/vsi...`` path, or VRT XML text.
        name: The user's SRC for messages (URLs without query strings).
        files: Every local path or URI read (the STAC Item included), for destination checks.
        tag: Value of the output's ``GEOSEG_SOURCE`` tag.
        scale: Per model band, from a STAC Item's ``raster:bands`` (or the file's own band scale
            and offset, see ``scaling_from``): physical value = stored value * scale + offset;
            ``None`` when none is declared.
        offset: See ``scale``.
        block_shape: The tallest and the widest block of the files read, ``(rows, cols)`` in
            pixels (sizes the block cache); ``None`` when not looked at (then the scene's own).
    """

    path: str
    name: str
    files: tuple[str, ...]
    tag: str
    scale: tuple[float, ...] | None = None
    offset: tuple[float, ...] | None = None
    block_shape: tuple[int, int] | None = None
    scaling_from: str = "item"  # whose scale and offset: a STAC "item"'s, or the "file"'s own bands'

    def calibrate(self, model: LoadedModel) -> LoadedModel:
        """The model to run on this source.

        With the source's scale and offset in place of the model's own when it declares them and
        the model's normalisation is ``scale`` (see :func:`resolve_source`); otherwise ``model``
        unchanged.
        """
        if self.scale is None or self.offset is None:
            return model
        whose = self.scaling_from
        meta = model.metadata
        if meta.normalization.method != "scale":
            log.info("%s: the model normalises raw values (meanstd); the %s's scale and offset are not "
                     "applied", self.name, whose)
            return model
        log.info(
            "%s: applying the %s's scale and offset in place of the model's: %s",
            self.name,
            whose,
            ", ".join(f"{b} x{s:g}{o:+g}" for b, s, o in zip(meta.band_names, self.scale, self.offset)),
        )
        norm = Normalization("scale", scale=self.scale, offset=self.offset)
        return replace(model, metadata=replace(meta, normalization=norm))


def resolve_source(
    src: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    metadata: ModelMetadata,
    *,
    resample: Resampling | None = None,
    assets: Mapping[str, str] | Sequence[str] | None = None,
) -> ResolvedSource:
    """Resolve SRC into what GDAL opens.

    Call it inside the ``rasterio.Env`` of the prediction: band files and STAC assets are
    opened here (headers only) to check their grids.

    Band stacks: files are stacked in the order given, every band of each file, one VRT band
    per band. When the stack has as many bands as the model, the VRT bands are described with
    the model's band names, so they feed the model in that order; otherwise ``--bands`` picks.

    STAC scale and offset (``raster:bands`` ``scale``/``offset``, or STAC 1.1 ``bands``
    ``raster:scale``/``raster:offset``): when any chosen asset declares one, the item's values
    (1 and 0 where an asset declares none) replace the model's own scale and offset, but only
    for a model whose normalisation is ``scale`` (``x * scale + offset``: a model that takes
    physical values such as reflectance). A ``meanstd`` model normalises the raw values of its
    training data, so the item's scaling is not applied to it. See
    :meth:`ResolvedSource.calibrate`.

    Args:
        src: A path or URI, a comma-separated list of them (unless SRC is an existing file; see
            :func:`split_source`), a sequence of them, or a STAC Item (``.json``).
        metadata: The model the scene feeds.
        resample: Resample coarser band files onto the finest grid with this method; ``None``
            refuses band files of different resolutions.
        assets: STAC asset keys: a mapping of model band name to key, or keys in model band
            order; ``None`` picks assets by ``eo:bands`` common name.

    Raises:
        InputError: A file is missing or unreadable, band files do not share a grid, the STAC
            Item is invalid or lacks a band. The message names the file.
        ConfigError: ``assets`` or ``resample`` is invalid.
    """
    if resample is not None and resample not in ("nearest", "bilinear", "cubic"):
        raise ConfigError(f"resample must be nearest, bilinear or cubic, got {resample!r}")
    items = split_source(src)
    if len(items) == 1 and (is_stac_item(items[0]) or _serves_stac_json(items[0])):
        return _resolve_stac_item(items[0], metadata, resample, assets)
    if assets:
        raise ConfigError("--assets applies to a STAC Item SRC (a .json file or URL) only")
    if len(items) > 1:
        return stack_bands(items, metadata, resample)
    src = items[0]
    name = display_name(src)
    return ResolvedSource(path=gdal_path(src), name=name, files=(src,), tag=_basename(name))


def split_source(src: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """SRC as a list of paths.

    A sequence as given; a string split at commas, unless it is an existing file; a string with a
    ``?`` (a URL query may contain commas) only at commas that start another URI or /vsi path.

    Raises:
        InputError: SRC is empty.
    """
    if isinstance(src, (str, os.PathLike)):
        text = os.fspath(src)
        if "," in text and not _exists(text):
            items = split_list(text)
        else:
            items = [text]
    else:
        items = [os.fspath(s).strip() for s in src]
    if not items or any(not item for item in items):
        raise InputError(f"{src!r}: empty path in the list of input files")
    return items


def is_stac_item(src: str) -> bool:
    """Whether SRC names a STAC Item: its path (without a URL query) ends in ``.json``."""
    return urlsplit(src).path.lower().endswith(".json") if "://" in src else src.lower().endswith(".json")


#: Media types of a STAC Item fetched from a STAC API.
_JSON_TYPES = ("application/geo+json", "application/json")


def _serves_stac_json(src: str) -> bool:
    """Whether ``src`` is a STAC API Item URL: an http(s) URL whose path has no file suffix or
    runs through ``/items/`` (``.../collections/C/items/ID``), answering with JSON.

    Only the answer's Content-Type is looked at, of a request for its first byte (a raster served
    without a suffix is not downloaded; a STAC API sends the whole Item, a few kB). Any failure
    means no: GDAL then opens ``src``.
    """
    import http.client

    if not src.startswith(("https://", "http://")):
        return False
    path = urlsplit(src).path
    if "/items/" not in path and Path(path).suffix:
        return False
    try:
        first_byte = urllib.request.Request(src, headers={"Range": "bytes=0-0"})
        with urllib.request.urlopen(first_byte, timeout=30) as response:
            return response.headers.get_content_type() in _JSON_TYPES
    except (OSError, ValueError, http.client.HTTPException):
        return False


def parse_assets(text: str) -> dict[str, str] | list[str]:
    """Parse ``--assets``.

    ``red=B04,green=B03,...`` (model band name = asset key) or ``B04,B03,B02,B08`` (asset keys
    in model band order).

    Raises:
        ConfigError: Empty, or mixes both forms.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"--assets: expected red=KEY,green=KEY,... or KEY,KEY,..., got {text!r}")
    pairs = [p.partition("=") for p in parts]
    if all(sep for _, sep, _ in pairs):
        return {band.strip().lower(): key.strip() for band, _, key in pairs}
    if any(sep for _, sep, _ in pairs):
        raise ConfigError(f"--assets: use either band=KEY pairs or a list of keys, not both, got {text!r}")
    return parts


# --- band stacks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BandFile:
    """What a band file's header says."""

    src: str  # as the user gave it
    label: str  # for messages
    path: str  # for GDAL
    count: int
    dtypes: tuple[str, ...]
    nodatavals: tuple[float | None, ...]
    descriptions: tuple[str | None, ...]
    crs: Any
    transform: Any
    width: int
    height: int
    block_shape: tuple[int, int]  # (rows, cols) of the first band's blocks
    scales: tuple[float, ...] = ()  # GDAL's band Scale and Offset: physical = stored * scale + offset
    offsets: tuple[float, ...] = ()

    @property
    def res(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        return t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f


def stack_bands(
    srcs: Sequence[str],
    metadata: ModelMetadata,
    resample: Resampling | None = None,
    *,
    labels: Sequence[str] | None = None,
    nodata: Sequence[float | None] | None = None,
    name: str | None = None,
) -> ResolvedSource:
    """Stack files band after band into an in-memory VRT on the finest file's grid.

    Args:
        srcs: Paths or URIs, in the order their bands feed the model.
        metadata: The model (its band names describe the VRT bands when the counts match).
        resample: Method for coarser files; ``None`` refuses them.
        labels: Names of the files in messages (default: the display names of ``srcs``).
        nodata: Per file, a nodata value to use where the file declares none.
        name: The source's name in later messages (default: the files, comma-separated).

    Raises:
        InputError: A file is missing or unreadable, or differs in CRS, rotation, origin,
            size or resolution from the finest file. The message names the file and what differs.
    """
    labels = list(labels or [display_name(s) for s in srcs])
    files = [_read_header(src, label) for src, label in zip(srcs, labels)]
    ref = min(files, key=lambda f: f.res[0] * f.res[1])  # the finest grid; the first of equals
    resampled = [f for f in files if _check_grid(f, ref, resample)]
    total = sum(f.count for f in files)
    names = metadata.band_names
    bands_xml = []
    for f_index, f in enumerate(files):
        fill = nodata[f_index] if nodata else None
        for b in range(1, f.count + 1):
            if total == len(names):
                description = names[len(bands_xml)]
            else:
                stem = Path(urlsplit(f.src).path).stem
                description = f.descriptions[b - 1] or (stem + (f"#{b}" if f.count > 1 else ""))
            band_nodata = f.nodatavals[b - 1] if f.nodatavals[b - 1] is not None else fill
            method = resample if f in resampled else None
            bands_xml.append(_vrt_band(len(bands_xml) + 1, f, b, ref, description, band_nodata, method))
    if resampled:
        log.info(
            "resampling %s onto the %g x %g grid of %s (%s)",
            ", ".join(f.label for f in resampled),
            *ref.res,
            ref.label,
            resample,
        )
    crs = f"<SRS>{escape(ref.crs.to_wkt())}</SRS>" if ref.crs else ""
    geotransform = ", ".join(repr(v) for v in ref.transform.to_gdal())
    vrt = (
        f'<VRTDataset rasterXSize="{ref.width}" rasterYSize="{ref.height}">{crs}'
        f"<GeoTransform>{geotransform}</GeoTransform>{''.join(bands_xml)}</VRTDataset>"
    )
    name = name or ",".join(labels)
    return ResolvedSource(
        path=vrt,
        name=name,
        files=tuple(srcs),
        tag=",".join(_basename(label) for label in labels),
        block_shape=(max(f.block_shape[0] for f in files), max(f.block_shape[1] for f in files)),
    )


def _read_header(src: str, label: str) -> _BandFile:
    path = gdal_path(src)
    if "://" not in path and not path.startswith("/vsi") and not Path(path).exists():
        raise InputError(f"{label}: file not found")
    try:
        with listing_off_if_remote(path), rasterio.open(path) as ds:
            return _BandFile(
                src=src,
                label=label,
                path=path,
                count=ds.count,
                dtypes=tuple(ds.dtypes),
                nodatavals=tuple(ds.nodatavals),
                descriptions=tuple(ds.descriptions),
                crs=ds.crs,
                transform=ds.transform,
                width=ds.width,
                height=ds.height,
                block_shape=tuple(ds.block_shapes[0]),
                scales=tuple(float(s) for s in ds.scales),
                offsets=tuple(float(o) for o in ds.offsets),
            )
    except RasterioIOError as err:
        what = "cannot open" if is_remote(path) else "not a raster GDAL can read"  # remote: often HTTP
        raise InputError(f"{label}: {what} ({_first_line(err)})") from err
    except RasterioError as err:
        raise InputError(f"{label}: cannot open ({_first_line(err)})") from err


def _check_grid(f: _BandFile, ref: _BandFile, resample: Resampling | None) -> bool:
    """Whether ``f`` must be resampled onto ``ref``'s grid; raises when it cannot be stacked."""
    if f is ref:
        return False
    if f.crs != ref.crs:
        found = f.crs.to_string() if f.crs else "no CRS"
        expected = ref.crs.to_string() if ref.crs else "no CRS"
        raise InputError(
            f"{f.label}: CRS {found} differs from {ref.label}'s {expected}; band files must share one CRS "
            "(reproject with gdalwarp first)"
        )
    if not (f.transform.is_rectilinear and ref.transform.is_rectilinear):
        raise InputError(f"{f.label}: rotated transform; band files must be north-up to be stacked")
    unit = _unit(ref.crs)
    if _close(f.res, ref.res):
        diffs = []
        origin, ref_origin = (f.transform.c, f.transform.f), (ref.transform.c, ref.transform.f)
        if not _close(origin, ref_origin, tol=ref.res[0] * 1e-6):
            diffs.append(
                f"origin ({origin[0]:.12g}, {origin[1]:.12g}) vs ({ref_origin[0]:.12g}, {ref_origin[1]:.12g})"
            )
        if (f.width, f.height) != (ref.width, ref.height):
            diffs.append(f"size {f.width}x{f.height} vs {ref.width}x{ref.height} px")
        if not diffs:
            return False
        raise InputError(
            f"{f.label}: grid differs from {ref.label}'s: {', '.join(diffs)}; band files must share one grid"
        )
    if resample is None:
        raise InputError(
            f"{f.label}: pixel size {f.res[0]:g} x {f.res[1]:g}{unit}, coarser than {ref.label}'s "
            f"{ref.res[0]:g} x {ref.res[1]:g}{unit}; pass --resample bilinear (or nearest, cubic) "
            "to resample coarser bands onto the finest grid"
        )
    half_pixel = max(ref.res) / 2
    if any(abs(a - b) > half_pixel for a, b in zip(f.bounds, ref.bounds)):
        raise InputError(
            f"{f.label}: covers ({', '.join(f'{v:g}' for v in f.bounds)}), not the area of {ref.label} "
            f"({', '.join(f'{v:g}' for v in ref.bounds)}); "
            "band files must cover the same area to be resampled"
        )
    return True


def _vrt_band(
    index: int,
    f: _BandFile,
    source_band: int,
    ref: _BandFile,
    description: str,
    nodata: float | None,
    resample: Resampling | None,
) -> str:
    dtype = f.dtypes[source_band - 1]
    gdal_type = _GDAL_TYPES.get(dtype, dtype)
    tag = "ComplexSource" if resample else "SimpleSource"
    attrs = f' resampling="{resample}"' if resample else ""
    nodata_xml = f"<NoDataValue>{_number(nodata)}</NoDataValue>" if nodata is not None else ""
    scale = (f.scales or (1.0,) * f.count)[source_band - 1]
    offset = (f.offsets or (0.0,) * f.count)[source_band - 1]
    if (scale, offset) != (1.0, 0.0):  # the file's own, kept for open_scene (as a single file's are)
        nodata_xml += f"<Offset>{_number(offset)}</Offset><Scale>{_number(scale)}</Scale>"
    source_nodata = f"<NODATA>{_number(nodata)}</NODATA>" if resample and nodata is not None else ""
    # NOTE: SourceProperties lets GDAL open the source only when a window first needs it.
    return (
        f'<VRTRasterBand dataType="{gdal_type}" band="{index}">'
        f"<Description>{escape(description)}</Description>{nodata_xml}"
        f"<{tag}{attrs}>"
        f'<SourceFilename relativeToVRT="0">{escape(f.path)}</SourceFilename>'
        f"<SourceBand>{source_band}</SourceBand>"
        f'<SourceProperties RasterXSize="{f.width}" RasterYSize="{f.height}" DataType="{gdal_type}" '
        f'BlockXSize="{f.block_shape[1]}" BlockYSize="{f.block_shape[0]}"/>'
        f'<SrcRect xOff="0" yOff="0" xSize="{f.width}" ySize="{f.height}"/>'
        f'<DstRect xOff="0" yOff="0" xSize="{ref.width}" ySize="{ref.height}"/>'
        f"{source_nodata}</{tag}></VRTRasterBand>"
    )


# --- STAC Items ------------------------------------------------------------------------------------


def _resolve_stac_item(
    location: str,
    metadata: ModelMetadata,
    resample: Resampling | None,
    assets: Mapping[str, str] | Sequence[str] | None,
) -> ResolvedSource:
    name = display_name(location)
    item = _read_item(location, name)
    item_assets = item["assets"]
    keys = _choose_assets(name, item_assets, metadata, assets)
    hrefs = [_resolve_href(location, item_assets[k]["href"]) for k in keys]
    rasters = [_raster_band(item_assets[k]) for k in keys]
    scales = [r.get("scale", r.get("raster:scale")) for r in rasters]
    offsets = [r.get("offset", r.get("raster:offset")) for r in rasters]
    nodata = [r.get("nodata", item_assets[k].get("nodata")) for r, k in zip(rasters, keys)]
    log.info("%s: assets %s for bands %s", name, ", ".join(keys), ", ".join(metadata.band_names))
    stacked = stack_bands(
        hrefs,
        metadata,
        resample,
        labels=[f"{name} asset {k} ({display_name(h)})" for k, h in zip(keys, hrefs)],
        nodata=[_float_or_none(v) for v in nodata],
        name=name,
    )
    declared = any(s is not None or o is not None for s, o in zip(scales, offsets))
    return replace(
        stacked,
        files=(location, *hrefs),
        tag=f"{_basename(name)}:{','.join(keys)}",
        scale=tuple(float(1.0 if s is None else s) for s in scales) if declared else None,
        offset=tuple(float(0.0 if o is None else o) for o in offsets) if declared else None,
    )


def _read_item(location: str, name: str) -> dict[str, Any]:
    if location.startswith(("https://", "http://")):
        text = _fetch(location, name)
    elif "://" in location or location.startswith("/vsi"):
        raise InputError(
            f"{name}: a STAC Item is read from a local file or an http(s) URL; "
            "download it, or use its https URL"
        )
    else:
        try:
            text = Path(location).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{name}: file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{name}: cannot read the STAC Item ({err})") from err
    try:
        item = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{name}: not valid JSON ({err})") from err
    assets = item.get("assets") if isinstance(item, dict) else None
    if not isinstance(item, dict) or item.get("type") != "Feature" or not isinstance(assets, dict):
        kind = item.get("type") if isinstance(item, dict) else type(item).__name__
        raise InputError(f"{name}: not a STAC Item (expected a Feature with assets, got {kind!r})")
    return item


def _fetch(url: str, name: str) -> str:
    """GET a small JSON document, trying again on 5xx, 429 and connection errors."""
    for attempt in range(1, _FETCH_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read().decode("utf-8")
        except urllib.error.HTTPError as err:
            if err.code < 500 and err.code != 429 or attempt == _FETCH_ATTEMPTS:
                reason = f"HTTP {err.code} {err.reason}"
                raise InputError(f"{name}: cannot fetch the STAC Item ({reason})") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if attempt == _FETCH_ATTEMPTS:
                reason = getattr(err, "reason", err)
                raise InputError(f"{name}: cannot fetch the STAC Item ({reason})") from err
        except UnicodeDecodeError as err:
            raise InputError(f"{name}: the STAC Item is not UTF-8 text") from err
        log.warning("%s: fetching the STAC Item failed; trying again (attempt %d of %d)",
                    name, attempt + 1, _FETCH_ATTEMPTS)
        time.sleep(0.5 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _asset_bands(asset: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    bands = asset.get("eo:bands") or asset.get("bands") or []
    return [b for b in bands if isinstance(b, Mapping)]


def _common_name(band: Mapping[str, Any]) -> str | None:
    value = band.get("common_name", band.get("eo:common_name"))
    return value.lower() if isinstance(value, str) else None


def _raster_band(asset: Mapping[str, Any]) -> Mapping[str, Any]:
    bands = asset.get("raster:bands") or asset.get("bands") or [{}]
    return bands[0] if isinstance(bands[0], Mapping) else {}


def _choose_assets(
    name: str,
    item_assets: Mapping[str, Any],
    metadata: ModelMetadata,
    chosen: Mapping[str, str] | Sequence[str] | None,
) -> list[str]:
    band_names = metadata.band_names
    if chosen:
        if isinstance(chosen, Mapping):
            chosen = {k.lower(): v for k, v in chosen.items()}
            unknown = sorted(set(chosen) - {b.lower() for b in band_names})
            if unknown:
                raise ConfigError(
                    f"--assets names {', '.join(unknown)}, not a band of the model ({', '.join(band_names)})"
                )
            missing = [b for b in band_names if b.lower() not in chosen]
            if missing:
                raise ConfigError(f"--assets gives no asset for model band(s) {', '.join(missing)}")
            keys = [chosen[b.lower()] for b in band_names]
        else:
            keys = list(chosen)
            if len(keys) != len(band_names):
                raise ConfigError(
                    f"--assets lists {len(keys)} asset(s) but the model needs {len(band_names)} "
                    f"({', '.join(band_names)})"
                )
        absent = [k for k in keys if k not in item_assets]
        if absent:
            raise InputError(f"{name}: no asset {absent[0]!r}; the item has {', '.join(sorted(item_assets))}")
        return keys

    by_common: dict[str, list[str]] = {}
    for key, asset in item_assets.items():
        bands = _asset_bands(asset) if isinstance(asset, Mapping) else []
        if len(bands) == 1 and _common_name(bands[0]) and "href" in asset:
            by_common.setdefault(_common_name(bands[0]) or "", []).append(key)
    keys = []
    for band in band_names:
        wanted = band.lower()
        candidates = by_common.get(wanted, [])
        for fallback in COMMON_NAME_FALLBACKS.get(wanted, ()):
            if candidates:
                break
            candidates = by_common.get(fallback, [])
        if not candidates:
            available = ", ".join(f"{c} ({'/'.join(ks)})" for c, ks in sorted(by_common.items())) or "none"
            raise InputError(
                f"{name}: no single-band asset with eo:bands common name {wanted!r} for model band {band!r} "
                f"(model bands: {', '.join(band_names)}; the item's common names: {available}); "
                "choose assets with --assets red=KEY,green=KEY,..."
            )
        keys.append(_best_asset(name, wanted, candidates, item_assets))
    return keys


def _best_asset(name: str, common: str, keys: list[str], item_assets: Mapping[str, Any]) -> str:
    def rank(key: str) -> int:
        media = str(item_assets[key].get("type", "")).lower()
        return next((i for i, m in enumerate(_MEDIA_RANK) if m in media), len(_MEDIA_RANK))

    best = min(rank(k) for k in keys)
    top = [k for k in keys if rank(k) == best]
    if len(top) > 1:
        raise InputError(
            f"{name}: assets {', '.join(top)} all have common name {common!r}; "
            f"choose one with --assets {common}=KEY"
        )
    return top[0]


def _resolve_href(location: str, href: str) -> str:
    """An asset href as a path or URI: relative hrefs are relative to the item's location."""
    if href.startswith("file://"):
        return unquote(urlsplit(href).path)  # a file URI's path is percent-encoded (%20 for a space)
    if "://" in href:
        return href
    if "://" in location:
        return urljoin(location, href)
    if Path(href).is_absolute():
        return href
    return str((Path(location).parent / href).resolve())


# --- small helpers ---------------------------------------------------------------------------------


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # e.g. a name too long for the file system: a list, not a file
        return False


def _basename(name: str) -> str:
    return os.path.basename(urlsplit(name).path if "://" in name else name) or name


def _unit(crs: Any) -> str:
    if crs is None:
        return " px"
    if crs.is_geographic:
        return " degree"
    units = crs.linear_units or ""
    return " m" if units.lower() in ("metre", "meter", "m") else (f" {units}" if units else "")


def _close(a: Sequence[float], b: Sequence[float], tol: float | None = None) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=tol or 0.0) for x, y in zip(a, b))


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else repr(float(value))


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _first_line(err: BaseException) -> str:
    while "previous exception" in str(err) and err.__cause__ is not None:
        err = err.__cause__
    return plain_message((str(err).strip() or type(err).__name__).splitlines()[0])
