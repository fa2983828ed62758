"""The model file: safetensors + JSON metadata, loaded without ever unpickling."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from geoseg.errors import CheckpointError, ConfigError, OutputError
from geoseg.modelfile import (
    METADATA_KEY,
    BandSpec,
    ClassSpec,
    ModelMetadata,
    Normalization,
    build_network,
    check_not_an_input,
    file_sha256,
    load_classes,
    load_model,
    new_metadata,
    read_metadata,
    save_model,
)


class Payload:
    """Pickles to a call that creates a marker file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path(self.marker).touch, ())


def write_pickle(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, path)
    assert not marker.exists()
    return path


def test_round_trip_keeps_metadata_and_weights(tmp_path: Path, tiny_metadata) -> None:
    meta = tiny_metadata(resolution_m=10.0, description="test", provenance={"seed": 3})
    torch.manual_seed(0)
    network = build_network(meta)
    path = tmp_path / "m.safetensors"
    save_model(path, network.state_dict(), meta)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file is left"
    assert read_metadata(path) == meta
    loaded = load_model(path)
    assert loaded.metadata == meta
    assert loaded.path == path
    assert loaded.sha256 == file_sha256(path)
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    for key, tensor in network.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], tensor, rtol=0, atol=0)


def test_half_precision_file_loads_as_fp32(tmp_path: Path, tiny_metadata) -> None:
    meta = tiny_metadata()
    network = build_network(meta)
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_model(full, network.state_dict(), meta)
    save_model(half, network.state_dict(), meta, half=True)
    assert half.stat().st_size < full.stat().st_size * 0.7
    loaded = load_model(half)
    for key, tensor in network.state_dict().items():
        got = loaded.module.state_dict()[key]
        assert got.dtype == tensor.dtype
        torch.testing.assert_close(got, tensor, rtol=1e-3, atol=1e-3)


def test_sha256_is_the_file_hash(tiny_model_file: Path) -> None:
    import hashlib

    assert file_sha256(tiny_model_file) == hashlib.sha256(tiny_model_file.read_bytes()).hexdigest()


# --- files that are not geoseg models ----------------------------------------------------------------


def test_missing_model_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.safetensors"
    for fn in (read_metadata, load_model):
        with pytest.raises(CheckpointError, match="model file not found") as err:
            fn(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("kind", ["random", "truncated", "header-only", "empty", "text"])
def test_corrupt_model_files(tmp_path: Path, tiny_model_file: Path, kind: str) -> None:
    data = tiny_model_file.read_bytes()
    content = {
        "random": np.random.default_rng(0).bytes(4096),
        "truncated": data[: len(data) // 2],
        "header-only": data[:64],
        "empty": b"",
        "text": b"hello world\n",
    }[kind]
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(content)
    for fn in (read_metadata, load_model):
        with pytest.raises(CheckpointError) as err:
            fn(path)
        message = str(err.value)
        assert message.startswith(str(path))
        assert "\n" not in message


def test_safetensors_without_geoseg_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="without geoseg metadata .*geoseg import-weights"):
        load_model(path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("format"), "format marker"),
        (lambda d: d.update(format_version=99), "version 99"),
        (lambda d: d.pop("bands"), "corrupt geoseg metadata"),
        (lambda d: d.update(classes=[]), "corrupt geoseg metadata"),
        # another tool's 1.0 or a hand-edited 1.5: refused here, not when the output is written
        (lambda d: d["classes"][0].update(id=1.5), "class ids must be integers"),
        (lambda d: d["classes"][0].update(id=1.0), "class ids must be integers"),
    ],
)
def test_corrupt_metadata(tmp_path: Path, tiny_metadata, mutate, message: str) -> None:
    meta = tiny_metadata()
    data = json.loads(meta.to_json())
    mutate(data)
    path = tmp_path / "bad.safetensors"
    save_file(build_network(meta).state_dict(), str(path), metadata={METADATA_KEY: json.dumps(data)})
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


@pytest.mark.parametrize("text", ["{not json", "[" * 100_000])  # the second: too deep for the parser
def test_metadata_that_is_not_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={METADATA_KEY: text})
    with pytest.raises(CheckpointError, match="corrupt geoseg metadata"):
        read_metadata(path)


