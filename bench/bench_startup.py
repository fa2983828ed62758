"""Where a cold ``geoseg predict`` spends the time before (and beside) its steady pace.

Prints figures; asserts nothing. In one fresh process, as the command runs them: imports, the
device's first use, loading the model, then ``predict_scene`` on a scene twice (cold, then warm);
the difference between the two calls is what the first call pays once (kernel selection and
loading on a GPU, the first batches, GDAL's first opens). From the repository root:

    python bench/bench_startup.py                         # 8192 px mosaic, the default device
    python bench/bench_startup.py --device cuda --precision bf16 --batch-size 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

started = time.perf_counter()
import torch  # noqa: E402

torch_imported = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenes import OUT, build_mosaic  # noqa: E402

from geoseg import pipeline  # noqa: E402
from geoseg.config import PredictConfig  # noqa: E402
from geoseg.inference import resolve_device  # noqa: E402
from geoseg.modelfile import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene-px", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    geoseg_imported = time.perf_counter()
    scene = build_mosaic(args.scene_px)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device).sum().item()  # creates the CUDA context
    device_ready = time.perf_counter()
    model = load_model(pipeline.default_model_path())
    model_loaded = time.perf_counter()
    config = PredictConfig(device=args.device, precision=args.precision, batch_size=args.batch_size)
    out = OUT / f"{scene.stem}_startup.tif"
    calls = []
    for _ in range(2):
        result = pipeline.predict_scene(scene, out, config, overwrite=True, model=model)
        calls.append(result.seconds)
    out.unlink(missing_ok=True)
    Path(f"{out}.aux.xml").unlink(missing_ok=True)
    phases = {
        "import torch": torch_imported - started,
        "import geoseg (predict's modules)": geoseg_imported - torch_imported,
        f"first use of {device}": device_ready - geoseg_imported,
        "load the model": model_loaded - device_ready,
        "predict_scene, first call": calls[0],
        "predict_scene, second call": calls[1],
    }
    print(f"{scene.name}, {result.device}, {result.precision}, batch {args.batch_size}, "
          f"torch {torch.__version__}")
    for name, seconds in phases.items():
        print(f"  {name:36s} {seconds:6.2f} s")
    print(f"  the first call pays once               {calls[0] - calls[1]:6.2f} s; "
          f"steady pace {result.width * result.height / 1e6 / calls[1]:.1f} MP/s")


if __name__ == "__main__":
    main()
