"""Scene checks, windowed tile reads with validity masks, and the atomic label writer."""

from __future__ import annotations

import logging
import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine

from geoseg.errors import GeoreferenceWarning, InputError, OutputError
from geoseg.io import (
    TMP_MARKER,
    LabelWriter,
    SceneReader,
    check_destination,
    open_scene,
    output_dtype,
    pam_xml,
)
from geoseg.modelfile import ClassSpec, Normalization


def reader_for(scene: Any, meta: Any) -> SceneReader:
    mul, bias = meta.normalization.multiplier_and_bias()
    return SceneReader(scene, mul, bias)


# --- open_scene: band choice -------------------------------------------------------------------


def test_scene_reports_size_georeference_and_default_bands(make_scene, tiny_metadata) -> None:
    path = make_scene(width=70, height=50, count=4, dtype="uint16")
    scene = open_scene(path, tiny_metadata())
    assert (scene.width, scene.height, scene.count) == (70, 50, 4)
    assert scene.shape == (50, 70)
    assert scene.dtype == "uint16"
    assert scene.crs == rasterio.crs.CRS.from_epsg(32618)
    assert scene.transform == Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0)
    assert scene.band_indexes == (1, 2, 3, 4)
    assert scene.band_source == "model defaults"
    assert scene.mask_mode == "none"
    assert scene.nodata is None


def test_explicit_bands_pick_and_order(make_scene, tiny_metadata) -> None:
    path = make_scene(count=8)
    scene = open_scene(path, tiny_metadata(), bands=(4, 3, 2, 8))
    assert scene.band_indexes == (4, 3, 2, 8)
    assert scene.band_source == "--bands"


def test_band_descriptions_matching_the_model_are_used(make_scene, tiny_metadata) -> None:
    path = make_scene(count=5, descriptions=["NIR", "coastal", "Blue", "green", " red "])
    scene = open_scene(path, tiny_metadata())  # model order: red, green, blue, nir
    assert scene.band_indexes == (5, 4, 3, 1)
    assert scene.band_source == "band descriptions"


def test_explicit_bands_win_over_descriptions(make_scene, tiny_metadata) -> None:
    path = make_scene(count=4, descriptions=["nir", "blue", "green", "red"])
    assert open_scene(path, tiny_metadata(), bands=(1, 2, 3, 4)).band_indexes == (1, 2, 3, 4)


