"""geoseg batch: planning, the manifest, resume, failure isolation, killed workers, the out-dir lock.

Cluster tests run on a real ``distributed.LocalCluster`` of 2 worker processes on loopback (one
per module), and once on a scheduler and workers started as separate processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

pytest.importorskip("distributed")

from geoseg import PredictConfig, predict_scene  # noqa: E402
from geoseg.batch import (  # noqa: E402
    ATTEMPTS_MARKER,
    LOCK_NAME,
    BatchSummary,
    OutDirLock,
    connect,
    expand_inputs,
    local_client,
    local_cluster_size,
    output_name,
    run_batch,
    settings_hash,
)
from geoseg.cli import main  # noqa: E402
from geoseg.crf import CrfConfig  # noqa: E402
from geoseg.errors import ConfigError, InputError, OutputError  # noqa: E402
from geoseg.io import TMP_MARKER  # noqa: E402
from geoseg.manifest import MANIFEST_NAME, Manifest, read_manifest  # noqa: E402
from geoseg.modelfile import file_sha256  # noqa: E402
from geoseg.outputs import OutputOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER_TIMEOUT_S = 180  # starting worker processes imports torch: slow on a loaded machine


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A client of a real 2-worker LocalCluster (processes), as ``geoseg batch`` starts it."""
    with local_client(2) as c:
        c.wait_for_workers(2, timeout=CLUSTER_TIMEOUT_S)
        yield c


def make_scenes(make_scene: Any, count: int, **kwargs: Any) -> list[Path]:
    return [make_scene(f"scene{i}.tif", seed=i, **kwargs) for i in range(count)]


def corrupt_scene(folder: Path, source: Path) -> Path:
    """A GeoTIFF cut short: the header is there, the pixels are not."""
    path = folder / "corrupt.tif"
    path.write_bytes(source.read_bytes()[:600])
    return path


def assert_same_raster(path: Path, reference: Path) -> None:
    with rasterio.open(path) as out, rasterio.open(reference) as ref:
        assert out.crs == ref.crs
        assert out.transform == ref.transform
        assert (out.dtypes, out.nodata, out.shape) == (ref.dtypes, ref.nodata, ref.shape)
        np.testing.assert_array_equal(out.read(), ref.read())


def no_temporaries(folder: Path) -> bool:
    """No temporary output, no attempts file, no sidecar without its raster."""
    return not [
        p for p in folder.rglob("*")
        if TMP_MARKER in p.name or ATTEMPTS_MARKER in p.name
        or (p.name.endswith(".aux.xml") and not p.with_name(p.name[: -len(".aux.xml")]).exists())
    ]


