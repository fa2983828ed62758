"""Many scenes in parallel on a dask cluster, resumable through a manifest in the out dir.

The driver (the process that calls :func:`run_batch`) plans the scenes, holds an exclusive lock
on the out dir, submits one dask task per scene and is the manifest's only writer. Each worker
loads the model once (a :class:`ModelCache` worker plugin) and runs
:func:`geoseg.pipeline.predict_scene` on its scenes; it reports a scene's start through a dask
event, so the manifest says ``running`` while the scene is in progress.

Resume: a scene is skipped when the manifest says it is done (or was skipped) with the same input
size and modification time, model sha256, settings hash and output paths, and its output files
(the class raster and the extra outputs) are still there with their recorded sizes. Everything
else is (re)done; ``force`` redoes everything. A file under an output name that the manifest did
not write is never replaced (without ``force``).

Faults: a scene whose worker dies is run once more elsewhere, then marked failed; outputs appear
under their final name only when complete (predict_scene's temporary-file rename); the manifest is
SQLite, consistent at every moment; a second driver on the same out dir is refused by the lock.
A scene runs once per run (see :class:`_Driver`), and the driver returns only when every task of
the run has ended.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import logging
import os
import queue
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from ._machine import physical_memory_bytes, usable_cores
from ._remote import display_name, redact, split_list
from ._version import __version__
from .config import PredictConfig
from .errors import ConfigError, DependencyNotFoundError, InputError, OutputError
from .manifest import COMPLETE, MANIFEST_NAME, Manifest, SceneRecord
from .outputs import OutputOptions

if TYPE_CHECKING:
    from distributed import Client, Future

    from ._batch_worker import SceneJob

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{stem}_landcover.tif"
LOCK_NAME = ".geoseg-batch.lock"
ATTEMPTS_MARKER = ".geoseg-attempts"
OnError = Literal["continue", "stop"]
#: Starts of one scene on a worker: the first, and one retry after its worker died.
MAX_ATTEMPTS = 2
#: Memory one local worker may need (torch, the model, a scene's row band; peaks seen: 0.5-0.7 GiB).
WORKER_MEMORY_BYTES = 3 << 29  # 1.5 GiB
#: PredictConfig fields that change speed, never the output: left out of the settings hash.
SPEED_ONLY_FIELDS = (
    "model", "threads", "parallel_batches", "reader_threads", "prefetch_batches", "batch_size", "compile",
    "trace",
)


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Turn files, globs and ``@list.txt`` files into the list of scenes, in order, without repeats.

    A list file holds one path or GDAL URI per line; blank lines and ``#`` comments are ignored,
    and relative paths are relative to the list file. URIs (``s3://``, ``https://``, ``/vsi...``)
    are kept as given; local paths become absolute. A scene may be band files joined by commas,
    as predict takes them; its output is named after the first.

    Raises:
        InputError: A list file cannot be read, or a glob matches nothing.
    """
    scenes: list[str] = []
    for item in items:
        if item.startswith("@"):
            list_path = Path(item[1:])
            try:
                lines = list_path.read_text().splitlines()
            except OSError as err:
                raise InputError(
                    f"{list_path}: cannot read the list of scenes ({err.strerror or err})"
                ) from err
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    scenes.append(_canonical(line, list_path.parent))
        elif not _is_uri(item) and glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise InputError(f"{item}: the pattern matches no file")
            scenes.extend(_canonical(match) for match in matches)
        else:
            scenes.append(_canonical(item))
    return list(dict.fromkeys(scenes))


def _canonical(scene: str, base: Path | None = None) -> str:
    """Local paths absolute (relative ones from ``base``), also in comma-joined band files; URIs as given."""

    def absolute(path: str) -> str:
        return path if _is_uri(path) else os.path.abspath(os.path.join(base or "", path))

    if "," in scene and not os.path.exists(absolute(scene)):  # as resolve_source splits
        return ",".join(absolute(part) for part in split_list(scene))
    return absolute(scene)


def _is_uri(text: str) -> bool:
    return "://" in text or text.startswith("/vsi")


