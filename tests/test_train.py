import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window

from geoseg._adapt import expand_input_bands
from geoseg.cli import main
from geoseg.errors import ConfigError
from geoseg.labels import IGNORE, ClassMap
from geoseg.modelfile import load_classes, load_model, read_metadata
from geoseg.train import (
    TrainConfig,
    WindowSampler,
    _initial_model,
    _scan,
    build_train_config,
    checkpoint_paths,
    class_sampling_probabilities,
    learning_rate,
    load_train_config_file,
    segmentation_loss,
    train_model,
)

# A SegFormer small enough to train for dozens of steps in seconds.
TINY_ARCH = {
    "hidden_sizes": [8, 8, 16, 16],
    "depths": [1, 1, 1, 1],
    "num_attention_heads": [1, 1, 2, 2],
    "decoder_hidden_size": 16,
}
CRS = "EPSG:32618"
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0)
CLASSES_JSON = {
    "ignore_index": 0,
    "classes": [
        {"id": 1, "name": "water", "color": "#0000ff"},
        {"id": 2, "name": "forest", "color": "#00aa00"},
        {"id": 3, "name": "urban", "color": "#aa0000"},
    ],
}
# Band means per class: the classes differ in brightness pattern, plus noise, so a model can learn them.
CLASS_SIGNATURES = np.array(
    [[800, 600, 500, 300], [600, 900, 500, 3000], [1800, 1700, 1600, 2000]], np.float64
)


