"""Tests for geoseg.inference's speed switches: ``--compile`` and how ``--precision auto`` decides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import geoseg.inference as inference
from geoseg.cli import main
from geoseg.config import PredictConfig
from geoseg.inference import TilePredictor, cpu_has_native_bf16, resolve_precision
from geoseg.pipeline import predict_scene


@pytest.fixture
def compile_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """Record torch.compile calls and return the module unchanged (compiling takes a minute on a CPU)."""
    calls: list[torch.nn.Module] = []

    def fake_compile(module: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        calls.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_compile_is_off_by_default_and_wraps_the_module_when_asked(tiny_loaded_model, compile_calls) -> None:
    module = tiny_loaded_model.module
    pixels = np.random.default_rng(0).normal(size=(2, 4, 64, 64)).astype(np.float32)
    eager = TilePredictor(module, torch.device("cpu"), "fp32", 64, max_batch=2).predict(pixels)
    assert compile_calls == []
    compiled = TilePredictor(module, torch.device("cpu"), "fp32", 64, max_batch=2, compile=True)
    assert compile_calls == [module]
    np.testing.assert_array_equal(compiled.predict(pixels), eager)


def test_compile_reaches_the_predictor_from_config_and_cli(
    tmp_path: Path, make_scene, tiny_model_file: Path, compile_calls
) -> None:
    scene = make_scene()
    predict_scene(scene, tmp_path / "a.tif", PredictConfig(model=str(tiny_model_file)))
    assert len(compile_calls) == 0
    predict_scene(scene, tmp_path / "b.tif", PredictConfig(model=str(tiny_model_file), compile=True))
    assert len(compile_calls) == 1
    result = CliRunner().invoke(
        main, ["predict", str(scene), str(tmp_path / "c.tif"), "--model", str(tiny_model_file), "--compile", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert len(compile_calls) == 2


@pytest.mark.slow
def test_real_torch_compile_gives_the_eager_logits(tiny_loaded_model) -> None:
    pixels = np.random.default_rng(0).normal(size=(2, 4, 64, 64)).astype(np.float32)
    eager = TilePredictor(tiny_loaded_model.module, torch.device("cpu"), "fp32", 64, max_batch=2).predict(pixels)
    compiled = TilePredictor(tiny_loaded_model.module, torch.device("cpu"), "fp32", 64, max_batch=2, compile=True)
    np.testing.assert_allclose(compiled.predict(pixels), eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("onednn_bf16", "capabilities", "expected"),
    [
        (False, {"avx512_bf16": True, "amx_bf16": True}, False),  # no oneDNN bf16 kernels in this torch
        (True, {"avx512_bf16": False, "amx_bf16": False}, False),  # AVX-512 without bf16: emulated
        (True, {"avx512_bf16": True, "amx_bf16": False}, True),
        (True, {"avx512_bf16": False, "amx_bf16": True}, True),
    ],
)
def test_native_bf16_needs_onednn_and_a_bf16_instruction_set(
    monkeypatch: pytest.MonkeyPatch, onednn_bf16: bool, capabilities: dict[str, bool], expected: bool
) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert cpu_has_native_bf16() is expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_the_cpu_is_fp32_even_with_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    # measured on a Xeon with AMX: bf16 no faster than fp32 for B0, slower for the bundled model
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
