"""Where ``predict_scene``'s time goes, thread by thread: CPU per role and the calling thread's waits.

Prints figures; asserts nothing. Runs ``predict_scene`` in this process (after one uncounted call
on a small scene) once per setting, and meanwhile samples every thread's CPU time from
/proc/self/task (Linux only) and the whole machine's from /proc/stat. Run from the repository root:

    python bench/bench_threads.py                     # 4096 px mosaic, the defaults
    python bench/bench_threads.py --scene-px 8192 --settings 4x4,4x4r2,4x3,2x8
    python bench/bench_threads.py --model-only 5      # and the network alone at each setting
    python bench/bench_threads.py --tiny              # a nearly free network: the engine's own cost
    python bench/bench_threads.py --device cuda --precision bf16 --settings r8b32,r1b32   # on a GPU

A setting is ``PxT`` (P batches at once, T torch threads each), optionally ``rR`` (R reader
threads), ``bB`` (batch size B), ``qQ`` (Q batches read ahead) and ``t`` or ``e`` (the network
traced or eager; else as ``predict_scene`` decides); ``default`` is what ``geoseg predict`` picks
on this machine. The network alone (``--model-only``) runs traced where ``predict_scene`` did.
On a GPU (``--device cuda``) batches run one at a time, so a setting there is ``rR``, ``bB`` and
``qQ`` alone (``r8b32``), and "waiting for the network" is the calling thread's time in launching
batches and waiting for their results.

Roles: the calling thread (hands batches to the network, blends, takes the argmax); readers;
the writer; the network pool's threads (each runs one batch at a time, and is also the master of
its own OpenMP team); other threads (torch's OpenMP workers, GDAL's). The calling thread's wall
time splits into waiting for a batch from the readers, waiting for the network, blending, and
waiting for room in the writer's queue; a pipeline held back by one part shows it there (readers
or writer: the calling thread waits on them; the network: it waits on the pool; the blender:
it is busy while the pool's threads wait for work). With one batch at a time (``1xT``) the calling
thread runs the network itself: its "waiting for the network" is then the forward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import model_only_tiles_per_s  # noqa: E402
from scenes import OUT, build_mosaic  # noqa: E402

import geoseg.io  # noqa: E402
from geoseg import pipeline  # noqa: E402
from geoseg._malloc import loaded_allocator, reuse_freed_memory  # noqa: E402
from geoseg.config import PredictConfig  # noqa: E402
from geoseg.inference import TilePredictor, TracedNetwork, default_parallel_batches  # noqa: E402
from geoseg.modelfile import LoadedModel, build_network, load_model  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


class ThreadClock:
    """Samples every thread's CPU seconds (utime + stime) and remembers each one's last value.

    Threads that end between samples lose at most one interval of CPU; the Python threads' names
    are taken from :mod:`threading` at each sample, so pool threads are named while they live.
    """

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def __enter__(self) -> ThreadClock:
        self.machine_start = _machine_ticks()
        self.start = time.perf_counter()
        self._sample()
        self.baseline = dict(self.cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.start
        busy, total = (end - start for start, end in zip(self.machine_start, _machine_ticks(), strict=True))
        self.machine_busy_cores = busy / TICKS / self.wall
        self.machine_idle_share = 1 - busy / total if total else 0.0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for thread in threading.enumerate():
            if thread.native_id is not None:
                self.names[thread.native_id] = thread.name
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended since the listing
            self.cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS

    def by_role(self) -> dict[str, tuple[float, int]]:
        """CPU seconds spent during the run and thread count, per role."""
        roles: dict[str, list[float]] = defaultdict(list)
        for tid, seconds in self.cpu.items():
            name = self.names.get(tid, "")
            if name == "bench-sampler":
                continue
            roles[_role(name)].append(seconds - self.baseline.get(tid, 0.0))
        return {role: (sum(values), sum(v > 0.01 for v in values)) for role, values in roles.items()}


def _role(name: str) -> str:
    if name == "MainThread":
        return "calling thread"
    if "(_read_batches)" in name:
        return "readers"
    if "(_write_rows)" in name:
        return "writer"
    if name.startswith("geoseg-network"):
        return "network pool"
    return "other Python" if name else "OpenMP workers, GDAL"


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (steal counts as busy: not ours to use)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class Waits:
    """Wall seconds the calling thread spends in each part of ``pipeline._run``'s loop."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.put_by_thread: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Wrap the readers' queue, the network's stream, the blender and ``_put`` while inside."""
        originals = (pipeline._drain, TilePredictor.stream, pipeline._Blending.add, pipeline._Blending.finish,
                     pipeline._put)
        drain, stream, add, finish, put = originals
        pipeline._drain = lambda *a, **k: self._timed(drain(*a, **k), "waiting for readers")
        TilePredictor.stream = lambda predictor, batches: self._timed(stream(predictor, batches), "in stream")
        pipeline._Blending.add = lambda *a, **k: self._timed(add(*a, **k), "blending")
        pipeline._Blending.finish = lambda *a, **k: self._timed(finish(*a, **k), "blending")

        def timed_put(*args, **kwargs):
            start = time.perf_counter()
            try:
                return put(*args, **kwargs)
            finally:
                self.put_by_thread[_role(threading.current_thread().name)] += time.perf_counter() - start

        pipeline._put = timed_put
        try:
            yield
        finally:
            (pipeline._drain, TilePredictor.stream, pipeline._Blending.add, pipeline._Blending.finish,
             pipeline._put) = originals

    def _timed(self, items: Iterator, part: str) -> Iterator:
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                self.seconds[part] += time.perf_counter() - start
                return
            self.seconds[part] += time.perf_counter() - start
            yield item


