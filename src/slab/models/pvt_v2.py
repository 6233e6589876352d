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
from timm.models import generate_default_cfgs, register_model

from ..reparam.fold import as_channel_affine, fold_into_producer
from ._authors import authors_cfg, remap_norm_keys
from ._builder import build_slab_model
from .pvt import _PyramidBase, authors_args, resize_checkpoint_encodings

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


class PyramidVisionTransformerV2(_PyramidBase):
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

    mlp_layer = DWConvMlp
    uses_stage_norms = True

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dims: tuple[int, ...] = (64, 128, 320, 512),
                 num_heads: tuple[int, ...] = (1, 2, 5, 8), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 qkv_bias: bool = True, depths: tuple[int, ...] = (3, 4, 6, 3), sr_ratios=(8, 4, 2, 1),
                 attn_type: str = "SSSS", la_sr_ratios="1111", norm: str = "prepbn", ln_eps: float = 1e-6,
                 sla_kernel_size: int = 5, global_pool: str = "avg", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, attn: str | None = None):
        super().__init__(4, img_size, in_chans, num_classes, embed_dims, num_heads, mlp_ratios, qkv_bias, depths,
                         sr_ratios, attn_type, la_sr_ratios, norm, ln_eps, sla_kernel_size, global_pool, drop_rate,
                         attn_drop_rate, drop_path_rate, attn)

    def make_patch_embed(self, i: int, stride: int, in_dim: int, dim: int, norm_layer) -> nn.Module:
        return OverlapPatchEmbed(7 if i == 0 else 3, stride, in_dim, dim, norm_layer)

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
