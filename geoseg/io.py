"""Raster input and output: open and check a scene, read tiles with their validity mask, write labels.

Reading and writing go through rasterio windows, never whole scenes. Each open dataset handle
belongs to one thread (rasterio handles are not thread-safe), so a :class:`SceneReader` and a
:class:`LabelWriter` each open their own.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.windows import Window

from . import _remote
from .cog import CogOptions, convert_to_cog, remove_cog_leftovers
from .errors import GeoreferenceWarning, InputError, OutputError
from .modelfile import ClassSpec, ModelMetadata
from .stream import RowBlock

log = logging.getLogger(__name__)

SUPPORTED_KINDS = "ui" + "f"  # unsigned, signed integers and floats; complex is refused
TMP_MARKER = ".geoseg-tmp"
GEOTIFF_SUFFIXES = (".tif", ".tiff", ".gtif", ".gtiff")


@dataclass(frozen=True)
class Scene:
    """What geoseg knows about an input scene after checking it (no open handle)."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: Any
    transform: Affine
    band_indexes: tuple[int, ...]
    nodata: float | None  # the first selected band's nodata value (see band_nodata)
    mask_mode: str  # "none", "nodata" (value per band), "dataset" (internal mask or alpha) or "alpha"
    band_source: str  # how band_indexes were chosen, for the log
    alpha_band: int | None = None  # the band labelled alpha, read as the mask in "alpha" mode
    name: str | None = None  # the source as the user named it, when ``path`` is not that (VRT text)
    block_shape: tuple[int, int] = (256, 256)  # (rows, cols) of the first model band's blocks
    # Ground control points (and their CRS) of a scene georeferenced by them, and rational polynomial
    # coefficients: copied to the raster outputs. Such a scene has no CRS or transform of its own, so
    # areas, polygons and footprints are in pixel units, as for a scene with no georeferencing.
    gcps: tuple[Any, ...] = ()
    gcp_crs: Any = None
    # Per selected band, the value that marks it nodata (a band stack's files may differ); a band
    # that declares none takes the first declared value. Empty: no nodata value.
    band_nodata: tuple[float, ...] = ()
    # Per selected band, GDAL's Scale and Offset (physical value = stored * scale + offset), when a
    # band declares other than 1 and 0; else None.
    scales: tuple[float, ...] | None = None
    offsets: tuple[float, ...] | None = None
    rpcs: Any = None

    @property
    def label(self) -> str:
        """The scene as messages name it."""
        return self.name or _remote.describe(self.path)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.height, self.width


def _open(path: str) -> rasterio.io.DatasetReader:
    label = _remote.describe(path)
    is_vrt_text = path.lstrip().startswith("<")
    if "://" not in path and not path.startswith("/vsi") and not is_vrt_text and not Path(path).exists():
        raise InputError(f"{label}: file not found")
    try:
        return rasterio.open(path)
    except RasterioIOError as err:
        # NOTE: a remote open fails mostly on HTTP (403, 404, 503), rarely on the format
        what = "cannot open" if _remote.is_remote(path) else "not a raster GDAL can read"
        raise InputError(f"{label}: {what} ({_gdal_message(err)})") from err
    except RasterioError as err:
        raise InputError(f"{label}: cannot open ({_gdal_message(err)})") from err


