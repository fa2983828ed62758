"""Import a Hugging Face transformers SegFormer checkpoint (a local folder or file) as a geoseg model.

Reads what ``save_pretrained`` writes for ``nvidia/mit-b0`` ... ``mit-b5`` (encoder-only
``SegformerForImageClassification`` or ``SegformerModel``) and ``nvidia/segformer-b*-finetuned-*``
(``SegformerForSemanticSegmentation``): ``config.json`` beside ``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``,
so a checkpoint can never run code). Tensor names may carry the ``segformer.`` prefix or not, and
may be transformers 5.x's in-memory names (``stages.0.blocks.0.attention.q_proj``, written by
``save_pretrained(save_original_format=False)``); all become the names geoseg's SegFormer uses.

Nothing is downloaded: a URL or a hub id such as ``nvidia/mit-b0`` that is not a local path is
refused with a one-line :class:`~geoseg.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._version import __version__
from .errors import CheckpointError, ConfigError
from .modelfile import BandSpec, ClassSpec, ModelMetadata, Normalization, file_sha256

if TYPE_CHECKING:
    import torch

    from .segformer import SegformerConfig

log = logging.getLogger(__name__)

Parts = Literal["auto", "encoder", "whole"]

PATCH_EMBED_KEY = "segformer.encoder.patch_embeddings.0.proj.weight"
CONFIG_NAME = "config.json"
# Looked for in this order inside a checkpoint folder.
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# transformers 5.x in-memory names -> the names its checkpoints (and geoseg) use.
_V5_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
        (r"^stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.block.\1.\2."),
        (r"\.attention\.q_proj\.", ".attention.self.query."),
        (r"\.attention\.k_proj\.", ".attention.self.key."),
        (r"\.attention\.v_proj\.", ".attention.self.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
        (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
        (r"\.layernorm_before\.", ".layer_norm_1."),
        (r"\.layernorm_after\.", ".layer_norm_2."),
        (r"\.mlp\.fc1\.", ".mlp.dense1."),
        (r"\.mlp\.fc2\.", ".mlp.dense2."),
        (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
    )
)
# A palette for classes named by the checkpoint's id2label (no colours there).
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
)  # fmt: skip


@dataclass(frozen=True)
class HFCheckpoint:
    """A transformers SegFormer checkpoint read from disk.

    Attributes:
        source: The folder or file given.
        config: ``config.json``, as a dict.
        tensors: Float32 tensors under geoseg's names (``segformer.encoder...``, ``decode_head...``);
            an image-classification head (``classifier.*``) is dropped.
        weight_files: The files the tensors came from.
    """

    source: Path
    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]
    weight_files: tuple[Path, ...]

    @property
    def num_channels(self) -> int:
        """Input bands of the checkpoint's first layer."""
        return int(self.tensors[PATCH_EMBED_KEY].shape[1])

    @property
    def has_decode_head(self) -> bool:
        """Whether the checkpoint holds a trained segmentation decoder (finetuned models do)."""
        return any(key.startswith("decode_head.") for key in self.tensors)

    @property
    def num_labels(self) -> int | None:
        """Classes of the checkpoint's decode head; ``None`` without one."""
        weight = self.tensors.get("decode_head.classifier.weight")
        return None if weight is None else int(weight.shape[0])

    @property
    def label_names(self) -> list[str] | None:
        """Class names of the decode head from ``id2label``, in output order; ``None`` without a head."""
        count = self.num_labels
        if count is None:
            return None
        id2label = self.config.get("id2label") or {}
        return [str(id2label.get(str(i), id2label.get(i, f"class_{i}"))) for i in range(count)]


@dataclass(frozen=True)
class ImportedModel:
    """What :func:`import_weights` makes: a state dict for ``save_model`` and its metadata."""

    state_dict: dict[str, torch.Tensor]
    metadata: ModelMetadata
    parts: Literal["encoder", "whole"]
    band_expansion: str | None


