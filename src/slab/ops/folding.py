"""Folding arithmetic: pure functions on tensors, no module surgery.

A per-channel affine map ``y = x * s + t`` (what RepBN/BN compute in eval) can be merged into a
neighbouring linear operator:

* after it, into a consumer ``W y + b``:  ``W' = W diag(s)``, ``b' = W t + b``;
* before it, into a producer ``y = W x + b``: ``W' = diag(s) W``, ``b' = s * b + t``.

Convolutions are the same with ``W`` summed over the kernel window; folding into a consumer conv
is exact only when the conv sees no zero padding (padded zeros would not have been shifted).
"""
from __future__ import annotations

import torch


def affine_of_batchnorm(running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float, alpha: torch.Tensor | float = 0.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(s, t)`` with ``BN(x) + alpha * x == x * s + t`` in eval (float64 math)."""
    mean, var = running_mean.double(), running_var.double()
    w = weight.double() if weight is not None else torch.ones_like(mean)
    b = bias.double() if bias is not None else torch.zeros_like(mean)
    inv = w / torch.sqrt(var + eps)
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=mean.device).reshape(-1)
    return inv + alpha, b - mean * inv


def compose_affine(s1: torch.Tensor, t1: torch.Tensor, s2: torch.Tensor, t2: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * s1 + t1) * s2 + t2`` as one ``(s, t)``."""
    return s1 * s2, t1 * s2 + t2


def fold_affine_into_consumer(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                              shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``Op(x * s + t)`` for a Linear (``[O, I]``) or Conv (``[O, I/g, *k]``, groups 1).

    Returns ``(W', b')`` in ``weight``'s dtype. The shift term sums the kernel over its window,
    so for convs it is exact only without zero padding.
    """
    w = weight.double()
    shape = (1, -1) + (1,) * (w.dim() - 2)
    new_w = w * scale.double().reshape(shape)
    extra = (w * shift.double().reshape(shape)).flatten(1).sum(1)
    new_b = extra if bias is None else bias.double() + extra
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def fold_affine_into_depthwise_consumer(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                                        shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`fold_affine_into_consumer` for a depthwise conv (``[C, 1, *k]``)."""
    w = weight.double()
    shape = (-1,) + (1,) * (w.dim() - 1)
    new_w = w * scale.double().reshape(shape)
    extra = (w * shift.double().reshape(shape)).flatten(1).sum(1)
    new_b = extra if bias is None else bias.double() + extra
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def fold_affine_into_producer(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                              shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``Op(x) * s + t`` for a Linear or Conv whose output channels are dim 0."""
    w = weight.double()
    shape = (-1,) + (1,) * (w.dim() - 1)
    new_w = w * scale.double().reshape(shape)
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.double()
    new_b = b * scale.double() + shift.double()
    return new_w.to(weight.dtype), new_b.to(weight.dtype)
