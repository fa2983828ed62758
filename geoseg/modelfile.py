"""The geoseg model file: safetensors weights plus the metadata that makes them self-describing.

One ``.safetensors`` file holds everything ``geoseg predict`` needs. The weights are plain
tensors (safetensors cannot carry code, so an untrusted file can never run anything on load);
the metadata is JSON stored under the ``"geoseg"`` key of the safetensors header:

- architecture, variant and the full architecture config;
- the input bands: names, and which raster band feeds each by default (1-based, like GDAL);
- how raw pixel values are scaled: ``meanstd`` ((x - mean) / std, in raw units) or
  ``scale`` (x * scale + offset), per band;
- classes: output index k predicts class ``classes[k].id``, with a name and a colour;
- suggested tile size and overlap, the training resolution, what input it expects, provenance.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import CheckpointError, ConfigError, OutputError

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "geoseg-model"
FORMAT_VERSION = 1
METADATA_KEY = "geoseg"
_COLOR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")


@dataclass(frozen=True)
class BandSpec:
    """One model input: a name (``red``, ``nir``, ...) and the raster band that feeds it by default."""

    name: str
    source_band: int


@dataclass(frozen=True)
class ClassSpec:
    """One output class: the value written to the raster, a name and a ``#rrggbb`` colour."""

    id: int
    name: str
    color: str

    @property
    def rgba(self) -> tuple[int, int, int, int]:
        """The colour as an (r, g, b, 255) tuple for a GDAL colour table."""
        return (int(self.color[1:3], 16), int(self.color[3:5], 16), int(self.color[5:7], 16), 255)


