"""Streamed extra outputs: COG class rasters, probability and confidence rasters, class-area statistics."""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

import geoseg.io
import geoseg.pipeline
from geoseg.cli import main
from geoseg.config import PredictConfig
from geoseg.errors import ConfigError, OutputError
from geoseg.modelfile import ClassSpec, Normalization
from geoseg.outputs import OutputOptions
from geoseg.pipeline import predict_scene
from geoseg.stats import ClassAreaCounter, count_raster
from geoseg.stream import softmax

# make_scene's uint16 pixels are uniform in 1..10000: centred, so a random 1x1 conv picks every class
CENTRED = Normalization("meanstd", mean=(5000.0,) * 4, std=(2900.0,) * 4)


def predict(src: Path, dst: Path, model: Any, outputs: OutputOptions, **config: Any) -> Any:
    # fp32: ``auto`` is bf16 on CPUs with native bf16, and these tests compare with fp32 references.
    config = {"device": "cpu", "precision": "fp32", "tile": 64, "overlap": 16} | config
    overwrite = config.pop("overwrite", False)
    return predict_scene(src, dst, PredictConfig(**config), model=model, outputs=outputs, overwrite=overwrite)


def nodata_border(height: int, width: int) -> np.ndarray:
    """True where invalid: a ragged left border and a hole."""
    invalid = np.zeros((height, width), bool)
    for y in range(height):
        invalid[y, : (y * 7) % 23] = True
    invalid[height // 3 : height // 2, width // 2 : width // 2 + 20] = True
    return invalid


def reference_probabilities(loaded: Any, raw: np.ndarray) -> np.ndarray:
    """Softmax of a pointwise model applied to the whole image at once: ``(K, H, W)``."""
    mul, bias = loaded.metadata.normalization.multiplier_and_bias()
    x = raw.astype(np.float32) * np.asarray(mul, np.float32)[:, None, None] + np.asarray(bias, np.float32)[:, None, None]
    with torch.no_grad():
        logits = loaded.module(torch.from_numpy(x)[None])[0].numpy()
    return softmax(logits.copy())


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".geoseg-tmp" in p.name or p.name.endswith(".tmp"))


def category_names(path: Path) -> list[str]:
    band = ET.parse(f"{path}.aux.xml").getroot().find("PAMRasterBand")
    return [c.text or "" for c in band.find("CategoryNames")]


# --- COG ------------------------------------------------------------------------------------------------------


