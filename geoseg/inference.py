"""Run a segmentation network over batches of tiles on CPU or CUDA.

The CUDA path streams: host batches go through pinned buffers with non-blocking copies, and
results come back one batch late, so the CPU queues batch ``i + 1`` before it handles batch
``i``, and the reader prepares batch ``i + 2``. With ``logits_on_device`` the logits stay on the
GPU (geoseg's blender runs there); otherwise they come back through pinned buffers. On the CPU
several batches run at once (``parallel_batches``), each on its own thread with a share of torch's
threads, instead of one batch on all of them: small ops then need no OpenMP barriers, which stall
whenever anything else (reading, blending, writing, another job) takes a core. With many of those
threads the network runs as a traced TorchScript graph (:class:`TracedNetwork`), which needs no
GIL between its operators.

On CUDA, ``fp32`` means fp32: cuDNN's TF32 convolutions (on by default in PyTorch) are turned
off around the forward pass, so the class map matches the CPU's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from .errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; never defaults to a missing GPU.

    Raises:
        ConfigError: CUDA was asked for but is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); the benchmarks report it.

    Needs both torch's oneDNN bf16 kernels (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``,
    which is also true on AVX-512 CPUs that only emulate bf16) and a native bf16 instruction set,
    as torch's cpuinfo reports it (``torch.cpu.get_capabilities()``), else ``/proc/cpuinfo``.
    On an AVX2-only CPU bf16 autocast measured 8 to 25 times slower than fp32 (docs/performance.md).
    """
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        pass  # NOTE: a private op; when it is gone, the instruction set decides alone
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        try:
            caps = capabilities()
            return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
        except (RuntimeError, AttributeError):
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """Map ``auto`` to the fastest precision that keeps the class map on ``device``.

    bf16 on CUDA (when supported), fp32 on the CPU. bf16 autocast did not pay on any CPU
    measured: emulated (AVX2) it is 8 to 25 times slower than fp32, and on a 16-core Xeon with
    AMX and AVX512-BF16 (torch 2.11, 256 px tiles, batch 4) it ran SegFormer-B0 at 197-214 tiles/s
    against 217 in fp32, and the bundled model at 34-40 against 57-69 (docs/performance.md).
    ``bf16`` can still be asked for on the CPU: on this project's 2-core AMD EPYC with
    AVX512-BF16, traced, it ran ``geoseg predict`` 15 % faster than fp32, and its class map of the
    Zion scene differs from fp32's on 0.106 % of the pixels, so fp32 stays the default there too.

    Raises:
        ConfigError: A precision the device cannot run.
    """
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "fp32"
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 is for CUDA; on the CPU use bf16 or fp32")
    return name


