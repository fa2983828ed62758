"""train_model(): fit a SegFormer to (image, labels) pairs and write the best epoch as a geoseg model file.

One run, in order:

1. Check every input (grids, classes, regions) before any training.
2. Scan the training region once, window by window: per-band mean and standard deviation of
   the valid image pixels (stored in the model as ``meanstd`` normalisation), class
   frequencies, and a uniform random sample of pixel positions per class (the anchors of
   class-balanced sampling).
3. Each step draws random windows: a class (with probability ``frequency ** (1 - balance)``),
   one of its pixels, and a window around it that lies inside the training region and never
   touches the validation region; then flips, 90-degree rotations, per-band brightness and
   contrast jitter and optional band dropout.
4. Loss: cross-entropy (or focal) with optional class weights plus soft Dice, ignoring
   unlabelled pixels; AdamW with linear warm-up and cosine decay; optional bf16 autocast.
5. Each epoch (``epoch_steps`` steps): predict the validation region with the same tiles,
   taper and blending as ``geoseg predict``, compute per-class IoU and mIoU; the best epoch
   so far is written to ``out`` (atomically), and a checkpoint for ``resume`` beside it.
   Without a validation region (a final fit on all labelled pixels, once the settings were
   chosen on a held-out region) every epoch is written, so ``out`` ends as the last step's model.

Windows are read from the rasters as needed (the GDAL block cache keeps recent blocks), so
scenes of any size work; only the per-class anchor sample is held in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.windows import Window

from ._version import __version__
from .errors import CheckpointError, ConfigError, InputError, OutputError
from .io import open_scene, valid_pixels
from .labels import (
    IGNORE,
    BoundRegion,
    ClassMap,
    Grid,
    LabelSource,
    Region,
    RegionOutsideError,
    open_labels,
    parse_region,
    row_blocks,
)
from .metrics import Metrics, confusion_matrix
from .modelfile import ModelMetadata, Normalization, apply_umask, check_not_an_input, load_classes

log = logging.getLogger(__name__)

TrainPrecision = Literal["fp32", "bf16", "auto"]
_PATH_KEYS = ("images", "labels", "classes", "out", "init_model", "pretrained", "train_aoi", "val_aoi")
# Settings that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"device", "threads", "precision", "progress_every", "out"}
_SCAN_ROWS = 256
_MAX_ANCHORS = 200_000


@dataclass(frozen=True)
class TrainConfig:
    """Everything that steers a training run; validated on construction.

    Attributes:
        images: Training images (GeoTIFFs), one per label file.
        labels: For each image, a class raster on its grid or a vector file of polygons.
        classes: Classes file (JSON: ids, names, colours, ignore index); its order is the output order.
        out: The model file to write (the best epoch); the checkpoint goes beside it.
        label_attribute: Attribute of vector labels holding a class id or name.
        bands: 1-based raster bands feeding the model, in model order; ``None``: bands 1..N,
            or the init model's source bands.
        band_names: Model input names (ignored with ``init_model``, which has its own).
        train_rows: Training region as ``A:B`` rows (B exclusive); or use ``train_window``/``train_aoi``.
            ``None`` for all three: the whole image. The validation region is always excluded.
        train_window: Training region as ``col_off,row_off,width,height``.
        train_aoi: Training region as polygons in a vector file.
        val_rows: Validation region as ``A:B`` rows (or use ``val_window``/``val_aoi``). ``None`` for
            all three: no validation, and the model after the last step is written.
        val_window: Validation region as ``col_off,row_off,width,height``.
        val_aoi: Validation region as polygons in a vector file.
        arch: SegFormer variant for a new model (``segformer-b0`` ... ``b5``).
        arch_overrides: SegformerConfig fields changed from the variant (a smaller model, say).
        init_model: Start from this geoseg model file (e.g. from ``geoseg init-model``) instead of ``arch``.
        pretrained: Start from weights in this safetensors file (Hugging Face names); a 3-band
            first layer is widened with :func:`geoseg._adapt.expand_input_bands`.
        window_px: Edge of the square training windows.
        batch_size: Windows per step.
        steps: Optimiser steps in total.
        epoch_steps: Steps between validations (and checkpoints).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay (not applied to norms and biases).
        warmup_steps: Steps of linear warm-up from 0 to ``lr``.
        min_lr_ratio: The cosine decay ends at ``lr * min_lr_ratio``.
        grad_clip: Largest gradient norm (0 disables clipping).
        class_balance: 0 samples windows around random labelled pixels; 1 makes every class equally
            likely as the window's centre class.
        class_weight_power: Cross-entropy weight of a class is ``frequency ** -power`` (0: no weights).
        max_class_weight: Largest class weight relative to the smallest.
        class_weights: Explicit cross-entropy weights, one per class (overrides ``class_weight_power``).
        dice_weight: Weight of the soft Dice loss added to the cross-entropy.
        focal_gamma: Above 0, focal loss with this gamma replaces plain cross-entropy.
        flips: Random horizontal and vertical flips.
        rotate90: Random rotations by multiples of 90 degrees.
        brightness: Largest per-band brightness shift, in standard deviations of the band.
        contrast: Largest per-band relative contrast change.
        band_dropout: Probability that a window has one band set to its mean.
        seed: Seed of weights, sampling and augmentation: the same seed gives the same model.
        precision: ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 on CUDA, fp32 on the CPU).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads for torch (``None``: torch's default).
        tile_size: Tile size suggested to ``geoseg predict`` and used for validation.
        overlap: Tile overlap suggested to ``geoseg predict`` and used for validation.
        half: Store the model's weights as fp16 (half the file size).
        name: Model name.
        description: What the model is for.
        intended_input: What imagery it expects.
        resolution_m: Pixel size in metres (``None``: from the first image, when projected).
        progress_every: Steps between log lines when no progress bar is shown.
    """

    images: tuple[str, ...]
    labels: tuple[str, ...]
    classes: str
    out: str
    label_attribute: str | None = None
    bands: tuple[int, ...] | None = None
    band_names: tuple[str, ...] = ("red", "green", "blue", "nir")
    train_rows: str | None = None
    train_window: str | None = None
    train_aoi: str | None = None
    val_rows: str | None = None
    val_window: str | None = None
    val_aoi: str | None = None
    arch: str = "segformer-b0"
    arch_overrides: Mapping[str, Any] = field(default_factory=dict)
    init_model: str | None = None
    pretrained: str | None = None
    window_px: int = 256
    batch_size: int = 8
    steps: int = 2000
    epoch_steps: int = 200
    lr: float = 6e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    class_balance: float = 0.5
    class_weight_power: float = 0.0
    max_class_weight: float = 10.0
    class_weights: tuple[float, ...] | None = None
    dice_weight: float = 0.5
    focal_gamma: float = 0.0
    flips: bool = True
    rotate90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    band_dropout: float = 0.0
    seed: int = 0
    precision: TrainPrecision = "fp32"
    device: str = "auto"
    threads: int | None = None
    tile_size: int = 256
    overlap: int = 32
    half: bool = False
    name: str | None = None
    description: str = ""
    intended_input: str = ""
    resolution_m: float | None = None
    progress_every: int = 50

    def __post_init__(self) -> None:
        for key in ("images", "labels", "band_names"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, key, tuple(str(v) for v in value))
        if not self.images:
            raise ConfigError("train needs at least one image")
        if len(self.images) != len(self.labels):
            raise ConfigError(
                f"{len(self.images)} images but {len(self.labels)} label files; give one per image"
            )
        if not self.classes:
            raise ConfigError("train needs a classes file")
        if not self.out:
            raise ConfigError("train needs an output model file (out)")
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(self.bands))
            if not self.bands or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.bands
            ):
                raise ConfigError(f"bands must be 1-based band numbers, got {self.bands!r}")
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
            if any(w < 0 for w in self.class_weights):
                raise ConfigError(f"class_weights must be non-negative, got {self.class_weights}")
        object.__setattr__(self, "arch_overrides", dict(self.arch_overrides or {}))
        parse_region(self.train_rows, self.train_window, self.train_aoi)
        parse_region(self.val_rows, self.val_window, self.val_aoi)
        for key in ("window_px", "batch_size", "steps", "epoch_steps", "tile_size", "progress_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.window_px < 32 or self.window_px % 32:
            raise ConfigError(
                f"window_px must be a multiple of 32 (SegFormer's total stride), got {self.window_px}"
            )
        if not isinstance(self.overlap, int) or not 0 <= self.overlap * 2 < self.tile_size:
            raise ConfigError(
                f"overlap must be at least 0 and less than half of tile_size, got {self.overlap!r}"
            )
        for key in ("warmup_steps",):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"{key} must be a non-negative integer, got {getattr(self, key)!r}")
        for key in ("lr", "max_class_weight"):
            if not isinstance(getattr(self, key), (int, float)) or not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be a positive number, got {getattr(self, key)!r}")
        for key in (
            "weight_decay",
            "grad_clip",
            "class_weight_power",
            "dice_weight",
            "focal_gamma",
            "brightness",
        ):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                raise ConfigError(f"{key} must be a non-negative number, got {getattr(self, key)!r}")
        for key in ("min_lr_ratio", "class_balance", "band_dropout"):
            if not isinstance(getattr(self, key), (int, float)) or not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be a number in [0, 1], got {getattr(self, key)!r}")
        if not isinstance(self.contrast, (int, float)) or not 0 <= self.contrast < 1:
            raise ConfigError(f"contrast must be a number in [0, 1), got {self.contrast!r}")
        if self.precision not in get_args(TrainPrecision):
            raise ConfigError(
                f"precision must be one of {', '.join(get_args(TrainPrecision))}, got {self.precision!r}"
            )
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be a positive integer, got {self.threads!r}")
        if self.init_model and self.pretrained:
            raise ConfigError("give init_model or pretrained, not both")

    @property
    def train_region(self) -> Region:
        """The training region (the whole image when none was given)."""
        return parse_region(self.train_rows, self.train_window, self.train_aoi)

    @property
    def has_validation(self) -> bool:
        """Whether the run has a validation region (without one it keeps its last step)."""
        return bool(self.val_rows or self.val_window or self.val_aoi)

    @property
    def val_region(self) -> Region | None:
        """The validation region, or ``None`` when the run has none."""
        return parse_region(self.val_rows, self.val_window, self.val_aoi) if self.has_validation else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                list(value)
                if isinstance(value, tuple)
                else (dict(value) if isinstance(value, Mapping) else value)
            )
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def train_config_keys() -> list[str]:
    """Names a training YAML file may use (the TrainConfig fields)."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_train_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read training settings from YAML; relative paths in it are relative to the file's folder.

    Raises:
        ConfigError: Unreadable file, not a mapping, or an unknown key.
    """
    import yaml

    from .config import yaml_problem

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from err
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}"
        )
    known = set(train_config_keys())
    settings: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise ConfigError(f"{path}: unknown key {raw_key!r}; known keys: {', '.join(sorted(known))}")
        if key in _PATH_KEYS and value is not None:
            value = (
                [_relative_to(path.parent, v) for v in value]
                if isinstance(value, list)
                else _relative_to(path.parent, value)
            )
        if isinstance(value, list) and key != "arch_overrides":
            value = tuple(value)
        settings[key] = value
    return settings


def _relative_to(folder: Path, value: Any) -> str:
    text = os.path.expanduser(str(value))
    return text if os.path.isabs(text) or "://" in text else os.path.normpath(folder / text)


def build_train_config(file_settings: Mapping[str, Any] | None = None, **cli_settings: Any) -> TrainConfig:
    """Merge settings: defaults < config file < CLI values that are not ``None`` (or empty tuples).

    Raises:
        ConfigError: A required setting is missing or a value is invalid.
    """
    merged = dict(file_settings or {})
    given = {k: v for k, v in cli_settings.items() if v is not None and v != ()}
    for prefix in ("train_", "val_"):
        # A region given on the command line replaces the file's, whichever form each uses.
        if any(k in given for k in (f"{prefix}rows", f"{prefix}window", f"{prefix}aoi")):
            for kind in ("rows", "window", "aoi"):
                merged.pop(f"{prefix}{kind}", None)
    merged.update(given)
    missing = [k for k in ("images", "labels", "classes", "out") if k not in merged]
    if missing:
        raise ConfigError(
            f"missing training setting(s): {', '.join(missing)} (give them in --config or as options)"
        )
    try:
        return TrainConfig(**merged)
    except TypeError as err:
        raise ConfigError(str(err)) from err


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did."""

    epoch: int
    step: int
    loss: float
    lr: float
    val_miou: float
    val_overall_accuracy: float
    val_iou: tuple[float | None, ...]
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    out: Path
    checkpoint: Path
    best_epoch: int
    best_step: int
    best_miou: float
    best_metrics: Metrics | None
    history: tuple[EpochRecord, ...]
    steps_done: int
    seconds: float
    metadata: ModelMetadata


@dataclass
class _ImageData:
    """One training image with its labels, regions and reading handles."""

    path: str
    scene: Any  # geoseg.io.Scene
    grid: Grid
    labels: LabelSource
    train: BoundRegion | None
    val: BoundRegion | None
    src: Any = None

    def read(self, window: Window) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Raw pixels ``(C, h, w)`` float32 of the model's bands and their validity ``(h, w)``."""
        scene = self.scene
        raw = self.src.read(scene.band_indexes, window=window)
        return raw.astype(np.float32), valid_pixels(scene, self.src, raw, window=window)

    def close(self) -> None:
        self.labels.close()
        if self.src is not None:
            self.src.close()


@dataclass
class _Dataset:
    """Training statistics and anchors gathered by one scan of the training regions."""

    images: list[_ImageData]
    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]
    class_pixels: npt.NDArray[np.int64]  # labelled training pixels per class
    anchors: list[npt.NDArray[np.int64]]  # per class: (n, 3) rows of (image, row, col)

    def close(self) -> None:
        for image in self.images:
            image.close()


