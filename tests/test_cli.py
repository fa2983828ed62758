"""The geoseg command line: one-line errors, exit codes, the written file, signals, cheap --help."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner, Result

from geoseg.cli import main
from geoseg.modelfile import count_weights, file_sha256, load_model

#: A tiny SegFormer (see conftest.TINY_ARCH), spelled as init-model flags.
TINY_ARCH_ARGS = [
    "--arch-override",
    "hidden_sizes=8,8,16,16",
    "--arch-override",
    "depths=1,1,1,1",
    "--arch-override",
    "num_attention_heads=1,1,2,2",
    "--arch-override",
    "decoder_hidden_size=16",
]
CLASSES = {
    "ignore_index": 0,
    "classes": [
        {"id": 1, "name": "Water", "color": "#476ba0"},
        {"id": 4, "name": "Forest", "color": "#68aa63"},
        {"id": 7, "name": "Cultivated", "color": "#dbd83d"},
    ],
}


def cli(runner: CliRunner, *args: Any) -> Result:
    return runner.invoke(main, [str(a) for a in args])


def assert_user_error(result: Result, *fragments: str, code: int = 1) -> str:
    """A handled error: exit ``code``, exactly one ``Error:`` line holding ``fragments``, no traceback."""
    out = result.output
    assert result.exit_code == code, out
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}"
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    others = [line for line in out.splitlines() if line.strip() and line not in errors]
    if code == 1:  # usage errors (2) come with click's usage lines
        assert all(line.startswith(("INFO: ", "Warning: ")) for line in others), out
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def classes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("classes") / "classes.json"
    path.write_text(json.dumps(CLASSES))
    return path


def init_model(runner: CliRunner, out: Path, classes_file: Path, *extra: Any) -> Result:
    return cli(runner, "init-model", out, "--classes", classes_file, *TINY_ARCH_ARGS, *extra)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, classes_file: Path) -> Path:
    """A tiny model written by ``geoseg init-model``: bands red, green, blue, nir; tile 64, overlap 16."""
    out = tmp_path_factory.mktemp("cli-model") / "tiny.safetensors"
    result = init_model(
        CliRunner(), out, classes_file, "--tile-size", 64, "--overlap", 16, "--name", "tiny-test"
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def scene(make_scene) -> Path:
    return make_scene(width=150, height=110)


def predict(runner: CliRunner, src: Path, dst: Path, model: Path, *extra: Any) -> Result:
    return cli(runner, "predict", src, dst, "--model", model, "--device", "cpu", *extra)


def tags_of(path: Path) -> dict[str, str]:
    with rasterio.open(path) as src:
        return src.tags()


# --- cheap startup ------------------------------------------------------------------------------------


def test_help_and_import_do_not_load_torch() -> None:
    code = (
        "import sys\n"
        "import geoseg.cli\n"
        "print('import', 'torch' in sys.modules, 'rasterio' in sys.modules, file=sys.stderr)\n"
        "for args in (['--help'], ['predict', '--help'], ['init-model', '--help']):\n"
        "    try:\n"
        "        geoseg.cli.main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('help', 'torch' in sys.modules, 'rasterio' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "import False False" in proc.stderr
    assert "help False False" in proc.stderr
    assert "Usage:" in proc.stdout and "predict" in proc.stdout


def test_console_script_help_does_not_import_torch() -> None:
    script = Path(sys.executable).with_name("geoseg")
    if not script.exists():
        pytest.skip("the geoseg console script is not installed beside this interpreter")
    env = os.environ | {"PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "geoseg.cli" in imported, "import-time profile did not list geoseg's own modules"
    assert "torch" not in imported
    assert "predict" in proc.stdout


def test_version(runner: CliRunner) -> None:
    import geoseg

    result = cli(runner, "--version")
    assert result.exit_code == 0
    assert geoseg.__version__ in result.output


@pytest.mark.parametrize(("args", "code"), [(["--version"], 0), (["no-such-command"], 2)])
def test_the_program_freezes_the_collector_before_it_exits(
    monkeypatch: pytest.MonkeyPatch, args: list[str], code: int
) -> None:
    """run() (the ``geoseg`` program) moves every object out of the collector's reach as main() ends,
    whether it succeeds or fails, so the interpreter's last collection has nothing to traverse."""
    import gc

    from geoseg import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["geoseg", *args])
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli_module.run()
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()  # the test process keeps collecting as before
    assert exit_info.value.code == code
    assert frozen > 1000


