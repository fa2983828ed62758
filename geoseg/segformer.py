"""SegFormer (Mix Transformer encoder + all-MLP decoder) with Hugging Face-compatible parameter names."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "VARIANTS",
    "SegformerConfig",
    "SegformerForSemanticSegmentation",
    "segformer_config",
]

_STAGE_FIELDS = (
    "depths",
    "hidden_sizes",
    "num_attention_heads",
    "sr_ratios",
    "patch_sizes",
    "strides",
    "mlp_ratios",
)
_PROBABILITY_FIELDS = (
    "drop_path_rate",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout_prob",
)


@dataclass(frozen=True)
class SegformerConfig:
    """Hyper-parameters of a SegFormer; field names and meanings follow Hugging Face's ``SegformerConfig``.

    The per-stage fields (``depths`` ... ``mlp_ratios``) hold one entry per encoder stage and must all
    have the same length. Lists are accepted and stored as tuples.

    Attributes:
        num_channels: Input bands.
        num_labels: Output classes.
        depths: Transformer blocks per stage.
        hidden_sizes: Channels per stage.
        num_attention_heads: Attention heads per stage; must divide the stage's hidden size.
        sr_ratios: Spatial-reduction ratio of keys/values per stage (1 disables the reduction).
        patch_sizes: Kernel size of each stage's overlapping patch embedding.
        strides: Stride of each stage's overlapping patch embedding.
        mlp_ratios: Mix-FFN expansion ratio per stage.
        decoder_hidden_size: Channels of the all-MLP decode head.
        layer_norm_eps: Kept for compatibility with Hugging Face configs, which carry it but never use it:
            every LayerNorm there, and therefore here, uses PyTorch's default ``eps=1e-5``.
        drop_path_rate: Stochastic-depth rate of the last block; it grows linearly from 0 over all blocks.
        hidden_dropout_prob: Dropout after the attention output and inside the Mix-FFN.
        attention_probs_dropout_prob: Dropout on the attention probabilities.
        classifier_dropout_prob: Dropout before the decode head's classifier.
        pixel_head_channels: 0 (Hugging Face's SegFormer): logits come out at the first stage's
            resolution. ``H > 0``: a per-pixel head (1x1 convolutions, bands -> ``H`` -> classes) adds
            each pixel's own spectral evidence to the decoder's logits upsampled to full resolution,
            so logits come out at the input's size. Not a Hugging Face field; its weights are
            ``pixel_head.*``.
    """

    num_channels: int = 4
    num_labels: int = 8
    depths: tuple[int, ...] = (2, 2, 2, 2)
    hidden_sizes: tuple[int, ...] = (32, 64, 160, 256)
    num_attention_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    decoder_hidden_size: int = 256
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.1
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout_prob: float = 0.1
    pixel_head_channels: int = 0

    def __post_init__(self) -> None:
        for name in _STAGE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"{name} must be a sequence of positive integers, got {value!r}")
            value = tuple(value)
            if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {value!r}")
            object.__setattr__(self, name, value)
        lengths = {name: len(getattr(self, name)) for name in _STAGE_FIELDS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"per-stage fields must all have the same length, got {lengths}")
        for name in ("num_channels", "num_labels", "decoder_hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        head = self.pixel_head_channels
        if isinstance(head, bool) or not isinstance(head, int) or head < 0:
            raise ValueError(f"pixel_head_channels must be 0 or a positive integer, got {head!r}")
        for name in _PROBABILITY_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0.0:
            raise ValueError(f"layer_norm_eps must be a positive number, got {eps!r}")
        for stage, (size, heads) in enumerate(zip(self.hidden_sizes, self.num_attention_heads, strict=True)):
            if size % heads:
                raise ValueError(
                    f"stage {stage}: hidden size {size} is not divisible by {heads} attention heads"
                )

    @property
    def num_encoder_blocks(self) -> int:
        """Number of encoder stages."""
        return len(self.depths)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serialisable dict (sequences become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegformerConfig:
        """Build a config from a dict such as :meth:`to_dict` returns.

        Args:
            d: Field values; missing fields take their defaults, lists become tuples.

        Raises:
            ValueError: ``d`` has keys that are not config fields, or a value is invalid.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SegformerConfig keys: {', '.join(map(repr, unknown))}")
        return cls(**d)


_MIT_B1_TO_B5_HIDDEN_SIZES = (64, 128, 320, 512)

VARIANTS: dict[str, dict[str, Any]] = {
    "segformer-b0": {
        "hidden_sizes": (32, 64, 160, 256),
        "depths": (2, 2, 2, 2),
        "num_attention_heads": (1, 2, 5, 8),
        "decoder_hidden_size": 256,
    },
    "segformer-b1": {
        "hidden_sizes": _MIT_B1_TO_B5_HIDDEN_SIZES,
        "depths": (2, 2, 2, 2),
        "num_attention_heads": (1, 2, 5, 8),
        "decoder_hidden_size": 256,
    },
    "segformer-b2": {
        "hidden_sizes": _MIT_B1_TO_B5_HIDDEN_SIZES,
        "depths": (3, 4, 6, 3),
        "num_attention_heads": (1, 2, 5, 8),
        "decoder_hidden_size": 768,
    },
    "segformer-b3": {
        "hidden_sizes": _MIT_B1_TO_B5_HIDDEN_SIZES,
        "depths": (3, 4, 18, 3),
        "num_attention_heads": (1, 2, 5, 8),
        "decoder_hidden_size": 768,
    },
    "segformer-b4": {
        "hidden_sizes": _MIT_B1_TO_B5_HIDDEN_SIZES,
        "depths": (3, 8, 27, 3),
        "num_attention_heads": (1, 2, 5, 8),
        "decoder_hidden_size": 768,
    },
    "segformer-b5": {
        "hidden_sizes": _MIT_B1_TO_B5_HIDDEN_SIZES,
        "depths": (3, 6, 40, 3),
        "num_attention_heads": (1, 2, 5, 8),
        "decoder_hidden_size": 768,
    },
}
"""Official MiT-b0 ... b5 hyper-parameters; the fields not listed take the SegformerConfig defaults."""


def segformer_config(
    arch: str, num_channels: int = 4, num_labels: int = 8, **overrides: Any
) -> SegformerConfig:
    """Config of a named SegFormer variant.

    Args:
        arch: A key of :data:`VARIANTS` (``"segformer-b0"`` ... ``"segformer-b5"``) or its short form
            ``"b0"`` ... ``"b5"``.
        num_channels: Input bands.
        num_labels: Output classes.
        **overrides: Any other :class:`SegformerConfig` field, e.g. ``drop_path_rate=0.0``.

    Raises:
        ValueError: Unknown ``arch``, unknown override key or invalid value.
    """
    name = arch if arch in VARIANTS else f"segformer-{arch}"
    if name not in VARIANTS:
        raise ValueError(
            f"unknown SegFormer variant {arch!r}; valid names: {', '.join(VARIANTS)} (or b0 ... b5)"
        )
    return SegformerConfig.from_dict(
        {**VARIANTS[name], "num_channels": num_channels, "num_labels": num_labels, **overrides}
    )


def _tokens_to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """View a token sequence as a feature map without copying.

    A contiguous ``(N, H*W, C)`` tensor viewed as ``(N, C, H, W)`` is exactly a channels-last tensor, which
    PyTorch's CPU convolutions and interpolation consume (and produce) natively.
    """
    return rearrange(tokens, "n (h w) c -> n c h w", h=height, w=width)  # (N, H*W, C) -> (N, C, H, W)


def _map_to_tokens(feature_map: Tensor) -> Tensor:
    """Flatten a feature map to a token sequence; free for channels-last maps, one copy otherwise."""
    return rearrange(feature_map, "n c h w -> n (h w) c")  # (N, C, H, W) -> (N, H*W, C)


def _drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``drop_prob``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    # Same recipe (and random-number use) as timm and Hugging Face: floor(U[0, 1) + keep) is 1 w.p. keep.
    mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)  # (N, 1, ..., 1)
    return x * mask.add_(keep_prob).floor_().div_(keep_prob)


