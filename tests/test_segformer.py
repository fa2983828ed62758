"""Tests for geoseg.segformer: shapes, configs, training behaviour and parity with Hugging Face."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from geoseg.segformer import (
    VARIANTS,
    SegformerConfig,
    SegformerEfficientSelfAttention,
    SegformerForSemanticSegmentation,
    _drop_path,
    segformer_config,
)

TINY = {
    "hidden_sizes": (8, 8, 16, 16),
    "depths": (1, 1, 1, 1),
    "num_attention_heads": (1, 1, 2, 2),
    "decoder_hidden_size": 16,
}

# Table 1 of the SegFormer paper (ADE20K heads: 3 bands, 150 classes), in millions of parameters.
PUBLISHED_PARAMS_M = {
    "segformer-b0": 3.8,
    "segformer-b1": 13.7,
    "segformer-b2": 27.5,
    "segformer-b3": 47.3,
    "segformer-b4": 64.1,
    "segformer-b5": 84.7,
}


def tiny_config(**overrides) -> SegformerConfig:
    return SegformerConfig.from_dict({**TINY, **overrides})


def build(config: SegformerConfig, seed: int = 0) -> SegformerForSemanticSegmentation:
    torch.manual_seed(seed)
    return SegformerForSemanticSegmentation(config).eval()


def randomize_(model: torch.nn.Module, seed: int = 1) -> None:
    """Perturb every parameter and the BatchNorm statistics so that all of them influence the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.5 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(7)


def pixels(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize(
    ("height", "width"), [(64, 64), (37, 50), (50, 37), (29, 29), (97, 130), (32, 128), (65, 33)]
)
@pytest.mark.parametrize(("channels", "labels"), [(4, 8), (3, 150), (1, 2)])
def test_output_shape(height, width, channels, labels):
    model = build(tiny_config(num_channels=channels, num_labels=labels))
    with torch.no_grad():
        logits = model(pixels(2, channels, height, width))
    assert logits.shape == (2, labels, math.ceil(height / 4), math.ceil(width / 4))
    assert logits.dtype == torch.float32
    assert logits.is_contiguous()
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("height", "width"), [(28, 64), (64, 28), (1, 1), (16, 16)])
def test_too_small_input_raises(height, width):
    model = build(tiny_config())
    with pytest.raises(ValueError, match="too small"):
        model(pixels(1, 4, height, width))


def test_untrained_logits_are_finite_and_varied():
    model = build(segformer_config("b0"))
    with torch.no_grad():
        logits = model(pixels(1, 4, 64, 64))
    assert torch.isfinite(logits).all()
    assert logits.std() > 1e-3
    assert logits.argmax(1).unique().numel() > 1