@pytest.mark.parametrize("torch_loaded", [False, True])
def test_importing_the_engine_skips_the_collector_and_freezes_only_a_fresh_import(
    monkeypatch: pytest.MonkeyPatch, torch_loaded: bool
) -> None:
    """predict imports torch with the collector paused and then freezes what the import created;
    in a process that has torch already (a caller's, this one) it leaves the collector alone."""
    import gc

    from geoseg import cli as cli_module

    if not torch_loaded:
        monkeypatch.delitem(sys.modules, "torch", raising=False)
    gc.unfreeze()
    try:
        with cli_module._importing_the_library():
            paused = not gc.isenabled()
            created = [[index] for index in range(1000)]  # container objects the collector tracks
        frozen = gc.get_freeze_count()
        enabled_after = gc.isenabled()
    finally:
        gc.unfreeze()
    assert len(created) == 1000
    assert enabled_after
    assert paused is not torch_loaded
    assert (frozen >= 1000) is not torch_loaded


# --- init-model and info ---------------------------------------------------------------------------------


def test_init_model_writes_a_loadable_model(model_file: Path) -> None:
    model = load_model(model_file)
    meta = model.metadata
    assert meta.name == "tiny-test"
    assert meta.band_names == ["red", "green", "blue", "nir"]
    assert [c.id for c in meta.classes] == [1, 4, 7]
    assert meta.ignore_index == 0
    assert (meta.tile_size, meta.overlap) == (64, 16)
    assert meta.arch_config["hidden_sizes"] == [8, 8, 16, 16]
    assert meta.arch_config["decoder_hidden_size"] == 16


def test_init_model_refuses_an_existing_file(runner: CliRunner, model_file: Path, classes_file: Path) -> None:
    before = model_file.read_bytes()
    assert_user_error(init_model(runner, model_file, classes_file), str(model_file), "already exists")
    assert model_file.read_bytes() == before


def test_init_model_bad_inputs(runner: CliRunner, tmp_path: Path, classes_file: Path) -> None:
    missing = tmp_path / "missing.json"
    assert_user_error(init_model(runner, tmp_path / "a.safetensors", missing), str(missing))
    assert_user_error(
        init_model(runner, tmp_path / "b.safetensors", classes_file, "--arch", "segformer-b9"), "segformer-b9"
    )
    assert_user_error(
        init_model(runner, tmp_path / "c.safetensors", classes_file, "--arch-override", "nonsense"),
        "KEY=VALUE",
    )
    assert_user_error(init_model(runner, tmp_path / "nope" / "d.safetensors", classes_file), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_info(runner: CliRunner, model_file: Path) -> None:
    result = cli(runner, "info", model_file)
    assert result.exit_code == 0, result.output
    assert "tiny-test" in result.output
    assert "red (band 1), green (band 2), blue (band 3), nir (band 4)" in result.output
    assert "Cultivated" in result.output
    assert file_sha256(model_file) in result.output
    result = cli(runner, "info", model_file, "--json")
    data = json.loads(result.output)
    assert data["sha256"] == file_sha256(model_file)
    assert data["tile_size"] == 64


def test_info_describes_the_network(runner: CliRunner, tmp_path: Path, classes_file: Path) -> None:
    # The variant's name alone does not say that a model was reduced or given a pixel head.
    out = tmp_path / "px.safetensors"
    result = init_model(runner, out, classes_file, "--arch-override", "strides=2,2,2,2",
                        "--arch-override", "pixel_head_channels=5")
    assert result.exit_code == 0, result.output
    lines = [line for line in cli(runner, "info", out).output.splitlines() if line.startswith("network:")]
    weights = sum(p.numel() for p in load_model(out).module.parameters())
    assert count_weights(out) == weights  # the header's shapes, BatchNorm statistics left out
    assert lines == [
        "network:       widths 8-8-16-16, depths 1-1-1-1, heads 1-1-2-2, decoder 16; "
        f"logits at full resolution (a per-pixel head of 5); {weights / 1e6:.2f} M weights"
    ]
    plain = tmp_path / "plain.safetensors"
    assert init_model(runner, plain, classes_file, "--arch-override", "strides=2,2,2,2").exit_code == 0
    assert "logits at 1/2 resolution" in cli(runner, "info", plain).output


def test_info_on_a_bad_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 100)
    assert_user_error(cli(runner, "info", path), str(path))