class SegformerOverlapPatchEmbeddings(nn.Module):
    """Overlapping patch embedding: a strided convolution with ``patch_size // 2`` padding, then LayerNorm."""

    def __init__(self, patch_size: int, stride: int, num_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(
            num_channels, hidden_size, kernel_size=patch_size, stride=stride, padding=patch_size // 2
        )
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, int, int]:
        """Embed ``(N, C_in, H, W)`` into tokens ``(N, h*w, C)``; also returns ``h`` and ``w``."""
        embeddings = self.proj(pixel_values)
        height, width = embeddings.shape[-2:]
        return self.layer_norm(_map_to_tokens(embeddings)), height, width


class SegformerEfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a spatially reduced sequence.

    With ``sr_ratio > 1`` a convolution with kernel = stride = ``sr_ratio`` (then LayerNorm) shrinks the
    key/value sequence by ``sr_ratio**2``, which is what makes attention affordable at 1/4 resolution.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, sr_ratio: int, attention_dropout: float):
        super().__init__()
        self.num_attention_heads = num_attention_heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden_size, hidden_size, kernel_size=sr_ratio, stride=sr_ratio)
            self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, hidden_states: Tensor, height: int, width: int) -> Tensor:
        """Attend over ``(N, L, C)`` tokens of an ``height x width`` map; returns ``(N, L, C)``."""
        heads = self.num_attention_heads
        # (N, L, C) -> (N, k, L, d) for k heads of width d
        query = rearrange(self.query(hidden_states), "n l (k d) -> n k l d", k=heads)
        if self.sr_ratio > 1:
            # NOTE: in fp32 even under autocast. On a Xeon with AMX, torch 2.11's bf16 kernel for
            # this convolution was wrong for the bundled model's 8 x 8 stride-8 one over 24 channels
            # (131 % relative error; 32 channels were fine), which changed the class of 11 % of the
            # Zion scene's pixels (docs/performance.md). It is a small part of the work.
            with torch.autocast(hidden_states.device.type, enabled=False):
                reduced = self.sr(_tokens_to_map(hidden_states.float(), height, width))  # (N, C, H/sr, W/sr)
            kv_states = self.layer_norm(_map_to_tokens(reduced))  # (N, L/sr², C)
        else:
            kv_states = hidden_states
        # (N, M, C) -> (N, k, M, d) with M = L / sr² keys and values
        key = rearrange(self.key(kv_states), "n m (k d) -> n k m d", k=heads)
        value = rearrange(self.value(kv_states), "n m (k d) -> n k m d", k=heads)
        context = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.attention_dropout if self.training else 0.0
        )
        return rearrange(context, "n k l d -> n l (k d)")  # (N, k, L, d) -> (N, L, C)


