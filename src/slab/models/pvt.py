"""PVT v1 (Pyramid Vision Transformer) with PRepBN norms and optional SLA attention (SLAB-PVT).

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive
Re-parameterized Batch Normalization" (Guo et al., ICML 2024), on PVT ("Pyramid Vision Transformer:
A Versatile Backbone for Dense Prediction without Convolutions", Wang et al., ICCV 2021).

Four stages; each is a non-overlapping patch embedding (conv with kernel = stride, then a norm), an
absolute positional embedding ``pos_embedI`` and a list of pre-norm blocks ``blockI``. Attention uses
spatial reduction: queries from every token, keys/values from the tokens after an optional strided
conv ``sr`` (kernel = stride = ``sr_ratio``) and its own ``norm``. The classifier averages the last
stage's tokens (no class token, no final norm, as in the authors' models).

Forms, all from one class through ``norm=`` and ``attn=`` / the authors' ``attn_type=`` (a word, or one letter
per stage):
* ``pvt_*_prepbn``: softmax attention everywhere (``'SSSS'``), PRepBN norms;
* ``slab_pvt_*``: SLA everywhere (``'LLLL'``) with ``la_sr_ratios='1111'`` (no spatial reduction in SLA);
* any of them with ``norm='ln'`` is the LayerNorm baseline, ``norm='none'`` the norm-free bound.

SLA stage (method section 4, spatial-reduction form): ``q`` from the tokens, ``k, v`` from ``kv`` of
the (optionally reduced) tokens, ``k += positional_encoding`` (``[1, N_kv, C]``), ReLU-kernel linear
attention per head, plus a depthwise conv ``dwc`` of each head's values over the token grid (values
linearly interpolated back to N tokens when K/V were reduced), then ``proj``.

Any input whose sides are multiples of :attr:`PyramidVisionTransformer.input_multiple` (32 for the
standard configurations) works; positional embeddings are resized bilinearly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ..layers.attention import (SLACore, attn_letters, get_attn_layer, head_dim_of, merge_heads, parse_attn,
                                register_attn_layer, resize_positional_encoding, split_heads)
from ..layers.norm import get_norm_layer
from ..reparam.fold import fold_into_consumers, fold_into_producer
from ._authors import authors_cfg, authors_ln_eps, authors_norm_kind, remap_norm_keys
from ._builder import build_slab_model, check_image_input, drop_path_rates, init_linear_layers, new_classifier
from ._stages import StagedModel

__all__ = ["PyramidVisionTransformer", "SpatialReductionAttention", "SpatialReductionLinearAttention",
           "checkpoint_filter_fn", "parse_ratios"]


def parse_ratios(ratios, num_stages: int, name: str) -> list[int]:
    """Per-stage ratios from a list, or from the authors' digit string / int (``'1111'``, ``1111``)."""
    if isinstance(ratios, int) and not isinstance(ratios, bool):
        ratios = str(ratios)
    if isinstance(ratios, str):
        if len(ratios) != num_stages or not ratios.isdigit():
            raise ValueError(f"{name} as a string needs one digit per stage ({num_stages}), got {ratios!r}")
        ratios = [int(c) for c in ratios]
    ratios = [int(r) for r in ratios]
    if len(ratios) != num_stages or any(r < 1 for r in ratios):
        raise ValueError(f"{name} needs {num_stages} ratios >= 1, got {ratios}")
    return ratios


class _SpatialReduction(nn.Module):
    """Shared part of PVT attention: ``q``, ``kv``, ``proj`` and the optional reduction ``sr`` + ``norm``.

    ``kv`` is one Linear whose output is ``[k, v]`` along the channels; heads are contiguous channel
    groups of ``head_dim`` (head-major), as in the authors' checkpoints.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, sr_ratio: int, norm_layer, proj_drop: float):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim_of(dim, num_heads)
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = norm_layer(dim)

    def reduce(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens that keys and values are computed from, and their grid: ``[B, N, C] -> [B, N_kv, C]``."""
        if not hasattr(self, "sr"):  # sr_ratio 1 (TorchScript compiles the rest only where sr exists)
            return x, hw
        b, n, c = x.shape
        grid = self.sr(x.transpose(1, 2).reshape(b, c, hw[0], hw[1]))
        kv_hw = (grid.shape[2], grid.shape[3])
        return self.norm(grid.flatten(2).transpose(1, 2)), kv_hw

    def input_consumers(self) -> list[nn.Module]:
        """The layers that read the attention's input (where the block's norm1 folds)."""
        return [self.q, self.sr if self.sr_ratio > 1 else self.kv]

    def fuse(self) -> "_SpatialReduction":
        # The reduction's norm feeds only kv.
        if self.sr_ratio > 1:
            self.norm = fold_into_consumers(self.norm, [self.kv])
        return self


