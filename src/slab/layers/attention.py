"""Attention layers: softmax attention and SLA (simplified linear attention), and the one registry of both.

SLA on tokens ``x`` of a ``H x W`` grid (method section 4):
``q, k, v = x Wq, x Wk, x Wv``; ``k += P`` (learned positional encoding, resized bilinearly when the
grid differs from the one it was created for); per head ``O = relu(q)(relu(k)^T v) /
(relu(q) sum relu(k) + eps)``; ``O += DWC(v)`` (depthwise k x k conv over the grid, ``head_dim``
channels, shared by all heads); output projection. That recipe is :class:`SLACore`, under every variant.

Choosing an attention: every family parses its ``attn=`` (or the authors' ``attn_type=``) with
:func:`parse_attn` and builds each block's layer with :func:`get_attn_layer` ``(kind, form)``. A *form* is the
geometry the layer attends over, with one constructor and one call signature for both kinds:

* ``'global'`` (DeiT) and ``'window'`` (Swin): ``layer(dim, num_heads, grid_size=, qkv_bias=, kernel_size=,
  attn_drop=, proj_drop=)``, called ``layer(x [B, N, C], hw, attn_mask=None)``;
* ``'spatial_reduction'`` (PVT): the same plus ``sr_ratio=`` and ``norm_layer=``, called ``layer(x, hw)``;
* ``'stripe'`` (CSwin): ``layer(dim, num_heads, orientation, split_size, grid_size=, kernel_size=,
  attn_drop=)``, called ``layer(q, k, v)`` on ``[B, H, W, C]`` maps.

Arguments one kind has no use for (``kernel_size`` for softmax, ``attn_drop`` for SLA, which forms no
attention matrix) are accepted and ignored, so a block builds either kind with one call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_notrace_function

from ..ops.linear_attention import linear_attention
from ..ops.naive import linear_attention_reference

__all__ = ["SoftmaxAttention", "SimplifiedLinearAttention", "SLACore", "resize_positional_encoding",
           "dwc_on_tokens", "split_heads", "merge_heads", "check_grid", "values_on_tokens", "head_dim_of",
           "ATTN_KINDS", "ATTN_FORMS", "parse_attn", "attn_letters", "register_attn_layer", "get_attn_layer"]

ATTN_KINDS = ("softmax", "sla")
#: The per-stage letters of the authors' ``attn_type`` strings (``'LLSS'``).
ATTN_LETTERS = {"S": "softmax", "L": "sla"}
ATTN_FORMS = ("global", "window", "spatial_reduction", "stripe")
_ATTN_LAYERS: dict[tuple[str, str], type] = {}

# A custom autograd Function with shape checks: FX records it as one call, run on real tensors.
register_notrace_function(linear_attention)
register_notrace_function(linear_attention_reference)
# FX wraps a notrace function only where the forward of a traced module looks it up, but SLACore.sla looks
# these up here on behalf of modules defined in the family files: torch.fx.wrap patches this module's names
# in every trace.
torch.fx.wrap("linear_attention")
torch.fx.wrap("linear_attention_reference")


def parse_attn(attn: str, num_stages: int, unit: str = "stage", name: str = "attn (or attn_type)") -> list[str]:
    """The attention kind of each stage (or layer: ``unit``): ``'sla'`` / ``'softmax'`` for all, or one letter
    per stage (``'LLSS'`` -> ``['sla', 'sla', 'softmax', 'softmax']``; L = SLA, S = softmax, any case). The one
    parser of every model's ``attn=`` and of ``SlabLlamaConfig.attn_type`` (``name`` is the argument's name in
    the error)."""
    if attn in ATTN_KINDS:
        return [attn] * num_stages
    letters = attn.upper() if isinstance(attn, str) else None
    if letters is None or len(letters) != num_stages or any(c not in ATTN_LETTERS for c in letters):
        example = "LS" * (num_stages // 2) + "L" * (num_stages % 2)
        raise ValueError(f"{name} must be 'softmax', 'sla' or a string of {num_stages} letters from "
                         f"'L' (SLA) and 'S' (softmax), one per {unit}, e.g. {example!r}; got {attn!r}")
    return [ATTN_LETTERS[c] for c in letters]


def attn_letters(kinds: list[str]) -> str:
    """Inverse of :func:`parse_attn`: ``['sla', 'softmax'] -> 'LS'``."""
    return "".join("L" if kind == "sla" else "S" for kind in kinds)


def register_attn_layer(form: str, kind: str):
    """Class decorator: make the class the ``kind`` attention of ``form`` (see the module docstring)."""
    if form not in ATTN_FORMS or kind not in ATTN_KINDS:
        raise ValueError(f"form must be one of {ATTN_FORMS} and kind one of {ATTN_KINDS}; got {form!r}, {kind!r}")

    def register(cls: type) -> type:
        _ATTN_LAYERS[form, kind] = cls
        return cls
    return register


def get_attn_layer(kind: str, form: str = "global") -> type:
    """The attention class of ``kind`` (``'softmax'``, ``'sla'`` or a letter) for ``form`` (:data:`ATTN_FORMS`)."""
    kind = parse_attn(kind, 1)[0]
    if form not in ATTN_FORMS:
        raise ValueError(f"unknown attention form {form!r}; choose one of {ATTN_FORMS}")
    if (form, kind) not in _ATTN_LAYERS:  # the model families register their forms when imported
        raise ValueError(f"no {kind!r} attention is registered for form {form!r}: import slab.models first")
    return _ATTN_LAYERS[form, kind]


def head_dim_of(dim: int, num_heads: int) -> int:
    """Channels per head; raises unless ``num_heads`` divides ``dim``."""
    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    return dim // num_heads


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


torch.fx.wrap("check_grid")  # see the note at linear_attention


@register_notrace_function  # compares grids known only at run time
def resize_positional_encoding(pe: torch.Tensor, src_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """``[1, Hs*Ws, C]`` encoding laid on ``src_hw`` -> ``[1, H*W, C]`` by bilinear interpolation."""
    if src_hw[0] == hw[0] and src_hw[1] == hw[1]:
        return pe
    c = pe.shape[-1]
    grid = pe.reshape(1, src_hw[0], src_hw[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=[hw[0], hw[1]], mode="bilinear", align_corners=False).to(pe.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], c)


torch.fx.wrap("resize_positional_encoding")  # see the note at linear_attention


@register_notrace_function  # compares token counts known only at run time
def values_on_tokens(v: torch.Tensor, n: int) -> torch.Tensor:
    """Values ``[B, M, C]`` of a reduced grid, linearly interpolated along the sequence to ``n`` tokens
    (PVT's spatial-reduction SLA; no-op when ``M == n``)."""
    if v.shape[1] == n:
        return v
    return F.interpolate(v.transpose(1, 2), size=n, mode="linear").transpose(1, 2)


torch.fx.wrap("values_on_tokens")  # see the note at linear_attention


def dwc_on_tokens(v: torch.Tensor, hw: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor | None,
                  num_heads: int) -> torch.Tensor:
    """SLA's depthwise conv of each head's values over the grid, in the token layout: ``v`` ``[B, N, C]`` (any
    strides along N, channels contiguous, e.g. a slice of a fused ``qkv``) -> a new ``[B, N, C]``.

    ``weight`` ``[d, 1, k, k]`` and ``bias`` ``[d]`` are the conv's, shared by the heads (``d = C / heads``).
    Why this layout: ``[B, N, C]`` viewed as ``[B, H, W, C]`` *is* a channels-last image of ``C`` channels, so
    one depthwise conv over all heads (the weights repeated per head, ``C * k * k`` floats) reads V without
    a copy and writes the tokens layout the head merge wants; the per-head layout ``[B * heads, d, H, W]``
    costs two copies and a slower oneDNN path (docs/benchmarks.md, issue 16).
    """
    b, n, c = v.shape
    image = v.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)
    if bias is not None:
        bias = torch.cat([bias] * num_heads)  # cat: 6 us here, Tensor.repeat 35 us (its dispatch, not the copy)
    out = F.conv2d(image, torch.cat([weight] * num_heads), bias, padding=weight.shape[-1] // 2, groups=c)
    return out.permute(0, 2, 3, 1).reshape(b, n, c)


class SLACore:
    """The SLA recipe every SLA variant shares (global, windowed, spatial-reduction, stripe), as a mixin.

    The host ``nn.Module`` computes ``q, k, v`` its own way and calls :meth:`sla`. The parameters live on the
    host (``positional_encoding``, ``dwc``), not on a submodule, so the keys stay those of the authors'
    checkpoints.
    """

    def init_sla(self, dim: int, num_heads: int, grid_size: tuple[int, int], kernel_size: int,
                 impl: str = "fast") -> None:
        """Create the positional encoding (laid on ``grid_size``, the grid of K) and the DWC (``head_dim``
        channels, shared by the heads). ``impl``: ``'fast'`` (:func:`slab.ops.linear_attention`) or
        ``'reference'`` (the einsum specification)."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
        self.num_heads = num_heads
        self.head_dim = head_dim_of(dim, num_heads)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.impl = impl
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim))
        nn.init.trunc_normal_(self.positional_encoding, std=0.02)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.impl == "fast":
            return linear_attention(q, k, v)
        return linear_attention_reference(q, k, v)

    def sla(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_hw: tuple[int, int],
            hw: tuple[int, int]) -> torch.Tensor:
        """``q`` ``[B, N, C]`` of the ``hw`` grid, ``k, v`` ``[B, M, C]`` of the ``kv_hw`` grid -> ``[B, N, C]``
        (before the output projection): ``k += P``, per head ``linear_attention(q, k, v) + DWC(v)``, the values
        brought back to the N tokens first when K/V come from a reduced grid."""
        if not torch.jit.is_scripting():
            check_grid(q.shape[1], hw)
        b, n, c = q.shape
        k = k + resize_positional_encoding(self.positional_encoding, self.grid_size, kv_hw)
        local = self.local_values(values_on_tokens(v, n), hw)
        out = self.attend(split_heads(q, self.num_heads), split_heads(k, self.num_heads),
                          split_heads(v, self.num_heads))
        # The head merge and the add in one pass, into the DWC's fresh [B, N, C] output.
        return local.view(b, n, self.num_heads, self.head_dim).add_(out.transpose(1, 2)).view(b, n, c)

    def local_values(self, v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The DWC branch ``DWC(v)``: ``[B, N, C]`` tokens of the ``hw`` grid -> a new ``[B, N, C]``."""
        return dwc_on_tokens(v, hw, self.dwc.weight, self.dwc.bias, self.num_heads)


@register_attn_layer("global", "softmax")
class SoftmaxAttention(nn.Module):
    """Multi-head softmax self-attention (``qkv`` and ``proj`` as in timm/DeiT); ``grid_size`` and
    ``kernel_size`` are SLA's (unused here, see the module docstring)."""

    def __init__(self, dim: int, num_heads: int = 8, grid_size: tuple[int, int] = (14, 14), qkv_bias: bool = True,
                 kernel_size: int = 5, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim_of(dim, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, C]``; ``attn_mask`` broadcastable to ``[B, heads, N, N]`` (added to the logits)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))


@register_attn_layer("global", "sla")
class SimplifiedLinearAttention(SLACore, nn.Module):
    """SLA with a fused ``qkv`` projection (DeiT; Swin's windows).

    Args:
        dim: channels C. num_heads: heads (C must divide). qkv_bias: bias of ``qkv``.
        grid_size: ``(H, W)`` the positional encoding is created for (resized at other grids).
        kernel_size: DWC kernel (the authors use 5). attn_drop: unused (SLA forms no attention matrix).
        impl: ``'fast'`` (:func:`slab.ops.linear_attention`) or ``'reference'`` (the einsum spec).
    """

    def __init__(self, dim: int, num_heads: int = 8, grid_size: tuple[int, int] = (14, 14), qkv_bias: bool = True,
                 kernel_size: int = 5, attn_drop: float = 0.0, proj_drop: float = 0.0, impl: str = "fast"):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.init_sla(dim, num_heads, grid_size, kernel_size, impl)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` of the ``hw`` grid; ``attn_mask`` must be None (a linear attention cannot mask)."""
        if attn_mask is not None:
            raise ValueError("SLA cannot apply an attention mask (Swin never shifts SLA windows)")
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj_drop(self.proj(self.sla(q, k, v, hw, hw)))