class SegformerSelfOutput(nn.Module):
    """Output projection of the attention, then dropout."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Project ``(N, L, C)`` tokens."""
        return self.dropout(self.dense(hidden_states))


class SegformerAttention(nn.Module):
    """Efficient self-attention followed by its output projection."""

    def __init__(self, config: SegformerConfig, hidden_size: int, num_attention_heads: int, sr_ratio: int):
        super().__init__()
        self.self = SegformerEfficientSelfAttention(
            hidden_size, num_attention_heads, sr_ratio, config.attention_probs_dropout_prob
        )
        self.output = SegformerSelfOutput(hidden_size, config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, height: int, width: int) -> Tensor:
        """Map ``(N, L, C)`` tokens to ``(N, L, C)``."""
        return self.output(self.self(hidden_states, height, width))


class SegformerDWConv(nn.Module):
    """Depthwise 3x3 convolution over the token map (the Mix-FFN's implicit positional encoding)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, hidden_states: Tensor, height: int, width: int) -> Tensor:
        """Map ``(N, L, C)`` tokens to ``(N, L, C)``."""
        return _map_to_tokens(self.dwconv(_tokens_to_map(hidden_states, height, width)))


class SegformerMixFFN(nn.Module):
    """Mix-FFN: Linear -> depthwise 3x3 conv -> GELU -> Linear, with dropout after GELU and at the end."""

    def __init__(self, config: SegformerConfig, in_features: int, hidden_features: int):
        super().__init__()
        self.dense1 = nn.Linear(in_features, hidden_features)
        self.dwconv = SegformerDWConv(hidden_features)
        self.dense2 = nn.Linear(hidden_features, in_features)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, height: int, width: int) -> Tensor:
        """Map ``(N, L, C)`` tokens to ``(N, L, C)``."""
        hidden_states = self.dwconv(self.dense1(hidden_states), height, width)
        hidden_states = self.dropout(F.gelu(hidden_states))
        return self.dropout(self.dense2(hidden_states))


class SegformerLayer(nn.Module):
    """Pre-norm transformer block: attention and Mix-FFN residual branches, each with stochastic depth."""

    def __init__(
        self,
        config: SegformerConfig,
        hidden_size: int,
        num_attention_heads: int,
        drop_path: float,
        sr_ratio: int,
        mlp_ratio: int,
    ):
        super().__init__()
        self.drop_path = drop_path
        self.layer_norm_1 = nn.LayerNorm(hidden_size)
        self.attention = SegformerAttention(config, hidden_size, num_attention_heads, sr_ratio)
        self.layer_norm_2 = nn.LayerNorm(hidden_size)
        self.mlp = SegformerMixFFN(config, hidden_size, hidden_size * mlp_ratio)

    def forward(self, hidden_states: Tensor, height: int, width: int) -> Tensor:
        """Map ``(N, L, C)`` tokens to ``(N, L, C)``."""
        attended = self.attention(self.layer_norm_1(hidden_states), height, width)
        hidden_states = hidden_states + _drop_path(attended, self.drop_path, self.training)
        mixed = self.mlp(self.layer_norm_2(hidden_states), height, width)
        return hidden_states + _drop_path(mixed, self.drop_path, self.training)

    def extra_repr(self) -> str:
        """Show the stochastic-depth rate in ``print(model)``."""
        return f"drop_path={self.drop_path:g}"


class SegformerEncoder(nn.Module):
    """Mix Transformer (MiT) encoder: per stage, patch embedding -> blocks -> LayerNorm."""

    def __init__(self, config: SegformerConfig):
        super().__init__()
        self.config = config
        total_depth = sum(config.depths)
        drop_path_rates = [config.drop_path_rate * i / max(total_depth - 1, 1) for i in range(total_depth)]
        in_channels = (config.num_channels, *config.hidden_sizes[:-1])
        self.patch_embeddings = nn.ModuleList(
            SegformerOverlapPatchEmbeddings(patch, stride, c_in, c_out)
            for patch, stride, c_in, c_out in zip(
                config.patch_sizes, config.strides, in_channels, config.hidden_sizes, strict=True
            )
        )
        self.block = nn.ModuleList()
        first = 0
        for stage, depth in enumerate(config.depths):
            self.block.append(
                nn.ModuleList(
                    SegformerLayer(
                        config,
                        hidden_size=config.hidden_sizes[stage],
                        num_attention_heads=config.num_attention_heads[stage],
                        drop_path=drop_path_rates[first + j],
                        sr_ratio=config.sr_ratios[stage],
                        mlp_ratio=config.mlp_ratios[stage],
                    )
                    for j in range(depth)
                )
            )
            first += depth
        self.layer_norm = nn.ModuleList(nn.LayerNorm(size) for size in config.hidden_sizes)

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` when an ``height x width`` input is too small for some stage.

        Every spatial-reduction convolution needs a feature map at least ``sr_ratio`` pixels wide and
        high (with the default config: inputs of 29 x 29 or more); Hugging Face's model fails there too.
        """
        h, w = height, width
        for stage, (patch, stride, sr) in enumerate(
            zip(self.config.patch_sizes, self.config.strides, self.config.sr_ratios, strict=True)
        ):
            pad = patch // 2
            if min(h, w) + 2 * pad < patch:
                raise ValueError(
                    f"input {height}x{width} is too small for stage {stage + 1}'s patch embedding"
                )
            h = (h + 2 * pad - patch) // stride + 1
            w = (w + 2 * pad - patch) // stride + 1
            if min(h, w) < sr:
                raise ValueError(
                    f"input {height}x{width} is too small: stage {stage + 1}'s {h}x{w} feature map is "
                    f"smaller than its spatial-reduction ratio {sr}"
                )

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        """Return one ``(N, C_i, H_i, W_i)`` feature map per stage (channels-last memory layout)."""
        self.check_input_size(*pixel_values.shape[-2:])
        features = []
        # Convolutions keep their input's layout; with channels-last every conv <-> token reshape is a view.
        hidden_states = pixel_values.contiguous(memory_format=torch.channels_last)
        for embed, blocks, norm in zip(self.patch_embeddings, self.block, self.layer_norm, strict=True):
            tokens, height, width = embed(hidden_states)
            for block in cast(nn.ModuleList, blocks):
                tokens = block(tokens, height, width)
            hidden_states = _tokens_to_map(norm(tokens), height, width)
            features.append(hidden_states)
        return features