@register_attn_layer("spatial_reduction", "softmax")
class SpatialReductionAttention(_SpatialReduction):
    """PVT softmax attention: ``softmax(q k^T / sqrt(d)) v`` with K/V from the (reduced) tokens.

    Args:
        dim: channels C. num_heads: heads. qkv_bias: bias of ``q`` and ``kv``.
        sr_ratio: kernel and stride of the reduction conv ``sr`` (1: none).
        norm_layer: factory of the norm after ``sr``.
        grid_size, kernel_size: SLA's (unused here: one constructor for both kinds of a form).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, sr_ratio: int = 1, norm_layer=nn.LayerNorm,
                 grid_size: tuple[int, int] = (56, 56), kernel_size: int = 5, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias, sr_ratio, norm_layer, proj_drop)
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        q = split_heads(self.q(x), self.num_heads)
        src, _ = self.reduce(x, hw)
        k, v = self.kv(src).chunk(2, dim=-1)
        k, v = split_heads(k, self.num_heads), split_heads(v, self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))


@register_attn_layer("spatial_reduction", "sla")
class SpatialReductionLinearAttention(SLACore, _SpatialReduction):
    """SLA in PVT form: K/V from the (reduced) tokens, ``positional_encoding`` added to K, DWC on V.

    Args:
        dim, num_heads, qkv_bias, norm_layer: as :class:`SpatialReductionAttention`.
        sr_ratio: the SLA reduction (the authors' ``la_sr_ratios``; 1 in the released models).
        grid_size: the token grid ``(H, W)`` at the training resolution; ``positional_encoding`` is laid on
            the reduced grid ``(H // sr_ratio, W // sr_ratio)`` (its ``grid_size``) and resized for other grids.
        kernel_size: DWC kernel (5 in the authors' models). attn_drop: unused (no attention matrix).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, sr_ratio: int = 1, norm_layer=nn.LayerNorm,
                 grid_size: tuple[int, int] = (56, 56), kernel_size: int = 5, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias, sr_ratio, norm_layer, proj_drop)
        self.init_sla(dim, num_heads, (grid_size[0] // sr_ratio, grid_size[1] // sr_ratio), kernel_size)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        src, kv_hw = self.reduce(x, hw)
        k, v = self.kv(src).chunk(2, dim=-1)
        return self.proj_drop(self.proj(self.sla(self.q(x), k, v, kv_hw, hw)))


def tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``[B, N, C]`` tokens of an ``hw`` grid -> ``[B, C, H, W]``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))``; takes the grid like every PVT MLP (unused here)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x), hw)``, ``x + mlp(norm2(x), hw)``.

    Args:
        attn: ``'softmax'`` or ``'sla'``. sr_ratio: K/V reduction of the attention.
        grid_size: token grid at the training resolution (SLA's positional encoding is made for it).
        mlp_layer: ``Mlp`` (PVT v1) or a DWConv MLP (PVT v2), called as ``mlp(x, hw)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_layer, attn: str,
                 sr_ratio: int, grid_size: tuple[int, int], sla_kernel_size: int = 5, mlp_layer=Mlp,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = get_attn_layer(attn, "spatial_reduction")(
            dim, num_heads, qkv_bias=qkv_bias, sr_ratio=sr_ratio, norm_layer=norm_layer, grid_size=grid_size,
            kernel_size=sla_kernel_size, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), hw))
        x = x + self.drop_path2(self.mlp(self.norm2(x), hw))
        return x

    def fuse(self) -> "Block":
        # norm1 feeds q and either kv or the reduction conv (kernel = stride, no padding: exact);
        # norm2 feeds only fc1.
        self.norm1 = fold_into_consumers(self.norm1, self.attn.input_consumers())
        self.norm2 = fold_into_consumers(self.norm2, [self.mlp.fc1])
        return self


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: ``norm(flatten(conv_{k=s=patch}(x)))``, ``[B, C, H, W] -> [B, N, D]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_layer):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw

    def fuse(self) -> "PatchEmbed":
        # The norm reads the conv output channel by channel: fold it into the conv's output side.
        self.norm = fold_into_producer(self.norm, self.proj)
        return self


