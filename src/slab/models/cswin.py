"""CSwin Transformer with PRepBN norms and optional SLA attention (SLAB-CSwin).

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive
Re-parameterized Batch Normalization" (Guo et al., ICML 2024), on CSwin ("CSWin Transformer: A General
Vision Transformer Backbone with Cross-Shaped Windows", Dong et al., CVPR 2022).

One class, forms chosen by ``norm=`` and ``attn=`` / ``attn_type=`` (a word, or one letter per stage):
* ``S``: softmax attention inside stripes, with LePE (a depthwise 3x3 conv on V, added to the output).
  A stage splits its channels into two branches, ``attns.0`` on vertical stripes (full height,
  ``split_size`` wide) and ``attns.1`` on horizontal ones; a stage whose stripe covers the whole map
  (and always the last stage) has one branch over the whole map.
* ``L``: SLA inside the same stripes, plus the stripe's LePE and the SLA DWC (5x5, ``head_dim``
  channels) on V; the learned positional encoding is added to K. SLAB-CSwin uses ``'LLSS'`` with SLA
  stripe sizes ``56-28-14-7``: its SLA stages attend over the whole feature map at 224.

Any input size: the feature map of a striped stage is padded (after ``norm1``) to stripe multiples
and cropped back; whole-map stages need no padding; positional encodings are resized. Tokens are kept
channels-last (``[B, H, W, C]``) through the network.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model, register_notrace_function

from ..layers.attention import (SLACore, attn_letters, get_attn_layer, head_dim_of, merge_heads, parse_attn,
                                register_attn_layer, resize_positional_encoding, split_heads)
from ..layers.norm import get_norm_layer
from ..reparam.fold import as_channel_affine, fold_into_consumers, fold_into_producer, zero_preimage
from ._authors import authors_cfg, authors_ln_eps, authors_norm_kind, remap_norm_keys
from ._builder import build_slab_model, check_image_input, drop_path_rates, init_linear_layers, new_classifier
from ._stages import StagedModel

__all__ = ["CSwinTransformer", "checkpoint_filter_fn"]

ORIENTATIONS = ("full", "vertical", "horizontal")


def _to_stripes(x: torch.Tensor, hs: int, ws: int) -> torch.Tensor:
    """``[B, H, W, C] -> [B * (H/hs) * (W/ws), hs * ws, C]`` (stripes in row-major order)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // hs, hs, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hs * ws, c)


