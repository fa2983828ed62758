"""Fit pretrained weights to a network with other input bands or classes (torch only, no geoseg state)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

PATCH_EMBED_KEY = "segformer.encoder.patch_embeddings.0.proj.weight"


def expand_input_bands(weight: torch.Tensor, new_count: int) -> torch.Tensor:
    """Widen a first convolution trained on RGB to ``new_count`` input bands.

    The promise: input channels 0, 1 and 2 keep their trained filters unchanged (so the model's
    first three bands must be red, green and blue, in the pretrained order), and every added
    channel ``3 .. new_count - 1`` starts from the mean of the three RGB filters. Nothing is
    rescaled: on an input whose extra bands are zero the layer's output is unchanged.

    Args:
        weight: ``(out_channels, 3, kh, kw)`` convolution weight.
        new_count: Input bands wanted, at least 3.

    Returns:
        A new ``(out_channels, new_count, kh, kw)`` tensor of the same dtype and device
        (the same values when ``new_count`` is 3).

    Raises:
        ValueError: ``weight`` does not have 3 input channels, or ``new_count < 3``.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(
            f"expected a (out, 3, kh, kw) RGB convolution weight, got shape {tuple(weight.shape)}"
        )
    if new_count < 3:
        raise ValueError(f"new_count must be at least 3, got {new_count}")
    # (out, 3, kh, kw) -> (out, 1, kh, kw) -> (out, new_count - 3, kh, kw)
    extra = weight.mean(dim=1, keepdim=True).expand(-1, new_count - 3, -1, -1)
    return torch.cat([weight, extra], dim=1).contiguous()


def adapt_state_dict(
    pretrained: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Pick the pretrained tensors that fit ``target`` (a network's ``state_dict()``).

    Keys may carry or lack the ``segformer.`` prefix of Hugging Face checkpoints. A 3-band patch
    embedding is widened with :func:`expand_input_bands`; tensors whose shapes still differ (a
    classifier for other classes) are skipped and keep the network's initial values.

    Returns:
        ``(tensors to load, keys loaded, keys skipped with the reason)``.
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in pretrained.items():
        if key in target:
            renamed[key] = tensor
        elif f"segformer.{key}" in target:
            renamed[f"segformer.{key}"] = tensor
    chosen: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, tensor in renamed.items():
        want = target[key]
        if key == PATCH_EMBED_KEY and tensor.ndim == 4 and tensor.shape[1] == 3 and want.shape[1] > 3:
            tensor = expand_input_bands(tensor, want.shape[1])
        if tuple(tensor.shape) != tuple(want.shape):
            skipped.append(f"{key} (shape {tuple(tensor.shape)}, network has {tuple(want.shape)})")
            continue
        chosen[key] = tensor.to(want.dtype)
    skipped += [
        f"{k} (not in the network)" for k in pretrained if k not in target and f"segformer.{k}" not in target
    ]
    return chosen, sorted(chosen), skipped
