"""``slab.fuse``: turn a trained model into an equivalent norm-free eval model.

Convention (RepVGG/timm ``reparameterize_model``): a module with a ``fuse()`` method folds the norms
it owns into its own Linear/Conv layers and returns the module that replaces it (usually itself).
The walker visits parents before children, so the module that owns both a norm and its consumer
does the fold. Anything normalising that is left afterwards is an error naming its path.
"""
from __future__ import annotations

import copy
import warnings

import torch.nn as nn

from .fold import NORM_TYPES


def _walk(module: nn.Module) -> nn.Module:
    if hasattr(module, "fuse") and callable(module.fuse):
        module = module.fuse()
    for name, child in list(module.named_children()):
        new = _walk(child)
        if new is not child:
            setattr(module, name, new)
    return module


def default_statistics_paths(model: nn.Module) -> list[str]:
    """Paths of BatchNorms whose running statistics were never updated (mean 0, var 1)."""
    paths = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None:
            if int(m.num_batches_tracked) == 0 and not m.running_mean.any() and bool((m.running_var == 1).all()):
                paths.append(name)
    return paths


def remaining_norms(model: nn.Module) -> list[str]:
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def fuse(model: nn.Module, inplace: bool = False, warn_default_stats: bool = True) -> nn.Module:
    """Return an eval-mode model computing the same function with every norm folded away.

    Args:
        model: a SLAB model (any family) built with a foldable norm ('prepbn', 'repbn', 'bn', 'none').
        inplace: fold ``model`` itself instead of a deep copy (the input is untouched by default).
        warn_default_stats: warn when a BatchNorm still has its initial statistics (mean 0, var 1):
            usually a model that was never trained or recalibrated.

    Raises:
        ValueError: a normalization module is left that no block knows how to fold (its path is named),
            or the model uses a norm that cannot be folded (LayerNorm).
    """
    if model.training and inplace:
        raise ValueError("fuse(inplace=True) on a model in training mode: call model.eval() first, or fuse a copy "
                         "with fuse(model) (the default), which works on an eval copy")
    if warn_default_stats:
        stale = default_statistics_paths(model)
        if stale:
            warnings.warn(f"{len(stale)} BatchNorm layer(s) still have their initial running statistics "
                          f"(e.g. {stale[0]}): the model was probably never trained or recalibrated "
                          f"(see `slab recalibrate`)", stacklevel=2)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    model = _walk(model)
    left = remaining_norms(model)
    if left:
        raise ValueError("fuse: normalization modules remain that no block knows how to fold: " + ", ".join(left[:10])
                         + ("" if len(left) <= 10 else f" (+{len(left) - 10} more)")
                         + ". Give their owner a fuse() method (see slab/reparam/fold.py).")
    model.eval()
    setattr(model, "is_fused", True)
    return model
