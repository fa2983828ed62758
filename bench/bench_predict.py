"""Predict throughput against the model alone, and peak memory against scene size.

Prints figures; asserts nothing. Run from the repository root:

    python bench/bench_predict.py                      # bundled model, 8192 px scene, RSS on 2048 and 8192 px
    python bench/bench_predict.py --model m.safetensors --scene-px 4096 --rss 2048,8192 --repeat 5
    python bench/bench_predict.py --repeat 1 --rss 2048,40000x1024,16384   # peaks of a 40,000 px wide strip too

(a) model only: the network on random tiles already in memory (no reading, blending, writing),
    converted to unique megapixels per second with the scene's own tile grid (each tile counts
    for height * width / tiles pixels, so overlap is taken out); at its fastest, one batch on
    every torch thread or (on the CPU) several batches at once as ``geoseg predict`` runs them,
    and on the CPU (fp32, bf16) each of those eager and traced (TorchScript, as ``--trace`` runs it);
(b) end to end: ``geoseg predict`` in a subprocess on a real scene (mosaics of the shared Zion
    Landsat 8 scene, built by bench/scenes.py), wall clock including start-up (import, model
    load), so use a big scene (default 8192 px) for the ratio.
(c) with ``--warm``: ``predict_scene`` called in this process after a first, uncounted call on
    the same scene: the engine's steady throughput, without start-up (imports, CUDA context,
    model load). On a GPU, where the model alone is fast, start-up weighs most in (b).
Peak RSS is each ``geoseg predict`` child's own VmHWM (bench/peak.py says why not ``os.wait4``).

Shared machines drift: (a) is measured just before and just after each (b) and the two are
averaged, ``--repeat`` times, and the ratio is taken pair by pair; medians are quoted, with the
range. The model alone runs in its fastest way, so the ratio is against its best. It and (c) run in
this process: on glibc's malloc with the CLI's thresholds (geoseg/_malloc.py) unless tcmalloc is
preloaded (``LD_PRELOAD=libtcmalloc_minimal.so.4``), while ``geoseg predict`` re-runs itself under
tcmalloc where installed. The network ran at the same speed on both; (c) on the CPU is best
compared with (b) under the same allocator (docs/performance.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak import run_with_peak  # noqa: E402
from scenes import OUT, build_mosaic, parse_size  # noqa: E402

from geoseg._malloc import reuse_freed_memory, tcmalloc_environment  # noqa: E402
from geoseg.config import PredictConfig  # noqa: E402
from geoseg.inference import (  # noqa: E402
    TracedNetwork,
    default_parallel_batches,
    resolve_device,
    resolve_precision,
)
from geoseg.io import open_scene  # noqa: E402
from geoseg.modelfile import load_model  # noqa: E402
from geoseg.pipeline import default_model_path, plan_grid, predict_scene  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def model_only_tiles_per_s(
    model, tile: int, batch: int, device, precision: str, seconds: float, parallel: int = 1
) -> float:
    """Forward passes on random tiles already on the device; tiles per second.

    ``parallel > 1`` (CPU): that many threads each run batches on an equal share of torch's
    threads, as ``geoseg predict`` does with ``--parallel-batches``.
    """
    module = model.module.to(device)
    x = torch.randn(batch, len(model.metadata.bands), tile, tile, device=device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    total_threads = torch.get_num_threads()
    done = [0] * parallel

    def loop(i: int) -> None:
        if parallel > 1:
            torch.set_num_threads(max(1, total_threads // parallel))
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            while time.perf_counter() - start < seconds or done[i] < 3:
                module(x)
                done[i] += 1

    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
        module(x)  # warm-up
    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    torch.set_num_threads(total_threads)
    return sum(done) * batch / elapsed


def network_variants(model, device, precision: str) -> list:
    """The ways ``geoseg predict`` may run the network: eager, and on the CPU also traced
    (geoseg.inference.TracedNetwork, traced once on its first batch and kept for every round;
    in bf16 traced under autocast, as TilePredictor does)."""
    if device.type == "cpu" and precision in ("fp32", "bf16"):
        autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        return [model, dataclasses.replace(model, module=TracedNetwork(model.module, autocast_dtype))]
    return [model]


def best_model_only(
    networks: list, tile: int, batch: int, device, precision: str, seconds: float, parallel: int
) -> float:
    """The model alone at its fastest over ``networks`` (:func:`network_variants`): one batch on
    every thread, or ``parallel`` batches at once."""
    best = 0.0
    for network in networks:
        best = max(best, model_only_tiles_per_s(network, tile, batch, device, precision, seconds))
        if parallel > 1:
            at_once = model_only_tiles_per_s(network, tile, batch, device, precision, seconds, parallel)
            best = max(best, at_once)
    return best


def predict_allocator() -> str:
    """The malloc the ``geoseg predict`` children will run on (geoseg/_malloc.py)."""
    preloaded = tcmalloc_environment(dict(os.environ), ["predict"])
    if preloaded is not None:
        return f"tcmalloc ({preloaded['LD_PRELOAD']})"
    return f"LD_PRELOAD={os.environ['LD_PRELOAD']}" if os.environ.get("LD_PRELOAD") else "the system's malloc"


def run_predict(scene: Path, model: Path, extra: list[str]) -> tuple[float, float]:
    """Run ``geoseg predict`` as a child; returns (wall seconds, the child's own peak RSS in MiB)."""
    out = OUT / f"{scene.stem}_pred.tif"
    return run_with_peak(["geoseg", "predict", str(scene), str(out), "--model", str(model), "-q", "--overwrite", *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file [bundled default]")
    parser.add_argument("--scene-px", type=int, default=8192, help="edge of the square scene for throughput")
    parser.add_argument("--tile", type=int, help="tile edge [model's]")
    parser.add_argument("--overlap", type=int, help="overlap [model's]")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=15.0, help="time spent on the model-only figure")
    parser.add_argument("--rss", default="2048,8192",
                        help="scenes for the peak-RSS figures: square edges or WIDTHxHEIGHT ('' to skip)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (a), (b) and the RSS runs")
    parser.add_argument("--reader-threads", type=int, help="passed to geoseg predict [its default]")
    parser.add_argument("--parallel-batches", type=int, help="passed to geoseg predict [its default]")
    parser.add_argument("--warm", action="store_true", help="also (c): predict_scene in process, warm")
    args = parser.parse_args()

    reuse_freed_memory()
    model_path = args.model or default_model_path()
    model = load_model(model_path)
    config = PredictConfig(
        tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, precision=args.precision, device=args.device,
        reader_threads=args.reader_threads,
    )
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    scene = build_mosaic(args.scene_px)
    checked = open_scene(scene, model.metadata)
    grid = plan_grid(checked, model.metadata, config)
    unique_px_per_tile = checked.width * checked.height / len(grid)

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"model: {model.metadata.name} ({model.metadata.variant}), {model_path.name}")
    print(f"allocator of geoseg predict: {predict_allocator()} (GEOSEG_ALLOCATOR=system for glibc's)")
    # What geoseg predict will run: several batches at once on the CPU (geoseg/inference.py).
    parallel = 1 if device.type == "cuda" else (args.parallel_batches or default_parallel_batches())
    print(
        f"settings: device {device}, precision {precision}, tile {grid.tile_px}, overlap {grid.overlap_px}, "
        f"batch {config.batch_size}, parallel batches {parallel}; scene {checked.width}x{checked.height} "
        f"= {len(grid)} tiles"
    )
    extra = ["--batch-size", str(config.batch_size), "--precision", precision, "--device", str(device)]
    extra += ["--parallel-batches", str(parallel)] if device.type != "cuda" else []
    extra += ["--tile", str(grid.tile_px), "--overlap", str(grid.overlap_px)]
    if args.reader_threads is not None:
        extra += ["--reader-threads", str(args.reader_threads)]
    sizes = [s for s in args.rss.split(",") if s]
    scene_mp = checked.width * checked.height / 1e6
    ratios, model_figures, e2e_figures = [], [], []
    networks = network_variants(model, device, precision)
    peaks: dict[str, list[float]] = {size: [] for size in sizes}
    for run in range(1, args.repeat + 1):
        network = (networks, grid.tile_px, config.batch_size, device, precision, args.seconds, parallel)
        before = best_model_only(*network)
        wall, peak = run_predict(scene, model_path, extra)
        after = best_model_only(*network)
        # (a) on both sides of (b), averaged: a machine that drifts during (b) biases neither way.
        tiles_per_s = (before + after) / 2
        model_mps = tiles_per_s * unique_px_per_tile / 1e6
        e2e_mps = scene_mp / wall
        ratios.append(e2e_mps / model_mps)
        model_figures.append(model_mps)
        e2e_figures.append(e2e_mps)
        print(f"run {run}: (a) model only {tiles_per_s:6.2f} tiles/s "
              f"({before:.2f} before (b), {after:.2f} after) = {model_mps:.3f} unique MP/s; "
              f"(b) geoseg predict {wall:6.2f} s = {e2e_mps:.3f} MP/s (peak RSS {peak:.0f} MiB); "
              f"b/a = {ratios[-1]:.3f}", flush=True)
        for size in sizes:
            if size == str(args.scene_px):
                peaks[size].append(peak)  # the same command on the same scene: no need to run it again
                continue
            width, height = parse_size(size)
            peaks[size].append(run_predict(build_mosaic(width, height_px=height), model_path, extra)[1])
    if args.warm:
        warm = []
        settings = config.replace(tile=grid.tile_px, overlap=grid.overlap_px, device=str(device), precision=precision)
        out = OUT / f"{scene.stem}_warm.tif"
        for run in range(args.repeat + 1):
            result = predict_scene(scene, out, settings, overwrite=True, model=model)
            if run:  # the first call warms up (CUDA context, kernels, GDAL)
                warm.append(result.megapixels_per_second)
        print(f"(c) predict_scene in process, warm: {_spread(warm)} MP/s "
              f"(b/a medians with (c) for (b): {statistics.median(warm) / statistics.median(model_figures):.3f})")
    print(f"(a) model only:           {_spread(model_figures)} unique MP/s")
    print(f"(b) geoseg predict (CLI): {_spread(e2e_figures)} MP/s (wall clock incl. start-up)")
    print(f"ratio b/a, pair by pair:  {_spread(ratios)}")
    for size in sizes:
        width, height = parse_size(size)
        print(f"peak RSS {width}x{height} ({width * height / 1e6:5.1f} MP): {_spread(peaks[size], '.0f')} MiB")
    if len(sizes) >= 2:
        growth = [100 * (big / small - 1) for small, big in zip(peaks[sizes[0]], peaks[sizes[-1]])]
        print(f"peak RSS growth {sizes[0]} -> {sizes[-1]} px, run by run: {_spread(growth, '+.1f')} %")


def _spread(values: list[float], fmt: str = ".3f") -> str:
    """``median (min-max)`` of the figures."""
    ordered = sorted(values)
    return f"{statistics.median(ordered):{fmt}} ({ordered[0]:{fmt}} to {ordered[-1]:{fmt}}, n={len(ordered)})"


if __name__ == "__main__":
    main()
