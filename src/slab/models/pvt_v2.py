"""PVT v2 with PRepBN norms and optional SLA attention (SLAB-PVTv2).

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive
Re-parameterized Batch Normalization" (Guo et al., ICML 2024), on PVT v2 ("PVT v2: Improved Baselines
with Pyramid Vision Transformer", Wang et al., CVMJ 2022).

Differences from PVT v1 (:mod:`slab.models.pvt`): overlapping patch embeddings (7x7 stride 4, then 3x3
stride 2, zero padding), no absolute positional embedding, a depthwise 3x3 conv inside every MLP
(``fc1 -> dwconv -> GELU -> fc2``), and a norm ``normI`` at the end of every stage. The classifier
averages the last stage's normalised tokens. Attention is the same spatial-reduction softmax
attention or SLA as in PVT v1, chosen per stage by ``attn_type``.

Forms: ``pvt_v2_b*_prepbn`` (softmax attention, PRepBN norms) and ``slab_pvt_v2_b*`` (SLA in every
stage without K/V reduction, PRepBN); ``norm='ln'`` gives the LayerNorm baseline.
"""
import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers.attention import attn_letters, parse_attn
from ..layers.norm import get_norm_layer
from ..reparam.fold import as_channel_affine, fold_into_producer
from ._authors import authors_cfg, remap_norm_keys
from ._builder import build_slab_model, check_image_input, drop_path_rates, init_linear_layers, new_classifier
from .pvt import (Block, authors_args, parse_ratios, resize_checkpoint_encodings, stage_input_multiple,
                  tokens_to_map)

__all__ = ["PyramidVisionTransformerV2", "checkpoint_filter_fn"]