def test_weights_for_other_bands_are_incompatible(tmp_path: Path, tiny_metadata) -> None:
    # metadata for 4 bands, weights of a 3-band network
    weights = build_network(tiny_metadata(band_names=("red", "green", "blue"))).state_dict()
    path = tmp_path / "mixed.safetensors"
    save_model(path, weights, tiny_metadata())
    with pytest.raises(CheckpointError, match="weights do not match the architecture") as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)
    assert "is (8, 3, 7, 7), the architecture's (8, 4, 7, 7)" in str(err.value)  # the first embedding


def test_missing_tensor_is_incompatible(tmp_path: Path, tiny_metadata) -> None:
    meta = tiny_metadata()
    weights = dict(build_network(meta).state_dict())
    first = next(iter(weights))
    weights.pop(first)
    path = tmp_path / "partial.safetensors"
    save_model(path, weights, meta)
    with pytest.raises(CheckpointError, match=f"weights do not match the architecture \\(missing {first}\\)"):
        load_model(path)


def test_architecture_that_disagrees_with_the_metadata(tmp_path: Path, tiny_metadata) -> None:
    meta = tiny_metadata()
    config = dict(meta.arch_config) | {"num_channels": 3}
    bad = ModelMetadata(**{**meta.__dict__, "arch_config": config})
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={METADATA_KEY: bad.to_json()})
    with pytest.raises(CheckpointError, match="3 inputs .* metadata lists 4 bands"):
        load_model(path)


def test_unknown_architecture(tmp_path: Path, tiny_metadata) -> None:
    meta = tiny_metadata()
    bad = ModelMetadata(**{**meta.__dict__, "architecture": "unet"})
    path = tmp_path / "unet.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={METADATA_KEY: bad.to_json()})
    with pytest.raises(CheckpointError, match="unknown architecture 'unet'"):
        load_model(path)


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt"])
def test_pickle_payload_never_runs(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "PWNED"
    path = write_pickle(tmp_path / name, marker)
    for fn in (read_metadata, load_model):
        with pytest.raises(CheckpointError) as err:
            fn(path)
        assert str(path) in str(err.value)
    assert not marker.exists()


def test_the_payload_is_real(tmp_path: Path) -> None:
    # Guard for the test above: unpickling this file really does create the marker.
    marker = tmp_path / "PWNED"
    path = write_pickle(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


# --- metadata validation --------------------------------------------------------------------------


def _fields(**changes):
    base = {
        "name": "m",
        "architecture": "segformer",
        "variant": "segformer-b0",
        "arch_config": {},
        "bands": (BandSpec("red", 1), BandSpec("nir", 2)),
        "normalization": Normalization("scale", scale=(1e-4, 1e-4), offset=(0.0, 0.0)),
        "classes": (ClassSpec(1, "a", "#000000"),),
    }
    return base | changes


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bands": ()}, "at least one input band"),
        ({"bands": (BandSpec("red", 1), BandSpec("red", 2))}, "unique"),
        ({"bands": (BandSpec("red", 0), BandSpec("nir", 2))}, "1-based"),
        ({"normalization": Normalization("minmax")}, "meanstd or scale"),
        ({"normalization": Normalization("scale", scale=(1.0,), offset=(0.0,))}, "one value per band"),
        (
            {"normalization": Normalization("meanstd", mean=(0.0, 0.0), std=(1.0, 0.0))},
            "std must be positive",
        ),
        ({"classes": ()}, "at least one class"),
        ({"classes": (ClassSpec(1, "a", "#000000"), ClassSpec(1, "b", "#000000"))}, "unique"),
        ({"classes": (ClassSpec(70000, "a", "#000000"),)}, "0..65535"),
        ({"classes": (ClassSpec(1, "a", "red"),)}, "#rrggbb"),
        ({"normalization": Normalization("scale", scale=(0.0, 1.0), offset=(0.0, 0.0))}, "finite and non-zero"),
        ({"tile_size": -64}, r"tile size must be positive \(0: no suggestion\), got -64"),
        ({"tile_size": 100, "overlap": 50}, "overlap 50 must be less than half the tile 100"),
        ({"overlap": -1}, "overlap must be >= 0"),
    ],
)
def test_metadata_validation(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelMetadata(**_fields(**changes))


def test_normalisation_as_multiplier_and_bias() -> None:
    mul, bias = Normalization("meanstd", mean=(10.0, 20.0), std=(2.0, 4.0)).multiplier_and_bias()
    assert mul == (0.5, 0.25) and bias == (-5.0, -5.0)
    assert Normalization("scale", scale=(1e-4,), offset=(0.5,)).multiplier_and_bias() == ((1e-4,), (0.5,))


def test_class_colour_as_rgba() -> None:
    assert ClassSpec(3, "x", "#10a0FF").rgba == (16, 160, 255, 255)


def test_new_metadata(tiny_metadata) -> None:
    meta = tiny_metadata(source_bands=(4, 3, 2, 8))
    assert meta.band_names == ["red", "green", "blue", "nir"]
    assert [b.source_band for b in meta.bands] == [4, 3, 2, 8]
    assert meta.arch_config["num_channels"] == 4 and meta.arch_config["num_labels"] == 3
    assert meta.arch_config["hidden_sizes"] == [8, 8, 16, 16]
    assert (meta.tile_size, meta.overlap) == (64, 16)
    with pytest.raises(ConfigError, match="unknown SegFormer variant"):
        new_metadata("segformer-b9", ["red"], [ClassSpec(1, "a", "#000000")])
    with pytest.raises(ConfigError, match="source bands"):
        tiny_metadata(source_bands=(1, 2))


# --- classes files -------------------------------------------------------------------------------------


def test_load_classes(tmp_path: Path, shared_data: Path) -> None:
    classes, ignore = load_classes(shared_data / "zion-landsat8-nlcd" / "classes.json")
    assert ignore == 0
    assert [c.id for c in classes] == list(range(1, 9))
    assert classes[0] == ClassSpec(1, "Water", "#476ba0")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not a classes file"),
        ('{"classes": [{"id": 1}]}', "not a classes file"),
        ('{"classes": []}', "no classes listed"),
        (
            '{"classes": [{"id": 1, "name": "a", "color": "#000000"}, '
            '{"id": 1, "name": "b", "color": "#000000"}]}',
            "not unique",
        ),
        ('{"classes": [{"id": 1, "name": "a", "color": "black"}]}', "#rrggbb"),
        ('{"ignore_index": 1, "classes": [{"id": 1, "name": "a", "color": "#000000"}]}', "also a class id"),
        ('{"ignore_index": "x", "classes": [{"id": 1, "name": "a", "color": "#000000"}]}',
         r"ignore_index must be an integer in 0\.\.65535, got 'x'"),
        ('{"ignore_index": 70000, "classes": [{"id": 1, "name": "a", "color": "#000000"}]}',
         "ignore_index must be an integer"),
        ('{"classes": [{"id": -1, "name": "a", "color": "#000000"}]}', r"class ids must be integers in 0\.\.65535"),
        ('{"classes": [{"id": 1.5, "name": "a", "color": "#000000"}]}', "class ids are integers, got 1.5"),
        ('{"classes": [{"id": true, "name": "a", "color": "#000000"}]}', "class ids are integers"),
        ('{"classes": [{"id": 1, "name": "Water", "color": "#000000"}, '
         '{"id": 2, "name": "water ", "color": "#000000"}]}', r"class names are not unique \(case is ignored\)"),
        ('{"classes": [{"id": 1, "name": null, "color": "#000000"}]}', "class names must be non-empty text"),
    ],
)
def test_bad_classes_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "classes.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_classes(path)
    assert str(path) in str(err.value)