def parse_setting(text: str, threads: int) -> dict[str, Any]:
    """``4x4r2b4q2t`` -> parallel batches, torch threads in all, readers, batch, prefetch, trace."""
    if text == "default":
        return {"parallel_batches": default_parallel_batches(), "threads": threads}
    match = re.fullmatch(r"(?:(\d+)x(\d+))?(?:r(\d+))?(?:b(\d+))?(?:q(\d+))?([te]?)", text)
    if not match or not text:
        raise SystemExit(f"setting {text!r}: expected [PxT][rR][bB][qQ][t|e], e.g. 4x4, 4x4r2b8t or r8b32")
    parallel, each, readers, batch, prefetch, trace = match.groups()
    setting: dict[str, Any] = {"threads": threads}
    if parallel:
        setting |= {"parallel_batches": int(parallel), "threads": int(parallel) * int(each)}
    if trace:
        setting["trace"] = trace == "t"
    if readers:
        setting["reader_threads"] = int(readers)
    if batch:
        setting["batch_size"] = int(batch)
    if prefetch:
        setting["prefetch_batches"] = int(prefetch)
    return setting


def tiny_model(model: LoadedModel) -> LoadedModel:
    """The model with a nearly free network, to see the engine's own cost.

    Untrained; widths 8-8-16-16, one block a stage, first stride 4: about 165 tiles of 224 px a
    second on 2 cores, against 19 for the bundled network.
    """
    arch = dict(model.metadata.arch_config)
    arch.update(hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], strides=[4, 2, 2, 2],
                decoder_hidden_size=16, num_attention_heads=[1, 1, 1, 1])
    meta = dataclasses.replace(model.metadata, arch_config=arch)
    return LoadedModel(build_network(meta).eval(), meta, "tiny", model.path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model file [bundled default]")
    parser.add_argument("--tiny", action="store_true", help="replace the network by a nearly free one")
    parser.add_argument("--scene-px", type=int, default=4096, help="edge of the square mosaic")
    parser.add_argument("--settings", default="default", help="comma-separated PxT[rR][bB][qQ] or 'default'")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting")
    parser.add_argument("--switch-ms", type=float, help="sys.setswitchinterval, in ms [Python's 5]")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] [cpu]")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 [fp32]")
    parser.add_argument("--creation-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a GDAL creation option for the outputs, e.g. ZLEVEL=1: what the writer costs")
    parser.add_argument("--model-only", type=float, default=0.0, metavar="SECONDS",
                        help="also time the network alone at each setting for this long (0: no)")
    args = parser.parse_args()

    reuse_freed_memory(children=False)  # as the CLI does on glibc's malloc
    if args.creation_option:  # every writer's profile comes from io.scene_profile
        extra = dict(option.split("=", 1) for option in args.creation_option)
        profile = geoseg.io.scene_profile
        geoseg.io.scene_profile = lambda scene: profile(scene) | extra
        print(f"creation options added: {extra}")
    if args.switch_ms:
        sys.setswitchinterval(args.switch_ms / 1000)
    model = load_model(args.model or pipeline.default_model_path())
    if args.tiny:
        model = tiny_model(model)
    scene = build_mosaic(args.scene_px)
    warmup = build_mosaic(512)
    out = OUT / f"{scene.stem}_threads.tif"
    all_threads = torch.get_num_threads()
    print(f"{os.cpu_count()} cores, torch {torch.__version__} ({all_threads} threads), "
          f"malloc {loaded_allocator()}; model {model.metadata.name}"
          f"{' (tiny network)' if args.tiny else ''}; scene {scene.name}")
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, {args.precision}")
    warm_config = PredictConfig(device=args.device, precision=args.precision)
    pipeline.predict_scene(warmup, out, warm_config, overwrite=True, model=model)
    for text in args.settings.split(","):
        setting = parse_setting(text, all_threads)
        config = PredictConfig(device=args.device, precision=args.precision, **setting)
        for _ in range(args.repeat):
            waits = Waits()
            with waits.installed(), ThreadClock() as clock:
                result = pipeline.predict_scene(scene, out, config, overwrite=True, model=model)
            report(text, setting, result, clock, waits)
        if args.model_only:
            network = model
            if result.traced:  # the network alone traced too, as predict_scene ran it
                network = dataclasses.replace(model, module=TracedNetwork(model.module))
            # The network alone at the same setting, on random tiles in memory (bench_predict's (a)).
            torch.set_num_threads(setting["threads"])
            tiles_per_s = model_only_tiles_per_s(
                network, result.tile_px, config.batch_size, device, args.precision, args.model_only,
                setting.get("parallel_batches", 1) if device.type == "cpu" else 1,
            )
            torch.set_num_threads(all_threads)
            model_mps = tiles_per_s * result.width * result.height / result.tiles_total / 1e6
            print(f"  network alone: {model_mps:.2f} unique MP/s; predict_scene / network alone = "
                  f"{result.megapixels_per_second / model_mps:.2f}")
    out.unlink(missing_ok=True)
    Path(f"{out}.aux.xml").unlink(missing_ok=True)


