"""predict_scene(): read -> tile -> infer -> blend -> argmax -> write, streamed row band by row band.

Three threads share the work so I/O overlaps compute: a reader prepares batches of tiles
ahead of the network (its own dataset handle), the calling thread runs the network and
blends, and a writer compresses and writes finished rows (its own handle). Queues between
them are bounded, so memory stays flat however big the scene is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
import rasterio.env

from ._machine import physical_memory_bytes, usable_cores
from ._malloc import loaded_allocator
from ._remote import NO_LISTING, is_remote
from ._version import __version__
from .aoi import AreaOfInterest, aoi_label, load_aoi
from .blend import FinishedRows, TileBlender
from .config import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX, PredictConfig
from .errors import CheckpointError, ConfigError, NodataWarning
from .inference import TileBatch, TilePredictor, resolve_device, resolve_precision
from .io import GEOTIFF_SUFFIXES, LabelWriter, Scene, SceneReader, check_destination, open_scene, output_dtype
from .modelfile import LoadedModel, ModelMetadata, load_model
from .outputs import OutputOptions, check_output_destinations
from .sources import Resampling, resolve_source
from .stream import RowBlock, RowSink, RowStage, needs_probabilities, run_chain, softmax
from .tiling import Tile, TileGrid

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default.safetensors"
# NOTE: GDAL's block cache defaults to 5 % of RAM and would grow with the scene; a cap keeps
# memory flat. It must hold the input blocks around the tiles being read: at least this much, more
# for large blocks, strips and several readers (see block_cache_bytes).
GDAL_CACHE_MB = 16
# GDAL settings for reading remote files in windows; a variable of the same name in the
# environment wins. GDAL multiplies the retry delay by 2 to 2.5 after each retry.
REMOTE_GDAL_OPTIONS: dict[str, Any] = {
    # per HTTP request, on 429 and 5xx (GDAL_HTTP_RETRY_CODES for others); window reads run with
    # none (_remote.READ_GDAL_OPTIONS): geoseg tries those again itself
    "GDAL_HTTP_MAX_RETRY": 5,
    "GDAL_HTTP_RETRY_DELAY": 0.5,  # seconds before the first retry
    "GDAL_HTTP_CONNECTTIMEOUT": 30,
    "GDAL_HTTP_LOW_SPEED_TIME": 60,  # a transfer slower than 1 byte/s for 60 s fails (and is retried)
    "GDAL_HTTP_LOW_SPEED_LIMIT": 1,
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",  # neighbouring blocks in one range request
    "GDAL_INGESTED_BYTES_AT_OPEN": 32768,  # COG header and IFDs in the first request
    "CPL_VSIL_CURL_CACHE_SIZE": 128 << 20,  # fetched bytes kept, process-wide, so no range is fetched twice
}
_DONE = object()
#: Seconds a stopped run waits for its reader threads to finish a read in progress.
READER_STOP_GRACE_S = 2.0
# Rows per block handed to the outputs when they carry probabilities: 64 rows of 8 classes at
# 8192 px are 17 MB of float32, where a whole stride of rows (224 for 256 px tiles) is 59 MB.
PROBABILITY_ROWS = 64


def default_model_path() -> Path:
    """The model bundled with geoseg (used when no ``--model`` is given).

    Raises:
        CheckpointError: This installation has no bundled model.
    """
    path = Path(str(resources.files("geoseg") / "models" / DEFAULT_MODEL_NAME))
    if not path.is_file():
        raise CheckpointError(f"{path}: no default model is bundled with this installation; pass --model FILE")
    return path


@dataclass(frozen=True)
class PredictResult:
    """What one prediction did."""

    dst: Path
    width: int
    height: int
    tiles_total: int
    tiles_predicted: int
    seconds: float
    device: str
    precision: str
    tile_px: int
    overlap_px: int
    traced: bool = False  # the network ran as a traced TorchScript graph (not eager after a failed trace)

    @property
    def megapixels_per_second(self) -> float:
        """Scene megapixels divided by wall-clock seconds."""
        return self.width * self.height / 1e6 / max(self.seconds, 1e-9)


def predict_scene(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    config: PredictConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    model: LoadedModel | None = None,
    resample: Resampling | None = None,
    assets: Mapping[str, str] | Sequence[str] | None = None,
    outputs: OutputOptions | None = None,
) -> PredictResult:
    """Predict a land-cover raster for one scene.

    Writes a single-band GeoTIFF to ``dst`` with the CRS, transform and size of the grid read, class
    ids from the model's classes, ``config.output_nodata`` wherever the input is nodata, a
    colour table, class names (tags and a ``.aux.xml`` attribute table) and provenance tags.
    The file appears under ``dst`` only when complete.

    Args:
        src: Input scene: a path or URI (``https://``, ``s3://``, any GDAL path), several of
            them (a sequence, or commas) stacked band after band, or a STAC Item (``.json``);
            see :func:`geoseg.sources.resolve_source`.
        dst: Output GeoTIFF path.
        config: Settings; ``None`` uses the defaults and the bundled model.
        overwrite: Replace an existing ``dst``.
        progress: Show a progress bar on stderr.
        model: An already loaded model (batch jobs load once); overrides ``config.model``. Its
            module is moved to the run's device and stays there (so the next scene reuses it).
        resample: Resample band files coarser than the finest one with this method (otherwise refused).
        assets: STAC asset keys, by model band name or in model band order (default: by common name).
        outputs: Extra outputs (probabilities, statistics, polygons, ...) besides ``dst``.

    Returns:
        Sizes, counts and timing of the run.

    Raises:
        InputError: The scene is missing, unreadable or does not fit the model.
        OutputError: ``dst`` cannot be written.
        CheckpointError: The model file is missing or invalid.
        ConfigError: Settings are invalid.
    """
    started = time.perf_counter()
    config = config or PredictConfig()
    outputs = outputs or OutputOptions()
    if model is None:
        model = load_model(config.model or default_model_path())
    if config.output_nodata in {c.id for c in model.metadata.classes}:
        raise ConfigError(f"{model.path}: class id {config.output_nodata} is also the output nodata value; "
                          "choose another with --output-nodata (output_nodata: in a --config file)")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    with rasterio.Env(**gdal_options()):
        # band files and STAC assets are opened here with the folder listing off where remote
        source = resolve_source(src, model.metadata, resample=resample, assets=assets)
        if any(is_remote(path) for path in source.files):
            rasterio.env.setenv(**gdal_options(remote=True))
        scene = open_scene(source.path, model.metadata, config.bands, config.nodata, name=source.name)
        for path in source.files:
            dst_path = check_destination(path, dst, overwrite)
        if dst_path.suffix.lower() not in GEOTIFF_SUFFIXES:
            log.warning("%s: written as a GeoTIFF, whatever its extension says", dst_path)
        check_output_destinations(outputs, dst_path, source.files, overwrite)
        aoi = load_aoi(outputs.aoi, scene) if outputs.aoi is not None else None
        grid = plan_grid(scene, model.metadata, config)
        readers = reader_threads(config, device)
        if "GDAL_CACHEMAX" not in os.environ:
            cache = block_cache_bytes(scene, grid, source.block_shape, readers)
            rasterio.env.setenv(GDAL_CACHEMAX=cache)
        if source.scale is None and scene.scales is not None:  # the file's own, as GDAL declares them
            source = dataclasses.replace(source, scale=scene.scales, offset=scene.offsets,
                                         scaling_from="file")
        model = source.calibrate(model)
        log.info("%s: %dx%d px, bands %s (%s)",
                 source.name, scene.width, scene.height, list(scene.band_indexes), scene.band_source)
        if log.isEnabledFor(logging.DEBUG):  # reads the process's memory map: only when it is shown
            log.debug("memory allocator: %s", loaded_allocator())
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        predictor = TilePredictor(
            model.module, device, precision, grid.tile_px, max_batch=config.batch_size, compile=config.compile,
            logits_on_device=True,  # on a GPU, blend there: only class indexes come back to the host
            parallel_batches=config.parallel_batches, trace=config.trace, tiles=len(grid),
        )
        if predictor.traced:
            log.info("network: traced (TorchScript) on its first batch; %d batches at once",
                     predictor.parallel_batches)
        precision = predictor.precision  # an ONNX model runs in fp32 whatever was asked
        tags = {
            "GEOSEG_VERSION": __version__,
            "GEOSEG_MODEL": model.metadata.name,
            "GEOSEG_MODEL_SHA256": model.sha256,
            "GEOSEG_TILE": str(grid.tile_px),
            "GEOSEG_OVERLAP": str(grid.overlap_px),
            "GEOSEG_PRECISION": precision,
            "GEOSEG_BANDS": ",".join(map(str, scene.band_indexes)),
            "GEOSEG_SOURCE": source.tag,
        }
        if config.crf is not None:  # the map was refined: say how, so two maps can be told apart
            kernels = dataclasses.asdict(config.crf.params())
            tags["GEOSEG_CRF"] = ", ".join(f"{key}={value}" for key, value in kernels.items())
        stages = build_stages(scene, model.metadata, config)
        sinks = build_sinks(scene, model.metadata, config, outputs, tags, overwrite)
        try:
            predicted = _run(scene, grid, model, predictor, config, dst_path, tags, progress, stages, sinks, aoi,
                             readers, overwrite)
        except BaseException:
            fallback = _Outputs(stages, sinks)  # also when the class raster could not even be created
            fallback.close()
            fallback.abort()
            raise
        finishing = time.time()
        try:
            finish_outputs(dst_path, scene, model, config, outputs, sinks, overwrite=overwrite)
        except KeyboardInterrupt as err:  # DST is in place by now: say so, and what is missing
            err.add_note(outputs.interrupted_note(dst_path, since=finishing))
            raise
    if predicted == 0:
        warnings.warn(f"{source.name}: no valid pixel; wrote an all-nodata output", NodataWarning, stacklevel=2)
    return PredictResult(
        dst=dst_path,
        width=scene.width,
        height=scene.height,
        tiles_total=len(grid),
        tiles_predicted=predicted,
        seconds=time.perf_counter() - started,
        device=str(device),
        precision=precision,
        tile_px=grid.tile_px,
        overlap_px=grid.overlap_px,
        traced=predictor.ran_traced,
    )


def plan_grid(scene: Scene, meta: ModelMetadata, config: PredictConfig) -> TileGrid:
    """The tile grid for a scene: config values, else the model's suggestions, else defaults.

    A scene smaller than one tile runs as one smaller tile (a multiple of 32, SegFormer's
    total stride), instead of padding a few pixels out to a full tile.

    Raises:
        ConfigError: The overlap does not fit the tile.
    """
    tile_px = config.tile if config.tile is not None else (meta.tile_size or DEFAULT_TILE_PX)
    overlap_px = config.overlap if config.overlap is not None else meta.overlap
    if overlap_px is None:
        overlap_px = DEFAULT_OVERLAP_PX
    if overlap_px * 2 >= tile_px:
        # which of the two to change: a flag or --config value, or the model's suggestion
        whose = {True: "given", False: f"suggested by model {meta.name}"}
        raise ConfigError(f"overlap {overlap_px} ({whose[config.overlap is not None]}) must be less than "
                          f"half the tile {tile_px} ({whose[config.tile is not None]})")
    small_tile_px = -(-max(scene.height, scene.width) // 32) * 32
    if small_tile_px < tile_px:
        return TileGrid(scene.height, scene.width, small_tile_px, 0)
    return TileGrid(scene.height, scene.width, tile_px, overlap_px)


def reader_threads(config: PredictConfig, device: torch.device) -> int:
    """Threads reading tiles: ``config.reader_threads``, else 1 on the CPU and up to 8 beside a GPU.

    On the CPU the network wants every core and one reader keeps up with it. A GPU runs the
    network far faster than one thread decodes tiles (bench/bench_read.py: 24 MP/s from one
    thread against 216 MP/s for a SegFormer-B0 alone on an H200), so half the cores read.
    """
    if config.reader_threads is not None:
        return config.reader_threads
    if device.type != "cuda":
        return 1
    return max(1, min(8, usable_cores() // 2))


def gdal_options(remote: bool = False) -> dict[str, Any]:
    """GDAL settings applied once around a prediction (config options are process-wide).

    The block cache capped at ``GDAL_CACHE_MB`` (GDAL's default, 5 % of RAM, would grow with the
    scene; :func:`predict_scene` raises it for large blocks and strips); for remote files, retries
    with back-off, timeouts, merged range requests and a larger cache of fetched bytes
    (``REMOTE_GDAL_OPTIONS``). A setting already in the environment wins.

    With ``remote``, no directory listing on open (``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``):
    listing a remote folder costs a request per open. Local reads keep GDAL's default, so that
    sidecar files are found as GDAL and QGIS find them: nodata and band metadata in ``.aux.xml``,
    an external ``.msk`` mask, a world file, an ENVI ``.hdr``.
    """
    # NOTE: rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64, which takes bytes, not MB.
    defaults: dict[str, Any] = {"GDAL_CACHEMAX": GDAL_CACHE_MB << 20} | REMOTE_GDAL_OPTIONS
    if remote:
        defaults |= NO_LISTING
    return {key: value for key, value in defaults.items() if key not in os.environ}


def block_cache_bytes(
    scene: Scene, grid: TileGrid, block_shape: tuple[int, int] | None = None, readers: int = 1
) -> int:
    """A GDAL block cache that holds the input blocks around each reader's current tile.

    A tile is cut from the ``ceil(tile / block) + 1`` rows of blocks it touches, and the next tile
    to its right reuses most of them, so each reader needs the blocks around one tile (a tile plus
    two blocks wide; the whole width for strips, whose blocks span it), plus half a block row of
    slack for the output blocks written through the same cache. A VRT band stack caches its own
    blocks beside its sources', hence the factor 2 for VRTs. At least ``GDAL_CACHE_MB``, at most a
    quarter of the machine's memory.

    The cache does not keep a tile row's blocks for the next tile row, whose top rows lie in the
    same blocks: that would take 2.5 block rows across the whole width (42 MB for a 4-band uint16
    scene 8192 px wide, 205 MB at 40,000 px), the one part of ``geoseg predict``'s memory that grew
    with the scene. Without it the blocks along a tile row's lower edge are decoded twice: about
    2 % more CPU time on an 8192 px scene (bench/bench_predict.py, docs/performance.md); remote
    bytes are not fetched twice (``CPL_VSIL_CURL_CACHE_SIZE``).

    Args:
        scene: The scene read.
        grid: Its tile grid.
        block_shape: ``(rows, cols)`` of the largest blocks read; the scene's own by default (a
            band stack passes its files').
        readers: Reading threads, each with its own dataset handle and blocks.
    """
    block_rows, block_cols = block_shape or scene.block_shape
    rows = (-(-grid.tile_px // block_rows) + 1) * block_rows + block_rows // 2
    columns = min(scene.width, grid.tile_px + 2 * block_cols)
    itemsize = np.dtype(scene.dtype).itemsize
    copies = 2 if scene.path.lstrip().startswith("<") else 1
    needed = copies * readers * columns * min(rows, scene.height) * len(scene.band_indexes) * itemsize
    return int(max(GDAL_CACHE_MB << 20, min(needed, physical_memory_bytes() // 4)))


def build_stages(scene: Scene, meta: ModelMetadata, config: PredictConfig) -> list[RowStage]:
    """Stages between the blender and the outputs, in order (e.g. CRF refinement).

    Raises:
        DependencyNotFoundError: ``config.crf`` is set but pydensecrf is not installed
            (checked here, before any inference).
    """
    stages: list[RowStage] = []
    if config.crf is not None:
        from .crf import CrfStage

        dtype = output_dtype(meta.classes, config.output_nodata)
        class_ids = np.array([c.id for c in meta.classes], dtype=dtype)
        stages.append(CrfStage(scene, class_ids, config.output_nodata, config.crf))
    return stages


def build_sinks(
    scene: Scene,
    meta: ModelMetadata,
    config: PredictConfig,
    outputs: OutputOptions,
    tags: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> list[RowSink]:
    """Outputs besides the class raster that consume the finished rows (probabilities, statistics).

    Each creates its temporary file here; on any failure those already created are removed.
    """
    from .rasters import ConfidenceWriter, ProbabilityWriter
    from .stats import ClassAreaCounter, StatsWriter

    tags = dict(tags or {})
    sinks: list[RowSink] = []
    try:
        if outputs.probabilities is not None:
            sinks.append(ProbabilityWriter(outputs.probabilities, scene, meta.classes, outputs.probabilities_dtype,
                                           config.compress, tags, cog=config.cog, overwrite=overwrite))
        if outputs.confidence is not None:
            sinks.append(ConfidenceWriter(outputs.confidence, scene, meta.classes,
                                          outputs.probabilities_dtype, config.compress, tags, cog=config.cog,
                                          overwrite=overwrite))
        if outputs.stats is not None:
            info = {"scene": scene.label, "model": meta.name, "aoi": aoi_label(outputs.aoi)}
            sinks.append(StatsWriter(outputs.stats, meta.classes, scene.transform, scene.crs, info))
        elif outputs.report is not None:  # the report's area table, counted as rows finish
            sinks.append(ClassAreaCounter(meta.classes, scene.transform, scene.crs))
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return sinks


def finish_outputs(
    dst: Path,
    scene: Scene,
    model: LoadedModel,
    config: PredictConfig,
    outputs: OutputOptions,
    sinks: Sequence[RowSink],
    *,
    overwrite: bool = False,
) -> None:
    """Outputs made from the finished class raster ``dst`` (polygons, report, STAC Item).

    Each is written under a temporary name and renamed when complete; one that fails leaves
    the class raster and the outputs already finished in place.
    """
    meta = model.metadata
    if outputs.vector is not None:
        from .vectorize import vectorize_raster

        result = vectorize_raster(
            dst, outputs.vector, meta.classes, simplify=outputs.vector_simplify, min_area=outputs.vector_min_area
        )
        log.info("wrote %s: %d polygons", result.path, result.polygons)
    if outputs.report is not None:
        from .report import write_report

        from .stats import ClassAreaCounter

        counted = [sink.table() for sink in sinks if isinstance(sink, ClassAreaCounter)]
        write_report(outputs.report, dst, scene, meta, model_sha256=model.sha256, overwrite=overwrite,
                     table=counted[0] if counted else None)
        log.info("wrote %s/index.html", outputs.report)
    if outputs.stac is not None:
        from .stac import build_item, scene_datetime, scene_inputs, write_item

        inputs = scene_inputs(scene)
        item = build_item(
            dst,
            meta.classes,
            item_path=outputs.stac,
            inputs=inputs,
            model_name=meta.name,
            model_sha256=model.sha256,
            model_file=model.path.name,
            acquired=scene_datetime(scene, inputs),
        )
        write_item(item, outputs.stac)
        log.info("wrote %s", outputs.stac)


def _run(
    scene: Scene,
    grid: TileGrid,
    model: LoadedModel,
    predictor: TilePredictor,
    config: PredictConfig,
    dst: Path,
    tags: dict[str, str],
    progress: bool,
    stages: Sequence[RowStage] = (),
    sinks: Sequence[RowSink] = (),
    aoi: AreaOfInterest | None = None,
    readers: int = 1,
    overwrite: bool = False,
) -> int:
    """Drive readers, network and writer for one scene; returns the number of tiles predicted.

    Finished rows go through ``stages`` and then to the class raster and every sink, on the
    writer thread; all outputs are committed together at the end, or all aborted. With an
    ``aoi``, tiles that hold no pixel of it are never read, and pixels outside it are invalid.
    With several ``readers``, reader ``i`` reads the batches ``i, i + readers, ...`` of the grid
    through a dataset handle of its own, and batches are handed to the network in grid order.
    """
    from tqdm import tqdm

    meta = model.metadata
    # NOTE: the output dtype, not int64: finished rows wait in the writer's queue, 8x smaller.
    class_ids = np.array([c.id for c in meta.classes], dtype=output_dtype(meta.classes, config.output_nodata))
    with_probabilities = needs_probabilities(stages, sinks)
    blender = TileBlender(grid, len(meta.classes), config.taper_floor, keep_logits=with_probabilities,
                          device=predictor.device if predictor.logits_on_device else None)
    stop = threading.Event()
    # One queue per reader; with several, each holds one batch (one more is being read), so the
    # batches in flight stay ~2 x readers x batch size tiles, however big the scene.
    batches: list[queue.Queue[Any]] = [
        queue.Queue(maxsize=config.prefetch_batches if readers == 1 else 1) for _ in range(readers)
    ]
    rows_out: queue.Queue[Any] = queue.Queue(maxsize=4)
    multiplier, bias = meta.normalization.multiplier_and_bias()

    writer = LabelWriter(dst, scene, meta.classes, config.output_nodata, config.compress, tags,
                         cog=config.cog, overwrite=overwrite)
    outputs = _Outputs(stages, [writer, *sinks])
    blending = _Blending(blender, class_ids, config.output_nodata, with_probabilities)
    reading = [
        threading.Thread(
            target=_read_batches,
            args=(scene, grid, multiplier, bias, config.batch_size, batches[i], stop, aoi, (i, readers),
                  predictor.batches_in_flight),
            daemon=True,
        )
        for i in range(readers)
    ]
    writer_thread = threading.Thread(target=_write_rows, args=(outputs, rows_out, stop), daemon=True)
    bar = tqdm(total=len(grid), unit="tile", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    predicted = 0
    try:
        for reader in reading:
            reader.start()
        writer_thread.start()
        done_index = -1

        # NOTE: blending runs here, between forward passes, not on a thread of its own: beside
        # torch's OpenMP threads it made predict about 15 % slower on 2 cores (threads preempted
        # at OpenMP barriers), for ~2.5 ms of blending per 256 px tile.
        for batch, logits in predictor.stream(_drain(batches, stop)):
            for block in blending.add(batch, logits):
                _put(rows_out, block, stop)
            last = batch.tiles[-1].index
            bar.update(last - done_index)
            done_index = last
            predicted += len(batch.tiles)
        for block in blending.finish():
            _put(rows_out, block, stop)
        bar.update(len(grid) - 1 - done_index)
        _put(rows_out, _DONE, stop)
        _join(*reading, writer_thread)
        if getattr(writer_thread, "error", None) is not None:
            raise writer_thread.error
        outputs.close()
        outputs.commit()
    except BaseException as err:
        stop.set()
        _join(writer_thread)  # it polls ``stop``; the outputs it writes are closed below
        # A reader may be inside a remote request (up to GDAL's connect and low-speed timeouts):
        # not waited for beyond a grace time, so Ctrl-C and SIGTERM end the run within seconds. It
        # reads through its own handle and sees ``stop`` once the request returns.
        _join(*reading, timeout=READER_STOP_GRACE_S)
        outputs.close()
        outputs.abort()
        writer_error = getattr(writer_thread, "error", None)
        if writer_error is not None and writer_error is not err:
            raise writer_error from None  # the writer's failure is the cause, not our stop
        raise
    finally:
        bar.close()
    return predicted


def _join(*threads: threading.Thread, timeout: float | None = None) -> None:
    """Wait for the started ``threads``; with a ``timeout``, for at most that many seconds in all."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in threads:
        if thread.ident is not None:  # started
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    busy = [t.name for t in threads if t.is_alive()]
    if busy:
        log.debug("not waiting for %s, still busy", ", ".join(busy))


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    """Put with a timeout loop, so a stopped pipeline never blocks forever."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                raise RuntimeError("pipeline stopped") from None


def _drain(batches: Sequence[queue.Queue[Any]], stop: threading.Event) -> Iterator[TileBatch]:
    """Yield batches from the readers in grid order until they are done; re-raise an error here.

    Reader ``i`` of ``n`` sends one item per batch ``i, i + n, ...`` of the grid (``None`` when
    that batch had no tile to predict), then ``_DONE``; so taking from the readers in turn keeps
    grid order, and the first ``_DONE`` in turn means every batch has been handed out.
    Polls, so a pipeline stopped by the writer (whose readers then quit without a last item)
    never leaves this thread waiting forever.
    """
    turn = 0
    while True:
        try:
            item = batches[turn % len(batches)].get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                raise RuntimeError("pipeline stopped") from None
            continue
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        turn += 1
        if item is not None:
            yield item


def _read_batches(
    scene: Scene,
    grid: TileGrid,
    multiplier: tuple[float, ...],
    bias: tuple[float, ...],
    batch_size: int,
    out: queue.Queue[Any],
    stop: threading.Event,
    aoi: AreaOfInterest | None = None,
    part: tuple[int, int] = (0, 1),
    in_network: int = 1,
) -> None:
    """Reader thread: tiles with at least one valid pixel, in grid order, in batches.

    With an ``aoi``, a tile without a pixel inside it is skipped before it is read, and the
    pixels of a tile outside it are marked invalid (they still give the network context).

    ``part = (i, n)``: reader ``i`` of ``n``. A lone reader fills every batch with the next
    tiles to predict. One of several reads the grid positions of batches ``i, i + n, ...``
    (``batch_size`` consecutive tiles each) and sends one item for each: the tiles to predict
    (fewer than ``batch_size`` where some are skipped) or ``None``.
    """
    first, readers = part
    buffers = _BatchBuffers(out.maxsize, batch_size, in_network)
    try:
        with SceneReader(scene, multiplier, bias, stop) as reader:

            def read(tile: Tile) -> tuple[Tile, Any, Any, tuple[int, int]] | None:
                inside = None
                if aoi is not None:
                    h, w = min(tile.size, scene.height - tile.y), min(tile.size, scene.width - tile.x)
                    inside = aoi.mask(tile.y, tile.x, h, w)
                    if not inside.any():
                        return None  # outside the area of interest: never read
                pixels, valid, h, w = reader.read_tile(tile.y, tile.x, tile.size)
                if inside is not None:
                    valid[:h, :w] &= inside
                if not valid.any():
                    return None  # an all-nodata tile never reaches the model
                return tile, pixels, valid, (h, w)

            if readers == 1:
                pending: list[tuple[Tile, Any, Any, tuple[int, int]]] = []
                for tile in grid:
                    if stop.is_set():
                        return
                    if (item := read(tile)) is not None:
                        pending.append(item)
                    if len(pending) == batch_size:
                        _put(out, buffers.batch(pending), stop)
                        pending = []
                if pending:
                    _put(out, buffers.batch(pending), stop)
            else:
                tiles = list(grid)
                for start in range(first * batch_size, len(tiles), readers * batch_size):
                    if stop.is_set():
                        return
                    items = [item for tile in tiles[start : start + batch_size] if (item := read(tile)) is not None]
                    _put(out, buffers.batch(items) if items else None, stop)
        _put(out, _DONE, stop)
    except BaseException as err:  # handed to the main thread, which re-raises it
        # NOTE: once stopped, the run already fails with the first error; _put would raise
        # "pipeline stopped" here, and an exception escaping a thread prints its traceback.
        with contextlib.suppress(RuntimeError):
            if not stop.is_set():
                _put(out, err, stop)


class _BatchBuffers:
    """A reader's ring of batch arrays, reused instead of allocating every batch anew.

    A reader fills buffer ``n`` while up to ``queued`` batches wait in its queue and the network
    reads the ``in_network`` before them (one, which it copies or consumes before it asks for the
    next batch; more when the CPU runs several batches at once), so ``queued + 1 + in_network``
    buffers are never overwritten while in use. Reuse keeps the
    batch-sized allocations of many reading threads from spreading over their malloc arenas:
    8 readers at batch 32 peaked at 2.0 GiB on a 4096 px scene and 3.3 GiB on an 8192 px one
    with fresh arrays per batch.
    """

    def __init__(self, queued: int, batch_size: int, in_network: int = 1):
        self._ring: list[np.ndarray] = []
        self._size = queued + 1 + in_network
        self._batch_size = batch_size
        self._next = 0

    def batch(self, items: list[tuple[Tile, Any, Any, tuple[int, int]]]) -> TileBatch:
        first = items[0][1]
        if not self._ring:  # the tiles' shape and dtype are known once the first is read
            self._ring = [np.empty((self._batch_size, *first.shape), first.dtype) for _ in range(self._size)]
        buffer = self._ring[self._next % self._size][: len(items)]
        self._next += 1
        return TileBatch(
            pixels=np.stack([pixels for _, pixels, _, _ in items], out=buffer),
            tiles=[tile for tile, _, _, _ in items],
            valid=[valid for _, _, valid, _ in items],
            extents=[extent for _, _, _, extent in items],
        )


class _Outputs:
    """The stages and sinks of one run, driven from the writer thread."""

    def __init__(self, stages: Sequence[RowStage], sinks: Sequence[RowSink]):
        self.stages = list(stages)
        self.sinks = list(sinks)
        self._committed: list[RowSink] = []

    def write(self, block: RowBlock | None) -> None:
        """Send a block through the stages to every sink; ``None`` flushes the stages."""
        for out in run_chain(self.stages, block):
            for sink in self.sinks:
                sink.write(out)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()

    def commit(self) -> None:
        """Make every output appear, the class raster (first sink) last: it means the run is complete.

        Sinks with a ``prepare`` step (closing files, COG conversion: the slow, failure-prone
        part) are all prepared before any output is renamed, so a failure there leaves no
        output at all. If a commit fails, it and those not yet committed are removed (by :meth:`abort`).
        """
        for sink in self.sinks:
            prepare = getattr(sink, "prepare", None)
            if prepare is not None:
                prepare()
        for sink in [*self.sinks[1:], self.sinks[0]]:
            sink.commit()
            self._committed.append(sink)

    def abort(self) -> None:
        """Remove the temporary files of every output not yet committed (never a final name)."""
        for sink in self.sinks:
            if sink not in self._committed:
                sink.abort()


class _Blending:
    """Turns the network's logits, batch by batch, into finished row blocks for the outputs."""

    def __init__(self, blender: TileBlender, class_ids: np.ndarray, output_nodata: int, with_probabilities: bool):
        self.blender = blender
        self.class_ids = class_ids
        self.output_nodata = output_nodata
        self.with_probabilities = with_probabilities

    def add(self, batch: TileBatch, logits: Any) -> Iterator[RowBlock]:
        """Blend a batch's logits ``(N, K, T, T)``; yield the row blocks they finished.

        Logits are a host array, or a tensor on the blender's device (then validity goes there too).
        """
        valid = self.blender.on_device(batch.valid)
        for tile, tile_logits, tile_valid, (h, w) in zip(batch.tiles, logits, valid, batch.extents):
            yield from self._blocks(self.blender.add(tile, tile_logits[:, :h, :w], tile_valid[:h, :w]))

    def finish(self) -> Iterator[RowBlock]:
        """No more batches: the rows still waiting."""
        yield from self._blocks(self.blender.finish())

    def _blocks(self, bands: list[FinishedRows]) -> Iterator[RowBlock]:
        for finished in bands:
            # NOTE: probabilities are K float32 values per pixel; in blocks of PROBABILITY_ROWS
            # rows the few blocks queued for the writer stay small however wide the scene is.
            for part in finished.split(PROBABILITY_ROWS) if self.with_probabilities else [finished]:
                labels = self.class_ids[part.labels]
                labels[~part.valid] = self.output_nodata
                probabilities = softmax(part.logits()) if self.with_probabilities else None
                yield RowBlock(part.row, labels, part.valid, probabilities)


def _write_rows(outputs: _Outputs, rows: queue.Queue[Any], stop: threading.Event) -> None:
    """Writer thread: send finished rows in order to the outputs until told it is done."""
    thread = threading.current_thread()
    try:
        while True:
            try:
                item = rows.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is _DONE:
                outputs.write(None)
                return
            outputs.write(item)
    except BaseException as err:
        thread.error = err  # type: ignore[attr-defined]
        stop.set()