@dataclass(frozen=True)
class Normalization:
    """How raw pixel values become model inputs, per band.

    ``meanstd``: ``(x - mean) / std`` with mean and std in raw units.
    ``scale``: ``x * scale + offset`` (for example scale 1e-4 for reflectance x 10000).
    """

    method: Literal["meanstd", "scale"]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    offset: tuple[float, ...] = ()

    def multiplier_and_bias(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-band ``a, b`` such that model input = ``x * a + b``."""
        if self.method == "meanstd":
            return tuple(1.0 / s for s in self.std), tuple(-m / s for m, s in zip(self.mean, self.std))
        return tuple(self.scale), tuple(self.offset)


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a model file says about itself besides its weights."""

    name: str
    architecture: str
    variant: str
    arch_config: Mapping[str, Any]
    bands: tuple[BandSpec, ...]
    normalization: Normalization
    classes: tuple[ClassSpec, ...]
    tile_size: int = 512
    overlap: int = 64
    resolution_m: float | None = None
    intended_input: str = ""
    description: str = ""
    ignore_index: int | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_bands = len(self.bands)
        if n_bands == 0:
            raise ConfigError("a model needs at least one input band")
        if len({b.name for b in self.bands}) != n_bands:
            raise ConfigError(f"band names must be unique, got {[b.name for b in self.bands]}")
        if any(b.source_band < 1 for b in self.bands):
            raise ConfigError("source bands are 1-based")
        norm = self.normalization
        if norm.method not in ("meanstd", "scale"):
            raise ConfigError(f"normalization method must be meanstd or scale, got {norm.method!r}")
        lengths = (norm.mean, norm.std) if norm.method == "meanstd" else (norm.scale, norm.offset)
        if any(len(v) != n_bands for v in lengths):
            raise ConfigError(f"normalization needs one value per band ({n_bands})")
        if norm.method == "meanstd" and any(s <= 0 for s in norm.std):
            raise ConfigError("normalization std must be positive")
        if norm.method == "scale" and any(not math.isfinite(s) or s == 0 for s in norm.scale):
            raise ConfigError(f"normalization scale must be finite and non-zero, got {list(norm.scale)}")
        # Suggested tiles (0 or None: no suggestion) must be ones predict accepts: overlap < tile / 2.
        if self.tile_size is not None and self.tile_size < 0:
            raise ConfigError(f"tile size must be positive (0: no suggestion), got {self.tile_size}")
        if self.overlap is not None and self.overlap < 0:
            raise ConfigError(f"overlap must be >= 0, got {self.overlap}")
        if self.tile_size and self.overlap is not None and self.overlap * 2 >= self.tile_size:
            raise ConfigError(f"overlap {self.overlap} must be less than half the tile {self.tile_size}")
        if not self.classes:
            raise ConfigError("a model needs at least one class")
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"class ids must be unique, got {ids}")
        if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= 65535 for i in ids):
            raise ConfigError(f"class ids must be integers in 0..65535, got {ids}")
        bad = [c.color for c in self.classes if not _COLOR_RE.match(c.color)]
        if bad:
            raise ConfigError(f"class colours must be #rrggbb, got {bad}")

    @property
    def band_names(self) -> list[str]:
        """Input band names in model order."""
        return [b.name for b in self.bands]

    def to_json(self) -> str:
        """Serialise with a format marker, so readers can refuse other files."""
        payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(payload, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse and validate; raises ``ValueError``/``KeyError``/``TypeError`` on bad input."""
        data = json.loads(text)
        if data.pop("format", None) != FORMAT_NAME:
            raise ValueError("not a geoseg model (format marker missing)")
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"model format version {version} is not supported (this geoseg reads {FORMAT_VERSION})")
        data["bands"] = tuple(BandSpec(**b) for b in data["bands"])
        data["classes"] = tuple(ClassSpec(**c) for c in data["classes"])
        norm = data["normalization"]
        data["normalization"] = Normalization(
            method=norm["method"], **{k: tuple(float(x) for x in norm.get(k, ())) for k in ("mean", "std", "scale", "offset")}
        )
        return cls(**data)


def load_classes(path: str | os.PathLike[str]) -> tuple[tuple[ClassSpec, ...], int | None]:
    """Read a classes file: ``{"ignore_index": 0, "classes": [{"id", "name", "color"}, ...]}``.

    Returns:
        The classes in file order (which becomes the model's output order) and the ignore index.

    Raises:
        ConfigError: The file is missing or malformed: ids or the ignore index not integers in
            0..65535, ids or names (compared case-insensitively, as labels match them) repeated,
            a name that is not text, a colour that is not ``#rrggbb``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        entries = data["classes"]
        ignore = data.get("ignore_index")
        classes = tuple(
            ClassSpec(id=_class_id(c["id"]), name=c["name"], color=str(c["color"])) for c in entries
        )
    except OSError as err:
        raise ConfigError(f"{path}: cannot read classes file ({err.strerror or err})") from err
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path}: not a classes file (expected {{'classes': [{{'id', 'name', 'color'}}, ...]}}): {err}"
        ) from err
    if not classes:
        raise ConfigError(f"{path}: no classes listed")
    ids = [c.id for c in classes]
    if any(not 0 <= i <= 65535 for i in ids):
        raise ConfigError(f"{path}: class ids must be integers in 0..65535, got {ids}")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: class ids are not unique: {ids}")
    names = [c.name for c in classes]
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"{path}: class names must be non-empty text, got {names}")
    folded = [n.strip().casefold() for n in names]
    repeated = sorted({n for n, f in zip(names, folded, strict=True) if folded.count(f) > 1})
    if repeated:
        raise ConfigError(f"{path}: class names are not unique (case is ignored): {repeated}")
    bad = [c.color for c in classes if not _COLOR_RE.match(c.color)]
    if bad:
        raise ConfigError(f"{path}: colours must be #rrggbb, got {bad}")
    if ignore is not None:
        try:
            ignore = _class_id(ignore)
        except (ValueError, TypeError):
            raise ConfigError(
                f"{path}: ignore_index must be an integer in 0..65535, got {ignore!r}"
            ) from None
        if not 0 <= ignore <= 65535:
            raise ConfigError(f"{path}: ignore_index must be an integer in 0..65535, got {ignore}")
        if ignore in ids:
            raise ConfigError(f"{path}: ignore_index {ignore} is also a class id")
    return classes, ignore


def _class_id(value: Any) -> int:
    """An id as written in JSON: an integer (or a float or text holding one), never a bool or 1.5."""
    if isinstance(value, bool):
        raise TypeError(f"class ids are integers, got {value!r}")
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"class ids are integers, got {value!r}")
    return int(number)