def test_partial_descriptions_fall_back_to_the_model_defaults_with_a_warning(
    make_scene, tiny_metadata, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_scene(count=8, descriptions=["red", "green", "blue", None, None, None, None, "something"])
    meta = tiny_metadata(source_bands=(4, 3, 2, 8))
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        scene = open_scene(path, meta)
    assert scene.band_indexes == (4, 3, 2, 8)
    assert scene.band_source == "model defaults"
    # the descriptions put red in band 1, the model's defaults in band 4: the user must hear of it
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(path) in warned[0] and "--bands" in warned[0]


def test_descriptions_that_agree_with_the_defaults_do_not_warn(
    make_scene, tiny_metadata, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_scene(count=5, descriptions=["red", "green", None, None, "cloud"])
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        assert open_scene(path, tiny_metadata()).band_indexes == (1, 2, 3, 4)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize(
    ("descriptions", "expected"),
    [
        # the bundled sample's style, reordered
        (["blue (OLI B2)", "green (OLI B3)", "red (OLI B4)", "nir (OLI B5)"], (3, 2, 1, 4)),
        (["Near Infrared", "Red band", "Green", "Blue"], (2, 3, 4, 1)),
        # a red-edge band is not red; an exact name wins over one that only starts with it
        (["Red Edge 1", "Blue", "Green", "NIR", "Red"], (5, 3, 2, 4)),
        (["Red Edge 1", "blue", "green", "nir", "red (B4)"], (5, 3, 2, 4)),
    ],
)
def test_descriptions_name_bands_as_words(make_scene, tiny_metadata, descriptions, expected) -> None:
    path = make_scene(count=len(descriptions), descriptions=descriptions)
    scene = open_scene(path, tiny_metadata())
    assert (scene.band_indexes, scene.band_source) == (expected, "band descriptions")


def test_descriptions_naming_a_band_twice_are_not_used(make_scene, tiny_metadata, caplog) -> None:
    path = make_scene(count=5, descriptions=["red (B4)", "red (B4, again)", "green", "blue", "nir"])
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        scene = open_scene(path, tiny_metadata())
    assert scene.band_source == "model defaults"
    assert any("--bands" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_an_alpha_band_is_never_a_default_data_band(make_scene, tiny_metadata, tmp_path: Path) -> None:
    # R, G, B + alpha, and a 4-band byte file as GDAL writes it by default: band 4 is labelled alpha
    rgba = make_scene(count=3, dtype="uint8", alpha=np.ones((80, 96), bool))
    default = tmp_path / "default.tif"
    profile = {"driver": "GTiff", "width": 20, "height": 10, "count": 4, "dtype": "uint8",
               "crs": "EPSG:32618", "transform": Affine(10, 0, 500000, 0, -10, 4200000)}
    with rasterio.open(default, "w", **profile) as ds:
        ds.write(np.full((4, 10, 20), 7, np.uint8))
    for path in (rgba, default):
        with pytest.raises(InputError, match=r"3 data band\(s\) and an alpha band \(band 4, a mask\)") as err:
            open_scene(path, tiny_metadata())
        assert str(path) in str(err.value) and "--bands" in str(err.value)


def test_an_alpha_band_named_in_bands_is_data_with_a_warning(
    make_scene, tiny_metadata, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rgbn.tif"  # near-infrared in band 4, labelled alpha by GDAL's default
    profile = {"driver": "GTiff", "width": 20, "height": 10, "count": 4, "dtype": "uint8",
               "crs": "EPSG:32618", "transform": Affine(10, 0, 500000, 0, -10, 4200000)}
    data = np.full((4, 10, 20), 7, np.uint8)
    data[3, :, :5] = 0  # dark water in the near infrared: data, not a mask
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    meta = tiny_metadata()
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        scene = open_scene(path, meta, bands=(1, 2, 3, 4))
    assert any("band 4, given for nir, is an alpha band" in r.getMessage() for r in caplog.records)
    with reader_for(scene, meta) as reader:
        _, valid, _, _ = reader.read_tile(0, 0, 20)
    assert valid[:10, :20].all()


def test_too_few_bands_is_refused_naming_the_file(make_scene, tiny_metadata) -> None:
    path = make_scene(count=3)
    with pytest.raises(InputError, match=r"3 band\(s\) but the model needs 4") as err:
        open_scene(path, tiny_metadata())
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("bands", "message"),
    [
        ((1, 2, 3, 9), "band 9 is out of range"),
        ((0, 1, 2, 3), "band 0 is out of range"),
        ((1, 2), "lists 2 bands"),
    ],
)
def test_bad_band_lists_are_refused(make_scene, tiny_metadata, bands: tuple[int, ...], message: str) -> None:
    path = make_scene(count=4)
    with pytest.raises(InputError, match=message) as err:
        open_scene(path, tiny_metadata(), bands=bands)
    assert str(path) in str(err.value)


# --- open_scene: files that cannot be used ------------------------------------------------------


def test_missing_file(tmp_path: Path, tiny_metadata) -> None:
    path = tmp_path / "nope.tif"
    with pytest.raises(InputError, match="file not found") as err:
        open_scene(path, tiny_metadata())
    assert str(path) in str(err.value)


def test_text_file_is_not_a_raster(tmp_path: Path, tiny_metadata) -> None:
    path = tmp_path / "notes.tif"
    path.write_text("not a raster\n")
    with pytest.raises(InputError, match="not a raster") as err:
        open_scene(path, tiny_metadata())
    assert str(path) in str(err.value)


def test_folder_is_not_a_raster(tmp_path: Path, tiny_metadata) -> None:
    with pytest.raises(InputError, match="not a raster"):
        open_scene(tmp_path, tiny_metadata())


def test_complex_data_is_refused(make_scene, tiny_metadata) -> None:
    path = make_scene(dtype="complex64", width=16, height=16)
    with pytest.raises(InputError, match="unsupported data type complex64") as err:
        open_scene(path, tiny_metadata())
    assert str(path) in str(err.value)


def test_truncated_file_fails_on_read_naming_the_file(make_scene, tiny_metadata) -> None:
    path = make_scene(width=128, height=128)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    meta = tiny_metadata()
    scene = open_scene(path, meta)  # the header survives; the pixels do not
    with reader_for(scene, meta) as reader, pytest.raises(InputError) as err:
        for y in (0, 64):
            for x in (0, 64):
                reader.read_tile(y, x, 64)
    message = str(err.value)
    assert str(path) in message
    assert "read failed" in message
    assert "\n" not in message
    assert "previous exception" not in message, "the message must say what went wrong, not point elsewhere"


# --- open_scene: georeference -----------------------------------------------------------------------


def test_missing_crs_warns(make_scene, tiny_metadata) -> None:
    path = make_scene(crs=None)
    with pytest.warns(GeoreferenceWarning, match="no CRS"):
        scene = open_scene(path, tiny_metadata())
    assert scene.crs is None


def test_rotated_transform_is_kept_without_warning(make_scene, tiny_metadata) -> None:
    rotated = Affine.translation(500000, 4200000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    path = make_scene(transform=rotated)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeoreferenceWarning)
        scene = open_scene(path, tiny_metadata())
    assert scene.transform == rotated


# --- masks ---------------------------------------------------------------------------------------


def test_nodata_value_marks_pixels_where_every_band_is_nodata(make_scene, tiny_metadata) -> None:
    invalid = np.zeros((40, 50), bool)
    invalid[:10] = True
    invalid[20:25, 30:] = True
    data = np.full((4, 40, 50), 5000, np.uint16)
    data[2, 30, 5] = 0  # one band at the nodata value is still a valid pixel (GDAL's dataset mask)
    path = make_scene(data=data, nodata=0, invalid=invalid)
    meta = tiny_metadata()
    scene = open_scene(path, meta)
    assert (scene.mask_mode, scene.nodata) == ("nodata", 0.0)
    with reader_for(scene, meta) as reader:
        pixels, valid, h, w = reader.read_tile(0, 0, 64)
    assert (h, w) == (40, 50)
    np.testing.assert_array_equal(valid[:40, :50], ~invalid)
    assert valid[30, 5]
    assert not valid[40:].any() and not valid[:, 50:].any(), "padding is never valid"
    np.testing.assert_array_equal(pixels[:, :40, :50][:, invalid], 0.0)  # invalid pixels read as 0
    np.testing.assert_allclose(pixels[:, 15, 0], [0.5, 0.5, 0.5, 0.5])  # 5000 * 1e-4


def test_nodata_override_replaces_a_wrong_file_value(make_scene, tiny_metadata) -> None:
    invalid = np.zeros((32, 32), bool)
    invalid[:, :8] = True
    data = np.full((4, 32, 32), 100, np.int16)
    data[:, invalid] = -5
    path = make_scene(data=data, dtype="int16", nodata=-9999)  # the file claims -9999
    meta = tiny_metadata()
    scene = open_scene(path, meta, nodata=-5)
    assert (scene.mask_mode, scene.nodata) == ("nodata", -5.0)
    with reader_for(scene, meta) as reader:
        _, valid, _, _ = reader.read_tile(0, 0, 32)
    np.testing.assert_array_equal(valid, ~invalid)


def test_internal_mask_is_used(make_scene, tiny_metadata) -> None:
    mask = np.ones((48, 48), bool)
    mask[10:30, 5:20] = False
    path = make_scene(width=48, height=48, mask=mask)
    meta = tiny_metadata()
    scene = open_scene(path, meta)
    assert scene.mask_mode == "dataset"
    with reader_for(scene, meta) as reader:
        pixels, valid, _, _ = reader.read_tile(0, 0, 48)
    np.testing.assert_array_equal(valid, mask)
    assert (pixels[:, ~mask] == 0).all()


def test_rgba_alpha_band_is_used(make_scene, tiny_metadata) -> None:
    # R, G, B + alpha: the layout GDAL itself turns into a per-dataset mask.
    alpha = np.ones((48, 48), bool)
    alpha[30:, :] = False
    path = make_scene(width=48, height=48, count=3, dtype="uint8", alpha=alpha)
    meta = tiny_metadata(band_names=("red", "green", "blue"))
    scene = open_scene(path, meta)
    assert scene.count == 4
    assert scene.band_indexes == (1, 2, 3)
    with reader_for(scene, meta) as reader:
        _, valid, _, _ = reader.read_tile(0, 0, 48)
    np.testing.assert_array_equal(valid, alpha)


def test_alpha_band_after_four_data_bands_is_used(make_scene, tiny_metadata) -> None:
    # R, G, B, NIR + alpha: GDAL does not mask with an alpha band here by itself.
    alpha = np.ones((48, 48), bool)
    alpha[30:, :] = False
    alpha[:, :7] = False
    path = make_scene(width=48, height=48, count=4, dtype="uint8", alpha=alpha)
    meta = tiny_metadata()
    scene = open_scene(path, meta)
    assert scene.count == 5
    assert scene.band_indexes == (1, 2, 3, 4)
    with reader_for(scene, meta) as reader:
        pixels, valid, _, _ = reader.read_tile(0, 0, 48)
    np.testing.assert_array_equal(valid, alpha)
    assert (pixels[:, ~alpha] == 0).all()


@pytest.mark.parametrize("file_nodata", [float("nan"), None])
def test_nan_pixels_are_invalid_and_never_reach_the_model(make_scene, tiny_metadata, file_nodata) -> None:
    data = np.full((4, 20, 20), 0.25, np.float32)
    data[:, :5] = np.nan  # nodata in every band
    data[1, 10, 10] = np.nan  # a NaN in a single band would poison the logits: invalid as well
    path = make_scene(data=data, dtype="float32", nodata=file_nodata)
    meta = tiny_metadata(normalization=Normalization("meanstd", mean=(0.5,) * 4, std=(0.25,) * 4))
    scene = open_scene(path, meta)
    with reader_for(scene, meta) as reader:
        pixels, valid, _, _ = reader.read_tile(0, 0, 32)
    expected = np.ones((20, 20), bool)
    expected[:5] = False
    expected[10, 10] = False
    np.testing.assert_array_equal(valid[:20, :20], expected)
    assert np.isfinite(pixels).all()
    np.testing.assert_allclose(pixels[:, 15, 15], [-1.0] * 4)  # (0.25 - 0.5) / 0.25


# --- tile reads ---------------------------------------------------------------------------------------


def test_tile_reads_normalise_and_follow_the_window(make_scene, tiny_metadata) -> None:
    path = make_scene(width=100, height=90, seed=3)
    with rasterio.open(path) as src:
        raw = src.read()
    meta = tiny_metadata(
        normalization=Normalization("meanstd", mean=(1000.0, 2000, 3000, 4000), std=(10.0, 20, 30, 40))
    )
    scene = open_scene(path, meta, bands=(4, 3, 2, 1))
    with reader_for(scene, meta) as reader:
        pixels, valid, h, w = reader.read_tile(26, 36, 64)
    assert (h, w) == (64, 64) and valid.all()
    expected = (
        raw[[3, 2, 1, 0], 26:90, 36:100].astype(np.float64)
        - np.array([1000, 2000, 3000, 4000])[:, None, None]
    )
    expected /= np.array([10, 20, 30, 40])[:, None, None]
    np.testing.assert_allclose(pixels, expected, rtol=1e-5, atol=1e-4)
    assert pixels.dtype == np.float32


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 9), (9, 1), (5, 7), (31, 20)])
def test_small_scene_is_padded_by_reflection(make_scene, tiny_metadata, height: int, width: int) -> None:
    path = make_scene(width=width, height=height, seed=4)
    meta = tiny_metadata()
    scene = open_scene(path, meta)
    with reader_for(scene, meta) as reader:
        pixels, valid, h, w = reader.read_tile(0, 0, 32)
    assert pixels.shape == (4, 32, 32)
    assert (h, w) == (height, width)
    assert valid[:height, :width].all()
    assert valid.sum() == height * width
    assert np.isfinite(pixels).all()
    with rasterio.open(path) as src:
        raw = src.read().astype(np.float32) * np.float32(1e-4)
    np.testing.assert_allclose(pixels[:, :height, :width], raw, rtol=1e-6)
    if height > 1 and width > 1:
        np.testing.assert_allclose(
            pixels[:, height, :width], raw[:, height - 2]
        )  # mirrored, edge not repeated
    else:
        assert set(np.unique(pixels[0])) <= set(np.unique(raw[0]))


