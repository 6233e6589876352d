"""Detection and instance segmentation with SLAB backbones: torchvision Mask R-CNN + FPN, COCO data and metrics.

* :func:`maskrcnn` builds the detector for any registered backbone;
* :mod:`slab.detection.data` reads COCO-format data, :mod:`slab.detection.evaluate` computes COCO box/mask mAP;
* :mod:`slab.detection.scenes` writes a real COCO-format dataset from Fashion-MNIST items;
* :mod:`slab.detection.engine` trains and evaluates (``slab train-det``).
"""
from .backbone import FEATURE_STRIDES, PREPBN_MODES, SimpleFeaturePyramid, SlabBackboneWithFPN, build_body
from .model import PAPER_TRAIN_SIZES, MultiScaleTransform, detector_from_config, maskrcnn

__all__ = ["FEATURE_STRIDES", "PREPBN_MODES", "SimpleFeaturePyramid", "SlabBackboneWithFPN", "build_body",
           "PAPER_TRAIN_SIZES", "MultiScaleTransform", "detector_from_config", "maskrcnn"]
