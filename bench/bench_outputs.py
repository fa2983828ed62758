"""Cost of each streamed GIS output over a plain predict, and peak memory with all of them.

Prints figures; asserts nothing. Run from the repository root:

    python bench/bench_outputs.py                          # 4096 px scene for overheads, RSS on 4096 and 8192 px
    python bench/bench_outputs.py --scene-px 2048 --rss 2048,4096 --repeat 2

Each configuration runs ``geoseg predict`` in a subprocess on a mosaic of the shared Zion
Landsat 8 scene (bench/scenes.py) with the bundled model; wall clock includes start-up, peak
RSS is the child's own VmHWM (bench/peak.py says why not ``os.wait4``). The overhead of an output is its run's wall clock over the plain
run's (the plain run is repeated first and last, to show the machine's noise). Two areas of
interest: one covering the whole scene (the cost of masking every tile) and the Zion park
boundary (another CRS; it covers part of the mosaic's first copy of the scene, so most tiles are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import cpu_name  # noqa: E402
from peak import run_measured  # noqa: E402
from scenes import OUT, ZION, build_mosaic  # noqa: E402

PARK = ZION.parent / "zion_park_boundary.gpkg"


def run_predict(scene: Path, out_dir: Path, extra: list[str]) -> tuple[float, float, float]:
    """Run ``geoseg predict`` as a child; returns (wall seconds, CPU seconds, its own peak RSS in MiB).

    CPU seconds (user + system, all threads) say more than wall clock on a shared machine.
    """
    measured = run_measured(["geoseg", "predict", str(scene), str(out_dir / "classes.tif"), "-q", "--overwrite", *extra])
    return measured.wall_s, measured.cpu_s, measured.peak_mib


def whole_scene_aoi(scene: Path) -> str:
    """GeoJSON text of a polygon a little larger than the scene, in the scene's CRS."""
    import rasterio

    with rasterio.open(scene) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs.to_string()
    pad = 100.0
    ring = [[left - pad, bottom - pad], [right + pad, bottom - pad], [right + pad, top + pad], [left - pad, top + pad]]
    return json.dumps({
        "type": "Polygon",
        "coordinates": [[*ring, ring[0]]],
        "crs": {"type": "name", "properties": {"name": crs}},
    })


def configurations(scene: Path, out: Path) -> dict[str, list[str]]:
    return {
        "--cog": ["--cog"],
        "--probabilities (uint8)": ["--probabilities", str(out / "p.tif")],
        "--probabilities float32": ["--probabilities", str(out / "p.tif"), "--probabilities-dtype", "float32"],
        "--confidence (uint8)": ["--confidence", str(out / "c.tif")],
        "--stats": ["--stats", str(out / "s.json")],
        "--aoi (whole scene)": ["--aoi", whole_scene_aoi(scene)],
        "--aoi (park boundary)": ["--aoi", str(PARK)],
    }


def all_outputs(scene: Path, out: Path) -> list[str]:
    return ["--cog", "--probabilities", str(out / "p.tif"), "--confidence", str(out / "c.tif"),
            "--stats", str(out / "s.json"), "--aoi", whole_scene_aoi(scene)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene-px", type=int, default=4096, help="edge of the square scene for the overheads")
    parser.add_argument("--rss", default="4096,8192", help="scene edges for peak RSS with every output ('' to skip)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (the fastest counts)")
    parser.add_argument("--only-rss", action="store_true", help="skip the per-output overheads")
    args = parser.parse_args()

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(dir=OUT if OUT.exists() else None) as tmp:
        out = Path(tmp)
        if not args.only_rss:
            scene = build_mosaic(args.scene_px)
            size_mp = args.scene_px**2 / 1e6
            print(f"scene: {scene.name}, {args.scene_px}x{args.scene_px} ({size_mp:.1f} MP), bundled model, CPU fp32")

            def best(extra: list[str]) -> tuple[float, float, float]:
                runs = [run_predict(scene, out, extra) for _ in range(args.repeat)]
                return min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs)

            def line(name: str, run: tuple[float, float, float], base: tuple[float, float, float] | None) -> str:
                wall, cpu, rss = run
                text = f"{name:26s} wall {wall:6.1f} s  CPU {cpu:6.1f} s"
                if base is not None:
                    text += f"  ({100 * (wall / base[0] - 1):+6.1f} % wall, {100 * (cpu / base[1] - 1):+6.1f} % CPU)"
                return text + f"  peak RSS {rss:5.0f} MiB"

            plain_first = best([])
            print(line("plain predict", plain_first, None) + f"  {size_mp / plain_first[0]:.2f} MP/s")
            results = {name: best(extra) for name, extra in configurations(scene, out).items()}
            plain_last = best([])
            plain = (min(plain_first[0], plain_last[0]), min(plain_first[1], plain_last[1]), plain_first[2])
            for name, run in results.items():
                print(line(name, run, plain))
            print(line("plain predict (again)", plain_last, plain_first))

        for size in [int(s) for s in args.rss.split(",") if s]:
            scene = build_mosaic(size)
            plain_wall, _, plain_rss = run_predict(scene, out, [])
            wall, _, rss = run_predict(scene, out, all_outputs(scene, out))
            print(f"{size}x{size} ({size * size / 1e6:5.1f} MP): plain {plain_wall:6.1f} s, peak RSS {plain_rss:6.0f} MiB; "
                  f"all outputs {wall:6.1f} s, peak RSS {rss:6.0f} MiB ({100 * (rss / plain_rss - 1):+.0f} %)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
