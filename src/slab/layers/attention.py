"""Attention layers: softmax attention and SLA (simplified linear attention).

SLA on tokens ``x`` of a ``H x W`` grid (method section 4):
``q, k, v = x Wq, x Wk, x Wv``; ``k += P`` (learned positional encoding, resized bilinearly when the
grid differs from the one it was created for); per head ``O = relu(q)(relu(k)^T v) /
(relu(q) sum relu(k) + eps)``; ``O += DWC(v)`` (depthwise k x k conv over the grid, ``head_dim``
channels, shared by all heads); output projection.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_notrace_function

from ..ops.linear_attention import linear_attention
from ..ops.naive import linear_attention_reference

__all__ = ["SoftmaxAttention", "SimplifiedLinearAttention", "resize_positional_encoding", "dwc_on_values",
           "split_heads", "merge_heads", "check_grid", "values_to_grid", "grid_to_values"]

# A custom autograd Function with shape checks: FX records it as one call, run on real tensors.
register_notrace_function(linear_attention)
register_notrace_function(linear_attention_reference)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, C] -> [B, heads, N, C / heads]``."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, d] -> [B, N, heads * d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


@register_notrace_function  # compares grids known only at run time
def check_grid(n: int, hw: tuple[int, int]) -> None:
    """Raise unless ``n`` tokens make the ``hw`` grid."""
    if hw[0] * hw[1] != n:
        raise ValueError(f"SLA got {n} tokens for a {hw[0]}x{hw[1]} grid")


@register_notrace_function  # compares grids known only at run time
def resize_positional_encoding(pe: torch.Tensor, src_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """``[1, Hs*Ws, C]`` encoding laid on ``src_hw`` -> ``[1, H*W, C]`` by bilinear interpolation."""
    if src_hw[0] == hw[0] and src_hw[1] == hw[1]:
        return pe
    c = pe.shape[-1]
    grid = pe.reshape(1, src_hw[0], src_hw[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=[hw[0], hw[1]], mode="bilinear", align_corners=False).to(pe.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], c)


def values_to_grid(v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Each head's values as a map: ``[B, h, N, d] -> [B * h, d, H, W]``."""
    b, h, n, d = v.shape
    return v.reshape(b * h, hw[0], hw[1], d).permute(0, 3, 1, 2)


def grid_to_values(grid: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`values_to_grid`: ``[B * h, d, H, W] -> [B, h, N, d]``."""
    bh, d, gh, gw = grid.shape
    return grid.permute(0, 2, 3, 1).reshape(bh // num_heads, num_heads, gh * gw, d)


def dwc_on_values(v: torch.Tensor, hw: tuple[int, int], dwc: nn.Conv2d) -> torch.Tensor:
    """Depthwise conv of each head's values over the grid: ``[B, h, N, d] -> [B, h, N, d]``.

    TorchScript cannot pass a module to a function: scripted modules call ``dwc`` between
    :func:`values_to_grid` and :func:`grid_to_values` themselves.
    """
    return grid_to_values(dwc(values_to_grid(v, hw)), v.shape[1])


class SoftmaxAttention(nn.Module):
    """Multi-head softmax self-attention (``qkv`` and ``proj`` as in timm/DeiT)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))


class SimplifiedLinearAttention(nn.Module):
    """SLA with a fused ``qkv`` projection (DeiT, Swin).

    Args:
        dim: channels C. num_heads: heads (C must divide). qkv_bias: bias of ``qkv``.
        grid_size: ``(H, W)`` the positional encoding is created for (resized at other grids).
        kernel_size: DWC kernel (the authors use 5).
        impl: ``'fast'`` (:func:`slab.ops.linear_attention`) or ``'reference'`` (the einsum spec).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, grid_size: tuple[int, int] = (14, 14),
                 kernel_size: int = 5, attn_drop: float = 0.0, proj_drop: float = 0.0, impl: str = "fast"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.grid_size = tuple(grid_size)
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim))
        nn.init.trunc_normal_(self.positional_encoding, std=0.02)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.impl == "fast":
            return linear_attention(q, k, v)
        return linear_attention_reference(q, k, v)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_grid(x.shape[1], hw)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        k = k + resize_positional_encoding(self.positional_encoding, self.grid_size, hw)
        q, k, v = split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)
        out = self.attend(q, k, v) + grid_to_values(self.dwc(values_to_grid(v, hw)), self.num_heads)
        return self.proj_drop(self.proj(merge_heads(out)))
