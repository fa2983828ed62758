"""Dense-CRF refinement of the class map at scene scale: blocks with halos, streamed, in worker processes.

A network at 1/4 resolution draws soft borders; a fully connected CRF (Krähenbühl and Koltun,
2011, through pydensecrf) snaps them to the image's edges. Its unary is the blended softmax;
its pairwise terms are a Gaussian (spatial) kernel and a bilateral (spatial + spectral) kernel
over *all* the model's input bands, stretched to 0-255 per band from a sample of the scene.

pydensecrf cannot take a whole scene, so :class:`CrfStage` runs it on blocks with a halo as
the engine finishes rows, in a process pool, while inference goes on. Nodata pixels get a
uniform unary and sit far away in a validity feature of both kernels, so they neither change
nor pull their valid neighbours.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._lazy import lazy_import
from ._machine import usable_cores
from .errors import ConfigError, InputError
from .stream import RowBlock

log = logging.getLogger(__name__)

# A validity feature this far apart (in kernel widths) makes exp(-d^2 / 2) vanish (e^-5000) and
# puts valid and nodata pixels in separate permutohedral lattice cells: they never interact.
_VALIDITY_SEPARATION = 100.0
# Pixels read (decimated) to estimate the per-band stretch: enough for stable 2/98 % percentiles.
STRETCH_SAMPLE_PX = 1 << 20
_PROBABILITY_FLOOR = 1e-6  # -log(p) stays finite where the network is certain


@dataclass(frozen=True)
class CrfConfig:
    """Settings of the dense CRF; validated on construction.

    Defaults were chosen on the Zion validation rows 800-999 with the bundled model (README,
    "CRF refinement"); widths are in pixels (spatial) and stretched 0-255 units (spectral).

    Attributes:
        iterations: Mean-field iterations.
        gaussian_sxy: Width of the spatial smoothness kernel, pixels.
        gaussian_compat: Weight (Potts compatibility) of the spatial kernel.
        bilateral_sxy: Spatial width of the appearance kernel, pixels.
        bilateral_schan: Spectral width of the appearance kernel, in 0-255 stretched units per band.
        bilateral_compat: Weight (Potts compatibility) of the appearance kernel.
        block: Edge of the square blocks the CRF runs on, pixels.
        halo: Context around each block, pixels (run with the block, cropped afterwards).
        workers: Worker processes; ``None`` uses every core this process may run on.
        stretch_percentiles: Low and high percentiles of each band mapped to 0 and 255.
    """

    iterations: int = 1
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 1.0
    bilateral_sxy: float = 40.0
    bilateral_schan: float = 10.0
    bilateral_compat: float = 8.0
    block: int = 1024
    halo: int = 64
    workers: int | None = None
    stretch_percentiles: tuple[float, float] = (2.0, 98.0)

    def __post_init__(self) -> None:
        if not _is_int(self.iterations) or not 1 <= self.iterations <= 100:
            raise ConfigError(f"crf iterations must be an integer in 1..100, got {self.iterations!r}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_schan"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"crf {name} must be a positive number, got {value!r}")
        for name in ("gaussian_compat", "bilateral_compat"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigError(f"crf {name} must be a number >= 0, got {value!r}")
        if not _is_int(self.block) or self.block < 64:
            raise ConfigError(f"crf block must be an integer of at least 64 pixels, got {self.block!r}")
        if not _is_int(self.halo) or not 0 <= self.halo <= self.block:
            raise ConfigError(f"crf halo must be an integer in 0..block ({self.block}), got {self.halo!r}")
        if self.workers is not None and (not _is_int(self.workers) or self.workers < 1):
            raise ConfigError(
                f"crf workers must be a positive integer (or null for all cores), got {self.workers!r}"
            )
        low_high = self.stretch_percentiles
        if (
            not isinstance(low_high, tuple)
            or len(low_high) != 2
            or not all(_is_number(p) for p in low_high)
            or not 0 <= low_high[0] < low_high[1] <= 100
        ):
            raise ConfigError(
                f"crf stretch_percentiles must be [low, high] with 0 <= low < high <= 100, got {low_high!r}"
            )

    @property
    def worker_count(self) -> int:
        """``workers``, or the cores this process may run on."""
        return self.workers if self.workers is not None else usable_cores()

    def params(self) -> CrfParams:
        """The kernel parameters a worker needs."""
        return CrfParams(self.iterations, self.gaussian_sxy, self.gaussian_compat,
                         self.bilateral_sxy, self.bilateral_schan, self.bilateral_compat)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def crf_config_from_mapping(values: Any, source: str = "config") -> CrfConfig | None:
    """A YAML ``crf:`` value: ``true`` (defaults), ``false``/``null`` (off), a mapping.

    Raises:
        ConfigError: Not one of those, an unknown key, or an invalid value.
    """
    if values is None or values is False:
        return None
    if values is True:
        return CrfConfig()
    if isinstance(values, CrfConfig):
        return values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: crf must be true, false or a mapping of CRF settings, got {values!r}")
    known = {f.name for f in dataclasses.fields(CrfConfig)}
    settings: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            known_keys = ", ".join(sorted(known))
            raise ConfigError(f"{source}: unknown crf key {raw_key!r}; known keys: {known_keys}")
        if key == "stretch_percentiles" and isinstance(value, list):
            value = tuple(value)
        settings[key] = value
    try:
        return CrfConfig(**settings)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


@dataclass(frozen=True)
class CrfParams:
    """What :func:`refine_block` needs besides the pixels (small and picklable)."""

    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_schan: float
    bilateral_compat: float


def require_pydensecrf() -> None:
    """Fail early, with the install command, when pydensecrf is missing.

    Raises:
        DependencyNotFoundError: pydensecrf cannot be imported.
    """
    lazy_import("pydensecrf.densecrf", "crf", package="pydensecrf2")
    lazy_import("pydensecrf.utils", "crf", package="pydensecrf2")


def refine_block(
    probabilities: npt.NDArray[np.float32],
    features: npt.NDArray[np.uint8],
    valid: npt.NDArray[np.bool_],
    params: CrfParams,
    crop: tuple[int, int, int, int] | None = None,
) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Run the dense CRF on one block; returns the refined class *indexes* (model order).

    Runs in a worker process: numpy in, numpy out, nothing shared.

    Args:
        probabilities: ``(K, h, w)`` softmax probabilities (the unary is ``-log p``).
        features: ``(C, h, w)`` input bands stretched to 0-255 (any number of bands).
        valid: ``(h, w)``; nodata pixels get a uniform unary and never interact with valid ones.
        params: Kernel widths, compatibilities and iterations.
        crop: ``(top, left, height, width)`` of the part to return (the block without its halo);
            ``None`` returns the whole block.

    Returns:
        ``(height, width)`` indexes into the model's classes, uint8 (uint16 past 256 classes);
        arbitrary where not valid.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian

    num_classes, height, width = probabilities.shape
    n = height * width
    unary = -np.log(np.maximum(probabilities.reshape(num_classes, n), _PROBABILITY_FLOOR))
    unary[:, ~valid.reshape(n)] = math.log(num_classes)  # uniform: nodata has no opinion
    # What nodata pixels hold never matters: zeroed.
    spectral = np.moveaxis(np.where(valid, features, 0).astype(np.float32), 0, -1)
    schan = (params.bilateral_schan,) * features.shape[0]
    if valid.all():
        gaussian = create_pairwise_gaussian((params.gaussian_sxy,) * 2, (height, width))
        bilateral = create_pairwise_bilateral((params.bilateral_sxy,) * 2, schan, spectral, chdim=2)
    else:
        # NOTE: both kernels carry a validity channel (scaled far apart), so the "Gaussian" term is
        # built as a bilateral one on that channel alone. Only here: a lattice dimension costs time.
        validity = valid.astype(np.float32)[..., None]
        separation = (1.0 / _VALIDITY_SEPARATION,)
        gaussian = create_pairwise_bilateral((params.gaussian_sxy,) * 2, separation, validity, chdim=2)
        image = np.concatenate([spectral, validity], axis=-1)
        bilateral = create_pairwise_bilateral((params.bilateral_sxy,) * 2, schan + separation, image, chdim=2)

    crf = dcrf.DenseCRF(n, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    if params.gaussian_compat > 0:
        crf.addPairwiseEnergy(gaussian, compat=float(params.gaussian_compat))
    if params.bilateral_compat > 0:
        crf.addPairwiseEnergy(bilateral, compat=float(params.bilateral_compat))
    marginals = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    marginals = marginals.reshape(num_classes, height, width)
    if crop is not None:
        top, left, h, w = crop
        marginals = marginals[:, top:top + h, left:left + w]
    return marginals.argmax(axis=0).astype(np.uint8 if num_classes <= 256 else np.uint16)  # past 256: no wrap


def stretch_to_bytes(
    pixels: npt.NDArray[Any], low: npt.NDArray[np.float64], high: npt.NDArray[np.float64]
) -> npt.NDArray[np.uint8]:
    """Map each band of ``(C, h, w)`` pixels linearly from [low, high] to 0..255, clipped."""
    scale = 255.0 / np.maximum(high - low, 1e-12)
    out = pixels.astype(np.float32) - low[:, None, None].astype(np.float32)
    out *= scale[:, None, None].astype(np.float32)
    np.nan_to_num(out, copy=False, nan=0.0)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def scene_stretch(
    scene: Any, percentiles: tuple[float, float] = (2.0, 98.0), sample_px: int = STRETCH_SAMPLE_PX
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Robust per-band ``(low, high)`` of a :class:`geoseg.io.Scene` from a decimated read.

    At most about ``sample_px`` pixels per band are read (GDAL picks an overview where there is
    one), never the whole scene; nodata pixels are left out.
    """
    from .io import _open, valid_pixels

    factor = max(1.0, math.sqrt(scene.width * scene.height / sample_px))
    shape = (max(1, round(scene.height / factor)), max(1, round(scene.width / factor)))
    with _open(scene.path) as src:
        raw = src.read(scene.band_indexes, out_shape=(len(scene.band_indexes), *shape))
        valid = valid_pixels(scene, src, raw, out_shape=shape)
    if not valid.any():
        bands = len(scene.band_indexes)
        return np.zeros(bands), np.ones(bands)
    sample = raw[:, valid].astype(np.float64)
    low, high = np.percentile(sample, percentiles, axis=1)
    return low, np.maximum(high, low + 1e-6)


