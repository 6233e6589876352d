"""Module-level folding: turn a norm module into its eval affine and merge it into Linear/Conv layers.

The arithmetic lives in :mod:`slab.ops.folding`; this module does the surgery (weights replaced in
place, a bias created where the layer had none, dtype and device kept). Every family's ``fuse()``
calls these functions, so there is one implementation of folding in the package.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.norm import ChannelAffine, PRepBN, RepBN, TokenBatchNorm
from ..ops.folding import (affine_of_batchnorm, fold_affine_into_consumer, fold_affine_into_depthwise_consumer,
                           fold_affine_into_producer)

FOLDABLE_NORMS = (TokenBatchNorm, PRepBN, nn.BatchNorm1d, nn.BatchNorm2d, ChannelAffine)
# What must not remain in a fused model.
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, TokenBatchNorm,
                                PRepBN, nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class NotFoldableError(ValueError):
    """A norm that depends on per-sample statistics (LayerNorm, RMSNorm, GroupNorm) cannot be folded."""


def norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eval-mode ``(scale, shift)`` (float64, per channel) of a foldable norm; None for Identity."""
    if isinstance(norm, nn.Identity):
        return None
    if isinstance(norm, PRepBN):
        norm = norm.repbn  # eval mode uses the RepBN branch alone, whatever lam is
    if isinstance(norm, TokenBatchNorm):
        alpha = norm.alpha.detach() if isinstance(norm, RepBN) else 0.0
        bn = norm.bn
        return affine_of_batchnorm(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, alpha)
    if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return affine_of_batchnorm(norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
    if isinstance(norm, ChannelAffine):
        return norm.scale.detach().double(), norm.shift.detach().double()
    raise NotFoldableError(
        f"{type(norm).__name__} normalises with per-token statistics and cannot be folded; build the model with "
        f"norm='prepbn' (or 'repbn'/'bn') to get a foldable norm")


def _set_weight_bias(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(device=layer.weight.device, dtype=layer.weight.dtype))
        else:
            layer.bias.copy_(bias)


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels and layer.groups > 1


def fold_into_consumers(norm: nn.Module, consumers: list[nn.Module]) -> nn.Module:
    """Merge ``norm`` into every layer that reads its output; returns the Identity that replaces it.

    Exact when each consumer is a Linear, or a Conv without zero padding, that sees the norm's
    output unchanged (a depthwise conv is handled channel by channel).
    """
    affine = norm_affine(norm)
    if affine is not None:
        scale, shift = affine
        for layer in consumers:
            if isinstance(layer, nn.Conv2d) and any(p != 0 for p in _as_tuple(layer.padding)):
                raise ValueError(f"cannot fold a norm into a zero-padded conv ({layer}): padded zeros would "
                                 f"not be shifted")
            fold = fold_affine_into_depthwise_consumer if _is_depthwise(layer) else fold_affine_into_consumer
            _set_weight_bias(layer, *fold(layer.weight, layer.bias, scale, shift))
    return nn.Identity()


def fold_into_producer(norm: nn.Module, producer: nn.Module) -> nn.Module:
    """Merge ``norm`` into the Linear/Conv whose output it normalises; returns the replacing Identity."""
    affine = norm_affine(norm)
    if affine is not None:
        _set_weight_bias(producer, *fold_affine_into_producer(producer.weight, producer.bias, *affine))
    return nn.Identity()


def as_channel_affine(norm: nn.Module, layout: str = "tokens") -> nn.Module:
    """The eval affine of ``norm`` as an explicit :class:`ChannelAffine` (for outputs nothing can absorb)."""
    affine = norm_affine(norm)
    if affine is None:
        return nn.Identity()
    scale, shift = affine
    ref = next(norm.parameters(), None)
    out = ChannelAffine(scale.numel(), layout=layout)
    with torch.no_grad():
        out.scale.copy_(scale)
        out.shift.copy_(shift)
    if ref is not None:
        out.to(device=ref.device, dtype=ref.dtype)
    return out


def zero_preimage(norm: nn.Module) -> torch.Tensor | None:
    """Per-channel input value the norm maps to 0: ``-shift / scale`` (None for Identity).

    Used where the unfused model zero-pads a norm's output (Swin windows): after folding the norm
    into the consumer, padding with this value instead of 0 reproduces the same consumer output.
    """
    affine = norm_affine(norm)
    if affine is None:
        return None
    scale, shift = affine
    if torch.any(scale.abs() < 1e-12):
        raise NotFoldableError("a norm with a zero scale cannot be folded ahead of padding")
    return -shift / scale


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