class SegformerModel(nn.Module):
    """The MiT backbone, under the attribute names Hugging Face uses."""

    def __init__(self, config: SegformerConfig):
        super().__init__()
        self.encoder = SegformerEncoder(config)

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        """Return the per-stage feature maps of ``(N, C, H, W)`` pixels."""
        return self.encoder(pixel_values)


class SegformerMLP(nn.Module):
    """Holds one stage's projection to the decoder width; the decode head applies it (see there)."""

    def __init__(self, config: SegformerConfig, input_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, config.decoder_hidden_size)


class SegformerDecodeHead(nn.Module):
    """All-MLP decoder: project every stage to ``D`` channels, upsample to 1/4, concatenate, fuse, classify.

    The reference computes ``fuse(cat([up(P_4 x_4), ..., up(P_1 x_1)]))`` with a bias-free 1x1 convolution
    ``fuse`` over ``4 D`` channels at 1/4 resolution, the most expensive layer of SegFormer-B0. Projection,
    bilinear upsampling and the 1x1 convolution are all linear, and bilinear weights sum to 1, so this equals
    ``sum_i up(W_i P_i x_i) + sum_i W_i b_i`` where ``W_i`` is the slice of the fuse weight that sees stage
    ``i`` and ``b_i`` the bias of ``P_i``. The forward pass uses that form: each stage goes straight to ``D``
    channels at its own resolution through the combined matrix ``W_i P_i``, and only ``D``-channel maps are
    upsampled. In eval mode the BatchNorm is folded into the same matrices. The parameters, and therefore the
    checkpoints, are the reference's.
    """

    def __init__(self, config: SegformerConfig):
        super().__init__()
        self.linear_c = nn.ModuleList(SegformerMLP(config, size) for size in config.hidden_sizes)
        self.linear_fuse = nn.Conv2d(
            config.decoder_hidden_size * config.num_encoder_blocks,
            config.decoder_hidden_size,
            kernel_size=1,
            bias=False,
        )
        self.batch_norm = nn.BatchNorm2d(config.decoder_hidden_size)
        self.activation = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Conv2d(config.decoder_hidden_size, config.num_labels, kernel_size=1)

    def _fused_projections(self) -> tuple[list[Tensor], Tensor, bool]:
        """Combine each stage's projection with its slice of the fuse convolution.

        Computed in the parameters' dtype even under autocast, so the products are rounded only once.

        Returns:
            The per-stage matrices ``W_i P_i`` ``(D, C_i)``, the shared bias ``(D,)``, and whether the
            BatchNorm is folded into both (in eval mode, with running statistics).
        """
        fuse_weight = self.linear_fuse.weight
        projections = [cast(SegformerMLP, mlp).proj for mlp in self.linear_c]
        with torch.autocast(fuse_weight.device.type, enabled=False):
            # (D, S*D, 1, 1) -> (S, D, D); flipped because the reference concatenates the last stage first.
            stage_weights = rearrange(fuse_weight, "d (s e) 1 1 -> s d e", s=len(projections)).flip(0)
            # (D, D) @ (D, C_i) -> (D, C_i) and (D, D) @ (D,) -> (D,)
            weights = [w @ proj.weight for w, proj in zip(stage_weights, projections, strict=True)]
            bias = torch.stack(
                [w @ proj.bias for w, proj in zip(stage_weights, projections, strict=True)]
            ).sum(0)
            bn = self.batch_norm
            mean, var = bn.running_mean, bn.running_var
            if bn.training or mean is None or var is None:
                return weights, bias, False
            scale = bn.weight * torch.rsqrt(var + bn.eps)  # (D,)
            return [scale[:, None] * w for w in weights], scale * (bias - mean) + bn.bias, True

    def forward(self, encoder_hidden_states: list[Tensor]) -> Tensor:
        """Map the stage feature maps to logits ``(N, num_labels, H_1, W_1)`` at the first stage's size.

        Always computed in fp32, also under autocast: the decoder sums four upsampled stages into the
        logits, and bf16 rounding there flipped the class of 1.05 % of the Zion scene's pixels against
        0.10 % when only the encoder runs in bf16 (bench/bench_precision.py); it costs little, as the
        decoder is a small part of the work.
        """
        with torch.autocast(encoder_hidden_states[0].device.type, enabled=False):
            return self._decode([features.float() for features in encoder_hidden_states])

    def _decode(self, encoder_hidden_states: list[Tensor]) -> Tensor:
        weights, bias, batch_norm_folded = self._fused_projections()
        first, *others = encoder_hidden_states
        height, width = first.shape[-2:]
        # (N, C_1, H, W) -> (N, H*W, D) -> (N, D, H, W)
        fused = _tokens_to_map(F.linear(_map_to_tokens(first), weights[0], bias), height, width)
        for features, weight in zip(others, weights[1:], strict=True):
            h, w = features.shape[-2:]
            projected = _tokens_to_map(F.linear(_map_to_tokens(features), weight), h, w)  # (N, D, h, w)
            fused.add_(F.interpolate(projected, size=(height, width), mode="bilinear", align_corners=False))
        if not batch_norm_folded:
            fused = self.batch_norm(fused)
        return self.classifier(self.dropout(self.activation(fused)))