def output_name(scene: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The output file name of ``scene``: ``template`` with ``{stem}``, ``{name}`` and ``{parent}`` filled in.

    Raises:
        ConfigError: The template has another field, or leaves the out dir.
    """
    if "," in scene and not os.path.exists(scene):  # band files: named after the first
        scene = split_list(scene)[0]
    path = PurePosixPath(scene.split("?", 1)[0].rstrip("/"))
    try:
        name = template.format(stem=path.stem, name=path.name, parent=path.parent.name)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"output template {template!r}: {err}; it may use {{stem}}, {{name}} and {{parent}}"
        ) from None
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ConfigError(
            f"output template {template!r} gives {name!r}; it must name a file inside the out dir"
        )
    return name


def input_fingerprint(scene: str) -> tuple[int | None, int | None]:
    """Size in bytes and modification time (ns) of a local input; ``(None, None)`` for URIs, missing files."""
    if _is_uri(scene):
        return None, None
    try:
        stat = os.stat(scene)
    except OSError:
        return None, None
    return stat.st_size, stat.st_mtime_ns


def settings_hash(
    config: PredictConfig,
    resample: str | None = None,
    assets: Mapping[str, str] | Sequence[str] | None = None,
    outputs: OutputOptions | None = None,
) -> str:
    """sha256 of the settings that change the outputs (the model is hashed separately).

    Fields that only change speed (:data:`SPEED_ONLY_FIELDS`) are left out, so re-running with more
    threads or a bigger batch does not redo finished scenes. The extra outputs asked for count:
    asking for statistics on a re-run redoes the scenes done without them.
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in SPEED_ONLY_FIELDS}
    if settings.get("crf"):
        settings["crf"] = {k: v for k, v in settings["crf"].items() if k != "workers"}  # speed only
    settings["resample"] = resample
    settings["assets"] = dict(assets) if isinstance(assets, Mapping) else (list(assets) if assets else None)
    if outputs is not None and outputs != OutputOptions():
        settings["outputs"] = dataclasses.asdict(outputs)
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def scene_outputs(outputs: OutputOptions, scene: str, out_dir: Path) -> OutputOptions:
    """The extra outputs of one scene: each file name in ``outputs`` is a template like the output's.

    Raises:
        ConfigError: A template has an unknown field or leaves the out dir.
    """
    names = {
        field: out_dir / output_name(scene, str(template))
        for field, template in (
            ("probabilities", outputs.probabilities), ("confidence", outputs.confidence),
            ("stats", outputs.stats), ("vector", outputs.vector), ("report", outputs.report),
            ("stac", outputs.stac),
        )
        if template is not None
    }
    return dataclasses.replace(outputs, **names)


@dataclass(frozen=True)
class PlannedScene:
    """What a run will do with one scene, and why."""

    input: str
    output: str
    input_size: int | None
    input_mtime_ns: int | None
    action: Literal["run", "skip", "refuse"]
    reason: str
    outputs: OutputOptions | None = None  # its extra outputs (--stats, ...), names filled in

    @property
    def extra_files(self) -> list[str]:
        """The paths of its extra outputs."""
        return [str(path) for path in self.outputs.files()] if self.outputs is not None else []


def plan_scenes(
    scenes: Sequence[str],
    out_dir: Path,
    manifest: Manifest,
    model_sha256: str,
    config_hash: str,
    *,
    template: str = DEFAULT_TEMPLATE,
    force: bool = False,
    outputs: OutputOptions | None = None,
) -> list[PlannedScene]:
    """Decide for each scene whether to run it, skip it (done before) or refuse it (foreign output).

    ``outputs`` are the extra outputs, with templates as file names (see :func:`scene_outputs`);
    they count as the class raster does: each must have been written by this out dir's manifest
    to be replaced, and each must still be there for the scene to be skipped.

    Raises:
        ConfigError: Two scenes would write the same output.
    """
    planned: list[PlannedScene] = []
    owner: dict[str, str] = {}
    for scene in scenes:
        output = str(out_dir / output_name(scene, template))
        if output in owner:
            raise ConfigError(
                f"{scene} and {owner[output]} would both write {output}; "
                "use a --template with {parent} or {name}"
            )
        owner[output] = scene
        size, mtime_ns = input_fingerprint(scene)
        record = manifest.get(scene)
        extra = scene_outputs(outputs, scene, out_dir) if outputs is not None else None
        extra_files = [str(path) for path in extra.files()] if extra is not None else []
        action, reason = _decide(record, output, extra_files, size, mtime_ns, model_sha256, config_hash, force)
        planned.append(PlannedScene(scene, output, size, mtime_ns, action, reason, extra))
    return planned


def _decide(
    record: SceneRecord | None,
    output: str,
    extra_files: Sequence[str],
    size: int | None,
    mtime_ns: int | None,
    model_sha256: str,
    config_hash: str,
    force: bool,
) -> tuple[Literal["run", "skip", "refuse"], str]:
    if force:
        return "run", "forced"
    for path in (output, *extra_files):
        if os.path.lexists(path) and not _written_by_batch(record, output, path):
            return (
                "refuse",
                f"{path}: exists but this out dir's manifest did not write it; move it or use --force",
            )
    if record is None:
        return "run", "new"
    if record.status not in COMPLETE:
        return "run", "interrupted" if record.status in ("queued", "running") else f"{record.status} before"
    if (record.input_size, record.input_mtime_ns) != (size, mtime_ns):
        return "run", "input changed"
    if record.model_sha256 != model_sha256:
        return "run", "model changed"
    if record.config_hash != config_hash:
        return "run", "settings changed"
    if record.output != output:
        return "run", "output name changed"
    if not os.path.isfile(output) or os.path.getsize(output) != record.output_size:
        return "run", "output missing or changed"
    recorded = record.extra_output_sizes()
    if recorded is not None:  # None: a manifest from before extra outputs were recorded
        if set(recorded) != set(extra_files):
            return "run", "output name changed"
        for path, recorded_size in recorded.items():
            if not os.path.exists(path) or (recorded_size is not None and os.path.getsize(path) != recorded_size):
                return "run", "output missing or changed"
    return "skip", "done before"


