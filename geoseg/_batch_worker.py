"""The worker side of ``geoseg batch``: one scene per dask task, the model loaded once per worker.

Imported only where dask is installed (it subclasses distributed's WorkerPlugin).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from distributed import Event, WorkerPlugin, get_worker

from ._malloc import reuse_freed_memory
from ._version import __version__
from .batch import MAX_ATTEMPTS, attempts_file, died_message
from .config import PredictConfig
from .errors import CheckpointError, GeosegError
from .outputs import OutputOptions

if TYPE_CHECKING:
    from .modelfile import LoadedModel

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SceneJob:
    """One scene as a worker receives it: everything is plain data (no datasets, no model)."""

    input: str
    output: str
    config: PredictConfig
    model_path: str
    model_sha256: str
    key: str
    topic: str
    plugin: str
    resample: str | None = None
    assets: Mapping[str, str] | Sequence[str] | None = None
    outputs: OutputOptions | None = None  # extra outputs, their names already filled in for this scene
    stop_event: str | None = None  # a dask Event set by the driver to start no more scenes (--on-error stop)


class ModelCache(WorkerPlugin):
    """A dask worker plugin holding the models a worker has loaded, keyed by file sha256.

    Registered once per batch (and unregistered at its end, which frees the models), so each
    worker loads the model for its first scene and reuses it for the rest.
    """

    def __init__(self) -> None:
        self.models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # sent to workers empty; the lock cannot be pickled

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        """Called by dask in each worker process when the plugin is registered: tune malloc.

        The nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes glibc's
        mmap threshold at 128 KiB: a scene took 1.5-2x as long (bench/bench_batch.py). Replaced
        here, for the worker and for the processes it starts (CRF workers).
        """
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        reuse_freed_memory()

    def teardown(self, worker: Any) -> None:
        """Called by dask when the plugin is removed: drop the models."""
        self.models.clear()

    def get(self, path: str, sha256: str) -> tuple[LoadedModel, bool]:
        """The model at ``path``, and whether this call loaded it (``False``: from the cache).

        Raises:
            CheckpointError: The file is invalid, or no longer the file the batch planned with.
        """
        from .modelfile import load_model

        with self._lock:
            if sha256 in self.models:
                return self.models[sha256], False
            model = load_model(path)
            if model.sha256 != sha256:
                raise CheckpointError(
                    f"{path}: the model file changed since the batch started; run the batch again"
                )
            self.models[sha256] = model
            return model, True


@dataclass(frozen=True)
class SceneOutcome:
    """What a worker reports back for one scene."""

    status: Literal["done", "failed", "stopped"]  # stopped: not started, nothing written
    worker: str
    worker_pid: int
    started_at: float
    finished_at: float
    model_loaded: bool = False
    model_load_seconds: float = 0.0
    predict_seconds: float | None = None
    width: int | None = None
    height: int | None = None
    output_sha256: str | None = None
    output_size: int | None = None
    extra_outputs: dict[str, int | None] | None = None  # path: size (None for a folder)
    error: str | None = None


def predict_task(job: SceneJob) -> SceneOutcome:
    """Run one scene on a dask worker; every error becomes a ``failed`` outcome, not a task error.

    Counts the start in the scene's attempts file first: a start after :data:`MAX_ATTEMPTS`
    (the worker of each earlier one died) fails at once. Then reports the start through the dask
    event ``job.topic``, so the driver marks the scene ``running`` while it is in progress.
    """
    from .modelfile import file_sha256
    from .pipeline import predict_scene

    worker = get_worker()
    started = time.time()
    report = {"worker": worker.address, "worker_pid": os.getpid(), "started_at": started}
    if job.stop_event is not None and Event(job.stop_event).is_set():
        return SceneOutcome("stopped", **report, finished_at=time.time())
    attempt = register_attempt(job.output, worker.address)
    if attempt > MAX_ATTEMPTS:
        # dask reschedules a dead worker's scene up to its allowed-failures; geoseg allows one retry.
        return SceneOutcome("failed", **report, finished_at=time.time(), error=died_message(MAX_ATTEMPTS))
    worker.log_event(
        job.topic,
        {"key": job.key, "pid": os.getpid(), "worker": worker.address, "at": started, "attempt": attempt},
    )
    loaded, load_seconds = False, 0.0
    try:
        cache = worker.plugins.get(job.plugin)
        if not isinstance(cache, ModelCache):  # NOTE: plugin lost (a worker that joined late): load uncached
            cache = ModelCache()
        clock = time.perf_counter()
        model, loaded = cache.get(job.model_path, job.model_sha256)
        load_seconds = time.perf_counter() - clock if loaded else 0.0
        config = job.config.replace(device=_worker_device(job.config.device, worker.name))
        result = predict_scene(
            job.input,
            job.output,
            config,
            model=model,
            overwrite=True,
            resample=job.resample,
            assets=job.assets,  # type: ignore[arg-type]
            outputs=job.outputs,
        )
        return SceneOutcome(
            "done",
            **report,
            finished_at=time.time(),
            model_loaded=loaded,
            model_load_seconds=load_seconds,
            predict_seconds=result.seconds,
            width=result.width,
            height=result.height,
            output_sha256=file_sha256(job.output),
            output_size=os.path.getsize(job.output),
            extra_outputs=_sizes(job.outputs.files()) if job.outputs is not None else None,
        )
    except Exception as err:  # noqa: BLE001 - one scene's failure, whatever it is, must not stop the batch
        if not isinstance(err, GeosegError):
            # NOTE: a bug: the traceback goes to the worker's log (a local cluster's is the terminal).
            log.exception("%s: unexpected error", job.input)
        return SceneOutcome(
            "failed",
            **report,
            finished_at=time.time(),
            model_loaded=loaded,
            model_load_seconds=load_seconds,
            error=one_line(err),
        )


def _sizes(paths: Sequence[os.PathLike[str]]) -> dict[str, int | None]:
    """Each path's size in bytes; ``None`` for a folder (a report)."""
    return {str(path): None if os.path.isdir(path) else os.path.getsize(path) for path in paths}


def register_attempt(output: str, worker: str) -> int:
    """Append this start to the attempts file of ``output``; returns how many starts it lists.

    A file beside the output, not worker memory, because the worker of an earlier start is gone.
    """
    path = attempts_file(output)
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {worker} {time.time():.3f}\n")
    with open(path) as f:
        return sum(1 for _ in f)


def _worker_device(device: str, worker_name: Any) -> str:
    """``auto`` on a machine with several GPUs: local worker ``i`` takes GPU ``i % count``."""
    if device != "auto":
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 1 and isinstance(worker_name, int):
        return f"cuda:{worker_name % count}"
    return device


def one_line(err: BaseException) -> str:
    """An error as one line; names the type of errors that are not geoseg's own."""
    text = " ".join(str(err).split()) or repr(err)
    return text if isinstance(err, GeosegError) else f"{type(err).__name__}: {text}"


def geoseg_version() -> str:
    """This worker's geoseg version (run on every worker to check geoseg is importable there)."""
    return __version__
