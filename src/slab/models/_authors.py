"""Shared pieces for loading the authors' checkpoints (key renames every family needs)."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..layers.norm import PRepBN, RepBN, TokenBatchNorm

# Buffers of the authors' progressive norm that drive their forward-counting schedule; ours is
# driven by the optimizer step (slab.PRepBNSchedule), so they carry nothing we load.
AUTHORS_SCHEDULE_BUFFERS = ("warm", "iter", "total_step")


def unwrap_checkpoint(obj) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint object (``{"model": ...}``, ``{"state_dict": ...}`` or bare)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state", "module"):
            if key in obj and isinstance(obj[key], dict):
                return unwrap_checkpoint(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError("checkpoint does not contain a state_dict (expected a dict of tensors, optionally under 'model')")
    out = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return out


def remap_norm_keys(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the authors' norm keys to ours, for every norm module of ``model``.

    * progressive norm ``P.norm1.*`` (LN) -> ``P.ln.*``, ``P.norm2.{alpha,bn.*}`` -> ``P.repbn.*``;
      ``P.{warm,iter,total_step}`` dropped;
    * a plain RepBN ``P.{alpha,bn.*}`` loaded into our PRepBN -> ``P.repbn.*`` (LN keys then missing:
      only valid for a model that is used in eval, so we refuse it unless the model is a RepBN one);
    * a plain RepBN into our RepBN: unchanged.
    """
    out = dict(state_dict)
    for path, module in model.named_modules():
        if not path:
            continue
        p = path + "."
        if isinstance(module, PRepBN):
            for key in list(out):
                if not key.startswith(p):
                    continue
                rest = key[len(p):]
                if rest in AUTHORS_SCHEDULE_BUFFERS:
                    del out[key]
                elif rest.startswith("norm1."):
                    out[p + "ln." + rest[len("norm1."):]] = out.pop(key)
                elif rest.startswith("norm2."):
                    out[p + "repbn." + rest[len("norm2."):]] = out.pop(key)
        elif isinstance(module, TokenBatchNorm):
            for key in list(out):
                if key.startswith(p) and key[len(p):] in AUTHORS_SCHEDULE_BUFFERS:
                    del out[key]
    return out


def drop_keys(state_dict: dict[str, torch.Tensor], patterns: list[str]) -> dict[str, torch.Tensor]:
    """Remove keys matching any regex in ``patterns`` (buffers we recompute, e.g. Swin's index/mask)."""
    rx = [re.compile(p) for p in patterns]
    return {k: v for k, v in state_dict.items() if not any(r.search(k) for r in rx)}


def authors_norm_kind(constructor: dict) -> str:
    """Our ``norm=`` for the ``norm`` string of a fixture record ("LinearNorm(LayerNorm..., RepBN)", "RepBN")."""
    text = str(constructor.get("norm", "")).lower()
    if "linearnorm" in text or "prepbn" in text or "progressive" in text:
        return "prepbn"
    if "repbn" in text:
        return "repbn"
    if "batchnorm" in text:
        return "bn"
    return "ln"


def authors_ln_eps(constructor: dict, default: float) -> float:
    m = re.search(r"eps\s*([0-9.eE+-]+)", str(constructor.get("norm", "")))
    return float(m.group(1)) if m else default


RELEASE_URL = "https://github.com/xinghaochen/SLAB/releases/download/ckpts/"


def authors_cfg(file: str | None, first_conv: str, crop_pct: float, pool_size=None, **kwargs) -> dict:
    """A timm pretrained_cfg for an ImageNet model of the paper; ``file`` is the authors' release, if any."""
    return {"url": RELEASE_URL + file if file else "", "file": file, "num_classes": 1000, "input_size": (3, 224, 224),
            "pool_size": pool_size, "crop_pct": crop_pct, "interpolation": "bicubic",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "first_conv": first_conv,
            "classifier": "head", "paper_ids": "arXiv:2405.11582", "origin_url": "https://github.com/xinghaochen/SLAB",
            **kwargs}


__all__ = ["authors_cfg", "RELEASE_URL", "AUTHORS_SCHEDULE_BUFFERS", "unwrap_checkpoint", "remap_norm_keys", "drop_keys", "authors_norm_kind",
           "authors_ln_eps", "RepBN"]
