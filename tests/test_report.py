"""The static HTML report (geoseg.report, ``geoseg predict --report``), checked in headless Chromium."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from geoseg.config import PredictConfig
from geoseg.outputs import OutputOptions
from geoseg.pipeline import predict_scene
from geoseg.report import QUICKLOOK_PX, quicklook_shape, write_report
from geoseg.stats import count_raster

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def read_png(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # quicklooks are plain pictures
        with rasterio.open(path) as src:
            assert src.driver == "PNG"
            return src.read()


@pytest.fixture
def predicted(make_scene: Any, tiny_loaded_model: Any, tmp_path: Path) -> dict[str, Any]:
    """A tiny prediction with a nodata corner, and its report."""
    rng = np.random.default_rng(0)
    data = rng.integers(100, 4000, (4, 80, 96)).astype(np.uint16)
    invalid = np.zeros((80, 96), bool)
    invalid[:16, :24] = True
    scene = make_scene(data=data, nodata=0, invalid=invalid)
    dst, report = tmp_path / "out.tif", tmp_path / "report"
    predict_scene(scene, dst, PredictConfig(), model=tiny_loaded_model, outputs=OutputOptions(report=report))
    return {"scene": scene, "dst": dst, "report": report, "invalid": invalid, "model": tiny_loaded_model}


def test_report_quicklooks_and_table(predicted: dict[str, Any]) -> None:
    report, dst, invalid = predicted["report"], predicted["dst"], predicted["invalid"]
    classes = predicted["model"].metadata.classes
    assert sorted(p.name for p in report.iterdir()) == ["classes.png", "index.html", "scene.png"]
    with rasterio.open(dst) as ds:
        labels = ds.read(1)
    # Small raster: quicklooks at full size, class colours where classes are, transparent nodata.
    class_png = read_png(report / "classes.png")
    assert class_png.shape == (4, 80, 96)
    colours = {c.id: c.rgba for c in classes}
    for value in np.unique(labels[~invalid]):
        where = labels == value
        assert (class_png[:, where].T == np.array(colours[int(value)], np.uint8)).all()
    assert (class_png[3, invalid] == 0).all()
    scene_png = read_png(report / "scene.png")
    assert scene_png.shape == (4, 80, 96)
    assert (scene_png[3, invalid] == 0).all() and (scene_png[3, ~invalid] == 255).all()
    # A 2-98 % stretch: about 2 % of the valid pixels black and 2 % white in each channel.
    for channel in scene_png[:3]:
        assert 0.01 < np.mean(channel[~invalid] == 0) < 0.04
        assert 0.01 < np.mean(channel[~invalid] == 255) < 0.04
    page = (report / "index.html").read_text()
    for row in count_raster(dst, classes):
        assert html.escape(row.name) in page
        assert f"<td>{row.id}</td><td>{html.escape(row.name)}</td><td>{row.pixels:,}</td>" in page
    assert 'src="classes.png"' in page and 'src="scene.png"' in page
    assert "<script" not in page
    assert list(report.parent.glob(".*")) == []


def test_quicklook_of_a_large_raster_is_decimated(tmp_path: Path, tiny_metadata: Any) -> None:
    from geoseg.io import open_scene

    height, width = 3000, 1200
    assert quicklook_shape(height, width) == (QUICKLOOK_PX, round(1200 * QUICKLOOK_PX / 3000))
    labels = np.ones((height, width), np.uint8)
    labels[:, 600:] = 2
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint8", "nodata": 255,
               "crs": "EPSG:32618", "transform": Affine(10, 0, 0, 0, -10, 0)}
    raster = tmp_path / "classes.tif"
    with rasterio.open(raster, "w", **profile) as dst:
        dst.write(labels, 1)
    scene_path = tmp_path / "scene.tif"
    with rasterio.open(scene_path, "w", **(profile | {"count": 4, "dtype": "uint16", "nodata": None})) as dst:
        dst.write(np.broadcast_to(np.arange(width, dtype=np.uint16), (4, height, width)))
    metadata = tiny_metadata()
    scene = open_scene(scene_path, metadata)
    write_report(tmp_path / "report", raster, scene, metadata)
    class_png = read_png(tmp_path / "report" / "classes.png")
    assert class_png.shape == (4, QUICKLOOK_PX, 410)
    assert (class_png[:3, :, :200].T == (0, 0, 255)).all() and (class_png[:3, :, -200:].T == (0, 170, 0)).all()
    scene_png = read_png(tmp_path / "report" / "scene.png")
    assert scene_png.shape == (4, QUICKLOOK_PX, 410)
    assert (np.diff(scene_png[0, 0].astype(int)) >= 0).all()  # the column ramp survives, brighter to the east


def test_report_renders_in_headless_chromium(predicted: dict[str, Any], tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); CI installs Debian's chromium")
    report = predicted["report"]
    # A copy of the page beside it (same relative links) that, once everything has loaded, writes
    # each image's decoded size into the DOM, which --dump-dom prints.
    probe = report / "probe.html"
    script = (
        "<script>window.addEventListener('load', () => { const out = document.createElement('pre');"
        " out.id = 'probe'; out.textContent = Array.from(document.images).map("
        "i => i.getAttribute('src') + '=' + i.complete + ':' + i.naturalWidth + 'x' + i.naturalHeight).join(' ');"
        " document.body.appendChild(out); });</script>"
    )
    probe.write_text((report / "index.html").read_text().replace("</body>", script + "</body>"))
    result = subprocess.run(
        [chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="probe">([^<]*)</pre>', result.stdout)
    assert found, result.stdout[-2000:]
    assert sorted(found.group(1).split()) == ["classes.png=true:96x80", "scene.png=true:96x80"]
    assert "Area by class" in result.stdout


def test_report_destination_errors(runner: Any, make_scene: Any, tiny_model_file: Path, tmp_path: Path) -> None:
    from geoseg.cli import main

    scene = make_scene()
    out = tmp_path / "out.tif"
    base = ["predict", str(scene), str(out), "--model", str(tiny_model_file), "-q"]
    existing = tmp_path / "report"
    existing.mkdir()
    (existing / "old.txt").write_text("old")
    result = runner.invoke(main, [*base, "--report", str(existing)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {existing}: already exists (use --overwrite to replace it)"
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = runner.invoke(main, [*base, "--report", str(a_file), "--overwrite"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {a_file}: exists and is not a folder; the report is a folder"
    result = runner.invoke(main, [*base, "--report", str(tmp_path / "no" / "report")])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert not out.exists()
    # --overwrite replaces an earlier report once the new one is complete.
    (existing / "old.txt").unlink()
    for name in ("index.html", "classes.png", "scene.png"):
        (existing / name).write_text("an earlier report")
    result = runner.invoke(main, [*base, "--report", str(existing), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in existing.iterdir()) == ["classes.png", "index.html", "scene.png"]
    assert "an earlier report" not in (existing / "index.html").read_text()
    assert [p.name for p in tmp_path.glob(".*")] == []


def test_report_overwrite_never_deletes_other_files(
    runner: Any, make_scene: Any, tiny_model_file: Path, tmp_path: Path
) -> None:
    """--overwrite replaces only an earlier report: a folder holding anything else, DST or the
    input is refused before any work, and nothing in it is touched."""
    from geoseg.cli import main

    scene = make_scene()
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "thesis.docx").write_text("years of work")
    (results / "index.html").write_text("not ours")
    out = tmp_path / "out.tif"
    model = ["--model", str(tiny_model_file), "-q", "--overwrite"]

    result = runner.invoke(main, ["predict", str(scene), str(out), "--report", str(results), *model])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {results}: holds sub, thesis.docx, so it is not an earlier geoseg report; "
        "--overwrite replaces only a report folder; choose another folder"
    )
    assert sorted(p.name for p in results.iterdir()) == ["index.html", "sub", "thesis.docx"]
    assert not out.exists()  # refused before any work

    # The report folder holds DST (not yet written) or the input scene: refused even when empty otherwise.
    holder = tmp_path / "holder"
    holder.mkdir()
    inside = holder / "lc.tif"
    result = runner.invoke(main, ["predict", str(scene), str(inside), "--report", str(holder), *model])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {holder}: holds the class raster {inside}; give the report a folder of its own"
    )
    assert not inside.exists()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    moved = shutil.copy(scene, inputs / "scene.tif")
    result = runner.invoke(main, ["predict", str(moved), str(out), "--report", str(inputs), *model])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {inputs}: holds the input {moved}; give the report a folder of its own"
    assert sorted(p.name for p in inputs.iterdir()) == ["scene.tif"] and not out.exists()


@pytest.mark.parametrize("folder", [".", "..", "/"])
def test_report_odd_folders_are_one_line_errors(
    folder: str, runner: Any, make_scene: Any, tiny_model_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from geoseg.cli import main

    scene = make_scene()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "lc.tif"
    result = runner.invoke(main, ["predict", str(scene), str(out), "--model", str(tiny_model_file), "-q",
                                  "--report", folder, "--overwrite"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {folder}: ") and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and work.is_dir()
