"""Export a geoseg model file to ONNX, and run ONNX models through onnxruntime in geoseg's engine.

The ONNX file carries the model file's metadata JSON, unchanged, under the ``"geoseg"`` key of
its ``metadata_props`` (and the source file's SHA-256 under ``"geoseg_sha256"``), so it is as
self-describing as the ``.safetensors`` it came from. Its input ``pixel_values`` is
``(N, C, H, W)`` float32 with dynamic batch, height and width; its output ``logits`` is
``(N, K, ceil(H/4), ceil(W/4))``, exactly what the torch network returns. Loading one never
unpickles anything: ONNX is a protobuf, read by onnxruntime.

onnx and onnxruntime are the optional extra ``geoseg[onnx]``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ._lazy import lazy_import
from .errors import CheckpointError, ConfigError, OutputError
from .modelfile import METADATA_KEY, LoadedModel, ModelMetadata, file_sha256

log = logging.getLogger(__name__)

SHA256_KEY = "geoseg_sha256"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
# Edge of the example input traced at export; the axes stay dynamic, any tile of 32 px or more runs.
_TRACE_PX = 128


def export_onnx(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
) -> Path:
    """Write a geoseg model file as an ONNX model with the geoseg metadata in its ``metadata_props``.

    Uses torch's TorchScript-based exporter (``dynamo=False``): it needs no onnxscript and, with
    torch 2.13, gives the same logits as the torch network to about 1e-6 at any batch and tile size.
    Writes to a temporary name beside ``out``, then renames.

    Args:
        model_path: A geoseg ``.safetensors`` model file.
        out: Destination; must end in ``.onnx`` (that is how geoseg recognises ONNX models).
        opset: ONNX opset, at least 17.
        overwrite: Replace ``out`` if it exists.

    Returns:
        The path written.

    Raises:
        CheckpointError: ``model_path`` is missing or not a geoseg model file.
        OutputError: ``out`` exists, lacks the ``.onnx`` suffix, or its folder is missing.
        ConfigError: ``opset`` below 17.
        DependencyNotFoundError: onnx is not installed.
    """
    from safetensors import safe_open

    from .modelfile import load_model

    onnx = lazy_import("onnx", extra="onnx")
    source, out = Path(model_path), Path(out)
    if opset < 17:
        raise ConfigError(f"opset must be 17 or more (LayerNormalization), got {opset}")
    if out.suffix.lower() != ".onnx":
        raise OutputError(f"{out}: the output name must end in .onnx")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists (use --overwrite to replace it)")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist")
    if source.suffix.lower() == ".onnx":
        raise CheckpointError(f"{source}: already an ONNX model; export a .safetensors model file")
    loaded = load_model(source)
    with safe_open(str(source), framework="pt") as f:
        metadata_json = (f.metadata() or {})[METADATA_KEY]  # the exact JSON of the model file
    example = torch.zeros(1, len(loaded.metadata.bands), _TRACE_PX, _TRACE_PX)
    tmp = out.with_name(f".{out.name}.geoseg-tmp{os.getpid()}")
    try:
        with warnings.catch_warnings():
            # The input-size check and the decoder fold run in Python while tracing; both are
            # shape-independent, so the traced graph holds for every size (tested).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            _export(
                loaded.module,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
                dynamic_axes={
                    INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                    OUTPUT_NAME: {0: "batch", 2: "height_4", 3: "width_4"},
                },
            )
        proto = onnx.load(str(tmp))
        for key, value in ((METADATA_KEY, metadata_json), (SHA256_KEY, loaded.sha256)):
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, value
        proto.producer_name = "geoseg"
        proto.doc_string = f"{loaded.metadata.name}: geoseg model exported from {source.name}"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (opset %d) from %s", out, opset, source)
    return out


def highest_opset() -> int | None:
    """The highest ONNX opset the installed torch exports (``None``: it does not say)."""
    return getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", None)


def _export(*args: Any, opset_version: int, **kwargs: Any) -> None:
    """``torch.onnx.export``, with an opset this torch cannot write as a one-line error."""
    highest = highest_opset()
    if highest is not None and opset_version > highest:  # checked first: torch dumps its graph, then fails
        raise ConfigError(
            f"--opset {opset_version}: torch {torch.__version__} exports opsets up to {highest}"
        )
    try:
        torch.onnx.export(*args, opset_version=opset_version, **kwargs)
    except RuntimeError as err:
        if "opset" not in str(err).lower():
            raise
        raise ConfigError(f"--opset {opset_version}: torch {torch.__version__} cannot export it") from err


class OnnxSegmenter(torch.nn.Module):
    """An onnxruntime session behind a ``torch.nn.Module`` face, for :class:`geoseg.inference.TilePredictor`.

    ``forward`` takes and returns torch tensors like the torch network, so the same engine
    (tiling, batching, blending, writing) runs it. Runs in fp32 only (``fixed_precision``):
    autocast cannot reach into onnxruntime. The session uses ``torch.get_num_threads()`` intra-op
    threads (rebuilt if that changes) and does not spin idle threads, which would starve the
    reader and writer threads on a small machine. On ``cuda`` devices it uses onnxruntime's CUDA
    provider when installed (onnxruntime-gpu), else the CPU; tensors are copied through the host.

    Args:
        path: The ``.onnx`` file.
        session: An already open session of it, reused while the thread count is unchanged.
    """

    fixed_precision = "fp32"

    def __init__(self, path: str | os.PathLike[str], session: Any = None):
        super().__init__()
        self.path = Path(path)
        self._device = torch.device("cpu")
        self._session = session
        self._session_key = _session_key(self._device) if session is not None else None

    def to(self, *args: Any, **kwargs: Any) -> OnnxSegmenter:
        """Remember the device (and ignore dtype and memory format): there are no torch parameters."""
        device = kwargs.get("device")
        if device is None and args and isinstance(args[0], (str, torch.device)):
            device = args[0]
        if device is not None:
            self._device = torch.device(device)
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, ceil(H/4), ceil(W/4))`` float32 of ``(N, C, H, W)`` pixels, on their device."""
        key = _session_key(self._device)
        if self._session is None or key != self._session_key:
            self._session = open_session(self.path, self._device)
            self._session_key = key
        array = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits).to(pixel_values.device)

    def extra_repr(self) -> str:
        """Show the file in ``print(module)``."""
        return f"path={str(self.path)!r}"