def train_model(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    max_epochs: int | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train a model and write its best epoch (by validation mIoU) to ``config.out``.

    Writes ``config.out`` (a geoseg model file, atomically, whenever validation mIoU improves;
    after every epoch when the run has no validation region, so it ends as the last step's model)
    and a checkpoint beside it (``<out>.ckpt.safetensors`` and ``<out>.ckpt.json``, after every
    epoch) from which ``resume=True`` continues an interrupted run exactly.

    Args:
        config: The settings.
        resume: Continue from the checkpoint beside ``config.out``.
        overwrite: Replace an existing ``config.out`` when starting afresh.
        progress: Show a progress bar on stderr with the loss and the latest mIoU.
        max_epochs: Stop after this many epochs in this call (the run can be resumed later).
        on_epoch: Called after each epoch's validation.

    Returns:
        The best epoch's figures and the run's history (without a validation region: the last
        epoch, ``best_miou`` NaN and no ``best_metrics``).

    Raises:
        InputError: Unreadable or inconsistent inputs, too few labelled pixels, empty validation region.
        ConfigError: Invalid settings, or settings that differ from the checkpoint's when resuming.
        CheckpointError: Unusable init model, pretrained weights or checkpoint.
        OutputError: ``config.out`` exists (without ``overwrite`` or ``resume``) or cannot be written.
    """
    import torch

    from ._remote import is_remote
    from .inference import resolve_device
    from .pipeline import gdal_options

    started = time.perf_counter()
    out = Path(config.out)
    ckpt_path, ckpt_json = checkpoint_paths(out)
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name")
    inputs = {"training image": config.images, "labels": config.labels, "classes file": config.classes,
              "init model": config.init_model, "pretrained weights": config.pretrained,
              "training polygons": config.train_aoi, "validation polygons": config.val_aoi}
    check_not_an_input(out, inputs)
    for written in (ckpt_path, ckpt_json):  # also written, beside --out
        check_not_an_input(written, inputs, option="the checkpoint of --out")
    state = None
    if resume:
        state = _read_checkpoint_state(ckpt_json, config)
    elif out.exists() and not overwrite:
        raise OutputError(
            f"{out}: already exists (use --overwrite to replace it, or --resume to continue its run)"
        )

    device = resolve_device(config.device)
    precision = _resolve_train_precision(config.precision, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    class_map = ClassMap(*load_classes(config.classes))

    with rasterio.Env(**gdal_options(remote=any(map(is_remote, (*config.images, *config.labels))))):
        base_meta, init_state = _initial_model(config, class_map)
        data = _scan(config, class_map, base_meta)
        try:
            metadata = _final_metadata(config, base_meta, data)
            return _fit(
                config,
                data,
                metadata,
                init_state,
                state,
                device,
                precision,
                progress,
                max_epochs,
                on_epoch,
                started,
            )
        finally:
            data.close()


def checkpoint_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The checkpoint's tensor file and JSON sidecar for a model written to ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt.safetensors"), out.with_name(out.name + ".ckpt.json")


def _resolve_train_precision(name: str, device: Any) -> str:
    from .inference import resolve_precision

    if name == "auto":
        return resolve_precision("auto", device)
    return name


def _initial_model(config: TrainConfig, class_map: ClassMap) -> tuple[ModelMetadata, dict[str, Any] | None]:
    """Metadata of the network to train and, for ``init_model``/``pretrained``, the weights to start from."""
    import torch

    from .modelfile import build_network, load_model, new_metadata

    if config.init_model:
        loaded = load_model(config.init_model)
        meta = loaded.metadata
        arch_config = dict(meta.arch_config) | {"num_labels": class_map.num_classes}
        source_bands = config.bands or tuple(b.source_band for b in meta.bands)
        if len(source_bands) != len(meta.bands):
            raise ConfigError(
                f"--bands lists {len(source_bands)} bands but {config.init_model} takes {len(meta.bands)} "
                f"({', '.join(b.name for b in meta.bands)})"
            )
        meta = dataclasses.replace(
            meta,
            arch_config=arch_config,
            classes=class_map.classes,
            ignore_index=class_map.ignore_index,
            bands=tuple(
                dataclasses.replace(b, source_band=s) for b, s in zip(meta.bands, source_bands, strict=True)
            ),
        )
        try:
            network = build_network(meta)
        except CheckpointError as err:
            raise CheckpointError(f"{config.init_model}: {err}") from err
        target = network.state_dict()
        weights = {
            k: v for k, v in loaded.module.state_dict().items() if k in target and v.shape == target[k].shape
        }
        dropped = sorted(set(target) - set(weights))
        if dropped:
            log.info(
                "%s: %d tensors start fresh (other classes): %s",
                config.init_model,
                len(dropped),
                ", ".join(dropped),
            )
        return meta, weights
    band_names = config.band_names
    if config.bands is not None and len(config.bands) != len(band_names):
        raise ConfigError(
            f"--bands lists {len(config.bands)} bands but the model takes {len(band_names)} "
            f"({', '.join(band_names)}; band_names in the config file)"
        )
    meta = new_metadata(
        config.arch,
        band_names,
        class_map.classes,
        source_bands=config.bands,
        arch_overrides=config.arch_overrides,
        ignore_index=class_map.ignore_index,
    )
    if config.arch_overrides:
        # NOTE: a variant with changed hyper-parameters is no longer the official one; say so.
        meta = dataclasses.replace(meta, variant=f"{meta.variant}-custom")
    if not config.pretrained:
        return meta, None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ._adapt import adapt_state_dict

    path = Path(config.pretrained)
    if not path.is_file():
        raise CheckpointError(f"{path}: pretrained weights not found")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a safetensors file ({str(err).splitlines()[0]})") from err
    torch.manual_seed(config.seed)
    target = build_network(meta).state_dict()
    chosen, loaded_keys, skipped = adapt_state_dict({k: v.float() for k, v in tensors.items()}, target)
    if not chosen:
        raise CheckpointError(
            f"{path}: no tensor matches a {meta.variant} network (are these SegFormer weights?)"
        )
    log.info("%s: loaded %d of %d tensors; skipped %d", path, len(loaded_keys), len(target), len(skipped))
    for line in skipped:
        log.debug("skipped %s", line)
    return meta, chosen


def _scan(config: TrainConfig, class_map: ClassMap, meta: ModelMetadata) -> _Dataset:
    """Open every input, check it, and gather statistics and anchors from the training regions."""
    rng = np.random.default_rng([config.seed, 1])
    k = class_map.num_classes
    images: list[_ImageData] = []
    sums = np.zeros(len(meta.bands))
    squares = np.zeros(len(meta.bands))
    count = 0
    class_pixels = np.zeros(k, np.int64)
    val_pixels = 0
    keys: list[npt.NDArray[np.float64]] = [np.empty(0) for _ in range(k)]
    positions: list[npt.NDArray[np.int64]] = [np.empty((0, 3), np.int64) for _ in range(k)]
    val_region = config.val_region  # parsed once, bound to each image
    try:
        for index, (image_path, label_path) in enumerate(zip(config.images, config.labels, strict=True)):
            scene = open_scene(image_path, meta, config.bands)
            grid = Grid(scene.width, scene.height, scene.crs, scene.transform)
            labels = open_labels(label_path, grid, class_map, config.label_attribute)
            image = _ImageData(image_path, scene, grid, labels, None, None)
            images.append(image)
            image.src = rasterio.open(image_path)
            image.val = (_bind_optional(val_region, grid, f"{image_path}: the validation region")
                         if val_region is not None else None)
            image.train = _bind_optional(config.train_region, grid, f"{image_path}: the training region")
            if image.val is not None:
                val_pixels += _count_labelled(image, image.val)
            if image.train is None:
                continue
            for window in row_blocks(image.train.bbox, _SCAN_ROWS):
                raw, valid = image.read(window)
                inside = image.train.mask(window)
                if image.val is not None:
                    inside &= ~image.val.mask(window)
                use = valid & inside
                pixels = raw[:, use].astype(np.float64)
                sums += pixels.sum(axis=1)
                squares += (pixels**2).sum(axis=1)
                count += pixels.shape[1]
                target = image.labels.read(window)
                target[~use] = IGNORE
                class_pixels += np.bincount(target[target != IGNORE], minlength=k)[:k]
                for c in range(k):
                    rows, cols = np.nonzero(target == c)
                    if not rows.size:
                        continue
                    found = np.stack(
                        [np.full(rows.size, index), rows + int(window.row_off), cols + int(window.col_off)], 1
                    )
                    # Bottom-k of uniform keys is a uniform sample without replacement, in bounded memory.
                    keys[c] = np.concatenate([keys[c], rng.random(rows.size)])
                    positions[c] = np.concatenate([positions[c], found])
                    if keys[c].size > _MAX_ANCHORS:
                        keep = np.argpartition(keys[c], _MAX_ANCHORS)[:_MAX_ANCHORS]
                        keys[c], positions[c] = keys[c][keep], positions[c][keep]
    except BaseException:
        for image in images:
            image.close()
        raise
    dataset = _Dataset(
        images,
        np.zeros(0),
        np.zeros(0),
        class_pixels,
        [p[np.argsort(kk)] for p, kk in zip(positions, keys, strict=True)],
    )
    try:
        _check_dataset(config, dataset, count, val_pixels)
    except BaseException:
        dataset.close()
        raise
    dataset.mean = sums / count
    dataset.std = np.sqrt(np.maximum(squares / count - dataset.mean**2, 0.0))
    dataset.std = np.where(dataset.std > 1e-6 * np.maximum(np.abs(dataset.mean), 1.0), dataset.std, 1.0)
    log.info(
        "training pixels: %d (labelled per class: %s); validation pixels: %s",
        count,
        ", ".join(f"{n}={int(v)}" for n, v in zip(class_map.names, class_pixels, strict=True)),
        val_pixels if config.has_validation else "none (no validation region)",
    )
    return dataset


def _bind_optional(region: Region, grid: Grid, what: str) -> BoundRegion | None:
    """Bind a region, or ``None`` when it misses this image (one of several)."""
    try:
        return region.on(grid, what)
    except RegionOutsideError:  # an unreadable polygon file is still an error
        return None


def _count_labelled(image: _ImageData, region: BoundRegion) -> int:
    total = 0
    for window in row_blocks(region.bbox, _SCAN_ROWS):
        target = image.labels.read(window)
        _, valid = image.read(window)
        total += int(((target != IGNORE) & valid & region.mask(window)).sum())
    return total


def _check_dataset(config: TrainConfig, data: _Dataset, count: int, val_pixels: int) -> None:
    where = ", ".join(config.images)
    if config.has_validation and all(im.val is None for im in data.images):
        sizes = ", ".join(f"{im.path} ({im.grid.width}x{im.grid.height} px)" for im in data.images)
        raise InputError(f"the validation region ({config.val_region.describe()}) lies outside {sizes}")
    if config.has_validation and val_pixels == 0:
        raise InputError(
            f"{where}: the validation region ({config.val_region.describe()}) holds no labelled pixel; "
            "choose a region that overlaps the labels"
        )
    w = config.window_px
    fits = [
        im
        for im in data.images
        if im.train is not None and im.train.bbox.height >= w and im.train.bbox.width >= w
    ]
    if not fits:
        sizes = ", ".join(
            f"{im.path}: {int(im.train.bbox.width)}x{int(im.train.bbox.height)}"
            if im.train
            else f"{im.path}: empty"
            for im in data.images
        )
        raise InputError(
            f"the training region ({config.train_region.describe()}) is smaller than one {w} px window "
            f"({sizes}); "
            "use a smaller window_px or a larger region"
        )
    labelled = int(data.class_pixels.sum())
    needed = max(w * w // 16, 64)
    if labelled < needed:
        raise InputError(
            f"{where}: only {labelled} labelled pixels in the training region "
            f"({config.train_region.describe()}, minus validation); {w} px windows need at least {needed}: "
            "label more pixels or use a smaller window_px"
        )
    if count == 0:
        raise InputError(f"{where}: no valid image pixel in the training region")


def _final_metadata(config: TrainConfig, meta: ModelMetadata, data: _Dataset) -> ModelMetadata:
    first = data.images[0]
    resolution = config.resolution_m
    if resolution is None and first.grid.crs is not None and first.grid.crs.is_projected:
        resolution = round(abs(first.grid.transform.a), 6)
    source_bands = tuple(first.scene.band_indexes)
    return dataclasses.replace(
        meta,
        name=config.name or meta.name,
        bands=tuple(
            dataclasses.replace(b, source_band=s) for b, s in zip(meta.bands, source_bands, strict=True)
        ),
        normalization=Normalization(
            "meanstd", mean=tuple(float(m) for m in data.mean), std=tuple(float(s) for s in data.std)
        ),
        tile_size=config.tile_size,
        overlap=config.overlap,
        resolution_m=resolution,
        intended_input=config.intended_input or meta.intended_input,
        description=config.description or meta.description,
    )


def class_weights_for(config: TrainConfig, class_pixels: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """Cross-entropy weight per class: explicit, or ``frequency ** -power`` scaled so the smallest is 1.

    Classes without training pixels get weight 0 (they cannot be learnt, only over-predicted).
    """
    k = len(class_pixels)
    if config.class_weights is not None:
        if len(config.class_weights) != k:
            raise ConfigError(f"class_weights lists {len(config.class_weights)} values for {k} classes")
        return np.asarray(config.class_weights, np.float32)
    present = class_pixels > 0
    weights = np.zeros(k, np.float64)
    freq = class_pixels[present] / class_pixels.sum()
    raw = freq ** (-config.class_weight_power)
    weights[present] = np.minimum(raw / raw.min(), config.max_class_weight)
    return weights.astype(np.float32)


def class_sampling_probabilities(
    balance: float, class_pixels: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """Probability of each class as a window's anchor: ``pixels ** (1 - balance)``, normalised.

    ``balance`` 0 is the natural frequency, 1 is uniform over the classes present.
    """
    present = class_pixels > 0
    p = np.zeros(len(class_pixels))
    p[present] = class_pixels[present].astype(np.float64) ** (1.0 - balance)
    return p / p.sum()


class WindowSampler:
    """Draws augmented training windows; all randomness comes from the generator it is given."""

    def __init__(
        self,
        config: TrainConfig,
        data: _Dataset,
        multiplier: npt.NDArray[np.float32],
        bias: npt.NDArray[np.float32],
    ):
        self.config = config
        self.data = data
        self.class_p = class_sampling_probabilities(config.class_balance, data.class_pixels)
        self._mul = multiplier[:, None, None]
        self._bias = bias[:, None, None]

    def batch(self, rng: np.random.Generator) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``(pixels (N, C, W, W) float32 normalised, targets (N, W, W) int64 with IGNORE)``."""
        samples = [self.sample(rng) for _ in range(self.config.batch_size)]
        return np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples]).astype(np.int64)

    def sample(self, rng: np.random.Generator) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        """One augmented window and its class indexes."""
        image, window = self._draw_window(rng)
        raw, valid = image.read(window)
        pixels = raw * self._mul + self._bias
        target = image.labels.read(window)
        if not image.train.is_rectangular:  # type: ignore[union-attr]
            target[~image.train.mask(window)] = IGNORE  # type: ignore[union-attr]
        target[~valid] = IGNORE
        pixels[:, ~valid] = 0.0
        return self._augment(pixels, target, valid, rng)

    def _draw_window(self, rng: np.random.Generator) -> tuple[_ImageData, Window]:
        w = self.config.window_px
        for _ in range(1000):
            c = int(rng.choice(len(self.class_p), p=self.class_p))
            anchors = self.data.anchors[c]
            index, row, col = anchors[int(rng.integers(len(anchors)))]
            image = self.data.images[int(index)]
            box = image.train.bbox  # type: ignore[union-attr]
            if box.height < w or box.width < w:
                continue
            lo_r, hi_r = max(int(box.row_off), row - w + 1), min(row, int(box.row_off + box.height) - w)
            lo_c, hi_c = max(int(box.col_off), col - w + 1), min(col, int(box.col_off + box.width) - w)
            window = Window(int(rng.integers(lo_c, hi_c + 1)), int(rng.integers(lo_r, hi_r + 1)), w, w)
            if image.val is not None and image.val.intersects(window):
                continue  # never let a training window see the validation region
            return image, window
        region = self.config.val_region.describe() if self.config.has_validation else "none"
        raise InputError(
            f"no {w} px training window avoids the validation region ({region}); "
            "use a smaller window_px or separate the regions"
        )

    def _augment(
        self,
        pixels: npt.NDArray[np.float32],
        target: npt.NDArray[np.uint8],
        valid: npt.NDArray[np.bool_],
        rng: np.random.Generator,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        cfg = self.config
        # Draw every random number whether or not it is used, so settings do not shift the stream.
        flip_h, flip_v, quarter_turns = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(4))
        n_bands = pixels.shape[0]
        gain = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast, n_bands)
        shift = rng.uniform(-cfg.brightness, cfg.brightness, n_bands)
        drop, drop_band = rng.random() < cfg.band_dropout, int(rng.integers(n_bands))
        if cfg.flips and flip_h:
            pixels, target, valid = pixels[:, :, ::-1], target[:, ::-1], valid[:, ::-1]
        if cfg.flips and flip_v:
            pixels, target, valid = pixels[:, ::-1], target[::-1], valid[::-1]
        if cfg.rotate90 and quarter_turns:
            pixels = np.rot90(pixels, quarter_turns, axes=(1, 2))
            target, valid = np.rot90(target, quarter_turns), np.rot90(valid, quarter_turns)
        # Normalised bands have mean 0, so scaling about 0 changes contrast and adding shifts brightness.
        pixels = pixels * gain[:, None, None].astype(np.float32) + shift[:, None, None].astype(np.float32)
        if drop:
            pixels[drop_band] = 0.0
        pixels[:, ~valid] = 0.0
        return np.ascontiguousarray(pixels, dtype=np.float32), np.ascontiguousarray(target)