def test_missing_classes_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read classes file"):
        load_classes(tmp_path / "missing.json")


def test_model_files_follow_the_umask(tmp_path: Path, tiny_metadata) -> None:
    """safetensors creates 0600 files; a model is written with 0666 less the umask, like other outputs."""
    import os
    import stat

    meta = tiny_metadata()
    network = build_network(meta)
    previous = os.umask(0o022)
    try:
        save_model(tmp_path / "shared.safetensors", network.state_dict(), meta)
        os.umask(0o077)
        save_model(tmp_path / "private.safetensors", network.state_dict(), meta)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.safetensors").stat().st_mode) == 0o600


def test_an_output_may_not_be_an_input(tmp_path: Path) -> None:
    classes = tmp_path / "classes.json"
    classes.write_text("{}")
    check_not_an_input(tmp_path / "model.safetensors", {"classes file": str(classes), "labels": ["a.tif", None]})
    for given in (classes, tmp_path / "." / "classes.json"):
        with pytest.raises(OutputError, match=r"--out is an input of this run \(classes file\); choose another file"):
            check_not_an_input(given, {"classes file": str(classes)})
    link = tmp_path / "link.json"
    link.symlink_to(classes)
    with pytest.raises(OutputError, match=r"OUT is an input of this run \(labels\)"):
        check_not_an_input(link, {"labels": [str(tmp_path / "x.tif"), str(classes)]}, option="OUT")