def stage_input_multiple(strides: list[int], reductions: list[int]) -> int:
    """Smallest side length every stage divides exactly: stage strides times their K/V reductions."""
    multiple = 1
    for stride, red in zip(strides, reductions):
        multiple = math.lcm(multiple, stride * red)
    return multiple


class _PyramidBase(StagedModel, nn.Module):
    """What PVT v1 and v2 share: the per-stage arguments, the stages' blocks, the head and timm's stage interface.

    Stage ``I`` (1-based: the authors' checkpoint keys) is ``patch_embedI`` (:meth:`make_patch_embed`), a position
    embedding ``pos_embedI`` (v1: ``uses_pos_embed``), the blocks ``blockI`` (MLP ``mlp_layer``) and a norm
    ``normI`` (v2: ``uses_stage_norms``). The arguments are those of :class:`PyramidVisionTransformer`;
    ``first_stride`` is the first stage's stride (later stages halve the map).
    """

    mlp_layer = Mlp
    uses_pos_embed = False
    uses_stage_norms = False

    def __init__(self, first_stride: int, img_size, in_chans: int, num_classes: int, embed_dims, num_heads,
                 mlp_ratios, qkv_bias: bool, depths, sr_ratios, attn_type: str, la_sr_ratios, norm: str, ln_eps: float,
                 sla_kernel_size: int, global_pool: str, drop_rate: float, attn_drop_rate: float,
                 drop_path_rate: float, attn: str | None):
        super().__init__()
        num_stages = len(depths)
        for name, value in (("embed_dims", embed_dims), ("num_heads", num_heads), ("mlp_ratios", mlp_ratios)):
            if len(value) != num_stages:
                raise ValueError(f"{name} needs one entry per stage ({num_stages}), got {list(value)}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        attns = parse_attn(attn if attn is not None else attn_type, num_stages)
        sr_ratios = parse_ratios(sr_ratios, num_stages, "sr_ratios")
        la_sr_ratios = parse_ratios(la_sr_ratios, num_stages, "la_sr_ratios")
        reductions = [la if a == "sla" else sr for a, sr, la in zip(attns, sr_ratios, la_sr_ratios)]
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        strides = [first_stride * 2 ** i for i in range(num_stages)]
        self.input_multiple = stage_input_multiple(strides, reductions)
        if img_size[0] % self.input_multiple or img_size[1] % self.input_multiple:
            raise ValueError(f"img_size {img_size} must be a multiple of {self.input_multiple} "
                             f"(stage strides {strides} times K/V reductions {reductions})")
        self.num_classes, self.global_pool, self.in_chans, self.img_size = num_classes, global_pool, in_chans, img_size
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.num_stages = num_stages
        self.norm_kind, self.attn_type = norm, attn_letters(attns)
        self.grid_sizes = [(img_size[0] // s, img_size[1] // s) for s in strides]
        norm_layer = get_norm_layer(norm, ln_eps=ln_eps)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        for i in range(num_stages):
            block_args = dict(mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, norm_layer=norm_layer, attn=attns[i],
                              sr_ratio=reductions[i], sla_kernel_size=sla_kernel_size, drop=drop_rate,
                              attn_drop=attn_drop_rate)
            self._add_stage(i, strides[0] if i == 0 else 2, in_chans if i == 0 else embed_dims[i - 1], embed_dims[i],
                            num_heads[i], dpr[sum(depths[:i]):sum(depths[:i + 1])], block_args)
        if self.uses_pos_embed:
            self.pos_drop = nn.Dropout(drop_rate)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        tapped = "norm" if self.uses_stage_norms else "block"
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=strides[i], module=f"{tapped}{i + 1}")
                             for i in range(num_stages)]
        self.grad_checkpointing = False
        self._init_weights()

    def make_patch_embed(self, i: int, stride: int, in_dim: int, dim: int, norm_layer) -> nn.Module:
        """Stage ``i``'s patch embedding (``stride``: its own, relative to the previous stage)."""
        raise NotImplementedError

    def _add_stage(self, i: int, stride: int, in_dim: int, dim: int, num_heads: int, drop_path: list[float],
                   block_args: dict) -> None:
        grid, norm_layer = self.grid_sizes[i], block_args["norm_layer"]
        setattr(self, f"patch_embed{i + 1}", self.make_patch_embed(i, stride, in_dim, dim, norm_layer))
        if self.uses_pos_embed:
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim)))
        setattr(self, f"block{i + 1}", nn.ModuleList([
            Block(dim, num_heads, grid_size=grid, mlp_layer=self.mlp_layer, drop_path=rate, **block_args)
            for rate in drop_path]))
        if self.uses_stage_norms:
            setattr(self, f"norm{i + 1}", norm_layer(dim))

    def _init_weights(self) -> None:
        for i in range(self.num_stages if self.uses_pos_embed else 0):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        init_linear_layers(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()
                if n.startswith("pos_embed") or n.endswith("positional_encoding") or n.endswith(".alpha")}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = new_classifier(self, self.num_features, num_classes)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, multiple_of=self.input_multiple, model=type(self).__name__)
        return x  # the stem is stage 1's patch embedding

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` (0-based): ``[B, C_in, H, W] -> [B, C_i, H / s_i, W / s_i]``."""
        x, hw = getattr(self, f"patch_embed{i + 1}")(x)
        if self.uses_pos_embed:
            x = self._embedded(x, getattr(self, f"pos_embed{i + 1}"), i, hw)
        x = self.run_blocks(getattr(self, f"block{i + 1}"), x, hw)
        if self.uses_stage_norms:
            x = getattr(self, f"norm{i + 1}")(x)
        return tokens_to_map(x, hw)

    def _remove_stages(self, keep: int) -> None:
        extras = ("pos_embed",) * self.uses_pos_embed + ("norm",) * self.uses_stage_norms
        for i in range(keep, self.num_stages):
            for prefix in ("patch_embed", "block") + extras:
                delattr(self, f"{prefix}{i + 1}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W] -> [B, C_last, H / 32, W / 32]``."""
        if torch.jit.is_scripting():
            return self._scripted_stages(x)
        return self.forward_stages(x)

    def _embedded(self, x: torch.Tensor, pos_embed: torch.Tensor, i: int, hw: tuple[int, int]) -> torch.Tensor:
        """Stage ``i``'s patch tokens plus its position embedding (resized to ``hw``)."""
        return self.pos_drop(x + resize_positional_encoding(pos_embed, self.grid_sizes[i], hw))

    def _scripted_stages(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_features` under TorchScript, which reads attributes by literal names only.

        The stages keep the authors' attribute names (the checkpoint keys), so the four of the standard
        configurations are written out; ``hasattr`` (evaluated when compiling) skips the stages
        :meth:`prune_intermediate_layers` removed and the parts one version does not have.
        """
        if hasattr(self, "block5"):
            raise RuntimeError("TorchScript supports PVT models with at most 4 stages")
        if hasattr(self, "block1"):
            x, hw = self.patch_embed1(x)
            if hasattr(self, "pos_embed1"):
                x = self._embedded(x, self.pos_embed1, 0, hw)
            for blk in self.block1:
                x = blk(x, hw)
            if hasattr(self, "norm1"):
                x = self.norm1(x)
            x = tokens_to_map(x, hw)
        if hasattr(self, "block2"):
            x, hw = self.patch_embed2(x)
            if hasattr(self, "pos_embed2"):
                x = self._embedded(x, self.pos_embed2, 1, hw)
            for blk in self.block2:
                x = blk(x, hw)
            if hasattr(self, "norm2"):
                x = self.norm2(x)
            x = tokens_to_map(x, hw)
        if hasattr(self, "block3"):
            x, hw = self.patch_embed3(x)
            if hasattr(self, "pos_embed3"):
                x = self._embedded(x, self.pos_embed3, 2, hw)
            for blk in self.block3:
                x = blk(x, hw)
            if hasattr(self, "norm3"):
                x = self.norm3(x)
            x = tokens_to_map(x, hw)
        if hasattr(self, "block4"):
            x, hw = self.patch_embed4(x)
            if hasattr(self, "pos_embed4"):
                x = self._embedded(x, self.pos_embed4, 3, hw)
            for blk in self.block4:
                x = blk(x, hw)
            if hasattr(self, "norm4"):
                x = self.norm4(x)
            x = tokens_to_map(x, hw)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PyramidVisionTransformer(_PyramidBase):
    """PVT v1 with a choice of norm (``ln``/``bn``/``repbn``/``prepbn``/``none``) and attention per stage.

    Args:
        img_size: training resolution (positional embeddings are made for it, resized for others).
        patch_size: first stage's patch (4); later stages merge 2x2.
        in_chans, num_classes, embed_dims, num_heads, mlp_ratios, qkv_bias, depths: as in PVT.
        sr_ratios: K/V reduction of the softmax stages. la_sr_ratios: K/V reduction of the SLA stages
            (list or the authors' digit string, ``'1111'``).
        attn_type: one letter per stage, ``L`` = SLA, ``S`` = softmax (the authors' argument).
        attn: ``'sla'`` / ``'softmax'`` for every stage, or letters as ``attn_type`` (overrides it when given).
        norm: norm of patch embeddings, blocks and reductions. ln_eps: LayerNorm eps (1e-6).
        sla_kernel_size: DWC kernel of SLA.
    """

    uses_pos_embed = True

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dims: tuple[int, ...] = (64, 128, 320, 512),
                 num_heads: tuple[int, ...] = (1, 2, 5, 8), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 qkv_bias: bool = True, depths: tuple[int, ...] = (2, 2, 2, 2), sr_ratios=(8, 4, 2, 1),
                 attn_type: str = "SSSS", la_sr_ratios="1111", norm: str = "prepbn", ln_eps: float = 1e-6,
                 sla_kernel_size: int = 5, global_pool: str = "avg", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, attn: str | None = None):
        super().__init__(patch_size, img_size, in_chans, num_classes, embed_dims, num_heads, mlp_ratios, qkv_bias,
                         depths, sr_ratios, attn_type, la_sr_ratios, norm, ln_eps, sla_kernel_size, global_pool,
                         drop_rate, attn_drop_rate, drop_path_rate, attn)

    def make_patch_embed(self, i: int, stride: int, in_dim: int, dim: int, norm_layer) -> nn.Module:
        return PatchEmbed(stride, in_dim, dim, norm_layer)


def resize_checkpoint_encodings(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resize square positional embeddings/encodings of a checkpoint made at another resolution."""
    own = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        if not (key.startswith("pos_embed") or key.endswith("positional_encoding")) or key not in own:
            continue
        target = own[key]
        if value.dim() != 3 or value.shape == target.shape or value.shape[-1] != target.shape[-1]:
            continue
        side = int(round(value.shape[1] ** 0.5))
        module = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
        if key.startswith("pos_embed"):
            dst = model.grid_sizes[int(key[len("pos_embed"):]) - 1]
        else:
            dst = module.grid_size
        if side * side == value.shape[1] and dst[0] * dst[1] == target.shape[1]:
            out[key] = resize_positional_encoding(value, (side, side), dst)
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert an authors' PVT / SLAB-PVT state_dict (``slab_pvt.PyramidVisionTransformer``) to this model's keys."""
    return resize_checkpoint_encodings(remap_norm_keys(state_dict, model), model)


def _cfg(file: str | None = None, **kwargs) -> dict:
    return authors_cfg(file, **{"first_conv": "patch_embed1.proj", "crop_pct": 0.9, "pool_size": (7, 7), **kwargs})


default_cfgs = generate_default_cfgs({
    "pvt_tiny_prepbn.authors_in1k": _cfg("pvt_tiny_prepbn.pth"),
    "pvt_small_prepbn.authors_in1k": _cfg("pvt_small_prepbn.pth"),
    "pvt_medium_prepbn.authors_in1k": _cfg("pvt_medium_prepbn.pth"),
    "pvt_large_prepbn": _cfg(None),
    "slab_pvt_tiny.authors_in1k": _cfg("slab_pvt_tiny.pth"),
    "slab_pvt_small": _cfg(None),
    "slab_pvt_medium": _cfg(None),
    "slab_pvt_large": _cfg(None),
})

# ImageNet top-1 reported in the paper for each registered model with a result.
PAPER_TOP1 = {"pvt_tiny_prepbn": 76.0, "pvt_small_prepbn": 80.1, "pvt_medium_prepbn": 81.7, "slab_pvt_tiny": 76.5}

# Released file -> registered model that loads it.
AUTHORS_CHECKPOINTS = {
    "pvt_tiny_prepbn.pth": "pvt_tiny_prepbn",
    "pvt_small_prepbn.pth": "pvt_small_prepbn",
    "pvt_medium_prepbn.pth": "pvt_medium_prepbn",
    "slab_pvt_tiny.pth": "slab_pvt_tiny",
}


def _create(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    kwargs.setdefault("feature_cfg", dict(feature_cls="getter", out_indices=(0, 1, 2, 3)))
    return build_slab_model(PyramidVisionTransformer, variant, pretrained, checkpoint_filter_fn, **kwargs)


_BASE = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
             qkv_bias=True, sr_ratios=(8, 4, 2, 1))
_DEPTHS = {"tiny": (2, 2, 2, 2), "small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3)}
_PREPBN = dict(norm="prepbn", attn_type="SSSS")
_SLAB = dict(norm="prepbn", attn_type="LLLL", la_sr_ratios="1111")


def _args(size: str, form: dict, kwargs: dict) -> dict:
    return {**_BASE, "depths": _DEPTHS[size], **form, **kwargs}


@register_model
def pvt_tiny_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-T with PRepBN, softmax attention (76.0 top-1 in the paper)."""
    return _create("pvt_tiny_prepbn", pretrained, **_args("tiny", _PREPBN, kwargs))


@register_model
def pvt_small_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-S with PRepBN, softmax attention (80.1 top-1)."""
    return _create("pvt_small_prepbn", pretrained, **_args("small", _PREPBN, kwargs))


@register_model
def pvt_medium_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-M with PRepBN, softmax attention (81.7 top-1)."""
    return _create("pvt_medium_prepbn", pretrained, **_args("medium", _PREPBN, kwargs))


@register_model
def pvt_large_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-L with PRepBN, softmax attention (no released checkpoint)."""
    return _create("pvt_large_prepbn", pretrained, **_args("large", _PREPBN, kwargs))


@register_model
def slab_pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """SLAB-PVT-T: SLA in every stage (no K/V reduction) + PRepBN (76.5 top-1)."""
    return _create("slab_pvt_tiny", pretrained, **_args("tiny", _SLAB, kwargs))


@register_model
def slab_pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """SLAB-PVT-S: SLA + PRepBN (no released checkpoint)."""
    return _create("slab_pvt_small", pretrained, **_args("small", _SLAB, kwargs))


@register_model
def slab_pvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """SLAB-PVT-M: SLA + PRepBN (no released checkpoint)."""
    return _create("slab_pvt_medium", pretrained, **_args("medium", _SLAB, kwargs))


@register_model
def slab_pvt_large(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """SLAB-PVT-L: SLA + PRepBN (no released checkpoint)."""
    return _create("slab_pvt_large", pretrained, **_args("large", _SLAB, kwargs))


def authors_args(record: dict) -> dict:
    """Our constructor arguments for an authors' PVT / PVT v2 record (their argument names)."""
    c = record["constructor"]
    args = dict(img_size=record.get("input_shape", [1, 3, 224, 224])[-1], patch_size=c.get("patch_size", 4),
                in_chans=c.get("in_chans", 3), num_classes=c.get("num_classes", 1000), embed_dims=c["embed_dims"],
                num_heads=c["num_heads"], mlp_ratios=c["mlp_ratios"], qkv_bias=c.get("qkv_bias", True),
                depths=c["depths"], sr_ratios=c["sr_ratios"], attn_type=c.get("attn_type", "S" * len(c["depths"])),
                la_sr_ratios=c.get("la_sr_ratios", "1" * len(c["depths"])), norm=authors_norm_kind(c),
                ln_eps=authors_ln_eps(c, 1e-6))
    if "kernel_size" in c:
        args["sla_kernel_size"] = c["kernel_size"]
    return args


def from_authors_record(record: dict) -> PyramidVisionTransformer:
    """Our model equivalent to the authors' ``slab_pvt.PyramidVisionTransformer`` record."""
    return PyramidVisionTransformer(**authors_args(record))


AUTHORS_CLASSES = {"slab_pvt.PyramidVisionTransformer": from_authors_record}