class DWConv(nn.Module):
    """Depthwise 3x3 conv over the token grid: ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, hw[0], hw[1]))
        return x.flatten(2).transpose(1, 2)


class DWConvMlp(nn.Module):
    """PVT v2 MLP: ``fc2(drop(GELU(dwconv(fc1(x)))))``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), hw)))
        return self.drop(self.fc2(x))


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: ``norm(flatten(conv_{k, s, pad=k//2}(x)))``, ``[B, C, H, W] -> [B, N, D]``."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int, norm_layer):
        super().__init__()
        self.patch_size, self.stride = patch_size, stride
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw

    def fuse(self) -> "OverlapPatchEmbed":
        # The norm reads the conv's output: folding into the producer is exact despite the padding.
        self.norm = fold_into_producer(self.norm, self.proj)
        return self


class PyramidVisionTransformerV2(nn.Module):
    """PVT v2 with a choice of norm and attention per stage.

    Args:
        img_size: training resolution (SLA positional encodings are made for it, resized for others).
        patch_size: unused by the architecture beyond the authors' signature: stage 1 is a 7x7 stride-4 conv,
            later stages 3x3 stride 2 (kept so the authors' records map one to one).
        in_chans, num_classes, embed_dims, num_heads, mlp_ratios, qkv_bias, depths, sr_ratios: as in PVT v2.
        attn_type: one letter per stage, ``L`` = SLA, ``S`` = softmax (the authors' argument). la_sr_ratios: K/V
            reduction of SLA stages.
        attn: ``'sla'`` / ``'softmax'`` for every stage, or letters as ``attn_type`` (overrides it when given).
        norm: every norm (patch embeddings, blocks, reductions, stage ends). ln_eps: LayerNorm eps (1e-6).
        sla_kernel_size: DWC kernel of SLA.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dims: tuple[int, ...] = (64, 128, 320, 512),
                 num_heads: tuple[int, ...] = (1, 2, 5, 8), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 qkv_bias: bool = True, depths: tuple[int, ...] = (3, 4, 6, 3), sr_ratios=(8, 4, 2, 1),
                 attn_type: str = "SSSS", la_sr_ratios="1111", norm: str = "prepbn", ln_eps: float = 1e-6,
                 sla_kernel_size: int = 5, global_pool: str = "avg", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, attn: str | None = None):
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
        strides = [4 * 2 ** i for i in range(num_stages)]
        self.input_multiple = stage_input_multiple(strides, reductions)
        if img_size[0] % self.input_multiple or img_size[1] % self.input_multiple:
            raise ValueError(f"img_size {img_size} must be a multiple of {self.input_multiple} "
                             f"(stage strides {strides} times K/V reductions {reductions})")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size = img_size
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.num_stages = num_stages
        self.norm_kind, self.attn_type = norm, attn_letters(attns)
        self.grid_sizes = [(img_size[0] // s, img_size[1] // s) for s in strides]
        norm_layer = get_norm_layer(norm, ln_eps=ln_eps)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        cur = 0
        for i in range(num_stages):
            dim, grid = embed_dims[i], self.grid_sizes[i]
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(7 if i == 0 else 3, 4 if i == 0 else 2,
                                                                   in_chans if i == 0 else embed_dims[i - 1], dim,
                                                                   norm_layer))
            setattr(self, f"block{i + 1}", nn.ModuleList([
                Block(dim, num_heads[i], mlp_ratios[i], qkv_bias, norm_layer, attns[i], reductions[i], grid,
                      sla_kernel_size, mlp_layer=DWConvMlp, drop=drop_rate, attn_drop=attn_drop_rate,
                      drop_path=dpr[cur + j])
                for j in range(depths[i])]))
            setattr(self, f"norm{i + 1}", norm_layer(dim))
            cur += depths[i]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=strides[i], module=f"norm{i + 1}")
                             for i in range(num_stages)]
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        init_linear_layers(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("positional_encoding") or n.endswith(".alpha")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

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

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` (0-based): ``[B, C_in, H, W] -> [B, C_i, H / s_i, W / s_i]`` (after ``norm{i+1}``)."""
        x, hw = getattr(self, f"patch_embed{i + 1}")(x)
        for blk in getattr(self, f"block{i + 1}"):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x = blk(x, hw)
        return tokens_to_map(getattr(self, f"norm{i + 1}")(x), hw)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs (NCHW, after each stage's norm) at ``indices`` (timm semantics)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_image_input(x, self.in_chans, multiple_of=self.input_multiple, model=type(self).__name__)
        take, max_index = feature_take_indices(self.num_stages, indices)
        out = []
        last = max_index if stop_early else self.num_stages - 1
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take:
                out.append(x)
        return out if intermediates_only else (x, out)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and the head); returns the absolute indices."""
        take, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for prefix in ("patch_embed", "block", "norm"):
                delattr(self, f"{prefix}{i + 1}")
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[:max_index + 1]
        self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W] -> [B, C_last, H / 32, W / 32]``."""
        if torch.jit.is_scripting():
            return self._scripted_stages(x)
        check_image_input(x, self.in_chans, multiple_of=self.input_multiple, model=type(self).__name__)
        for i in range(self.num_stages):
            x = self._stage(i, x)
        return x

    def _scripted_stages(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_features` under TorchScript, which reads attributes by literal names only.

        The stages keep the authors' attribute names (``patch_embedI``, ``blockI``, ``normI``, the checkpoint
        keys), so the four of the standard configurations are written out; ``hasattr`` skips those
        :meth:`prune_intermediate_layers` removed.
        """
        if hasattr(self, "block5"):
            raise RuntimeError("TorchScript supports PyramidVisionTransformerV2 with at most 4 stages")
        if hasattr(self, "block1"):
            x, hw = self.patch_embed1(x)
            for blk in self.block1:
                x = blk(x, hw)
            x = tokens_to_map(self.norm1(x), hw)
        if hasattr(self, "block2"):
            x, hw = self.patch_embed2(x)
            for blk in self.block2:
                x = blk(x, hw)
            x = tokens_to_map(self.norm2(x), hw)
        if hasattr(self, "block3"):
            x, hw = self.patch_embed3(x)
            for blk in self.block3:
                x = blk(x, hw)
            x = tokens_to_map(self.norm3(x), hw)
        if hasattr(self, "block4"):
            x, hw = self.patch_embed4(x)
            for blk in self.block4:
                x = blk(x, hw)
            x = tokens_to_map(self.norm4(x), hw)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "PyramidVisionTransformerV2":
        # A stage norm reads a residual sum (no producer to absorb it) and feeds the next patch embedding,
        # a zero-padded conv (folding into it would shift the padded zeros): it stays as an explicit
        # per-channel affine. So does the last one (it could fold into the head): forward_features and the
        # intermediates then mean the same before and after fusion, for one multiply-add on the last map.
        for i in range(1, self.num_stages + 1):
            setattr(self, f"norm{i}", as_channel_affine(getattr(self, f"norm{i}")))
        return self


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert an authors' SLAB-PVTv2 state_dict (``slab_pvt_v2.PyramidVisionTransformerV2``) to this model's keys."""
    return resize_checkpoint_encodings(remap_norm_keys(state_dict, model), model)


def _cfg(**kwargs) -> dict:
    return authors_cfg(None, **{"first_conv": "patch_embed1.proj", "crop_pct": 0.9, "pool_size": (7, 7), **kwargs})


_VARIANTS = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4)),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4)),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), mlp_ratios=(8, 8, 4, 4)),
    "b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), mlp_ratios=(8, 8, 4, 4)),
    "b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), mlp_ratios=(8, 8, 4, 4)),
    "b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}
_COMMON = dict(num_heads=(1, 2, 5, 8), qkv_bias=True, sr_ratios=(8, 4, 2, 1))
_PREPBN = dict(norm="prepbn", attn_type="SSSS")
_SLAB = dict(norm="prepbn", attn_type="LLLL", la_sr_ratios="1111")

default_cfgs = generate_default_cfgs({f"{prefix}{b}{suffix}": _cfg() for b in _VARIANTS
                                      for prefix, suffix in (("pvt_v2_", "_prepbn"), ("slab_pvt_v2_", ""))})

# No PVT v2 result or checkpoint was released by the authors.
PAPER_TOP1: dict[str, float] = {}
AUTHORS_CHECKPOINTS: dict[str, str] = {}


def _create(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    kwargs.setdefault("feature_cfg", dict(feature_cls="getter", out_indices=(0, 1, 2, 3)))
    return build_slab_model(PyramidVisionTransformerV2, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _args(b: str, form: dict, kwargs: dict) -> dict:
    return {**_COMMON, **_VARIANTS[b], **form, **kwargs}


@register_model
def pvt_v2_b0_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B0 with PRepBN, softmax attention."""
    return _create("pvt_v2_b0_prepbn", pretrained, **_args("b0", _PREPBN, kwargs))


@register_model
def pvt_v2_b1_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B1 with PRepBN, softmax attention."""
    return _create("pvt_v2_b1_prepbn", pretrained, **_args("b1", _PREPBN, kwargs))


@register_model
def pvt_v2_b2_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B2 with PRepBN, softmax attention."""
    return _create("pvt_v2_b2_prepbn", pretrained, **_args("b2", _PREPBN, kwargs))


@register_model
def pvt_v2_b3_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B3 with PRepBN, softmax attention."""
    return _create("pvt_v2_b3_prepbn", pretrained, **_args("b3", _PREPBN, kwargs))


@register_model
def pvt_v2_b4_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B4 with PRepBN, softmax attention."""
    return _create("pvt_v2_b4_prepbn", pretrained, **_args("b4", _PREPBN, kwargs))


@register_model
def pvt_v2_b5_prepbn(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B5 with PRepBN, softmax attention."""
    return _create("pvt_v2_b5_prepbn", pretrained, **_args("b5", _PREPBN, kwargs))


@register_model
def slab_pvt_v2_b0(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """SLAB-PVTv2-B0: SLA in every stage (no K/V reduction) + PRepBN."""
    return _create("slab_pvt_v2_b0", pretrained, **_args("b0", _SLAB, kwargs))


@register_model
def slab_pvt_v2_b1(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """SLAB-PVTv2-B1: SLA + PRepBN."""
    return _create("slab_pvt_v2_b1", pretrained, **_args("b1", _SLAB, kwargs))


@register_model
def slab_pvt_v2_b2(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """SLAB-PVTv2-B2: SLA + PRepBN."""
    return _create("slab_pvt_v2_b2", pretrained, **_args("b2", _SLAB, kwargs))


@register_model
def slab_pvt_v2_b3(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """SLAB-PVTv2-B3: SLA + PRepBN."""
    return _create("slab_pvt_v2_b3", pretrained, **_args("b3", _SLAB, kwargs))


@register_model
def slab_pvt_v2_b4(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """SLAB-PVTv2-B4: SLA + PRepBN."""
    return _create("slab_pvt_v2_b4", pretrained, **_args("b4", _SLAB, kwargs))


@register_model
def slab_pvt_v2_b5(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV2:
    """SLAB-PVTv2-B5: SLA + PRepBN."""
    return _create("slab_pvt_v2_b5", pretrained, **_args("b5", _SLAB, kwargs))


def from_authors_record(record: dict) -> PyramidVisionTransformerV2:
    """Our model equivalent to the authors' ``slab_pvt_v2.PyramidVisionTransformerV2`` record."""
    return PyramidVisionTransformerV2(**authors_args(record))


AUTHORS_CLASSES = {"slab_pvt_v2.PyramidVisionTransformerV2": from_authors_record}