def _session_key(device: torch.device) -> tuple[int, str]:
    return torch.get_num_threads(), device.type


def open_session(path: str | os.PathLike[str], device: torch.device | None = None) -> Any:
    """An onnxruntime ``InferenceSession`` of ``path`` for ``device`` (CPU unless CUDA is asked and present).

    Raises:
        CheckpointError: Missing file, or not an ONNX model onnxruntime can run.
        DependencyNotFoundError: onnxruntime is not installed.
    """
    ort = lazy_import("onnxruntime", extra="onnx")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # NOTE: as the CLI shortens libgomp's spinning for torch: spinning pool threads steal the reader's core.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    providers = ["CPUExecutionProvider"]
    cuda = "CUDAExecutionProvider"
    if device is not None and device.type == "cuda" and cuda in ort.get_available_providers():
        providers.insert(0, cuda)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own unrelated exception classes
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise CheckpointError(f"{path}: not an ONNX model onnxruntime can run ({first})") from err


def read_onnx_metadata(path: str | os.PathLike[str], session: Any = None) -> ModelMetadata:
    """The geoseg metadata stored in an ONNX model's ``metadata_props``.

    Raises:
        CheckpointError: Not an ONNX model, no geoseg metadata, or metadata that does not fit the graph.
        DependencyNotFoundError: onnxruntime is not installed.
    """
    path = Path(path)
    session = session or open_session(path)
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise CheckpointError(f"{path}: ONNX model without geoseg metadata (make one with geoseg export)")
    try:
        metadata = ModelMetadata.from_json(props[METADATA_KEY])
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt geoseg metadata ({str(err).splitlines()[0]})") from err
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
        raise CheckpointError(f"{path}: expected one input {INPUT_NAME!r} and an output {OUTPUT_NAME!r}")
    channels = inputs[0].shape[1] if len(inputs[0].shape) == 4 else None
    if isinstance(channels, int) and channels != len(metadata.bands):
        raise CheckpointError(
            f"{path}: the graph takes {channels} bands, the metadata lists {len(metadata.bands)}"
        )
    logits = next(o for o in outputs if o.name == OUTPUT_NAME).shape
    classes = logits[1] if len(logits) == 4 else None
    if isinstance(classes, int) and classes != len(metadata.classes):
        raise CheckpointError(
            f"{path}: the graph gives {classes} classes, the metadata lists {len(metadata.classes)}"
        )
    size = inputs[0].shape[2:] if len(inputs[0].shape) == 4 else []
    if any(isinstance(s, int) for s in size):  # geoseg exports any tile size (dynamic axes)
        raise CheckpointError(f"{path}: the graph takes tiles of {' x '.join(map(str, size))} px only; "
                              "geoseg needs any tile size (export with dynamic height and width)")
    return metadata


def load_onnx_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Open an exported ONNX model for :func:`geoseg.pipeline.predict_scene` (CPU, fp32).

    Raises:
        CheckpointError: Missing, corrupt or not a geoseg ONNX model.
        DependencyNotFoundError: onnxruntime is not installed.
    """
    path = Path(path)
    session = open_session(path)
    metadata = read_onnx_metadata(path, session)
    module = OnnxSegmenter(path, session).eval()
    return LoadedModel(module=module, metadata=metadata, sha256=file_sha256(path), path=path)