def open_scene(
    path: str | os.PathLike[str],
    metadata: ModelMetadata,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    *,
    name: str | None = None,
) -> Scene:
    """Check a scene against a model before any inference.

    Args:
        path: Any path GDAL opens (a /vsi path, VRT XML text), or a URI rasterio opens.
        metadata: The model the scene will be fed to.
        bands: 1-based raster bands for the model's inputs, in model order; ``None`` matches
            band descriptions to the model's band names, then falls back to the model's defaults.
        nodata: A value that marks invalid pixels, overriding the file's own nodata value.
        name: The scene in messages (the user's SRC where ``path`` is VRT text or a /vsi path).

    Returns:
        The checked scene.

    Raises:
        InputError: Missing or unreadable file, too few bands, bands out of range,
            unsupported dtype. The message names the file.
    """
    path = os.fspath(path)
    name = name or _remote.describe(path)
    with _open(path) as src:
        dtypes = set(src.dtypes)
        kinds = {np.dtype(d).kind for d in dtypes}
        if not kinds <= set(SUPPORTED_KINDS):
            raise InputError(f"{name}: unsupported data type {', '.join(sorted(dtypes))} (need integer or float bands)")
        band_indexes, band_source = _choose_bands(name, src, metadata, bands)
        mask_mode, file_nodata = _mask_mode(src, band_indexes)
        band_nodata: tuple[float, ...] = ()
        if file_nodata is not None:
            declared = [src.nodatavals[i - 1] for i in band_indexes]
            band_nodata = tuple(file_nodata if v is None else float(v) for v in declared)
        if nodata is not None:  # replaces the file's nodata value; a mask or alpha band still counts
            file_nodata = float(nodata)
            band_nodata = (file_nodata,) * len(band_indexes)
            mask_mode = "nodata" if mask_mode == "none" else mask_mode
        gcps, gcp_crs = src.gcps
        if src.crs is None and (gcps or src.rpcs is not None):
            what = f"{len(gcps)} ground control points" if gcps else "rational polynomial coefficients (RPCs)"
            log.info("%s: georeferenced by %s, not a transform; the rasters written carry them, but "
                     "areas and polygons are in pixel units", name, what)
        elif src.crs is None:
            warnings.warn(
                f"{name}: no CRS; predicting in pixel space and writing the output without a CRS",
                GeoreferenceWarning,
                stacklevel=2,
            )
        elif not src.transform.is_rectilinear:
            log.info("%s: rotated transform; the output copies it unchanged", name)
        return Scene(
            path=path,
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=np.result_type(*[src.dtypes[i - 1] for i in band_indexes]).name,
            crs=src.crs,
            transform=src.transform,
            band_indexes=band_indexes,
            nodata=file_nodata,
            mask_mode=mask_mode,
            band_source=band_source,
            alpha_band=_alpha_band(src) if mask_mode == "alpha" else None,
            name=name,
            block_shape=tuple(src.block_shapes[band_indexes[0] - 1]),
            gcps=tuple(gcps),
            gcp_crs=gcp_crs if gcps else None,
            rpcs=src.rpcs,
            band_nodata=band_nodata,
            **_band_scaling(src, band_indexes),
        )


def _choose_bands(
    path: str, src: rasterio.io.DatasetReader, metadata: ModelMetadata, bands: Sequence[int] | None
) -> tuple[tuple[int, ...], str]:
    names = metadata.band_names
    alphas = {i for i, interp in enumerate(src.colorinterp, start=1) if interp == ColorInterp.alpha}
    if bands is not None:
        bands = tuple(bands)
        if len(bands) != len(names):
            raise InputError(f"{path}: --bands lists {len(bands)} bands but the model needs {len(names)} ({', '.join(names)})")
        out_of_range = [b for b in bands if not 1 <= b <= src.count]
        if out_of_range:
            raise InputError(f"{path}: band {out_of_range[0]} is out of range (the file has {src.count} bands)")
        for band, name in zip(bands, names, strict=True):
            if band in alphas:
                log.warning("%s: band %d, given for %s, is an alpha band (a mask, not data)",
                            path, band, name)
        return bands, "--bands"
    described = _described_bands(src.descriptions, names, alphas)
    if described is not None:
        return described, "band descriptions"
    defaults = tuple(b.source_band for b in metadata.bands)
    data_bands = src.count - len(alphas)
    if src.count < max(defaults) or alphas & set(defaults):
        has = f"{src.count} band(s)"
        hint = ""
        if alphas:
            listed = ", ".join(map(str, sorted(alphas)))
            has = f"{data_bands} data band(s) and an alpha band (band {listed}, a mask)"
            hint = f" (if band {listed} holds data, name it there)"
        raise InputError(
            f"{path}: the file has {has} but the model needs {len(names)} "
            f"({', '.join(names)} from bands {', '.join(map(str, defaults))}); pick them with --bands{hint}"
        )
    named = {b: n for b, n in _bands_naming(src.descriptions, names).items() if b not in alphas}
    if any(band not in defaults or names[defaults.index(band)] != name for band, name in named.items()):
        log.warning(
            "%s: the band descriptions (%s) do not match the model's bands (%s) one for one; using its "
            "default bands %s: pass --bands to choose",
            path, ", ".join(repr(d or "") for d in src.descriptions), ", ".join(names),
            ",".join(map(str, defaults)),
        )
    return defaults, "model defaults"


