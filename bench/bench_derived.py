"""Cost of the outputs derived from the class raster: polygons, HTML report, STAC Item.

Prints figures; asserts nothing. Run from the repository root:

    python bench/bench_derived.py                        # 2048 px scene for overheads, 8192 px for RSS
    python bench/bench_derived.py --scene-px 2048 --rss-px 4096 --repeat 2

(a) overhead over a plain predict: ``geoseg predict`` in a subprocess on a real scene (mosaics of
    the shared Zion Landsat 8 scene, bench/scenes.py), plain and with each of --vector,
    --vector --simplify, --report, --stac, then all together; the overhead is the difference of
    wall clocks (best of ``--repeat``), so it is as noisy as the predict itself;
(b) the same outputs timed alone on that class map, in this process (no predict noise);
(c) peak RSS (the child's own VmHWM, see bench/peak.py) of a predict with all outputs on the big scene, and of
    vectorising its class map alone in a child process, with the polygon count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout's geoseg
from peak import run_with_peak  # noqa: E402
from scenes import OUT, ROOT, build_mosaic  # noqa: E402

# NOTE: torch is imported inside main() only: a measured child runs this module without it.


def run(module_args: list[str]) -> tuple[float, float]:
    """Run ``python -m MODULE ARGS`` from the repository root; returns (wall seconds, its own peak RSS in MiB)."""
    return run_with_peak(module_args)


def predict_cmd(scene: Path, model: Path, stem: str, extra: list[str]) -> list[str]:
    out = OUT / f"{stem}.tif"
    return ["geoseg", "predict", str(scene), str(out), "--model", str(model), "-q", "--overwrite", *extra]


def output_args(stem: str, which: str, simplify: float) -> list[str]:
    vector = ["--vector", str(OUT / f"{stem}.gpkg")]
    report = ["--report", str(OUT / f"{stem}_report")]
    stac = ["--stac", str(OUT / f"{stem}.json")]
    return {
        "plain": [],
        "vector": vector,
        "vector+simplify": [*vector, "--simplify", str(simplify)],
        "report": report,
        "stac": stac,
        "all": [*vector, "--simplify", str(simplify), *report, *stac],
    }[which]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file [bundled default]")
    parser.add_argument("--scene-px", type=int, default=2048, help="edge of the square scene for the overheads")
    parser.add_argument("--rss-px", type=int, default=8192, help="edge of the scene for peak RSS (0 to skip)")
    parser.add_argument("--simplify", type=float, default=45.0, help="--simplify tolerance, map units")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant in (a); the best is kept")
    parser.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run, e.g. 'bc'")
    args = parser.parse_args()

    from bench_predict import cpu_name

    from geoseg.modelfile import load_model
    from geoseg.pipeline import default_model_path

    model_path = args.model or default_model_path()
    model = load_model(model_path)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs while measuring)")
    print(f"model: {model.metadata.name}, {model_path.name}")

    import geoseg

    assert Path(geoseg.__file__).resolve().parents[1] == ROOT, geoseg.__file__
    scene = build_mosaic(args.scene_px)
    stem = f"derived_{args.scene_px}"
    if "a" in args.parts or not (OUT / f"{stem}.tif").exists():
        overheads(scene, model_path, stem, args)
    if "b" in args.parts:
        alone(scene, model, stem, args)
    if "c" in args.parts and args.rss_px:
        peak_rss(model_path, args)


def overheads(scene: Path, model_path: Path, stem: str, args: argparse.Namespace) -> None:
    print(f"(a) geoseg predict on {scene.name} ({args.scene_px}x{args.scene_px}), best of {args.repeat}:")
    walls = {}
    for which in ("plain", "vector", "vector+simplify", "report", "stac", "all"):
        walls[which] = min(
            run(predict_cmd(scene, model_path, stem, output_args(stem, which, args.simplify)))[0]
            for _ in range(args.repeat)
        )
        extra = "" if which == "plain" else f"   overhead {walls[which] - walls['plain']:+6.2f} s " \
            f"({100 * (walls[which] / walls['plain'] - 1):+5.1f} %)"
        print(f"    {which:16s} {walls[which]:7.2f} s{extra}")


def alone(scene: Path, model: Any, stem: str, args: argparse.Namespace) -> None:
    from geoseg.io import open_scene
    from geoseg.report import write_report
    from geoseg.stac import build_item, write_item
    from geoseg.vectorize import vectorize_raster

    class_raster = OUT / f"{stem}.tif"
    checked = open_scene(scene, model.metadata)
    classes = model.metadata.classes
    print(f"(b) each output alone on the class map {class_raster.name}:")
    timings = [
        ("vector", lambda: vectorize_raster(class_raster, OUT / "alone.gpkg", classes)),
        ("vector+simplify", lambda: vectorize_raster(class_raster, OUT / "alone_s.gpkg", classes,
                                                     simplify=args.simplify)),
        ("vector geojson", lambda: vectorize_raster(class_raster, OUT / "alone.geojson", classes)),
        ("report", lambda: write_report(OUT / "alone_report", class_raster, checked, model.metadata,
                                        overwrite=True)),
        ("stac", lambda: write_item(build_item(class_raster, classes, item_path=OUT / "alone.json"),
                                    OUT / "alone.json")),
    ]
    for name, job in timings:
        for path in (OUT / "alone.gpkg", OUT / "alone_s.gpkg", OUT / "alone.geojson"):
            path.unlink(missing_ok=True)
        start = time.perf_counter()
        result = job()
        seconds = time.perf_counter() - start
        count = f"   {result.polygons} polygons" if hasattr(result, "polygons") else ""
        print(f"    {name:16s} {seconds:7.3f} s{count}")


def peak_rss(model_path: Path, args: argparse.Namespace) -> None:
    big = build_mosaic(args.rss_px)
    big_stem = f"derived_{args.rss_px}"
    print(f"(c) peak RSS on {big.name} ({args.rss_px}x{args.rss_px} = {args.rss_px ** 2 / 1e6:.0f} MP):")
    # (a plain predict's peak is bench/bench_predict.py's figure)
    for label, which in (("predict + all, --simplify", "all"), ("predict + all, no simplify", "all-exact")):
        extra = output_args(big_stem, "all", args.simplify)
        if which == "all-exact":
            extra = [a for a in extra if a not in ("--simplify", str(args.simplify))]
        wall, peak = run(predict_cmd(big, model_path, big_stem, extra))
        print(f"    {label:28s} {peak:8.1f} MiB   ({wall:.1f} s)")
    big_map = OUT / f"{big_stem}.tif"
    # Vectorising alone, in a child that imports no torch (this script run as a module, see child()).
    for label, simplify in (("vectorise alone", 0.0), ("vectorise alone, --simplify", args.simplify)):
        out = OUT / f"{big_stem}_alone_{int(simplify)}.gpkg"
        out.unlink(missing_ok=True)
        wall, peak = run(["bench.bench_derived", "vectorise", str(big_map), str(out), str(simplify)])
        print(f"    {label:28s} {peak:8.1f} MiB   ({wall:.1f} s)")
    wall, peak = run(["bench.bench_derived", "imports"])
    print(f"    (python, numpy, rasterio, shapely, fiona imported, nothing done: {peak:.1f} MiB)")


def child(task: str, *args: str) -> None:
    """What a measured child process runs: vectorise a class map, or only import what that needs."""
    import fiona  # noqa: F401
    import rasterio
    import shapely  # noqa: F401

    from geoseg.modelfile import ClassSpec
    from geoseg.vectorize import vectorize_raster

    if task == "vectorise":
        src, dst, simplify = args
        # Class names from the raster's CLASS_<id> tags: geoseg.modelfile.read_metadata would import torch.
        with rasterio.open(src) as ds:
            tags = ds.tags()
        classes = [ClassSpec(int(key[6:]), name, "#000000") for key, name in tags.items() if key.startswith("CLASS_")]
        result = vectorize_raster(src, dst, classes, simplify=float(simplify))
        print(f"    ({result.polygons} polygons)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("vectorise", "imports"):
        child(*sys.argv[1:])
    else:
        main()