def expand_patch_embedding(weight: torch.Tensor, new_count: int) -> torch.Tensor:
    """Widen an RGB patch-embedding weight to ``new_count`` input bands, keeping activations' size.

    The promise, exactly: with ``s = 3 / new_count``,

    - input bands 0, 1 and 2 get the pretrained red, green and blue filters times ``s``;
    - every added band ``3 .. new_count - 1`` gets the mean of the three RGB filters times ``s``;
    - so on an input whose ``new_count`` bands all hold the same image ``x``, the convolution gives
      exactly what the pretrained one gives on ``(x, x, x)`` (the bias is not touched): the
      activations keep their size however many bands are added, as timm's ``adapt_input_conv``
      does by scaling with ``3 / new_count``.

    Nothing more is promised: on inputs whose bands differ the output changes (that is what the
    added bands are for), and the model's first three bands must be red, green and blue in the
    pretrained order. This is :func:`geoseg._adapt.expand_input_bands` (mean of the RGB filters,
    nothing rescaled, which keeps the output on inputs whose added bands are zero) followed by the
    ``3 / new_count`` rescaling; ``new_count == 3`` returns the weight unchanged.

    Args:
        weight: ``(out_channels, 3, kh, kw)`` convolution weight.
        new_count: Input bands wanted, at least 3.

    Returns:
        A new ``(out_channels, new_count, kh, kw)`` tensor of the same dtype and device.

    Raises:
        ValueError: ``weight`` does not have 3 input channels, or ``new_count < 3``.
    """
    from ._adapt import expand_input_bands

    widened = expand_input_bands(weight, new_count)  # (out, 3, kh, kw) -> (out, new_count, kh, kw)
    if new_count == 3:
        return widened
    return widened * (3.0 / new_count)


