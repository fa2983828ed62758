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
    LOCK_NAME,
    BatchSummary,
    OutDirLock,
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
    return not [p for p in folder.iterdir() if TMP_MARKER in p.name]


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
        (["--tile", "16"], "tile must be an integer of at least 32 pixels"),
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
    rows = {r.input: r for r in read_manifest(out)}
    assert rows[str(bad)].status == "failed"
    statuses = [rows[str(s)].status for s in scenes]
    assert statuses.count("queued") == stopped.not_run  # never started: left for the next run
    assert statuses.count("done") == stopped.done
    for scene in scenes:
        if rows[str(scene)].status == "queued":
            assert not (out / f"{scene.stem}_landcover.tif").exists()

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
