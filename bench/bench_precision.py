"""How often reduced precision changes the class map, and what it costs, on a real scene.

Prints figures; asserts nothing. From the repository root:

    python bench/bench_precision.py                       # bundled model, the shared Zion scene
    python bench/bench_precision.py --precisions fp32,bf16 --scene path/to/scene.tif

Each precision predicts the whole scene through the normal engine (same tiles, overlap and
batch), twice, and the second call is timed (the first pays for the kernels' first use); the
class maps are compared pixel by pixel with the fp32 map over valid pixels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import rasterio
import torch

from geoseg.config import PredictConfig
from geoseg.inference import cpu_has_native_bf16
from geoseg.modelfile import load_model
from geoseg.pipeline import default_model_path, predict_scene

ROOT = Path(__file__).resolve().parents[1]
ZION = ROOT.parent / "shared" / "data" / "zion-landsat8-nlcd" / "image_rgbn.tif"
OUT = ROOT / "bench" / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file [bundled default]")
    parser.add_argument("--scene", type=Path, default=ZION)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    model = load_model(args.model or default_model_path())
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_has_native_bf16()}, threads {torch.get_num_threads()}")
    print(f"model {model.metadata.name}, scene {args.scene}")
    maps = {}
    for precision in args.precisions.split(","):
        dst = OUT / f"precision_{precision}.tif"
        config = PredictConfig(precision=precision, device=args.device, batch_size=args.batch_size)
        # The first call in a process pays for the kernels' first use; time the second.
        predict_scene(args.scene, dst, config, overwrite=True, model=model)
        result = predict_scene(args.scene, dst, config, overwrite=True, model=model)
        with rasterio.open(dst) as src:
            maps[precision] = src.read(1)
            nodata = src.nodata
        print(f"{precision}: {result.seconds:8.1f} s, {result.megapixels_per_second:.3f} MP/s on {result.device}")
    reference = maps.get("fp32")
    if reference is None:
        sys.exit("include fp32 to compare class maps")
    valid = reference != nodata
    for precision, labels in maps.items():
        if precision == "fp32":
            continue
        same = (labels == reference)[valid].mean()
        print(f"{precision} vs fp32: {100 * same:.3f} % of {valid.sum()} valid pixels share the class "
              f"({int((~(labels == reference))[valid].sum())} differ)")


if __name__ == "__main__":
    main()
