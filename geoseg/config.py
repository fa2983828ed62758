"""Prediction settings: one frozen dataclass, YAML presets, and the precedence between them.

Precedence, lowest first: the dataclass defaults < the model file's suggestions (tile size,
overlap) < a ``--config`` YAML file < CLI flags the user actually gave. Fields left ``None``
mean "take it from the model file", which is how the model's layer slots in.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from .crf import CrfConfig, crf_config_from_mapping
from .errors import ConfigError

Device = str  # "auto", "cpu", "cuda" or "cuda:N"
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Compression = Literal["deflate", "zstd", "lzw", "none"]

DEFAULT_TILE_PX = 512
DEFAULT_OVERLAP_PX = 64
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class PredictConfig:
    """Everything that steers one prediction; validated on construction.

    Attributes:
        model: Path of a geoseg model file; ``None`` uses the bundled default model.
        tile: Tile edge in pixels fed to the model; ``None`` takes the model's suggestion.
        overlap: Pixels shared by neighbouring tiles; ``None`` takes the model's suggestion.
        batch_size: Tiles per forward pass.
        bands: 1-based raster bands feeding the model's inputs, in the model's order;
            ``None`` matches band descriptions to the model's band names, else uses the
            model's default source bands.
        nodata: Input value to treat as nodata, overriding the file's own nodata value.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` picks the fastest precision that keeps the class map on this device.
        taper_floor: Smallest blending weight at a tile's edge, relative to its centre (0 < f <= 1).
        output_nodata: Class-raster value written where the input is nodata.
        compress: Compression of the output GeoTIFF.
        prefetch_batches: Batches read ahead of the model (bounded, so memory stays flat).
        threads: Intra-op CPU threads for torch; ``None`` leaves torch's default (all cores).
        parallel_batches: CPU only: batches run through the network at once, each on its own
            thread with an equal share of ``threads``; ``None``: one per four threads, at least
            2 (with 2 threads or more) and at most 8.
        reader_threads: Threads reading and decoding tiles, each with its own dataset handle;
            ``None``: 1 on the CPU, up to 8 (half the cores) beside a GPU.
        compile: Run the network through ``torch.compile`` (the first batch compiles, about a
            minute for B0 on a CPU; needs a C++ compiler). No effect on ONNX models.
        trace: On the CPU (fp32, bf16), run the network as a traced TorchScript graph, which frees
            the GIL between its operators (:class:`geoseg.inference.TracedNetwork`); ``None``: only
            with 2 or more batches at once on a scene of 256 tiles or more.
        crf: Refine the class map with a dense CRF (:mod:`geoseg.crf`); ``None``: no CRF.
        cog: Write the class raster (and probability or confidence rasters) as Cloud-Optimized
            GeoTIFFs with overviews (mode resampling for classes, average for probabilities).
    """

    model: str | None = None
    tile: int | None = None
    overlap: int | None = None
    batch_size: int = 4
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    device: Device = "auto"
    precision: Precision = "auto"
    taper_floor: float = 0.1
    output_nodata: int = 255
    compress: Compression = "deflate"
    prefetch_batches: int = 2
    threads: int | None = None
    parallel_batches: int | None = None
    reader_threads: int | None = None
    compile: bool = False
    trace: bool | None = None
    crf: CrfConfig | None = None
    cog: bool = False

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ConfigError(f"model must be a path to a model file, got {self.model!r}")
        if self.tile is not None and (not _is_int(self.tile) or self.tile < 32):
            raise ConfigError(f"tile must be an integer of at least 32 pixels, got {self.tile!r}")
        if self.overlap is not None and (not _is_int(self.overlap) or self.overlap < 0):
            raise ConfigError(f"overlap must be a non-negative integer, got {self.overlap!r}")
        if self.tile is not None and self.overlap is not None and self.overlap * 2 >= self.tile:
            raise ConfigError(
                f"overlap {self.overlap} must be less than half the tile {self.tile} "
                "(otherwise a pixel is covered by more than two tiles per axis and the stride is tiny)"
            )
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.bands is not None:
            if len(self.bands) == 0 or any(not _is_int(b) or b < 1 for b in self.bands):
                raise ConfigError(f"bands must be 1-based band numbers, got {self.bands!r}")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision not in get_args(Precision):
            raise ConfigError(f"precision must be one of {', '.join(get_args(Precision))}, got {self.precision!r}")
        if self.nodata is not None and not _is_number(self.nodata):
            raise ConfigError(f"nodata must be a number (or .nan in YAML), got {self.nodata!r}")
        if not _is_number(self.taper_floor) or not 0 < self.taper_floor <= 1:
            raise ConfigError(f"taper_floor must be in (0, 1], got {self.taper_floor!r}")
        if not _is_int(self.output_nodata) or not 0 <= self.output_nodata <= 65535:
            raise ConfigError(f"output_nodata must be an integer in 0..65535, got {self.output_nodata!r}")
        if self.compress not in get_args(Compression):
            raise ConfigError(f"compress must be one of {', '.join(get_args(Compression))}, got {self.compress!r}")
        if not _is_int(self.prefetch_batches) or self.prefetch_batches < 1:
            raise ConfigError(f"prefetch_batches must be a positive integer, got {self.prefetch_batches!r}")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise ConfigError(f"threads must be a positive integer, got {self.threads!r}")
        parallel = self.parallel_batches
        if parallel is not None and (not _is_int(parallel) or parallel < 1):
            raise ConfigError(f"parallel_batches must be a positive integer, got {self.parallel_batches!r}")
        if self.reader_threads is not None and (not _is_int(self.reader_threads) or self.reader_threads < 1):
            raise ConfigError(f"reader_threads must be a positive integer, got {self.reader_threads!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")
        if self.trace is not None and not isinstance(self.trace, bool):
            raise ConfigError(f"trace must be true, false or null, got {self.trace!r}")
        if self.crf is not None and not isinstance(self.crf, CrfConfig):
            raise ConfigError(f"crf must be a CrfConfig or None, got {self.crf!r}")
        if not isinstance(self.cog, bool):
            raise ConfigError(f"cog must be true or false, got {self.cog!r}")

    def replace(self, **changes: Any) -> PredictConfig:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is not 1 tile


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_keys() -> list[str]:
    """Names a YAML preset may use (the PredictConfig fields)."""
    return [f.name for f in dataclasses.fields(PredictConfig)]


def _normalise_key(key: str) -> str:
    return key.replace("-", "_")


def config_from_mapping(values: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Check a mapping of settings and coerce YAML types to the dataclass's.

    Args:
        values: Keys are PredictConfig field names (``-`` and ``_`` are interchangeable).
        source: Where the values came from, for error messages.

    Returns:
        The settings, keyed by field name, ready for ``PredictConfig(**...)``.

    Raises:
        ConfigError: A key is unknown or a value has the wrong type.
    """
    known = set(config_keys())
    settings: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = _normalise_key(str(raw_key))
        if key not in known:
            raise ConfigError(f"{source}: unknown key {raw_key!r}; known keys: {', '.join(sorted(known))}")
        if key == "bands" and value is not None:
            if isinstance(value, str):
                try:
                    value = parse_band_list(value)
                except ConfigError as err:
                    raise ConfigError(f"{source}: {err}") from err
            elif isinstance(value, (list, tuple)):
                value = tuple(value)
            else:
                raise ConfigError(f"{source}: bands must be a list such as [4, 3, 2, 8], got {value!r}")
        if key == "crf":
            value = crf_config_from_mapping(value, source)
        settings[key] = value
    return settings


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset; see :func:`config_from_mapping`.

    Raises:
        ConfigError: The file is missing, is not YAML, or holds unknown keys.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror or err})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from err
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    settings = config_from_mapping(data, source=str(path))
    model = settings.get("model")
    if isinstance(model, str) and not Path(model).is_absolute():
        settings["model"] = str(path.parent / model)  # relative to the config file, not the working folder
    return settings