# --- predict ---------------------------------------------------------------------------------------------


def test_predict_writes_a_complete_labelled_raster(
    runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path
) -> None:
    dst = tmp_path / "out" / "landcover.tif"
    dst.parent.mkdir()
    result = predict(runner, scene, dst, model_file)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in dst.parent.iterdir()) == ["landcover.tif", "landcover.tif.aux.xml"]
    with rasterio.open(scene) as src, rasterio.open(dst) as out:
        assert (out.width, out.height, out.count) == (src.width, src.height, 1)
        assert out.crs == src.crs and out.transform == src.transform
        assert out.dtypes == ("uint8",) and out.nodata == 255
        assert out.profile["tiled"] and out.profile["compress"] == "deflate"
        labels = out.read(1)
        tags = out.tags()
        cmap = out.colormap(1)
    assert set(np.unique(labels)) <= {1, 4, 7}
    assert tags["GEOSEG_MODEL"] == "tiny-test"
    assert tags["GEOSEG_MODEL_SHA256"] == file_sha256(model_file)
    assert (tags["GEOSEG_TILE"], tags["GEOSEG_OVERLAP"]) == ("64", "16")
    assert tags["GEOSEG_PRECISION"] in ("fp32", "bf16")
    assert tags["GEOSEG_VERSION"]
    assert (tags["CLASS_1"], tags["CLASS_4"], tags["CLASS_7"]) == ("Water", "Forest", "Cultivated")
    assert cmap[4] == (0x68, 0xAA, 0x63, 255)


def test_quiet_prints_nothing(runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path) -> None:
    result = predict(runner, scene, tmp_path / "out.tif", model_file, "-q")
    assert result.exit_code == 0
    assert result.output == ""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_flag(
    runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path, precision: str
) -> None:
    dst = tmp_path / "out.tif"
    result = predict(runner, scene, dst, model_file, "--precision", precision)
    assert result.exit_code == 0, result.output
    assert tags_of(dst)["GEOSEG_PRECISION"] == precision


def test_existing_destination_and_overwrite(
    runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path
) -> None:
    dst = tmp_path / "out.tif"
    dst.write_bytes(b"precious")
    assert_user_error(predict(runner, scene, dst, model_file), str(dst), "already exists", "--overwrite")
    assert dst.read_bytes() == b"precious"
    result = predict(runner, scene, dst, model_file, "--overwrite")
    assert result.exit_code == 0, result.output
    with rasterio.open(dst) as out:
        assert out.shape == (110, 150)


def test_band_selection_and_nodata_override(
    runner: CliRunner, tmp_path: Path, make_scene, model_file: Path
) -> None:
    data = np.random.default_rng(0).integers(1, 10000, (8, 60, 70)).astype(np.uint16)
    data[:, :, :10] = 7  # the true nodata value; the file claims none
    src = make_scene(data=data)
    dst = tmp_path / "out.tif"
    result = predict(runner, src, dst, model_file, "--bands", "4,3,2,8", "--nodata", 7)
    assert result.exit_code == 0, result.output
    with rasterio.open(dst) as out:
        labels = out.read(1)
        assert out.tags()["GEOSEG_BANDS"] == "4,3,2,8"
    assert (labels[:, :10] == 255).all() and (labels[:, 10:] != 255).all()


