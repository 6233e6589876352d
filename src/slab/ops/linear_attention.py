"""Simplified linear attention (SLA), the production path.

Same signature and result as :func:`slab.ops.naive.linear_attention_reference`. What makes it
faster than the plain einsum chain:

* associativity chosen by shape: ``q (k^T v)`` costs ``O(N d^2)``, ``(q k^T) v`` costs
  ``O(N^2 d)``; we take the cheaper one (short sequences, e.g. windows, prefer the second);
* the normaliser rides along in the same matmul: ``v`` gets a column of ones, so
  ``k^T [v, 1]`` holds ``k^T v`` and ``sum_j k_j`` and one ``q @`` gives numerator and
  denominator together (one pass over ``q`` instead of two);
* everything is computed in float32 with autocast disabled: the ReLU kernel is unbounded and
  the sums over N overflow in half precision.
"""
from __future__ import annotations

import torch


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"linear_attention expects q, k, v of shape [B, heads, N, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "linear_attention: q [B,H,Nq,D], k [B,H,Nk,D] and v [B,H,Nk,Dv] must agree on B, H, D and Nk; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SLA core: ``relu(q) (relu(k)^T v) / (relu(q) sum_j relu(k_j) + eps)``.

    Args:
        q: ``[B, H, Nq, D]`` queries before the kernel.
        k: ``[B, H, Nk, D]`` keys before the kernel (positional encoding already added).
        v: ``[B, H, Nk, Dv]`` values.
        eps: added to the normaliser (the authors use 1e-6).

    Returns:
        ``[B, H, Nq, Dv]`` in ``q``'s dtype. Differentiable in q, k and v.
    """
    _check(q, k, v)
    out_dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = torch.relu(q.float())
        k = torch.relu(k.float())
        v = v.float()
        nq, nk, d, dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
        # Multiply-adds of each association (normaliser included).
        cost_kv_first = nk * d * (dv + 1) + nq * d * (dv + 1)
        cost_qk_first = nq * nk * d + nq * nk * (dv + 1)
        v1 = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)
        if cost_kv_first <= cost_qk_first:
            out = q @ (k.transpose(-2, -1) @ v1)
        else:
            out = (q @ k.transpose(-2, -1)) @ v1
        num, den = out[..., :dv], out[..., dv:]
        out = num / (den + eps)
    return out.to(out_dtype)
