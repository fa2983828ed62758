"""The bundled default model: what it says it is, and a regression guard on the Zion test strip."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geoseg.pipeline import default_model_path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # CI puts shared/ beside the clone
TEST_ROWS = (1032, 1428)  # the Zion test strip (data README); never trained, tuned or selected on
CONTEXT_ROWS = 32  # the gap rows above it, read as image context only


def test_default_model_is_bundled_and_described() -> None:
    from safetensors import safe_open

    from geoseg.modelfile import load_model

    path = default_model_path()
    assert path.stat().st_size < 8_000_000
    with safe_open(str(path), framework="pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes  # stored compactly
    model = load_model(path)
    meta = model.metadata
    assert meta.band_names == ["red", "green", "blue", "nir"]
    assert [b.source_band for b in meta.bands] == [1, 2, 3, 4]
    assert [c.name for c in meta.classes] == [
        "Water",
        "Developed",
        "Barren",
        "Forest",
        "Shrubland",
        "Herbaceous",
        "Cultivated",
        "Wetlands",
    ]
    assert [c.id for c in meta.classes] == list(range(1, 9)) and meta.ignore_index == 0
    assert meta.resolution_m == 30 and meta.normalization.method == "meanstd"
    assert "Landsat 8" in meta.intended_input and "digital numbers" in meta.intended_input
    assert "demonstration" in meta.description.lower()
    assert meta.provenance["trained"] is True
    # the final fit on the data set's training rows, never the gap (1000-1031) or the test strip
    assert meta.provenance["train_region"] == "rows 0:1000"
    assert meta.provenance["selection"].startswith("last step")


def test_bf16_keeps_the_default_models_class_map(tmp_path: Path) -> None:
    """bf16 autocast on the CPU changes the class of few pixels. It checks the kernels of the CPU it
    runs on: on a Xeon with AMX (torch 2.11) a wrong bf16 convolution kernel once changed 11 % of
    the Zion scene's pixels; 0.11 % differ since that convolution runs in fp32 (docs/performance.md)."""
    from geoseg.config import PredictConfig
    from geoseg.pipeline import predict_scene

    sample = Path(__file__).resolve().parents[1] / "sample_data" / "zion_sample.tif"
    maps = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.tif"
        predict_scene(sample, out, PredictConfig(device="cpu", precision=precision))
        with rasterio.open(out) as src:
            maps[precision] = src.read(1)
    agreement = (maps["fp32"] == maps["bf16"]).mean()
    assert agreement >= 0.995, f"bf16 agrees with fp32 on {agreement:.2%} of the sample's pixels"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")
def test_default_model_on_the_zion_test_strip(tmp_path: Path) -> None:
    from geoseg.config import PredictConfig
    from geoseg.evaluate import evaluate_rasters
    from geoseg.labels import ClassMap, Region
    from geoseg.modelfile import load_classes
    from geoseg.pipeline import predict_scene

    data = SHARED_DATA / "zion-landsat8-nlcd"
    top = TEST_ROWS[0] - CONTEXT_ROWS
    window = Window(0, top, 1128, TEST_ROWS[1] - top)
    crop = tmp_path / "south.tif"
    labels = tmp_path / "south_labels.tif"
    for src_path, dst_path in ((data / "image_rgbn.tif", crop), (data / "label_8class.tif", labels)):
        with rasterio.open(src_path) as src:
            profile = src.profile | {"height": int(window.height), "transform": src.window_transform(window)}
            with rasterio.open(dst_path, "w", **profile) as dst:
                dst.write(src.read(window=window))
    pred = tmp_path / "pred.tif"
    predict_scene(crop, pred, PredictConfig(device="cpu"))
    metrics = evaluate_rasters(
        pred,
        labels,
        ClassMap(*load_classes(data / "classes.json")),
        Region.rows(f"{CONTEXT_ROWS}:{window.height}"),
    )
    assert metrics.pixels == 396 * 1128
    # NOTE: a regression guard a little below what the shipped model scores here (mIoU 0.2552, OA 0.7514 on
    # this crop, fp32 and bf16 alike; 0.2562 and 0.7525 when the whole scene is predicted, see
    # docs/training.md). The earlier B0 default scored 0.205 / 0.734, so the guard fails on it. The issue's
    # target (mIoU >= 0.40, OA >= 0.78; guard 0.35) is not reached by this demonstration model.
    assert metrics.miou >= 0.24, metrics.format_table()
    assert metrics.overall_accuracy >= 0.74, metrics.format_table()
    assert np.isfinite(metrics.kappa)


def test_training_configs_never_reach_the_test_strip() -> None:
    """The configs that made the default model stay on the data set's training rows, 0-999."""
    from geoseg.train import build_train_config, load_train_config_file

    configs = Path(__file__).resolve().parents[1] / "configs"
    final = build_train_config(load_train_config_file(configs / "zion-default.yaml"), out="m.safetensors")
    select = build_train_config(load_train_config_file(configs / "zion-select.yaml"), out="m.safetensors")
    assert (final.train_rows, final.val_region) == ("0:1000", None)  # the final fit keeps its last step
    assert (select.train_rows, select.val_rows) == ("0:800", "800:1000")
    # the selection run differs from the final fit only in its regions and names
    differ = {k for k, v in final.to_dict().items() if select.to_dict()[k] != v}
    assert differ == {"train_rows", "val_rows", "name", "description"}, differ
