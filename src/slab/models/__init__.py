"""Model families (one file each), registered with timm on import, and the authors' checkpoint mapping."""
from __future__ import annotations

import os

import torch.nn as nn

from . import cswin, deit, pvt, pvt_v2, swin
from ..errors import UserError
from ..files import is_fused_checkpoint
from ._builder import (load_checkpoint_strict, model_arguments, model_kwargs_error, read_checkpoint, slab_model_names,
                       unknown_model_error)

_FAMILIES = (deit, pvt, pvt_v2, swin, cswin)

#: Each of the authors' 12 released files -> the registered model that loads it.
AUTHORS_CHECKPOINTS: dict[str, str] = {}
_AUTHORS_CLASSES: dict = {}
for _fam in _FAMILIES:
    AUTHORS_CHECKPOINTS.update(getattr(_fam, "AUTHORS_CHECKPOINTS", {}))
    _AUTHORS_CLASSES.update(getattr(_fam, "AUTHORS_CLASSES", {}))


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered SLAB models (fnmatch ``pattern``)."""
    import fnmatch
    return [n for n in slab_model_names() if fnmatch.fnmatch(n, pattern)]


def create_model(name: str, pretrained_file: str | os.PathLike | None = None, deploy: bool = False,
                 **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: a registered name (``slab.list_models()``), e.g. ``'slab_deit_tiny_patch16_224'``.
        pretrained_file: a local checkpoint: the authors' ``.pth`` (with or without its ``"model"``
            wrapper) or one of ours (``.pth``/``.safetensors``). Loaded strictly through the family's
            ``checkpoint_filter_fn``; nothing is downloaded.
        deploy: build the fused (norm-free) architecture, so a checkpoint written by ``slab fuse``
            loads into it. Loading happens after the architecture is made deploy-form.
        **kwargs: architecture overrides (``norm=``, ``attn=``, ``num_classes=``, ``img_size=``, ...).
    """
    import timm
    names = slab_model_names()
    if name not in names:
        raise unknown_model_error(name, names)
    if pretrained_file is not None and not deploy and is_fused_checkpoint(pretrained_file):
        raise UserError(f"{pretrained_file} is a fused deploy checkpoint written by `slab fuse`: load it with "
                        f"create_model({name!r}, deploy=True, pretrained_file=...) or slab.reparam.export.load_fused, "
                        f"or give it to the commands as --fused")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        error = model_kwargs_error(name, kwargs, e)
        if error is None:
            raise
        raise error from None
    if deploy:
        from ..reparam.fuse import fuse
        model = fuse(model, inplace=True, warn_default_stats=False) if not model.training else \
            fuse(model.eval(), inplace=True, warn_default_stats=False)
    if pretrained_file is not None:
        load_checkpoint_strict(model, read_checkpoint(pretrained_file), name)
    return model


def load_authors_model(record: dict, state_dict: dict) -> nn.Module:
    """Build our equivalent of the authors' model described by ``record`` and load ``state_dict`` into it.

    ``record`` is a fixture JSON: ``{"authors_class": "slab_pvt.PyramidVisionTransformer", "constructor":
    {...their argument names...}, ...}``. Returns the model in eval mode.
    """
    cls = record.get("authors_class")
    if cls not in _AUTHORS_CLASSES:
        raise ValueError(f"unknown authors' class {cls!r}; known: {sorted(_AUTHORS_CLASSES)}")
    model = _AUTHORS_CLASSES[cls](record)
    from ._authors import unwrap_checkpoint
    load_checkpoint_strict(model, unwrap_checkpoint(state_dict), cls)
    return model.eval()


__all__ = ["AUTHORS_CHECKPOINTS", "create_model", "list_models", "load_authors_model", "model_arguments",
           "read_checkpoint"]
