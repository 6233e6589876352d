"""Mask R-CNN (torchvision) with a SLAB backbone and FPN."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch.nn as nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..layers.norm import set_prepbn_lambda
from .backbone import SlabBackboneWithFPN, build_body, freeze_stages, inner_model, warn_frozen_untrained

__all__ = ["maskrcnn", "MultiScaleTransform", "PAPER_TRAIN_SIZES"]

#: Multi-scale training of the paper's 1x schedule: shorter side 480..800 (step 32), longer side <= 1333.
PAPER_TRAIN_SIZES = tuple(range(480, 801, 32))


class MultiScaleTransform(GeneralizedRCNNTransform):
    """torchvision's transform with a separate test size: training picks a shorter side from
    ``min_size`` at random, evaluation resizes to ``test_size`` (torchvision uses the last ``min_size``)."""

    def __init__(self, min_size: Sequence[int], max_size: int, image_mean: list[float], image_std: list[float],
                 size_divisible: int = 32, test_size: int | None = None):
        super().__init__(tuple(min_size), max_size, image_mean, image_std, size_divisible=size_divisible)
        self.test_size = int(test_size if test_size is not None else self.min_size[-1])

    def resize(self, image, target=None):
        if self.training:
            return super().resize(image, target)
        train_sizes, self.min_size = self.min_size, (self.test_size,)
        try:
            return super().resize(image, target)
        finally:
            self.min_size = train_sizes


def _image_stats(body: nn.Module, in_chans: int) -> tuple[list[float], list[float]]:
    net = inner_model(body)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or len(mean) != in_chans:
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if in_chans == 3 else ((0.5,) * in_chans,
                                                                                           (0.5,) * in_chans)
    return list(mean), list(std)


def maskrcnn(backbone_name: str, num_classes: int, pretrained_backbone: str | None = None,
             trainable_layers: int = 5, min_size: int | Sequence[int] = PAPER_TRAIN_SIZES, max_size: int = 1333,
             prepbn: str = "frozen", *, test_size: int | None = None, fpn_channels: int = 256,
             representation_size: int = 1024, mask_layers: Sequence[int] = (256, 256, 256, 256),
             anchor_sizes: Sequence[int] | None = None, detector_kwargs: dict | None = None,
             **backbone_kwargs) -> MaskRCNN:
    """torchvision Mask R-CNN whose backbone is any registered SLAB model (+ FPN).

    Args:
        backbone_name: a registered model (``slab.list_models()``): PVT, PVTv2, Swin, CSwin (through
            ``features_only``) or DeiT / SLAB-DeiT (through a simple feature pyramid).
        num_classes: object classes + 1 (background is class 0, torchvision's convention).
        pretrained_backbone: an ImageNet checkpoint of ours or of the authors (loaded strictly by
            ``slab.create_model(name, pretrained_file=...)``); None starts from random weights.
        trainable_layers: 0..5, stages trained counting from the top (5 = all, torchvision's convention).
        min_size: shorter side(s) for training; a sequence is multi-scale (picked at random per image).
        max_size: longest side bound. test_size: shorter side at evaluation (default: the last ``min_size``).
        prepbn: ``'frozen'`` (PRepBN at lam 0, BN statistics fixed while training) or ``'continue'`` (norms
            train; drive lam with a :class:`slab.PRepBNSchedule` on ``model.backbone``).
        fpn_channels: FPN width (256 in Mask R-CNN). representation_size: box head MLP width (1024).
        mask_layers: channels of the mask head's 3x3 convs (four of 256 in Mask R-CNN).
        anchor_sizes: one anchor size per FPN level (5 levels; default 32..512).
        detector_kwargs: further :class:`torchvision.models.detection.MaskRCNN` arguments (RPN/ROI settings).
        **backbone_kwargs: architecture overrides for the backbone (``norm=``, ``embed_dim=``, ``img_size=``, ...).

    Returns:
        a ``MaskRCNN`` with ``model.backbone`` a :class:`SlabBackboneWithFPN`; ``slab.fuse(model)`` folds the
        backbone's norms and leaves torchvision's heads as they are.
    """
    sizes = (int(min_size),) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
    body = build_body(backbone_name, pretrained_file=pretrained_backbone, **backbone_kwargs)
    if prepbn == "frozen":
        if pretrained_backbone is None:
            warn_frozen_untrained(body)
    elif pretrained_backbone is None and trainable_layers < 5:
        warnings.warn("trainable_layers < 5 without pretrained_backbone freezes random weights", stacklevel=2)
    freeze_stages(body, trainable_layers)
    backbone = SlabBackboneWithFPN(body, out_channels=fpn_channels, prepbn=prepbn)
    if prepbn == "continue" and pretrained_backbone is not None:
        set_prepbn_lambda(body, 0.0)  # the ImageNet run ended its transition: continue from RepBN only
    kwargs = dict(detector_kwargs or {})
    if anchor_sizes is not None:
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5), got {list(anchor_sizes)}")
        kwargs.setdefault("rpn_anchor_generator", AnchorGenerator(tuple((int(a),) for a in anchor_sizes),
                                                                  ((0.5, 1.0, 2.0),) * 5))
    kwargs.setdefault("box_head", TwoMLPHead(fpn_channels * 7 * 7, representation_size))
    if "box_predictor" not in kwargs:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
        kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
        num_classes_arg = None
    else:
        num_classes_arg = num_classes
    kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, tuple(mask_layers), 1))
    if "mask_predictor" not in kwargs:
        from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
        kwargs["mask_predictor"] = MaskRCNNPredictor(mask_layers[-1], 256, num_classes)
    in_chans = _in_chans(body)
    mean, std = _image_stats(body, in_chans)
    model = MaskRCNN(backbone, num_classes=num_classes_arg, min_size=sizes, max_size=max_size,
                     image_mean=mean, image_std=std, **kwargs)
    model.transform = MultiScaleTransform(sizes, max_size, mean, std,
                                          size_divisible=math.lcm(32, backbone.input_multiple), test_size=test_size)
    # What rebuilds this detector (train-det checkpoints carry it).
    model.slab_config = dict(backbone=backbone_name, num_classes=num_classes, trainable_layers=trainable_layers,
                             min_size=list(sizes), max_size=max_size, prepbn=prepbn, test_size=model.transform.test_size,
                             fpn_channels=fpn_channels, representation_size=representation_size,
                             mask_layers=list(mask_layers),
                             anchor_sizes=list(anchor_sizes) if anchor_sizes is not None else None,
                             backbone_kwargs=dict(backbone_kwargs))
    return model


def _in_chans(body: nn.Module) -> int:
    net = inner_model(body)
    if hasattr(net, "in_chans"):
        return int(net.in_chans)
    first_conv = next((m for m in body.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3


def detector_from_config(cfg: dict) -> MaskRCNN:
    """Rebuild a detector from ``model.slab_config`` (weights not loaded)."""
    cfg = dict(cfg)
    backbone_kwargs = cfg.pop("backbone_kwargs", {}) or {}
    name, num_classes = cfg.pop("backbone"), cfg.pop("num_classes")
    if cfg.get("anchor_sizes") is None:
        cfg.pop("anchor_sizes", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return maskrcnn(name, num_classes, **cfg, **backbone_kwargs)