def check_not_an_input(out: str | os.PathLike[str], inputs: Mapping[str, Any], option: str = "--out") -> None:
    """Refuse an output file that is one of the run's inputs (even with ``--overwrite``).

    Args:
        out: The file to write.
        inputs: What each input is (``"labels"``) -> a path, a sequence of paths, or None.
        option: How the user named ``out``, for the message.

    Raises:
        OutputError: ``out`` is (or is the same file as) an input.
    """
    out_path = Path(out)
    for what, given in inputs.items():
        single = isinstance(given, (str, os.PathLike))
        paths = [given] if single else [p for p in given or () if p is not None]
        for path in paths:
            if "://" in os.fspath(path):
                continue
            same = os.path.abspath(path) == os.path.abspath(out_path)
            if not same and out_path.exists() and Path(path).exists():
                same = os.path.samefile(path, out_path)
            if same:
                raise OutputError(f"{out}: {option} is an input of this run ({what}); choose another file")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    metadata: ModelMetadata,
    *,
    half: bool = False,
) -> None:
    """Write a model file atomically (temporary name beside ``path``, then rename).

    Args:
        path: Destination ``.safetensors`` file.
        state_dict: The model's tensors.
        metadata: What the weights are for.
        half: Store floating-point weights as fp16 (half the size; loaded back as fp32).
    """
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        if half and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        tensors[key] = tensor
    path = Path(path)
    tmp = path.with_name(f".{path.name}.geoseg-tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: metadata.to_json()})
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Give a written file the usual permissions (0666 less the umask), like every other output.

    safetensors creates its files 0600, which a shared model folder or a job running as another
    user cannot read.
    """
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask.

    Read without changing it where Linux shows it (other threads may be creating files
    meanwhile); elsewhere set and restored at once.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def read_metadata(path: str | os.PathLike[str]) -> ModelMetadata:
    """Read only the metadata of a model file (cheap: the header, not the weights).

    An ``.onnx`` file's metadata comes from its ``metadata_props`` (needs ``geoseg[onnx]``).

    Raises:
        CheckpointError: Missing, not a safetensors file, or not a geoseg model.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from .onnx_export import read_onnx_metadata

        return read_onnx_metadata(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a safetensors model file ({_first_line(err)})") from err
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file without geoseg metadata (a Hugging Face checkpoint? "
                              "import it with geoseg import-weights; a new model: geoseg init-model)")
    try:
        return ModelMetadata.from_json(header[METADATA_KEY])
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise CheckpointError(f"{path}: corrupt geoseg metadata ({_first_line(err)})") from err


def describe_network(metadata: ModelMetadata) -> str:
    """One line on the network's shape: stage widths and depths, decoder width, logit resolution.

    From the metadata alone, so a reduced or finer variant is told apart from the name it carries.
    """
    config = metadata.arch_config

    def dashed(key: str) -> str:
        return "-".join(str(v) for v in config.get(key, ()))

    first_stride = (config.get("strides") or (4,))[0]
    head = config.get("pixel_head_channels", 0)
    logits = f"full resolution (a per-pixel head of {head})" if head else f"1/{first_stride} resolution"
    return (
        f"widths {dashed('hidden_sizes')}, depths {dashed('depths')}, heads {dashed('num_attention_heads')}, "
        f"decoder {config.get('decoder_hidden_size')}; logits at {logits}"
    )


def count_weights(path: str | os.PathLike[str]) -> int:
    """Learned values in a safetensors model file, from its header (BatchNorm statistics not counted)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue
            total += math.prod(f.get_slice(key).get_shape())
    return total


@dataclass
class LoadedModel:
    """A ready-to-run network with its metadata, hash and path."""

    module: torch.nn.Module
    metadata: ModelMetadata
    sha256: str
    path: Path


def build_network(metadata: ModelMetadata) -> torch.nn.Module:
    """Build an untrained network of the architecture the metadata describes.

    Raises:
        CheckpointError: Unknown architecture, or a config that does not fit the bands/classes.
    """
    if metadata.architecture != "segformer":
        raise CheckpointError(f"unknown architecture {metadata.architecture!r} (geoseg knows: segformer)")
    from .segformer import SegformerConfig, SegformerForSemanticSegmentation

    try:
        config = SegformerConfig.from_dict(dict(metadata.arch_config))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"invalid segformer config: {err}") from err
    if config.num_channels != len(metadata.bands) or config.num_labels != len(metadata.classes):
        raise CheckpointError(
            f"architecture has {config.num_channels} inputs and {config.num_labels} outputs but metadata lists "
            f"{len(metadata.bands)} bands and {len(metadata.classes)} classes"
        )
    return SegformerForSemanticSegmentation(config)


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a model file onto the CPU in fp32, in eval mode.

    Never unpickles: tensors come from safetensors, metadata from JSON. An ``.onnx`` file
    (``geoseg export``) loads as an onnxruntime session behind a module face (needs ``geoseg[onnx]``).

    Raises:
        CheckpointError: Missing, corrupt or incompatible file.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from .onnx_export import load_onnx_model

        return load_onnx_model(path)
    metadata = read_metadata(path)
    try:
        network = build_network(metadata)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read weights ({_first_line(err)})") from err
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    mismatch = _weights_mismatch(network.state_dict(), tensors)
    if mismatch:
        raise CheckpointError(f"{path}: weights do not match the architecture ({mismatch})")
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the architecture ({_first_line(err)})") from err
    network.eval()
    network.requires_grad_(False)
    return LoadedModel(module=network, metadata=metadata, sha256=file_sha256(path), path=path)


def new_metadata(
    arch: str,
    band_names: Sequence[str],
    classes: Sequence[ClassSpec],
    *,
    normalization: Normalization | None = None,
    source_bands: Sequence[int] | None = None,
    **fields: Any,
) -> ModelMetadata:
    """Metadata for a fresh model of a named variant (``segformer-b0`` ... ``segformer-b5``).

    ``fields`` may override any ModelMetadata field and may carry ``arch_overrides`` (a dict of
    SegformerConfig fields, e.g. a tiny config for tests).

    Raises:
        ConfigError: Unknown variant or inconsistent inputs.
    """
    from .segformer import segformer_config

    arch_overrides = dict(fields.pop("arch_overrides", {}) or {})
    try:
        config = segformer_config(arch, num_channels=len(band_names), num_labels=len(classes), **arch_overrides)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err
    if source_bands is None:
        source_bands = range(1, len(band_names) + 1)
    if len(source_bands) != len(band_names):
        raise ConfigError(f"{len(band_names)} band names but {len(source_bands)} source bands")
    if normalization is None:
        # NOTE: an untrained model has no statistics yet; reflectance x 10000 is the common convention.
        normalization = Normalization("scale", scale=(1e-4,) * len(band_names), offset=(0.0,) * len(band_names))
    variant = arch if arch.startswith("segformer-") else f"segformer-{arch}"
    return ModelMetadata(
        name=fields.pop("name", variant),
        architecture="segformer",
        variant=variant,
        arch_config=config.to_dict(),
        bands=tuple(BandSpec(n, int(s)) for n, s in zip(band_names, source_bands)),
        normalization=normalization,
        classes=tuple(classes),
        **fields,
    )


def _weights_mismatch(expected: Mapping[str, Any], given: Mapping[str, Any], most: int = 3) -> str:
    """What differs between the architecture's tensors and a file's, in words ("" when nothing)."""
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    shapes = [f"{k} is {tuple(given[k].shape)}, the architecture's {tuple(v.shape)}"
              for k, v in expected.items() if k in given and tuple(given[k].shape) != tuple(v.shape)]

    def listed(what: str, names: list[str]) -> str:
        more = f" and {len(names) - most} more" if len(names) > most else ""
        return f"{what} {', '.join(names[:most])}{more}"

    parts = [listed("missing", missing) if missing else "", listed("unexpected", extra) if extra else "",
             "; ".join(shapes[:most]) + (f" and {len(shapes) - most} more" if len(shapes) > most else "")]
    return "; ".join(p for p in parts if p)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
