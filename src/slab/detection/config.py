"""Settings of ``slab train-det``: defaults (the paper's 1x schedule), YAML files, command-line overrides."""
from __future__ import annotations

import copy
import os
from pathlib import Path

from ..errors import UserError
from ..files import load_yaml_file, load_yaml_value

__all__ = ["DEFAULTS", "load_config", "merge_config", "parse_override"]

# The paper's Mask R-CNN setting (mmdet 1x): 12 epochs, lr x0.1 after epochs 8 and 11, AdamW lr 1e-4 wd 0.05,
# multi-scale training with the shorter side in 480..800 (longer <= 1333), test at 800, 16 images per step.
DEFAULTS: dict = {
    "backbone": "slab_deit_tiny_patch16_224",
    "backbone_kwargs": {},
    "pretrained": None,            # ImageNet checkpoint (ours or the authors') for the backbone
    "prepbn": "frozen",            # 'frozen' or 'continue'
    "prepbn_warmup": 0.0,          # 'continue': steps with lam = 1 (fraction of the total steps if < 1)
    "prepbn_transition": None,     # 'continue': T as a fraction of the steps (None: 0.8 from scratch, 0 pretrained)
    "trainable_layers": 5,
    "data": None,
    "train_split": "train",
    "val_split": "val",
    "in_chans": 3,
    "min_size": list(range(480, 801, 32)),
    "max_size": 1333,
    "test_size": 800,
    "hflip": 0.5,
    "fpn_channels": 256,
    "representation_size": 1024,
    "mask_layers": [256, 256, 256, 256],
    "anchor_sizes": None,          # one per FPN level; None = torchvision's 32..512
    "detector": {},                # further torchvision MaskRCNN arguments (RPN / ROI sampling)
    "epochs": 12,
    "max_steps": None,             # stop after this many optimizer steps (overrides epochs for the schedules)
    "batch_size": 2,               # per process (the paper: 2 per GPU x 8 GPUs)
    "lr": 1.0e-4,
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "lr_steps": [8, 11],           # epochs after which lr is multiplied by lr_gamma (fractions of max_steps if set)
    "lr_gamma": 0.1,
    "warmup_iters": 500,
    "warmup_ratio": 0.001,
    "grad_clip": None,
    "num_workers": 2,
    "eval_batch_size": 2,
    "eval_every": 1,               # epochs between evaluations (0: only at the end)
    "eval_fused": True,            # also evaluate slab.fuse(model) at the end
    "log_every": 20,
    "seed": 0,
    "device": "auto",
    "output": "outputs/det",
}


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with a YAML value (``lr=2e-4``, ``min_size=[96,128]``, ``backbone_kwargs={depth: 4}``).

    Mapping values (``backbone_kwargs``, ``detector``) update the mapping already set rather than replace it.
    """
    if "=" not in text:
        raise UserError(f"--set must look like key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), load_yaml_value(value, f"--set {text}")


def merge_config(base: dict, updates: dict, source: str) -> dict:
    out = copy.deepcopy(base)
    unknown = sorted(set(updates) - set(DEFAULTS))
    if unknown:
        import difflib
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, DEFAULTS, 1)) else k
                 for k in unknown]
        raise ValueError(f"{source}: unknown setting(s) {', '.join(hints)}; known: {', '.join(sorted(DEFAULTS))}")
    for key, value in copy.deepcopy(updates).items():
        # Mappings (backbone_kwargs, detector) are merged key by key; anything else is replaced.
        out[key] = {**out[key], **value} if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def _find_config(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    # A bare name (``det_maskrcnn_1x``) is looked up in the repository's configs/ folder.
    repo_configs = Path(__file__).resolve().parents[3] / "configs"
    for cand in (repo_configs / path, repo_configs / f"{path}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config file not found: {path}")


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> dict:
    """DEFAULTS, updated by the YAML file ``path`` and then by ``overrides`` (None values are ignored)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        file = _find_config(os.fspath(path))
        cfg = merge_config(cfg, load_yaml_file(file), str(file))
    if overrides:
        cfg = merge_config(cfg, {k: v for k, v in overrides.items() if v is not None}, "command line")
    return cfg