def make_learnable_scene(
    folder: Path, height: int = 160, width: int = 128, seed: int = 0
) -> tuple[Path, Path, Path]:
    """A 4-band uint16 scene whose 3 classes form blobs with distinct spectra; its labels; a classes file."""
    rng = np.random.default_rng(seed)
    field = rng.normal(size=(height // 8 + 2, width // 8 + 2))
    field = np.kron(field, np.ones((8, 8)))[:height, :width]  # 8x8 px patches
    labels = np.digitize(field, [-0.4, 0.5]).astype(np.uint8) + 1  # classes 1, 2, 3
    pixels = CLASS_SIGNATURES[labels - 1].transpose(2, 0, 1) + rng.normal(0, 120, (4, height, width))
    pixels = np.clip(pixels, 1, 65535).astype(np.uint16)
    labels[:3, :3] = 0  # a few unlabelled pixels
    image = folder / "scene.tif"
    ref = folder / "labels.tif"
    profile = dict(driver="GTiff", width=width, height=height, crs=CRS, transform=TRANSFORM)
    with rasterio.open(image, "w", count=4, dtype="uint16", **profile) as dst:
        dst.write(pixels)
    with rasterio.open(ref, "w", count=1, dtype="uint8", nodata=None, **profile) as dst:
        dst.write(labels, 1)
    classes = folder / "classes.json"
    classes.write_text(json.dumps(CLASSES_JSON))
    return image, ref, classes


def tiny_config(folder: Path, **changes: Any) -> TrainConfig:
    image, ref, classes = make_learnable_scene(folder)
    settings: dict[str, Any] = dict(
        images=(str(image),),
        labels=(str(ref),),
        classes=str(classes),
        out=str(folder / "model.safetensors"),
        train_rows="0:112",
        val_rows="112:160",
        arch_overrides=TINY_ARCH,
        window_px=64,
        batch_size=4,
        steps=60,
        epoch_steps=20,
        warmup_steps=5,
        lr=0.01,
        tile_size=64,
        overlap=16,
        seed=3,
        device="cpu",
    )
    settings.update(changes)
    return TrainConfig(**settings)


def test_training_learns_a_pattern(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, steps=90, epoch_steps=30)
    (tmp_path / "untrained").mkdir()
    untrained = train_model(
        tiny_config(tmp_path / "untrained", steps=1, epoch_steps=1, lr=1e-9, warmup_steps=0)
    )
    assert untrained.best_miou < 0.4  # chance level: the pattern has to be learnt
    result = train_model(config)
    first, last = result.history[0], result.history[-1]
    assert last.loss < 0.6 * first.loss
    assert result.best_miou > 0.85, [r.val_miou for r in result.history]
    assert result.best_miou == max(r.val_miou for r in result.history)
    # the best epoch is a loadable geoseg model that says how it was made
    model = load_model(config.out)
    meta = model.metadata
    assert meta.normalization.method == "meanstd"
    assert meta.provenance["trained"] is True and meta.provenance["seed"] == 3
    assert meta.provenance["val_miou"] == pytest.approx(result.best_miou, abs=1e-6)
    assert meta.resolution_m == 10.0 and (meta.tile_size, meta.overlap) == (64, 16)
    assert [c.id for c in meta.classes] == [1, 2, 3] and meta.ignore_index == 0


def test_normalisation_comes_from_training_pixels_only(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, steps=1, epoch_steps=1)
    train_model(config)
    with rasterio.open(config.images[0]) as src:
        pixels = src.read(window=Window(0, 0, 128, 112)).reshape(4, -1).astype(np.float64)
    meta = read_metadata(config.out)
    np.testing.assert_allclose(meta.normalization.mean, pixels.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(meta.normalization.std, pixels.std(axis=1), rtol=1e-5)


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = tiny_config(tmp_path / "a", steps=6, epoch_steps=2)
    interrupted = tiny_config(tmp_path / "b", steps=6, epoch_steps=2)
    reference = train_model(full)
    first = train_model(interrupted, max_epochs=1)
    assert first.steps_done == 2 and len(first.history) == 1
    state = json.loads(checkpoint_paths(interrupted.out)[1].read_text())
    assert state["step"] == 2 and state["epoch"] == 1
    resumed = train_model(interrupted, resume=True)
    assert resumed.steps_done == 6 and [r.step for r in resumed.history] == [2, 4, 6]
    assert [r.loss for r in resumed.history] == pytest.approx([r.loss for r in reference.history], rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(checkpoint_paths(full.out)[0]))
    b = load_file(str(checkpoint_paths(interrupted.out)[0]))
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith(("model/", "optim/")):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_without_validation_the_last_step_is_written(runner, tmp_path: Path) -> None:
    """A final fit on every labelled pixel: no validation, the model after the last step is kept."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = tiny_config(tmp_path / "a", train_rows=None, val_rows=None, steps=6, epoch_steps=2)
    result = train_model(config)
    assert [r.step for r in result.history] == [2, 4, 6]
    assert all(np.isnan(r.val_miou) and r.val_iou == () for r in result.history)
    assert (result.best_epoch, result.best_step, result.best_metrics) == (3, 6, None)
    # the file holds the weights after step 6: the same as the checkpoint written after it
    from safetensors.torch import load_file

    ckpt = load_file(str(checkpoint_paths(config.out)[0]))
    model = load_model(config.out)
    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(value, ckpt[f"model/{name}"], msg=name)
    provenance = model.metadata.provenance
    assert provenance["val_region"] is None and provenance["selection"].startswith("last step")
    assert provenance["step"] == 6 and "val_miou" not in provenance
    # normalisation and sampling use the whole image, the rows a validation region would have held too
    with rasterio.open(config.images[0]) as src:
        pixels = src.read().reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(model.metadata.normalization.mean, pixels.mean(axis=1), rtol=1e-6)
    data = _scan(config, ClassMap(*load_classes(config.classes)), read_metadata(config.out))
    try:
        sampler = WindowSampler(config, data, np.ones(4, np.float32), np.zeros(4, np.float32))
        rng = np.random.default_rng(0)
        rows = [sampler._draw_window(rng)[1].row_off for _ in range(200)]
    finally:
        data.close()
    assert max(rows) + config.window_px > 112
    # an interrupted final fit resumes to the same model
    interrupted = tiny_config(tmp_path / "b", train_rows=None, val_rows=None, steps=6, epoch_steps=2)
    train_model(interrupted, max_epochs=2)
    resumed = train_model(interrupted, resume=True)
    assert [r.loss for r in resumed.history] == pytest.approx([r.loss for r in result.history], rel=1e-5)
    again = load_model(interrupted.out).module.state_dict()
    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(again[name], value, rtol=1e-5, atol=1e-6, msg=name)
    args = _args(config, **{"--train-rows": False, "--val-rows": False, "--overwrite": None, "-q": False})
    out = runner.invoke(main, ["train", *args])
    assert out.exit_code == 0, out.output
    assert "the model after step 2 (no validation region)" in out.output


def test_resume_refuses_other_settings_or_missing_checkpoint(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, steps=4, epoch_steps=2)
    with pytest.raises(Exception, match="no checkpoint to resume"):
        train_model(config, resume=True)
    train_model(config, max_epochs=1)
    with pytest.raises(ConfigError, match="lr"):
        train_model(config.replace(lr=0.5), resume=True)


def test_same_seed_same_model(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = train_model(tiny_config(tmp_path / "a", steps=3, epoch_steps=3))
    b = train_model(tiny_config(tmp_path / "b", steps=3, epoch_steps=3))
    assert a.history[0].loss == pytest.approx(b.history[0].loss, rel=1e-6)


def test_sampled_windows_stay_in_the_training_region(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train_rows=None, val_rows=None, val_window="0,0,40,40", class_balance=1.0)
    class_map = ClassMap(*load_classes(config.classes))
    meta, _ = _initial_model(config, class_map)
    data = _scan(config, class_map, meta)
    try:
        sampler = WindowSampler(config, data, np.ones(4, np.float32), np.zeros(4, np.float32))
        rng = np.random.default_rng(0)
        for _ in range(300):
            image, window = sampler._draw_window(rng)
            assert not image.val.intersects(window)
            assert 0 <= window.row_off <= 160 - 64 and 0 <= window.col_off <= 128 - 64
        pixels, target = sampler.batch(rng)
        assert pixels.shape == (4, 4, 64, 64) and pixels.dtype == np.float32
        assert target.shape == (4, 64, 64) and set(np.unique(target)) <= {0, 1, 2, IGNORE}
    finally:
        data.close()


def test_class_balanced_sampling_probabilities() -> None:
    counts = np.array([900, 100, 0])
    np.testing.assert_allclose(class_sampling_probabilities(0.0, counts), [0.9, 0.1, 0.0])
    np.testing.assert_allclose(class_sampling_probabilities(1.0, counts), [0.5, 0.5, 0.0])
    p = class_sampling_probabilities(0.5, counts)
    assert p[1] == pytest.approx(10 / 40)


def test_loss_ignores_unlabelled_pixels_and_combines_terms() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert segmentation_loss(logits, target) == pytest.approx(float(ce), rel=1e-5)
    masked = target.clone()
    masked[0] = IGNORE
    expected = torch.nn.functional.cross_entropy(logits[1:], target[1:])
    assert segmentation_loss(logits, masked) == pytest.approx(float(expected), rel=1e-5)
    changed = logits.clone()
    changed[0] += 100 * torch.randn_like(changed[0])  # ignored pixels cannot move the loss
    assert segmentation_loss(changed, masked, dice_weight=1.0) == pytest.approx(
        float(segmentation_loss(logits, masked, dice_weight=1.0))
    )
    assert segmentation_loss(logits, target, focal_gamma=2.0) < ce
    assert segmentation_loss(logits, target, dice_weight=1.0) > ce
    weights = torch.tensor([1.0, 0.0, 0.0])
    only0 = target == 0
    assert segmentation_loss(logits, target, weights) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, target, reduction="none")[only0].mean()), rel=1e-5
    )
    assert float(segmentation_loss(logits, torch.full_like(target, IGNORE))) == 0.0
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert float(segmentation_loss(perfect, target, dice_weight=1.0)) < 1e-3


def test_learning_rate_schedule(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 10) == pytest.approx(1.0)
    assert learning_rate(config, 55) == pytest.approx(0.55)
    assert learning_rate(config, 100) == pytest.approx(0.1)


def test_expand_input_bands() -> None:
    weight = torch.randn(16, 3, 7, 7)
    wide = expand_input_bands(weight, 5)
    assert wide.shape == (16, 5, 7, 7)
    torch.testing.assert_close(wide[:, :3], weight)
    torch.testing.assert_close(wide[:, 3], weight.mean(dim=1))
    torch.testing.assert_close(wide[:, 4], weight.mean(dim=1))
    torch.testing.assert_close(expand_input_bands(weight, 3), weight)
    with pytest.raises(ValueError, match="RGB"):
        expand_input_bands(torch.randn(16, 4, 7, 7), 5)


def test_pretrained_rgb_weights_are_widened(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from geoseg.segformer import SegformerForSemanticSegmentation, segformer_config

    rgb = SegformerForSemanticSegmentation(
        segformer_config("b0", num_channels=3, num_labels=150, **TINY_ARCH)
    )
    state = {k: v.contiguous() for k, v in rgb.state_dict().items()}
    save_file(state, str(tmp_path / "rgb.safetensors"))
    config = tiny_config(tmp_path, pretrained=str(tmp_path / "rgb.safetensors"))
    meta, weights = _initial_model(config, ClassMap(*load_classes(config.classes)))
    key = "segformer.encoder.patch_embeddings.0.proj.weight"
    original = state[key]
    torch.testing.assert_close(weights[key][:, :3], original)
    torch.testing.assert_close(weights[key][:, 3], original.mean(dim=1))
    assert "decode_head.classifier.weight" not in weights  # 150 classes do not fit 3
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in weights


def test_starts_from_an_init_model(runner, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, steps=2, epoch_steps=2)
    init = tmp_path / "init.safetensors"
    overrides = [
        arg
        for key, value in TINY_ARCH.items()
        for arg in ("--arch-override", f"{key}={str(value).strip('[]')}")
    ]
    result = runner.invoke(main, ["init-model", str(init), "--classes", config.classes, *overrides])
    assert result.exit_code == 0, result.output
    trained = train_model(config.replace(init_model=str(init), arch="segformer-b5"))
    assert trained.metadata.variant == "segformer-b0"
    assert trained.metadata.arch_config["hidden_sizes"] == [8, 8, 16, 16]


def test_bf16_autocast_runs(tmp_path: Path) -> None:
    result = train_model(tiny_config(tmp_path, steps=2, epoch_steps=2, precision="bf16"))
    assert np.isfinite(result.history[0].loss)


def test_yaml_config_paths_and_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    good = tmp_path / "cfg" / "run.yaml"
    good.write_text(
        "images: [../scene.tif]\nlabels: [../labels.tif]\nclasses: ../classes.json\n"
        "val_rows: '0:10'\nsteps: 5\n"
    )
    settings = load_train_config_file(good)
    assert settings["images"] == (str(tmp_path / "scene.tif"),) and settings["steps"] == 5
    config = build_train_config(settings, out=str(tmp_path / "m.safetensors"), steps=7)
    assert config.steps == 7 and config.classes == str(tmp_path / "classes.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text("images: [a.tif]\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_train_config_file(bad)
    with pytest.raises(ConfigError, match="multiple of 32"):
        tiny_config(tmp_path, window_px=50)


def _cli_error(runner, args: list[str]) -> str:
    result = runner.invoke(main, ["train", *args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _args(config: TrainConfig, **changes: Any) -> list[str]:
    """Train arguments for ``config``'s files; a change to False drops that option."""
    values = {
        "--image": config.images[0],
        "--labels": config.labels[0],
        "--classes": config.classes,
        "--out": config.out,
        "--train-rows": "0:112",
        "--val-rows": "112:160",
        "--window-px": "64",
        "--steps": "2",
        "--epoch-steps": "2",
        "-q": None,
    } | changes
    args: list[str] = []
    for key, value in values.items():
        if value is not False:
            args += [key] if value is None else [key, value]
    return args


def test_cli_bad_inputs(runner, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    # label raster on another grid
    other = tmp_path / "other_grid.tif"
    with rasterio.open(
        other,
        "w",
        driver="GTiff",
        width=128,
        height=160,
        count=1,
        dtype="uint8",
        crs=CRS,
        transform=TRANSFORM @ Affine.translation(3, 0),
    ) as dst:
        dst.write(np.ones((160, 128), np.uint8), 1)
    assert "other_grid.tif: label raster is not on the image's grid" in _cli_error(
        runner, _args(config, **{"--labels": str(other)})
    )
    # label values missing from the classes file
    odd = tmp_path / "odd.tif"
    with rasterio.open(config.labels[0]) as src:
        values, profile = src.read(1), src.profile
    values[10, 10] = 7
    with rasterio.open(odd, "w", **profile) as dst:
        dst.write(values, 1)
    assert "odd.tif: label values 7 are not in the classes file" in _cli_error(
        runner, _args(config, **{"--labels": str(odd)})
    )
    # vector labels without the class attribute, and with unknown class names
    x0, y0 = TRANSFORM.c, TRANSFORM.f
    x1, y1 = x0 + 128 * TRANSFORM.a, y0 + 160 * TRANSFORM.e
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    for name, props in (("noattr.geojson", {"kind": "water"}), ("unknown.geojson", {"cls": "glacier"})):
        (tmp_path / name).write_text(
            json.dumps(
                {
                    "type": "FeatureCollection",
                    "crs": {"type": "name", "properties": {"name": CRS}},
                    "features": [
                        {
                            "type": "Feature",
                            "properties": props,
                            "geometry": {"type": "Polygon", "coordinates": [ring]},
                        }
                    ],
                }
            )
        )
    msg = _cli_error(
        runner, _args(config, **{"--labels": str(tmp_path / "noattr.geojson"), "--label-attribute": "cls"})
    )
    assert "noattr.geojson: no feature has the class attribute 'cls'" in msg
    msg = _cli_error(
        runner, _args(config, **{"--labels": str(tmp_path / "unknown.geojson"), "--label-attribute": "cls"})
    )
    assert "unknown.geojson: 'cls' values 'glacier' match no class" in msg
    # too few labelled pixels for the windows
    sparse = tmp_path / "sparse.tif"
    values = np.zeros((160, 128), np.uint8)
    values[5:10, 5:10] = 2
    values[150:, :] = 2
    with rasterio.open(sparse, "w", **profile) as dst:
        dst.write(values, 1)
    assert "only 25 labelled pixels" in _cli_error(runner, _args(config, **{"--labels": str(sparse)}))
    # region smaller than a window
    assert "smaller than one 64 px window" in _cli_error(runner, _args(config, **{"--train-rows": "0:40"}))
    # empty validation region: no labels there, or outside the image
    assert "validation region (window 0,0,3,3) holds no labelled pixel" in _cli_error(
        runner, _args(config, **{"--val-rows": False, "--val-window": "0,0,3,3", "--train-rows": "20:160"})
    )
    assert _cli_error(runner, _args(config, **{"--val-rows": "500:600"})) == (
        f"Error: the validation region (rows 500:600) lies outside {config.images[0]} (128x160 px)"
    )
    # output exists
    Path(config.out).write_text("x")
    assert "already exists" in _cli_error(runner, _args(config))


def test_cli_trains_and_writes_a_model(runner, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    result = runner.invoke(main, ["train", *_args(config, **{"--steps": "4", "--seed": "1", "-q": False})])
    assert result.exit_code == 0, result.output
    assert "best validation mIoU" in result.output and "mean IoU" in result.output
    assert read_metadata(config.out).provenance["seed"] == 1
    result = runner.invoke(main, ["train", *_args(config, **{"--steps": "4", "--seed": "1"}), "--resume"])
    assert result.exit_code == 0, result.output  # already finished: nothing more to do


def test_out_may_not_be_an_input_even_with_overwrite(runner, tmp_path: Path) -> None:
    """train --out and init-model OUT never replace an input of the run (as predict refuses DST == SRC)."""
    config = tiny_config(tmp_path)
    for _option, value in (("--labels", config.labels[0]), ("--image", config.images[0]), ("--classes", config.classes)):
        before = Path(value).read_bytes()
        msg = _cli_error(runner, [*_args(config, **{"--out": value}), "--overwrite"])
        assert msg.startswith(f"Error: {value}: --out is an input of this run (")
        assert Path(value).read_bytes() == before
    # the checkpoint pair written beside --out counts too
    sidecar_named = tmp_path / "m.safetensors.ckpt.json"
    sidecar_named.write_text(json.dumps(CLASSES_JSON))
    msg = _cli_error(runner, [*_args(config, **{"--out": str(tmp_path / "m.safetensors"),
                                                "--classes": str(sidecar_named)}), "--overwrite"])
    assert "the checkpoint of --out is an input of this run (classes file)" in msg
    result = runner.invoke(main, ["init-model", config.classes, "--classes", config.classes, "--overwrite"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {config.classes}: OUT is an input of this run (classes file); choose another file"
    )
    assert json.loads(Path(config.classes).read_text()) == CLASSES_JSON


def test_model_and_checkpoint_follow_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    config = tiny_config(tmp_path, steps=2, epoch_steps=2)
    previous = os.umask(0o027)
    try:
        train_model(config)
    finally:
        os.umask(previous)
    model, (tensors, sidecar) = Path(config.out), checkpoint_paths(config.out)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (model, tensors, sidecar)} == {
        model.name: 0o640, tensors.name: 0o640, sidecar.name: 0o640
    }


def test_an_interrupt_says_what_is_on_disk(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after an epoch: --out holds the best epoch and the checkpoint resumes; the CLI says so."""
    config = tiny_config(tmp_path, steps=6, epoch_steps=2)
    epochs = []

    def interrupt_in_the_second_epoch(record: Any) -> None:
        epochs.append(record)
        if len(epochs) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        train_model(config, on_epoch=interrupt_in_the_second_epoch)
    best = max(epochs, key=lambda r: r.val_miou)
    assert caught.value.__notes__ == [
        f"{config.out} holds the best epoch so far (epoch {best.epoch}, step {best.step}); "
        "its checkpoint continues from step 4 with --resume"
    ]
    assert Path(config.out).is_file() and all(p.is_file() for p in checkpoint_paths(config.out))
    # The CLI prints the note instead of "no output was written".
    import geoseg.train

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(geoseg.train, "validate", interrupted)
    result = runner.invoke(main, ["train", *_args(config, **{"--out": str(tmp_path / "other.safetensors")})])
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        f"Interrupted; no epoch had finished; {tmp_path / 'other.safetensors'} was not written."
    )


def test_arch_overrides_are_read_as_yaml(runner, tmp_path: Path) -> None:
    """--arch-override VALUE reads like a config file's arch_overrides: [8,16], 8,16 and text all work."""
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(CLASSES_JSON))
    out = tmp_path / "m.safetensors"
    forms = ["hidden_sizes=[8, 8, 16, 16]", "depths=1,1,1,1", "num_attention_heads=[1,1,2,2]",
             "decoder_hidden_size=16"]
    result = runner.invoke(main, ["init-model", str(out), "--classes", str(classes),
                                  *(arg for form in forms for arg in ("--arch-override", form))])
    assert result.exit_code == 0, result.output
    arch = read_metadata(out).arch_config
    assert (arch["hidden_sizes"], arch["depths"], arch["num_attention_heads"], arch["decoder_hidden_size"]) == (
        [8, 8, 16, 16], [1, 1, 1, 1], [1, 1, 2, 2], 16
    )
    for form, message in (
        ("decoder_hidden_size=abc", "decoder_hidden_size must be a positive integer, got 'abc'"),
        ("depths=[1,1", "--arch-override 'depths=[1,1': VALUE must be a number, text or list"),
        ("depths", "--arch-override 'depths': expected KEY=VALUE"),
    ):
        result = runner.invoke(main, ["init-model", str(out), "--classes", str(classes), "--overwrite",
                                      "--arch-override", form])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output


def test_regions_running_past_the_image_are_clipped_with_a_warning(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train_rows="0:112", val_rows="112:999", steps=2, epoch_steps=2)
    with pytest.warns(UserWarning) as caught:
        data = _scan(config, ClassMap(*load_classes(config.classes)), _initial_model(config, ClassMap(
            *load_classes(config.classes)))[0])
    data.close()
    messages = [str(w.message) for w in caught]
    assert (f"{config.images[0]}: the validation region (rows 112:999) runs past the 128x160 px image; "
            "using rows 112:160") in messages
    assert data.images[0].val.region.describe() == "rows 112:160"


def test_bad_yaml_and_folder_outputs_are_one_line_errors(runner, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("{\n")
    assert _cli_error(runner, ["--config", str(broken), "--out", str(tmp_path / "m.safetensors")]) == (
        f"Error: {broken}: not valid YAML (line 2, column 1: expected the node content, but found '<stream end>')"
    )
    assert _cli_error(runner, _args(config, **{"--out": str(tmp_path)})) == (
        f"Error: {tmp_path}: is a folder; give a file name"
    )
    result = runner.invoke(main, ["init-model", str(tmp_path), "--classes", config.classes])
    assert result.exit_code == 1 and result.output == f"Error: {tmp_path}: is a folder; give a file name\n"


def test_resume_compares_files_not_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same files typed from another folder, or as absolute paths, resume; another file does not."""
    config = tiny_config(tmp_path, steps=4, epoch_steps=2)
    monkeypatch.chdir(tmp_path)
    relative = config.replace(images=("scene.tif",), labels=("labels.tif",), classes="classes.json",
                              out="model.safetensors")
    train_model(relative, max_epochs=1)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    from_below = config.replace(images=("../scene.tif",), labels=("../labels.tif",), classes="../classes.json",
                                out="../model.safetensors")
    assert train_model(from_below, resume=True, max_epochs=1).steps_done == 4
    (tmp_path / "copy.tif").write_bytes((tmp_path / "labels.tif").read_bytes())
    with pytest.raises(ConfigError, match=r"settings differ from the interrupted run \(labels: .*copy\.tif"):
        train_model(config.replace(labels=(str(tmp_path / "copy.tif"),)), resume=True)


def test_quiet_training_prints_nothing(runner, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    result = runner.invoke(main, ["train", *_args(config, **{"--steps": "2"})])  # with -q
    assert result.exit_code == 0 and result.output == "" and Path(config.out).is_file()


def test_a_band_count_mismatch_speaks_of_the_flag(runner, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    assert _cli_error(runner, _args(config, **{"--bands": "1,2,3"})) == (
        "Error: --bands lists 3 bands but the model takes 4 (red, green, blue, nir; band_names in the config file)"
    )