def read_hf_checkpoint(src: str | os.PathLike[str]) -> HFCheckpoint:
    """Read a local transformers SegFormer checkpoint: a folder, or a weights file beside its ``config.json``.

    Raises:
        CheckpointError: A URL or hub id (nothing is downloaded here), a missing path, no
            ``config.json``, not a SegFormer, or a file that is not a checkpoint; always one line.
    """
    text = os.fspath(src)
    path = Path(text)
    if _URL_RE.match(text) or (not path.exists() and _HUB_ID_RE.match(text)):
        where = "a URL" if _URL_RE.match(text) else "not a local folder"
        raise CheckpointError(
            f"{text}: {where}, and hub downloads are not supported here; download the checkpoint "
            "elsewhere (e.g. huggingface-cli download) and pass the local folder"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        folder = path
        found = [folder / name for name in WEIGHT_NAMES if (folder / name).is_file()]
        if not found:
            raise CheckpointError(
                f"{path}: not a transformers checkpoint folder (no {' or '.join(WEIGHT_NAMES[::2])} inside)"
            )
        weights = found[0]
    elif path.name == CONFIG_NAME:
        return read_hf_checkpoint(path.parent)
    else:
        folder, weights = path.parent, path
    config = _read_config(folder / CONFIG_NAME, path)
    files, raw = _read_weights(weights)
    tensors = normalise_keys(raw)
    if PATCH_EMBED_KEY not in tensors:
        raise CheckpointError(f"{weights}: no SegFormer patch embedding ({PATCH_EMBED_KEY}) inside")
    return HFCheckpoint(source=path, config=config, tensors=tensors, weight_files=files)


def normalise_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename checkpoint tensors to geoseg's names and make floating-point ones float32.

    Handles keys with and without the ``segformer.`` prefix, transformers 5.x's in-memory names,
    and drops an image-classification head (``classifier.*``, as in ``nvidia/mit-b0``).
    """
    import torch

    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith("classifier."):
            continue  # MiT's ImageNet classification head: no use for segmentation
        name = key.removeprefix("segformer.")
        for pattern, replacement in _V5_RENAMES:
            name = pattern.sub(replacement, name)
        if not name.startswith("decode_head."):
            name = f"segformer.{name}"
        renamed[name] = tensor.float() if tensor.is_floating_point() else tensor.to(torch.int64)
    return renamed


def segformer_config_from_hf(
    config: Mapping[str, Any], num_channels: int, num_labels: int
) -> SegformerConfig:
    """Map a transformers ``SegformerConfig`` (``config.json``) to geoseg's, with new bands and classes.

    Fields geoseg does not store (``hidden_act``, ``num_encoder_blocks``, ...) are checked, not copied.

    Raises:
        CheckpointError: Not a SegFormer config, or one geoseg's SegFormer cannot reproduce.
    """
    from .segformer import SegformerConfig

    model_type = config.get("model_type")
    if model_type != "segformer":
        raise CheckpointError(f"not a SegFormer checkpoint (config.json model_type is {model_type!r})")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"hidden_act {config['hidden_act']!r} is not supported (geoseg uses gelu)")
    # Every geoseg field has a Hugging Face field of the same name and meaning; bands and
    # classes come from the user's --bands and --classes instead.
    shared = [f.name for f in fields(SegformerConfig) if f.name not in ("num_channels", "num_labels")]
    values = {name: config[name] for name in shared if name in config}
    blocks = config.get("num_encoder_blocks")
    if blocks is not None and "depths" in values and blocks != len(values["depths"]):
        raise CheckpointError(f"config.json: num_encoder_blocks {blocks} but {len(values['depths'])} depths")
    try:
        return SegformerConfig.from_dict({**values, "num_channels": num_channels, "num_labels": num_labels})
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"config.json: {err}") from err


def match_variant(config: SegformerConfig) -> str | None:
    """The official variant (``segformer-b0`` ... ``b5``) whose encoder ``config`` has, if any."""
    from .segformer import VARIANTS, SegformerConfig

    defaults = SegformerConfig()
    for name, variant in VARIANTS.items():
        shared = ("sr_ratios", "patch_sizes", "strides", "mlp_ratios")
        fields = {**{f: getattr(defaults, f) for f in shared}, **variant}
        if all(getattr(config, f) == tuple(v) for f, v in fields.items() if f != "decoder_hidden_size"):
            return name
    return None


def import_weights(
    src: str | os.PathLike[str],
    band_names: Sequence[str],
    classes: Sequence[ClassSpec] | None = None,
    *,
    parts: Parts = "auto",
    ignore_index: int | None = None,
    normalization: Normalization | None = None,
    source_bands: Sequence[int] | None = None,
    tile_size: int = 512,
    overlap: int = 64,
    resolution_m: float | None = None,
    name: str | None = None,
    seed: int = 0,
) -> ImportedModel:
    """Turn a transformers SegFormer checkpoint into the tensors and metadata of a geoseg model file.

    ``parts="auto"`` keeps the checkpoint's decode head when it has one and ``classes`` is ``None``
    or names the same classes in the same order (case-insensitively); otherwise only the encoder is
    imported and the decode head is new (seeded random weights, the variant's official width).
    A 3-band checkpoint feeding more bands has its first layer widened by :func:`expand_patch_embedding`.

    Args:
        src: A checkpoint folder, or a weights file beside its ``config.json``.
        band_names: The model's input bands, in order; with a 3-band checkpoint the first three
            must be red, green and blue.
        classes: Output classes; ``None`` takes the checkpoint's ``id2label`` (needs a decode head).
        parts: ``auto``, ``encoder`` (always a new decode head) or ``whole`` (keep the decode head).
        ignore_index: Label value ignored in training, stored in the metadata.
        normalization: How raw pixels are scaled; default ``x * 1e-4`` (reflectance x 10000).
        source_bands: Raster band feeding each input by default (1-based); default 1, 2, ...
        tile_size: Suggested tile edge in pixels.
        overlap: Suggested tile overlap in pixels.
        resolution_m: Pixel size the model is meant for, in metres.
        name: Model name; default ``<variant>-<checkpoint folder name>``.
        seed: Seed of the new decode head's initial weights.

    Raises:
        CheckpointError: The checkpoint cannot be read or does not fit.
        ConfigError: Bands, classes or ``parts`` do not fit the checkpoint.
    """
    import torch

    from .segformer import VARIANTS, SegformerForSemanticSegmentation

    if parts not in ("auto", "encoder", "whole"):
        raise ConfigError(f"parts must be auto, encoder or whole, got {parts!r}")
    checkpoint = read_hf_checkpoint(src)
    band_names = list(band_names)
    source_channels = checkpoint.num_channels
    if not band_names:
        raise ConfigError("at least one band name is needed")
    declared = checkpoint.config.get("num_channels")
    if declared is not None and declared != source_channels:
        raise CheckpointError(
            f"{checkpoint.source}: config.json says {declared} input bands, "
            f"the weights take {source_channels}"
        )
    chosen = _choose_parts(checkpoint, classes, parts)
    if classes is None:
        labels = checkpoint.label_names or []
        classes = tuple(ClassSpec(i, label, _PALETTE[i % len(_PALETTE)]) for i, label in enumerate(labels))
    classes = tuple(classes)
    if not classes:
        raise ConfigError("no classes given")

    expansion = None
    if len(band_names) != source_channels:
        if source_channels != 3 or len(band_names) < 3:
            raise ConfigError(
                f"{checkpoint.source}: the checkpoint takes {source_channels} bands and the model "
                f"{len(band_names)}; only a 3-band (RGB) checkpoint can be widened to more bands"
            )
        if [b.lower() for b in band_names[:3]] != ["red", "green", "blue"]:
            log.warning(
                "the first three bands %s take the pretrained red, green and blue filters", band_names[:3]
            )
        added = "band 4 starts" if len(band_names) == 4 else f"bands 4..{len(band_names)} start"
        expansion = (
            f"3 -> {len(band_names)} bands: {added} from the mean of the RGB filters, "
            f"all filters scaled by 3/{len(band_names)}"
        )

    config = segformer_config_from_hf(checkpoint.config, len(band_names), len(classes))
    variant = match_variant(config)
    if chosen == "encoder" and variant is not None:
        # NOTE: the head is new, so give it the variant's official width (mit-b* configs carry HF's default).
        width = VARIANTS[variant]["decoder_hidden_size"]
        config = type(config).from_dict({**config.to_dict(), "decoder_hidden_size": width})
    torch.manual_seed(seed)
    network = SegformerForSemanticSegmentation(config)
    target = network.state_dict()

    tensors = dict(checkpoint.tensors)
    if expansion is not None:
        tensors[PATCH_EMBED_KEY] = expand_patch_embedding(tensors[PATCH_EMBED_KEY], len(band_names))
    wanted = [k for k in target if chosen == "whole" or k.startswith("segformer.")]
    state_dict = dict(target)
    _check_tensors(checkpoint, tensors, target, wanted, chosen)
    state_dict.update({key: tensors[key] for key in wanted})
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # the shapes were checked, so this is unexpected; keep it one line
        raise CheckpointError(f"{checkpoint.source}: {str(err).splitlines()[0]}") from err

    folder_name = (checkpoint.source if checkpoint.source.is_dir() else checkpoint.source.parent).name
    hf = checkpoint.config
    provenance: dict[str, Any] = {
        "created_by": f"geoseg {__version__} import-weights",
        "source": str(checkpoint.source.resolve()),
        "source_files": {p.name: file_sha256(p) for p in checkpoint.weight_files},
        "hf_model_type": hf.get("model_type"),
        "hf_architectures": list(hf.get("architectures") or []),
        "hf_name_or_path": hf.get("_name_or_path"),
        "hf_transformers_version": hf.get("transformers_version"),
        "imported": chosen,
        "band_expansion": expansion,
        "trained": chosen == "whole",
        "pretrained_encoder": True,
    }
    if chosen == "encoder":
        provenance["seed"] = seed
    variant_name = variant or "segformer-custom"
    if normalization is None:
        count = len(band_names)
        normalization = Normalization("scale", scale=(1e-4,) * count, offset=(0.0,) * count)
    if source_bands is None:
        source_bands = range(1, len(band_names) + 1)
    if len(source_bands) != len(band_names):
        raise ConfigError(f"{len(band_names)} band names but {len(source_bands)} source bands")
    metadata = ModelMetadata(
        name=name or f"{variant_name}-{folder_name}",
        architecture="segformer",
        variant=variant_name,
        arch_config=config.to_dict(),
        bands=tuple(BandSpec(n, int(s)) for n, s in zip(band_names, source_bands, strict=True)),
        normalization=normalization,
        classes=classes,
        tile_size=tile_size,
        overlap=overlap,
        resolution_m=resolution_m,
        ignore_index=ignore_index,
        provenance=provenance,
    )
    log.info(
        "%s: imported the %s of a %s (%s); %d bands, %d classes%s",
        checkpoint.source,
        "whole model" if chosen == "whole" else "encoder",
        variant_name,
        ", ".join(provenance["hf_architectures"]) or "unknown architecture",
        len(band_names),
        len(classes),
        f"; {expansion}" if expansion else "",
    )
    return ImportedModel(
        state_dict={k: v.detach().contiguous() for k, v in network.state_dict().items()},
        metadata=metadata,
        parts=chosen,
        band_expansion=expansion,
    )


def _choose_parts(
    checkpoint: HFCheckpoint, classes: Sequence[ClassSpec] | None, parts: Parts
) -> Literal["encoder", "whole"]:
    """Decide between importing the encoder and the whole model (see :func:`import_weights`)."""
    labels = checkpoint.label_names
    if parts == "encoder":
        if classes is None:
            raise ConfigError("importing the encoder only needs classes for the new decode head (--classes)")
        return "encoder"
    if labels is None:
        if parts == "whole":
            raise ConfigError(
                f"{checkpoint.source}: the checkpoint has no decode head to import (an encoder-only mit-b*)"
            )
        if classes is None:
            raise ConfigError(
                f"{checkpoint.source}: an encoder-only checkpoint (no decode head); "
                "pass the classes of the new head (--classes)"
            )
        return "encoder"
    if classes is None:
        return "whole"
    if parts == "whole":
        if len(classes) != len(labels):
            raise ConfigError(
                f"{checkpoint.source}: the decode head predicts {len(labels)} classes but {len(classes)} "
                "were given; import the encoder only (--parts encoder)"
            )
        return "whole"
    if [c.name.lower() for c in classes] == [label.lower() for label in labels]:
        return "whole"
    log.info(
        "%s: the classes differ from the checkpoint's %d labels; importing the encoder only "
        "(--parts whole keeps the head)",
        checkpoint.source,
        len(labels),
    )
    return "encoder"


def _check_tensors(
    checkpoint: HFCheckpoint,
    tensors: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    wanted: Sequence[str],
    chosen: str,
) -> None:
    """Every tensor to import exists with the network's shape; nothing unexpected is left over."""
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{checkpoint.source}: {len(missing)} tensor(s) missing for a {chosen} import, e.g. {missing[0]}"
        )
    wrong = [k for k in wanted if tuple(tensors[k].shape) != tuple(target[k].shape)]
    if wrong:
        key = wrong[0]
        raise CheckpointError(
            f"{checkpoint.source}: {key} has shape {tuple(tensors[key].shape)}, the config.json network "
            f"{tuple(target[key].shape)}"
        )
    unexpected = [k for k in tensors if k not in target]
    if unexpected:
        raise CheckpointError(
            f"{checkpoint.source}: {len(unexpected)} tensor(s) a SegFormer does not have, "
            f"e.g. {unexpected[0]}"
        )


def _read_config(path: Path, source: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{source}: no {CONFIG_NAME} beside the weights (a transformers checkpoint folder has one)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON config ({_first_line(err)})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _read_weights(path: Path) -> tuple[tuple[Path, ...], dict[str, torch.Tensor]]:
    """Tensors of one weights file or of the shards a ``*.index.json`` lists."""
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            shards = sorted({path.parent / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: not a checkpoint index ({_first_line(err)})") from err
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(_read_weights(shard)[1])
        return tuple(shards), tensors
    return (path,), _read_weight_file(path)


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors or a ``torch.save`` zip by content (not by suffix), never unpickling code."""
    import pickle

    import torch

    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from err
    expected = "expected model.safetensors or pytorch_model.bin from save_pretrained"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (100 << 20):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors file ({_first_line(err)})") from err
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save zip, or a legacy pickle
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects besides tensors (loading would run code)"
            ) from err
        except (RuntimeError, OSError, ValueError, EOFError) as err:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(err)})") from err
        if not isinstance(loaded, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise CheckpointError(f"{path}: not a state dict of named tensors ({expected})")
        return dict(loaded)
    raise CheckpointError(f"{path}: not a checkpoint file ({expected})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
