"""Readable float32 specifications of SLAB's ops.

These are the references the fast paths in this package are tested against. They are written
for clarity, not speed: one einsum per step of the formula, everything in float32.
"""
from __future__ import annotations

import torch


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
