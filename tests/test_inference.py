"""Tests for geoseg.inference's speed switches: ``--compile``, parallel batches on the CPU, the traced
network, and how ``--precision auto`` decides."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner

import geoseg.inference as inference
from geoseg.cli import main
from geoseg.config import PredictConfig
from geoseg.inference import (
    TRACE_MIN_TILES,
    TileBatch,
    TilePredictor,
    TracedNetwork,
    cpu_has_native_bf16,
    default_parallel_batches,
    default_trace,
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


@pytest.fixture
def predictors_made(monkeypatch: pytest.MonkeyPatch) -> list[TilePredictor]:
    """Every TilePredictor made during the test, in order (to see what the CLI asked for)."""
    made: list[TilePredictor] = []
    original = TilePredictor.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(TilePredictor, "__init__", record)
    return made


def test_parallel_batches_reach_the_predictor_from_the_cli(
    tmp_path: Path, make_scene, tiny_model_file: Path, predictors_made: list[TilePredictor],
    four_torch_threads,
) -> None:
    scene = make_scene()
    for flags in ([], ["--parallel-batches", "3"], ["--parallel-batches", "1"]):
        result = CliRunner().invoke(
            main, ["predict", str(scene), str(tmp_path / "out.tif"), "--model", str(tiny_model_file), "-q",
                   "--overwrite", "--device", "cpu", *flags]
        )
        assert result.exit_code == 0, result.output
    assert [predictor.parallel_batches for predictor in predictors_made] == [2, 3, 1]


def test_the_traced_network_gives_the_eager_logits_whatever_the_batch_size(tiny_loaded_model) -> None:
    cpu = torch.device("cpu")
    eager = TilePredictor(tiny_loaded_model.module, cpu, "fp32", 64, max_batch=3)
    traced = TilePredictor(tiny_loaded_model.module, cpu, "fp32", 64, max_batch=3, trace=True)
    assert traced.traced and isinstance(traced.module, TracedNetwork)
    assert not eager.traced and not isinstance(eager.module, TracedNetwork)
    rng = np.random.default_rng(0)
    for n in (3, 1, 2):  # traced on a batch of 3, then run on smaller ones
        pixels = rng.normal(size=(n, 4, 64, 64)).astype(np.float32)
        np.testing.assert_allclose(traced.predict(pixels), eager.predict(pixels), rtol=1e-5, atol=1e-5)
    graphs = traced.module.graphs
    assert list(graphs) == [(4, 64, 64)] and isinstance(graphs[(4, 64, 64)], torch.jit.ScriptModule)
    assert traced.module.active


def test_parallel_first_batches_trace_once_per_tile_shape(
    tiny_loaded_model, four_torch_threads, monkeypatch: pytest.MonkeyPatch
) -> None:
    traced_shapes: list[tuple[int, ...]] = []
    real_trace = torch.jit.trace

    def recording_trace(module, example, *args, **kwargs):
        traced_shapes.append(tuple(example.shape))
        return real_trace(module, example, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", recording_trace)
    predictor = TilePredictor(tiny_loaded_model.module, torch.device("cpu"), "fp32", 64, max_batch=2,
                              parallel_batches=2, trace=True)
    rng = np.random.default_rng(1)
    batches = [TileBatch(rng.normal(size=(2, 4, 64, 64)).astype(np.float32), [i], [], []) for i in range(6)]
    assert [batch.tiles for batch, _ in predictor.stream(iter(batches))] == [[i] for i in range(6)]
    assert traced_shapes == [(2, 4, 64, 64)], "two threads' first batches, one trace"
    predictor.predict(rng.normal(size=(1, 4, 48, 48)).astype(np.float32))  # a scene smaller than a tile
    assert traced_shapes == [(2, 4, 64, 64), (1, 4, 48, 48)]
    assert set(predictor.module.graphs) == {(4, 64, 64), (4, 48, 48)}


class HalfInFp32(torch.nn.Module):
    """Two linear maps over the bands, the second held in fp32 under autocast (as SegFormer's decoder is)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Conv2d(4, 16, 1)
        self.second = torch.nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.second(hidden.float())


def test_a_bf16_graph_keeps_the_casts_it_was_traced_with_and_the_fp32_regions() -> None:
    """Traced under autocast, the graph holds bf16 where autocast put it and fp32 where the module
    turned autocast off; run under the predictor's autocast, those fp32 regions must not be cast."""
    module = HalfInFp32().eval()
    cpu = torch.device("cpu")
    pixels = np.random.default_rng(3).normal(size=(2, 4, 32, 32)).astype(np.float32)
    eager = TilePredictor(module, cpu, "bf16", 32, max_batch=2).predict(pixels)
    predictor = TilePredictor(module, cpu, "bf16", 32, max_batch=2, trace=True)
    traced = predictor.predict(pixels)
    assert predictor.ran_traced
    with torch.inference_mode():
        fp32 = module(torch.from_numpy(pixels)).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            all_bf16 = module.second(module.first(torch.from_numpy(pixels))).float().numpy()
    assert np.abs(eager - fp32).max() > 1e-4, "bf16 changed the first map's outputs"
    np.testing.assert_allclose(traced, eager, rtol=0, atol=1e-5)  # the same casts as eager autocast
    assert np.abs(traced - all_bf16).max() > 1e-3, "the fp32 region ran in fp32, not bf16"


class UntraceableConv(torch.nn.Module):
    """A 1x1 convolution that refuses to be traced, as some architectures do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("data-dependent control flow")
        return self.conv(x)


def test_a_network_that_cannot_be_traced_runs_eager(caplog: pytest.LogCaptureFixture) -> None:
    module = UntraceableConv()
    predictor = TilePredictor(module, torch.device("cpu"), "fp32", 32, max_batch=2, trace=True)
    pixels = np.random.default_rng(2).normal(size=(2, 4, 32, 32)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="geoseg.inference"):
        logits = predictor.predict(pixels)
        predictor.predict(pixels)
    with torch.inference_mode():
        np.testing.assert_allclose(logits, module.conv(torch.from_numpy(pixels)).numpy(), rtol=1e-6)
    assert predictor.module.graphs == {(4, 32, 32): None} and not predictor.module.active
    said = [r.getMessage() for r in caplog.records if "cannot be traced" in r.getMessage()]
    assert said == [
        "the network cannot be traced (RuntimeError: data-dependent control flow); running it eager"
    ]


def test_the_result_says_whether_the_network_ran_traced(
    tmp_path: Path, make_scene, tiny_loaded_model
) -> None:
    scene = make_scene(width=100, height=90)
    config = PredictConfig(device="cpu", trace=True)
    assert predict_scene(scene, tmp_path / "a.tif", config, model=tiny_loaded_model).traced
    untraceable = dataclasses.replace(tiny_loaded_model, module=UntraceableConv())
    assert not predict_scene(scene, tmp_path / "b.tif", config, model=untraceable).traced  # ran eager
    eager = config.replace(trace=False)
    assert not predict_scene(scene, tmp_path / "c.tif", eager, model=tiny_loaded_model).traced


def test_tracing_applies_only_to_torch_networks_on_the_cpu(tiny_loaded_model, compile_calls) -> None:
    cpu = torch.device("cpu")

    def traced(module: torch.nn.Module | None = None, precision: str = "fp32", **options) -> bool:
        module = module or tiny_loaded_model.module
        return TilePredictor(module, cpu, precision, 64, max_batch=1, trace=True, **options).traced

    assert traced()
    assert traced(precision="bf16")
    assert not traced(compile=True)
    onnx_like = UntraceableConv()
    onnx_like.fixed_precision = "fp32"  # an ONNX runtime session: not a torch graph
    assert not traced(onnx_like)


@pytest.mark.parametrize(
    ("parallel", "tiles", "expected"),
    [(4, TRACE_MIN_TILES, True), (8, 10_000, True), (2, 10_000, True), (4, TRACE_MIN_TILES - 1, False),
     (1, 10_000, False)],
)
def test_by_default_only_parallel_network_threads_on_a_big_scene_trace(
    parallel: int, tiles: int, expected: bool, tiny_loaded_model, four_torch_threads
) -> None:
    assert default_trace(parallel, tiles) is expected
    predictor = TilePredictor(tiny_loaded_model.module, torch.device("cpu"), "fp32", 64, max_batch=1,
                              parallel_batches=parallel, trace=None, tiles=tiles)
    assert predictor.traced is expected


def test_trace_reaches_the_predictor_from_the_cli_and_keeps_the_class_map(
    tmp_path: Path, make_scene, tiny_model_file: Path, predictors_made: list[TilePredictor]
) -> None:
    scene = make_scene(width=150, height=130)
    maps = []
    for flags in ([], ["--trace"], ["--no-trace"]):
        out = tmp_path / f"out{len(maps)}.tif"
        result = CliRunner().invoke(
            main,
            ["predict", str(scene), str(out), "--model", str(tiny_model_file), "-q", "--device", "cpu", *flags],
        )
        assert result.exit_code == 0, result.output
        with rasterio.open(out) as written:
            maps.append(written.read(1))
    # by default: a scene of a few tiles is not traced
    assert [predictor.traced for predictor in predictors_made] == [False, True, False]
    np.testing.assert_array_equal(maps[1], maps[0])
    np.testing.assert_array_equal(maps[2], maps[0])
    assert len(np.unique(maps[0])) > 1, "a class map worth comparing"


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