def test_batch_elements_are_independent():
    model = build(tiny_config())
    x = pixels(3, 4, 37, 50)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_channels_last_model_and_input_match_default_layout():
    model = build(tiny_config())
    randomize_(model)
    x = pixels(2, 4, 64, 96)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
        got_noncontiguous = model(x.transpose(-1, -2).contiguous().transpose(-1, -2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_noncontiguous, expected, rtol=1e-5, atol=1e-5)


def test_decode_head_matches_unfused_reference():
    """The decoder's folded linear algebra equals the literal project/upsample/concat/fuse recipe."""
    config = tiny_config(classifier_dropout_prob=0.0)
    model = build(config)
    randomize_(model)
    head = model.decode_head
    with torch.no_grad():
        head.batch_norm.running_var[::2] = 1e-6  # comparable to eps, so a misplaced eps shows
    features = [
        torch.randn(2, c, h, w)
        for c, (h, w) in zip(config.hidden_sizes, [(13, 17), (7, 9), (4, 5), (2, 3)], strict=True)
    ]

    def reference(training: bool) -> torch.Tensor:
        size = features[0].shape[-2:]
        projected = []
        for x, mlp in zip(features, head.linear_c, strict=True):
            y = mlp.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, -1, *x.shape[-2:])
            projected.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        y = F.conv2d(torch.cat(projected[::-1], dim=1), head.linear_fuse.weight)
        bn = head.batch_norm
        if training:
            y = F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        else:
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        return head.classifier(F.relu(y))

    # atol 1e-4: the tiny running variances amplify rounding ~300x, and AVX-512 kernels sum in
    # another order than AVX2 ones (3e-5 seen on a Xeon); a misplaced eps is off by far more.
    with torch.no_grad():
        torch.testing.assert_close(head(features), reference(training=False), rtol=1e-4, atol=1e-4)
        head.train()
        torch.testing.assert_close(head(features), reference(training=True), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- training behaviour


def test_eval_mode_is_deterministic():
    model = build(tiny_config(drop_path_rate=0.5, hidden_dropout_prob=0.3, classifier_dropout_prob=0.3))
    x = pixels(2, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_train_mode_is_deterministic_without_stochastic_layers():
    config = tiny_config(
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
    )
    model = build(config).train()
    x = pixels(2, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "stochastic",
    ["drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"],
)
def test_each_stochastic_layer_is_active_in_training(stochastic):
    off = {
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout_prob": 0.0,
    }
    # Drop path zeroes whole samples of a branch, so use a large batch to make a "no drop" draw unlikely.
    model = build(tiny_config(**{**off, stochastic: 0.5})).train()
    x = pixels(8, 4, 64, 64)
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_drop_path_rates_increase_linearly_over_all_blocks():
    model = build(tiny_config(depths=(2, 1, 3, 2), drop_path_rate=0.3))
    rates = [block.drop_path for stage in model.segformer.encoder.block for block in stage]
    expected = [0.3 * i / 7 for i in range(8)]
    assert rates == pytest.approx(expected)


def test_drop_path_zeroes_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(20_000, 3, 5)
    out = _drop_path(x, 0.25, training=True)
    per_sample = out.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()
    assert per_sample[:, 0].unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    assert _drop_path(x, 0.25, training=False) is x


def test_backward_reaches_every_parameter_and_updates_batchnorm():
    model = build(tiny_config(hidden_dropout_prob=0.1)).train()
    logits = model(pixels(2, 4, 48, 64))
    loss = F.cross_entropy(logits, torch.randint(0, 8, (2, 12, 16)))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert model.decode_head.batch_norm.num_batches_tracked.item() == 1


# --------------------------------------------------------------------------- pixel head


@pytest.mark.parametrize(("height", "width"), [(64, 64), (37, 50), (29, 29)])
def test_pixel_head_gives_logits_at_the_input_size(height, width):
    model = build(tiny_config(pixel_head_channels=6))
    with torch.no_grad():
        logits = model(pixels(2, 4, height, width))
    assert logits.shape == (2, 8, height, width)
    assert logits.is_contiguous()


def test_fresh_pixel_head_adds_nothing_to_the_upsampled_decoder():
    """Its last layer starts at zero, so a new model is the plain SegFormer, upsampled."""
    plain = build(tiny_config(), seed=3)
    randomize_(plain)
    with_head = build(tiny_config(pixel_head_channels=6), seed=4)
    missing, unexpected = with_head.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [
        "pixel_head.0.bias", "pixel_head.0.weight", "pixel_head.2.bias", "pixel_head.2.weight"
    ]
    assert not unexpected
    x = pixels(2, 4, 48, 40)
    with torch.no_grad():
        expected = F.interpolate(plain(x), size=(48, 40), mode="bilinear", align_corners=False)
        torch.testing.assert_close(with_head(x), expected, rtol=0, atol=0)


def test_pixel_head_sees_every_pixel_alone():
    """With the decoder's classifier zeroed the logits are the head's 1x1 MLP of each pixel's bands."""
    model = build(tiny_config(pixel_head_channels=5))
    randomize_(model)
    with torch.no_grad():
        model.decode_head.classifier.weight.zero_()
        model.decode_head.classifier.bias.zero_()
        x = pixels(1, 4, 40, 36, seed=2)
        first, _, last = model.pixel_head
        hidden = torch.relu(
            torch.einsum("hc,ncxy->nhxy", first.weight[:, :, 0, 0], x) + first.bias[None, :, None, None]
        )
        expected = torch.einsum("kh,nhxy->nkxy", last.weight[:, :, 0, 0], hidden)
        expected += last.bias[None, :, None, None]
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        # a crop gives the same logits as the whole: nothing from the neighbours
        torch.testing.assert_close(model(x[..., 8:40, 4:36]), model(x)[..., 8:40, 4:36], rtol=1e-5, atol=1e-5)
    assert expected.std() > 0.01, "the head's weights were randomised, so the check means something"


def test_pixel_head_trains_and_runs_in_fp32_under_autocast():
    model = build(tiny_config(pixel_head_channels=6)).train()
    randomize_(model)  # the zero-initialised last layer blocks gradients to the first until it moves
    logits = model(pixels(2, 4, 48, 64))
    F.cross_entropy(logits, torch.randint(0, 8, (2, 48, 64))).backward()
    for name, param in model.pixel_head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(pixels(1, 4, 32, 32)).dtype == torch.float32


def test_bf16_autocast():
    model = build(tiny_config())
    randomize_(model)
    x = pixels(2, 4, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
    assert logits.shape == reference.shape
    assert logits.dtype == torch.float32  # the decoder runs in fp32 under autocast
    assert torch.isfinite(logits).all()
    spread = reference.std()
    assert (logits.float() - reference).abs().mean() < 0.05 * spread
    assert (logits.float().argmax(1) == reference.argmax(1)).float().mean() > 0.9


def test_decoder_runs_in_fp32_under_autocast_and_encoder_in_bf16():
    model = build(tiny_config()).eval()
    randomize_(model)
    x = pixels(1, 4, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.segformer(x)
        logits = model.decode_head(features)
        reference = model.decode_head([f.float() for f in features])  # same input, no autocast inside
    assert {f.dtype for f in features} == {torch.bfloat16}
    assert logits.dtype == torch.float32
    with torch.no_grad():
        exact = model.decode_head([f.float() for f in features])
    torch.testing.assert_close(logits, exact)
    torch.testing.assert_close(reference, exact)


def test_spatial_reduction_runs_in_fp32_under_autocast():
    # torch 2.11's CPU bf16 kernel for this convolution was wrong on a Xeon with AMX
    # (docs/performance.md): the reduction runs in fp32 whatever autocast says, on an fp32 copy of its input.
    model = build(tiny_config()).eval()
    randomize_(model)
    reductions = [m.sr for m in model.modules() if isinstance(m, SegformerEfficientSelfAttention) and m.sr_ratio > 1]
    assert reductions
    seen = []
    for sr in reductions:
        sr.register_forward_hook(lambda module, args, out: seen.append((module, args[0], out)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(pixels(1, 4, 64, 64))
    assert len(seen) == len(reductions)
    for module, inputs, out in seen:
        assert inputs.dtype == out.dtype == torch.float32
        torch.testing.assert_close(out, F.conv2d(inputs, module.weight, module.bias, stride=module.stride))


# --------------------------------------------------------------------------- configs and variants


def test_config_dict_round_trip_through_json():
    config = segformer_config("b2", num_channels=6, num_labels=11, drop_path_rate=0.2)
    data = json.loads(json.dumps(config.to_dict()))
    assert isinstance(data["depths"], list)
    restored = SegformerConfig.from_dict(data)
    assert restored == config
    assert isinstance(restored.depths, tuple)
    assert hash(restored) == hash(config)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SegformerConfig().num_labels = 3


def test_from_dict_unknown_key_names_it():
    with pytest.raises(ValueError, match="hidden_size_typo"):
        SegformerConfig.from_dict({"num_labels": 3, "hidden_size_typo": 1})


@pytest.mark.parametrize(
    "bad",
    [
        {"depths": (2, 2, 2)},
        {"hidden_sizes": (32, 64, 160, 250)},
        {"num_labels": 0},
        {"depths": (2, 0, 2, 2)},
        {"drop_path_rate": 1.5},
        {"sr_ratios": "8421"},
        {"pixel_head_channels": -1},
        {"pixel_head_channels": True},
        {"pixel_head_channels": 2.5},
    ],
)
def test_invalid_config_values_raise(bad):
    with pytest.raises(ValueError):
        SegformerConfig.from_dict(bad)


def test_segformer_config_short_names_and_overrides():
    assert segformer_config("b3") == segformer_config("segformer-b3")
    config = segformer_config("b1", num_channels=12, num_labels=5, drop_path_rate=0.0)
    assert (config.num_channels, config.num_labels, config.drop_path_rate) == (12, 5, 0.0)
    assert config.hidden_sizes == (64, 128, 320, 512)
    with pytest.raises(ValueError, match="not_a_field"):
        segformer_config("b0", not_a_field=1)


@pytest.mark.parametrize("arch", ["b6", "segformer-b9", "mit-b0", "B0", ""])
def test_unknown_arch_lists_valid_names(arch):
    with pytest.raises(ValueError, match="segformer-b0.*segformer-b5"):
        segformer_config(arch)


def test_variants_have_published_parameter_counts():
    counts = {}
    for name in VARIANTS:
        with torch.device("meta"):
            model = SegformerForSemanticSegmentation(segformer_config(name, num_channels=3, num_labels=150))
        counts[name] = sum(p.numel() for p in model.parameters())
        assert counts[name] / 1e6 == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.02), name
    assert list(counts.values()) == sorted(counts.values())
    assert counts["segformer-b0"] == 3_752_694


# --------------------------------------------------------------------------- Hugging Face compatibility


def hf_model(config: SegformerConfig):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.SegformerConfig(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    )
    return transformers.SegformerForSemanticSegmentation(hf_config).eval()


def hf_checkpoint(model, tmp_path) -> dict[str, torch.Tensor]:
    """The tensors Hugging Face writes to a checkpoint (its in-memory names may differ, e.g. in v5)."""
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path)
    return load_file(tmp_path / "model.safetensors")


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.mark.parametrize(
    ("arch", "channels", "labels"),
    [("b0", 3, 150), ("b0", 4, 8), ("b1", 4, 8), ("b2", 3, 8)],
)
def test_parity_with_transformers(arch, channels, labels, tmp_path):
    config = segformer_config(arch, num_channels=channels, num_labels=labels)
    reference = hf_model(config)
    torch.manual_seed(0)
    randomize_(reference)
    checkpoint = hf_checkpoint(reference, tmp_path)
    ours = SegformerForSemanticSegmentation(config).eval()
    assert set(checkpoint) == set(ours.state_dict())
    ours.load_state_dict(checkpoint, strict=True)

    for height, width in [(64, 64), (37, 50)]:
        x = pixels(2, channels, height, width, seed=height)
        expected = hf_logits(reference, x)
        got = ours(x).detach()
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_parity_with_transformers_in_training_mode(tmp_path):
    """Without dropout or drop path, training mode (BatchNorm on batch statistics) must agree as well."""
    config = segformer_config("b0", drop_path_rate=0.0, classifier_dropout_prob=0.0, hidden_dropout_prob=0.0)
    reference = hf_model(config)
    randomize_(reference)
    ours = SegformerForSemanticSegmentation(config)
    ours.load_state_dict(hf_checkpoint(reference, tmp_path), strict=True)
    reference.train()
    ours.train()
    x = pixels(2, 4, 64, 64)
    torch.testing.assert_close(ours(x).detach(), hf_logits(reference, x), rtol=1e-4, atol=1e-4)
    for name, buffer in ours.decode_head.batch_norm.named_buffers():
        torch.testing.assert_close(buffer, getattr(reference.decode_head.batch_norm, name))


def test_parity_with_transformers_with_drop_path_and_dropout(tmp_path):
    """Same seed, same random draws: stochastic depth and dropout must match Hugging Face's exactly."""
    config = segformer_config(
        "b0", drop_path_rate=0.5, hidden_dropout_prob=0.2, classifier_dropout_prob=0.3, depths=(2, 3, 2, 2)
    )
    reference = hf_model(config)
    randomize_(reference)
    ours = SegformerForSemanticSegmentation(config)
    ours.load_state_dict(hf_checkpoint(reference, tmp_path), strict=True)
    reference.train()
    ours.train()
    x = pixels(4, 4, 64, 64)
    torch.manual_seed(123)
    expected = hf_logits(reference, x)
    torch.manual_seed(123)
    got = ours(x).detach()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.manual_seed(124)
    assert not torch.allclose(ours(x).detach(), got)


def test_transformers_loads_our_weights(tmp_path):
    """Our state_dict, saved as a Hugging Face checkpoint, loads into transformers with nothing missing."""
    from safetensors.torch import save_file

    config = segformer_config("b0", num_channels=4, num_labels=8)
    reference = hf_model(config)
    ours = build(config, seed=3)
    randomize_(ours, seed=4)
    reference.config.save_pretrained(tmp_path)
    save_file(ours.state_dict(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = type(reference).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = pixels(2, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(loaded.eval(), x), rtol=1e-4, atol=1e-4)


def test_smallest_input_matches_transformers():
    config = tiny_config()
    reference = hf_model(config)
    ours = build(config)
    with torch.no_grad():
        reference(pixel_values=pixels(1, 4, 29, 29))
        ours(pixels(1, 4, 29, 29))
        with pytest.raises(RuntimeError):
            reference(pixel_values=pixels(1, 4, 28, 29))
        with pytest.raises(ValueError, match="too small"):
            ours(pixels(1, 4, 28, 29))
