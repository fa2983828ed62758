"""Tests for geoseg.hf_import and ``geoseg import-weights``: transformers folders written by the test itself."""

from __future__ import annotations

import inspect
import json
import pathlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner, Result

from geoseg.cli import main
from geoseg.errors import CheckpointError, ConfigError
from geoseg.hf_import import (
    expand_patch_embedding,
    import_weights,
    match_variant,
    read_hf_checkpoint,
    segformer_config_from_hf,
)
from geoseg.modelfile import ClassSpec, build_network, load_model
from geoseg.segformer import SegformerConfig, segformer_config

TINY = {
    "hidden_sizes": [8, 8, 16, 16],
    "depths": [1, 2, 1, 1],
    "num_attention_heads": [1, 1, 2, 2],
    "decoder_hidden_size": 16,
}
LABELS = ["sky", "tree", "road", "water", "grass"]
CLASSES = [ClassSpec(i + 10, name, "#00ff00") for i, name in enumerate(["crop", "forest"])]


def hf_config(**overrides: Any):
    transformers = pytest.importorskip("transformers")
    values = {**TINY, "num_channels": 3, "num_labels": len(LABELS), **overrides}
    values.setdefault("id2label", dict(enumerate(LABELS[: values["num_labels"]])))
    return transformers.SegformerConfig(**values)


def randomize_(model: torch.nn.Module, seed: int = 1) -> None:
    """Perturb every parameter and BatchNorm statistic so all of them reach the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.5 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


def hf_segmenter(**overrides: Any):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(hf_config(**overrides)).eval()
    randomize_(model)
    return model


def save(model: Any, folder: Path, how: str = "safetensors") -> Path:
    """Write ``model`` the way a transformers checkpoint folder can look."""
    from safetensors.torch import load_file

    if how == "v5-names":
        if "save_original_format" not in inspect.signature(model.save_pretrained).parameters:
            pytest.skip("this transformers has no in-memory renaming (before 5.x)")
        model.save_pretrained(folder, save_original_format=False)
    elif how == "sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(folder)
    if how == "bin":
        tensors = load_file(folder / "model.safetensors")
        torch.save(tensors, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


def pixels(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def ours(imported: Any) -> torch.nn.Module:
    network = build_network(imported.metadata)
    network.load_state_dict(imported.state_dict, strict=True)
    return network.eval()


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- identical logits


@pytest.mark.parametrize("how", ["safetensors", "bin", "sharded", "v5-names"])
def test_whole_model_import_gives_identical_logits(tmp_path: Path, how: str) -> None:
    reference = hf_segmenter()
    folder = save(reference, tmp_path / "ckpt", how)
    imported = import_weights(folder, ["red", "green", "blue"])
    assert imported.parts == "whole" and imported.band_expansion is None
    assert [c.name for c in imported.metadata.classes] == LABELS
    network = ours(imported)
    for shape in [(2, 3, 64, 64), (1, 3, 37, 50)]:
        x = pixels(*shape)
        with torch.no_grad():
            torch.testing.assert_close(network(x), reference(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


def test_weights_file_path_and_cli_round_trip(tmp_path: Path) -> None:
    reference = hf_segmenter()
    folder = save(reference, tmp_path / "ckpt")
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(
        main, ["import-weights", str(folder / "model.safetensors"), str(out), "--bands", "red,green,blue"]
    )
    assert result.exit_code == 0, result.output
    assert "whole model" in result.output
    args = ["import-weights", str(folder / "model.safetensors"), str(out), "--bands", "red,green,blue"]
    again = CliRunner().invoke(main, [*args, "--overwrite", "-q"])
    assert again.exit_code == 0 and again.output == "", again.output  # -q: only errors
    loaded = load_model(out)
    x = pixels(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), reference(pixel_values=x).logits, rtol=1e-5, atol=1e-5)
    provenance = loaded.metadata.provenance
    assert provenance["source"] == str((folder / "model.safetensors").resolve())
    assert provenance["hf_model_type"] == "segformer"
    assert provenance["hf_architectures"] == ["SegformerForSemanticSegmentation"]
    assert "hf_name_or_path" in provenance
    assert provenance["imported"] == "whole" and provenance["band_expansion"] is None
    assert list(provenance["source_files"]) == ["model.safetensors"]
    assert "import-weights" in provenance["created_by"]


@pytest.mark.parametrize("head", ["SegformerModel", "SegformerForImageClassification"])
def test_encoder_only_checkpoints_give_identical_features(tmp_path: Path, head: str) -> None:
    """mit-b* style checkpoints: keys without prefix (SegformerModel) or with a classifier to drop."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = getattr(transformers, head)(hf_config(num_labels=7)).eval()
    randomize_(reference)
    folder = save(reference, tmp_path / "mit")
    imported = import_weights(folder, ["red", "green", "blue"], CLASSES)
    assert imported.parts == "encoder"
    assert imported.metadata.provenance["trained"] is False
    assert imported.metadata.provenance["hf_architectures"] == [head]
    assert len(imported.metadata.classes) == 2
    network = ours(imported)
    encoder = reference if head == "SegformerModel" else reference.segformer
    x = pixels(2, 3, 64, 64)
    with torch.no_grad():
        expected = encoder(pixel_values=x, output_hidden_states=True).hidden_states
        got = network.segformer(x)
        assert network(x).shape == (2, 2, 16, 16)
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_classes_decide_between_whole_and_encoder(tmp_path: Path) -> None:
    folder = save(hf_segmenter(), tmp_path / "ckpt")
    bands = ["red", "green", "blue"]
    same = [ClassSpec(i, name.upper(), "#123456") for i, name in enumerate(LABELS)]
    assert import_weights(folder, bands, same).parts == "whole"
    renamed = [ClassSpec(i, f"other{i}", "#123456") for i in range(len(LABELS))]
    assert import_weights(folder, bands, renamed).parts == "encoder"
    assert import_weights(folder, bands, renamed, parts="whole").parts == "whole"
    assert import_weights(folder, bands, parts="encoder", classes=same).parts == "encoder"
    with pytest.raises(ConfigError, match="predicts 5 classes but 2 were given"):
        import_weights(folder, bands, CLASSES, parts="whole")