class SegformerForSemanticSegmentation(nn.Module):
    """SegFormer for semantic segmentation, a drop-in for Hugging Face's model of the same name.

    ``state_dict()`` keys equal those of Hugging Face checkpoints (``segformer.encoder...``,
    ``decode_head...``), so their weights load with ``load_state_dict(strict=True)`` and give the same logits.

    Args:
        config: Architecture hyper-parameters.
    """

    def __init__(self, config: SegformerConfig):
        super().__init__()
        self.config = config
        self.segformer = SegformerModel(config)
        self.decode_head = SegformerDecodeHead(config)
        self.pixel_head = _pixel_head(config) if config.pixel_head_channels else None
        self.apply(_init_weights)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Compute class logits at 1/4 resolution (at full resolution with a pixel head).

        Args:
            pixel_values: ``(N, num_channels, H, W)`` images, any layout (channels-last is fine).

        Returns:
            Logits ``(N, num_labels, ceil(H/4), ceil(W/4))`` (with the default strides), contiguous;
            ``(N, num_labels, H, W)`` with ``pixel_head_channels``.

        Raises:
            ValueError: The input is too small for the spatial reductions (see
                :meth:`SegformerEncoder.check_input_size`).
        """
        logits = self.decode_head(self.segformer(pixel_values))
        if self.pixel_head is not None:
            # fp32 like the decoder: the per-pixel term decides thin classes at class borders.
            with torch.autocast(pixel_values.device.type, enabled=False):
                size = pixel_values.shape[-2:]
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                logits = logits + self.pixel_head(pixel_values.float())
        return logits.contiguous()


def _pixel_head(config: SegformerConfig) -> nn.Sequential:
    """Per-pixel MLP on the input bands (1x1 convolutions): the spectral evidence of each pixel alone.

    The decoder works at the first stage's resolution (1/4 or 1/2), which blurs classes one or two
    pixels wide (roads, rivers, field edges); this head sees every pixel at full resolution.
    """
    hidden = config.pixel_head_channels
    return nn.Sequential(
        nn.Conv2d(config.num_channels, hidden, kernel_size=1),
        nn.ReLU(inplace=True),
        _ZeroInitConv2d(hidden, config.num_labels, kernel_size=1),
    )


class _ZeroInitConv2d(nn.Conv2d):
    """A convolution that starts at zero (``_init_weights`` sees to it).

    A fresh pixel head then adds nothing: a new model starts as the plain SegFormer, and the
    head learns only what the decoder misses.
    """


def _init_weights(module: nn.Module) -> None:
    """Initialise like the original MiT: truncated normal Linear, fan-out normal conv, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, _ZeroInitConv2d):
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
