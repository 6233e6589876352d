"""Training: :class:`TrainConfig`, :func:`train`, :func:`evaluate`, :func:`recalibrate_bn`, checkpoints.

Quick start (Fashion-MNIST, CPU, a minute)::

    from slab.train import TrainConfig, train
    result = train(TrainConfig(model="slab_deit_nano_patch4_28", data="fashion-mnist", max_steps=200))
    result.final["top1"], result.history[-1]["loss"]
"""
from .checkpoint import atomic_save, find_resume_checkpoint, load_checkpoint
from .config import TrainConfig
from .distributed import DistInfo, setup_distributed
from .evaluate import evaluate, recalibrate_bn
from .task import (NonFiniteLossError, TrainResult, build_loaders, build_model, load_trained_model,
                   recalibration_loader, train)

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "recalibrate_bn", "NonFiniteLossError", "build_model",
           "build_loaders", "load_trained_model", "recalibration_loader", "atomic_save", "load_checkpoint",
           "find_resume_checkpoint", "DistInfo", "setup_distributed"]