def _from_stripes(x: torch.Tensor, hs: int, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_to_stripes`: ``[B', hs * ws, C] -> [B, H, W, C]``."""
    c = x.shape[-1]
    x = x.reshape(-1, h // hs, w // ws, hs, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _stripe_grid(x: torch.Tensor, hs: int, ws: int) -> torch.Tensor:
    """Each stripe's tokens as its own map, for a conv zero padded at the stripe's border:
    ``[B', N, C] -> [B', C, hs, ws]`` (the conv's output goes back with ``flatten(2).transpose(1, 2)``)."""
    bp, n, c = x.shape
    return x.transpose(1, 2).reshape(bp, c, hs, ws)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def stage_grids(img_size: tuple[int, int], num_stages: int = 4) -> list[tuple[int, int]]:
    """Feature-map size of each stage for an input of ``img_size``: 7x7/4 conv embed, then 3x3/2 merges."""
    h, w = _conv_out(img_size[0], 7, 4, 2), _conv_out(img_size[1], 7, 4, 2)
    grids = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        grids.append((h, w))
    return grids


class _StripeBranch(nn.Module):
    """Attention of one branch over stripes: ``'full'`` (the whole map), ``'vertical'`` (full height,
    ``split_size`` wide) or ``'horizontal'`` (``split_size`` high, full width)."""

    def __init__(self, dim: int, num_heads: int, orientation: str, split_size: int):
        super().__init__()
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        self.num_heads = num_heads
        self.head_dim = head_dim_of(dim, num_heads)
        self.orientation = orientation
        self.split_size = split_size
        # LePE: depthwise 3x3 conv on V within each stripe, added to the attention output.
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def stripe_shape(self, h: int, w: int) -> tuple[int, int]:
        if self.orientation == "full":
            return h, w
        if self.orientation == "vertical":
            return h, self.split_size
        return self.split_size, w

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, orientation={self.orientation!r}, split_size={self.split_size}"


@register_attn_layer("stripe", "softmax")
class StripeSoftmaxAttention(_StripeBranch):
    """Softmax attention within stripes plus LePE (CSwin's ``LePEAttention``).

    ``forward(q, k, v)``: each ``[B, H, W, C]`` (H, W multiples of the stripe shape) -> ``[B, H, W, C]``.
    ``grid_size`` and ``kernel_size`` are SLA's (unused here: one constructor for both kinds of a form).
    """

    def __init__(self, dim: int, num_heads: int, orientation: str, split_size: int,
                 grid_size: tuple[int, int] = (7, 7), kernel_size: int = 5, attn_drop: float = 0.0):
        super().__init__(dim, num_heads, orientation, split_size)
        self.attn_drop = attn_drop

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h, w = q.shape[1:3]
        hs, ws = self.stripe_shape(h, w)
        q, k, v = _to_stripes(q, hs, ws), _to_stripes(k, hs, ws), _to_stripes(v, hs, ws)
        lepe = self.get_v(_stripe_grid(v, hs, ws)).flatten(2).transpose(1, 2)
        q, k, v = split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return _from_stripes(merge_heads(out) + lepe, hs, ws, h, w)


@register_attn_layer("stripe", "sla")
class StripeLinearAttention(SLACore, _StripeBranch):
    """SLA within stripes (:class:`slab.layers.attention.SLACore` over each stripe's grid), plus the LePE
    conv on V.

    Args:
        dim, num_heads: channels and heads of this branch.
        orientation, split_size: stripe geometry (see :class:`_StripeBranch`).
        grid_size: the stripe grid the positional encoding is made for (resized for other stripe shapes).
        kernel_size: DWC kernel (5 in the paper). attn_drop: unused (no attention matrix).
    """

    def __init__(self, dim: int, num_heads: int, orientation: str, split_size: int,
                 grid_size: tuple[int, int] = (7, 7), kernel_size: int = 5, attn_drop: float = 0.0):
        super().__init__(dim, num_heads, orientation, split_size)
        self.init_sla(dim, num_heads, grid_size, kernel_size)
        # The authors' checkpoints hold a per-channel ``scale`` (a leftover of focused linear attention)
        # that their SLA forward never reads: a buffer, so their files load strictly, and no parameter
        # goes without a gradient (DDP, timm's contract).
        self.register_buffer("scale", torch.zeros(1, 1, dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h, w = q.shape[1:3]
        hs, ws = self.stripe_shape(h, w)
        q, k, v = _to_stripes(q, hs, ws), _to_stripes(k, hs, ws), _to_stripes(v, hs, ws)
        lepe = self.get_v(_stripe_grid(v, hs, ws)).flatten(2).transpose(1, 2)
        return _from_stripes(self.sla(q, k, v, (hs, ws), (hs, ws)) + lepe, hs, ws, h, w)


@register_notrace_function  # pads by the run-time feature-map size
def pad_to_stripes(x: torch.Tensor, split_size: int, pad_value: torch.Tensor | None) -> torch.Tensor:
    """Pad ``[B, H, W, C]`` at the bottom/right to multiples of ``split_size`` with 0 or ``pad_value`` (``[C]``)."""
    b, h, w, c = x.shape
    ph, pw = (-h) % split_size, (-w) % split_size
    if not (ph or pw):
        return x
    if pad_value is None:
        return F.pad(x, (0, 0, 0, pw, 0, ph))
    out = pad_value.to(x.dtype).expand(b, h + ph, w + pw, c).clone()
    out[:, :h, :w] = x
    return out


class CSwinBlock(nn.Module):
    """``x + proj(cross-shaped attention(qkv(norm1(x))))``, ``x + mlp(norm2(x))`` on ``[B, H, W, C]``.

    Args:
        dim, num_heads: channels and heads (two-branch blocks give half of each to every branch).
        grid: the stage's feature-map size at the model's ``img_size`` (sets branch count and encodings).
        split_size: stripe width. attn: ``'softmax'`` or ``'sla'``.
        whole_map: one branch over the whole map (the last stage, or a stripe that covers the map).
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], split_size: int, attn: str,
                 norm_layer, mlp_ratio: float = 4.0, qkv_bias: bool = True, whole_map: bool = False,
                 sla_kernel_size: int = 5, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        attn_layer = get_attn_layer(attn, "stripe")
        self.dim = dim
        self.split_size = None if whole_map else split_size
        self.norm1 = norm_layer(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if whole_map:
            specs = [(dim, num_heads, "full", grid)]
        else:
            if num_heads % 2 or dim % 2:
                raise ValueError(f"a striped stage splits channels and heads in two; dim {dim} and num_heads "
                                 f"{num_heads} must be even (or make the stripe cover the map)")
            hp, wp = (math.ceil(s / split_size) * split_size for s in grid)
            specs = [(dim // 2, num_heads // 2, "vertical", (hp, split_size)),
                     (dim // 2, num_heads // 2, "horizontal", (split_size, wp))]
        self.attns = nn.ModuleList([attn_layer(d, h, o, split_size, grid_size=pe_grid, kernel_size=sla_kernel_size,
                                               attn_drop=attn_drop) for d, h, o, pe_grid in specs])
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        # Value that padded positions take ahead of qkv: 0 after norm1; once norm1 is folded into qkv,
        # the input that norm1 maps to 0 (set by fuse()), so the fused block computes the same function.
        self.register_buffer("pad_value", None)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-shaped attention of ``[B, H, W, C]`` tokens (already normalised), before ``proj``."""
        h, w = x.shape[1:3]
        if self.split_size is not None:
            x = pad_to_stripes(x, self.split_size, self.pad_value)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # Each branch reads its own contiguous share of the channels (all of them for a single branch).
        width = self.dim // len(self.attns)
        outs: list[torch.Tensor] = []
        for i, attn in enumerate(self.attns):
            lo, hi = i * width, (i + 1) * width
            outs.append(attn(q[..., lo:hi], k[..., lo:hi], v[..., lo:hi]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.proj_drop(self.proj(self.attention(self.norm1(x)))))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def fuse(self) -> "CSwinBlock":
        # norm1 feeds only qkv (through the stripe padding), norm2 only fc1.
        if self.split_size is not None:
            pad = zero_preimage(self.norm1)
            if pad is not None:
                self.pad_value = pad.to(device=self.qkv.weight.device, dtype=self.qkv.weight.dtype)
        self.norm1 = fold_into_consumers(self.norm1, [self.qkv])
        self.norm2 = fold_into_consumers(self.norm2, [self.mlp.fc1])
        return self


class MergeBlock(nn.Module):
    """Downsampling between stages: 3x3 stride-2 conv, then the norm (``[B, H, W, C] -> [B, H/2, W/2, 2C]``)."""

    def __init__(self, dim: int, dim_out: int, norm_layer):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, stride=2, padding=1)
        self.norm = norm_layer(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm(x)

    def fuse(self) -> "MergeBlock":
        self.norm = fold_into_producer(self.norm, self.conv)
        return self


class _ChannelsLast(nn.Module):
    """``[B, C, H, W] -> [B, H, W, C]`` (the conv embed's middle step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def parse_split_sizes(value, name: str) -> tuple[int, ...]:
    """``'56-28-14-7'`` (the authors' string form) or a sequence of ints -> tuple of 4 ints."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split("-")]
        except ValueError:
            raise ValueError(f"{name} must look like '56-28-14-7', got {value!r}") from None
    value = tuple(int(v) for v in value)
    if len(value) != 4 or min(value) < 1:
        raise ValueError(f"{name} needs 4 positive stripe sizes, got {value}")
    return value


class CSwinTransformer(StagedModel, nn.Module):
    """CSwin with a choice of norm (``ln``/``bn``/``repbn``/``prepbn``/``none``) and per-stage attention.

    Args:
        img_size: the training resolution (positional encodings and branch counts are made for it).
        in_chans, num_classes, mlp_ratio, qkv_bias: as in timm.
        embed_dim: channels of stage 1 (doubled at each merge). depth, num_heads: per stage.
        split_size: stripe width of softmax (``S``) stages. la_split_size: stripe width of SLA (``L``)
            stages, a tuple or the authors' ``'56-28-14-7'`` string.
        attn_type: one letter per stage, ``L`` = SLA, ``S`` = softmax (``attn='sla'``/``'softmax'`` sets all).
        norm: norm of every block, merge, the conv embed and the final norm.
        ln_eps: LayerNorm eps (1e-5 in CSwin). sla_kernel_size: SLA DWC kernel.

    Stage ``i`` of timm's stage interface (:class:`slab.models._stages.StagedModel`) is ``merge{i}`` (from the
    second stage on) then the blocks ``stage{i + 1}``.
    """

    stage_output_fmt = "NHWC"
    has_final_norm = True

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 64, depth: tuple[int, ...] = (1, 2, 21, 1), num_heads: tuple[int, ...] = (2, 4, 8, 16),
                 split_size=(1, 2, 7, 7), la_split_size="56-28-14-7", attn_type: str = "SSSS",
                 attn: str | None = None, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm: str = "prepbn",
                 ln_eps: float = 1e-5, sla_kernel_size: int = 5, global_pool: str = "avg", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        stage_attn = parse_attn(attn if attn is not None else attn_type, 4)
        depth, num_heads = tuple(depth), tuple(num_heads)
        if len(depth) != 4 or len(num_heads) != 4:
            raise ValueError(f"depth and num_heads need 4 entries, got {depth} and {num_heads}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
        split_size = parse_split_sizes(split_size, "split_size")
        la_split_size = parse_split_sizes(la_split_size, "la_split_size")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.norm_kind, self.attn_type = norm, attn_letters(stage_attn)
        self.grad_checkpointing = False
        dims = [embed_dim * 2 ** i for i in range(4)]
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = dims[-1]
        norm_layer = get_norm_layer(norm, ln_eps=ln_eps)
        grids = stage_grids(img_size)
        if min(min(g) for g in grids) < 1:
            raise ValueError(f"img_size {img_size} is too small for CSwin's four stages")

        self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, stride=4, padding=2),
                                               _ChannelsLast(), norm_layer(embed_dim))
        dpr = drop_path_rates(drop_path_rate, sum(depth))
        self.split_sizes = []
        for i in range(4):
            kind = stage_attn[i]
            split = la_split_size[i] if kind == "sla" else split_size[i]
            whole = i == 3 or split >= max(grids[i])
            self.split_sizes.append(None if whole else split)
            first = sum(depth[:i])
            blocks = nn.ModuleList([
                CSwinBlock(dims[i], num_heads[i], grids[i], split, kind, norm_layer, mlp_ratio, qkv_bias,
                           whole_map=whole, sla_kernel_size=sla_kernel_size, drop=drop_rate,
                           attn_drop=attn_drop_rate, drop_path=dpr[first + j]) for j in range(depth[i])])
            self.add_module(f"stage{i + 1}", blocks)
            if i < 3:
                self.add_module(f"merge{i + 1}", MergeBlock(dims[i], dims[i + 1], norm_layer))
        self.num_stages = 4
        self.norm = norm_layer(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stage{i + 1}") for i in range(4)]
        init_linear_layers(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()
                if n.endswith(("positional_encoding", ".alpha", ".scale"))}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = new_classifier(self, self.num_features, num_classes)

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i > 0:
            x = getattr(self, f"merge{i}")(x)
        return self.run_blocks(getattr(self, f"stage{i + 1}"), x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, model=type(self).__name__, min_size=3)
        return self.stage1_conv_embed(x)

    def _remove_stages(self, keep: int) -> None:
        # Emptied rather than deleted: the scripted forward names all four stages.
        for i in range(keep, self.num_stages):
            setattr(self, f"stage{i + 1}", nn.ModuleList())
            setattr(self, f"merge{i}", nn.Identity())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` images -> ``[B, h, w, C']`` normalised last-stage tokens."""
        if not torch.jit.is_scripting():
            return self.final_norm(self.forward_stages(x))
        return self.norm(self._scripted_stages(self._embed(x)))

    def _scripted_stages(self, x: torch.Tensor) -> torch.Tensor:
        """The four stages under TorchScript, which reads attributes by literal names only: they keep the
        authors' names (``stageI``, ``mergeI``, the checkpoint keys), so they are written out. Pruned stages
        are empty lists after an Identity merge."""
        for blk in self.stage1:
            x = blk(x)
        x = self.merge1(x)
        for blk in self.stage2:
            x = blk(x)
        x = self.merge2(x)
        for blk in self.stage3:
            x = blk(x)
        x = self.merge3(x)
        for blk in self.stage4:
            x = blk(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "CSwinTransformer":
        # The conv embed's norm folds into its conv (the permute between them is no op on channels). The
        # final norm could fold into the head (pooling is linear), but forward_features and the
        # intermediates would then change meaning with fusion: it stays a per-channel affine. Blocks and
        # merges fold their own.
        self.stage1_conv_embed[2] = fold_into_producer(self.stage1_conv_embed[2], self.stage1_conv_embed[0])
        self.norm = as_channel_affine(self.norm)
        return self


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CSwinTransformer) -> dict[str, torch.Tensor]:
    """Convert an authors' CSwin / SLAB-CSwin state_dict to this model's keys.

    Progressive norms are renamed (``norm1`` -> ``ln``, ``norm2`` -> ``repbn``); SLA positional encodings
    made for another resolution are resized to the model's stripe grids.
    """
    out = remap_norm_keys(state_dict, model)
    for path, module in model.named_modules():
        key = path + ".positional_encoding"
        if not isinstance(module, StripeLinearAttention) or key not in out:
            continue
        src = out[key]
        if src.shape == module.positional_encoding.shape:
            continue
        n = src.shape[1]
        if module.orientation == "full":
            side = int(round(n ** 0.5))
            src_hw = (side, side) if side * side == n else None
        elif n % module.split_size == 0:
            src_hw = (n // module.split_size, module.split_size) if module.orientation == "vertical" else \
                (module.split_size, n // module.split_size)
        else:
            src_hw = None
        if src_hw is not None and src.shape[-1] == module.positional_encoding.shape[-1]:
            out[key] = resize_positional_encoding(src, src_hw, module.grid_size)
    return out


def _cfg(file: str | None = None, **kwargs) -> dict:
    return authors_cfg(file, **{"first_conv": "stage1_conv_embed.0", "crop_pct": 0.9, "pool_size": (7, 7), **kwargs})


default_cfgs = generate_default_cfgs({
    "slab_cswin_tiny_224.authors_in1k": _cfg("slab_cswin_tiny.pth"),
    "slab_cswin_small_224": _cfg(None),
    "slab_cswin_base_224": _cfg(None),
    "cswin_tiny_prepbn_224": _cfg(None),
    "cswin_small_prepbn_224": _cfg(None),
    "cswin_base_prepbn_224": _cfg(None),
})

# ImageNet top-1 reported in the paper for each registered model.
PAPER_TOP1 = {"slab_cswin_tiny_224": 82.8}

# Released file -> registered model that loads it.
AUTHORS_CHECKPOINTS = {"slab_cswin_tiny.pth": "slab_cswin_tiny_224"}


def _create(variant: str, pretrained: bool = False, **kwargs) -> CSwinTransformer:
    if kwargs.get("features_only"):
        kwargs.setdefault("feature_cfg", dict(feature_cls="getter", out_indices=(0, 1, 2, 3)))
    return build_slab_model(CSwinTransformer, variant, pretrained, checkpoint_filter_fn, **kwargs)


_SLAB = dict(attn_type="LLSS", la_split_size="56-28-14-7", norm="prepbn")


@register_model
def slab_cswin_tiny_224(pretrained: bool = False, **kwargs) -> CSwinTransformer:
    """SLAB-CSwin-T (82.8 top-1): depths 2-4-18-1 as the authors' released ``SLAB_CSWin_64_24181_tiny_224``."""
    args = dict(embed_dim=64, depth=(2, 4, 18, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7), **_SLAB)
    return _create("slab_cswin_tiny_224", pretrained, **dict(args, **kwargs))


@register_model
def slab_cswin_small_224(pretrained: bool = False, **kwargs) -> CSwinTransformer:
    """SLAB-CSwin-S: CSwin-S widths and depths, SLA in stages 1-2."""
    args = dict(embed_dim=64, depth=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7), **_SLAB)
    return _create("slab_cswin_small_224", pretrained, **dict(args, **kwargs))


@register_model
def slab_cswin_base_224(pretrained: bool = False, **kwargs) -> CSwinTransformer:
    """SLAB-CSwin-B: CSwin-B widths and depths, SLA in stages 1-2."""
    args = dict(embed_dim=96, depth=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), split_size=(1, 2, 7, 7), **_SLAB)
    return _create("slab_cswin_base_224", pretrained, **dict(args, **kwargs))


@register_model
def cswin_tiny_prepbn_224(pretrained: bool = False, **kwargs) -> CSwinTransformer:
    """CSwin-T (depths 1-2-21-1) with PRepBN norms and softmax stripes."""
    args = dict(embed_dim=64, depth=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7),
                attn_type="SSSS", norm="prepbn")
    return _create("cswin_tiny_prepbn_224", pretrained, **dict(args, **kwargs))


@register_model
def cswin_small_prepbn_224(pretrained: bool = False, **kwargs) -> CSwinTransformer:
    """CSwin-S (depths 2-4-32-2) with PRepBN norms and softmax stripes."""
    args = dict(embed_dim=64, depth=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7),
                attn_type="SSSS", norm="prepbn")
    return _create("cswin_small_prepbn_224", pretrained, **dict(args, **kwargs))


