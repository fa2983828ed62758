"""PredictConfig validation, YAML presets and the precedence between settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from geoseg.config import (
    PredictConfig,
    build_config,
    config_from_mapping,
    config_keys,
    load_config_file,
    parse_band_list,
)
from geoseg.errors import ConfigError


def test_defaults_are_valid_and_leave_tiles_to_the_model() -> None:
    config = PredictConfig()
    assert config.tile is None and config.overlap is None
    assert (config.batch_size, config.device, config.precision, config.output_nodata) == (
        4,
        "auto",
        "auto",
        255,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tile": 0}, "tile must be an integer of at least 32"),
        ({"tile": -64}, "tile must be"),
        ({"tile": 31}, "tile must be"),
        ({"tile": 64.0}, "tile must be"),
        ({"overlap": -1}, "overlap must be a non-negative integer"),
        ({"tile": 64, "overlap": 32}, "less than half the tile"),
        ({"tile": 64, "overlap": 100}, "less than half the tile"),
        ({"batch_size": 0}, "batch_size"),
        ({"bands": ()}, "bands must be 1-based"),
        ({"bands": (0, 1)}, "bands must be 1-based"),
        ({"device": "gpu"}, "device must be"),
        ({"device": "cuda:x"}, "device must be"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"taper_floor": 0.0}, "taper_floor"),
        ({"taper_floor": 1.5}, "taper_floor"),
        ({"output_nodata": -1}, "output_nodata"),
        ({"output_nodata": 65536}, "output_nodata"),
        ({"compress": "jpeg"}, "compress must be one of"),
        ({"prefetch_batches": 0}, "prefetch_batches"),
        ({"threads": 0}, "threads"),
        ({"parallel_batches": 0}, "parallel_batches must be a positive integer"),
        ({"parallel_batches": True}, "parallel_batches must be a positive integer"),
        ({"parallel_batches": 1.5}, "parallel_batches must be a positive integer"),
        # YAML gives true/false, strings and lists where a number was meant
        ({"threads": True}, "threads must be a positive integer"),
        ({"batch_size": True}, "batch_size must be a positive integer"),
        ({"tile": True}, "tile must be"),
        ({"nodata": "abc"}, "nodata must be a number"),
        ({"nodata": [0]}, "nodata must be a number"),
        ({"nodata": False}, "nodata must be a number"),
        ({"taper_floor": "abc"}, "taper_floor must be"),
        ({"model": 5}, "model must be a path"),
    ],
)
def test_nonsense_values_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PredictConfig(**changes)
    with pytest.raises(ConfigError, match=message):
        PredictConfig().replace(**changes)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names(device: str) -> None:
    assert PredictConfig(device=device).device == device


def test_largest_overlap_below_half_the_tile_is_fine() -> None:
    assert PredictConfig(tile=64, overlap=31).overlap == 31


def test_config_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        PredictConfig(tile=0)


def test_mapping_keys_accept_dashes_and_coerce_bands() -> None:
    settings = config_from_mapping({"batch-size": 2, "bands": [4, 3, 2, 8], "tile": 128})
    assert settings == {"batch_size": 2, "bands": (4, 3, 2, 8), "tile": 128}
    assert config_from_mapping({"bands": "4,3,2,8"})["bands"] == (4, 3, 2, 8)
    assert PredictConfig(**settings).bands == (4, 3, 2, 8)


def test_unknown_keys_fail_loudly_naming_the_source() -> None:
    with pytest.raises(ConfigError, match=r"preset.yaml: unknown key 'tiles'.*known keys: .*tile"):
        config_from_mapping({"tiles": 512}, source="preset.yaml")


def test_bands_of_the_wrong_type() -> None:
    with pytest.raises(ConfigError, match="bands must be a list"):
        config_from_mapping({"bands": 4})


def test_every_field_is_a_known_key() -> None:
    assert set(config_keys()) >= {
        "model",
        "tile",
        "overlap",
        "batch_size",
        "bands",
        "nodata",
        "device",
        "precision",
    }


def test_load_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "fast.yaml"
    path.write_text("tile: 256\noverlap: 32\nbatch-size: 8\nbands: [1, 2, 3, 4]\nprecision: bf16\n")
    assert load_config_file(path) == {
        "tile": 256,
        "overlap": 32,
        "batch_size": 8,
        "bands": (1, 2, 3, 4),
        "precision": "bf16",
    }


def test_empty_yaml_file_means_no_settings(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config_file(path) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tile: [1, 2\n", "not valid YAML"),
        ("- tile\n- 256\n", "expected a mapping"),
        ("tile: 256\nfoo: 1\n", "unknown key 'foo'"),
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config_file(path)
    assert str(path) in str(err.value)


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "missing.yaml")


def test_cli_flags_given_override_the_file_and_the_rest_is_kept() -> None:
    file_settings = {"tile": 256, "overlap": 32, "batch_size": 8}
    config = build_config(file_settings, tile=128, overlap=None, batch_size=None, device="cpu")
    assert (config.tile, config.overlap, config.batch_size, config.device) == (128, 32, 8, "cpu")
    assert build_config().tile is None


def test_build_config_turns_type_errors_into_config_errors() -> None:
    with pytest.raises(ConfigError, match="tile"):
        build_config({"tile": "big"})
    with pytest.raises(ConfigError):
        build_config({"model": "m.safetensors"}, tile=0)


@pytest.mark.parametrize(
    ("text", "bands"), [("4,3,2,8", (4, 3, 2, 8)), (" 1, 2 ,3 ", (1, 2, 3)), ("5,", (5,))]
)
def test_parse_band_list(text: str, bands: tuple[int, ...]) -> None:
    assert parse_band_list(text) == bands


@pytest.mark.parametrize("text", ["", "a,b", "0,1", "-1", "1.5"])
def test_parse_band_list_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="1-based band numbers"):
        parse_band_list(text)


def test_model_path_in_a_config_file_is_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "presets"
    folder.mkdir()
    path = folder / "p.yaml"
    path.write_text("model: models/m.safetensors\n")
    assert load_config_file(path)["model"] == str(folder / "models" / "m.safetensors")
    path.write_text(f"model: {tmp_path / 'abs.safetensors'}\n")
    assert load_config_file(path)["model"] == str(tmp_path / "abs.safetensors")


# Predict presets are configs/predict-*.yaml; training configs live beside them under other names.
PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("predict-*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_shipped_presets_are_valid(preset: Path) -> None:
    settings = load_config_file(preset)
    assert settings, f"{preset.name} sets nothing"
    PredictConfig(**settings)


def test_default_preset_lists_every_key_with_its_default() -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "predict-default.yaml"
    if not path.exists():
        pytest.skip("no predict-default.yaml preset")
    settings = load_config_file(path)
    assert set(settings) == set(config_keys())
    assert PredictConfig(**settings) == PredictConfig()
