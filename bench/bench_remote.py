"""Predict throughput on a local file against the same file over loopback HTTP; bytes read against file size.

Prints figures; asserts nothing. Run from the repository root:

    python bench/bench_remote.py                          # 2048 px Zion mosaic, bundled or untrained B0 model
    python bench/bench_remote.py --model m.safetensors --scene-px 4096

The scene is the mosaic of the shared Zion Landsat 8 scene built by bench/scenes.py (tiled
256 x 256, deflate), plus a COG copy of it (512 px blocks, deflate, overviews). Both are served
by an HTTP/1.1 server with Range support in a child process on 127.0.0.1 (so it does not share
the GIL with the prediction), which counts the bytes and requests it serves. Each source is
predicted in-process with ``predict_scene`` and geoseg's GDAL settings; a first run on a small
crop warms torch up. A last run reads a 512 x 512 px window of the remote COG through a VRT
(as ``gdal_translate -of VRT -srcwin`` writes one) to show what a small area costs.
"""

from __future__ import annotations

import argparse
import http.server
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # as the CLI does, before torch loads

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ROOT.parent / "shared" / "data" / "zion-landsat8-nlcd" / "classes.json"


def serve(folder: str, port: Any, served: Any, requests: Any) -> None:
    """Child process: serve ``folder`` with byte ranges; add to the shared counters."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._send(body=False)

        def do_GET(self) -> None:
            self._send(body=True)

        def _send(self, body: bool) -> None:
            path = Path(folder) / self.path.split("?")[0].lstrip("/")
            with requests.get_lock():
                requests.value += 1
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = path.stat().st_size
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            start, end = 0, size - 1
            if match:
                start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
            self.send_response(206 if match else 200)
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if body:
                with path.open("rb") as f:
                    f.seek(start)
                    self.wfile.write(f.read(end - start + 1))
                with served.get_lock():
                    served.value += end - start + 1

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port.value = httpd.server_address[1]
    httpd.serve_forever()


def window_vrt(src_path: str, gdal_path: str, col: int, row: int, size: int) -> str:
    """A VRT of a ``size`` px square window of ``gdal_path``, as ``gdal_translate -of VRT -srcwin`` writes."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(src_path) as src:
        t = src.window_transform(Window(col, row, size, size))
        crs, count, dtype = src.crs.to_wkt(), src.count, src.dtypes[0]
    gdal_type = {"uint16": "UInt16", "uint8": "Byte", "int16": "Int16", "float32": "Float32"}[dtype]
    bands = "".join(
        f'<VRTRasterBand dataType="{gdal_type}" band="{b}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{gdal_path}</SourceFilename><SourceBand>{b}</SourceBand>'
        f'<SrcRect xOff="{col}" yOff="{row}" xSize="{size}" ySize="{size}"/>'
        f'<DstRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/></SimpleSource></VRTRasterBand>'
        for b in range(1, count + 1)
    )
    geotransform = ", ".join(repr(v) for v in t.to_gdal())
    return (
        f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{crs}</SRS>'
        f"<GeoTransform>{geotransform}</GeoTransform>{bands}</VRTDataset>"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file [bundled default, else an untrained B0]")
    parser.add_argument("--scene-px", type=int, default=2048, help="edge of the square scene")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import numpy as np
    import rasterio
    import rasterio.env
    import rasterio.shutil
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scenes import OUT, build_mosaic

    from geoseg.config import PredictConfig
    from geoseg.errors import CheckpointError
    from geoseg.io import SceneReader, open_scene
    from geoseg.modelfile import load_model
    from geoseg.pipeline import block_cache_bytes, default_model_path, gdal_options, plan_grid, predict_scene
    from geoseg.sources import resolve_source

    def read_only_seconds(src: str) -> float:
        """Read every tile as the pipeline's reader thread does, without the network."""
        meta = model.metadata
        with rasterio.Env(**gdal_options()):
            source = resolve_source(src, meta)
            scene = open_scene(source.path, meta, name=source.name)
            grid = plan_grid(scene, meta, config)
            rasterio.env.setenv(GDAL_CACHEMAX=block_cache_bytes(scene, grid, source.block_shape))
            start = time.perf_counter()
            with SceneReader(scene, *meta.normalization.multiplier_and_bias()) as reader:
                for tile in grid:
                    reader.read_tile(tile.y, tile.x, tile.size)
            return time.perf_counter() - start

    model_path = args.model
    if model_path is None:
        try:
            model_path = default_model_path()
        except CheckpointError:
            model_path = OUT / "b0_untrained.safetensors"
            if not model_path.exists():
                cmd = [sys.executable, "-m", "geoseg", "init-model", "--arch", "segformer-b0"]
                subprocess.run([*cmd, "--classes", str(CLASSES), str(model_path)], check=True)
    model = load_model(model_path)
    scene = build_mosaic(args.scene_px)
    cog = OUT / f"zion_{args.scene_px}_cog.tif"
    if not cog.exists():
        rasterio.shutil.copy(scene, cog, driver="COG", compress="deflate", blocksize=512)
    crop = OUT / "zion_warmup.tif"
    with rasterio.open(scene) as src:
        profile = src.profile | {"width": 256, "height": 256}
        warm_pixels = src.read(window=((0, 256), (0, 256)))
    with rasterio.open(crop, "w", **profile) as dst:
        dst.write(warm_pixels)

    ctx = multiprocessing.get_context("spawn")
    port, served, requests = ctx.Value("i", 0), ctx.Value("q", 0), ctx.Value("q", 0)
    server = ctx.Process(target=serve, args=(str(OUT), port, served, requests), daemon=True)
    server.start()
    while port.value == 0:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port.value}"

    config = PredictConfig(batch_size=args.batch_size, device=args.device)
    predict_scene(crop, OUT / "remote_pred.tif", config, overwrite=True, model=model)  # warm-up
    threads = f"{torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(f"torch {torch.__version__}, {threads}; model {model_path.name}")
    print(f"scene {args.scene_px} x {args.scene_px} px ({args.scene_px ** 2 / 1e6:.1f} MP), 4 bands uint16")
    labels = {}
    rows = []
    for label, src, path in [
        ("local GeoTIFF", str(scene), scene),
        ("HTTP GeoTIFF", f"{base}/{scene.name}", scene),
        ("local COG", str(cog), cog),
        ("HTTP COG", f"{base}/{cog.name}", cog),
    ]:
        bytes_before, requests_before = served.value, requests.value
        result = predict_scene(src, OUT / "remote_pred.tif", config, overwrite=True, model=model)
        with rasterio.open(result.dst) as out:
            labels[label] = out.read(1)
        size = path.stat().st_size
        read, n_requests = served.value - bytes_before, requests.value - requests_before
        # NOTE: a query of its own, so no byte comes from GDAL's cache of the prediction's reads
        read_s = read_only_seconds(src + "?read-only" if src.startswith("http") else src)
        rows.append((label, result.seconds, result.megapixels_per_second, read, n_requests, size, read_s))
    mp = args.scene_px**2 / 1e6
    print(
        f"{'source':<16}{'predict s':>10}{'MP/s':>8}{'bytes read':>14}{'requests':>10}{'file size':>14}"
        f"{'read/size':>11}{'read-only s':>13}{'MP/s':>8}"
    )
    for label, seconds, mps, read, n, size, read_s in rows:
        remote = label.startswith("HTTP")
        print(
            f"{label:<16}{seconds:10.2f}{mps:8.3f}{(f'{read:,}' if remote else '-'):>14}"
            f"{(n if remote else '-'):>10}{size:>14,}{(f'{read / size:.3f}' if remote else '-'):>11}"
            f"{read_s:13.2f}{mp / read_s:8.1f}"
        )
    same = all(np.array_equal(labels["local GeoTIFF"], v) for v in labels.values())
    print(f"identical outputs across sources: {same}")

    for col, row in [(512, 1024), (768, 768)]:  # on one 512 px block; across four
        vrt = OUT / "zion_window.vrt"
        # NOTE: a query of its own, so no byte comes from GDAL's cache of the earlier full read
        vrt.write_text(window_vrt(str(cog), f"/vsicurl/{base}/{cog.name}?window={col}-{row}", col, row, 512))
        bytes_before, requests_before = served.value, requests.value
        result = predict_scene(vrt, OUT / "remote_pred.tif", config, overwrite=True, model=model)
        read = served.value - bytes_before
        with rasterio.open(cog) as src:
            block_rows, block_cols = src.block_shapes[0]
            under = [
                (x, y)
                for y in range(row // block_rows, (row + 511) // block_rows + 1)
                for x in range(col // block_cols, (col + 511) // block_cols + 1)
            ]
            blocks = sum(int(src.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=1)) for x, y in under)
        print(
            f"512 x 512 window at col {col}, row {row} of the HTTP COG via a VRT: {result.seconds:.2f} s, "
            f"{read:,} bytes in {requests.value - requests_before} requests = "
            f"{read / cog.stat().st_size:.3f} of the file; "
            f"the {len(under)} block(s) under it hold {blocks:,} bytes"
        )
    server.terminate()


if __name__ == "__main__":
    main()