@register_model
def cswin_base_prepbn_224(pretrained: bool = False, **kwargs) -> CSwinTransformer:
    """CSwin-B (embed 96, depths 2-4-32-2) with PRepBN norms and softmax stripes."""
    args = dict(embed_dim=96, depth=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), split_size=(1, 2, 7, 7),
                attn_type="SSSS", norm="prepbn")
    return _create("cswin_base_prepbn_224", pretrained, **dict(args, **kwargs))


def from_authors_record(record: dict) -> CSwinTransformer:
    """Our model equivalent to the authors' ``slab_cswin.CSWinTransformer`` record."""
    c = record["constructor"]
    if c.get("patch_size", 4) != 4:
        raise ValueError(f"CSwin's conv embed is 7x7 stride 4; patch_size {c['patch_size']} is not supported")
    return CSwinTransformer(
        img_size=tuple(record.get("input_shape", [1, 3, 224, 224])[-2:]), in_chans=c.get("in_chans", 3),
        num_classes=c.get("num_classes", 1000), embed_dim=c["embed_dim"], depth=c["depth"],
        num_heads=c["num_heads"], split_size=c.get("split_size", (1, 2, 7, 7)),
        la_split_size=c.get("la_split_size", "56-28-14-7"), attn_type=c.get("attn_type", "SSSS"),
        mlp_ratio=c.get("mlp_ratio", 4.0), qkv_bias=c.get("qkv_bias", True), norm=authors_norm_kind(c),
        ln_eps=authors_ln_eps(c, 1e-5), sla_kernel_size=c.get("kernel_size", 5))


AUTHORS_CLASSES = {"slab_cswin.CSWinTransformer": from_authors_record}
