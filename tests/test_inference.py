"""Tests for geoseg.inference's speed switches: ``--compile``, parallel batches on the CPU, and how
``--precision auto`` decides."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import geoseg.inference as inference
from geoseg.cli import main
from geoseg.config import PredictConfig
from geoseg.inference import (
    TileBatch,
    TilePredictor,
    cpu_has_native_bf16,
    default_parallel_batches,
    resolve_precision,
)
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


class SlowRecordingConv(torch.nn.Module):
    """A 1x1 convolution that waits first and records each forward pass.

    Per pass: its thread, the torch threads it ran on, when it started and ended.
    """

    def __init__(self, bands: int = 4, classes: int = 3, wait_s: float = 0.05):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(bands, classes, 1)
        self.wait_s = wait_s
        self.runs: list[tuple[int, int, float, float]] = []
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(self.wait_s)
        out = self.conv(x)
        with self._lock:
            self.runs.append((threading.get_ident(), torch.get_num_threads(), start, time.perf_counter()))
        return out


def test_parallel_batches_run_at_once_on_a_share_of_the_threads_in_order(four_torch_threads) -> None:
    module = SlowRecordingConv()
    predictor = TilePredictor(module, torch.device("cpu"), "fp32", 32, max_batch=2, parallel_batches=2)
    assert (predictor.parallel_batches, predictor.batches_in_flight) == (2, 3)
    rng = np.random.default_rng(0)
    batches = [TileBatch(rng.normal(size=(2, 4, 32, 32)).astype(np.float32), [i], [], []) for i in range(7)]
    out = list(predictor.stream(iter(batches)))
    assert [batch.tiles for batch, _ in out] == [[i] for i in range(7)]
    with torch.inference_mode():
        for batch, logits in out:
            expected = module.conv(torch.from_numpy(batch.pixels)).numpy()
            np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert {threads for _, threads, _, _ in module.runs} == {2}, "each batch on half of the 4 threads"
    assert len({thread for thread, _, _, _ in module.runs}) == 2
    spans = sorted((start, end) for _, _, start, end in module.runs)
    overlapping = [b_start < a_end for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)]
    assert any(overlapping), "two batches ran at once"
    assert torch.get_num_threads() == 4, "the caller's thread count is restored"


def test_one_batch_at_a_time_where_parallel_batches_do_not_apply(four_torch_threads, compile_calls) -> None:
    cpu = torch.device("cpu")
    def predictor(module: torch.nn.Module | None = None, **options) -> TilePredictor:
        return TilePredictor(module or SlowRecordingConv(), cpu, "fp32", 32, max_batch=1, **options)

    assert predictor().parallel_batches == 2  # the default
    assert predictor(parallel_batches=9).parallel_batches == 4  # at most one thread each
    assert predictor(parallel_batches=1).batches_in_flight == 1
    assert predictor(compile=True).parallel_batches == 1
    onnx_like = SlowRecordingConv()
    onnx_like.fixed_precision = "fp32"  # an ONNX runtime session: threads of its own
    assert predictor(onnx_like).parallel_batches == 1
    torch.set_num_threads(1)
    assert predictor().parallel_batches == 1


@pytest.mark.parametrize(("threads", "expected"), [(1, 1), (2, 2), (3, 2), (8, 2), (12, 3), (16, 4), (64, 8)])
def test_default_parallel_batches_give_each_about_four_threads(
    threads: int, expected: int, four_torch_threads
) -> None:
    torch.set_num_threads(threads)  # the fixture restores the caller's count
    assert default_parallel_batches() == expected


def test_parallel_batches_reach_the_predictor_from_the_cli(
    tmp_path: Path, make_scene, tiny_model_file: Path, monkeypatch: pytest.MonkeyPatch, four_torch_threads
) -> None:
    seen: list[int] = []
    original = TilePredictor.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.parallel_batches)

    monkeypatch.setattr(TilePredictor, "__init__", record)
    scene = make_scene()
    for flags in ([], ["--parallel-batches", "3"], ["--parallel-batches", "1"]):
        result = CliRunner().invoke(
            main, ["predict", str(scene), str(tmp_path / "out.tif"), "--model", str(tiny_model_file), "-q",
                   "--overwrite", "--device", "cpu", *flags]
        )
        assert result.exit_code == 0, result.output
    assert seen == [2, 3, 1]


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
