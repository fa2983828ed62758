"""Dense-CRF refinement: what it improves, blocks vs whole image, nodata, settings, a missing pydensecrf."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import yaml

from geoseg.config import PredictConfig, build_config, load_config_file
from geoseg.crf import CrfConfig, CrfStage, refine_block, scene_stretch, stretch_to_bytes
from geoseg.errors import ConfigError, DependencyNotFoundError
from geoseg.stream import RowBlock

REPO = Path(__file__).resolve().parents[1]
# pydensecrf is an extra (geoseg[crf], which CI installs); the tests that run it skip without it
needs_pydensecrf = pytest.mark.skipif(
    importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf is not installed (pip install 'geoseg[crf]')"
)
SAMPLE = REPO / "sample_data" / "zion_sample.tif"


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a (..., h, w) array (edges extended)."""
    radius = int(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (-2, -1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="edge")
        image = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return image


def _two_regions(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth (a disc in a background), 4 bands with clear contrast, and blurred noisy unaries."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = ((yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.3) ** 2).astype(np.int64)
    means = np.array([[60, 90, 70, 200], [180, 120, 160, 40]], np.float32)  # per region, per band
    bands = means[truth].transpose(2, 0, 1) + rng.normal(0, 6, (4, size, size))
    features = np.clip(bands, 0, 255).astype(np.uint8)
    # What a network at 1/4 resolution gives: a blurred, noisy belief that spills over borders.
    onehot = np.stack([truth == 0, truth == 1]).astype(np.float64)
    logits = 2.0 * (_blur(onehot, sigma=6.0) - 0.5) + rng.normal(0, 1.0, (2, size, size))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=0)
    return truth, features, probabilities.astype(np.float32)


@needs_pydensecrf
def test_crf_recovers_regions_better_than_argmax_of_blurred_unaries() -> None:
    truth, features, probabilities = _two_regions()
    valid = np.ones(truth.shape, bool)
    before = (probabilities.argmax(axis=0) == truth).mean()
    refined = refine_block(probabilities, features, valid, CrfConfig().params())
    after = (refined == truth).mean()
    # Measured: 0.856 before, 0.999 after. Stated margin: at least 10 points better, and 98 % right.
    assert before < 0.9 and after >= before + 0.10 and after >= 0.98, (before, after)


@needs_pydensecrf
def test_class_indexes_past_255_do_not_wrap() -> None:
    # a 300-class model sure of its last class everywhere: the refined index is 299, not 299 % 256
    probabilities = np.full((300, 16, 16), 0.1 / 299, np.float32)
    probabilities[299] = 0.9
    features = np.zeros((4, 16, 16), np.uint8)  # (bands, h, w), as the stage passes them
    refined = refine_block(probabilities, features, np.ones((16, 16), bool), CrfConfig().params())
    assert refined.dtype == np.uint16 and (refined == 299).all()


@needs_pydensecrf
def test_valid_pixels_do_not_feel_what_nodata_pixels_hold() -> None:
    truth, features, probabilities = _two_regions(seed=1)
    valid = np.ones(truth.shape, bool)
    valid[:, :40] = False  # nodata strip cutting through both regions
    params = CrfConfig().params()
    runs = []
    for nodata_class, nodata_value in ((0, 0), (1, 255)):
        p, f = probabilities.copy(), features.copy()
        p[:, ~valid] = 0.0
        p[nodata_class, ~valid] = 1.0  # nodata holding a confident (made-up) class...
        f[:, ~valid] = nodata_value  # ...and pixel values like one region or the other
        runs.append(refine_block(p, f, valid, params))
    assert np.array_equal(runs[0][valid], runs[1][valid])
    # And the same as the CRF on the valid part alone (up to the lattice's approximation).
    alone = refine_block(np.ascontiguousarray(probabilities[:, :, 40:]), np.ascontiguousarray(features[:, :, 40:]),
                         valid[:, 40:], params)
    assert (runs[0][:, 40:] == alone).mean() > 0.99


def test_stretch_is_sampled_per_band_and_skips_nodata(make_scene: Any, tiny_metadata: Any) -> None:
    from geoseg.io import open_scene

    rng = np.random.default_rng(0)
    data = np.stack([rng.uniform(100, 200, (80, 96)), rng.uniform(1000, 3000, (80, 96)),
                     rng.uniform(5, 60, (80, 96)), rng.uniform(10, 20, (80, 96))]).astype("uint16") + 1
    invalid = np.zeros((80, 96), bool)
    invalid[:20] = True
    data[:, invalid] = 0
    scene = open_scene(make_scene(data=data, nodata=0, invalid=invalid), tiny_metadata())
    low, high = scene_stretch(scene, (2, 98), sample_px=2000)  # a decimated read, not every pixel
    assert low[1] > 1000 and high[1] < 3001 and low[0] > 100  # nodata zeros left out
    assert np.all(high > low)
    features = stretch_to_bytes(data[:, 20:], low, high)
    assert features.dtype == np.uint8
    for band in features:  # each band spread over 0..255 on its own
        assert band.min() == 0 and band.max() == 255 and 100 < np.median(band) < 155


def _probabilities_and_crf(
    scene: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crf: CrfConfig, **config: Any
) -> tuple[np.ndarray, Path]:
    """Predict ``scene`` with the bundled model and ``crf``; return the probabilities the CRF got and the output."""
    import geoseg.pipeline as pipeline

    seen: list[np.ndarray] = []

    class Recorder:
        needs_probabilities = True

        def push(self, block: RowBlock) -> Any:
            seen.append(block.probabilities.copy())
            yield block

        def finish(self) -> Any:
            return iter(())

        def close(self) -> None:
            pass

    build = pipeline.build_stages
    monkeypatch.setattr(pipeline, "build_stages", lambda *args: [Recorder(), *build(*args)])
    out = tmp_path / "crf.tif"
    pipeline.predict_scene(scene, out, PredictConfig(crf=crf, **config))
    return np.concatenate(seen, axis=1), out


@needs_pydensecrf
def test_blocks_with_halo_agree_with_whole_image_crf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from geoseg.io import open_scene
    from geoseg.modelfile import load_model
    from geoseg.pipeline import default_model_path

    crf = CrfConfig(block=192, halo=64, workers=2)  # 3 x 3 blocks on the 512 x 512 sample
    probabilities, out = _probabilities_and_crf(SAMPLE, tmp_path, monkeypatch, crf)
    meta = load_model(default_model_path()).metadata
    scene = open_scene(str(SAMPLE), meta)
    with rasterio.open(SAMPLE) as src:
        features = stretch_to_bytes(src.read(), *scene_stretch(scene, crf.stretch_percentiles))
    whole = refine_block(probabilities, features, np.ones(scene.shape, bool), crf.params())
    ids = np.array([c.id for c in meta.classes])
    with rasterio.open(out) as dst:
        blocks = dst.read(1)
    agreement = (ids[whole] == blocks).mean()  # measured: 0.997
    assert agreement >= 0.99, agreement
    # The CRF did change the map (else agreement would say nothing).
    assert (ids[probabilities.argmax(axis=0)] != blocks).mean() > 0.01


def _feed(stage: CrfStage, blocks: list[RowBlock]) -> list[RowBlock]:
    out = []
    for block in blocks:
        out.extend(stage.push(block))
        held = sum(b.height for b in stage._held)
        assert held <= stage.config.block + 2 * stage.config.halo + block.height  # bounded buffer
        assert len(stage._bands) <= stage.max_bands  # bounded work in flight
    out.extend(stage.finish())
    return out


@needs_pydensecrf
def test_stage_streams_rows_in_order_and_keeps_nodata(make_scene: Any, tiny_metadata: Any) -> None:
    from geoseg.io import open_scene

    height, width, k = 300, 150, 3
    invalid = np.zeros((height, width), bool)
    invalid[100:130] = True
    invalid[:, 140:] = True
    rng = np.random.default_rng(0)
    scene = open_scene(make_scene(width=width, height=height, nodata=0, invalid=invalid), tiny_metadata())
    probabilities = rng.dirichlet(np.ones(k), (height, width)).transpose(2, 0, 1).astype(np.float32)
    class_ids = np.array([1, 2, 3], np.uint8)
    classes = class_ids[probabilities.argmax(axis=0)]
    classes[invalid] = 255
    stage = CrfStage(scene, class_ids, 255, CrfConfig(block=64, halo=16, workers=1, iterations=2))
    try:
        cuts = [0, 37, 38, 150, 222, height]  # uneven blocks, as the engine sends them
        blocks = [RowBlock(a, classes[a:b], ~invalid[a:b], probabilities[:, a:b]) for a, b in zip(cuts, cuts[1:])]
        out = _feed(stage, blocks)
    finally:
        stage.close()
    assert [b.row for b in out] == list(range(0, height, 64))
    refined = np.concatenate([b.classes for b in out])
    assert refined.shape == classes.shape
    assert np.all(refined[invalid] == 255) and np.all(np.isin(refined[~invalid], class_ids))
    assert np.array_equal(np.concatenate([b.probabilities for b in out], axis=1), probabilities)  # passed on
    # The same as one CRF over the whole image, up to what the halo leaves out.
    with rasterio.open(scene.path) as src:
        features = stretch_to_bytes(src.read(), stage.low, stage.high)
    whole = class_ids[refine_block(probabilities, features, ~invalid, stage.params)]
    changed, agreement = (refined != classes).mean(), (refined == whole)[~invalid].mean()
    assert changed > 0.01 and agreement > 0.98, (changed, agreement)


@needs_pydensecrf
def test_confidence_is_the_probability_of_the_class_the_crf_gave(tmp_path: Path) -> None:
    from geoseg.outputs import OutputOptions
    from geoseg.pipeline import predict_scene

    sample = Path(__file__).parents[1] / "sample_data" / "zion_sample.tif"
    crop = tmp_path / "crop.tif"
    with rasterio.open(sample) as src:
        window = rasterio.windows.Window(0, 0, 160, 120)
        profile = src.profile | {"width": 160, "height": 120, "transform": src.window_transform(window)}
        with rasterio.open(crop, "w", **profile) as dst:
            dst.write(src.read(window=window))
    outputs = OutputOptions(probabilities=tmp_path / "p.tif", confidence=tmp_path / "c.tif",
                            probabilities_dtype="float32")
    config = PredictConfig(device="cpu", precision="fp32", crf=CrfConfig(workers=1))
    predict_scene(crop, tmp_path / "map.tif", config, outputs=outputs)
    with rasterio.open(tmp_path / "map.tif") as m, rasterio.open(tmp_path / "p.tif") as p:
        classes, probabilities = m.read(1).astype(int), p.read()
    with rasterio.open(tmp_path / "c.tif") as c:
        confidence = c.read(1)
    given = np.take_along_axis(probabilities, (classes - 1)[None], axis=0)[0]  # the model's ids are 1..8
    assert (confidence != probabilities.max(axis=0)).sum() > 50  # the CRF changed classes here
    np.testing.assert_array_equal(confidence, given)
    with rasterio.open(tmp_path / "map.tif") as m:  # the provenance says the map was refined, and how
        assert m.tags()["GEOSEG_CRF"].startswith("iterations=1, gaussian_sxy=3.0,")


@needs_pydensecrf
def test_predict_with_crf_keeps_nodata(
    make_scene: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_file: Path
) -> None:
    from geoseg.pipeline import predict_scene

    invalid = np.zeros((80, 96), bool)
    invalid[30:50, 20:70] = True
    src = make_scene(nodata=0, invalid=invalid)
    out = tmp_path / "out.tif"
    predict_scene(src, out, PredictConfig(model=str(tiny_model_file), crf=CrfConfig(block=64, halo=16, workers=1)))
    with rasterio.open(out) as dst:
        labels = dst.read(1)
    assert np.all(labels[invalid] == 255) and np.all(np.isin(labels[~invalid], [1, 2, 3]))


def test_missing_pydensecrf_fails_before_inference(
    make_scene: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_loaded_model: Any
) -> None:
    from geoseg.pipeline import predict_scene

    calls = []
    tiny_loaded_model.module.register_forward_hook(lambda *args: calls.append(1))
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import pydensecrf now raises ImportError
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    out = tmp_path / "out.tif"
    with pytest.raises(DependencyNotFoundError, match=r"pip install 'geoseg\[crf\]'"):
        predict_scene(make_scene(), out, PredictConfig(crf=CrfConfig()), model=tiny_loaded_model)
    assert not calls and not list(tmp_path.glob("out*"))


def test_cli_missing_pydensecrf_is_one_line(
    runner: Any, make_scene: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_file: Path
) -> None:
    from geoseg.cli import main

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    result = runner.invoke(main, ["predict", str(make_scene()), str(tmp_path / "o.tif"), "--crf",
                                  "--model", str(tiny_model_file), "-q"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "pip install 'geoseg[crf]'" in result.output


@pytest.mark.parametrize(
    "settings",
    [
        {"iterations": 0},
        {"iterations": 2.5},
        {"gaussian_sxy": 0},
        {"bilateral_schan": -1.0},
        {"bilateral_compat": -0.1},
        {"block": 32},
        {"halo": -1},
        {"block": 128, "halo": 129},
        {"workers": 0},
        {"stretch_percentiles": (98.0, 2.0)},
        {"stretch_percentiles": (2.0,)},
        {"iterations": True},
    ],
)
def test_invalid_crf_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="crf"):
        CrfConfig(**settings)


def test_crf_yaml_section_and_cli_switches(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("crf: true\n")
    assert PredictConfig(**load_config_file(path)).crf == CrfConfig()
    path.write_text(yaml.safe_dump({"crf": {"iterations": 3, "bilateral-schan": 7.5, "stretch_percentiles": [1, 99]}}))
    file_settings = load_config_file(path)
    assert file_settings["crf"] == CrfConfig(iterations=3, bilateral_schan=7.5, stretch_percentiles=(1, 99))
    assert build_config(file_settings, crf=True).crf == file_settings["crf"]  # --crf keeps the file's settings
    assert build_config(file_settings, crf=False).crf is None  # --no-crf wins
    assert build_config(file_settings, crf_workers=3).crf == CrfConfig(
        iterations=3, bilateral_schan=7.5, stretch_percentiles=(1, 99), workers=3
    )
    assert build_config({}, crf=True).crf == CrfConfig()
    assert build_config({}).crf is None
    for text, message in (("crf: {sigma: 3}\n", "unknown crf key 'sigma'"), ("crf: 3\n", "crf must be true"),
                          ("crf: {iterations: 0}\n", "iterations")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message) as err:
            load_config_file(path)
        assert str(path) in str(err.value)