def test_cog_class_raster_has_mode_overviews_with_names_and_colours_at_every_level(
    tmp_path: Path, make_scene, tiny_loaded_model
) -> None:
    src = make_scene(width=600, height=520)
    dst = tmp_path / "classes.tif"
    predict(src, dst, tiny_loaded_model, OutputOptions(), cog=True)

    valid, errors, warnings = cogeo().cog_validate(str(dst), strict=True)
    assert valid and not errors and not warnings, (errors, warnings)
    classes = tiny_loaded_model.metadata.classes
    with rasterio.open(dst) as full, rasterio.open(src) as scene:
        assert full.crs == scene.crs and full.transform == scene.transform and full.shape == scene.shape
        assert full.overviews(1) == [2, 4]
        assert full.profile["compress"] == "deflate" and full.block_shapes[0] == (256, 256)
        labels = full.read(1)
        colormap = full.colormap(1)
        assert full.tags()["GEOSEG_MODEL"] == tiny_loaded_model.metadata.name
    assert category_names(dst)[1:4] == [c.name for c in classes]
    levels = []
    for level in range(2):
        with rasterio.open(dst, overview_level=level) as ov:
            assert ov.shape == (520 // 2 ** (level + 1), 600 // 2 ** (level + 1))
            assert ov.nodata == 255 and ov.dtypes == ("uint8",)
            assert ov.colormap(1) == colormap, "the colour table is the same at every level"
            assert {ov.tags()[f"CLASS_{c.id}"] for c in classes} == {c.name for c in classes}
            levels.append(ov.read(1))
    assert set(np.unique(levels[1])) <= {c.id for c in classes}

    # Mode resampling: where 3 or 4 of a 2x2 block share a class, the overview pixel is that class.
    # Nearest would take the top-left pixel and average would mix ids; both fail these blocks.
    blocks = labels.reshape(260, 2, 300, 2).transpose(0, 2, 1, 3).reshape(260, 300, 4)
    counts = np.stack([(blocks == c.id).sum(axis=2) for c in classes])
    majority = counts.max(axis=0) >= 3
    expected = np.array([c.id for c in classes])[counts.argmax(axis=0)]
    top_left_differs = majority & (blocks[..., 0] != expected)
    assert top_left_differs.sum() > 20, "the scene must have blocks that tell mode from nearest"
    np.testing.assert_array_equal(levels[0][majority], expected[majority])


def test_cog_keeps_nodata_out_of_overviews(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    invalid = np.zeros((300, 300), bool)
    invalid[:, :150] = True
    src = make_scene(width=300, height=300, nodata=0, invalid=invalid)
    dst = tmp_path / "classes.tif"
    predict(src, dst, tiny_loaded_model, OutputOptions(), cog=True)
    assert cogeo().cog_validate(str(dst))[0]
    with rasterio.open(dst, overview_level=0) as ov:
        half = ov.read(1)
    assert (half[:, :75] == 255).all() and (half[:, 75:] != 255).all()


# --- probabilities and confidence ----------------------------------------------------------------------------


def test_uint8_probabilities_and_confidence(tmp_path: Path, make_scene, tiny_metadata, pointwise_model) -> None:
    height, width = 150, 170
    invalid = nodata_border(height, width)
    src = make_scene(width=width, height=height, nodata=0, invalid=invalid)
    model = pointwise_model(tiny_metadata(normalization=CENTRED))
    dst, probs_path, conf_path = tmp_path / "classes.tif", tmp_path / "probs.tif", tmp_path / "conf.tif"
    predict(src, dst, model, OutputOptions(probabilities=probs_path, confidence=conf_path))

    classes = model.metadata.classes
    with rasterio.open(src) as scene:
        raw = scene.read()
        grid = (scene.crs, scene.transform, scene.shape)
    with rasterio.open(dst) as ds:
        labels = ds.read(1)
    with rasterio.open(probs_path) as ds:
        assert (ds.crs, ds.transform, ds.shape) == grid
        assert ds.count == 3 and ds.dtypes == ("uint8",) * 3 and ds.nodata is None
        assert ds.descriptions == tuple(c.name for c in classes)
        assert [ds.tags(b)["CLASS_ID"] for b in (1, 2, 3)] == [str(c.id) for c in classes]
        assert ds.scales == pytest.approx((1 / 255,) * 3)
        assert ds.profile["tiled"] and ds.profile["compress"] == "deflate"
        assert ds.tags()["GEOSEG_MODEL_SHA256"] == "test"
        probs = ds.read().astype(int)
        mask = ds.dataset_mask() > 0
    with rasterio.open(conf_path) as ds:
        assert (ds.crs, ds.transform, ds.shape) == grid
        assert ds.count == 1 and ds.dtypes == ("uint8",) and ds.nodata == 0
        confidence = ds.read(1).astype(int)

    valid = ~invalid
    np.testing.assert_array_equal(mask, valid)
    np.testing.assert_array_equal(labels != 255, valid)
    assert (probs[:, invalid] == 0).all() and (confidence[invalid] == 0).all()
    sums = probs.sum(axis=0)[valid]
    assert np.abs(sums - 255).max() <= len(classes) / 2, "rounding keeps each pixel's bands within K/2 of 255"
    expected = np.rint(reference_probabilities(model, raw) * 255).astype(int)
    np.testing.assert_allclose(probs[:, valid], expected[:, valid], atol=1)
    np.testing.assert_array_equal(confidence[valid], probs.max(axis=0)[valid])
    assert confidence[valid].min() >= 255 // len(classes)
    unique_top = (probs == probs.max(axis=0)).sum(axis=0) == 1
    ids = np.array([c.id for c in classes])
    np.testing.assert_array_equal(ids[probs.argmax(axis=0)][valid & unique_top], labels[valid & unique_top])


def test_float32_probabilities_equal_the_softmax_and_cog_overviews_average(
    tmp_path: Path, make_scene, tiny_metadata, pointwise_model
) -> None:
    height, width = 300, 280
    invalid = np.zeros((height, width), bool)
    invalid[:40] = True
    src = make_scene(width=width, height=height, nodata=0, invalid=invalid)
    model = pointwise_model(tiny_metadata(normalization=CENTRED))
    probs_path, conf_path = tmp_path / "probs.tif", tmp_path / "conf.tif"
    predict(src, tmp_path / "classes.tif", model,
            OutputOptions(probabilities=probs_path, confidence=conf_path, probabilities_dtype="float32"), cog=True)

    for path in (probs_path, conf_path, tmp_path / "classes.tif"):
        valid, errors, warnings = cogeo().cog_validate(str(path), strict=True)
        assert valid and not errors and not warnings, (path, errors, warnings)
    with rasterio.open(src) as scene:
        reference = reference_probabilities(model, scene.read())
    with rasterio.open(probs_path) as ds:
        assert ds.dtypes == ("float32",) * 3 and math.isnan(ds.nodata) and ds.overviews(1) == [2]
        probs = ds.read()
    with rasterio.open(probs_path, overview_level=0) as ov:
        overview = ov.read()
    with rasterio.open(conf_path) as ds:
        assert ds.dtypes == ("float32",) and math.isnan(ds.nodata)
        confidence = ds.read(1)
    assert np.isnan(probs[:, :40]).all() and np.isnan(confidence[:40]).all()
    np.testing.assert_allclose(probs[:, 40:], reference[:, 40:], atol=1e-5)
    np.testing.assert_allclose(probs[:, 40:].sum(axis=0), 1, atol=1e-5)
    np.testing.assert_array_equal(confidence[40:], probs[:, 40:].max(axis=0))
    # Average resampling: each overview pixel is the mean of its 2x2 block (fully valid rows only).
    means = probs[:, 40:].reshape(3, 130, 2, 140, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(overview[:, 20:], means, atol=1e-5)


def test_probability_cog_keeps_its_mask(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    invalid = np.zeros((280, 300), bool)
    invalid[:, 200:] = True
    src = make_scene(width=300, height=280, nodata=0, invalid=invalid)
    probs_path = tmp_path / "probs.tif"
    predict(src, tmp_path / "classes.tif", tiny_loaded_model, OutputOptions(probabilities=probs_path), cog=True)
    valid, errors, warnings = cogeo().cog_validate(str(probs_path), strict=True)
    assert valid and not errors and not warnings, (errors, warnings)
    with rasterio.open(probs_path) as ds:
        np.testing.assert_array_equal(ds.dataset_mask() > 0, ~invalid)
        assert ds.descriptions == tuple(c.name for c in tiny_loaded_model.metadata.classes)
    with rasterio.open(probs_path, overview_level=0) as ov:
        mask = ov.dataset_mask() > 0
        sums = ov.read().astype(int).sum(axis=0)
    assert mask[:, :100].all() and not mask[:, 100:].any()
    assert np.abs(sums[mask] - 255).max() <= 3


# --- statistics -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_stats_match_a_numpy_count_of_the_class_raster(
    tmp_path: Path, make_scene, tiny_loaded_model, suffix: str
) -> None:
    height, width = 130, 150
    invalid = nodata_border(height, width)
    src = make_scene(width=width, height=height, nodata=0, invalid=invalid)
    dst, stats_path = tmp_path / "classes.tif", tmp_path / f"areas{suffix}"
    predict(src, dst, tiny_loaded_model, OutputOptions(stats=stats_path))
    with rasterio.open(dst) as ds:
        labels = ds.read(1)
    classes = tiny_loaded_model.metadata.classes
    counts = {c.id: int((labels == c.id).sum()) for c in classes}
    valid_pixels = int((~invalid).sum())
    assert sum(counts.values()) == valid_pixels
    pixel_m2 = 10.0 * 10.0  # conftest's DEFAULT_TRANSFORM: 10 m pixels in UTM

    if suffix == ".json":
        doc = json.loads(stats_path.read_text())
        assert doc["crs"] == "EPSG:32618" and doc["pixel_size"] == [10.0, 10.0] and doc["pixel_size_unit"] == "metre"
        assert doc["model"] == tiny_loaded_model.metadata.name and doc["scene"] == str(src) and doc["aoi"] is None
        assert doc["valid_pixels"] == valid_pixels
        assert doc["area_m2"] == pytest.approx(valid_pixels * pixel_m2)
        assert doc["hectares"] == pytest.approx(valid_pixels * pixel_m2 / 1e4)
        rows = doc["classes"]
        assert [r["name"] for r in rows] == [c.name for c in classes]
    else:
        with stats_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        total = rows.pop()
        assert total["name"] == "total" and total["id"] == ""
        assert int(total["pixels"]) == valid_pixels and float(total["percent"]) == pytest.approx(100)
        assert float(total["hectares"]) == pytest.approx(valid_pixels * pixel_m2 / 1e4)
    for row in rows:
        n = counts[int(row["id"])]
        assert int(row["pixels"]) == n
        assert float(row["area_m2"]) == pytest.approx(n * pixel_m2, abs=0.01)
        assert float(row["hectares"]) == pytest.approx(n * pixel_m2 / 1e4, abs=1e-4)
        assert float(row["percent"]) == pytest.approx(100 * n / valid_pixels, abs=1e-4)
    assert {c.id: c.pixels for c in count_raster(dst, classes)} == counts, "the same figures from the file"
    assert temporary_files(tmp_path) == []


def test_a_scene_without_a_crs_has_pixel_counts_but_no_areas(
    tmp_path: Path, make_scene, tiny_loaded_model
) -> None:
    # Its transform may be in any unit (or the identity): no m², no hectares, shares of pixels.
    import warnings

    src = make_scene(width=60, height=40, crs=None)
    outputs = OutputOptions(stats=tmp_path / "a.json", report=tmp_path / "report")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing CRS's own warning
        predict(src, tmp_path / "classes.tif", tiny_loaded_model, outputs)
        predict(src, tmp_path / "classes2.tif", tiny_loaded_model, OutputOptions(stats=tmp_path / "a.csv"))
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["crs"] is None and doc["pixel_size_unit"] == "pixel" and doc["valid_pixels"] == 60 * 40
    assert doc["area_m2"] is None and doc["hectares"] is None
    assert all(r["area_m2"] is None and r["hectares"] is None for r in doc["classes"])
    assert sum(r["percent"] for r in doc["classes"]) == pytest.approx(100)
    with (tmp_path / "a.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["area_m2"] == "" and r["hectares"] == "" for r in rows)
    assert float(rows[-1]["percent"]) == pytest.approx(100)
    assert "&ndash;" in (tmp_path / "report" / "index.html").read_text()


def test_geographic_pixel_areas_add_up_to_the_sphere() -> None:
    # A global 1-degree lat/lon raster covers the authalic sphere exactly once: 4 pi R^2.
    from geoseg.stats import AUTHALIC_RADIUS_M

    classes = [ClassSpec(1, "a", "#000000"), ClassSpec(2, "b", "#ffffff")]
    counter = ClassAreaCounter(classes, Affine(1, 0, -180, 0, -1, 90), rasterio.crs.CRS.from_epsg(4326))
    labels = np.ones((180, 360), np.uint8)
    labels[:90] = 2  # the northern hemisphere
    for row in range(0, 180, 45):
        counter.add(row, labels[row : row + 45], np.ones((45, 360), bool))
    table = {c.id: c for c in counter.table()}
    sphere = 4 * math.pi * AUTHALIC_RADIUS_M**2
    assert table[1].area_m2 + table[2].area_m2 == pytest.approx(sphere, rel=1e-9)
    assert table[2].percent == pytest.approx(50, abs=1e-9)
    assert table[1].pixels == table[2].pixels == 180 * 360 // 2


# --- destinations and atomic output ---------------------------------------------------------------------------


def test_a_failed_cog_conversion_leaves_no_output_at_all(
    tmp_path: Path, make_scene, tiny_loaded_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_scene(width=100, height=100)
    out = tmp_path / "out"
    out.mkdir()
    real = geoseg.io.convert_to_cog

    def fail_for_the_class_raster(src_path: Path, dst_path: Path, options: Any, **kwargs: Any) -> None:
        if options.resampling == "mode":
            dst_path.write_bytes(b"partial")
            raise OutputError(f"{kwargs.get('label')}: cannot write the Cloud-Optimized GeoTIFF (No space left)")
        real(src_path, dst_path, options, **kwargs)

    monkeypatch.setattr(geoseg.io, "convert_to_cog", fail_for_the_class_raster)
    outputs = OutputOptions(probabilities=out / "p.tif", confidence=out / "c.tif", stats=out / "s.json")
    with pytest.raises(OutputError, match="classes.tif: cannot write"):
        predict(src, out / "classes.tif", tiny_loaded_model, outputs, cog=True)
    assert list(out.iterdir()) == [], "the probability rasters were prepared, but none may appear"


def test_a_failure_mid_run_removes_every_temporary_file(
    tmp_path: Path, make_scene, tiny_loaded_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_scene(width=200, height=200)
    out = tmp_path / "out"
    out.mkdir()
    calls = {"n": 0}
    real_forward = tiny_loaded_model.module.forward

    def failing(x: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("CUDA out of memory")
        return real_forward(x)

    monkeypatch.setattr(tiny_loaded_model.module, "forward", failing)
    outputs = OutputOptions(probabilities=out / "p.tif", confidence=out / "c.tif", stats=out / "s.csv")
    with pytest.raises(RuntimeError, match="out of memory"):
        predict(src, out / "classes.tif", tiny_loaded_model, outputs, batch_size=1)
    assert list(out.iterdir()) == []


def test_overwrite_replaces_old_outputs_and_their_stale_sidecars(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    src = make_scene(width=70, height=70)
    probs = tmp_path / "p.tif"
    probs.write_bytes(b"old")
    Path(f"{probs}.aux.xml").write_text("<PAMDataset/>")
    with pytest.raises(OutputError, match="already exists"):
        predict(src, tmp_path / "classes.tif", tiny_loaded_model, OutputOptions(probabilities=probs))
    assert not (tmp_path / "classes.tif").exists()
    predict(src, tmp_path / "classes.tif", tiny_loaded_model, OutputOptions(probabilities=probs), overwrite=True)
    with rasterio.open(probs) as ds:
        assert ds.count == 3
    assert not Path(f"{probs}.aux.xml").exists(), "an old sidecar would describe the wrong raster"


# --- the command line -----------------------------------------------------------------------------------------


def test_cli_writes_every_output(tmp_path: Path, make_scene, tiny_model_file: Path, runner) -> None:
    src = make_scene(width=300, height=270, nodata=0, invalid=nodata_border(270, 300))
    args = [src, tmp_path / "classes.tif", "--model", tiny_model_file, "--cog", "-q",
            "--probabilities", tmp_path / "p.tif", "--probabilities-dtype", "float32",
            "--confidence", tmp_path / "c.tif", "--stats", tmp_path / "s.csv"]
    result = runner.invoke(main, ["predict", *map(str, args)])
    assert result.exit_code == 0, result.output
    for name in ("classes.tif", "p.tif", "c.tif"):
        assert cogeo().cog_validate(str(tmp_path / name))[0], name
    with rasterio.open(tmp_path / "p.tif") as ds:
        assert ds.dtypes[0] == "float32" and ds.count == 3
    with (tmp_path / "s.csv").open() as f:
        rows = list(csv.DictReader(f))
    with rasterio.open(tmp_path / "classes.tif") as ds:
        assert int(rows[-1]["pixels"]) == int((ds.read(1) != 255).sum())
    assert temporary_files(tmp_path) == []


@pytest.mark.parametrize(
    ("option", "name", "fragment"),
    [
        ("--probabilities", "exists.tif", "already exists (use --overwrite"),
        ("--confidence", "missing/c.tif", "does not exist"),
        ("--stats", "areas.txt", "statistics are written as .json or .csv"),
        ("--probabilities", "classes.tif", "also given as the class raster"),
        ("--confidence", "scene.tif", "destination is the input scene"),
    ],
)
def test_cli_refuses_bad_destinations_in_one_line_before_any_work(
    tmp_path: Path, make_scene, tiny_model_file: Path, runner, option: str, name: str, fragment: str
) -> None:
    src = make_scene(width=70, height=70)
    (tmp_path / "exists.tif").write_bytes(b"keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [src, tmp_path / "classes.tif", "--model", tiny_model_file, option, tmp_path / name]
    result = runner.invoke(main, ["predict", *map(str, args)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0] and name.split("/")[-1] in errors[0], result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "exists.tif").read_bytes() == b"keep me"


def test_cog_from_a_preset_with_zstd(tmp_path: Path, make_scene, tiny_model_file: Path, runner) -> None:
    src = make_scene(width=300, height=260)
    preset = tmp_path / "cog.yaml"
    preset.write_text("cog: true\ncompress: zstd\ntile: 64\noverlap: 16\n")
    result = runner.invoke(main, ["predict", str(src), str(tmp_path / "classes.tif"), "--model", str(tiny_model_file),
                                  "--config", str(preset), "--confidence", str(tmp_path / "conf.tif"), "-q"])
    assert result.exit_code == 0, result.output
    for name in ("classes.tif", "conf.tif"):
        valid, errors, warnings = cogeo().cog_validate(str(tmp_path / name), strict=True)
        assert valid and not errors and not warnings, (name, errors, warnings)
        with rasterio.open(tmp_path / name) as ds:
            assert ds.profile["compress"] == "zstd" and ds.overviews(1) == [2]


def cogeo() -> Any:
    """rio-cogeo's validator (geoseg[cog]); the test skips where it is not installed."""
    return pytest.importorskip("rio_cogeo.cogeo")


def test_an_interrupt_while_making_derived_outputs_names_what_was_written(
    runner: Any, make_scene: Any, tiny_model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The class raster is in place before polygons, report and STAC Item are made: Ctrl-C then
    must not claim that nothing was written."""
    import geoseg.report
    from geoseg.cli import main

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(geoseg.report, "write_report", interrupted)
    scene = make_scene()
    out, stats, vector, report, stac = (tmp_path / name for name in ("lc.tif", "a.json", "lc.geojson", "rep", "lc.json"))
    result = runner.invoke(main, ["predict", str(scene), str(out), "--model", str(tiny_model_file), "-q",
                                  "--stats", str(stats), "--vector", str(vector), "--report", str(report),
                                  "--stac", str(stac)])
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        f"Interrupted; {out}, {stats}, {vector} were written; {report}, {stac} were not."
    )
    assert out.is_file() and stats.is_file() and vector.is_file() and not report.exists() and not stac.exists()


def test_one_file_for_two_outputs_names_both_options(tmp_path: Path, make_scene, tiny_model_file: Path, runner) -> None:
    src = make_scene(width=70, height=70)
    p = tmp_path / "p.tif"
    result = runner.invoke(main, ["predict", str(src), str(tmp_path / "c.tif"), "--model", str(tiny_model_file),
                                  "--probabilities", str(p), "--confidence", str(p)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {p}: --confidence is also given as --probabilities; choose another name"


@pytest.mark.parametrize("field", ["vector_simplify", "vector_min_area"])
def test_nan_tolerances_are_refused(field: str) -> None:
    with pytest.raises(ConfigError, match="must be >= 0, got nan"):
        OutputOptions(vector=Path("v.gpkg"), **{field: float("nan")})
