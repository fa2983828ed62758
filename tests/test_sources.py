"""Inputs as archives hold them: COGs over HTTP, one file per band, STAC Items, transient failures.

Real scenes (crops of the shared Zion Landsat 8 scene, written as COGs) are served by an HTTP
server on 127.0.0.1 started by the test; it honours Range requests (single and multi-range),
counts the bytes and requests it serves, and can be told to fail requests with 503. GDAL runs
with geoseg's own configuration (``gdal_options``); only the retry delays are shortened, through
the environment variables that override them. The server runs in this process: open remote files
only inside geoseg's ``rasterio.Env`` (GDAL's directory listing, which it turns off, blocks while
holding the GIL the server needs).
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

import geoseg._remote
from geoseg.cli import main
from geoseg.config import PredictConfig
from geoseg._remote import gdal_path
from geoseg.errors import ConfigError, InputError, OutputError
from geoseg.io import SceneReader, open_scene
from geoseg.modelfile import Normalization, load_model
from geoseg.pipeline import GDAL_CACHE_MB, block_cache_bytes, gdal_options, plan_grid, predict_scene
from geoseg.sources import is_stac_item, parse_assets, resolve_source, split_source

ZION = Path(__file__).resolve().parents[2] / "shared" / "data" / "zion-landsat8-nlcd" / "image_rgbn.tif"
BANDS = ("red", "green", "blue", "nir")
CROP = Window(0, 0, 192, 256)  # cols, rows of the Zion scene used for most tests
HEADER_BYTES = 32768  # GDAL_INGESTED_BYTES_AT_OPEN in geoseg's options
CHUNK_BYTES = 16384  # /vsicurl/ reads in chunks of this size (CPL_VSIL_CURL_CHUNK_SIZE)


# --- an HTTP server with Range support, counting and failing on demand -------------------------------


class RangeServer:
    """Serves one folder over HTTP/1.1 on 127.0.0.1 with byte ranges; counts and fails on demand."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()
        self.bytes_served: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._fail_left = 0  # requests still to fail; -1: all
        self._fail_from = 0  # only requests whose first byte is at or after this offset
        self._fail_status: int | None = 503  # None: cut the answer short and close the connection
        self.failed = 0  # requests answered with 503
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                server._serve(self, body=False)

            def do_GET(self) -> None:
                server._serve(self, body=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def fail(self, count: int = -1, from_offset: int = 0, status: int | None = 503) -> None:
        """Fail the next ``count`` requests (-1: all) that start at ``from_offset`` or later.

        With ``status`` (503) as the answer, or, with ``None``, by closing the connection halfway
        through the body (as a reset connection does).
        """
        with self.lock:
            self._fail_left, self._fail_from, self._fail_status = count, from_offset, status

    def served(self, name: str) -> int:
        with self.lock:
            return self.bytes_served.get(name, 0)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _serve(self, handler: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        name = handler.path.split("?")[0].lstrip("/")
        path = self.root / name
        size = path.stat().st_size if path.is_file() else 0
        header = handler.headers.get("Range")
        ranges = _parse_ranges(header, size) if header and size else None
        first = ranges[0][0] if ranges else 0
        with self.lock:
            self.requests.append((handler.command, name, header))
            fail = self._fail_left != 0 and first >= self._fail_from
            if fail and self._fail_left > 0:
                self._fail_left -= 1
            self.failed += fail
        if (fail and self._fail_status) or not path.is_file():
            handler.send_response(self._fail_status if fail else 404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data = path.read_bytes()
        media = "application/geo+json" if data[:1] == b"{" else "application/octet-stream"
        headers = {"Accept-Ranges": "bytes", "Content-Type": media}
        if not ranges:
            status, payload = 200, data
        elif len(ranges) == 1:
            (a, b), status = ranges[0], 206
            payload = data[a : b + 1]
            headers["Content-Range"] = f"bytes {a}-{b}/{size}"
        else:  # a multi-range request: one multipart/byteranges answer
            status, boundary = 206, "geoseg-test-boundary"
            payload = b"".join(
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {a}-{b}/{size}\r\n\r\n".encode() + data[a : b + 1] + b"\r\n"
                for a, b in ranges
            ) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if not body:
            return
        if fail:  # without a status: half the body, then the connection drops
            handler.wfile.write(payload[: len(payload) // 2])
            handler.close_connection = True
            return
        handler.wfile.write(payload)
        with self.lock:
            sent = sum(b - a + 1 for a, b in ranges or [(0, size - 1)])
            self.bytes_served[name] = self.bytes_served.get(name, 0) + sent


def _parse_ranges(header: str, size: int) -> list[tuple[int, int]]:
    ranges = []
    for part in header.removeprefix("bytes=").split(","):
        start, _, end = part.strip().partition("-")
        if not start:  # a suffix: the last N bytes
            a, b = max(size - int(end), 0), size - 1
        else:
            a, b = int(start), min(int(end) if end else size - 1, size - 1)
        ranges.append((a, b))
    return ranges


# --- fixtures ------------------------------------------------------------------------------------------


def write_cog(
    path: Path, data: np.ndarray, profile: dict[str, Any], blocksize: int = 128, **options: Any
) -> Path:
    """Write ``data`` (C, H, W) as a deflate COG."""
    cog = {
        "driver": "COG",
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "dtype": data.dtype.name,
        "crs": profile["crs"],
        "transform": profile["transform"],
        "nodata": profile.get("nodata"),
        "blocksize": blocksize,
        "compress": "deflate",
        **options,
    }
    with rasterio.open(path, "w", **cog) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="session")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as an archive holds a scene: a 4-band COG, one COG per band, and a large COG.

    ``scene.tif``: the 192 x 256 px crop, 4 bands, 128 px blocks; ``red.tif`` ... ``nir.tif``: its
    bands, one file each; ``big.tif``: the whole 1128 x 1428 px scene, 128 px blocks, no overviews.
    """
    if not ZION.is_file():
        pytest.skip(f"shared data not found at {ZION}")
    folder = tmp_path_factory.mktemp("archive")
    with rasterio.open(ZION) as src:
        profile = src.profile
        full = src.read()
        crop = src.read(window=CROP)
        crop_profile = profile | {"transform": src.window_transform(CROP)}
    write_cog(folder / "scene.tif", crop, crop_profile)
    for i, band in enumerate(BANDS):
        write_cog(folder / f"{band}.tif", crop[i : i + 1], crop_profile)
    write_cog(folder / "big.tif", full, profile, blocksize=128, overviews="NONE")
    return folder


@pytest.fixture
def server(archive: Path, tmp_path: Path) -> Iterator[RangeServer]:
    """The archive (copied, so a test may add files) served on a fresh port (GDAL caches by URL)."""
    root = tmp_path / "served"
    shutil.copytree(archive, root)
    srv = RangeServer(root)
    yield srv
    srv.close()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter waits between retries: GDAL's through its environment variable, geoseg's back-off."""
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.01")
    monkeypatch.setattr(geoseg._remote, "READ_BACKOFF_S", 0.01)


def predict(src: Any, dst: Path, model: Any, **kwargs: Any) -> np.ndarray:
    """predict_scene on the CPU; returns the labels."""
    predict_scene(src, dst, PredictConfig(device="cpu"), model=model, **kwargs)
    with rasterio.open(dst) as out:
        return out.read(1)


def assert_same_output(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert (x.crs, x.transform, x.shape) == (y.crs, y.transform, y.shape)
        assert np.array_equal(x.read(), y.read())


def data_offset(path: Path) -> int:
    """Where the first pixel block starts in a (COG) GeoTIFF: everything before is header."""
    with rasterio.open(path) as src:
        rows, cols = src.block_shapes[0]
        return min(
            int(src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=1))
            for y in range(-(-src.height // rows))
            for x in range(-(-src.width // cols))
        )


# --- SRC parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "gdal", "name"),
    [
        ("https://host/a/b.tif", "/vsicurl/https://host/a/b.tif", "https://host/a/b.tif"),
        ("http://h/b.tif?X-Amz-Signature=a", "/vsicurl/http://h/b.tif?X-Amz-Signature=a", "http://h/b.tif"),
        ("s3://bucket/key/b.tif", "/vsis3/bucket/key/b.tif", "s3://bucket/key/b.tif"),
        ("gs://bucket/b.tif", "/vsigs/bucket/b.tif", "gs://bucket/b.tif"),
        ("/vsizip/x.zip/b.tif", "/vsizip/x.zip/b.tif", "/vsizip/x.zip/b.tif"),
        ("scene.tif", "scene.tif", "scene.tif"),
    ],
)
def test_uris_map_to_gdal_paths(tiny_metadata, src: str, gdal: str, name: str) -> None:
    resolved = resolve_source(src, tiny_metadata())
    assert (resolved.path, resolved.name, resolved.files) == (gdal, name, (src,))
    assert "Signature" not in resolved.tag


def test_source_lists_and_stac_detection(tmp_path: Path) -> None:
    assert split_source("a.tif,b.tif, c.tif") == ["a.tif", "b.tif", "c.tif"]
    assert split_source(["a.tif", Path("b.tif")]) == ["a.tif", "b.tif"]
    assert split_source("https://h/x.tif?bbox=1,2") == ["https://h/x.tif?bbox=1,2"]  # a query may hold commas
    # presigned band files: split where another URI starts
    assert split_source("https://h/a.tif?s=1,2,s3://b/c.tif, https://h/d.tif?s=3") == [
        "https://h/a.tif?s=1,2", "s3://b/c.tif", "https://h/d.tif?s=3"]
    odd = tmp_path / "a,b.tif"
    odd.write_bytes(b"")
    assert split_source(str(odd)) == [str(odd)]  # an existing file is never split
    with pytest.raises(InputError, match="empty path"):
        split_source("a.tif,,b.tif")
    assert is_stac_item("https://h/items/S2A.json?token=1") and is_stac_item("item.JSON")
    assert not is_stac_item("scene.tif")
    assert parse_assets("red=B04, green=B03") == {"red": "B04", "green": "B03"}
    assert parse_assets("B04,B03") == ["B04", "B03"]
    with pytest.raises(ConfigError, match="not both"):
        parse_assets("red=B04,B03")


def test_gdal_options_for_remote_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("GDAL_CACHEMAX", "GDAL_HTTP_MAX_RETRY"):
        monkeypatch.delenv(key, raising=False)
    options = gdal_options(remote=True)
    assert options["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    # local reads list the folder, as GDAL does, so that sidecar files are found
    assert "GDAL_DISABLE_READDIR_ON_OPEN" not in gdal_options()
    # rasterio passes an integer to GDALSetCacheMax64, in bytes: 128 would be 128 bytes
    assert options["GDAL_CACHEMAX"] == GDAL_CACHE_MB << 20
    assert options["GDAL_HTTP_MAX_RETRY"] >= 3 and options["GDAL_HTTP_RETRY_DELAY"] > 0
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")
    assert "GDAL_HTTP_MAX_RETRY" not in gdal_options()  # the environment wins


def test_block_cache_holds_the_blocks_around_each_readers_tile(make_scene, tiny_metadata) -> None:
    from geoseg.io import open_scene

    meta = tiny_metadata()
    small = open_scene(make_scene(width=96, height=80), meta)
    assert block_cache_bytes(small, plan_grid(small, meta, PredictConfig())) == GDAL_CACHE_MB << 20
    tiled = open_scene(make_scene("tiled.tif", width=600, height=700, tiled=True, blocksize=256), meta)
    assert tiled.block_shape == (256, 256)
    wide = type(tiled)(**{**tiled.__dict__, "width": 40_000, "height": 40_000})
    grid = plan_grid(wide, meta, PredictConfig(tile=512, overlap=64))
    # a 512 px tile touches three rows of 256 px blocks (3.5 with slack) and three columns: the
    # cache no longer holds whole block rows for the next tile row, so the width does not matter
    assert block_cache_bytes(wide, grid) == GDAL_CACHE_MB << 20
    assert block_cache_bytes(wide, grid) == block_cache_bytes(
        type(wide)(**{**wide.__dict__, "width": 4_000}), grid
    )
    # large blocks: 1024 px, two block rows plus half a one, a tile plus two blocks wide
    assert block_cache_bytes(wide, grid, (1024, 1024)) == (512 + 2048) * 2560 * 4 * 2
    # strips span the width: the strips under a tile row are all needed while it is read
    strips = type(wide)(**{**wide.__dict__, "block_shape": (16, 40_000)})
    rows = (512 // 16 + 1) * 16 + 8
    assert block_cache_bytes(strips, grid) == min(40_000 * rows * 4 * 2, _memory() // 4)
    # a VRT band stack caches its own blocks beside its sources': twice as much
    stack = type(wide)(**{**wide.__dict__, "path": "<VRTDataset/>"})
    assert block_cache_bytes(stack, grid, (1024, 1024)) == 2 * (512 + 2048) * 2560 * 4 * 2
    # several readers: each holds the blocks around its own tile; never wider than the scene
    assert block_cache_bytes(wide, grid, (1024, 1024), readers=8) == 8 * (512 + 2048) * 2560 * 4 * 2
    narrow = type(wide)(**{**wide.__dict__, "width": 600})
    assert block_cache_bytes(narrow, grid, (1024, 1024), readers=2) == max(
        2 * 600 * 2560 * 4 * 2, GDAL_CACHE_MB << 20
    )


def _memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- remote COGs ---------------------------------------------------------------------------------------


def test_http_cog_equals_local_and_reads_each_byte_once(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model
) -> None:
    local = tmp_path / "local.tif"
    remote = tmp_path / "remote.tif"
    predict(archive / "scene.tif", local, tiny_loaded_model)
    predict(server.url("scene.tif"), remote, tiny_loaded_model)
    assert_same_output(local, remote)
    with rasterio.open(remote) as out:
        assert out.tags()["GEOSEG_SOURCE"] == "scene.tif"
    size = (archive / "scene.tif").stat().st_size
    assert 0 < server.served("scene.tif") <= size  # every block fetched once at most (and no overviews)
    assert all(r[2] for r in server.requests if r[0] == "GET"), "a GET without Range fetched the whole file"


def test_small_window_of_a_big_remote_cog_reads_only_its_blocks(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model
) -> None:
    """A VRT cut from a remote COG (as ``gdal_translate -of VRT -srcwin`` writes): only the blocks
    under the window travel, and the output is georeferenced on the window's grid."""
    big = archive / "big.tif"
    window = Window(300, 400, 160, 160)  # touches blocks 2..3 x 3..4 of 128 px
    with rasterio.open(big) as src:
        window_transform = src.window_transform(window)
        pixels = src.read(window=window)
        profile = src.profile | {"driver": "GTiff", "width": 160, "height": 160}
        profile["transform"] = window_transform
        needed = sum(
            int(src.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=1)) for y in (3, 4) for x in (2, 3)
        )
        vrt = aoi_vrt(src, "/vsicurl/" + server.url("big.tif"), window)
    aoi = tmp_path / "aoi.vrt"
    aoi.write_text(vrt)
    crop = tmp_path / "crop.tif"
    with rasterio.open(crop, "w", **profile) as dst:
        dst.write(pixels)

    predict(aoi, tmp_path / "remote.tif", tiny_loaded_model)
    predict(crop, tmp_path / "local.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "remote.tif")
    with rasterio.open(tmp_path / "remote.tif") as out:
        assert out.transform == window_transform
    served, size = server.served("big.tif"), big.stat().st_size
    # The header request and the four blocks, in one range per block row. /vsicurl/ rounds ranges
    # to 16 KB chunks and, reading on past a range's end, doubles the next one (read-ahead): up
    # to twice the blocks' bytes, measured 819200 for 468060.
    assert served <= HEADER_BYTES + 2 * needed + 2 * 2 * CHUNK_BYTES
    assert served < size / 10, f"{served} of {size} bytes read for a window of 2 % of the scene"


def aoi_vrt(src: Any, gdal_path: str, window: Window) -> str:
    t = src.window_transform(window)
    w, h = window.width, window.height
    bands = "".join(
        f'<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{gdal_path}</SourceFilename><SourceBand>{b}</SourceBand>'
        f'<SrcRect xOff="{window.col_off}" yOff="{window.row_off}" xSize="{w}" ySize="{h}"/>'
        f'<DstRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/></SimpleSource></VRTRasterBand>'
        for b in range(1, src.count + 1)
    )
    return (
        f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}"><SRS>{src.crs.to_wkt()}</SRS>'
        f"<GeoTransform>{', '.join(map(repr, t.to_gdal()))}</GeoTransform>{bands}</VRTDataset>"
    )


def test_vsizip_path(tmp_path: Path, archive: Path, tiny_loaded_model) -> None:
    archive_zip = tmp_path / "scene.zip"
    with zipfile.ZipFile(archive_zip, "w") as z:
        z.write(archive / "scene.tif", "inner/scene.tif")
    predict(archive / "scene.tif", tmp_path / "local.tif", tiny_loaded_model)
    predict(f"/vsizip/{archive_zip}/inner/scene.tif", tmp_path / "zip.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "zip.tif")


def test_missing_remote_file_is_one_clear_error(
    tmp_path: Path, server: RangeServer, tiny_loaded_model
) -> None:
    url = server.url("absent.tif")
    with pytest.raises(InputError) as err:
        predict(url + "?token=secret", tmp_path / "out.tif", tiny_loaded_model)
    assert str(err.value) == f"{url}: cannot open (HTTP response code: 404)"  # no token
    assert not (tmp_path / "out.tif").exists()


def test_gdal_messages_as_shown_to_the_user() -> None:
    """GDAL quotes paths with their query string, URLs with their password; curl adds words of
    its own to an HTTP status (as GDAL 3.10 says them)."""
    plain = geoseg._remote.plain_message
    assert plain("HTTP response code: 404 - Failure writing output to destination, passed 10 returned 0") == (
        "HTTP response code: 404")
    assert plain("scene.tif?sig=SECRET, band 1: IReadBlock failed at X offset 0") == (
        "scene.tif, band 1: IReadBlock failed at X offset 0")
    assert plain("HTTP error code: 500 - http://user:PW@h:8766/a/scene.tif?X-Amz-Signature=S&b=2. Retrying again") == (
        "HTTP error code: 500 - http://h:8766/a/scene.tif. Retrying again")
    assert plain("'/vsicurl/https://h/x.tif?a=1:2' not recognized") == "'/vsicurl/https://h/x.tif' not recognized"
    assert plain("Is this a question? Yes, a=1") == "Is this a question? Yes, a=1"


# --- one file per band ---------------------------------------------------------------------------------


def test_band_files_over_http_equal_the_four_band_file(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model
) -> None:
    predict(archive / "scene.tif", tmp_path / "local.tif", tiny_loaded_model)
    files = ",".join(server.url(f"{band}.tif") for band in BANDS)
    predict(files, tmp_path / "stack.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "stack.tif")
    with rasterio.open(tmp_path / "stack.tif") as out:
        assert out.tags()["GEOSEG_SOURCE"] == "red.tif,green.tif,blue.tif,nir.tif"
    for band in BANDS:  # each file's blocks once at most
        assert 0 < server.served(f"{band}.tif") <= (archive / f"{band}.tif").stat().st_size


def test_band_files_in_another_order_feed_the_model_in_the_order_given(
    tmp_path: Path, archive: Path, tiny_loaded_model
) -> None:
    order = [3, 2, 1, 0]
    config = PredictConfig(device="cpu", bands=(4, 3, 2, 1))
    predict_scene(archive / "scene.tif", tmp_path / "b.tif", config, model=tiny_loaded_model)
    predict([archive / f"{BANDS[i]}.tif" for i in order], tmp_path / "c.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "b.tif", tmp_path / "c.tif")


def shifted(archive: Path, tmp_path: Path, name: str, **changes: Any) -> Path:
    """A copy of nir.tif with other georeferencing or size."""
    with rasterio.open(archive / "nir.tif") as src:
        data = src.read()
        profile = src.profile | {"driver": "GTiff"}
    if "size" in changes:
        h, w = changes.pop("size")
        data = data[:, :h, :w]
        profile |= {"height": h, "width": w}
    profile |= changes
    with rasterio.open(tmp_path / name, "w", **profile) as dst:
        dst.write(data)
    return tmp_path / name


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"crs": "EPSG:32613"}, ["CRS EPSG:32613 differs from", "red.tif", "EPSG:32612"]),
        ({"move": (30.0, 0.0)}, ["grid differs from", "red.tif", "origin (301935, 4154085) vs (301905, 415"]),
        ({"size": (250, 192)}, ["grid differs", ": size 192x250 vs 192x256 px;"]),
        ({"scale": 2}, ["pixel size 60 x 60 m, coarser than", "red.tif", "30 x 30 m", "--resample bilinear"]),
    ],
)
def test_mismatched_band_files_are_refused_naming_the_file(
    tmp_path: Path, archive: Path, tiny_loaded_model, changes: dict[str, Any], fragments: list[str]
) -> None:
    with rasterio.open(archive / "nir.tif") as src:
        t = src.transform
    if "move" in changes:
        dx, dy = changes.pop("move")
        changes["transform"] = t @ Affine.translation(dx / t.a, 0)
    if "scale" in changes:
        factor = changes.pop("scale")
        changes["transform"] = t @ Affine.scale(factor)
        changes["size"] = (256 // factor, 192 // factor)
    odd = shifted(archive, tmp_path, "odd_nir.tif", **changes)
    files = [archive / "red.tif", archive / "green.tif", archive / "blue.tif", odd]
    with pytest.raises(InputError) as err:
        predict(files, tmp_path / "out.tif", tiny_loaded_model)
    message = str(err.value)
    assert message.startswith(f"{odd}: "), message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    assert not (tmp_path / "out.tif").exists()


def test_coarser_band_is_resampled_onto_the_finest_grid_when_asked(
    tmp_path: Path, archive: Path, tiny_loaded_model
) -> None:
    with rasterio.open(archive / "nir.tif") as src:
        t = src.transform
        coarse = src.read(out_shape=(1, 128, 96), resampling=rasterio.enums.Resampling.average)
        profile = src.profile | {"driver": "GTiff", "width": 96, "height": 128}
        profile["transform"] = t @ Affine.scale(2)
    with rasterio.open(tmp_path / "nir60.tif", "w", **profile) as dst:
        dst.write(coarse)
    files = [archive / "red.tif", archive / "green.tif", archive / "blue.tif", tmp_path / "nir60.tif"]
    labels = predict(files, tmp_path / "out.tif", tiny_loaded_model, resample="bilinear")
    with rasterio.open(tmp_path / "out.tif") as out, rasterio.open(archive / "scene.tif") as ref:
        assert (out.crs, out.transform, out.shape) == (ref.crs, ref.transform, ref.shape)  # the finest grid
    assert labels.shape == (256, 192)
    resolved = resolve_source(files, tiny_loaded_model.metadata, resample="bilinear")
    with rasterio.open(resolved.path) as stack:
        nir = stack.read(4)
    with rasterio.open(archive / "nir.tif") as src:
        nir_full = src.read(1).astype(float)
    assert nir.shape == (256, 192)
    assert np.corrcoef(nir.ravel(), nir_full.ravel())[0, 1] > 0.9  # resampled, not misplaced


def test_a_stack_with_more_bands_than_the_model_is_picked_with_bands(
    tmp_path: Path, archive: Path, tiny_loaded_model
) -> None:
    files = [archive / "nir.tif", archive / "scene.tif"]  # 5 bands: n, r, g, b, n
    predict(archive / "scene.tif", tmp_path / "local.tif", tiny_loaded_model)
    config = PredictConfig(device="cpu", bands=(2, 3, 4, 1))
    predict_scene(files, tmp_path / "picked.tif", config, model=tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "picked.tif")
    message = r"nir.tif,.*scene.tif: band 6 is out of range \(the file has 5 bands\)"
    with pytest.raises(InputError, match=message):
        predict_scene(files, tmp_path / "x.tif", config.replace(bands=(2, 3, 4, 6)), model=tiny_loaded_model)


# --- STAC Items ----------------------------------------------------------------------------------------

COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"


def stac_item(
    hrefs: dict[str, str], version: str = "1.0.0", raster: dict[str, dict[str, float]] | None = None
) -> dict[str, Any]:
    """A STAC Item with one asset per band (keys B04, B03, B02, B08), plus a JPEG 2000 twin of
    each and a thumbnail, as archives publish them."""
    keys = {"red": "B04", "green": "B03", "blue": "B02", "nir": "B08"}
    assets: dict[str, Any] = {"thumbnail": {"href": "thumb.png", "type": "image/png", "roles": ["thumbnail"]}}
    for band, href in hrefs.items():
        if version == "1.0.0":
            bands_field = {"eo:bands": [{"name": keys[band], "common_name": band}]}
            if raster and band in raster:
                bands_field["raster:bands"] = [raster[band]]
        else:
            entry = {"name": keys[band], "eo:common_name": band}
            entry |= {f"raster:{k}": v for k, v in (raster or {}).get(band, {}).items()}
            bands_field = {"bands": [entry]}
        assets[keys[band]] = {"href": href, "type": COG_TYPE, "roles": ["data"], **bands_field}
        jp2 = {"href": href.replace(".tif", ".jp2"), "type": "image/jp2"}
        assets[f"{keys[band]}-jp2"] = jp2 | bands_field
    return {
        "type": "Feature",
        "stac_version": version,
        "id": "zion-crop",
        "geometry": None,
        "properties": {"datetime": "2015-08-18T00:00:00Z"},
        "links": [],
        "assets": assets,
    }


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_stac_item_url_with_relative_hrefs(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model, version: str
) -> None:
    (server.root / "items").mkdir()
    item = stac_item({band: f"../{band}.tif" for band in BANDS}, version)
    (server.root / "items" / "item.json").write_text(json.dumps(item))
    predict(archive / "scene.tif", tmp_path / "local.tif", tiny_loaded_model)
    predict(server.url("items/item.json"), tmp_path / "stac.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "stac.tif")
    with rasterio.open(tmp_path / "stac.tif") as out:
        assert out.tags()["GEOSEG_SOURCE"] == "item.json:B04,B03,B02,B08"
    assert all(server.served(f"{band}.tif") > 0 for band in BANDS)


def test_stac_api_item_url_without_a_suffix(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model
) -> None:
    items = server.root / "collections" / "zion" / "items"
    items.mkdir(parents=True)
    (items / "zion-crop").write_text(json.dumps(stac_item({b: server.url(f"{b}.tif") for b in BANDS})))
    shutil.copy(server.root / "scene.tif", server.root / "scene")  # a raster without a suffix still opens
    predict(archive / "scene.tif", tmp_path / "local.tif", tiny_loaded_model)
    predict(server.url("collections/zion/items/zion-crop"), tmp_path / "api.tif", tiny_loaded_model)
    predict(server.url("scene"), tmp_path / "nosuffix.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "api.tif")
    assert_same_output(tmp_path / "local.tif", tmp_path / "nosuffix.tif")
    gets = [header for method, name, header in server.requests if (method, name) == ("GET", "scene")]
    assert gets and all(gets), "a raster without a suffix must be read in ranges, never downloaded whole"


def test_local_stac_item_with_absolute_urls_and_chosen_assets(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model
) -> None:
    item = stac_item({band: server.url(f"{band}.tif") for band in BANDS})
    # swap the common names of red and nir: picking by name now feeds nir as red ...
    item["assets"]["B04"]["eo:bands"][0]["common_name"] = "nir"
    item["assets"]["B08"]["eo:bands"][0]["common_name"] = "red"
    for key in ("B04-jp2", "B08-jp2", "B03-jp2", "B02-jp2"):
        del item["assets"][key]
    path = tmp_path / "item.json"
    path.write_text(json.dumps(item))
    predict(archive / "scene.tif", tmp_path / "local.tif", tiny_loaded_model)
    # ... so --assets by key restores the right order; as a mapping and as a list
    by_band = {"red": "B04", "green": "B03", "blue": "B02", "nir": "B08"}
    predict(path, tmp_path / "a.tif", tiny_loaded_model, assets=by_band)
    predict(path, tmp_path / "b.tif", tiny_loaded_model, assets=["B04", "B03", "B02", "B08"])
    assert_same_output(tmp_path / "local.tif", tmp_path / "a.tif")
    assert_same_output(tmp_path / "local.tif", tmp_path / "b.tif")
    with pytest.raises(InputError, match="no asset 'B99'; the item has B02, B03, B04, B08, thumbnail"):
        predict(path, tmp_path / "c.tif", tiny_loaded_model, assets=["B04", "B03", "B02", "B99"])


def test_stac_item_without_a_band_the_model_needs(
    tmp_path: Path, server: RangeServer, tiny_loaded_model
) -> None:
    item = stac_item({band: f"{band}.tif" for band in BANDS[:3]})
    (server.root / "rgb.json").write_text(json.dumps(item))
    url = server.url("rgb.json")
    with pytest.raises(InputError) as err:
        predict(url, tmp_path / "out.tif", tiny_loaded_model)
    message = str(err.value)
    assert message.startswith(f"{url}: no single-band asset with eo:bands common name 'nir'")
    assert "model bands: red, green, blue, nir" in message
    assert "blue (B02/B02-jp2), green (B03/B03-jp2), red (B04/B04-jp2)" in message
    assert "--assets" in message
    assert not (tmp_path / "out.tif").exists()


def test_not_a_stac_item(tmp_path: Path, tiny_loaded_model) -> None:
    path = tmp_path / "collection.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(InputError, match="collection.json: not a STAC Item .*'FeatureCollection'"):
        predict(path, tmp_path / "out.tif", tiny_loaded_model)
    with pytest.raises(InputError, match="missing.json: file not found"):
        predict(tmp_path / "missing.json", tmp_path / "out.tif", tiny_loaded_model)


def landsat_scaling_models(make_model_file, method: str) -> tuple[Any, Any]:
    """(the model run, the model it must then equal) when the source declares reflectance = DN x
    2.75e-5 - 0.2: a ``scale`` model takes that scaling, a ``meanstd`` one stays as it is."""
    if method == "meanstd":
        norm = Normalization("meanstd", mean=(9000.0,) * 4, std=(3000.0,) * 4)
        model = load_model(make_model_file("m.safetensors", normalization=norm))
        return model, model
    landsat = Normalization("scale", scale=(2.75e-5,) * 4, offset=(-0.2,) * 4)
    model = load_model(make_model_file("m.safetensors"))  # scale 1e-4, offset 0
    return model, load_model(make_model_file("e.safetensors", normalization=landsat))


@pytest.mark.parametrize("method", ["scale", "meanstd"])
@pytest.mark.parametrize(
    "files", [["scene.tif"], [f"{band}.tif" for band in BANDS]], ids=["one file", "band files"]
)
def test_a_files_own_scale_and_offset_are_those_of_an_item(
    tmp_path: Path, archive: Path, make_model_file, method: str, files: list[str]
) -> None:
    """The same values stored the GDAL way (band Scale and Offset) act as a STAC Item's do."""
    scaled = []
    for name in files:
        shutil.copy(archive / name, tmp_path / name)
        with rasterio.open(tmp_path / name, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
            ds.scales, ds.offsets = (2.75e-5,) * ds.count, (-0.2,) * ds.count
        scaled.append(str(tmp_path / name))
    model, expected = landsat_scaling_models(make_model_file, method)
    predict(archive / "scene.tif", tmp_path / "expected.tif", expected)
    predict(scaled if len(scaled) > 1 else scaled[0], tmp_path / "scaled_out.tif", model)
    assert_same_output(tmp_path / "expected.tif", tmp_path / "scaled_out.tif")


@pytest.mark.parametrize("method", ["scale", "meanstd"])
def test_stac_scale_and_offset_replace_a_scale_models_own(
    tmp_path: Path, archive: Path, server: RangeServer, make_model_file, method: str
) -> None:
    """Landsat Collection 2 style: reflectance = DN x 2.75e-5 - 0.2. A ``scale`` model then sees
    the item's reflectance; a ``meanstd`` model (raw-unit statistics) sees the raw values."""
    raster = {band: {"scale": 2.75e-5, "offset": -0.2, "nodata": 0} for band in BANDS}
    item = stac_item({b: f"{b}.tif" for b in BANDS}, raster=raster)
    (server.root / "item.json").write_text(json.dumps(item))
    model, expected = landsat_scaling_models(make_model_file, method)
    predict(archive / "scene.tif", tmp_path / "expected.tif", expected)
    predict(server.url("item.json"), tmp_path / "stac.tif", model)
    assert_same_output(tmp_path / "expected.tif", tmp_path / "stac.tif")
    # NOTE: outside geoseg's Env, GDAL lists the folder and deadlocks the in-process server
    with rasterio.Env(**gdal_options(remote=True)):
        resolved = resolve_source(server.url("item.json"), model.metadata)
        stack = rasterio.open(resolved.path)
    with stack:
        assert stack.nodatavals == (0.0,) * 4  # the item's nodata, as the files declare none


# --- transient and lasting failures --------------------------------------------------------------------


def test_a_few_503s_are_retried_and_the_scene_completes(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model, fast_retries
) -> None:
    predict(archive / "scene.tif", tmp_path / "local.tif", tiny_loaded_model)
    server.fail(3)  # the first requests, the opening ones included
    predict(server.url("scene.tif"), tmp_path / "remote.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "remote.tif")
    assert server.failed == 3


def test_a_failure_outlasting_gdals_retries_is_retried_by_geoseg(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model, fast_retries, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")  # GDAL gives up after 2 tries of a request
    predict(archive / "scene.tif", tmp_path / "local.tif", tiny_loaded_model)
    # pixel blocks only; 6 failures outlast GDAL's two tries of up to three parallel requests
    server.fail(6, from_offset=data_offset(archive / "scene.tif") + HEADER_BYTES)
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        predict(server.url("scene.tif"), tmp_path / "remote.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "remote.tif")
    retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert retries and "HTTP error code: 503" in retries[0] and server.url("scene.tif") in retries[0]


def test_a_server_that_always_fails_mid_scene_fails_the_scene_cleanly(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model, fast_retries, monkeypatch
) -> None:
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")
    server.fail(-1, from_offset=data_offset(archive / "scene.tif") + HEADER_BYTES)
    url = server.url("scene.tif")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as err:
        predict(url, out / "labels.tif", tiny_loaded_model)
    message = str(err.value)
    where = r"rows \d+-\d+, cols \d+-\d+"
    attempts = geoseg._remote.READ_ATTEMPTS
    assert re.match(rf"{re.escape(url)}: read failed at {where} after {attempts} attempts in \d+ s \(", message)
    assert "HTTP error code: 503" in message and "IReadBlock failed" in message
    assert "\n" not in message
    assert list(out.iterdir()) == []


def test_cli_one_line_failure_when_the_server_always_fails(
    tmp_path: Path, server: RangeServer, tiny_model_file: Path, runner, fast_retries, monkeypatch
) -> None:
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")
    server.fail(-1)
    url = server.url("scene.tif")
    dst = tmp_path / "out.tif"
    args = ["predict", url, str(dst), "--model", str(tiny_model_file), "--device", "cpu", "-q"]
    result = runner.invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [f"Error: {url}: cannot open (HTTP response code: 503)"]
    assert not dst.exists()


# --- the command line ----------------------------------------------------------------------------------


def test_cli_band_files_stac_and_usage(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_model_file: Path, runner
) -> None:
    base = ["--model", str(tiny_model_file), "--device", "cpu", "-q"]
    ok = runner.invoke(main, ["predict", str(archive / "scene.tif"), str(tmp_path / "local.tif"), *base])
    assert ok.exit_code == 0, ok.output
    comma = ",".join(server.url(f"{b}.tif") for b in BANDS)
    assert runner.invoke(main, ["predict", comma, str(tmp_path / "a.tif"), *base]).exit_code == 0
    repeated = [arg for b in BANDS for arg in ("--band-files", str(archive / f"{b}.tif"))]
    assert runner.invoke(main, ["predict", *repeated, str(tmp_path / "b.tif"), *base]).exit_code == 0
    (server.root / "item.json").write_text(json.dumps(stac_item({b: f"{b}.tif" for b in BANDS})))
    keys = ["--assets", "B04,B03,B02,B08"]
    stac = runner.invoke(main, ["predict", server.url("item.json"), str(tmp_path / "c.tif"), *keys, *base])
    assert stac.exit_code == 0, stac.output
    for name in ("a.tif", "b.tif", "c.tif"):
        assert_same_output(tmp_path / "local.tif", tmp_path / name)

    files = ["--band-files", "a.tif,b.tif"]
    both = runner.invoke(main, ["predict", "x.tif", *files, str(tmp_path / "d.tif"), *base])
    assert both.exit_code == 2 and "with --band-files, give DST alone" in both.output
    assert runner.invoke(main, ["predict", "x.tif", *base]).exit_code == 2
    bad = runner.invoke(main, ["predict", comma, str(tmp_path / "e.tif"), "--resample", "lanczos", *base])
    assert bad.exit_code == 2
    scene = str(archive / "scene.tif")
    wrong = runner.invoke(main, ["predict", scene, str(tmp_path / "f.tif"), "--assets", "B04", *base])
    assert wrong.exit_code == 1 and "--assets applies to a STAC Item" in wrong.output


def test_destination_equal_to_a_band_file_is_refused(
    tmp_path: Path, archive: Path, tiny_loaded_model
) -> None:
    files = [tmp_path / f"{b}.tif" for b in BANDS]
    for b, f in zip(BANDS, files):
        shutil.copy(archive / f"{b}.tif", f)
    with pytest.raises(OutputError, match="destination is the input scene"):
        predict_scene(files, files[2], PredictConfig(device="cpu"), model=tiny_loaded_model, overwrite=True)


def test_dropped_connections_mid_scene_are_retried_by_geoseg(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model, fast_retries, monkeypatch, caplog
) -> None:
    """With GDAL's own retries off, a connection that drops mid-answer fails the read with no
    HTTP status, only "got 0 bytes" deep in the cause; geoseg still sees it as transient."""
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    predict(archive / "scene.tif", tmp_path / "local.tif", tiny_loaded_model)
    server.fail(2, from_offset=data_offset(archive / "scene.tif") + HEADER_BYTES, status=None)
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        predict(server.url("scene.tif"), tmp_path / "remote.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "remote.tif")
    assert server.failed == 2
    retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert retries and all(server.url("scene.tif") in r for r in retries)


def test_a_transfer_cut_short_is_fetched_again(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_loaded_model, fast_retries, caplog
) -> None:
    """GDAL keeps what arrived of a transfer cut short (here a whole striped file's pixels, read in
    one request) and serves it to a reopened file too; the retry must forget it and ask again."""
    with rasterio.open(archive / "scene.tif") as src:
        profile = src.profile | {"driver": "GTiff", "tiled": False, "compress": "none"}
        profile.pop("blockxsize"), profile.pop("blockysize")
        with rasterio.open(server.root / "strips.tif", "w", **profile) as dst:
            dst.write(src.read())
    predict(server.root / "strips.tif", tmp_path / "local.tif", tiny_loaded_model)
    server.fail(1, from_offset=HEADER_BYTES, status=None)
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        predict(server.url("strips.tif"), tmp_path / "remote.tif", tiny_loaded_model)
    assert_same_output(tmp_path / "local.tif", tmp_path / "remote.tif")
    assert server.failed == 1
    retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retries) == 1, retries
    pixels = [r for r in server.requests if r[2] and _parse_ranges(r[2], 1 << 40)[0][0] >= HEADER_BYTES]
    assert pixels.count(pixels[0]) == 2, "the range cut short was never asked for again"


def test_a_file_gone_mid_scene_fails_at_once_with_its_http_status(
    server: RangeServer, tiny_metadata, fast_retries
) -> None:
    """GDAL does not say why a range read failed; the reopen before the next try meets the 404,
    which asking again will not change."""
    meta = tiny_metadata()
    with rasterio.Env(**gdal_options(remote=True)):
        scene = open_scene(gdal_path(server.url("big.tif?sig=SECRET")), meta)
        with SceneReader(scene, *meta.normalization.multiplier_and_bias()) as reader:
            reader.read_tile(0, 0, 128)
            (server.root / "big.tif").unlink()
            with pytest.raises(InputError) as err:
                reader.read_tile(1280, 1000, 128)
    message = str(err.value)
    assert message.startswith(f"{server.url('big.tif')}: read failed at rows 1280-1408, cols 1000-1128 after 2 attempts")
    assert "HTTP response code: 404" in message and "SECRET" not in message


def test_a_stopped_run_gives_up_a_read_being_tried_again(
    archive: Path, server: RangeServer, tiny_metadata, monkeypatch
) -> None:
    monkeypatch.setattr(geoseg._remote, "READ_BACKOFF_S", 60.0)  # a wait nobody sits out
    server.fail(-1, from_offset=data_offset(archive / "big.tif") + HEADER_BYTES)
    meta = tiny_metadata()
    stop = threading.Event()
    with rasterio.Env(**gdal_options(remote=True)):
        scene = open_scene(gdal_path(server.url("big.tif")), meta)
        with SceneReader(scene, *meta.normalization.multiplier_and_bias(), stop=stop) as reader:
            threading.Timer(0.5, stop.set).start()
            with pytest.raises(RuntimeError, match="pipeline stopped"):
                reader.read_tile(1280, 1000, 128)
    assert server.failed >= 1


@pytest.mark.parametrize(("signum", "status", "said"), [
    (signal.SIGTERM, 128 + signal.SIGTERM, ""),
    (signal.SIGINT, 130, "Interrupted; no unfinished output was left behind."),
])
def test_a_signal_stops_a_run_whose_remote_reads_keep_failing(
    tmp_path: Path, archive: Path, server: RangeServer, tiny_model_file: Path, signum: int, status: int, said: str
) -> None:
    """A real process, GDAL's and geoseg's own retry settings: the signal ends the run while a read
    is being tried again (minutes before the read would fail), and nothing is left behind."""
    server.fail(-1, from_offset=data_offset(archive / "scene.tif") + HEADER_BYTES)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_HTTP", "CPL_"))}
    args = ["predict", server.url("scene.tif?sig=SECRET"), out / "labels.tif", "--model", tiny_model_file,
            "--device", "cpu", "--threads", 1]
    proc = subprocess.Popen([sys.executable, "-m", "geoseg", *map(str, args)], stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        while server.failed < 1 or not any(".geoseg-tmp" in p.name for p in out.iterdir()):
            assert proc.poll() is None, f"geoseg ended early: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "geoseg never read the failing pixels"
            time.sleep(0.05)
        time.sleep(0.5)  # into geoseg's wait before the next try
        assert proc.poll() is None
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr and "SECRET" not in stderr
    assert said in stderr and "read failed at" not in stderr
    assert list(out.iterdir()) == []


def test_stderr_shows_no_credentials_and_folds_gdals_retries(
    tmp_path: Path, server: RangeServer, tiny_model_file: Path
) -> None:
    """GDAL names the URL it retries, query string and password included, once per retry: the
    command line shows those lines only with -v (at DEBUG), and without the credentials."""
    url = server.url("scene.tif?X-Amz-Signature=SECRET").replace("http://", "http://user:PASSWORD@")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_HTTP", "CPL_"))}
    env["GDAL_HTTP_RETRY_DELAY"] = "0.01"
    runs = {}
    for verbosity in ([], ["-v"]):
        server.fail(2)  # the opening requests: GDAL tries them again
        args = ["predict", url, tmp_path / f"out{len(verbosity)}.tif", "--model", tiny_model_file,
                "--device", "cpu", "--threads", 1, *verbosity]
        proc = subprocess.run([sys.executable, "-m", "geoseg", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "SECRET" not in proc.stderr and "PASSWORD" not in proc.stderr, proc.stderr
        runs[bool(verbosity)] = [line for line in proc.stderr.splitlines() if "Retrying again" in line]
    assert runs[False] == []
    assert runs[True] and all(line.startswith("DEBUG: ") and server.url("scene.tif") in line for line in runs[True])


def test_the_gdal_library_whose_cache_is_cleared_is_rasterios() -> None:
    """Wheels bundle a libgdal each (fiona's, rasterio's); clearing another copy's cache does nothing."""
    import ctypes

    pytest.importorskip("fiona")  # maps its own libgdal into the process
    lib = geoseg._remote._load_libgdal()
    assert lib is not None
    lib.CPLGetConfigOption.restype = ctypes.c_char_p
    lib.CPLGetConfigOption.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    with rasterio.Env(GEOSEG_TEST_OPTION="seen"):  # set in the copy rasterio uses
        assert lib.CPLGetConfigOption(b"GEOSEG_TEST_OPTION", None) == b"seen"
