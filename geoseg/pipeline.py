"""predict_scene(): read -> tile -> infer -> blend -> argmax -> write, streamed row band by row band.

Three threads share the work so I/O overlaps compute: a reader prepares batches of tiles
ahead of the network (its own dataset handle), the calling thread runs the network and
blends, and a writer compresses and writes finished rows (its own handle). Queues between
them are bounded, so memory stays flat however big the scene is.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from ._version import __version__
from .blend import LogitAccumulator
from .config import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX, PredictConfig
from .errors import CheckpointError, ConfigError, NodataWarning
from .inference import TileBatch, TilePredictor, resolve_device, resolve_precision
from .io import LabelWriter, Scene, SceneReader, check_destination, open_scene
from .modelfile import LoadedModel, ModelMetadata, load_model
from .tiling import Tile, TileGrid, taper_2d

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default.safetensors"
# NOTE: GDAL's block cache defaults to 5 % of RAM and would grow with the scene; a fixed cap keeps
# memory flat. It must hold one tile row of input blocks to avoid decoding blocks twice.
GDAL_CACHE_MB = 128
_DONE = object()


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
) -> PredictResult:
    """Predict a land-cover raster for one scene.

    Writes a single-band GeoTIFF to ``dst`` with the input's CRS, transform and size, class
    ids from the model's classes, ``config.output_nodata`` wherever the input is nodata, a
    colour table, class names (tags and a ``.aux.xml`` attribute table) and provenance tags.
    The file appears under ``dst`` only when complete.

    Args:
        src: Input scene: any path or URI rasterio opens.
        dst: Output GeoTIFF path.
        config: Settings; ``None`` uses the defaults and the bundled model.
        overwrite: Replace an existing ``dst``.
        progress: Show a progress bar on stderr.
        model: An already loaded model (batch jobs load once); overrides ``config.model``.

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
    src = os.fspath(src)
    if model is None:
        model = load_model(config.model or default_model_path())
    if config.output_nodata in {c.id for c in model.metadata.classes}:
        raise ConfigError(f"output_nodata {config.output_nodata} is also a class id of the model; choose another value")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    with rasterio.Env(**gdal_options()):
        scene = open_scene(src, model.metadata, config.bands, config.nodata)
        dst_path = check_destination(src, dst, overwrite)
        grid = plan_grid(scene, model.metadata, config)
        log.info("%s: %dx%d px, bands %s (%s)", src, scene.width, scene.height, list(scene.band_indexes), scene.band_source)
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        predictor = TilePredictor(model.module, device, precision, grid.tile_px, max_batch=config.batch_size)
        tags = {
            "GEOSEG_VERSION": __version__,
            "GEOSEG_MODEL": model.metadata.name,
            "GEOSEG_MODEL_SHA256": model.sha256,
            "GEOSEG_TILE": str(grid.tile_px),
            "GEOSEG_OVERLAP": str(grid.overlap_px),
            "GEOSEG_PRECISION": precision,
            "GEOSEG_BANDS": ",".join(map(str, scene.band_indexes)),
            "GEOSEG_SOURCE": os.path.basename(src),
        }
        predicted = _run(scene, grid, model, predictor, config, dst_path, tags, progress)
    if predicted == 0:
        warnings.warn(f"{src}: no valid pixel; wrote an all-nodata output", NodataWarning, stacklevel=2)
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
        raise ConfigError(f"overlap {overlap_px} must be less than half the tile {tile_px}")
    small_tile_px = -(-max(scene.height, scene.width) // 32) * 32
    if small_tile_px < tile_px:
        return TileGrid(scene.height, scene.width, small_tile_px, 0)
    return TileGrid(scene.height, scene.width, tile_px, overlap_px)


def gdal_options() -> dict[str, Any]:
    """GDAL settings applied once around a prediction (config options are process-wide).

    The block cache is capped unless the user set ``GDAL_CACHEMAX``: GDAL's default (5 % of RAM)
    would let it grow with the scene. GDAL reads the cap when its cache is first used.
    """
    options: dict[str, Any] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    if "GDAL_CACHEMAX" not in os.environ:
        options["GDAL_CACHEMAX"] = GDAL_CACHE_MB
    return options


def _run(
    scene: Scene,
    grid: TileGrid,
    model: LoadedModel,
    predictor: TilePredictor,
    config: PredictConfig,
    dst: Path,
    tags: dict[str, str],
    progress: bool,
) -> int:
    """Drive reader, network and writer for one scene; returns the number of tiles predicted."""
    from tqdm import tqdm

    meta = model.metadata
    class_ids = np.array([c.id for c in meta.classes])
    taper = taper_2d(grid.tile_px, config.taper_floor)
    accumulator = LogitAccumulator(
        num_classes=len(meta.classes),
        height=scene.height,
        width=scene.width,
        capacity_rows=grid.tile_px,
        row_starts=grid.row_starts,
        col_starts=grid.col_starts,
        tile_px=grid.tile_px,
        taper_floor=config.taper_floor,
    )
    stop = threading.Event()
    batches: queue.Queue[Any] = queue.Queue(maxsize=config.prefetch_batches)
    rows_out: queue.Queue[Any] = queue.Queue(maxsize=4)
    multiplier, bias = meta.normalization.multiplier_and_bias()

    with LabelWriter(dst, scene, meta.classes, config.output_nodata, config.compress, tags) as writer:
        reader = threading.Thread(
            target=_read_batches, args=(scene, grid, multiplier, bias, config.batch_size, batches, stop), daemon=True
        )
        writer_thread = threading.Thread(target=_write_rows, args=(writer, rows_out, stop), daemon=True)
        reader.start()
        writer_thread.start()
        bar = tqdm(total=len(grid), unit="tile", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        predicted = 0
        try:
            done_index = -1

            def emit(until_row: int) -> None:
                for finished in accumulator.pop_until(until_row):
                    labels = class_ids[finished.labels()]
                    labels[~finished.valid] = config.output_nodata
                    _put(rows_out, (finished.row, labels), stop)

            for batch, logits in predictor.stream(_drain(batches, stop)):
                for tile, tile_logits, valid, (h, w) in zip(batch.tiles, logits, batch.valid, batch.extents):
                    emit(grid.row_starts[tile.row])
                    accumulator.add(tile.y, tile.x, tile_logits[:, :h, :w], taper[:h, :w], valid[:h, :w])
                    bar.update(tile.index - done_index)
                    done_index = tile.index
                    predicted += 1
            emit(scene.height)
            bar.update(len(grid) - 1 - done_index)
            _put(rows_out, _DONE, stop)
            writer_thread.join()
            if getattr(writer_thread, "error", None) is not None:
                raise writer_thread.error
        except BaseException as err:
            stop.set()
            writer_error = getattr(writer_thread, "error", None)
            if writer_error is not None and writer_error is not err:
                raise writer_error from None  # the writer's failure is the cause, not our stop
            raise
        finally:
            bar.close()
            stop.set()
            reader.join()
            writer_thread.join()
        writer.commit()
    return predicted


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    """Put with a timeout loop, so a stopped pipeline never blocks forever."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                raise RuntimeError("pipeline stopped") from None


def _drain(batches: queue.Queue[Any], stop: threading.Event) -> Iterator[TileBatch]:
    """Yield batches from the reader until it is done; re-raise its error here.

    Polls, so a pipeline stopped by the writer (whose reader then quits without a last item)
    never leaves this thread waiting forever.
    """
    while True:
        try:
            item = batches.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                raise RuntimeError("pipeline stopped") from None
            continue
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _read_batches(
    scene: Scene,
    grid: TileGrid,
    multiplier: tuple[float, ...],
    bias: tuple[float, ...],
    batch_size: int,
    out: queue.Queue[Any],
    stop: threading.Event,
) -> None:
    """Reader thread: tiles with at least one valid pixel, in grid order, in batches."""
    try:
        with SceneReader(scene, multiplier, bias) as reader:
            pending: list[tuple[Tile, Any, Any, tuple[int, int]]] = []
            for tile in grid:
                if stop.is_set():
                    return
                pixels, valid, h, w = reader.read_tile(tile.y, tile.x, tile.size)
                if not valid.any():
                    continue  # an all-nodata tile never reaches the model
                pending.append((tile, pixels, valid, (h, w)))
                if len(pending) == batch_size:
                    _put(out, _make_batch(pending), stop)
                    pending = []
            if pending:
                _put(out, _make_batch(pending), stop)
        _put(out, _DONE, stop)
    except BaseException as err:  # handed to the main thread, which re-raises it
        if not stop.is_set():
            _put(out, err, stop)


def _make_batch(items: list[tuple[Tile, Any, Any, tuple[int, int]]]) -> TileBatch:
    return TileBatch(
        pixels=np.stack([pixels for _, pixels, _, _ in items]),
        tiles=[tile for tile, _, _, _ in items],
        valid=[valid for _, _, valid, _ in items],
        extents=[extent for _, _, _, extent in items],
    )


def _write_rows(writer: LabelWriter, rows: queue.Queue[Any], stop: threading.Event) -> None:
    """Writer thread: write finished rows in order until told it is done."""
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
                return
            writer.write_rows(*item)
    except BaseException as err:
        thread.error = err  # type: ignore[attr-defined]
        stop.set()