def _described_bands(
    descriptions: Sequence[str | None], names: Sequence[str], skip: set[int]
) -> tuple[int, ...] | None:
    """The bands whose descriptions name the model's bands, in model order (``None``: not each once).

    A description names a band when it is the name (``nir``, ``NIR``), or starts with it as a word
    (``red (OLI B4)``, ``Red band``; not ``Red Edge 1``); ``nir`` also answers to ``near infrared``.
    Where a name is a whole description, that band wins over ones that only start with it.
    """
    chosen = []
    for name in names:
        exact = [b for b, d in enumerate(descriptions, 1) if b not in skip and _norm(d) == name.lower()]
        loose = [b for b, d in enumerate(descriptions, 1) if b not in skip and _names_band(d, name)]
        candidates = exact or loose
        if len(candidates) != 1:
            return None
        chosen.append(candidates[0])
    return tuple(chosen) if len(set(chosen)) == len(chosen) else None


def _bands_naming(descriptions: Sequence[str | None], names: Sequence[str]) -> dict[int, str]:
    """Band number -> the model band name its description names (see :func:`_described_bands`)."""
    return {b: n for b, d in enumerate(descriptions, 1) for n in names if _names_band(d, n)}


_NAME_SYNONYMS = {"nir": ("near infrared", "near-infrared")}


def _norm(description: str | None) -> str:
    return " ".join((description or "").lower().split())


def _names_band(description: str | None, name: str) -> bool:
    text, name = _norm(description), name.lower()
    for word in (name, *_NAME_SYNONYMS.get(name, ())):
        rest = text[len(word):] if text.startswith(word) else None
        if rest is None or (rest and rest[0].isalnum()):
            continue  # does not start with the word
        if not rest.lstrip(" -_").startswith("edge"):  # "red edge" is another band
            return True
    return False


def _band_scaling(src: rasterio.io.DatasetReader, band_indexes: Sequence[int]) -> dict[str, Any]:
    scales = tuple(float(src.scales[i - 1]) for i in band_indexes)
    offsets = tuple(float(src.offsets[i - 1]) for i in band_indexes)
    if all(s == 1.0 for s in scales) and all(o == 0.0 for o in offsets):
        return {}
    return {"scales": scales, "offsets": offsets}


def _mask_mode(src: rasterio.io.DatasetReader, band_indexes: Sequence[int]) -> tuple[str, float | None]:
    flags = [src.mask_flag_enums[i - 1] for i in band_indexes]
    alpha = _alpha_band(src)
    alpha_is_data = alpha in band_indexes  # --bands named it: it holds data, not a mask
    if any(MaskFlags.per_dataset in f and not (MaskFlags.alpha in f and alpha_is_data) for f in flags):
        return "dataset", None
    if alpha not in (None, *band_indexes):
        return "alpha", None  # e.g. R, G, B, NIR + alpha, which GDAL's own mask ignores
    nodatavals = [src.nodatavals[i - 1] for i in band_indexes]
    if any(v is not None for v in nodatavals):
        return "nodata", next(v for v in nodatavals if v is not None)
    return "none", None


def _alpha_band(src: rasterio.io.DatasetReader) -> int | None:
    """The last band labelled alpha, if any (GDAL masks with it only for gray+alpha and RGBA)."""
    alphas = [i for i, interp in enumerate(src.colorinterp, start=1) if interp == ColorInterp.alpha]
    return alphas[-1] if alphas else None