def default_parallel_batches() -> int:
    """Batches the CPU runs at once by default: one per four torch threads, at least 2 and at most 8.

    1 where torch has one thread. Small batches of tiles do not keep many threads busy (each
    operation of a 256 px tile is small), while each batch in flight costs its activations'
    memory (~100-300 MiB at batch 4):
    - this project's 2 cores: two batches of one thread each ran ``geoseg predict`` on a 4096 px
      scene in 15.3 and 16.2 s against 17.5 and 20.9 s for one batch on two threads, and on an
      8192 px one 40 % faster (docs/performance.md);
    - 16 cores (Intel Xeon, the lent GPU machine's CPU; 8192 px scene, batch 4, ``geoseg
      predict`` end to end): 3.0 MP/s with 1 batch, 3.9 with 2, 4.4-5.3 (n = 4) with 4, 4.7
      with 8 and 5.0 with 16, peaking at 0.8, 1.0, 1.3, 2.0 and 2.6 GiB. Four threads a batch
      gave most of the speed for the memory; the cap of 8 is a guess for larger machines.
    """
    threads = torch.get_num_threads()
    return 1 if threads < 2 else min(8, max(2, threads // 4))


#: ``trace=None`` traces only scenes of at least this many tiles: tracing costs about 1-1.5 s once
#: per run on a 2-core AVX2 CPU (trace and freeze 0.7-0.9 s, then the graph's first, profiled
#: runs), paid back only over many batches.
TRACE_MIN_TILES = 256
#: ... and only with this many network threads or more: on 2 cores (two batches of one thread) the
#: traced graph measured 4-5 % faster on an AVX-512 EPYC and the same within the drift on an AVX2
#: one; on 16 cores it is the GIL they share that tracing frees (docs/performance.md).
TRACE_MIN_PARALLEL_BATCHES = 2


def default_trace(parallel_batches: int, tiles: int) -> bool:
    """Whether the network runs traced (:class:`TracedNetwork`) when ``trace`` is not given.

    Yes when at least ``TRACE_MIN_PARALLEL_BATCHES`` batches run at once and the scene has at
    least ``TRACE_MIN_TILES`` tiles. On this project's 2 cores (two batches) with AVX-512,
    ``geoseg predict`` on an 8192 px mosaic took 45.4 and 46.2 s traced against 48.0 and 47.7 s
    eager, the tracing included; one batch on every thread is left eager (traced and eager
    within the drift there).
    """
    return parallel_batches >= TRACE_MIN_PARALLEL_BATCHES and tiles >= TRACE_MIN_TILES


class TracedNetwork(torch.nn.Module):
    """``module`` run as TorchScript: traced and frozen on the first batch of each tile shape.

    SegFormer is many small operators, and each one called from Python holds the GIL between
    them. With many network threads on many cores (``parallel_batches``), they and the calling
    thread, which blends, queue for it at every operator; a traced graph runs all of its
    operators in C++ without it. On a 16-core Xeon (the bundled model, 8192 px mosaic, 16
    batches of one thread each) ``predict_scene`` ran at 6.79 MP/s traced against 5.06 eager, and
    the calling thread spent 4.6 s blending instead of 11.6 s (docs/performance.md).

    The batch size may change from call to call (one graph serves all); the tile's shape may not,
    so each shape gets its own graph. Shape checks in the module's Python become constants of
    that graph, which is right for every input of the shape. A module that cannot be traced (or
    a torch without TorchScript, which PyTorch has deprecated in favour of ``torch.compile`` and
    ``torch.export``, neither of which runs a graph without the GIL and without a C++ compiler)
    runs as it is, with one log line.

    With ``autocast_dtype`` (bf16 on the CPU) the graph is traced under autocast, so it records
    the casts autocast made, the module's own fp32 regions included, and freezing stores the
    weights already cast; it then runs with autocast off, which would otherwise cast again inside
    those fp32 regions (it gives eager autocast's logits bit for bit on the bundled model). On this
    project's 2 cores (AVX512-BF16) the bundled model ran at 39-43 tiles/s traced in bf16 against
    27-30 traced in fp32 and 24 eager in bf16 (docs/performance.md).
    """

    def __init__(self, module: torch.nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.module = module
        self.autocast_dtype = autocast_dtype
        self.graphs: dict[tuple[int, ...], Any] = {}  # tile shape -> graph, or None: runs eager
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output for ``x``, through the graph of ``x``'s tile shape (traced now if new)."""
        shape = tuple(x.shape[1:])
        graph = self.graphs.get(shape, False)
        if graph is False:
            with self._lock:  # the network threads' first batches: one traces, the others wait
                if shape not in self.graphs:
                    self.graphs[shape] = self._trace(x)
                graph = self.graphs[shape]
        if graph is None:
            return self.module(x)  # under the caller's autocast, if any
        with torch.autocast(x.device.type, enabled=False):  # the graph carries its own casts
            return graph(x)

    @property
    def active(self) -> bool:
        """Whether every tile shape seen so far (at least one) ran through a traced graph."""
        return bool(self.graphs) and all(graph is not None for graph in self.graphs.values())

    def _trace(self, x: torch.Tensor) -> Any:
        example = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        try:
            # NOTE: inference tensors cannot be traced; the example is a plain tensor.
            traced_precision = (
                torch.autocast(x.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            # NOTE: freezing under the caller's autocast would run TorchScript's own autocast pass,
            # which casts to bf16 inside the module's fp32 regions too (the trace no longer shows them).
            no_autocast = torch.autocast(x.device.type, enabled=False)
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), no_autocast:
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants
                warnings.simplefilter("ignore", DeprecationWarning)  # said once in the docstring
                with traced_precision:
                    traced = torch.jit.trace(self.module.eval(), example, check_trace=False)
                return torch.jit.freeze(traced)
        except Exception as err:  # noqa: BLE001 - any failure means: run eager
            log.info("the network cannot be traced (%s: %s); running it eager", type(err).__name__,
                     str(err).splitlines()[0] if str(err) else "")
            return None


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits ``(N, K, h, w)`` as float32 at ``size``.

    Upsampled bilinearly, as Hugging Face's post-processing does; returned as they are when
    already that size (a model with a pixel head).
    """
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@dataclass
class TileBatch:
    """Tiles ready for the network: ``pixels (N, C, T, T)`` float32 and their bookkeeping."""

    pixels: npt.NDArray[np.float32]
    tiles: list[Any]
    valid: list[npt.NDArray[np.bool_]]
    extents: list[tuple[int, int]]  # (h, w) of each tile inside the scene


class TilePredictor:
    """Turns batches of normalised tiles into full-resolution logits.

    SegFormer predicts at 1/4 resolution; logits are upsampled bilinearly to the tile size
    (as Hugging Face's post-processing does) before they are blended.

    Args:
        module: The network, in eval mode, on the CPU.
        device: Where to run it.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; weights stay fp32).
        tile_px: Tile edge in pixels.
        max_batch: Largest batch that will be submitted (sizes the pinned buffers).
        channels_last: Run convolutions in channels-last memory format. Off by default: geoseg's
            SegFormer already works channels-last inside, and channels-last weights measured within
            5 % either way on a 2-core AVX2 CPU (bench/bench_segformer.py).
        compile: Wrap the network in ``torch.compile`` (the first batch compiles: about a minute
            for B0 on a CPU, which needs a C++ compiler). A module with a ``fixed_precision``
            attribute (an ONNX runtime session) is never compiled.
        logits_on_device: On CUDA, :meth:`stream` yields the logits as tensors on the GPU
            instead of host arrays (for a blender on the GPU). Ignored on the CPU.
        parallel_batches: On the CPU, batches run through the network at once, each on its own
            thread with ``torch.get_num_threads() // parallel_batches`` torch threads; ``None``:
            :func:`default_parallel_batches`. Forced to 1 on CUDA, for a module with a
            ``fixed_precision`` (ONNX) and with ``compile``.
        trace: On the CPU (fp32 or bf16), run the network as a traced TorchScript graph
            (:class:`TracedNetwork`); ``None``: :func:`default_trace` with ``tiles``. Ignored on
            CUDA, with ``compile`` and for a module with a ``fixed_precision``.
        tiles: Tiles the run will predict, for ``trace=None``.

    A module with a ``fixed_precision`` attribute runs at that precision whatever is asked
    (``self.precision`` says which); autocast cannot reach into it.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: torch.device,
        precision: str,
        tile_px: int,
        max_batch: int,
        channels_last: bool = False,
        compile: bool = False,
        logits_on_device: bool = False,
        parallel_batches: int | None = None,
        trace: bool | None = False,
        tiles: int = 0,
    ):
        fixed = getattr(module, "fixed_precision", None)
        if fixed is not None and fixed != precision:
            log.info("the model runs in %s (asked for %s)", fixed, precision)
            precision = fixed
        self.device = device
        self.precision = precision
        self.tile_px = tile_px
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = module.to(device=device, memory_format=self._memory_format).eval()
        if compile and fixed is None:
            self.module = torch.compile(self.module)
        elif compile:
            log.info("--compile does not apply to this model (%s); running it as is", type(module).__name__)
        self._autocast = precision != "fp32"
        self._dtype = _DTYPES[precision]
        self._cuda = device.type == "cuda"
        self.logits_on_device = logits_on_device and self._cuda
        self._pinned_in: list[torch.Tensor] = []
        self._pinned_out: list[torch.Tensor] = []
        self._copied: list[Any] = [None, None]  # per pinned input buffer: its last copy to the GPU
        self._max_batch = max_batch
        self._launches = 0
        if self._cuda or fixed is not None or compile:
            parallel_batches = 1
        elif parallel_batches is None:
            parallel_batches = default_parallel_batches()
        self.parallel_batches = max(1, min(parallel_batches, torch.get_num_threads()))
        if trace is None:
            trace = default_trace(self.parallel_batches, tiles)
        self.traced = (
            bool(trace) and not self._cuda and precision in ("fp32", "bf16") and fixed is None and not compile
        )
        if self.traced:
            self.module = TracedNetwork(self.module, autocast_dtype=self._dtype if self._autocast else None)

    @property
    def ran_traced(self) -> bool:
        """Whether the network ran through traced graphs (not eager after a failed trace)."""
        return isinstance(self.module, TracedNetwork) and self.module.active

    @property
    def batches_in_flight(self) -> int:
        """Batches whose pixels :meth:`stream` may still be reading (readers must not reuse them)."""
        return 1 if self.parallel_batches == 1 else self.parallel_batches + 1

    def stream(self, batches: Iterable[TileBatch]) -> Iterator[tuple[TileBatch, Any]]:
        """Yield ``(batch, logits (N, K, T, T) float32)`` in order, one batch behind the launch.

        With parallel batches on the CPU, ``parallel_batches`` behind. Logits are a host array,
        or a tensor on the GPU with ``logits_on_device``. Each may be reused after the next item
        is requested: consume it first.
        """
        if self.parallel_batches > 1:
            yield from self._stream_parallel(batches)
            return
        pending: tuple[TileBatch, Any] | None = None
        for batch in batches:
            launched = self._launch(batch)
            if pending is not None:
                yield pending[0], self._collect(pending[1])
            pending = (batch, launched)
        if pending is not None:
            yield pending[0], self._collect(pending[1])

    def _stream_parallel(self, batches: Iterable[TileBatch]) -> Iterator[tuple[TileBatch, Any]]:
        """:meth:`stream` on the CPU with ``parallel_batches`` network threads.

        One batch more than there are threads is submitted, so every thread is busy while the
        caller blends the oldest batch; results come back in submission order.
        """
        total = torch.get_num_threads()
        per_batch = max(1, total // self.parallel_batches)
        log.debug("network: %d batches at once, %d torch thread(s) each", self.parallel_batches, per_batch)
        pool = ThreadPoolExecutor(
            self.parallel_batches, thread_name_prefix="geoseg-network",
            initializer=torch.set_num_threads, initargs=(per_batch,),
        )
        pending: deque[tuple[TileBatch, Future[Any]]] = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(self._launch, batch)))
                if len(pending) > self.parallel_batches:
                    done, future = pending.popleft()
                    yield done, self._collect(future.result())
            while pending:
                done, future = pending.popleft()
                yield done, self._collect(future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            # NOTE: torch keeps the last set_num_threads process-wide for threads started later.
            torch.set_num_threads(total)

    def predict(self, pixels: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Logits ``(N, K, T, T)`` for one batch as a host array, synchronously (tests and benchmarks)."""
        logits = self._collect(self._launch(TileBatch(pixels, [], [], [])))
        return logits.cpu().numpy() if isinstance(logits, torch.Tensor) else logits.copy()

    @torch.inference_mode()
    def _launch(self, batch: TileBatch) -> Any:
        n = batch.pixels.shape[0]
        host = torch.from_numpy(batch.pixels)
        slot = self._launches % 2
        self._launches += 1
        if self._cuda:
            if not self._pinned_in:
                shape = (self._max_batch, *batch.pixels.shape[1:])
                self._pinned_in = [torch.empty(shape, dtype=torch.float32).pin_memory() for _ in range(2)]
            if self._copied[slot] is not None:
                self._copied[slot].synchronize()  # the GPU has read what this buffer held two batches ago
            staged = self._pinned_in[slot][:n]
            staged.copy_(host)
            inputs = staged.to(self.device, non_blocking=True)
            self._copied[slot] = torch.cuda.Event()
            self._copied[slot].record()
        else:
            inputs = host
        inputs = inputs.contiguous(memory_format=self._memory_format)
        autocast = torch.autocast(self.device.type, dtype=self._dtype, enabled=self._autocast)
        with self._fp32_means_fp32(), autocast:
            logits = self.module(inputs)
        # (N, K, T/s, T/s) at the first stride s (4; 2 for a finer decoder) -> (N, K, T, T); a model
        # with a pixel head already gives (N, K, T, T).
        logits = upsample_logits(logits, (self.tile_px, self.tile_px))
        if not self._cuda:
            return logits.contiguous()
        if self.logits_on_device:
            return logits.contiguous(), None  # later work on the same stream waits for it
        if not self._pinned_out:
            shape = (self._max_batch, *logits.shape[1:])
            self._pinned_out = [torch.empty(shape, dtype=torch.float32).pin_memory() for _ in range(2)]
        out = self._pinned_out[slot][:n]
        out.copy_(logits, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return out, done

    def _collect(self, launched: Any) -> Any:
        if self._cuda:
            out, done = launched
            if done is None:
                return out
            done.synchronize()
            return out.numpy()
        return launched.numpy()

    def _fp32_means_fp32(self) -> Any:
        """On CUDA in fp32, cuDNN convolutions without TF32 (PyTorch allows it by default); else nothing."""
        if not (self._cuda and self.precision == "fp32"):
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(
            enabled=cudnn.enabled,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=False,
        )