@pytest.fixture
def web_server() -> Iterator[str]:
    """A plain HTTP server on loopback (what answers on a dashboard's port); yields host:port."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_connect_refuses_what_is_not_a_dask_scheduler_in_one_line(tmp_path: Path, web_server: str) -> None:
    with pytest.raises(ConfigError, match=rf"tcp://{web_server}: not a dask scheduler \(no answer to dask's handshake after 2 s"):
        connect(f"tcp://{web_server}", timeout=2)  # without a deadline of its own, dask waits forever
    with pytest.raises(ConfigError, match="a web address .the dashboard.*tcp://host:port"):
        connect(f"http://{web_server}")
    with pytest.raises(ConfigError, match="no such scheduler file, nor a tcp://host:port address"):
        connect(str(tmp_path / "scheduler.json"))
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ConfigError, match='empty.json: not a dask scheduler file .no "address" in it'):
        connect(str(tmp_path / "empty.json"))
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ConfigError, match="text.json: not a dask scheduler file .not JSON"):
        connect(str(tmp_path / "text.json"))
    with pytest.raises(ConfigError, match="unknown host nosuchhost.invalid"):
        connect("nosuchhost.invalid:8786")
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=f"connection refused: nothing listens on 127.0.0.1:{free}"):
        connect(f"tcp://127.0.0.1:{free}")  # at once, not after dask's 60 s of retries


def test_expand_inputs_files_globs_and_lists(tmp_path: Path) -> None:
    for name in ("b.tif", "a.tif", "c.jp2"):
        (tmp_path / name).touch()
    listing = tmp_path / "list.txt"
    listing.write_text(
        "# nightly\nc.jp2\n\ns3://bucket/x/scene.tif\n" + str(tmp_path / "a.tif") + "\na.tif,b.tif\n"
    )
    scenes = expand_inputs([str(tmp_path / "*.tif"), f"@{listing}"])
    assert scenes == [
        str(tmp_path / "a.tif"),
        str(tmp_path / "b.tif"),
        str(tmp_path / "c.jp2"),
        "s3://bucket/x/scene.tif",
        f"{tmp_path / 'a.tif'},{tmp_path / 'b.tif'}",
    ]
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.nothing")])
    with pytest.raises(InputError, match="missing.txt"):
        expand_inputs([f"@{tmp_path / 'missing.txt'}"])


def test_output_names_from_template() -> None:
    assert output_name("/data/LC08/scene.tif") == "scene_landcover.tif"
    assert output_name("https://h/x/s.tif?sig=1", "{parent}_{stem}.tif") == "x_s.tif"
    # band files joined by commas: named after the first
    assert output_name("/data/a/B04.tif,/data/b/B08.tif", "{parent}_{stem}.tif") == "a_B04.tif"
    assert output_name("https://h/x/B04.tif,https://h/x/B08.tif") == "B04_landcover.tif"
    assert output_name("https://h/x/B04.tif?sig=1,2,https://h/x/B08.tif?sig=3") == "B04_landcover.tif"
    with pytest.raises(ConfigError, match="{stem}"):
        output_name("a.tif", "{date}.tif")
    with pytest.raises(ConfigError, match="inside the out dir"):
        output_name("a.tif", "../{stem}.tif")


def test_the_summary_names_failed_urls_without_credentials(tmp_path: Path) -> None:
    summary = BatchSummary(out_dir=tmp_path, manifest=tmp_path / MANIFEST_NAME, failed=2)
    summary.failures = [
        ("http://u:PASSWORD@h/404/missing.tif?X-Amz-Signature=SECRET",
         "http://h/404/missing.tif: cannot open (HTTP response code: 404)"),
        ("https://h/b.tif?sig=SECRET", "RasterioIOError: b.tif?sig=SECRET: not recognized"),
    ]
    failed = [line for line in summary.format_table().splitlines() if line.startswith("failed: ")]
    assert failed == [
        "failed: http://h/404/missing.tif: cannot open (HTTP response code: 404)",
        "failed: https://h/b.tif: RasterioIOError: b.tif: not recognized",
    ]


def test_settings_hash_ignores_speed_only_fields() -> None:
    base = PredictConfig(tile=64)
    assert settings_hash(base) == settings_hash(
        base.replace(threads=3, batch_size=16, model="other.safetensors", trace=True, parallel_batches=4)
    )
    assert settings_hash(base) != settings_hash(base.replace(tile=128))
    assert settings_hash(base) != settings_hash(base, resample="bilinear")
    with_crf = base.replace(crf=CrfConfig())
    assert settings_hash(with_crf) != settings_hash(base)
    assert settings_hash(with_crf) == settings_hash(base.replace(crf=CrfConfig(workers=3)))
    assert settings_hash(with_crf) != settings_hash(base.replace(crf=CrfConfig(iterations=5)))
    assert settings_hash(base, outputs=OutputOptions(stats=Path("{stem}.json"))) != settings_hash(base)


def test_local_cluster_one_single_threaded_worker_per_core_within_memory() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("with GPUs the local cluster has one worker per GPU")
    gib = 1 << 30
    assert local_cluster_size(100, cores=2, memory_bytes=24 * gib) == (2, 1)
    assert local_cluster_size(100, cores=16, memory_bytes=12 * gib) == (8, 2)  # memory caps the workers
    assert local_cluster_size(3, cores=16, memory_bytes=64 * gib) == (3, 5)  # never more than the scenes
    assert local_cluster_size(100, cores=8, memory_bytes=gib) == (1, 8)
    assert local_cluster_size(100, workers=3, cores=8, memory_bytes=64 * gib) == (3, 2)


def test_manifest_readable_after_a_writer_is_killed_mid_transaction(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_NAME
    with Manifest(path) as manifest:
        manifest.upsert("/a.tif", status="done", output="/out/a.tif")
    script = (
        "import sys, time\n"
        "from geoseg.manifest import Manifest\n"
        "m = Manifest(sys.argv[1])\n"
        "m._db.execute('BEGIN IMMEDIATE')\n"
        "m._db.execute(\"UPDATE scenes SET status = 'running', output = NULL\")\n"
        "m._db.execute(\"INSERT INTO scenes (input, status, updated_at) VALUES ('/b.tif', 'running', 0)\")\n"
        "print('mid-transaction', flush=True)\n"
        "time.sleep(120)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "mid-transaction"
        rows = read_manifest(path)  # readable while the writer holds its transaction
        assert [(r.input, r.status) for r in rows] == [("/a.tif", "done")]
    finally:
        writer.kill()
        writer.wait()
    rows = read_manifest(tmp_path)
    assert [(r.input, r.status, r.output) for r in rows] == [("/a.tif", "done", "/out/a.tif")]


def test_a_table_of_another_schema_is_not_a_manifest(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / MANIFEST_NAME
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE scenes (input TEXT PRIMARY KEY, foo TEXT)")
    with pytest.raises(OutputError, match="cannot open the batch manifest .not a geoseg manifest: .*no column"):
        Manifest(path)
    with sqlite3.connect(path) as db:  # left as it was
        assert [row[1] for row in db.execute("PRAGMA table_info(scenes)")] == ["input", "foo"]


def test_out_dir_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from geoseg.batch import OutDirLock\n"
        "OutDirLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=f"another geoseg batch is running .*pid {holder.pid} "):
            OutDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutDirLock(tmp_path):  # the OS released the dead holder's lock
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")


def test_cli_batch_refuses_a_locked_out_dir(
    runner: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scene = make_scene()
    (tmp_path / "out").mkdir()
    with OutDirLock(tmp_path / "out"):
        result = runner.invoke(
            main, ["batch", str(scene), "--out-dir", str(tmp_path / "out"), "--model", str(tiny_model_file)]
        )
    assert result.exit_code == 1, result.output
    assert f"another geoseg batch is running on this out dir (pid {os.getpid()} " in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "scene_landcover.tif").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--template", "{date}.tif"], "output template '{date}.tif': 'date'; it may use {stem}"),
        (["--template", "../{stem}.tif"], "must name a file inside the out dir"),
        (["--tile", "64", "--overlap", "32"], "must be less than half the tile 64"),
    ],
)
def test_cli_batch_bad_settings_are_one_line(
    runner: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path, extra: list[str], message: str
) -> None:
    scene = make_scene()
    result = runner.invoke(
        main,
        ["batch", str(scene), "--out-dir", str(tmp_path / "out"), "--model", str(tiny_model_file), *extra],
    )
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output


def test_batch_equals_predict_one_by_one_and_loads_the_model_once_per_worker(
    client: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scenes = make_scenes(make_scene, 5, width=100, height=90)
    config = PredictConfig(model=str(tiny_model_file), threads=1)
    summary = run_batch([str(tmp_path / "scene*.tif")], tmp_path / "out", config, client=client)
    assert (summary.done, summary.skipped, summary.failed, summary.ok) == (5, 0, 0, True)
    assert summary.megapixels == pytest.approx(5 * 100 * 90 / 1e6)

    rows = {r.input: r for r in read_manifest(tmp_path / "out")}
    assert set(rows) == {str(s) for s in scenes}
    for scene in scenes:
        out = tmp_path / "out" / f"{scene.stem}_landcover.tif"
        ref = predict_scene(scene, tmp_path / f"ref_{scene.name}", config)
        assert_same_raster(out, ref.dst)
        row = rows[str(scene)]
        assert (row.status, row.output, row.attempts, row.error) == ("done", str(out), 1, None)
        assert row.output_sha256 == file_sha256(out) and row.output_size == out.stat().st_size
        assert (row.input_size, row.input_mtime_ns) == (scene.stat().st_size, scene.stat().st_mtime_ns)
        assert row.model_sha256 == file_sha256(tiny_model_file)
        assert row.config_hash == settings_hash(config)
        assert (row.width, row.height) == (100, 90) and row.predict_seconds > 0
    # Once per worker, not once per scene: each worker process loaded it for its first scene only.
    loads_by_worker: dict[int, int] = {}
    for row in rows.values():
        loads_by_worker[row.worker_pid] = loads_by_worker.get(row.worker_pid, 0) + int(row.model_loaded)
    assert set(loads_by_worker.values()) == {1}
    assert len(loads_by_worker) <= 2
    assert no_temporaries(tmp_path / "out")


def test_resume_skips_done_scenes_and_redoes_changed_and_failed(
    client: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scenes = make_scenes(make_scene, 3)
    bad = corrupt_scene(tmp_path, scenes[0])
    out = tmp_path / "out"
    config = PredictConfig(model=str(tiny_model_file))
    inputs = [str(s) for s in [*scenes, bad]]

    first = run_batch(inputs, out, config, client=client)
    assert (first.done, first.skipped, first.failed, first.ok) == (3, 0, 1, False)
    rows = {r.input: r for r in read_manifest(out)}
    assert rows[str(bad)].status == "failed" and "corrupt.tif" in rows[str(bad)].error
    assert not (out / "corrupt_landcover.tif").exists()
    written = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("*_landcover.tif")}
    assert len(written) == 3

    second = run_batch(inputs, out, config, client=client)
    assert (second.done, second.skipped, second.failed) == (0, 3, 1)  # the failed scene was tried again
    after = {r.input: r for r in read_manifest(out)}
    for scene in scenes:
        row = after[str(scene)]
        assert row.status == "skipped"
        # No work redone: same worker, start time and output file as the first run.
        assert (row.worker_pid, row.started_at) == (rows[str(scene)].worker_pid, rows[str(scene)].started_at)
    assert after[str(bad)].started_at > rows[str(bad)].started_at
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("*_landcover.tif")} == written

    # A changed input and a fixed one are redone; the rest is still skipped.
    make_scene("scene1.tif", seed=99)
    make_scene("corrupt.tif", seed=7)
    third = run_batch(inputs, out, config, client=client)
    assert (third.done, third.skipped, third.failed, third.ok) == (2, 2, 0, True)
    assert_same_raster(
        out / "scene1_landcover.tif", predict_scene(scenes[1], tmp_path / "ref1.tif", config).dst
    )
    # Other settings redo everything; so does force.
    assert run_batch(inputs, out, config.replace(tile=96), client=client).done == 4
    assert run_batch(inputs, out, config.replace(tile=96), client=client).skipped == 4
    assert run_batch(inputs, out, config.replace(tile=96), client=client, force=True).done == 4


def test_extra_outputs_per_scene_from_templates_and_redone_when_asked_for(
    client: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scenes = make_scenes(make_scene, 2, width=80, height=70)
    out = tmp_path / "out"
    config = PredictConfig(model=str(tiny_model_file))
    inputs = [str(s) for s in scenes]
    assert run_batch(inputs, out, config, client=client).done == 2
    wanted = OutputOptions(stats=Path("{stem}_areas.json"), confidence=Path("conf/{stem}.tif"))
    (out / "conf").mkdir()
    summary = run_batch(inputs, out, config, client=client, outputs=wanted)
    assert summary.done == 2  # done before without these outputs: redone, not skipped
    for scene in scenes:
        ref_outputs = OutputOptions(stats=tmp_path / f"ref_{scene.stem}.json", confidence=tmp_path / f"refconf_{scene.stem}.tif")
        predict_scene(scene, tmp_path / f"ref_{scene.name}", config, outputs=ref_outputs)
        assert json.loads((out / f"{scene.stem}_areas.json").read_text())["classes"] == json.loads(
            ref_outputs.stats.read_text()
        )["classes"]
        assert_same_raster(out / "conf" / f"{scene.stem}.tif", ref_outputs.confidence)
    assert run_batch(inputs, out, config, client=client, outputs=wanted).skipped == 2

    # A template without a field would write one file for every scene: refused before any work.
    with pytest.raises(ConfigError, match="areas.json: written for"):
        run_batch(inputs, out, config, client=client, outputs=OutputOptions(stats=Path("areas.json")), force=True)


def test_outputs_that_the_batch_did_not_write_are_not_replaced(
    client: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scene = make_scene()
    out = tmp_path / "out"
    out.mkdir()
    (out / "scene_landcover.tif").write_bytes(b"someone else's file")
    other = make_scene("other.tif", seed=1)
    config = PredictConfig(model=str(tiny_model_file))
    stopped = run_batch([str(scene), str(other)], out, config, client=client, on_error="stop")
    assert (stopped.failed, stopped.done, stopped.not_run) == (1, 0, 1)  # stop: nothing runs after a failure
    assert "exists but this out dir's manifest did not write it" in stopped.failures[0][1]
    summary = run_batch([str(scene), str(other)], out, config, client=client)
    assert (summary.failed, summary.done) == (1, 1)
    assert (out / "scene_landcover.tif").read_bytes() == b"someone else's file"


def test_extra_outputs_not_written_by_the_batch_are_kept_and_missing_ones_redone(
    client: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scenes = make_scenes(make_scene, 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "scene0_areas.json").write_text("a user's file")
    config = PredictConfig(model=str(tiny_model_file))
    wanted = OutputOptions(stats=Path("{stem}_areas.json"), vector=Path("{stem}.geojson"))
    inputs = [str(s) for s in scenes]
    first = run_batch(inputs, out, config, client=client, outputs=wanted)
    assert (first.done, first.failed) == (1, 1)
    assert first.failures == [
        (inputs[0], f"{out / 'scene0_areas.json'}: exists but this out dir's manifest did not write it; "
         "move it or use --force")
    ]
    assert (out / "scene0_areas.json").read_text() == "a user's file"
    assert not (out / "scene0_landcover.tif").exists() and not (out / "scene0.geojson").exists()
    row = {r.input: r for r in read_manifest(out)}[inputs[1]]
    assert row.extra_output_sizes() == {
        str(out / "scene1_areas.json"): (out / "scene1_areas.json").stat().st_size,
        str(out / "scene1.geojson"): (out / "scene1.geojson").stat().st_size,
    }

    # A deleted extra output makes its scene be redone; the user's file is still refused.
    (out / "scene1.geojson").unlink()
    second = run_batch(inputs, out, config, client=client, outputs=wanted)
    assert (second.done, second.skipped, second.failed) == (1, 0, 1)
    assert json.loads((out / "scene1.geojson").read_text())["features"]
    (out / "scene0_areas.json").unlink()
    third = run_batch(inputs, out, config, client=client, outputs=wanted)
    assert (third.done, third.skipped, third.failed) == (1, 1, 0)
    assert json.loads((out / "scene0_areas.json").read_text())["classes"]
    assert no_temporaries(out)

    # Two templates giving one name: the hint says so (both have {stem}).
    with pytest.raises(ConfigError, match="two output templates give the same name"):
        run_batch(inputs, out, config, client=client, outputs=OutputOptions(stats=Path("{stem}_landcover.tif")))


def test_on_error_stop_leaves_the_rest_for_the_next_run(
    client: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scenes = make_scenes(make_scene, 6, width=384, height=384)
    bad = corrupt_scene(tmp_path, scenes[0])
    inputs = [str(bad), *map(str, scenes)]  # the corrupt scene is submitted first
    out = tmp_path / "out"
    config = PredictConfig(model=str(tiny_model_file))
    stopped = run_batch(inputs, out, config, client=client, on_error="stop")
    assert not stopped.ok and stopped.total == 7 and stopped.not_run >= 1
    # Only the corrupt scene failed: a scene running at the stop finished and is recorded done.
    assert stopped.failed == 1 and stopped.done + stopped.not_run == 6
    rows = {r.input: r for r in read_manifest(out)}
    assert rows[str(bad)].status == "failed"
    statuses = [rows[str(s)].status for s in scenes]
    assert statuses.count("queued") == stopped.not_run  # never started: left for the next run
    assert statuses.count("done") == stopped.done
    for scene in scenes:
        output = out / f"{scene.stem}_landcover.tif"
        assert output.exists() == (rows[str(scene)].status == "done")
        if output.exists():
            assert rows[str(scene)].output_sha256 == file_sha256(output)
    assert no_temporaries(out)

    rest = run_batch(inputs, out, config, client=client)
    assert (rest.done, rest.skipped, rest.failed) == (6 - stopped.done, stopped.done, 1)


def test_a_killed_driver_leaves_a_manifest_the_next_run_completes(
    client: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scenes = make_scenes(make_scene, 6, width=384, height=384)
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "geoseg",
            "batch",
            str(tmp_path / "scene*.tif"),
            "--out-dir",
            str(out),
            "--scheduler",
            client.scheduler.address,
            "--model",
            str(tiny_model_file),
            "-q",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    crashed: dict[str, str] = {}
    deadline = time.monotonic() + CLUSTER_TIMEOUT_S
    while driver.poll() is None and time.monotonic() < deadline:
        try:
            crashed = {r.input: r.status for r in read_manifest(out)}
        except OutputError:  # not created yet
            crashed = {}
        if "running" in crashed.values():
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    driver.wait()
    assert driver.returncode == -signal.SIGKILL
    crashed = {r.input: r.status for r in read_manifest(out)}  # readable right after the crash
    unfinished = [scene for scene, status in crashed.items() if status in ("queued", "running")]
    assert unfinished

    config = PredictConfig(model=str(tiny_model_file))
    summary = run_batch([str(s) for s in scenes], out, config, client=client)
    assert summary.ok and summary.done + summary.skipped == 6 and summary.done >= len(unfinished)
    rows = {r.input: r for r in read_manifest(out)}
    assert all(rows[scene].status == "done" for scene in unfinished)
    for scene in scenes:
        assert_same_raster(
            out / f"{scene.stem}_landcover.tif",
            predict_scene(scene, tmp_path / f"ref_{scene.name}", config).dst,
        )
    assert no_temporaries(out)


def test_killed_worker_scene_is_retried_once_then_failed(
    client: Any, tmp_path: Path, make_scene: Any, make_model_file: Any
) -> None:
    # A full-width B0 on 768 px scenes: seconds per scene, long enough to kill a worker mid-scene.
    model = make_model_file("b0.safetensors", arch_overrides={})
    once, twice = (
        make_scene("once.tif", width=768, height=768, seed=1),
        make_scene("twice.tif", width=768, height=768, seed=2),
    )
    out = tmp_path / "out"
    config = PredictConfig(model=str(model))
    result: dict[str, Any] = {}
    batch = threading.Thread(
        target=lambda: result.update(summary=run_batch([str(once), str(twice)], out, config, client=client))
    )
    batch.start()
    kills = {str(once): 1, str(twice): 2}
    killed: dict[str, list[int]] = {str(once): [], str(twice): []}
    deadline = time.monotonic() + 2 * CLUSTER_TIMEOUT_S
    while batch.is_alive() and time.monotonic() < deadline:
        rows = read_manifest(out) if (out / MANIFEST_NAME).exists() else []
        for row in rows:
            pids = killed[row.input]
            # Kill each attempt of the scene once, while the manifest shows it running there.
            if row.status == "running" and len(pids) < kills[row.input] and row.attempts == len(pids) + 1:
                os.kill(row.worker_pid, signal.SIGKILL)
                pids.append(row.worker_pid)
        time.sleep(0.05)
    batch.join(timeout=CLUSTER_TIMEOUT_S)
    assert not batch.is_alive()
    assert [len(killed[str(once)]), len(killed[str(twice)])] == [1, 2]

    summary = result["summary"]
    assert (summary.done, summary.failed) == (1, 1)
    rows = {r.input: r for r in read_manifest(out)}
    assert (rows[str(once)].status, rows[str(once)].attempts) == ("done", 2)
    assert rows[str(once)].worker_pid not in killed[str(once)]
    assert_same_raster(out / "once_landcover.tif", predict_scene(once, tmp_path / "ref.tif", config).dst)
    assert (
        rows[str(twice)].status == "failed"
        and "worker died during prediction 2 times" in rows[str(twice)].error
    )
    assert not (out / "twice_landcover.tif").exists()
    assert no_temporaries(out)  # the killed attempts' temporary files are cleaned up


def test_a_finished_scene_is_not_predicted_again_when_its_worker_dies_later(
    client: Any, tmp_path: Path, make_scene: Any, make_model_file: Any
) -> None:
    # dask reruns a task whose result was on a dead worker, if the driver still holds its future.
    model = make_model_file("b0.safetensors", arch_overrides={})
    scenes = [make_scene(f"s{i}.tif", width=768, height=768, seed=i) for i in range(3)]
    out = tmp_path / "out"
    config = PredictConfig(model=str(model))
    result: dict[str, Any] = {}
    batch = threading.Thread(
        target=lambda: result.update(summary=run_batch([str(s) for s in scenes], out, config, client=client))
    )
    batch.start()
    finished: dict[str, Any] = {}  # the scene done on the worker that was killed: its row and output
    deadline = time.monotonic() + 2 * CLUSTER_TIMEOUT_S
    while batch.is_alive() and not finished and time.monotonic() < deadline:
        rows = read_manifest(out) if (out / MANIFEST_NAME).exists() else []
        done = {r.worker_pid: r for r in rows if r.status == "done"}
        for row in rows:
            if row.status == "running" and row.worker_pid in done:  # its worker finished a scene before
                finished.update(row=done[row.worker_pid], stat=os.stat(done[row.worker_pid].output))
                os.kill(row.worker_pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    batch.join(timeout=CLUSTER_TIMEOUT_S)
    assert not batch.is_alive() and finished, "no worker ran a second scene"
    assert (result["summary"].done, result["summary"].failed) == (3, 0)
    before, stat = finished["row"], finished["stat"]
    after = {r.input: r for r in read_manifest(out)}[before.input]
    assert (after.worker_pid, after.finished_at, after.attempts) == (before.worker_pid, before.finished_at, 1)
    now = os.stat(before.output)
    assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not rewritten
    assert no_temporaries(out)


@pytest.mark.parametrize(
    ("signum", "group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],  # a job scheduler's stop; a terminal's Ctrl-C
    ids=["sigterm", "ctrl-c"],
)
def test_cli_batch_stopped_by_a_signal_says_what_it_left_and_removes_temporaries(
    tmp_path: Path, make_scene: Any, make_model_file: Any, signum: int, group: bool
) -> None:
    model = make_model_file("b0.safetensors", arch_overrides={})
    for i in range(3):
        make_scene(f"s{i}.tif", width=768, height=768, seed=i)
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-m", "geoseg", "batch", str(tmp_path / "s*.tif"), "--out-dir", str(out),
         "--workers", "1", "--model", str(model)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=group,
    )
    deadline = time.monotonic() + CLUSTER_TIMEOUT_S
    while driver.poll() is None and time.monotonic() < deadline:
        rows = read_manifest(out) if (out / MANIFEST_NAME).exists() else []
        if any(r.status == "running" for r in rows):
            # Ctrl-C reaches the workers too (the whole process group): they must leave it to the driver
            os.killpg(driver.pid, signum) if group else driver.send_signal(signum)
            break
        time.sleep(0.05)
    _, stderr = driver.communicate(timeout=CLUSTER_TIMEOUT_S)
    assert driver.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr, stderr
    rows = read_manifest(out)
    done = sum(r.status == "done" for r in rows)
    assert f"interrupted: {done} of 3 scenes done in this run (0 done before), 0 failed, {3 - done} left for the next run" in stderr
    assert done < 3 and no_temporaries(out)  # the interrupted scene's temporary file is gone


def test_cli_batch_local_cluster_reports_a_failing_scene(
    runner: Any, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scene = make_scene()
    bad = corrupt_scene(tmp_path, scene)
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"{scene.name}\n{bad.name}\n")
    result = runner.invoke(
        main,
        [
            "batch",
            f"@{listing}",
            "--out-dir",
            str(tmp_path / "out"),
            "--workers",
            "1",
            "--model",
            str(tiny_model_file),
            "--template",
            "maps/{stem}.class.tif",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["scenes", "done", "skipped"])
    assert lines[header + 1].split()[:5] == ["2", "1", "0", "1", "0"]
    assert any(line.startswith("failed: ") and "corrupt.tif" in line for line in lines)
    assert lines[-1] == f"Error: 1 of 2 scenes not done; see {tmp_path / 'out' / MANIFEST_NAME}"
    assert_same_raster(
        tmp_path / "out" / "maps" / "scene.class.tif",
        predict_scene(scene, tmp_path / "ref.tif", PredictConfig(model=str(tiny_model_file))).dst,
    )


@pytest.fixture
def external_cluster(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` and ``dask worker`` (2 processes) started as processes; yields the address."""
    from distributed import Client

    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    }
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes = [scheduler]
    try:
        deadline = time.monotonic() + CLUSTER_TIMEOUT_S
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                "--scheduler-file",
                str(scheduler_file),
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--local-directory",
                str(tmp_path / "dask"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(workers)
        with Client(scheduler_file=str(scheduler_file), timeout=CLUSTER_TIMEOUT_S) as probe:
            probe.wait_for_workers(2, timeout=CLUSTER_TIMEOUT_S)
            address = probe.scheduler.address
        yield address
    finally:
        if scheduler_file.exists():
            try:
                with Client(scheduler_file=str(scheduler_file), timeout=30) as stopper:
                    stopper.shutdown()  # the scheduler closes its workers: quicker than signals
            except (OSError, TimeoutError):
                pass
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_cli_batch_on_an_existing_scheduler(
    runner: Any, external_cluster: str, tmp_path: Path, make_scene: Any, tiny_model_file: Path
) -> None:
    scenes = make_scenes(make_scene, 3)
    args = [
        "batch",
        str(tmp_path / "scene*.tif"),
        "--out-dir",
        str(tmp_path / "out"),
        "--scheduler",
        external_cluster,
        "--model",
        str(tiny_model_file),
        "--tile",
        "64",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    config = PredictConfig(model=str(tiny_model_file), tile=64)
    for scene in scenes:
        assert_same_raster(
            tmp_path / "out" / f"{scene.stem}_landcover.tif",
            predict_scene(scene, tmp_path / f"ref_{scene.name}", config).dst,
        )
    rows = read_manifest(tmp_path / "out")
    assert {r.status for r in rows} == {"done"}
    assert len({r.worker for r in rows}) <= 2 and all(r.worker.startswith("tcp://127.0.0.1:") for r in rows)
    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    assert {r.status for r in read_manifest(tmp_path / "out")} == {"skipped"}