class SceneReader:
    """Reads model-ready tiles from one scene; one instance per thread.

    Tiles come back normalised for the model (float32), padded by reflection when the scene
    is smaller than a tile, with invalid pixels set to 0 (the normalised mean) and a validity
    mask (:func:`valid_pixels`): a pixel is nodata where the internal mask or alpha band says so,
    where every selected band equals the nodata value, or where any band is NaN.
    """

    def __init__(
        self,
        scene: Scene,
        multiplier: Sequence[float],
        bias: Sequence[float],
        stop: threading.Event | None = None,
    ):
        """Open the scene.

        Args:
            scene: The checked scene.
            multiplier: Per band, the normalisation ``x * multiplier + bias``.
            bias: See ``multiplier``.
            stop: Set when the run stops: a remote read being tried again gives up at once.
        """
        self.scene = scene
        self._remote = _remote.is_remote(scene.path)
        self._stop = stop or threading.Event()
        # A remote scene is opened by the first read, which tries again as reads do.
        self._src: rasterio.io.DatasetReader | None = None if self._remote else _open(scene.path)
        self._read_env: rasterio.Env | None = None  # READ_GDAL_OPTIONS, entered by the first remote read
        self._mul = np.asarray(multiplier, np.float32)[:, None, None]
        self._bias = np.asarray(bias, np.float32)[:, None, None]

    def close(self) -> None:
        """Close the dataset handle (in the thread that read)."""
        if self._src is not None:
            self._src.close()
        if self._read_env is not None:
            self._read_env.__exit__(None, None, None)
            self._read_env = None

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_tile(
        self, y: int, x: int, size_px: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], int, int]:
        """Read the ``size_px`` square tile whose top-left pixel is (``y``, ``x``).

        A remote scene's read that fails in a way that looks transient (see
        :func:`geoseg._remote.looks_transient`) is tried again, up to ``READ_ATTEMPTS`` times in
        all with doubling waits (:data:`geoseg._remote.READ_BACKOFF_S`), on a reopened dataset
        whose fetched bytes GDAL has forgotten. GDAL does not retry the requests of these reads
        itself (:data:`geoseg._remote.READ_GDAL_OPTIONS`). A reopen that meets a lasting HTTP
        status (404, 403) ends the tries at once, and no try starts ``READ_GIVE_UP_S`` after the
        first began (a stalled transfer fails only at GDAL's low-speed timeout).

        Returns:
            ``(pixels (C, size, size) float32, valid (size, size) bool, h, w)``, where ``h, w``
            is the part inside the scene (the rest is reflection padding, marked invalid).

        Raises:
            InputError: GDAL failed to read the window (truncated or corrupt file, or a remote
                read that kept failing). The message names the scene and gives GDAL's message.
            RuntimeError: ``stop`` was set while a remote read was being tried again.
        """
        scene = self.scene
        h = min(size_px, scene.height - y)
        w = min(size_px, scene.width - x)
        window = Window(x, y, w, h)
        if not self._remote:
            try:
                assert self._src is not None
                raw = self._src.read(scene.band_indexes, window=window)
                valid = self._valid_mask(raw, window)
            except RasterioError as err:
                raise InputError(f"{scene.label}: read failed at rows {y}-{y + h}, cols {x}-{x + w} "
                                 f"({_gdal_message(err)})") from err
        else:
            raw, valid = self._read_remote(window)
        pixels = raw.astype(np.float32)
        pixels *= self._mul
        pixels += self._bias
        pixels[:, ~valid] = 0.0
        if h < size_px or w < size_px:
            pad = ((0, 0), (0, size_px - h), (0, size_px - w))
            pixels = np.pad(pixels, pad, mode="reflect" if min(h, w) > 1 else "edge")
            valid = np.pad(valid, pad[1:], mode="constant", constant_values=False)
        return pixels, valid, h, w

    def _read_remote(self, window: Window) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
        """Read a window of a remote scene, trying again as :meth:`read_tile` says."""
        scene = self.scene
        attempts = _remote.READ_ATTEMPTS
        if self._read_env is None:  # once for the reader's life: a rasterio.Env per tile costs log lines
            self._read_env = rasterio.Env(**{k: v for k, v in _remote.READ_GDAL_OPTIONS.items()
                                             if k not in os.environ})
            self._read_env.__enter__()
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            if self._stop.is_set():
                raise RuntimeError("pipeline stopped")
            with _remote.http_messages() as http:
                reopening = self._src is None
                try:
                    if self._src is None:
                        self._src = rasterio.open(scene.path)
                        reopening = False
                    raw = self._src.read(scene.band_indexes, window=window)
                    return raw, self._valid_mask(raw, window)
                except RasterioError as err:
                    message = "; ".join([*dict.fromkeys(_remote.redact(m) for m in http), _gdal_message(err)])
                    if reopening and attempt > 1:  # it opened before: only a lasting HTTP status is final
                        message = f"reopening: {message}"
                        transient = not _remote.looks_lasting(message)
                    else:
                        cause = _remote.error_text(err)
                        if not http and _remote.looks_short(cause):  # GDAL does not say why: say what
                            message = f"fewer bytes arrived than asked for: {message}"
                        transient = _remote.looks_transient(f"{message} {cause}")
                    delay = _remote.READ_BACKOFF_S * 2 ** (attempt - 1)
                    late = time.monotonic() - started + delay > _remote.READ_GIVE_UP_S
                    if attempt == attempts or not transient or late:
                        seconds = time.monotonic() - started
                        tries = f" after {attempt} attempts in {seconds:.0f} s" if attempt > 1 else ""
                        where = f"rows {window.row_off}-{window.row_off + window.height}, " \
                                f"cols {window.col_off}-{window.col_off + window.width}"
                        raise InputError(f"{scene.label}: read failed at {where}{tries} ({message})") from err
            log.warning("%s: read failed (%s); trying again in %g s (attempt %d of %d)",
                        scene.label, message, delay, attempt + 1, attempts)
            if self._src is not None:
                self._src.close()
                self._src = None
            _remote.forget_fetched_bytes(scene.path)  # else the retry meets the same cut-short bytes
            if self._stop.wait(delay):
                raise RuntimeError("pipeline stopped")
        raise AssertionError("unreachable")

    def _valid_mask(self, raw: npt.NDArray[Any], window: Window) -> npt.NDArray[np.bool_]:
        return valid_pixels(self.scene, self._src, raw, window=window)