def attempts_file(output: str) -> Path:
    """The file beside ``output`` that counts the starts of its scene in this run (one line each)."""
    target = Path(output)
    return target.with_name(f".{target.name}{ATTEMPTS_MARKER}")


def died_message(attempts: int) -> str:
    """The error of a scene whose workers died."""
    return f"worker died during prediction {attempts} times (killed or out of memory)"


def _written_by_batch(record: SceneRecord | None, output: str, path: str) -> bool:
    """Whether a file at ``path``, the class raster ``output`` or an extra output of its scene, can be
    this batch's: recorded, or written by a run that was cut short."""
    if record is None or record.output != output:
        return False
    extra = record.extra_output_sizes()
    if path != output and extra is not None and path not in extra:
        return False  # NOTE: older manifests did not list the extra outputs: trusted as before
    return record.output_sha256 is not None or record.attempts > 0 or record.status in ("queued", "running")


def remove_stale_temporaries(output: str, extra_files: Sequence[str] = ()) -> list[Path]:
    """Delete the temporary files a killed prediction of ``output`` (and of its extra outputs) left
    beside them, and its attempts file.

    Only safe while holding the out-dir lock and with no task of this batch running.
    """
    import shutil

    from .io import TMP_MARKER

    stale: list[Path] = []
    for name in (output, *extra_files):
        target = Path(name)
        folder = glob.escape(str(target.parent))
        patterns = [  # as io.temporary_path names them, and vectorize (which keeps the suffix last)
            f"{folder}/{glob.escape(f'.{target.name}{TMP_MARKER}')}*",
            f"{folder}/{glob.escape(f'.{target.stem}{TMP_MARKER}')}*{glob.escape(target.suffix)}",
        ]
        stale += sorted({Path(p) for pattern in patterns for p in glob.glob(pattern)})
    stale.append(attempts_file(output))
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # a report folder
        else:
            path.unlink(missing_ok=True)
    return stale