def _pool_context() -> multiprocessing.context.BaseContext:
    # NOTE: not fork: torch's OpenMP threads in the parent and fork do not mix (a forked child
    # can hang on a lock some other thread held). forkserver forks from a clean server process.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


@dataclass
class _Band:
    """One band of block rows handed to the workers, waiting to go out in scene order."""

    row: int
    classes: npt.NDArray[np.integer]
    valid: npt.NDArray[np.bool_]
    probabilities: npt.NDArray[np.float32] | None
    jobs: list[tuple[int, int, Future[npt.NDArray[np.unsignedinteger[Any]]]]]  # (col, width, refined indexes)


class CrfStage:
    """A :class:`geoseg.stream.RowStage` that refines the class map with a dense CRF, block by block.

    Rows are buffered until a band of ``block`` rows plus ``halo`` rows below it has arrived;
    the band's input pixels are read with this stage's own dataset handle and stretched to
    0-255; the band is cut into ``block``-wide column blocks, each with ``halo`` pixels of context
    on every side, and sent to a process pool; refined bands go out in scene order.

    Memory is O(width x (block + 2 x halo)) per band held, and at most ``max_bands`` bands are in
    flight (about two blocks per worker), so it does not grow with the scene's height.

    Out: ``classes`` are the CRF's (class ids; ``output_nodata`` where not valid, as before);
    ``probabilities`` pass through unchanged, the network's blended softmax (mean-field marginals
    are over-confident, not calibrated probabilities).
    """

    needs_probabilities = True

    def __init__(
        self,
        scene: Any,
        class_ids: npt.NDArray[np.integer],
        output_nodata: int,
        config: CrfConfig,
    ):
        """Check pydensecrf, sample the scene's band stretch and open a dataset handle.

        Raises:
            DependencyNotFoundError: pydensecrf is not installed.
            InputError: The scene cannot be opened.
        """
        require_pydensecrf()
        from .io import _open

        self.scene = scene
        self.config = config
        self.params = config.params()
        self.class_ids = np.asarray(class_ids)
        self.output_nodata = output_nodata
        self.workers = config.worker_count
        self.low, self.high = scene_stretch(scene, config.stretch_percentiles)
        blocks_per_band = -(-scene.width // config.block)
        self.max_bands = max(1, -(-2 * self.workers // blocks_per_band))
        self._src = _open(scene.path)
        self._pool: ProcessPoolExecutor | None = None
        self._held: list[RowBlock] = []  # consecutive rows, from the next band's halo on
        self._next_band = 0  # first row of the next band to submit
        self._bands: deque[_Band] = deque()

    # --- RowStage -------------------------------------------------------------------------
    def push(self, block: RowBlock) -> Iterator[RowBlock]:
        """Hold ``block``; submit every band it completes; yield the bands refined so far."""
        self._held.append(block)
        held_end = block.row + block.height
        while self._next_band < self.scene.height:
            band_end = min(self._next_band + self.config.block, self.scene.height)
            if min(band_end + self.config.halo, self.scene.height) > held_end:
                break
            self._submit_band(self._next_band, band_end)
            yield from self._ready(limit=self.max_bands)
        yield from self._ready(limit=self.max_bands)

    def finish(self) -> Iterator[RowBlock]:
        """Submit what is left and yield every band, in order."""
        while self._next_band < self.scene.height and self._held:
            self._submit_band(self._next_band, min(self._next_band + self.config.block, self.scene.height))
        yield from self._ready(limit=0)

    def close(self) -> None:
        """Stop the workers (pending blocks are cancelled) and close the dataset handle."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._bands.clear()
        self._held.clear()
        self._src.close()

    # --- internals ------------------------------------------------------------------------
    def _ready(self, limit: int) -> Iterator[RowBlock]:
        """Yield finished bands in order; wait for the oldest while more than ``limit`` are in flight."""
        while self._bands and (len(self._bands) > limit or all(f.done() for _, _, f in self._bands[0].jobs)):
            band = self._bands.popleft()
            yield self._refined(band)

    def _refined(self, band: _Band) -> RowBlock:
        classes = band.classes.copy()
        for col, width, future in band.jobs:
            try:
                indexes = future.result()
            except BrokenProcessPool as err:
                raise ConfigError(
                    f"{self.scene.label}: a CRF worker process died at row {band.row}"
                    " (out of memory?); try a smaller crf block or fewer crf workers"
                ) from err
            core = classes[:, col:col + width]
            np.copyto(core, self.class_ids[indexes], where=band.valid[:, col:col + width])
        return RowBlock(band.row, classes, band.valid, band.probabilities)

    def _rows(self, start: int, stop: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
        """Classes, valid and probabilities of held rows ``start..stop``."""
        parts = [b for b in self._held if b.row < stop and b.row + b.height > start]
        cuts = [slice(max(start - b.row, 0), min(stop - b.row, b.height)) for b in parts]
        classes = np.concatenate([b.classes[c] for b, c in zip(parts, cuts)])
        valid = np.concatenate([b.valid[c] for b, c in zip(parts, cuts)])
        if any(b.probabilities is None for b in parts):
            raise ValueError("the CRF stage needs probabilities; the engine sent rows without them")
        probabilities = np.concatenate([b.probabilities[:, c] for b, c in zip(parts, cuts)], axis=1)
        return classes, valid, probabilities

    def _submit_band(self, band_start: int, band_end: int) -> None:
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        config, width = self.config, self.scene.width
        top = max(band_start - config.halo, 0)
        bottom = min(band_end + config.halo, self.scene.height)
        classes, valid, probabilities = self._rows(top, bottom)
        core = slice(band_start - top, band_end - top)
        band = _Band(band_start, classes[core].copy(), valid[core].copy(), probabilities[:, core].copy(), [])
        if valid[core].any():
            try:
                raw = self._src.read(self.scene.band_indexes, window=Window(0, top, width, bottom - top))
            except RasterioError as err:
                where = f"rows {top}-{bottom}"
                raise InputError(f"{self.scene.label}: read failed at {where} for the CRF ({err})") from err
            features = stretch_to_bytes(raw, self.low, self.high)
            for col in range(0, width, config.block):
                col_end = min(col + config.block, width)
                if not valid[core, col:col_end].any():
                    continue  # all nodata: nothing to refine
                left, right = max(col - config.halo, 0), min(col_end + config.halo, width)
                crop = (band_start - top, col - left, band_end - band_start, col_end - col)
                future = self._executor().submit(
                    refine_block,
                    np.ascontiguousarray(probabilities[:, :, left:right]),
                    np.ascontiguousarray(features[:, :, left:right]),
                    np.ascontiguousarray(valid[:, left:right]),
                    self.params,
                    crop,
                )
                band.jobs.append((col, col_end - col, future))
        self._bands.append(band)
        self._next_band = band_end
        # Rows above the next band's halo are no longer needed.
        keep_from = max(band_end - config.halo, 0)
        self._held = [b for b in self._held if b.row + b.height > keep_from]

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_pool_context())
        return self._pool