def valid_pixels(
    scene: Scene, src: rasterio.io.DatasetReader, raw: npt.NDArray[Any], **read: Any
) -> npt.NDArray[np.bool_]:
    """Which pixels of ``raw`` are valid.

    ``raw`` holds the scene's bands read from ``src`` with ``read`` (a ``window`` or an
    ``out_shape``). Valid: where the internal mask or alpha band says so, not where every band
    equals the nodata value, and not where any band is NaN (the network cannot take a NaN).
    """
    if scene.mask_mode == "dataset":
        valid = src.read_masks(scene.band_indexes[0], **read) > 0
    elif scene.mask_mode == "alpha":
        valid = src.read(scene.alpha_band, **read) > 0
    else:
        valid = np.ones(raw.shape[1:], bool)
    values = [v for v in scene.band_nodata if not np.isnan(v)]
    if len(values) == len(scene.band_nodata) == raw.shape[0] and values:  # NaN: the check below
        # each band against its own value (a band stack's files may differ)
        nodata = np.array([_as_pixel_value(v, raw.dtype) for v in values]).reshape(-1, 1, 1)
        valid &= ~np.all(raw == nodata, axis=0)
    if raw.dtype.kind == "f":
        valid &= ~np.any(np.isnan(raw), axis=0)
    return valid


def _as_pixel_value(value: float, dtype: np.dtype[Any]) -> Any:
    """``value`` as stored in pixels of ``dtype``: the float32 rounding of a float64 nodata,
    or ``value`` itself where no integer pixel can equal it (fractional or out of range)."""
    if dtype.kind == "f":
        return np.asarray(value).astype(dtype)
    info = np.iinfo(dtype)
    return dtype.type(value) if float(value).is_integer() and info.min <= value <= info.max else value


def output_dtype(classes: Sequence[ClassSpec], output_nodata: int) -> str:
    """uint8 when every class id and the nodata value fit, else uint16."""
    return "uint8" if max(max(c.id for c in classes), output_nodata) <= 255 else "uint16"