def segmentation_loss(
    logits: Any,
    target: Any,
    class_weights: Any | None = None,
    dice_weight: float = 0.0,
    focal_gamma: float = 0.0,
) -> Any:
    """Cross-entropy (or focal) plus soft Dice, ignoring pixels whose target is :data:`IGNORE`.

    Args:
        logits: ``(N, K, H, W)`` float tensor at the targets' resolution.
        target: ``(N, H, W)`` int64 class indexes.
        class_weights: ``(K,)`` weights of the (focal) cross-entropy, or ``None``.
        dice_weight: Weight of ``1 - mean soft Dice`` over the classes present in ``target``.
        focal_gamma: 0 for cross-entropy; above 0, focal loss ``(1 - p_t) ** gamma * CE``
            (Lin et al. 2017, "Focal Loss for Dense Object Detection").

    Returns:
        A scalar tensor (0 when no pixel is labelled).
    """
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    valid = target != IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits, safe_target, reduction="none")  # (N, H, W)
    if focal_gamma > 0:
        p_t = torch.exp(-ce)
        ce = (1.0 - p_t) ** focal_gamma * ce
    weights = valid.float()
    if class_weights is not None:
        weights = weights * class_weights[safe_target]
    loss = (ce * weights).sum() / weights.sum().clamp_min(1e-8)
    if dice_weight > 0:
        k = logits.shape[1]
        probs = torch.softmax(logits, dim=1) * valid.unsqueeze(1)
        onehot = F.one_hot(safe_target, k).permute(0, 3, 1, 2).float() * valid.unsqueeze(1)
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        cardinality = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * intersection + 1.0) / (cardinality + 1.0)
        present = onehot.sum(dims) > 0
        loss = loss + dice_weight * (1.0 - dice[present]).mean()
    return loss


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine decay to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _parameter_groups(network: Any, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, param in sorted(network.named_parameters()):
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fit(
    config: TrainConfig,
    data: _Dataset,
    metadata: ModelMetadata,
    init_state: dict[str, Any] | None,
    resume_state: dict[str, Any] | None,
    device: Any,
    precision: str,
    progress: bool,
    max_epochs: int | None,
    on_epoch: Callable[[EpochRecord], None] | None,
    started: float,
) -> TrainResult:
    import torch
    from tqdm import tqdm

    from .inference import upsample_logits
    from .modelfile import build_network, save_model

    out = Path(config.out)
    ckpt_path, ckpt_json = checkpoint_paths(out)
    torch.manual_seed(config.seed)
    network = build_network(metadata)
    if init_state is not None:
        network.load_state_dict(init_state, strict=False)
    network.to(device)
    optimizer = torch.optim.AdamW(
        _parameter_groups(network, config.weight_decay), lr=config.lr, betas=(0.9, 0.999)
    )
    mul, bias = (np.asarray(v, np.float32) for v in metadata.normalization.multiplier_and_bias())
    sampler = WindowSampler(config, data, mul, bias)
    weights = class_weights_for(config, data.class_pixels)
    use_weights = config.class_weights is not None or config.class_weight_power > 0
    weight_tensor = torch.as_tensor(weights, device=device) if use_weights else None
    log.info("class sampling probabilities: %s", np.round(sampler.class_p, 4).tolist())
    if use_weights:
        log.info("class weights: %s", np.round(weights, 3).tolist())
    rng = np.random.default_rng([config.seed, 2])
    step, epoch, best = 0, 0, {"miou": -1.0, "epoch": 0, "step": 0, "metrics": None}
    history: list[EpochRecord] = []
    if resume_state is not None:
        step, epoch, best, history = _restore(resume_state, ckpt_path, network, optimizer, rng, device)
        log.info("resuming at step %d (epoch %d, best mIoU %.4f)", step, epoch, best["miou"])
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    bar = tqdm(
        total=config.steps,
        initial=step,
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    epochs_run = 0
    running: list[float] = []
    latest_miou = history[-1].val_miou if history else float("nan")
    checkpointed = step if resume_state is not None else None  # the step the checkpoint on disk holds
    try:
        while step < config.steps and (max_epochs is None or epochs_run < max_epochs):
            epoch_started = time.perf_counter()
            network.train()
            epoch_end = min(step + config.epoch_steps, config.steps)
            losses = []
            while step < epoch_end:
                lr = learning_rate(config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                pixels, target = sampler.batch(rng)
                inputs = torch.from_numpy(pixels).to(device)
                target_t = torch.from_numpy(target).to(device)
                with torch.autocast(**autocast):
                    logits = network(inputs)
                # (N, K, W/s, W/s) at the first stride s (4, or 2 for a finer decoder) -> (N, K, W, W):
                # the loss sees every labelled pixel.
                logits = upsample_logits(logits, tuple(target_t.shape[-2:]))
                loss = segmentation_loss(
                    logits, target_t, weight_tensor, config.dice_weight, config.focal_gamma
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip)
                optimizer.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ConfigError(
                        f"training diverged at step {step} (loss {value}); lower lr or use precision fp32"
                    )
                losses.append(value)
                running = (running + [value])[-20:]
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(running):.3f}", mIoU=f"{latest_miou:.3f}", refresh=False)
                if not progress and step % config.progress_every == 0:
                    log.info("step %d/%d loss %.4f lr %.2e", step, config.steps, np.mean(running), lr)
            epoch += 1
            epochs_run += 1
            loss = float(np.mean(losses))
            metrics = None
            val_miou, val_overall_accuracy, val_iou = float("nan"), float("nan"), ()
            if config.has_validation:
                metrics = validate(network, data, metadata, device, precision, config.batch_size)
                latest_miou = val_miou = metrics.miou
                val_overall_accuracy = metrics.overall_accuracy
                val_iou = tuple(None if math.isnan(v) else round(float(v), 6) for v in metrics.iou)
                log.info("epoch %d (step %d): loss %.4f, validation mIoU %.4f, OA %.4f",
                         epoch, step, loss, val_miou, val_overall_accuracy)
            else:
                log.info("epoch %d (step %d): loss %.4f", epoch, step, loss)
            record = EpochRecord(
                epoch=epoch,
                step=step,
                loss=loss,
                lr=learning_rate(config, step - 1),
                val_miou=val_miou,
                val_overall_accuracy=val_overall_accuracy,
                val_iou=val_iou,
                seconds=time.perf_counter() - epoch_started,
            )
            history.append(record)
            bar.set_postfix(loss=f"{np.mean(running):.3f}", mIoU=f"{latest_miou:.3f}")
            # Without validation there is nothing to choose by: each epoch replaces the last.
            if metrics is None or metrics.miou > best["miou"]:
                best = {
                    "miou": val_miou,
                    "epoch": epoch,
                    "step": step,
                    "metrics": metrics.to_dict() if metrics else None,
                }
                final = _with_provenance(metadata, config, best, data)
                save_model(out, network.state_dict(), final, half=config.half)
                log.info("wrote %s (%s)", out, "best so far" if metrics else "no validation region")
            _write_checkpoint(
                ckpt_path, ckpt_json, config, network, optimizer, rng, step, epoch, best, history
            )
            checkpointed = step
            if on_epoch is not None:
                on_epoch(record)
    except KeyboardInterrupt as err:
        if checkpointed is not None:  # say what is on disk (the CLI prints notes with its message)
            what = (f"the best epoch so far (epoch {best['epoch']}, step {best['step']})"
                    if config.has_validation else f"the model after step {best['step']}")
            err.add_note(f"{out} holds {what}; its checkpoint continues from step {checkpointed} "
                         "with --resume")
        else:
            err.add_note(f"no epoch had finished; {out} was not written")
        raise
    finally:
        bar.close()
    best_metrics = None
    if best["metrics"] is not None:
        cm = np.asarray(best["metrics"]["confusion_matrix"]["counts"], np.int64)
        best_metrics = Metrics(cm, metadata_ids(metadata), tuple(c.name for c in metadata.classes))
    return TrainResult(
        out=out,
        checkpoint=ckpt_path,
        best_epoch=int(best["epoch"]),
        best_step=int(best["step"]),
        best_miou=float(best["miou"]),
        best_metrics=best_metrics,
        history=tuple(history),
        steps_done=step,
        seconds=time.perf_counter() - started,
        metadata=metadata,
    )


def metadata_ids(metadata: ModelMetadata) -> tuple[int, ...]:
    """Class ids of a model, in output order."""
    return tuple(c.id for c in metadata.classes)


def _with_provenance(
    metadata: ModelMetadata, config: TrainConfig, best: Mapping[str, Any], data: _Dataset
) -> ModelMetadata:
    settings = config.to_dict()
    settings.pop("out")  # where this copy was written says nothing about the model
    for key in ("images", "labels"):
        settings[key] = [os.path.basename(p) for p in settings[key]]
    for key in ("classes", "init_model", "pretrained", "train_aoi", "val_aoi"):
        if settings.get(key):
            settings[key] = os.path.basename(settings[key])
    if not config.has_validation:
        selection = {
            "train_region": config.train_region.describe(),
            "val_region": None,
            "selection": "last step (no validation region)",
            "epoch": int(best["epoch"]),
            "step": int(best["step"]),
        }
    else:
        selection = {
            "train_region": config.train_region.describe() + " (validation region excluded)",
            "val_region": config.val_region.describe(),
            "selection": "best validation mIoU",
            "best_epoch": int(best["epoch"]),
            "best_step": int(best["step"]),
            "val_miou": round(float(best["miou"]), 6),
            "val_overall_accuracy": best["metrics"]["overall_accuracy"],
            "val_iou": {c["name"]: c["iou"] for c in best["metrics"]["classes"]},
        }
    provenance = dict(metadata.provenance) | {
        "created_by": f"geoseg {__version__} train",
        "trained": True,
        "images": [os.path.basename(p) for p in config.images],
        "labels": [os.path.basename(p) for p in config.labels],
        **selection,
        "seed": config.seed,
        "steps": config.steps,
        "training_pixels_per_class": {
            c.name: int(n) for c, n in zip(metadata.classes, data.class_pixels, strict=True)
        },
        "config": settings,
    }
    return dataclasses.replace(metadata, provenance=provenance)


def validate(
    network: Any,
    data: _Dataset,
    metadata: ModelMetadata,
    device: Any,
    precision: str,
    batch_size: int,
) -> Metrics:
    """Predict every image's validation region as ``geoseg predict`` would, and score it.

    Only pixels inside the region are read (a region smaller than a tile is padded by
    reflection), so validation never sees imagery outside it.
    """
    k = len(metadata.classes)
    confusion = np.zeros((k, k), np.int64)
    mul, bias = (
        np.asarray(v, np.float32)[:, None, None] for v in metadata.normalization.multiplier_and_bias()
    )
    network.eval()
    for image in data.images:
        if image.val is None:
            continue
        for rows_window, labels in predict_region(
            network,
            k,
            image,
            image.val.bbox,
            mul,
            bias,
            metadata.tile_size,
            metadata.overlap,
            device,
            precision,
            batch_size,
        ):
            target = image.labels.read(rows_window)
            valid = (target != IGNORE) & (labels != IGNORE)
            if not image.val.is_rectangular:
                valid &= image.val.mask(rows_window)
            confusion += confusion_matrix(target, labels, k, valid)
    network.train()
    return Metrics(confusion, metadata_ids(metadata), tuple(c.name for c in metadata.classes))


def predict_region(
    network: Any,
    num_classes: int,
    image: _ImageData,
    bbox: Window,
    mul: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    tile_px: int,
    overlap_px: int,
    device: Any,
    precision: str,
    batch_size: int,
):
    """Yield ``(window, class indexes (h, W) uint8)`` row blocks of ``bbox``, top to bottom.

    Tiles, taper and blending are those of ``geoseg predict``; pixels that are nodata in the
    image come out as :data:`IGNORE`.
    """
    import torch

    from .blend import TileBlender
    from .inference import upsample_logits
    from .tiling import TileGrid

    height, width = int(bbox.height), int(bbox.width)
    top, left = int(bbox.row_off), int(bbox.col_off)
    small = -(-max(height, width) // 32) * 32
    if small < tile_px:
        tile_px, overlap_px = small, 0
    grid = TileGrid(height, width, tile_px, overlap_px)
    blender = TileBlender(grid, num_classes, taper_floor=0.1)

    def finished(bands):
        for block in bands:
            labels = block.labels.astype(np.uint8)
            labels[~block.valid] = IGNORE
            yield Window(left, top + block.row, width, labels.shape[0]), labels

    tiles = list(grid)
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start : start + batch_size]
        pixels, valids, extents = [], [], []
        for tile in chunk:
            h, w = min(tile.size, height - tile.y), min(tile.size, width - tile.x)
            raw, valid = image.read(Window(left + tile.x, top + tile.y, w, h))
            x = raw * mul + bias
            x[:, ~valid] = 0.0
            if h < tile.size or w < tile.size:
                pad = ((0, 0), (0, tile.size - h), (0, tile.size - w))
                x = np.pad(x, pad, mode="reflect" if min(h, w) > 1 else "edge")
            pixels.append(x)
            valids.append(valid)
            extents.append((h, w))
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
        ):
            logits = network(torch.from_numpy(np.stack(pixels)).to(device))
        logits = upsample_logits(logits, (grid.tile_px, grid.tile_px))
        logits = logits.cpu().numpy()
        for tile, tile_logits, valid, (h, w) in zip(chunk, logits, valids, extents, strict=True):
            yield from finished(blender.add(tile, tile_logits[:, :h, :w], valid))
    yield from finished(blender.finish())


def _write_checkpoint(
    ckpt_path: Path,
    ckpt_json: Path,
    config: TrainConfig,
    network: Any,
    optimizer: Any,
    rng: np.random.Generator,
    step: int,
    epoch: int,
    best: Mapping[str, Any],
    history: Sequence[EpochRecord],
) -> None:
    """Weights, optimiser moments and torch RNG state to safetensors; counters and numpy RNG to JSON.

    Both files are written under temporary names and renamed; the JSON names the step that the
    tensors hold, so a torn pair is detected on resume.
    """
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {
        f"model/{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()
    }
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            tensors[f"optim/{i}/{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    token = f"{step}-{time.time_ns()}"
    tmp = ckpt_path.with_name(f".{ckpt_path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"token": token})
        apply_umask(tmp)
        os.replace(tmp, ckpt_path)
    finally:
        tmp.unlink(missing_ok=True)
    state = {
        "format": "geoseg-train-checkpoint",
        "version": 1,
        "token": token,
        "step": step,
        "epoch": epoch,
        "best": dict(best),
        "history": [dataclasses.asdict(r) for r in history],
        "numpy_rng": rng.bit_generator.state,
        "config": config.to_dict(),
        "paths": _resolved_paths(config),
        "geoseg_version": __version__,
    }
    tmp_json = ckpt_json.with_name(f".{ckpt_json.name}.tmp{os.getpid()}")
    try:
        tmp_json.write_text(json.dumps(state, indent=1))
        os.replace(tmp_json, ckpt_json)
    finally:
        tmp_json.unlink(missing_ok=True)


def _read_checkpoint_state(ckpt_json: Path, config: TrainConfig) -> dict[str, Any]:
    if not ckpt_json.is_file():
        raise CheckpointError(f"{ckpt_json}: no checkpoint to resume from (start without --resume)")
    try:
        state = json.loads(ckpt_json.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{ckpt_json}: unreadable checkpoint ({err})") from err
    if state.get("format") != "geoseg-train-checkpoint":
        raise CheckpointError(f"{ckpt_json}: not a geoseg training checkpoint")
    saved, now = state.get("config", {}), json.loads(json.dumps(config.to_dict()))
    same_anyway = set(_RESUMABLE_CHANGES)
    if "paths" in state:  # files compare by where they are, not as typed (another folder, absolute paths)
        saved_paths, now_paths = state["paths"], _resolved_paths(config)
        same_anyway |= {k for k in now_paths if saved_paths.get(k) == now_paths[k]}
        saved, now = {**saved, **saved_paths}, {**now, **now_paths}
    changed = sorted(k for k in set(saved) | set(now) if k not in same_anyway and saved.get(k) != now.get(k))
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise ConfigError(
            f"{ckpt_json}: settings differ from the interrupted run ({details}); "
            "resume with the same settings"
        )
    return state


def _resolved_paths(config: TrainConfig) -> dict[str, Any]:
    """The run's input files as absolute, link-free paths (URLs and GDAL paths as given)."""

    def resolve(path: str) -> str:
        return path if "://" in path or path.startswith("/vsi") else os.path.realpath(path)

    settings = config.to_dict()
    return {
        key: None if settings[key] is None else
        [resolve(v) for v in settings[key]] if isinstance(settings[key], list) else resolve(settings[key])
        for key in _PATH_KEYS if key != "out"
    }


def _restore(
    state: Mapping[str, Any],
    ckpt_path: Path,
    network: Any,
    optimizer: Any,
    rng: np.random.Generator,
    device: Any,
) -> tuple[int, int, dict[str, Any], list[EpochRecord]]:
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(ckpt_path), framework="pt") as f:
            token = (f.metadata() or {}).get("token")
        tensors = load_file(str(ckpt_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{ckpt_path}: unreadable checkpoint ({str(err).splitlines()[0]})") from err
    if token != state.get("token"):
        raise CheckpointError(
            f"{ckpt_path}: tensors and JSON sidecar come from different steps; cannot resume"
        )
    model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        network.load_state_dict(model_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{ckpt_path}: weights do not fit the network ({str(err).splitlines()[0]})"
        ) from err
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, param in enumerate(params):
        entry = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim/{i}/")}
        if entry:
            optimizer.state[param] = {
                name: (value if name == "step" else value.to(device)) for name, value in entry.items()
            }
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    rng.bit_generator.state = state["numpy_rng"]
    history = [EpochRecord(**{**r, "val_iou": tuple(r["val_iou"])}) for r in state.get("history", [])]
    return int(state["step"]), int(state["epoch"]), dict(state["best"]), history