def test_missing_crs_warns_and_copies_the_transform(
    runner: CliRunner, tmp_path: Path, make_scene, model_file: Path
) -> None:
    rotated = Affine.translation(1000, 2000) @ Affine.rotation(15) @ Affine.scale(2, -2)
    src = make_scene(width=70, height=50, crs=None, transform=rotated)
    dst = tmp_path / "out.tif"
    result = predict(runner, src, dst, model_file)
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.output and "no CRS" in result.output
    with rasterio.open(dst) as out:
        assert out.crs is None
        assert out.transform == rotated


def test_all_nodata_scene_warns(runner: CliRunner, tmp_path: Path, make_scene, model_file: Path) -> None:
    src = make_scene(data=np.zeros((4, 50, 60)), nodata=0)
    dst = tmp_path / "out.tif"
    result = predict(runner, src, dst, model_file)
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.output and "no valid pixel" in result.output
    with rasterio.open(dst) as out:
        assert (out.read(1) == 255).all()
        assert out.crs == rasterio.crs.CRS.from_epsg(32618)


# --- config precedence: defaults < model < --config < flags -------------------------------------------------


@pytest.fixture(scope="module")
def model_96_24(tmp_path_factory: pytest.TempPathFactory, classes_file: Path) -> Path:
    out = tmp_path_factory.mktemp("cli-model-96") / "m96.safetensors"
    result = init_model(CliRunner(), out, classes_file, "--tile-size", 96, "--overlap", 24)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    ("yaml_text", "flags", "expected"),
    [
        (None, [], ("96", "24")),  # the model's suggestion beats the built-in 512/64
        ("tile: 64\n", [], ("64", "24")),  # the file beats the model
        ("tile: 64\noverlap: 8\n", ["--overlap", "4"], ("64", "4")),  # a flag beats the file
        ("tile: 64\noverlap: 8\n", ["--tile", "128"], ("128", "8")),  # only the flags given override
        ("batch-size: 2\n", ["--tile", "48", "--overlap", "0"], ("48", "0")),
    ],
)
def test_config_precedence(
    runner: CliRunner,
    tmp_path: Path,
    make_scene,
    model_96_24: Path,
    yaml_text: str | None,
    flags: list[str],
    expected: tuple[str, str],
) -> None:
    src = make_scene(width=300, height=200)
    dst = tmp_path / "out.tif"
    extra = list(flags)
    if yaml_text is not None:
        config = tmp_path / "preset.yaml"
        config.write_text(yaml_text)
        extra += ["--config", str(config)]
    result = predict(runner, src, dst, model_96_24, *extra)
    assert result.exit_code == 0, result.output
    tags = tags_of(dst)
    assert (tags["GEOSEG_TILE"], tags["GEOSEG_OVERLAP"]) == expected


def test_model_path_in_a_config_file_is_relative_to_the_file(
    runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path
) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "model.safetensors").write_bytes(model_file.read_bytes())
    config = presets / "p.yaml"
    config.write_text("model: model.safetensors\ndevice: cpu\n")
    result = cli(runner, "predict", scene, tmp_path / "out.tif", "--config", config)
    assert result.exit_code == 0, result.output
    assert tags_of(tmp_path / "out.tif")["GEOSEG_MODEL_SHA256"] == file_sha256(model_file)