def test_encoder_only_checkpoint_needs_classes(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = save(transformers.SegformerModel(hf_config()), tmp_path / "mit")
    with pytest.raises(ConfigError, match="encoder-only") as err:
        import_weights(folder, ["red", "green", "blue"])
    one_line(err)
    with pytest.raises(ConfigError, match="no decode head"):
        import_weights(folder, ["red", "green", "blue"], CLASSES, parts="whole")


# --------------------------------------------------------------------------- 3 -> N bands


@pytest.mark.parametrize("new_count", [4, 6, 13])
def test_expand_patch_embedding_is_exactly_what_it_promises(new_count: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 3, 7, 7, generator=gen, dtype=torch.float64)
    bias = torch.randn(32, generator=gen, dtype=torch.float64)
    widened = expand_patch_embedding(weight, new_count)
    scale = 3 / new_count
    assert widened.shape == (32, new_count, 7, 7) and widened.dtype == weight.dtype
    # RGB filters keep their values up to the common factor 3/N ...
    torch.testing.assert_close(widened[:, :3], weight * scale, rtol=0, atol=1e-12)
    # ... every added band starts from the mean of the RGB filters, times the same factor ...
    for band in range(3, new_count):
        torch.testing.assert_close(widened[:, band], weight.mean(1) * scale, rtol=0, atol=1e-12)
    # ... so an input whose bands all hold the same image gives the pretrained activations.
    image = torch.randn(2, 1, 40, 40, generator=gen, dtype=torch.float64)
    expected = F.conv2d(image.expand(-1, 3, -1, -1), weight, bias, stride=4, padding=3)
    got = F.conv2d(image.expand(-1, new_count, -1, -1), widened, bias, stride=4, padding=3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert weight.shape == (32, 3, 7, 7)  # the input is not modified


def test_expand_patch_embedding_edge_cases() -> None:
    weight = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(expand_patch_embedding(weight, 3), weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3"):
        expand_patch_embedding(torch.randn(8, 4, 3, 3), 6)
    with pytest.raises(ValueError, match="at least 3"):
        expand_patch_embedding(weight, 2)


def test_three_band_checkpoint_feeds_four_bands(tmp_path: Path) -> None:
    """The model-level consequence: the same image in every band gives the RGB model's logits."""
    reference = hf_segmenter()
    folder = save(reference, tmp_path / "ckpt")
    imported = import_weights(folder, ["red", "green", "blue", "nir"])
    assert imported.parts == "whole"
    assert "3 -> 4 bands" in imported.band_expansion and "3/4" in imported.band_expansion
    assert imported.metadata.provenance["band_expansion"] == imported.band_expansion
    network = ours(imported)
    image = pixels(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            network(image.expand(-1, 4, -1, -1)),
            reference(pixel_values=image.expand(-1, 3, -1, -1)).logits,
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ConfigError, match="only a 3-band"):
        import_weights(folder, ["red", "green"])


# --------------------------------------------------------------------------- configs


def test_config_mapping_and_variants() -> None:
    transformers = pytest.importorskip("transformers")
    official = transformers.SegformerConfig(
        hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768
    ).to_dict()
    config = segformer_config_from_hf(official, num_channels=4, num_labels=8)
    assert config == segformer_config("b2", num_channels=4, num_labels=8)
    assert match_variant(config) == "segformer-b2"
    assert match_variant(SegformerConfig.from_dict({**TINY, "num_channels": 3})) is None
    with pytest.raises(CheckpointError, match="model_type is 'vit'"):
        segformer_config_from_hf({**official, "model_type": "vit"}, 3, 2)
    with pytest.raises(CheckpointError, match="hidden_act"):
        segformer_config_from_hf({**official, "hidden_act": "relu"}, 3, 2)


# --------------------------------------------------------------------------- errors, one line each


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path(self.marker).touch, ())


def _folder_with(tmp_path: Path, name: str, content: bytes) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config().to_dict()))
    (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda tmp: "nvidia/mit-b0", "hub downloads are not supported here"),
        (lambda tmp: "https://huggingface.co/nvidia/mit-b0", "hub downloads are not supported here"),
        (lambda tmp: tmp / "missing", "no such file or folder"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "not a transformers checkpoint folder"),
        (lambda tmp: _folder_with(tmp, "model.safetensors", b"\x00" * 64 + b"nonsense"), "not a checkpoint file"),
        (lambda tmp: _folder_with(tmp, "pytorch_model.bin", b"PK\x03\x04 not really a zip"), "not a readable PyTorch"),
        (lambda tmp: _folder_with(tmp, "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}"), "corrupt"),
        (lambda tmp: (tmp / "notes.txt").write_text("hello\nworld\n") and tmp / "notes.txt", "no config.json"),
    ],
    ids=["hub-id", "url", "missing", "empty-folder", "random-bytes", "bad-zip", "bad-safetensors", "text-file"],
)
def test_not_a_checkpoint_is_a_one_line_error(tmp_path: Path, make: Any, fragment: str) -> None:
    src = make(tmp_path)
    with pytest.raises(CheckpointError, match=fragment) as err:
        read_hf_checkpoint(src)
    one_line(err)
    result = CliRunner().invoke(main, ["import-weights", str(src), str(tmp_path / "out.safetensors")])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out.safetensors").exists()


