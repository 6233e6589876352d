"""SLAB backbones for detection: four NCHW feature maps (strides 4, 8, 16, 32) followed by torchvision's FPN.

Two kinds of bodies:

* pyramid families (PVT, PVTv2, Swin, CSwin) built with ``features_only=True``: they already return
  four maps with ``feature_info``;
* single-scale vision transformers (DeiT, SLAB-DeiT): :class:`SimpleFeaturePyramid` lays the final
  tokens on their grid (input size / patch size) and rescales that map to the four strides with
  transposed convs (up) and max pooling (down), as ViTDet's simple feature pyramid (without its norms,
  so nothing is left to fold).

:class:`SlabBackboneWithFPN` pads the batch to the multiple the body needs, crops every map back to
``ceil(size / stride)`` (so torchvision's anchors see the strides they expect), runs the FPN
(``out_channels`` 256, an extra max-pooled level) and applies the PRepBN mode:

* ``'frozen'``: every PRepBN at ``lam = 0`` (RepBN only) and every BatchNorm kept in eval mode while
  the detector trains (statistics frozen, affine parameters still trained), as detection usually
  freezes BN;
* ``'continue'``: norms train normally; a :class:`slab.PRepBNSchedule` built by the training engine
  drives ``lam`` from the optimizer step.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from ..layers.norm import PRepBN, TokenBatchNorm, set_prepbn_lambda

__all__ = ["PREPBN_MODES", "FEATURE_STRIDES", "SimpleFeaturePyramid", "SlabBackboneWithFPN", "build_body",
           "freeze_stages", "inner_model"]

PREPBN_MODES = ("frozen", "continue")
FEATURE_STRIDES = (4, 8, 16, 32)
# Norm modules whose statistics 'frozen' keeps fixed (eval mode) during detector training.
_STAT_NORMS = (nn.modules.batchnorm._NormBase, TokenBatchNorm, PRepBN)


def _rescale_layer(channels: int, factor: float) -> tuple[nn.Module, int]:
    """Map at stride ``s`` -> stride ``s * factor`` (``factor`` a power of two); returns (module, out channels)."""
    if factor == 1:
        return nn.Identity(), channels
    if factor > 1:
        k = int(factor)
        return nn.MaxPool2d(kernel_size=k, stride=k), channels
    layers: list[nn.Module] = []
    steps = int(round(math.log2(1 / factor)))
    c = channels
    for i in range(steps):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.ConvTranspose2d(c, c // 2, kernel_size=2, stride=2))
        c //= 2
    return nn.Sequential(*layers), c


class SimpleFeaturePyramid(nn.Module):
    """Four NCHW maps at :data:`FEATURE_STRIDES` from a single-scale vision transformer.

    ``vit`` must provide ``forward_features(x) -> [B, prefix + H/p * W/p, C]`` (or, without prefix tokens,
    the ``[B, H/p, W/p, C]`` map), ``patch_size``, ``embed_dim`` and ``num_prefix_tokens`` (as
    :class:`slab.models.deit.SlabVisionTransformer`). The prefix (class) token is dropped and the patch
    tokens laid on their ``H/p x W/p`` grid.
    """

    def __init__(self, vit: nn.Module, strides: tuple[int, ...] = FEATURE_STRIDES):
        super().__init__()
        for attr in ("forward_features", "patch_size", "embed_dim", "num_prefix_tokens"):
            if not hasattr(vit, attr):
                raise ValueError(f"SimpleFeaturePyramid needs a vision transformer with `{attr}`; "
                                 f"{type(vit).__name__} has none")
        p = int(vit.patch_size)
        self.vit = vit
        self.patch_size = p
        levels, channels = [], []
        for s in strides:
            factor = s / p
            if math.log2(factor) % 1:
                raise ValueError(f"stride {s} is not a power-of-two multiple or fraction of the patch size {p}")
            layer, c = _rescale_layer(vit.embed_dim, factor)
            levels.append(layer)
            channels.append(c)
        self.levels = nn.ModuleList(levels)
        self.feature_info = [dict(num_chs=c, reduction=s, module=f"levels.{i}")
                             for i, (c, s) in enumerate(zip(channels, strides))]
        self.input_multiple = p

    def stage_modules(self) -> list[nn.Module]:
        """The ViT's blocks in four consecutive groups (their first block each), for ``trainable_layers``."""
        blocks = list(self.vit.blocks)
        return [blocks[i * len(blocks) // 4] for i in range(4)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        feats = self.vit.forward_features(x)
        # An NHWC map (a ViT without prefix tokens) flattens back to its tokens (a view).
        tokens = feats.flatten(1, 2) if feats.dim() == 4 else feats[:, self.vit.num_prefix_tokens:]
        gh, gw = h // self.patch_size, w // self.patch_size
        if tokens.shape[1] != gh * gw:
            raise ValueError(f"{type(self.vit).__name__}.forward_features returned {tokens.shape[1]} patch tokens "
                             f"for a {gh}x{gw} grid")
        fmap = tokens.transpose(1, 2).reshape(b, -1, gh, gw)
        return [level(fmap) for level in self.levels]


def inner_model(body: nn.Module) -> nn.Module:
    """The network a body wraps: the ViT of a :class:`SimpleFeaturePyramid`, the model of a timm feature wrapper."""
    for attr in ("vit", "model"):
        inner = getattr(body, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return body


def _feature_info_list(body: nn.Module) -> list[dict]:
    info = body.feature_info
    if hasattr(info, "get_dicts"):  # timm FeatureInfo
        return info.get_dicts()
    return [dict(d) for d in info]


def _is_single_scale(model: nn.Module) -> bool:
    info = getattr(model, "feature_info", None)
    if not info:
        return False
    reductions = {d.get("reduction") for d in (info.get_dicts() if hasattr(info, "get_dicts") else info)}
    return len(reductions) == 1 and hasattr(model, "forward_features") and hasattr(model, "patch_size")


def build_body(name: str, pretrained_file: str | None = None, **kwargs) -> nn.Module:
    """A body returning four NCHW maps for the registered model ``name``.

    Single-scale models (one reduction in their ``feature_info``, e.g. DeiT) get a
    :class:`SimpleFeaturePyramid`; the others are built with ``features_only=True``. ``pretrained_file`` is
    an ImageNet checkpoint (ours or the authors'), loaded strictly into the full classification model
    through :func:`slab.create_model` (with the checkpoint's ``head`` size, unless ``num_classes`` is given) and
    then copied into the feature model.
    """
    from .. import create_model
    if pretrained_file is not None and "num_classes" not in kwargs:
        # The checkpoint is loaded strictly: give the classification model the checkpoint's head size.
        from ..models import read_checkpoint
        head = read_checkpoint(pretrained_file).get("head.weight")
        if head is not None:
            kwargs = dict(kwargs, num_classes=int(head.shape[0]))
    full = create_model(name, pretrained_file=pretrained_file, **kwargs)
    if _is_single_scale(full):
        if hasattr(full, "reset_classifier"):
            full.reset_classifier(0)  # the head is not used; fusion then keeps the final norm as an affine
        return SimpleFeaturePyramid(full)
    try:
        body = create_model(name, features_only=True, out_indices=(0, 1, 2, 3), **kwargs)
    except Exception as e:  # noqa: BLE001 - say which model and what is needed
        raise ValueError(f"model '{name}' cannot be a detection backbone: building it with features_only=True "
                         f"failed ({type(e).__name__}: {e})") from e
    if pretrained_file is not None:
        _copy_weights(full, body, name)
    del full
    if len(_feature_info_list(body)) != 4:
        raise ValueError(f"model '{name}' with features_only=True gives {len(_feature_info_list(body))} maps; "
                         f"the detector needs 4 (strides 4, 8, 16, 32)")
    return body


def _copy_weights(full: nn.Module, body: nn.Module, name: str) -> None:
    """Copy the classification model's weights into its feature-extraction form (keys with or without ``model.``)."""
    src = full.state_dict()
    out, missing = {}, []
    for key in body.state_dict():
        for cand in (key, key[len("model."):] if key.startswith("model.") else None, key.replace("_", ".", 1)):
            if cand is not None and cand in src:
                out[key] = src[cand]
                break
        else:
            missing.append(key)
    if missing:
        raise ValueError(f"cannot copy the checkpoint of '{name}' into its feature model: {len(missing)} keys have no "
                         f"counterpart (first: {missing[:5]})")
    body.load_state_dict(out, strict=True)


def _resolve_module(body: nn.Module, path: str) -> nn.Module | None:
    for cand in (path, f"model.{path}", path.replace(".", "_")):
        try:
            return body.get_submodule(cand)
        except AttributeError:
            continue
    return None


def _stage_modules(body: nn.Module) -> list[nn.Module]:
    if hasattr(body, "stage_modules"):
        return body.stage_modules()
    mods = []
    for d in _feature_info_list(body):
        m = _resolve_module(body, d["module"])
        if m is None:
            raise ValueError(f"trainable_layers: cannot find the stage module '{d['module']}' of {type(body).__name__}")
        mods.append(m)
    return mods


def _first_block(net: nn.Module) -> nn.Module | None:
    """The module holding the first attention layer (the first transformer block)."""
    for name, m in net.named_modules():
        if type(m).__name__.endswith("Attention"):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            block = net.get_submodule(parent)
            if isinstance(block, (nn.ModuleList, nn.Sequential)) and "." in parent:
                block = net.get_submodule(parent.rsplit(".", 1)[0])
            return block
    return None


def freeze_stages(body: nn.Module, trainable_layers: int) -> None:
    """Freeze the stem and the first ``4 - trainable_layers`` stages of ``body`` (torchvision's convention).

    ``trainable_layers`` in 0..5: 5 trains everything, 4 freezes the stem (what is registered before the first
    transformer block: patch embedding, position embeddings), k < 4 also the first ``4 - k`` stages, 0 the whole
    pretrained network. Stage ``s`` ends with the last parameter of the module of its ``feature_info`` entry
    (DeiT: its blocks in four groups), so a stage's downsampling layer belongs to it. New layers of a
    :class:`SimpleFeaturePyramid` always train.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    if trainable_layers == 5:
        return
    net = body.vit if isinstance(body, SimpleFeaturePyramid) else body
    params = [p for _, p in net.named_parameters()]
    index = {id(p): i for i, p in enumerate(params)}
    if trainable_layers == 4:
        block = _first_block(net) or _stage_modules(body)[0]
        cut = index[id(next(iter(block.parameters())))]
    elif trainable_layers == 0:
        cut = len(params)
    elif isinstance(body, SimpleFeaturePyramid):  # a group of blocks ends where the next one starts
        cut = index[id(next(iter(_stage_modules(body)[4 - trainable_layers].parameters())))]
    else:
        cut = max(index[id(p)] for p in _stage_modules(body)[3 - trainable_layers].parameters()) + 1
    for p in params[:cut]:
        p.requires_grad_(False)


class SlabBackboneWithFPN(nn.Module):
    """``body`` (four NCHW maps) + torchvision's :class:`FeaturePyramidNetwork`; what MaskRCNN calls ``backbone``.

    Args:
        body: a module returning four maps at strides 4, 8, 16, 32 and carrying ``feature_info``.
        out_channels: FPN channels (256 in Mask R-CNN).
        prepbn: ``'frozen'`` or ``'continue'`` (see the module docstring).
        input_multiple: pad inputs to this multiple (default: the body's ``input_multiple`` if it has one,
            else its largest stride).

    ``forward(x [B, C, H, W]) -> OrderedDict('0'..'3', 'pool')`` of ``[B, out_channels, ceil(H/s), ceil(W/s)]``.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, prepbn: str = "frozen",
                 input_multiple: int | None = None):
        super().__init__()
        if prepbn not in PREPBN_MODES:
            raise ValueError(f"prepbn must be one of {PREPBN_MODES}, got {prepbn!r}")
        info = _feature_info_list(body)
        self.body = body
        self.strides = [int(d["reduction"]) for d in info]
        if input_multiple is None:
            input_multiple = int(getattr(body, "input_multiple", 0) or getattr(inner_model(body), "input_multiple", 0)
                                 or 0)
            input_multiple = math.lcm(input_multiple, max(self.strides)) if input_multiple else max(self.strides)
        self.input_multiple = int(input_multiple)
        self.fpn = FeaturePyramidNetwork([int(d["num_chs"]) for d in info], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.prepbn = prepbn
        if prepbn == "frozen":
            set_prepbn_lambda(self.body, 0.0)
            # The LayerNorm branch of a PRepBN is never used at lam = 0: no gradient, no weight decay.
            for m in self.body.modules():
                if isinstance(m, PRepBN):
                    m.ln.requires_grad_(False)

    def train(self, mode: bool = True) -> "SlabBackboneWithFPN":
        super().train(mode)
        if mode and self.prepbn == "frozen":
            for m in self.body.modules():
                if isinstance(m, _STAT_NORMS):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        h, w = x.shape[-2:]
        m = self.input_multiple
        ph, pw = -h % m, -w % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.body(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        out = OrderedDict()
        for i, (f, s) in enumerate(zip(feats, self.strides)):
            if f.dim() != 4:
                raise ValueError(f"backbone map {i} has shape {tuple(f.shape)}; expected NCHW")
            out[str(i)] = f[..., : -(-h // s), : -(-w // s)]
        return self.fpn(out)


def warn_frozen_untrained(body: nn.Module) -> None:
    """'frozen' on a network whose BatchNorms never saw data normalises with mean 0 / var 1: say so."""
    from ..reparam.fuse import default_statistics_paths
    stale = default_statistics_paths(body)
    if stale:
        warnings.warn(f"prepbn='frozen' keeps BatchNorm statistics fixed, but {len(stale)} BatchNorm(s) still have "
                      f"their initial statistics (e.g. {stale[0]}): load an ImageNet checkpoint "
                      f"(pretrained_backbone=...) or train with prepbn='continue'", stacklevel=3)