def test_reads_are_windowed(make_scene, tiny_metadata, record_reads) -> None:
    mask = np.ones((200, 150), bool)
    mask[:3] = False
    path = make_scene(width=150, height=200, mask=mask, tiled=True)
    meta = tiny_metadata()
    scene = open_scene(path, meta)
    with reader_for(scene, meta) as reader:
        reader.read_tile(136, 86, 64)
        reader.read_tile(0, 0, 64)
    reads = [w for kind, w in record_reads if kind in ("read", "read_masks")]
    assert reads, "the recording wrapper saw no read"
    for window in reads:
        assert window is not None, "a read without a window reads the whole scene"
        assert window.width <= 64 and window.height <= 64


# --- destination ----------------------------------------------------------------------------------


def test_destination_checks(tmp_path: Path, make_scene) -> None:
    src = str(make_scene())
    with pytest.raises(OutputError, match="destination is the input scene"):
        check_destination(src, src, overwrite=True)
    link = tmp_path / "link.tif"
    link.symlink_to(src)
    with pytest.raises(OutputError, match="destination is the input scene"):
        check_destination(src, link, overwrite=True)
    with pytest.raises(OutputError, match="does not exist") as err:
        check_destination(src, tmp_path / "missing" / "out.tif", overwrite=False)
    assert str(tmp_path / "missing" / "out.tif") in str(err.value)
    (tmp_path / "folder.tif").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_destination(src, tmp_path / "folder.tif", overwrite=True)
    existing = tmp_path / "existing.tif"
    existing.write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists"):
        check_destination(src, existing, overwrite=False)
    assert check_destination(src, existing, overwrite=True) == existing
    assert check_destination(src, tmp_path / "new.tif", overwrite=False) == tmp_path / "new.tif"