def test_text_file_beside_a_config_is_not_a_checkpoint(tmp_path: Path) -> None:
    folder = _folder_with(tmp_path, "notes.txt", b"hello\n")
    with pytest.raises(CheckpointError, match="not a checkpoint file") as err:
        read_hf_checkpoint(folder / "notes.txt")
    one_line(err)


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config().to_dict()))
    torch.save({"weight": torch.zeros(1), "hook": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused") as err:
        read_hf_checkpoint(folder)
    one_line(err)
    assert not marker.exists(), "the pickle payload ran"


def assert_one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output


def test_cli_encoder_import_with_classes_bands_and_scaling(tmp_path: Path) -> None:
    folder = save(hf_segmenter(), tmp_path / "ckpt")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"ignore_index": 0, "classes": [
        {"id": 1, "name": "crop", "color": "#ffff00"}, {"id": 2, "name": "forest", "color": "#00aa00"}]}))
    out = tmp_path / "model.safetensors"
    args = ["import-weights", str(folder), str(out), "--bands", "red,green,blue,nir", "--classes", str(classes)]
    scaling = ["--mean", "10,20,30,40", "--std", "1,2,3,4"]
    result = CliRunner().invoke(main, [*args, *scaling])
    assert result.exit_code == 0, result.output
    assert "encoder" in result.output and "3 -> 4 bands" in result.output
    meta = load_model(out).metadata
    assert meta.band_names == ["red", "green", "blue", "nir"] and meta.ignore_index == 0
    assert meta.normalization.mean == (10, 20, 30, 40) and meta.normalization.std == (1, 2, 3, 4)
    assert meta.provenance["imported"] == "encoder" and meta.provenance["trained"] is False
    assert_one_line_error(CliRunner().invoke(main, [*args, *scaling]), "already exists")
    bad = CliRunner().invoke(main, [*args, "--mean", "1,2", "--std", "1,2", "--overwrite"])
    assert_one_line_error(bad, "one value per band")
    assert CliRunner().invoke(main, [*args, "--mean", "1,2,3,4", "--overwrite"]).exit_code == 2