class OutDirLock:
    """An exclusive ``flock`` on ``OUT_DIR/.geoseg-batch.lock``, holding the owner's pid and host.

    The operating system releases it when the holder dies, however it dies, so a crashed batch
    never blocks the next one.
    """

    def __init__(self, out_dir: str | os.PathLike[str]):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse at once.

        Raises:
            OutputError: Another process holds it (the message names it).
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{self.path.parent}: another geoseg batch is running on this out dir ({holder}); "
                "wait for it to finish or use another --out-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class BatchSummary:
    """Counts and throughput of one run."""

    out_dir: Path
    manifest: Path
    done: int = 0
    skipped: int = 0
    failed: int = 0
    not_run: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0
    workers: int = 0
    dashboard: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Scenes in the batch."""
        return self.done + self.skipped + self.failed + self.not_run

    @property
    def ok(self) -> bool:
        """Every scene is done (now or before)."""
        return self.failed == 0 and self.not_run == 0

    @property
    def megapixels_per_second(self) -> float:
        """Megapixels predicted in this run over its wall-clock time."""
        return self.megapixels / max(self.seconds, 1e-9)

    @property
    def scenes_per_hour(self) -> float:
        """Scenes predicted in this run per hour of wall-clock time."""
        return self.done * 3600 / max(self.seconds, 1e-9)

    def format_table(self) -> str:
        """The end-of-run summary, as printed by ``geoseg batch``."""
        lines = [
            f"{'scenes':>8} {'done':>6} {'skipped':>8} {'failed':>7} {'not run':>8} {'MP done':>9} "
            f"{'seconds':>9} {'MP/s':>7} {'scenes/h':>9}",
            f"{self.total:>8} {self.done:>6} {self.skipped:>8} {self.failed:>7} {self.not_run:>8} "
            f"{self.megapixels:>9.1f} {self.seconds:>9.1f} {self.megapixels_per_second:>7.2f} "
            f"{self.scenes_per_hour:>9.0f}",
        ]
        lines += [f"failed: {_failure_line(scene, error)}" for scene, error in self.failures]
        lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


def _failure_line(scene: str, error: str) -> str:
    """A failed scene and its error, without credentials (a URL's query string or user info)."""
    name, error = display_name(scene), redact(error)
    return error if name in error else f"{name}: {error}"  # most errors name their file already


def local_cluster_size(
    scenes: int, workers: int | None = None, *, cores: int | None = None, memory_bytes: int | None = None
) -> tuple[int, int]:
    """Workers and torch threads per worker for a local cluster on this machine.

    One worker per GPU when there are GPUs. Otherwise one single-threaded worker per core: on a
    quiet 2-core machine 2 workers of 1 thread did 1182-1235 scenes/h against 881-962 for one
    worker of 2 threads (README, Batch processing), as a scene's reading, blending and writing
    fill the gaps of another's network. At most one worker per :data:`WORKER_MEMORY_BYTES` of
    memory, at least one, never more than the scenes; cores are shared out between the workers
    so they do not oversubscribe the CPU.
    """
    import torch

    cores = cores or usable_cores()
    memory_bytes = memory_bytes or physical_memory_bytes()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if workers is None:
        workers = gpus or max(1, min(cores, memory_bytes // WORKER_MEMORY_BYTES))
    workers = max(1, min(workers, scenes))
    return workers, max(1, cores // workers)


@contextmanager
def local_client(workers: int) -> Iterator[Client]:
    """A ``distributed.LocalCluster`` of ``workers`` single-task worker processes on loopback, and its client.

    Each worker is given one scene at a time where dask queues tasks (``worker-saturation`` 1), so
    a dying worker takes down only the scene it was running. (How often a scene is retried after
    its worker died is counted by geoseg itself, see :func:`attempts_file`: dask also counts the
    deaths of workers a scene was merely queued on.)
    """
    dask = _import_dask()
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
            preload=["geoseg._worker_setup"],  # workers leave Ctrl-C to this process
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        # After an interrupt the nannies kill workers still busy with a scene: expected, not news.
        logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
        cluster.close()


#: Seconds a dask scheduler may take to answer once connected; a real one answers in milliseconds.
HANDSHAKE_TIMEOUT_S = 15


def connect(address: str, timeout: float = 60) -> Client:
    """A client of the existing dask scheduler at ``address`` (``tcp://host:port`` or a scheduler file).

    The address is checked first, each mistake with its own one-line error: a scheduler file
    that is missing or not one, a dashboard (``http://``) address, an unknown host, a refused
    connection, and a port where something other than a dask scheduler answers (a web server,
    the dashboard). distributed's ``Client(timeout=...)`` bounds only the TCP connect: against a
    server that accepts the connection but never answers dask's handshake it waits forever.

    Raises:
        ConfigError: The message says which of these it is.
    """
    _import_dask()
    from distributed import Client

    target = _scheduler_target(address)
    _check_reachable(address, target, timeout)
    _check_is_scheduler(address, target, min(timeout, HANDSHAKE_TIMEOUT_S))
    try:
        return Client(target, timeout=timeout)
    except (OSError, TimeoutError) as err:
        raise ConfigError(
            f"--scheduler {address}: cannot reach a dask scheduler ({' '.join(str(err).split())})"
        ) from None


def _scheduler_target(address: str) -> str:
    """The scheduler's ``scheme://host:port`` from ``address``, an address or a scheduler file.

    Raises:
        ConfigError: A missing or invalid scheduler file, a dashboard address, an unknown scheme.
    """
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    if os.path.isfile(address):
        try:
            info = json.loads(Path(address).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not JSON"
            raise ConfigError(f"--scheduler {address}: not a dask scheduler file ({reason})") from None
        if not isinstance(info, dict) or not isinstance(info.get("address"), str):
            raise ConfigError(f"--scheduler {address}: not a dask scheduler file (no \"address\" in it)")
        return info["address"]
    given_scheme = address.split("://", 1)[0].lower() if "://" in address else None
    if given_scheme in ("http", "https"):
        raise ConfigError(
            f"--scheduler {address}: a web address (the dashboard?); give the scheduler's "
            "tcp://host:port (8786 by default) or its scheduler file"
        )
    try:
        scheme, location = parse_address(address)
        get_backend(scheme)
        if scheme in ("tcp", "tls"):
            parse_host_port(location)
    except ValueError as err:
        if given_scheme is None:
            raise ConfigError(
                f"--scheduler {address}: no such scheduler file, nor a tcp://host:port address"
            ) from None
        raise ConfigError(f"--scheduler {address}: not a dask scheduler address ({err})") from None
    return address if "://" in address else f"{scheme}://{location}"


def _check_reachable(address: str, target: str, timeout: float) -> None:
    """Fail at once, saying why, when the host is unknown or nothing listens on the port (TCP, TLS).

    distributed retries both until its connect timeout, then reports a time-out.
    """
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(target)
    if scheme not in ("tcp", "tls"):
        return
    host, port = parse_host_port(location)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--scheduler {address}: unknown host {host} ({err.strerror})") from None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        raise ConfigError(
            f"--scheduler {address}: connection refused: nothing listens on {host}:{port} "
            "(is the scheduler running?)"
        ) from None
    except TimeoutError:
        raise ConfigError(
            f"--scheduler {address}: no answer from {host}:{port} after {timeout:g} s"
        ) from None
    except OSError as err:
        raise ConfigError(f"--scheduler {address}: cannot connect to {host}:{port} ({err.strerror or err})") from None


def _check_is_scheduler(address: str, target: str, timeout: float) -> None:
    """Ask ``target`` who it is, within ``timeout`` seconds in all; refuse anything but a scheduler."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect as comm_connect
    from distributed.comm.addressing import parse_address
    from distributed.security import Security

    if parse_address(target)[0] not in ("tcp", "tls", "ws", "wss"):
        return  # inproc, ucx: nothing else can answer there

    async def identity() -> Any:
        comm = await comm_connect(target, timeout=timeout, **Security().get_connection_args("client"))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded() -> Any:
        return await asyncio.wait_for(identity(), timeout)

    # NOTE: in a thread of its own, so that a caller with a running event loop (Jupyter) can call this.
    with ThreadPoolExecutor(1) as pool:
        try:
            reply = pool.submit(asyncio.run, bounded()).result()
        except TimeoutError:
            raise ConfigError(
                f"--scheduler {address}: not a dask scheduler (no answer to dask's handshake after "
                f"{timeout:g} s; the dashboard's port?)"
            ) from None
        except MemoryError:  # dask read a frame length out of a foreign answer (an HTTP reply)
            raise ConfigError(
                f"--scheduler {address}: not a dask scheduler (its answer is not dask's protocol)"
            ) from None
        except Exception as err:  # noqa: BLE001 - whatever a foreign server's answer makes dask raise
            from ._batch_worker import one_line

            raise ConfigError(f"--scheduler {address}: not a dask scheduler ({one_line(err)})") from None
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        kind = reply.get("type") if isinstance(reply, dict) else type(reply).__name__
        raise ConfigError(f"--scheduler {address}: not a dask scheduler (it answers as {kind})")


def _import_dask() -> Any:
    from ._lazy import lazy_import

    lazy_import("distributed", extra="dask")
    return lazy_import("dask", extra="dask")


def run_batch(
    inputs: Sequence[str],
    out_dir: str | os.PathLike[str],
    config: PredictConfig | None = None,
    *,
    client: Client | None = None,
    workers: int | None = None,
    template: str = DEFAULT_TEMPLATE,
    force: bool = False,
    on_error: OnError = "continue",
    resample: str | None = None,
    assets: Mapping[str, str] | Sequence[str] | None = None,
    outputs: OutputOptions | None = None,
) -> BatchSummary:
    """Predict many scenes on a dask cluster into ``out_dir``, skipping those done before.

    Writes one class raster per scene (named by ``template``) and the manifest
    ``OUT_DIR/geoseg-manifest.sqlite``; holds ``OUT_DIR/.geoseg-batch.lock`` while it runs.

    Args:
        inputs: Files, globs and ``@list.txt`` files (see :func:`expand_inputs`).
        out_dir: Folder for the outputs and the manifest; created if missing.
        config: Settings for every scene (``None``: the defaults and the bundled model).
        client: A client of an existing cluster; ``None`` starts a local cluster for this run.
        workers: Worker processes of the local cluster (see :func:`local_cluster_size`).
        template: Output file name per scene, with ``{stem}``, ``{name}`` and ``{parent}``.
        force: Redo every scene, even those done before with the same input, model and settings.
        on_error: ``continue`` with the other scenes after a failure, or ``stop`` (the scenes
            not started then are left as they were).
        resample: Resampling for band stacks of different resolutions (as predict).
        assets: STAC asset keys (as predict).
        outputs: Extra outputs for every scene (as predict); their file names are templates
            like ``template`` (e.g. ``{stem}_stats.json``), inside ``out_dir``.

    Returns:
        Counts and throughput; ``ok`` is true when every scene is done.

    Raises:
        OutputError: The out dir cannot be used, or another batch holds its lock.
        InputError: An input list or pattern is unusable (a bad scene only fails that scene).
        ConfigError: Settings, template or scheduler are invalid.
        CheckpointError: The model file is missing or invalid.
    """
    from .modelfile import file_sha256, read_metadata
    from .pipeline import default_model_path

    _import_dask()
    from ._batch_worker import SceneJob

    started = time.perf_counter()
    config = config or PredictConfig()
    if on_error not in ("continue", "stop"):
        raise ConfigError(f"on_error must be continue or stop, got {on_error!r}")
    scenes = expand_inputs(inputs)
    if not scenes:
        raise InputError("no input scenes given")
    model_path = str(Path(config.model or default_model_path()).resolve())
    read_metadata(model_path)  # fail now, in one line, rather than once per scene
    model_sha256 = file_sha256(model_path)
    if outputs is not None and outputs.aoi is not None and Path(outputs.aoi).exists():
        outputs = dataclasses.replace(outputs, aoi=str(Path(outputs.aoi).resolve()))  # workers may run elsewhere
    config_hash = settings_hash(config, resample, assets, outputs)

    out = Path(out_dir).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot create the out dir ({err.strerror or err})") from err
    with OutDirLock(out), Manifest(out / MANIFEST_NAME) as manifest:
        planned = plan_scenes(
            scenes, out, manifest, model_sha256, config_hash, template=template, force=force, outputs=outputs
        )
        _check_unique_outputs(planned)
        summary = BatchSummary(out_dir=out, manifest=manifest.path)
        to_run = [p for p in planned if p.action == "run"]
        if on_error == "stop" and any(p.action == "refuse" for p in planned):
            summary.not_run, to_run = len(to_run), []  # a failure already: run nothing (rows stay queued)
        for scene in to_run:
            Path(scene.output).parent.mkdir(parents=True, exist_ok=True)  # a template may name subfolders
        ours = [p for p in planned if p.action != "refuse"]
        for scene in ours:
            remove_stale_temporaries(scene.output, scene.extra_files)
        try:
            with _client_for(client, workers, len(to_run), config) as (active, run_config):
                run_id = uuid.uuid4().hex[:12]
                manifest.start_run(run_id, _scheduler_address(active))
                with manifest.transaction():
                    for scene in planned:
                        _record_planned(manifest, scene, run_id, model_sha256, config_hash, summary)
                if to_run and active is not None:
                    summary.dashboard = active.dashboard_link if _has_dashboard(active) else None
                    summary.workers = len(active.scheduler_info().get("workers", {}))
                    log.info(
                        "%d scenes to predict (%d done before) on %d dask workers at %s; dashboard: %s",
                        len(to_run),
                        summary.skipped,
                        summary.workers,
                        active.scheduler.address,
                        summary.dashboard or "none (pip install bokeh)",
                    )
                    if summary.workers == 0:
                        log.warning(
                            "the scheduler at %s has no workers: the scenes wait until workers join",
                            active.scheduler.address,
                        )
                    jobs = [
                        SceneJob(
                            input=p.input,
                            output=p.output,
                            config=run_config,
                            model_path=model_path,
                            model_sha256=model_sha256,
                            key=f"geoseg-scene-{run_id}-{i}",
                            topic=f"geoseg-batch-{run_id}",
                            plugin=f"geoseg-models-{run_id}",
                            resample=resample,
                            assets=assets,
                            outputs=p.outputs,
                            stop_event=f"geoseg-stop-{run_id}" if on_error == "stop" else None,
                        )
                        for i, p in enumerate(to_run)
                    ]
                    _Driver(active, manifest, run_id, on_error, summary, local=client is None).run(jobs, to_run)
                # Every task of this run has ended (the driver waited for each one): safe to clean up
                # what attempts whose worker was killed left, and the attempts files, of skipped scenes too.
                for scene in ours:
                    remove_stale_temporaries(scene.output, scene.extra_files)
                summary.seconds = time.perf_counter() - started
                manifest.finish_run(run_id, summary.done, summary.skipped, summary.failed)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (the CLI makes it SystemExit)
            _report_interrupted(summary, to_run, local=client is None)
            raise
    return summary


def _report_interrupted(summary: BatchSummary, to_run: Sequence[PlannedScene], *, local: bool) -> None:
    """Say what an interrupted run did and left; on a local cluster (its workers are gone now)
    remove the temporary files of the scenes that were running."""
    if local:
        for scene in to_run:
            remove_stale_temporaries(scene.output, scene.extra_files)
    left = len(to_run) - summary.done - summary.failed
    log.warning(
        "interrupted: %d of %d scenes done in this run (%d done before), %d failed, %d left for the "
        "next run, which resumes%s (manifest: %s)",
        summary.done, len(to_run), summary.skipped, summary.failed, left,
        "" if local else "; scenes already running on the cluster may still finish",
        summary.manifest,
    )


def _check_unique_outputs(planned: Sequence[PlannedScene]) -> None:
    """Refuse a batch in which two scenes, or two outputs, would write the same file.

    Raises:
        ConfigError: The message names the file and what would write it twice.
    """
    owner = {p.output: (p.input, "the class raster") for p in planned}
    for scene in planned:
        for name in scene.extra_files:
            if name in owner:
                other, what = owner[name]
                hint = (
                    "two output templates give the same name; make them differ"
                    if other == scene.input
                    else "put {stem} in the output templates"
                )
                raise ConfigError(f"{name}: written for {scene.input} and as {what} of {other}; {hint}")
            owner[name] = (scene.input, "an output")


@contextmanager
def _client_for(
    client: Client | None, workers: int | None, scenes: int, config: PredictConfig
) -> Iterator[tuple[Client | None, PredictConfig]]:
    """The given client, a new local cluster's, or none when there is nothing to run."""
    if client is not None or scenes == 0:
        yield client, config
        return
    count, threads = local_cluster_size(scenes, workers)
    with local_client(count) as local:
        if not config.threads:
            config = config.replace(threads=threads)
        if config.crf is not None and config.crf.workers is None:
            # The CRF's default (every core) in every worker would oversubscribe the machine.
            config = config.replace(crf=dataclasses.replace(config.crf, workers=config.threads))
        yield local, config


def _scheduler_address(client: Client | None) -> str:
    return client.scheduler.address if client is not None else ""


def _has_dashboard(client: Client) -> bool:
    return "dashboard" in client.scheduler_info().get("services", {})


def _record_planned(
    manifest: Manifest,
    scene: PlannedScene,
    run_id: str,
    model_sha256: str,
    config_hash: str,
    summary: BatchSummary,
) -> None:
    """Write what the plan decided: skipped, refused (failed before reaching a worker), or queued."""
    if scene.action == "skip":
        manifest.upsert(scene.input, status="skipped", run_id=run_id)
        summary.skipped += 1
        return
    # NOTE: a queued row carries this run's fingerprints from the start, so a driver that
    # crashes from here on leaves rows that the next run redoes.
    status, error = ("failed", scene.reason) if scene.action == "refuse" else ("queued", None)
    manifest.upsert(
        scene.input,
        status=status,
        error=error,
        run_id=run_id,
        input_size=scene.input_size,
        input_mtime_ns=scene.input_mtime_ns,
        model_sha256=model_sha256,
        config_hash=config_hash,
        output=scene.output,
        extra_outputs=json.dumps(dict.fromkeys(scene.extra_files)) if scene.outputs is not None else None,
        attempts=0,
        worker=None,
        worker_pid=None,
        geoseg_version=__version__,
    )
    if scene.action == "refuse":
        summary.failed += 1
        summary.failures.append((scene.input, scene.reason))


class _Driver:
    """Submits the scenes, follows their starts and results, and writes them to the manifest.

    Each task's future is released as soon as its result is recorded: a future kept alive pins the
    result on its worker, and when that worker dies dask runs the finished scene again to rebuild
    it, rewriting an output the manifest has recorded. The driver returns only when every task has
    ended, so no task of the run writes into the out dir after it (the end-of-run cleanup relies
    on it). ``--on-error stop`` therefore cancels nothing: it sets a dask event that makes the
    scenes not yet started return at once without writing, and waits for the running ones.
    """

    def __init__(
        self,
        client: Client,
        manifest: Manifest,
        run_id: str,
        on_error: OnError,
        summary: BatchSummary,
        *,
        local: bool = False,
    ):
        self.client = client
        self.local = local  # the cluster is this run's own, closed with it
        self.manifest = manifest
        self.run_id = run_id
        self.on_error = on_error
        self.summary = summary
        self.events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.attempts: dict[str, int] = {}
        self.finished: set[str] = set()
        self.stopped_by: str | None = None

    def run(self, jobs: list[SceneJob], planned: list[PlannedScene]) -> None:
        from distributed import Event, wait

        from ._batch_worker import ModelCache, geoseg_version, one_line, predict_task

        try:
            self.client.run(geoseg_version)
        except Exception as err:  # noqa: BLE001 - whatever unpickling on the worker raised
            raise DependencyNotFoundError(
                f"dask workers at {self.client.scheduler.address} cannot import geoseg ({one_line(err)}); "
                "install geoseg on the workers (pip install 'geoseg[dask]')"
            ) from None
        topic, plugin, stop_name = jobs[0].topic, jobs[0].plugin, jobs[0].stop_event
        self.client.register_plugin(ModelCache(), name=plugin)
        self.client.subscribe_topic(topic, self.events.put)
        self.scenes = {job.key: scene for job, scene in zip(jobs, planned, strict=True)}
        stop = Event(stop_name, client=self.client) if stop_name else None
        # NOTE: no other reference to the futures than this set, so that each is freed once handled.
        pending = {self.client.submit(predict_task, job, key=job.key, pure=False) for job in jobs}
        try:
            while pending:
                self._handle_events()
                try:
                    done, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    continue
                for future in done:
                    result = self._handle_result(future)
                    future.release()
                    if result == "failed" and stop is not None and self.stopped_by is None:
                        self.stopped_by = self.scenes[future.key].input
                        stop.set()
                        log.warning(
                            "stopping after %s failed (--on-error stop): no new scene starts; "
                            "waiting for those running", self.stopped_by,
                        )
                done = set()
        except BaseException:
            self._handle_events()
            if self.local:
                raise  # the cluster closes with the run; tearing down more only adds dask's errors
            # On an existing cluster queued scenes must not start after the driver is gone.
            try:
                self.client.cancel(list(pending))
            except Exception:  # noqa: BLE001 - best effort, on the way out
                log.debug("could not cancel the scenes not run", exc_info=True)
            self._release(topic, plugin, stop)
            raise
        self._handle_events()
        self._release(topic, plugin, stop)

    def _release(self, topic: str, plugin: str, stop: Any) -> None:
        """Stop following the run's events; free the models the workers loaded for it."""
        try:
            self.client.unsubscribe_topic(topic)
            if stop is not None:
                stop.clear()
            self.client.unregister_worker_plugin(plugin)
        except Exception:  # noqa: BLE001 - freeing the models is best effort
            log.debug("could not unregister %s", plugin, exc_info=True)

    def _handle_events(self) -> None:
        """Mark scenes running as their starts arrive; a third start means two dead workers: fail it."""
        while True:
            try:
                _, msg = self.events.get_nowait()
            except queue.Empty:
                return
            key = msg.get("key")
            if key not in self.scenes or key in self.finished:
                continue  # a late start event of a scene already recorded
            self.attempts[key] = msg.get("attempt", self.attempts.get(key, 0) + 1)
            scene = self.scenes[key]
            if self.attempts[key] > 1:
                log.warning("%s: its worker died; trying again on %s", display_name(scene.input), msg.get("worker"))
            self.manifest.upsert(
                scene.input,
                status="running",
                attempts=self.attempts[key],
                worker=msg.get("worker"),
                worker_pid=msg.get("pid"),
                started_at=msg.get("at"),
                run_id=self.run_id,
            )

    def _handle_result(self, future: Future) -> str:
        from distributed import KilledWorker

        from ._batch_worker import SceneOutcome, one_line

        key = future.key
        if key in self.finished:
            return "cancelled"
        scene = self.scenes[key]
        if future.status == "finished":
            outcome: SceneOutcome = future.result()
            self.finished.add(key)
            if outcome.status == "stopped":  # not started: left for the next run
                if self.attempts.get(key):  # a retry after its worker died
                    self.manifest.upsert(scene.input, status="queued")
                self.summary.not_run += 1
                return "stopped"
            self._handle_events()  # its start event, if it came late, before the final row
            written = {} if outcome.extra_outputs is None else {"extra_outputs": json.dumps(outcome.extra_outputs)}
            self.manifest.upsert(
                scene.input,
                status=outcome.status,
                attempts=max(self.attempts.get(key, 1), 1),
                worker=outcome.worker,
                worker_pid=outcome.worker_pid,
                started_at=outcome.started_at,
                finished_at=outcome.finished_at,
                model_loaded=outcome.model_loaded,
                model_load_seconds=outcome.model_load_seconds,
                predict_seconds=outcome.predict_seconds,
                width=outcome.width,
                height=outcome.height,
                output_sha256=outcome.output_sha256,
                output_size=outcome.output_size,
                error=outcome.error,
                **written,
            )
            if outcome.status == "done":
                self.summary.done += 1
                self.summary.megapixels += (outcome.width or 0) * (outcome.height or 0) / 1e6
                log.info("%s: done (%.1f s)", scene.output, outcome.predict_seconds or 0.0)
                return "done"
            self._count_failure(scene.input, outcome.error or "failed")
            return "failed"
        if future.status == "cancelled":
            self._record_failure(
                key, "cancelled by the scheduler (lost the connection, or the cluster closed)"
            )
            return "failed"
        error = future.exception()
        if isinstance(error, KilledWorker):  # dask gave up first (its allowed-failures)
            message = died_message(error.allowed_failures + 1)
        else:
            message = one_line(error)
        self._record_failure(key, message)
        return "failed"

    def _record_failure(self, key: str, message: str) -> None:
        scene = self.scenes[key]
        self.finished.add(key)
        self.manifest.upsert(
            scene.input,
            status="failed",
            error=message,
            finished_at=time.time(),
            attempts=self.attempts.get(key, 0),
        )
        self._count_failure(scene.input, message)

    def _count_failure(self, scene: str, message: str) -> None:
        log.warning("failed: %s", _failure_line(scene, message))
        self.summary.failed += 1
        self.summary.failures.append((scene, message))