def yaml_problem(err: Exception) -> str:
    """A YAML error on one line: where and what (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def build_config(file_settings: Mapping[str, Any] | None = None, **cli_settings: Any) -> PredictConfig:
    """Merge settings by precedence: defaults < config file < CLI flags actually given.

    CLI values of ``None`` mean "not given" and do not override the file. ``crf`` from the CLI
    is a switch: ``True`` keeps the file's CRF settings (or takes the defaults), ``False`` turns
    the CRF off; ``crf_workers`` sets the CRF's worker processes (and turns it on).

    Raises:
        ConfigError: A value is invalid.
    """
    merged: dict[str, Any] = dict(file_settings or {})
    cli_settings = dict(cli_settings)
    crf_switch, crf_workers = cli_settings.pop("crf", None), cli_settings.pop("crf_workers", None)
    merged.update({k: v for k, v in cli_settings.items() if v is not None})
    if crf_switch is False:
        merged["crf"] = None
    elif crf_switch or crf_workers is not None:
        crf = merged.get("crf") or CrfConfig()
        merged["crf"] = crf if crf_workers is None else dataclasses.replace(crf, workers=crf_workers)
    try:
        return PredictConfig(**merged)
    except TypeError as err:  # a wrong-typed value that the dataclass cannot take
        raise ConfigError(str(err)) from err


def parse_band_list(text: str) -> tuple[int, ...]:
    """Parse ``"4,3,2,8"`` into ``(4, 3, 2, 8)``.

    Raises:
        ConfigError: Not a comma-separated list of positive integers.
    """
    try:
        bands = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ConfigError(f"bands must be comma-separated 1-based band numbers such as 4,3,2,8, got {text!r}") from err
    if not bands or any(b < 1 for b in bands):
        raise ConfigError(f"bands must be comma-separated 1-based band numbers such as 4,3,2,8, got {text!r}")
    return bands