def report(text: str, setting: dict[str, Any], result: pipeline.PredictResult, clock: ThreadClock,
           waits: Waits) -> None:
    wall = clock.wall
    described = ", ".join([*(f"{k} {v}" for k, v in setting.items()), "traced" if result.traced else "eager"])
    print(f"\n{text} ({described}): {result.megapixels_per_second:.2f} MP/s, {wall:.1f} s; "
          f"machine {clock.machine_busy_cores:.1f} cores busy, {100 * clock.machine_idle_share:.0f} % idle")
    roles = clock.by_role()
    for role, (seconds, count) in sorted(roles.items(), key=lambda item: -item[1][0]):
        print(f"  {role:22s} {seconds:6.1f} s CPU = {seconds / wall:5.2f} cores ({count} threads)")
    s = waits.seconds
    network = s["in stream"] - s["waiting for readers"]
    parts = {
        "waiting for readers": s["waiting for readers"],
        "waiting for the network": network,
        "blending + argmax": s["blending"],
        "waiting for the writer": waits.put_by_thread["calling thread"],
    }
    parts["rest (set-up, commit)"] = wall - sum(parts.values())
    print("  calling thread: " + "; ".join(f"{k} {v:.1f} s ({100 * v / wall:.0f} %)"
                                           for k, v in parts.items()))
    print(f"  readers blocked on a full queue {waits.put_by_thread['readers']:.1f} s (thread-seconds)")


if __name__ == "__main__":
    main()