def check_destination(src: str, dst: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a destination that cannot or must not be written.

    Raises:
        OutputError: DST equals SRC, its folder is missing, or it exists without ``overwrite``.
    """
    dst_path = Path(dst)
    if "://" not in src and Path(src).exists() and dst_path.exists() and os.path.samefile(src, dst_path):
        raise OutputError(f"{dst}: destination is the input scene; choose another file")
    if os.path.abspath(src) == os.path.abspath(dst_path):
        raise OutputError(f"{dst}: destination is the input scene; choose another file")
    check_writable(dst_path, overwrite)
    return dst_path


def check_writable(dst: Path, overwrite: bool) -> None:
    """Refuse a file destination in a missing folder, a folder, or an existing file without ``overwrite``.

    Raises:
        OutputError: Naming ``dst`` and the problem.
    """
    if not dst.parent.is_dir():
        raise OutputError(f"{dst}: folder {dst.parent} does not exist")
    if dst.is_dir():
        raise OutputError(f"{dst}: is a folder; give a file name")
    if dst.exists() and not overwrite:
        raise OutputError(f"{dst}: already exists (use --overwrite to replace it)")


def temporary_path(dst: Path, suffix: str = "") -> Path:
    """A hidden name beside ``dst`` for writing it (this process's id keeps parallel runs apart)."""
    return dst.with_name(f".{dst.name}{TMP_MARKER}{os.getpid()}{suffix}")


class TiledRasterWriter:
    """Writes a tiled GeoTIFF row block by row block under a temporary name, then renames it.

    Rows arrive in scene order and are buffered until whole output blocks are complete, so each
    compressed block is written once; with ``masked``, a validity mask is written beside them as
    GDAL's internal per-dataset mask. With ``cog``, :meth:`prepare` rewrites the finished file as a
    Cloud-Optimized GeoTIFF (:mod:`geoseg.cog`). Until :meth:`commit`, nothing exists under the
    final name; :meth:`abort` (or an exception inside the ``with`` block) removes the temporary
    files. Subclasses set colour tables and tags on ``self._dst`` and may give a PAM sidecar
    (:meth:`sidecar_text`).
    """

    BLOCK_PX = 256
    needs_probabilities = False  # a RowSink (geoseg.stream) that only needs the classes

    def __init__(
        self,
        dst: Path,
        profile: dict[str, Any],
        *,
        masked: bool = False,
        cog: CogOptions | None = None,
        overwrite: bool = False,
    ):
        """Create the temporary file.

        Args:
            dst: The final path.
            profile: rasterio profile: at least width, height, count, dtype, crs, transform;
                tiling, block size and BigTIFF are set here.
            masked: Write the validity given to :meth:`write_rows` as an internal mask.
            cog: Rewrite the finished file as a COG with these options.
            overwrite: Replace whatever is at ``dst`` on commit; without it, a ``dst`` that appears
                meanwhile (another job's) is left alone and the commit refused (see :func:`publish`).

        Raises:
            OutputError: The temporary file cannot be created.
        """
        self.dst = Path(dst)
        self._replaces = overwrite
        self.tmp = temporary_path(self.dst)
        self.height = int(profile["height"])
        self.masked = masked
        self.cog = cog
        self._cog_tmp = temporary_path(self.dst, ".cog")
        self._next_row = 0  # next row expected from the caller
        self._pending_row = 0  # first row not yet written to the file
        self._pending: list[tuple[npt.NDArray[Any], npt.NDArray[np.bool_] | None]] = []
        self._finished: Path | None = None  # the complete file under its temporary name, once prepared
        profile = {
            "driver": "GTiff",
            **profile,
            "tiled": True,
            "blockxsize": self.BLOCK_PX,
            "blockysize": self.BLOCK_PX,
            "BIGTIFF": "IF_SAFER",
        }
        if cog is not None:
            profile = {k: v for k, v in profile.items() if k.lower() != "compress"} | cog.intermediate_profile()
        try:
            self._dst = rasterio.open(self.tmp, "w", **profile)
        except RasterioError as err:
            raise OutputError(f"{dst}: cannot create ({_gdal_message(err)})") from err

    def write_rows(
        self, row: int, data: npt.NDArray[Any], valid: npt.NDArray[np.bool_] | None = None
    ) -> None:
        """Write ``data`` at scene row ``row``; rows must arrive in order.

        Args:
            row: First scene row of the block.
            data: ``(rows, width)`` for one band or ``(bands, rows, width)``, in any dtype that
                converts to the file's.
            valid: ``(rows, width)`` validity; required when the writer is ``masked``.
        """
        if row != self._next_row:
            raise AssertionError(f"rows must arrive in order: expected row {self._next_row}, got {row}")
        if data.ndim == 2:
            data = data[None]
        if self.masked and valid is None:
            raise AssertionError("a masked writer needs the validity of every row")
        self._pending.append((data.astype(self._dst.dtypes[0], copy=False), valid if self.masked else None))
        self._next_row += data.shape[1]
        pending_rows = self._next_row - self._pending_row
        ready = pending_rows if self._next_row >= self.height else pending_rows - pending_rows % self.BLOCK_PX
        if ready:
            if len(self._pending) > 1:
                block = np.concatenate([d for d, _ in self._pending], axis=1)
                mask = np.concatenate([m for _, m in self._pending]) if self.masked else None
            else:
                block, mask = self._pending[0]
            window = Window(0, self._pending_row, block.shape[2], ready)
            with self._writing():
                self._dst.write(block[:, :ready], window=window)
                if mask is not None:
                    self._dst.write_mask(mask[:ready], window=window)
            left = block.shape[1] - ready
            self._pending = [(block[:, ready:], None if mask is None else mask[ready:])] if left else []
            self._pending_row += ready

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """GDAL's write failures as one line naming the destination and, where it is so, a full disk."""
        try:
            yield
        except RasterioError as err:
            raise OutputError(f"{self.dst}: write failed ({_write_failure(err, self.tmp.parent)})") from err

    def sidecar_text(self) -> str | None:
        """Text of the ``.aux.xml`` sidecar that goes with the file (``None``: no sidecar)."""
        return None

    def prepare(self) -> None:
        """Finish the file under its temporary name: close it and, for a COG, convert it.

        The slow and failure-prone part of committing, so that several outputs can all be
        prepared before any of them is renamed. Calling it again does nothing.
        """
        if self._finished is not None:
            return
        if self._next_row != self.height:
            raise AssertionError(f"only {self._next_row} of {self.height} rows were written")
        with self._writing():
            self._dst.close()
        if self.cog is None:
            self._finished = self.tmp
            return
        convert_to_cog(self.tmp, self._cog_tmp, self.cog, label=self.dst)
        self._remove(self.tmp)
        self._finished = self._cog_tmp

    def commit(self) -> None:
        """Prepare if not yet done, write the sidecar and move both to their final names."""
        self.prepare()
        assert self._finished is not None
        aux_tmp, aux_dst = Path(f"{self._finished}.aux.xml"), Path(f"{self.dst}.aux.xml")
        text = self.sidecar_text()
        if text is not None:
            try:
                aux_tmp.write_text(text)
            except OSError as err:
                aux_tmp.unlink(missing_ok=True)
                raise OutputError(f"{self.dst}: write failed ({(err.strerror or str(err)).lower()})") from err
        if not self._replaces:  # the raster first: it must not replace a file another job wrote meanwhile
            try:
                publish(self._finished, self.dst, replace=False)
            except OutputError:
                aux_tmp.unlink(missing_ok=True)
                raise
        # NOTE: else the sidecar lands first; the raster's rename is the moment the output exists.
        if aux_tmp.exists():
            os.replace(aux_tmp, aux_dst)
        else:
            aux_dst.unlink(missing_ok=True)  # an older file's sidecar would describe the wrong raster
        if self._replaces:
            publish(self._finished, self.dst, replace=True)

    def abort(self) -> None:
        """Close and remove the temporary files; the final name is never touched."""
        try:
            self._dst.close()
        finally:
            self._remove(self.tmp)
            remove_cog_leftovers(self._cog_tmp)

    @staticmethod
    def _remove(path: Path) -> None:
        for item in (path, Path(f"{path}.aux.xml")):
            item.unlink(missing_ok=True)

    def __enter__(self) -> TiledRasterWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


def publish(tmp: Path, dst: Path, *, replace: bool) -> None:
    """Give the finished file ``tmp`` its final name ``dst`` in one step.

    With ``replace``, whatever is at ``dst`` is replaced (``os.replace``). Without, a ``dst`` that
    exists by now (another job wrote it after the destination checks) is left alone and the
    output is refused: a hard link claims the name only if it is free. Where the file system
    has no hard links, ``dst`` is checked just before the rename instead.

    Raises:
        OutputError: Without ``replace``, ``dst`` exists.
    """
    if replace:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(_APPEARED.format(dst)) from err
    except OSError:  # no hard links here (FAT, some network shares)
        if dst.exists():
            tmp.unlink(missing_ok=True)
            raise OutputError(_APPEARED.format(dst)) from None
        os.replace(tmp, dst)
        return
    tmp.unlink()


_APPEARED = "{}: appeared while this run was writing it; left as it is (use --overwrite to replace it)"


def scene_profile(scene: Scene) -> dict[str, Any]:
    """The grid of a scene as a rasterio profile for an output.

    Size, CRS and transform, or the scene's ground control points (with their CRS) in place of a
    transform, and its RPCs.
    """
    profile: dict[str, Any] = {"width": scene.width, "height": scene.height, "crs": scene.crs}
    if scene.gcps:
        profile |= {"gcps": list(scene.gcps), "crs": scene.gcp_crs}
    elif scene.crs is not None or scene.transform != Affine.identity():
        profile["transform"] = scene.transform  # not for a scene without one: GDAL writes none
    if scene.rpcs is not None:
        profile["rpcs"] = scene.rpcs
    return profile


class LabelWriter(TiledRasterWriter):
    """Writes the class raster: class ids, a colour table, class names and provenance tags.

    With ``cog``, overviews are built with mode resampling, so each overview pixel is the most
    frequent class of the pixels it covers, never an average of class ids.
    """

    def __init__(
        self,
        dst: Path,
        scene: Scene,
        classes: Sequence[ClassSpec],
        output_nodata: int,
        compress: str,
        tags: dict[str, str],
        *,
        cog: bool = False,
        overwrite: bool = False,
    ):
        self.classes = tuple(classes)
        self.dtype = output_dtype(classes, output_nodata)
        profile = scene_profile(scene) | {"count": 1, "dtype": self.dtype, "nodata": output_nodata}
        if compress != "none":
            profile["compress"] = compress
        super().__init__(dst, profile, cog=CogOptions("mode", compress) if cog else None, overwrite=overwrite)
        self._dst.write_colormap(1, {c.id: c.rgba for c in self.classes} | {output_nodata: (0, 0, 0, 0)})
        self._dst.set_band_description(1, "land cover class")
        class_tags = {f"CLASS_{c.id}": c.name for c in self.classes}
        self._dst.update_tags(**tags, **class_tags)

    def write(self, block: RowBlock) -> None:
        """Write a finished row block (the :class:`geoseg.stream.RowSink` interface)."""
        self.write_rows(block.row, block.classes)

    def sidecar_text(self) -> str:
        """GDAL's category names and attribute table (:func:`pam_xml`)."""
        return pam_xml(self.classes)


def pam_xml(classes: Sequence[ClassSpec]) -> str:
    """GDAL PAM sidecar text with category names and a thematic raster attribute table.

    GeoTIFF cannot hold class names itself; GDAL (and so QGIS) reads them from
    ``<file>.aux.xml``: ``CategoryNames`` index the names by pixel value, and the RAT carries
    value, name and colour columns.
    """
    by_id = {c.id: c for c in classes}
    names = "".join(
        f"<Category>{escape(by_id[i].name) if i in by_id else ''}</Category>" for i in range(max(by_id) + 1)
    )
    # GDAL enums: GFT_Integer=0, GFT_String=2; GFU_Name=2, GFU_MinMax=5, GFU_Red..GFU_Alpha=6..9.
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8), ("Alpha", 0, 9)]
    defs = "".join(
        f'<FieldDefn index="{i}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>'
        for i, (n, t, u) in enumerate(fields)
    )
    rows = "".join(
        f'<Row index="{i}"><F>{c.id}</F><F>{escape(c.name)}</F>' + "".join(f"<F>{v}</F>" for v in c.rgba) + "</Row>"
        for i, c in enumerate(sorted(classes, key=lambda c: c.id))
    )
    return (
        '<PAMDataset><PAMRasterBand band="1">'
        f"<CategoryNames>{names}</CategoryNames>"
        f'<GDALRasterAttributeTable tableType="thematic">{defs}{rows}</GDALRasterAttributeTable>'
        "</PAMRasterBand></PAMDataset>\n"
    )


#: Free space below which a failed write is put down to a full disk.
FULL_DISK_BYTES = 1 << 20


def _write_failure(err: BaseException, folder: Path) -> str:
    # NOTE: libtiff reports ENOSPC as "Write error at scanline N"; the folder's free space says why.
    try:
        if shutil.disk_usage(folder).free < FULL_DISK_BYTES:
            return "no space left on device"
    except OSError:
        pass
    return _gdal_message(err)


def _gdal_message(err: BaseException) -> str:
    # rasterio's read errors say "See previous exception for details."; the cause says what failed.
    while "previous exception" in str(err) and err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip() or type(err).__name__
    return _remote.plain_message(text.splitlines()[0])