def test_relative_destination_equal_to_source_is_refused(make_scene, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_scene()
    monkeypatch.chdir(src.parent)
    with pytest.raises(OutputError, match="destination is the input scene"):
        check_destination(str(src), src.name, overwrite=True)


def test_output_dtype() -> None:
    small = [ClassSpec(1, "a", "#000000"), ClassSpec(255, "b", "#ffffff")]
    assert output_dtype(small, 0) == "uint8"
    assert output_dtype(small[:1], 255) == "uint8"
    assert output_dtype(small[:1], 256) == "uint16"
    assert output_dtype([ClassSpec(300, "c", "#123456")], 255) == "uint16"


# --- label writer ------------------------------------------------------------------------------------


CLASSES = (ClassSpec(1, "water", "#0000ff"), ClassSpec(4, "forest & <trees>", "#00aa00"))


def writer_for(tmp_path: Path, make_scene, tiny_metadata, height: int = 600, width: int = 70, **kwargs: Any):
    src = make_scene(width=width, height=height, count=4)
    scene = open_scene(src, tiny_metadata())
    dst = tmp_path / "out" / "labels.tif"
    dst.parent.mkdir(exist_ok=True)
    args = {
        "classes": CLASSES,
        "output_nodata": 255,
        "compress": "deflate",
        "tags": {"GEOSEG_TILE": "64"},
    } | kwargs
    return scene, dst, LabelWriter(dst, scene, **args)


def test_writer_writes_under_a_temporary_name_then_renames(tmp_path: Path, make_scene, tiny_metadata) -> None:
    scene, dst, writer = writer_for(tmp_path, make_scene, tiny_metadata)
    labels = np.random.default_rng(0).choice(np.array([1, 4, 255]), size=(scene.height, scene.width))
    with writer:
        row = 0
        for n in (37, 256, 1, 200, 106):  # chunks that straddle the output blocks
            writer.write_rows(row, labels[row : row + n])
            row += n
            assert not dst.exists(), "nothing may exist under the final name before commit"
        assert writer.tmp.exists()
        assert writer.tmp.parent == dst.parent
        assert writer.tmp.name.startswith(".") and TMP_MARKER in writer.tmp.name
        writer.commit()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["labels.tif", "labels.tif.aux.xml"]
    with rasterio.open(dst) as out:
        np.testing.assert_array_equal(out.read(1), labels)
        assert out.crs == scene.crs and out.transform == scene.transform
        assert out.dtypes == ("uint8",) and out.nodata == 255
        assert out.profile["tiled"] and out.profile["compress"] == "deflate"
        assert out.tags()["CLASS_4"] == "forest & <trees>"
        assert out.tags()["GEOSEG_TILE"] == "64"
        cmap = out.colormap(1)
        assert cmap[1] == (0, 0, 255, 255) and cmap[4] == (0, 170, 0, 255)
        assert cmap[255][3] == 0, "nodata is transparent"


def test_a_destination_that_appears_during_the_run_is_left_alone(
    tmp_path: Path, make_scene, tiny_metadata
) -> None:
    # Two nightly jobs writing the same DST: the later one must not replace the earlier's file.
    scene, dst, writer = writer_for(tmp_path, make_scene, tiny_metadata, height=20, width=20)
    with writer:
        writer.write_rows(0, np.ones((20, 20), np.uint8))
        dst.write_bytes(b"another job's map")
        with pytest.raises(OutputError, match="appeared while this run was writing it"):
            writer.commit()
    assert dst.read_bytes() == b"another job's map"
    assert [p.name for p in dst.parent.iterdir()] == ["labels.tif"]


def test_a_destination_there_from_the_start_is_replaced(tmp_path: Path, make_scene, tiny_metadata) -> None:
    # It passed the destination checks, so --overwrite was given.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "labels.tif").write_bytes(b"old")
    (tmp_path / "out" / "labels.tif.aux.xml").write_text("<PAMDataset/>")
    scene, dst, writer = writer_for(tmp_path, make_scene, tiny_metadata, height=20, width=20, overwrite=True)
    with writer:
        writer.write_rows(0, np.ones((20, 20), np.uint8))
        writer.commit()
    with rasterio.open(dst) as out:
        assert (out.read(1) == 1).all()
    assert "CategoryNames" in Path(f"{dst}.aux.xml").read_text()


def test_writer_uses_uint16_for_large_class_ids(tmp_path: Path, make_scene, tiny_metadata) -> None:
    classes = (ClassSpec(7, "a", "#010203"), ClassSpec(300, "b", "#040506"))
    scene, dst, writer = writer_for(tmp_path, make_scene, tiny_metadata, height=20, width=20, classes=classes)
    labels = np.full((20, 20), 300, np.int64)
    labels[:, :3] = 255
    with writer:
        writer.write_rows(0, labels)
        writer.commit()
    with rasterio.open(dst) as out:
        assert out.dtypes == ("uint16",)
        np.testing.assert_array_equal(out.read(1), labels)


def test_writer_refuses_rows_out_of_order_and_incomplete_commits(
    tmp_path: Path, make_scene, tiny_metadata
) -> None:
    scene, dst, writer = writer_for(tmp_path, make_scene, tiny_metadata, height=20, width=10)
    with pytest.raises(AssertionError):
        with writer:
            writer.write_rows(0, np.ones((5, 10), np.uint8))
            with pytest.raises(AssertionError, match="in order"):
                writer.write_rows(6, np.ones((5, 10), np.uint8))
            writer.commit()  # 5 of 20 rows: refused, and the with block cleans up
    assert list(dst.parent.iterdir()) == []


def test_abort_and_exceptions_leave_nothing(tmp_path: Path, make_scene, tiny_metadata) -> None:
    _, dst, writer = writer_for(tmp_path, make_scene, tiny_metadata, height=20, width=10)
    writer.write_rows(0, np.ones((10, 10), np.uint8))
    writer.abort()
    assert list(dst.parent.iterdir()) == []
    _, dst, writer = writer_for(tmp_path, make_scene, tiny_metadata, height=20, width=10)
    with pytest.raises(RuntimeError, match="boom"), writer:
        writer.write_rows(0, np.ones((10, 10), np.uint8))
        raise RuntimeError("boom")
    assert list(dst.parent.iterdir()) == []


def test_pam_sidecar_has_category_names_and_a_thematic_rat() -> None:
    root = ET.fromstring(pam_xml(CLASSES))
    band = root.find("PAMRasterBand")
    assert band is not None and band.get("band") == "1"
    names = [c.text or "" for c in band.find("CategoryNames")]
    assert names == ["", "water", "", "", "forest & <trees>"], "category i names pixel value i"
    rat = band.find("GDALRasterAttributeTable")
    assert rat.get("tableType") == "thematic"
    fields = [(f.findtext("Name"), f.findtext("Type"), f.findtext("Usage")) for f in rat.findall("FieldDefn")]
    assert fields[0] == ("Value", "0", "5")
    assert fields[1] == ("Class", "2", "2")
    assert [f[0] for f in fields[2:]] == ["Red", "Green", "Blue", "Alpha"]
    rows = [[f.text for f in row.findall("F")] for row in rat.findall("Row")]
    assert rows == [["1", "water", "0", "0", "255", "255"], ["4", "forest & <trees>", "0", "170", "0", "255"]]


def test_writer_error_names_the_destination(tmp_path: Path, make_scene, tiny_metadata) -> None:
    src = make_scene(width=10, height=10)
    scene = open_scene(src, tiny_metadata())
    dst = tmp_path / "gone" / "out.tif"
    with pytest.raises(OutputError) as err:
        LabelWriter(dst, scene, CLASSES, 255, "deflate", {})
    assert str(dst) in str(err.value)
    assert not dst.parent.exists() or not any(dst.parent.iterdir())


def test_scene_paths_accept_pathlike(make_scene, tiny_metadata) -> None:
    path = make_scene()
    assert open_scene(os.fspath(path), tiny_metadata()).path == open_scene(path, tiny_metadata()).path


def test_fractional_nodata_override_matches_no_integer_pixel(make_scene, tiny_metadata) -> None:
    data = np.full((4, 16, 16), 7, np.uint16)
    data[:, :, :4] = 0
    path = make_scene(data=data)
    meta = tiny_metadata()
    for value, expected_invalid_columns in ((0.5, 0), (0.0, 4), (-1.0, 0), (70000.0, 0)):
        scene = open_scene(path, meta, nodata=value)
        with reader_for(scene, meta) as reader:
            _, valid, _, _ = reader.read_tile(0, 0, 16)
        assert (~valid).sum() == expected_invalid_columns * 16, value


def test_float32_nodata_is_compared_as_stored(make_scene, tiny_metadata) -> None:
    # -9999.9 is not exact in float32: the pixels hold float32(-9999.9), the file's nodata the double.
    data = np.full((4, 16, 16), 0.25, np.float32)
    data[:, :3] = np.float32(-9999.9)
    path = make_scene(data=data, dtype="float32", nodata=-9999.9)
    meta = tiny_metadata()
    scene = open_scene(path, meta)
    with reader_for(scene, meta) as reader:
        _, valid, _, _ = reader.read_tile(0, 0, 16)
    assert (~valid).sum() == 3 * 16
