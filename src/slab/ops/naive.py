"""Readable float32 specifications of SLAB's ops.

These are the references the fast paths in this package are tested against. They are written
for clarity, not speed: one step of the formula per line, everything in float32 (float64 for float64
input where noted).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Simplified linear attention (SLA) core, without the DWC term.

    Args:
        q, k: ``[B, H, N, D]`` *before* the ReLU kernel; v: ``[B, H, N, Dv]``.
        eps: added to the normaliser.

    Returns:
        ``[B, H, N, Dv]`` in the dtype of ``q``:
        ``O = relu(q) (relu(k)^T v) / (relu(q) sum_j relu(k_j)^T + eps)``.
    """
    dtype = q.dtype
    q = torch.relu(q.float())
    k = torch.relu(k.float())
    v = v.float()
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    z = 1.0 / (torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)) + eps)
    out = torch.einsum("bhnd,bhde,bhn->bhne", q, kv, z)
    return out.to(dtype)


def prepbn_mix_reference(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                         bn_weight: torch.Tensor, bn_bias: torch.Tensor, alpha: torch.Tensor,
                         lam: torch.Tensor | float | None, running_mean: torch.Tensor | None = None,
                         running_var: torch.Tensor | None = None, momentum: float = 0.1, bn_eps: float = 1e-5,
                         ln_eps: float = 1e-6) -> torch.Tensor:
    """PRepBN in training: ``lam * LN(x) + (1 - lam) * (BN(x) + alpha * x)`` on ``[M, C]`` tokens.

    The contract of :func:`slab.ops.prepbn.prepbn_mix` (its ``impl='torch'`` and ``impl='triton'`` paths are
    tested against this), in plain autograd ops, computed in float32 (float64 for float64 input):

    * ``BN`` normalises each channel with its mean and biased variance over the ``M`` tokens, then applies
      ``bn_weight``, ``bn_bias``; the running statistics (when given) move by ``momentum`` towards the batch
      mean and the *unbiased* variance, which is 0/0 = NaN for ``M == 1`` (as in ``torch.native_batch_norm``);
    * ``LN`` is ``F.layer_norm`` over the channels with ``ln_weight``, ``ln_bias``;
    * ``lam`` None means 0 with the LN branch not computed; LN parameters given then receive zero gradients.

    Returns ``[M, C]`` in ``x``'s dtype.
    """
    m, c = x.shape
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    mean = xf.mean(dim=0)
    var = (xf - mean).pow(2).mean(dim=0)
    bn = (xf - mean) * torch.rsqrt(var + bn_eps) * bn_weight.to(ct) + bn_bias.to(ct)
    repbn = bn + alpha.to(ct) * xf
    if running_mean is not None:
        with torch.no_grad():
            unbiased = var * (m / (m - 1)) if m > 1 else torch.full_like(var, float("nan"))
            running_mean.mul_(1.0 - momentum).add_(momentum * mean.to(running_mean.dtype))
            running_var.mul_(1.0 - momentum).add_(momentum * unbiased.to(running_var.dtype))
    if lam is None:
        if ln_weight is None:
            return repbn.to(x.dtype)
        zero = 0.0 * (ln_weight.sum() + ln_bias.sum())  # the inactive LN branch: zero gradients, not none
        return (repbn + zero.to(ct)).to(x.dtype)
    lam = torch.as_tensor(lam).to(device=x.device, dtype=ct)
    ln = F.layer_norm(xf, (c,), ln_weight.to(ct), ln_bias.to(ct), ln_eps)
    return (lam * ln + (1.0 - lam) * repbn).to(x.dtype)