def test_unknown_yaml_key_fails_loudly(
    runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("tile: 64\ntile_overlap: 8\n")
    dst = tmp_path / "out.tif"
    assert_user_error(
        predict(runner, scene, dst, model_file, "--config", config), str(config), "tile_overlap"
    )
    assert not dst.exists()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("tile: 8\n", "tile must be"),
        ("trace: 3\n", "trace must be"),
        # each of these was a Python traceback or a multi-line message
        ("nodata: abc\n", "nodata must be a number"),
        ("nodata: [0]\n", "nodata must be a number"),
        ("threads: true\n", "threads must be a positive integer"),
        ("taper_floor: abc\n", "taper_floor must be"),
        ('bands: "0,1,2,3"\n', "1-based band numbers"),
        ("tile: [1\n", "not valid YAML (line 2, column 1: expected ',' or ']'"),
    ],
)
def test_a_bad_value_in_a_config_file_names_the_file(
    runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path, text: str, fragment: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    dst = tmp_path / "out.tif"
    assert_user_error(predict(runner, scene, dst, model_file, "--config", config), str(config), fragment)
    assert not dst.exists()


def test_output_nodata_flag(runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path) -> None:
    dst = tmp_path / "out.tif"
    result = predict(runner, scene, dst, model_file, "--output-nodata", "200")
    assert result.exit_code == 0, result.output
    with rasterio.open(dst) as out:
        assert out.nodata == 200 and out.colormap(1)[200][3] == 0
    assert_user_error(predict(runner, scene, tmp_path / "o2.tif", model_file, "--output-nodata", "1"),
                      str(model_file), "class id 1 is also the output nodata value")


def test_a_bad_flag_beside_a_good_config_file_does_not_blame_the_file(
    runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path
) -> None:
    config = tmp_path / "good.yaml"
    config.write_text("batch_size: 2\n")
    result = predict(runner, scene, tmp_path / "out.tif", model_file, "--config", config, "--tile", "8")
    message = assert_user_error(result, "'--tile'", code=2)
    assert str(config) not in message


# --- bad input: one line, exit 1, no output ---------------------------------------------------------------


def _truncated(make_scene, tmp_path: Path) -> Path:
    path = make_scene("truncated.tif", width=200, height=200)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _text(make_scene, tmp_path: Path) -> Path:
    path = tmp_path / "notes.tif"
    path.write_text("this is not a raster\n")
    return path


SRC_CASES = {
    "missing": (lambda make_scene, tmp: tmp / "missing.tif", ["file not found"]),
    "folder": (lambda make_scene, tmp: tmp, ["not a raster"]),
    "text": (_text, ["not a raster"]),
    "truncated": (_truncated, ["read failed"]),
    "three-bands": (lambda make_scene, tmp: make_scene("rgb.tif", count=3), ["3 band(s)", "--bands"]),
    "complex": (
        lambda make_scene, tmp: make_scene("c.tif", dtype="complex64", width=20, height=20),
        ["unsupported data type complex64"],
    ),
}


@pytest.mark.parametrize("case", list(SRC_CASES))
def test_bad_input_scene(runner: CliRunner, tmp_path: Path, make_scene, model_file: Path, case: str) -> None:
    make_src, fragments = SRC_CASES[case]
    src = make_src(make_scene, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    line = assert_user_error(predict(runner, src, out / "labels.tif", model_file), str(src), *fragments)
    assert "previous exception" not in line
    assert list(out.iterdir()) == []


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without permission"
)
def test_unreadable_input_scene(runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path) -> None:
    scene.chmod(0)
    try:
        assert_user_error(predict(runner, scene, tmp_path / "out.tif", model_file), str(scene))
    finally:
        scene.chmod(0o644)
    assert not (tmp_path / "out.tif").exists()


@pytest.mark.parametrize(
    ("args", "fragments", "code"),
    [
        (["--bands", "1,2,3,9"], ["band 9 is out of range", "4 bands"], 1),
        (["--bands", "1,2"], ["lists 2 bands", "needs 4"], 1),
        (["--tile", "64", "--overlap", "32"], ["less than half the tile"], 1),
        (["--overlap", "40"], ["less than half the tile"], 1),  # the model's tile is 64
        (["--precision", "fp16"], ["fp16 is for CUDA"], 1),
        (["--device", "tpu"], ["device must be"], 1),
        # malformed values are usage errors, as click's own type checks are
        (["--bands", "red,nir"], ["'--bands'", "1-based band numbers"], 2),
        (["--bands", "0,1,2,3"], ["'--bands'", "1-based band numbers"], 2),
        (["--tile", "0"], ["'--tile'"], 2),
        (["--tile", "-64"], ["'--tile'"], 2),
        (["--overlap", "-1"], ["'--overlap'"], 2),
        (["--batch-size", "0"], ["'--batch-size'"], 2),
    ],
)
def test_settings_that_make_no_sense(
    runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path, args: list[str], fragments: list[str],
    code: int,
) -> None:
    dst = tmp_path / "out.tif"
    assert_user_error(predict(runner, scene, dst, model_file, *args), *fragments, code=code)
    assert not dst.exists()


def test_cuda_without_cuda(runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_user_error(predict(runner, scene, tmp_path / "out.tif", model_file, "--device", "cuda:0"), "CUDA")


def test_usage_errors_exit_2(runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path) -> None:
    assert_user_error(
        predict(runner, scene, tmp_path / "o.tif", model_file, "--tile", "big"), "--tile", code=2
    )
    assert_user_error(predict(runner, scene, tmp_path / "o.tif", model_file, "--precision", "fp8"), code=2)
    assert cli(runner, "predict", scene).exit_code == 2


def test_bad_destinations(runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path) -> None:
    before = scene.read_bytes()
    assert_user_error(
        predict(runner, scene, scene, model_file, "--overwrite"), str(scene), "destination is the input"
    )
    assert scene.read_bytes() == before
    missing = tmp_path / "no" / "such" / "out.tif"
    assert_user_error(predict(runner, scene, missing, model_file), str(missing), "does not exist")
    assert not (tmp_path / "no").exists()


def _write_bytes(content: bytes):
    def make(tmp_path: Path, good: Path) -> Path:
        path = tmp_path / "model.safetensors"
        path.write_bytes(content)
        return path

    return make


def _truncated_model(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "truncated.safetensors"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _mismatched_model(tmp_path: Path, good: Path) -> Path:
    # metadata for 4 bands, weights of a 3-band network
    from geoseg.modelfile import build_network, new_metadata, read_metadata, save_model

    meta = read_metadata(good)
    tiny = {
        k: meta.arch_config[k]
        for k in ("hidden_sizes", "depths", "num_attention_heads", "decoder_hidden_size")
    }
    three = new_metadata("segformer-b0", ["red", "green", "blue"], list(meta.classes), arch_overrides=tiny)
    path = tmp_path / "mismatched.safetensors"
    save_model(path, build_network(three).state_dict(), meta)
    return path


def _plain_safetensors(tmp_path: Path, good: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    return path


MODEL_CASES = {
    "missing": (lambda tmp, good: tmp / "missing.safetensors", ["model file not found"]),
    "random-bytes": (_write_bytes(np.random.default_rng(1).bytes(3000)), ["not a safetensors model file"]),
    "empty": (_write_bytes(b""), ["not a safetensors model file"]),
    "truncated": (_truncated_model, ["not a safetensors model file"]),
    "incompatible": (_mismatched_model, ["weights do not match the architecture"]),
    "no-geoseg-metadata": (_plain_safetensors, ["without geoseg metadata"]),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_file(runner: CliRunner, tmp_path: Path, scene: Path, model_file: Path, case: str) -> None:
    make_model, fragments = MODEL_CASES[case]
    model = make_model(tmp_path, model_file)
    out = tmp_path / "out"
    out.mkdir()
    assert_user_error(predict(runner, scene, out / "labels.tif", model), str(model), *fragments)
    assert list(out.iterdir()) == []


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path(self.marker).touch, ())


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt"])
def test_pickle_payload_is_refused_and_never_runs(
    runner: CliRunner, tmp_path: Path, scene: Path, name: str
) -> None:
    import torch

    marker = tmp_path / "PWNED"
    model = tmp_path / name
    torch.save({"state_dict": {}, "hook": Payload(marker)}, model)
    dst = tmp_path / "out.tif"
    assert_user_error(predict(runner, scene, dst, model), str(model))
    assert not marker.exists(), "the pickle payload ran"
    assert not dst.exists()
    # The payload is real: unpickling runs it (copied to .pt, as torch.load reads .safetensors itself).
    copy = tmp_path / "copy.pt"
    copy.write_bytes(model.read_bytes())
    torch.load(copy, weights_only=False)
    assert marker.exists()


# --- real processes: signals and stderr ------------------------------------------------------------------


def geoseg_cmd(*args: Any) -> list[str]:
    return [sys.executable, "-m", "geoseg", *map(str, args)]


def test_real_process_bad_input_is_one_line(tmp_path: Path, make_scene, model_file: Path) -> None:
    src = _truncated(make_scene, tmp_path)
    dst = tmp_path / "out.tif"
    proc = subprocess.run(
        geoseg_cmd("predict", src, dst, "--model", model_file, "--device", "cpu", "--threads", 1),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and str(src) in errors[0] and "read failed" in errors[0], proc.stderr
    assert all(line.startswith(("Error: ", "INFO: ", "Warning: ")) for line in lines), proc.stderr
    assert not any("GDAL signalled" in line for line in lines), "GDAL's own log lines must not reach the user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.tif"]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 KiB tmpfs, for a full disk; skipped where mounting is not allowed (not root, a container)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("left_kib", [4, 20])  # the class map does not fit; the map fits, its sidecar not
def test_a_full_disk_is_one_line_naming_the_output(runner: CliRunner, tiny_disk: Path, left_kib: int) -> None:
    sample = Path(__file__).parents[1] / "sample_data" / "zion_sample.tif"  # the bundled model's map: 17 KiB
    filler = tiny_disk / "filler"
    filler.write_bytes(b"x" * ((32 - left_kib) << 10))
    dst = tiny_disk / "out.tif"
    result = cli(runner, "predict", sample, dst, "--device", "cpu")
    assert_user_error(result, f"{dst}: write failed (no space left on device)")
    assert list(tiny_disk.iterdir()) == [filler]


@pytest.fixture
def long_run(tmp_path: Path, make_scene, model_file: Path):
    """Start ``geoseg predict`` on a scene that takes a while; yield (process, out folder, dst)."""
    src = make_scene("big.tif", width=1600, height=1600, dtype="uint8")
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "labels.tif"
    # tile 32 with overlap 15 and one tile per batch: thousands of forward passes
    proc = subprocess.Popen(
        geoseg_cmd(
            "predict",
            src,
            dst,
            "--model",
            model_file,
            "--device",
            "cpu",
            "--threads",
            1,
            "--tile",
            32,
            "--overlap",
            15,
            "--batch-size",
            1,
            "-q",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, out, dst
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def wait_until_writing(proc: subprocess.Popen, out: Path) -> None:
    """Wait for the temporary output to appear (the run is under way), then a little more."""
    deadline = time.monotonic() + 120
    while not any(".geoseg-tmp" in p.name for p in out.iterdir()):
        assert proc.poll() is None, f"geoseg ended early: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "geoseg never started writing"
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the run finished before it could be interrupted; use a bigger scene"


def test_sigterm_mid_run_leaves_nothing(long_run) -> None:
    proc, out, dst = long_run
    wait_until_writing(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == [], "SIGTERM must remove the temporary output and leave nothing under DST"


def test_sigkill_mid_run_leaves_nothing_under_dst(long_run) -> None:
    proc, out, dst = long_run
    wait_until_writing(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    assert not Path(f"{dst}.aux.xml").exists()
    # A killed process cannot clean up: only its hidden temporary file may remain.
    assert all(p.name.startswith(".") and ".geoseg-tmp" in p.name for p in out.iterdir())
