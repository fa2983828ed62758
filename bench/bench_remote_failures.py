"""How long `geoseg predict` takes to fail, or to stop on a signal, when a remote scene's reads fail.

Prints figures; asserts nothing. Run from the repository root:

    python bench/bench_remote_failures.py                 # bundled sample scene, bundled model
    python bench/bench_remote_failures.py --stall         # also a server that stalls (~5 min)

A child process serves ``sample_data/zion_sample.tif`` (512 x 512 px, 4 bands) as a COG (its header
in the first request) over HTTP/1.1 with byte ranges on 127.0.0.1; the first path segment of a URL picks how it misbehaves once the
opening requests are served: ``ok``, ``e500`` or ``e404`` (every later request, HEAD too, gets
that status), ``cut`` (the next answer is cut in half, then all is well) or ``stall`` (every later
answer sends half its bytes, then nothing). Each case runs ``python -m geoseg predict -q`` as a
process with geoseg's default GDAL and retry settings and prints its exit status and seconds;
the signal cases send SIGTERM or SIGINT 12 s into a run whose reads keep failing and print how
long the process took to exit after it.
"""

from __future__ import annotations

import argparse
import http.server
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "sample_data" / "zion_sample.tif"
OPENING_GETS = 1  # GDAL's first GET fetches the header (GDAL_INGESTED_BYTES_AT_OPEN)


def serve(path: str, port: Any) -> None:
    """Child process: serve ``path`` at ``/<mode>/<run>/scene.tif``, failing as ``mode`` says."""
    data = Path(path).read_bytes()
    gets: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def answer(self, body: bool) -> None:
            mode = self.path.split("/")[1]
            key = self.path.rsplit("/", 1)[0]
            gets[key] = gets.get(key, 0) + body
            late = gets[key] > OPENING_GETS  # past the opening requests
            if mode in ("e500", "e404") and late:
                self.send_response(int(mode[1:]))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = 0, len(data) - 1
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match:
                start, end = int(match[1]), min(int(match[2] or end), end)
            payload = data[start : end + 1]
            self.send_response(206 if match else 200)
            self.send_header("Accept-Ranges", "bytes")
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not body:
                return
            cut = mode == "cut" and gets[key] == OPENING_GETS + 1
            if cut or (mode == "stall" and gets[key] > OPENING_GETS):
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                if mode == "stall":
                    time.sleep(3600)
                self.close_connection = True
                return
            self.wfile.write(payload)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port.value = server.server_address[1]
    server.serve_forever()


def run(url: str, out: Path, signum: int | None = None, after_s: float = 12.0) -> str:
    """Run ``geoseg predict`` on ``url``; with ``signum``, send it ``after_s`` seconds in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "CPL_"))}
    dst = out / f"{len(list(out.iterdir()))}.tif"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "geoseg", "predict", "-q", url, str(dst)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if signum is None:
        _, stderr = proc.communicate()
        return f"exit {proc.returncode} after {time.monotonic() - started:.1f} s: {stderr.strip()[-110:]}"
    time.sleep(after_s)
    if proc.poll() is not None:
        return f"ended before the signal (exit {proc.returncode})"
    sent = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate()
    left = [p.name for p in out.iterdir() if ".geoseg-tmp" in p.name]
    return f"exit {proc.returncode} {time.monotonic() - sent:.1f} s after the signal; temporary files left: {left}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stall", action="store_true", help="also time a server that stalls every answer")
    args = parser.parse_args()
    from rasterio.shutil import copy

    cog_folder = tempfile.TemporaryDirectory()
    cog = Path(cog_folder.name) / "scene.tif"
    copy(SCENE, cog, driver="COG", compress="deflate", blocksize=256)
    port = multiprocessing.Value("i", 0)
    server = multiprocessing.Process(target=serve, args=(str(cog), port), daemon=True)
    server.start()
    while not port.value:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port.value}"
    cases: list[tuple[str, str, int | None]] = [
        ("all well", "ok", None),
        ("one answer cut short", "cut", None),
        ("HTTP 404 from the second request on", "e404", None),
        ("HTTP 500 from the second request on", "e500", None),
        ("SIGTERM while reads fail with 500", "e500", signal.SIGTERM),
        ("SIGINT while reads fail with 500", "e500", signal.SIGINT),
        ("SIGTERM while a transfer stalls", "stall", signal.SIGTERM),
    ]
    if args.stall:
        cases.append(("every answer stalls", "stall", None))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, mode, signum) in enumerate(cases):
            print(f"{label:38s} {run(f'{base}/{mode}/{i}/scene.tif', Path(tmp), signum)}", flush=True)
    server.terminate()
    cog_folder.cleanup()


if __name__ == "__main__":
    main()
