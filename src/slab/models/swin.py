"""Swin Transformer with PRepBN norms and optional SLA stages (SLAB-Swin).

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive
Re-parameterized Batch Normalization" (Guo et al., ICML 2024), on Swin ("Swin Transformer:
Hierarchical Vision Transformer using Shifted Windows", Liu et al., ICCV 2021).

Layout (the authors' key names, so their checkpoints load by a copy): ``patch_embed`` (4x4 conv +
norm), four ``layers``, each a list of ``blocks`` followed by a ``downsample`` (patch merging: 2x2
neighbours concatenated, norm, bias-free ``reduction``) except the last, a final ``norm``, average
pooling and ``head``. Tokens travel as ``[B, H, W, C]``.

Forms, all from one class through ``norm=`` and ``attn_type=`` (one letter per stage):
* ``swin_*_prepbn``: softmax window attention everywhere (``'SSSS'``), PRepBN norms;
* ``swin_tiny_repbn``: the same with plain RepBN norms (the authors' ``swin_tiny_prepbn.pth`` stores these);
* ``slab_swin_*``: ``'LLSS'``: SLA in stages 1-2 with window ``sla_window_size`` (56: clipped to the
  feature map, so at 224 input they attend globally over 3136 and 784 tokens), softmax 7x7 shifted
  windows in stages 3-4;
* any of them with ``norm='ln'`` is the LayerNorm baseline, ``norm='none'`` the norm-free bound.

Window rules, per axis, at every forward: the window is ``min(window, feature side)``; a side no
larger than the window gets no shift. Feature maps are zero-padded (after ``norm1``, as the authors'
detection backbone does) to whole windows; padded tokens take part in attention as in Swin. Only
softmax blocks alternate shifts (odd blocks shift by half a window, with the usual -100 mask); SLA
cannot apply a mask, so SLA blocks never shift. Relative position bias tables exist in softmax
stages only; smaller windows use the centre of the table, larger ones a bicubic resize of it. SLA's
positional encoding ``[1, window_h * window_w, C]`` is resized bilinearly when the window differs.
Patch merging pads odd sides with zeros, so any input whose sides are multiples of the patch size
(4) works, non-square included.

Fusion: norm1 folds into ``qkv``; the fused block then pads windows with ``pad_value`` (the input the
folded norm mapped to 0, :func:`slab.reparam.fold.zero_preimage`) instead of 0, so padded tokens give
the same ``qkv`` output as before. norm2 folds into ``fc1``, patch-merging norms into ``reduction``
(which gains a bias), the patch-embedding norm into its conv, the final norm into ``head``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_notrace_module

from ..layers.attention import (SimplifiedLinearAttention, attn_letters, get_attn_layer, head_dim_of, parse_attn,
                                register_attn_layer, resize_positional_encoding)
from ..layers.norm import get_norm_layer
from ..reparam.fold import as_channel_affine, fold_into_consumers, fold_into_producer, zero_preimage
from ._authors import authors_cfg, authors_ln_eps, authors_norm_kind, drop_keys, remap_norm_keys
from ._builder import build_slab_model, check_image_input, drop_path_rates, init_linear_layers, new_classifier
from ._stages import StagedModel

__all__ = ["SlabSwinTransformer", "SwinBlock", "WindowAttention", "PatchMerging", "checkpoint_filter_fn"]

# SLA in a window is SLA over the window's grid: the global layer serves windows unchanged.
register_attn_layer("window", "sla")(SimplifiedLinearAttention)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W, C] -> [B * nW, wh * ww, C]``, windows in row-major order (H, W multiples of the window)."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, wh * ww, C] -> [B, H, W, C]``."""
    wh, ww = window
    h, w = hw
    c = windows.shape[-1]
    x = windows.reshape(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def pad_hw(x: torch.Tensor, pad_h: int, pad_w: int, value: torch.Tensor | None = None) -> torch.Tensor:
    """Pad ``[B, H, W, C]`` at the bottom/right with 0, or with the per-channel ``value`` (``[C]``)."""
    if not pad_h and not pad_w:
        return x
    if value is None:
        return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    b, h, w, c = x.shape
    value = value.to(dtype=x.dtype)
    if pad_w:
        x = torch.cat([x, value.expand(b, h, pad_w, c)], dim=2)
    if pad_h:
        x = torch.cat([x, value.expand(b, pad_h, w + pad_w, c)], dim=1)
    return x


def relative_position_index(window: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``[N, N]`` index into a ``(2wh-1)(2ww-1)`` table of relative offsets between the window's tokens."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid([torch.arange(wh, device=device), torch.arange(ww, device=device)],
                                        indexing="ij")).flatten(1)  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def resize_bias_table(table: torch.Tensor, src_window: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """Relative position bias table ``[(2sh-1)(2sw-1), heads]`` for another window size.

    A smaller window takes the centre of the table (exact: the same offsets); a larger one a bicubic
    resize of the whole table.
    """
    if src_window[0] == window[0] and src_window[1] == window[1]:
        return table
    sh, sw = src_window
    wh, ww = window
    heads = table.shape[-1]
    grid = table.t().reshape(heads, 2 * sh - 1, 2 * sw - 1)
    if wh <= sh and ww <= sw:
        grid = grid[:, sh - wh:sh + wh - 1, sw - ww:sw + ww - 1]
    else:
        grid = F.interpolate(grid[None].float(), size=[2 * wh - 1, 2 * ww - 1], mode="bicubic",
                             align_corners=False)[0].to(table.dtype)
    return grid.reshape(heads, -1).t()


def _shift_regions(size: int, window: int, shift: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the regions a shift by ``shift`` makes along one axis (one region without shift)."""
    if shift == 0:
        return [(0, size)]
    return [(0, size - window), (size - window, size - shift), (size - shift, size)]


def shifted_window_mask(hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                        device: torch.device | None = None) -> torch.Tensor | None:
    """``[nW, N, N]`` additive mask (0 or -100) keeping shifted windows from mixing regions; None without shift."""
    if shift[0] == 0 and shift[1] == 0:
        return None
    h, w = hw
    label = torch.zeros(1, h, w, 1, device=device)
    cnt = 0
    for h0, h1 in _shift_regions(h, window[0], shift[0]):
        for w0, w1 in _shift_regions(w, window[1], shift[1]):
            label[:, h0:h1, w0:w1, :] = cnt
            cnt += 1
    regions = window_partition(label, window).squeeze(-1)  # [nW, N]
    mask = regions[:, None, :] - regions[:, :, None]
    return mask.masked_fill(mask != 0, -100.0)  # Swin's value (a literal: TorchScript reads no float globals)


@register_attn_layer("window", "softmax")
class WindowAttention(nn.Module):
    """Softmax attention inside windows with a learned relative position bias (Swin's W-MSA).

    ``grid_size`` is the window the bias table is made for (``(2wh-1)(2ww-1)`` entries per head, kept as
    ``self.window``); other window sizes are served by :func:`resize_bias_table`. ``kernel_size`` is SLA's
    (unused here: one constructor for both kinds of a form).
    """

    def __init__(self, dim: int, num_heads: int, grid_size: tuple[int, int], qkv_bias: bool = True,
                 kernel_size: int = 5, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        head_dim_of(dim, num_heads)
        self.num_heads = num_heads
        self.window = _pair(grid_size)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * self.window[0] - 1) * (2 * self.window[1] - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self, window: tuple[int, int]) -> torch.Tensor:
        """``[heads, N, N]`` bias for a ``window`` of tokens."""
        n = window[0] * window[1]
        if window[0] == self.window[0] and window[1] == self.window[1]:
            table, index = self.relative_position_bias_table, self.relative_position_index
        else:
            table = resize_bias_table(self.relative_position_bias_table, self.window, window)
            index = relative_position_index(window, device=table.device)
        return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[B * nW, N, C]`` windows of the ``hw`` window; ``attn_mask``: ``[nW, N, N]`` or None.
        Returns ``[B * nW, N, C]``."""
        bw, n, c = x.shape
        window, mask = hw, attn_mask
        nw = 1 if mask is None else mask.shape[0]
        heads, d = self.num_heads, c // self.num_heads
        # [3, B, nW * heads, N, d]: windows and heads share one dim, so the bias broadcasts over B.
        qkv = self.qkv(x).reshape(bw // nw, nw, n, 3, heads, d).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.reshape(3, bw // nw, nw * heads, n, d).unbind(0)
        bias = self.position_bias(window).to(q.dtype)  # [heads, N, N]
        if mask is not None:
            bias = bias + mask[:, None].to(q.dtype)  # [nW, heads, N, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(-1, n, n),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.reshape(bw // nw, nw, heads, n, d).permute(0, 1, 3, 2, 4).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


# Windows, shifts and padding follow the feature-map size at every forward (any input size runs): FX
# keeps the block as a leaf (one graph node), as timm does for modules with shape-dependent control flow.
@register_notrace_module
class SwinBlock(nn.Module):
    """Pre-norm Swin block over ``[B, H, W, C]``: ``x + attn(windows(norm1(x)))``, ``x + mlp(norm2(x))``.

    Args:
        window_size: the configured window (clipped to the feature map at every forward).
        shift: shift windows by half a window (softmax blocks at odd depth; ignored for SLA).
        built_hw: feature size the block is built for: the clipped window there sizes the bias table /
            positional encoding (as the authors' checkpoints store them).
        attn: ``'softmax'`` or ``'sla'``.
    """
    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, built_hw: tuple[int, int],
                 attn: str = "softmax", mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_layer=nn.LayerNorm,
                 sla_kernel_size: int = 5, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        attn_layer = get_attn_layer(attn, "window")
        self.dim = dim
        self.window_size = int(window_size)
        self.shift = bool(shift) and attn == "softmax"
        self.attn_kind = attn
        built_window, _ = self.window_shift(built_hw)
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, grid_size=built_window, qkv_bias=qkv_bias, kernel_size=sla_kernel_size,
                               attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # Per-channel padding value of the fused block (None: pad with zeros, the unfused behaviour).
        self.register_buffer("pad_value", None)
        # Shift mask for the built size (recomputed for any other size).
        self._built = (tuple(built_hw),) + self.window_shift(built_hw)
        hp, wp = (-(-s // w) * w for s, w in zip(built_hw, built_window))
        self.register_buffer("attn_mask", shifted_window_mask((hp, wp), built_window, self._built[2]),
                             persistent=False)

    def window_shift(self, hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Window and shift used on an ``hw`` feature map (per axis: clipped window, no shift if it fits)."""
        window = (min(self.window_size, hw[0]), min(self.window_size, hw[1]))
        shift = (window[0] // 2 if self.shift and hw[0] > window[0] else 0,
                 window[1] // 2 if self.shift and hw[1] > window[1] else 0)
        return window, shift

    def _mask(self, hw: tuple[int, int], padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
              device: torch.device) -> torch.Tensor | None:
        built_hw, built_window, built_shift = self._built
        if hw == built_hw and window == built_window and shift == built_shift:
            return self.attn_mask
        return shifted_window_mask(padded, window, shift, device=device)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        window, shift = self.window_shift((h, w))
        x = pad_hw(x, (-h) % window[0], (-w) % window[1], self.pad_value)
        hp, wp = x.shape[1], x.shape[2]
        shifted = shift[0] != 0 or shift[1] != 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        # SLA blocks never shift (``self.shift`` is False for them), so their mask is None.
        windows = self.attn(window_partition(x, window), window,
                            self._mask((h, w), (hp, wp), window, shift, x.device))
        x = window_reverse(windows, window, (hp, wp))
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :h, :w, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attention(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x

    def fuse(self) -> "SwinBlock":
        # norm1 feeds qkv through zero-padding: after folding, pad with the value norm1 mapped to 0.
        value = zero_preimage(self.norm1)
        if value is not None:
            self.pad_value = value.detach().to(device=self.attn.qkv.weight.device, dtype=self.attn.qkv.weight.dtype)
        self.norm1 = fold_into_consumers(self.norm1, [self.attn.qkv])
        self.norm2 = fold_into_consumers(self.norm2, [self.mlp.fc1])
        return self


@register_notrace_module  # pads odd sides: shape-dependent control flow
class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (``[x00, x10, x01, x11]``), norm, bias-free Linear ``4C -> 2C``.

    Odd sides are zero-padded first (the norm then sees the padded zeros, so folding it stays exact).
    """

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, out_dim: int | None = None):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = pad_hw(x, h % 2, w % 2)
        h, w = x.shape[1:3]
        # [B, H/2, 2(h), W/2, 2(w), C] -> [B, H/2, W/2, 2(w), 2(h), C]: order x00, x10, x01, x11
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))

    def fuse(self) -> "PatchMerging":
        self.norm = fold_into_consumers(self.norm, [self.reduction])
        return self


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv, then a norm over channels: ``[B, 3, H, W] -> [B, H/p, W/p, C]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_layer=None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))

    def fuse(self) -> "PatchEmbed":
        self.norm = fold_into_producer(self.norm, self.proj)
        return self


class SwinStage(nn.Module):
    """``blocks`` at one resolution, then ``downsample`` (patch merging; Identity for the last stage)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, built_hw: tuple[int, int],
                 attn: str, downsample: bool, norm_layer, drop_path: list[float], **block_kwargs):
        super().__init__()
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, window_size, shift=i % 2 == 1, built_hw=built_hw, attn=attn,
                      norm_layer=norm_layer, drop_path=drop_path[i], **block_kwargs) for i in range(depth)])
        self.downsample = PatchMerging(dim, norm_layer) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


class SlabSwinTransformer(StagedModel, nn.Module):
    """Swin Transformer with a choice of norm (``ln``/``bn``/``repbn``/``prepbn``/``none``) and per-stage attention.

    Args:
        img_size: the size the model is built for: it fixes the shapes of the relative position bias
            tables and SLA positional encodings (windows clipped to the feature maps at this size); any
            input with sides multiple of ``patch_size`` runs.
        patch_size, in_chans, num_classes, embed_dim, depths, num_heads, mlp_ratio, qkv_bias: as in Swin.
        window_size: window of softmax (``S``) stages. sla_window_size: window of SLA (``L``) stages
            (56 in the released SLAB-Swin configs: the whole feature map at 224).
        norm: norm of every block, the patch embedding, patch merging and the final norm.
        attn_type: one letter per stage, ``L`` = SLA, ``S`` = softmax (``'LLSS'`` for SLAB-Swin);
            ``attn='softmax'``/``'sla'`` sets every stage.
        ln_eps: LayerNorm eps (1e-5 in Swin). sla_kernel_size: DWC kernel of SLA (5).
        patch_norm: norm after the patch embedding.

    Stage ``i`` of timm's stage interface (:class:`slab.models._stages.StagedModel`) is ``layers[i]``'s blocks,
    after ``layers[i - 1].downsample``: its features are taken before patch merging, as in timm's Swin.
    """

    stage_output_fmt = "NHWC"
    has_final_norm = True

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7, sla_window_size: int = 56,
                 attn_type: str = "SSSS", attn: str | None = None, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm: str = "prepbn", ln_eps: float = 1e-5, sla_kernel_size: int = 5, patch_norm: bool = True,
                 global_pool: str = "avg", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have one entry per stage")
        stage_attn = parse_attn(attn if attn is not None else attn_type, len(depths))
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
        img_size = _pair(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.img_size = img_size
        self.embed_dim = embed_dim
        self.num_layers = self.num_stages = len(depths)
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (self.num_layers - 1)
        self.norm_kind = norm
        self.attn_type = attn_letters(stage_attn)
        self.output_fmt = "NHWC"
        norm_layer = get_norm_layer(norm, ln_eps=ln_eps)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        hw = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, (depth, heads, kind) in enumerate(zip(depths, num_heads, stage_attn)):
            dim = embed_dim * 2 ** i
            self.layers.append(SwinStage(
                dim, depth, heads, sla_window_size if kind == "sla" else window_size, hw, kind,
                downsample=i < self.num_layers - 1, norm_layer=norm_layer,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                sla_kernel_size=sla_kernel_size, drop=drop_rate, attn_drop=attn_drop_rate))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}"))
            hw = (-(-hw[0] // 2), -(-hw[1] // 2))
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        init_linear_layers(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()
                if n.endswith(("relative_position_bias_table", "positional_encoding", ".alpha"))}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = new_classifier(self, self.num_features, num_classes)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, multiple_of=self.patch_size, model=type(self).__name__)
        return self.pos_drop(self.patch_embed(x))

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i > 0:
            x = self.layers[i - 1].downsample(x)
        return self.run_blocks(self.layers[i].blocks, x)

    def _remove_stages(self, keep: int) -> None:
        self.layers = self.layers[:keep]
        self.layers[-1].downsample = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W] -> [B, H/32, W/32, C]`` (NHWC, after the final norm)."""
        if not torch.jit.is_scripting():
            return self.final_norm(self.forward_stages(x))
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "SlabSwinTransformer":
        # The final norm could fold into the head (pooling is linear), but forward_features and the
        # intermediates would then change meaning with fusion: it stays a per-channel affine (one
        # multiply-add on the final tokens).
        self.norm = as_channel_affine(self.norm)
        return self


def _from_timm_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's Swin (patch merging at the start of stage i+1, ``head.fc``) -> the original layout."""
    import re
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SlabSwinTransformer) -> dict[str, torch.Tensor]:
    """Convert an authors' Swin / SLAB-Swin (or timm Swin) state_dict to this model's keys.

    Norm keys are renamed (:func:`remap_norm_keys`); ``relative_position_index`` and ``attn_mask``
    (recomputed here) are dropped; position bias tables and SLA positional encodings made for another
    window are resized.
    """
    out = dict(state_dict)
    if "head.fc.weight" in out or "layers.1.downsample.reduction.weight" in out and \
            "layers.0.downsample.reduction.weight" not in out:
        out = _from_timm_layout(out)
    out = drop_keys(out, [r"relative_position_index$", r"attn_mask$"])
    out = remap_norm_keys(out, model)
    own = model.state_dict()
    for key, value in list(out.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        module = model.get_submodule(key.rsplit(".", 1)[0])
        if key.endswith("relative_position_bias_table") and isinstance(module, WindowAttention):
            side = int(round(value.shape[0] ** 0.5))
            src = ((side + 1) // 2, (side + 1) // 2)
            out[key] = resize_bias_table(value, src, module.window)
        elif key.endswith("positional_encoding") and isinstance(module, SimplifiedLinearAttention):
            side = int(round(value.shape[1] ** 0.5))
            if side * side == value.shape[1]:
                out[key] = resize_positional_encoding(value, (side, side), module.grid_size)
    return out


def _cfg(file: str | None = None, **kwargs) -> dict:
    return authors_cfg(file, **{"first_conv": "patch_embed.proj", "crop_pct": 0.875, "pool_size": (7, 7), **kwargs})


default_cfgs = generate_default_cfgs({
    "swin_tiny_prepbn_patch4_window7_224": _cfg(None),
    "swin_small_prepbn_patch4_window7_224": _cfg(None),
    "swin_base_prepbn_patch4_window7_224": _cfg(None),
    "swin_tiny_repbn_patch4_window7_224.authors_in1k": _cfg("swin_tiny_prepbn.pth"),
    "slab_swin_tiny_patch4_224.authors_in1k": _cfg("slab_swin_tiny.pth"),
    "slab_swin_small_patch4_224.authors_in1k": _cfg("slab_swin_small.pth"),
    "slab_swin_base_patch4_224": _cfg(None),
})

# ImageNet top-1 reported in the paper for each registered model (README model table).
PAPER_TOP1 = {"swin_tiny_prepbn_patch4_window7_224": 81.4, "swin_tiny_repbn_patch4_window7_224": 81.4,
              "slab_swin_tiny_patch4_224": 81.8, "slab_swin_small_patch4_224": 83.6}

# Released file -> registered model that loads it.
AUTHORS_CHECKPOINTS = {
    "swin_tiny_prepbn.pth": "swin_tiny_repbn_patch4_window7_224",
    "slab_swin_tiny.pth": "slab_swin_tiny_patch4_224",
    "slab_swin_small.pth": "slab_swin_small_patch4_224",
}


def _create(variant: str, pretrained: bool = False, **kwargs) -> SlabSwinTransformer:
    if kwargs.get("features_only"):
        kwargs.setdefault("feature_cfg", dict(feature_cls="getter", out_indices=(0, 1, 2, 3)))
    return build_slab_model(SlabSwinTransformer, variant, pretrained, checkpoint_filter_fn, **kwargs)


_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_SLAB = dict(attn_type="LLSS", norm="prepbn", window_size=7, sla_window_size=56)


@register_model
def swin_tiny_prepbn_patch4_window7_224(pretrained: bool = False, **kwargs) -> SlabSwinTransformer:
    """Swin-T with PRepBN, softmax window attention (81.4 top-1 in the paper)."""
    return _create("swin_tiny_prepbn_patch4_window7_224", pretrained,
                   **{**_TINY, "norm": "prepbn", "drop_path_rate": 0.1, **kwargs})


@register_model
def swin_small_prepbn_patch4_window7_224(pretrained: bool = False, **kwargs) -> SlabSwinTransformer:
    """Swin-S with PRepBN, softmax window attention."""
    return _create("swin_small_prepbn_patch4_window7_224", pretrained,
                   **{**_SMALL, "norm": "prepbn", "drop_path_rate": 0.3, **kwargs})


@register_model
def swin_base_prepbn_patch4_window7_224(pretrained: bool = False, **kwargs) -> SlabSwinTransformer:
    """Swin-B with PRepBN, softmax window attention."""
    return _create("swin_base_prepbn_patch4_window7_224", pretrained,
                   **{**_BASE, "norm": "prepbn", "drop_path_rate": 0.5, **kwargs})


@register_model
def swin_tiny_repbn_patch4_window7_224(pretrained: bool = False, **kwargs) -> SlabSwinTransformer:
    """Swin-T with plain RepBN norms: the layout of the authors' released ``swin_tiny_prepbn.pth``."""
    return _create("swin_tiny_repbn_patch4_window7_224", pretrained,
                   **{**_TINY, "norm": "repbn", "drop_path_rate": 0.1, **kwargs})


@register_model
def slab_swin_tiny_patch4_224(pretrained: bool = False, **kwargs) -> SlabSwinTransformer:
    """SLAB-Swin-T: SLA in stages 1-2 (global at 224), softmax 7x7 windows in 3-4, PRepBN (81.8 top-1)."""
    return _create("slab_swin_tiny_patch4_224", pretrained, **{**_TINY, **_SLAB, "drop_path_rate": 0.2, **kwargs})


@register_model
def slab_swin_small_patch4_224(pretrained: bool = False, **kwargs) -> SlabSwinTransformer:
    """SLAB-Swin-S (83.6 top-1)."""
    return _create("slab_swin_small_patch4_224", pretrained, **{**_SMALL, **_SLAB, "drop_path_rate": 0.3, **kwargs})


@register_model
def slab_swin_base_patch4_224(pretrained: bool = False, **kwargs) -> SlabSwinTransformer:
    """SLAB-Swin-B (no released checkpoint)."""
    return _create("slab_swin_base_patch4_224", pretrained, **{**_BASE, **_SLAB, "drop_path_rate": 0.5, **kwargs})


def from_authors_record(record: dict) -> SlabSwinTransformer:
    """Our model equivalent to the authors' ``swin_transformer.SwinTransformer`` / ``slab_swin.SlabSwinTransformer``.

    Their ``window_size`` is the window of SLA stages in SLAB-Swin (56); softmax stages use 7.
    """
    c = record["constructor"]
    slab = record["authors_class"].startswith("slab_swin")
    args = dict(img_size=record.get("input_shape", [1, 3, 224, 224])[-2:], patch_size=c.get("patch_size", 4),
                in_chans=c.get("in_chans", 3), num_classes=c.get("num_classes", 1000), embed_dim=c["embed_dim"],
                depths=c["depths"], num_heads=c["num_heads"], mlp_ratio=c.get("mlp_ratio", 4.0),
                qkv_bias=c.get("qkv_bias", True), patch_norm=c.get("patch_norm", True),
                norm=authors_norm_kind(c), ln_eps=authors_ln_eps(c, 1e-5),
                drop_path_rate=c.get("drop_path_rate", 0.1))
    if slab:
        args.update(attn_type=c.get("attn_type", "LLSS"), sla_window_size=c.get("window_size", 56), window_size=7,
                    sla_kernel_size=c.get("kernel_size", 5))
    else:
        args.update(attn_type="SSSS", window_size=c.get("window_size", 7))
    return SlabSwinTransformer(**args)


AUTHORS_CLASSES = {"swin_transformer.SwinTransformer": from_authors_record,
                   "slab_swin.SlabSwinTransformer": from_authors_record}
