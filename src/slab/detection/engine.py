"""Train and evaluate a SLAB Mask R-CNN on COCO-format data (``slab train-det``).

Training is :class:`slab.detection.task.DetectionTask` run by :class:`slab.engine.Trainer`: one process,
or DDP when launched by ``torchrun`` (``WORLD_SIZE > 1``): each process trains on its shard of the images,
rank 0 evaluates and writes. The PRepBN schedule (``prepbn: continue``) is driven from the optimizer step;
``frozen`` keeps lam at 0 and BN statistics fixed.

Writes to ``output``: ``config.yaml``, ``log.txt``, ``metrics.jsonl`` (one line per step and evaluation),
``checkpoints/step_*.pt`` (every epoch or ``save_every`` steps; ``--resume auto`` continues from the newest),
``model.pth`` (the detector's state_dict and ``slab_config``) and ``metrics.json`` (box/mask mAP per
evaluation, the fused model's at the end, times).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..engine.optim import weight_decay_groups
from ..errors import UserError, check_output_dir
from ..files import require_file, torch_load
from .backbone import inner_model
from .config import DEFAULTS, merge_config
from .data import CocoInstances, resolve_split
from .evaluate import evaluate
from .model import maskrcnn

__all__ = ["train_detector", "build_optimizer", "lr_lambda", "load_detector"]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norm parameters, RepBN alphas, position embeddings/encodings."""
    net = inner_model(model.backbone.body)
    skip = set(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else set()
    own_name = {id(p): n for n, p in net.named_parameters()}  # the backbone's names, as no_weight_decay gives them

    def no_decay(name: str, p: nn.Parameter) -> bool:
        return own_name.get(id(p), "") in skip or name.endswith(("pos_embed", "positional_encoding", "cls_token"))
    return torch.optim.AdamW(weight_decay_groups(model.named_parameters(), weight_decay, no_decay), lr=lr,
                             betas=tuple(betas))


def lr_lambda(total_steps: int, milestones: list[int], gamma: float, warmup_iters: int, warmup_ratio: float):
    """Step -> lr factor: linear warm-up from ``warmup_ratio``, then x``gamma`` after each milestone step."""
    warmup_iters = min(warmup_iters, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        f = gamma ** sum(step >= m for m in milestones)
        if step < warmup_iters:
            f *= warmup_ratio + (1 - warmup_ratio) * step / warmup_iters
        return f
    return factor


def _milestones(cfg: dict, steps_per_epoch: int, total_steps: int) -> list[int]:
    if cfg["max_steps"]:
        # lr_steps are epochs of the 1x schedule: keep their place relative to the run's length.
        return [int(round(total_steps * e / cfg["epochs"])) for e in cfg["lr_steps"]]
    return [int(e * steps_per_epoch) for e in cfg["lr_steps"]]


def _prepbn_schedule(model: nn.Module, cfg: dict, total_steps: int):
    from ..layers.norm import PRepBN
    from ..schedule import PRepBNSchedule
    body = model.backbone.body
    if cfg["prepbn"] != "continue" or not any(isinstance(m, PRepBN) for m in body.modules()):
        return None
    warm = cfg["prepbn_warmup"] or 0
    warm = int(round(warm * total_steps)) if warm < 1 else int(warm)
    frac = cfg["prepbn_transition"]
    if frac is None:
        frac = 0.0 if cfg["pretrained"] else 0.8
    transition = min(int(math.floor(frac * total_steps)), total_steps - warm)
    return PRepBNSchedule(body, total_steps, warmup_steps=warm, transition_steps=transition)


def _build_model(cfg: dict, num_classes: int) -> nn.Module:
    return maskrcnn(cfg["backbone"], num_classes, pretrained_backbone=cfg["pretrained"],
                    trainable_layers=cfg["trainable_layers"], min_size=cfg["min_size"], max_size=cfg["max_size"],
                    prepbn=cfg["prepbn"], test_size=cfg["test_size"], fpn_channels=cfg["fpn_channels"],
                    representation_size=cfg["representation_size"], mask_layers=cfg["mask_layers"],
                    anchor_sizes=cfg["anchor_sizes"], detector_kwargs=cfg["detector"], **cfg["backbone_kwargs"])


#: what to do about a detector file that cannot be read
DETECTOR_FIX = "Give OUTPUT/model.pth or OUTPUT/checkpoints/step_*.pt of a `slab train-det` run"


def load_detector(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """A detector saved by ``slab train-det`` (``model.pth`` or a ``checkpoints/step_*.pt``), in eval mode."""
    from .model import detector_from_config
    obj = torch_load(path, DETECTOR_FIX, "detector", map_location=map_location)
    if not isinstance(obj, dict) or "slab_config" not in obj or "model" not in obj:
        raise UserError(f"{path} is not a detector saved by `slab train-det` (no 'model' and 'slab_config' "
                        f"entries). {DETECTOR_FIX}")
    cfg = dict(obj["slab_config"])
    cfg["pretrained_backbone"] = None
    model = detector_from_config(cfg)
    model.load_state_dict(obj["model"])
    return model.eval()


def train_detector(cfg: dict | None = None, resume: bool | str = False, eval_only: str | None = None,
                   **run) -> dict:
    """Train (``cfg`` from :func:`slab.detection.config.load_config`) and return the final metrics.

    ``resume``: ``'auto'`` (or True) continues from the newest checkpoint of ``cfg['output']``, a path
    from that file. ``eval_only``: path of a saved detector to evaluate on the val split instead of
    training. ``run``: further :class:`slab.engine.TrainerArgs` (``save_every``, ``stop_at_step``, ``threads``).
    """
    from ..engine import Trainer, TrainerArgs
    from ..engine.distributed import setup_distributed, teardown_distributed
    from .task import DetectionTask, Logger, metrics_line
    cfg = merge_config(DEFAULTS, cfg or {}, "train_detector")
    if not cfg["data"]:
        raise ValueError("no data: give --data DIR (a COCO-format folder; `slab data fmnist-scenes` makes one)")
    out = Path(cfg["output"])
    if eval_only:
        require_file(eval_only, "--eval-only detector")
    info = setup_distributed(None if cfg["device"] == "auto" else cfg["device"])
    try:
        # Every input is checked before the output folder is made: a refused run leaves nothing behind.
        val_set = CocoInstances(*resolve_split(cfg["data"], cfg["val_split"]), train=False, in_chans=cfg["in_chans"])
        if eval_only:
            return _evaluate_only(eval_only, val_set, cfg, info)
        resume = "auto" if resume is True else (resume or None)
        task = DetectionTask(cfg, val_set, resume=bool(resume))
        args = TrainerArgs(output=str(out), resume=resume, seed=cfg["seed"], clip_grad=cfg["grad_clip"] or None,
                           log_every=cfg["log_every"], progress=False,
                           device=None if cfg["device"] == "auto" else cfg["device"], **run)
        result = Trainer(task, args).train()
        if result.stopped_early:
            return {"backbone": cfg["backbone"], "steps": result.steps, "stopped_early": True}
        summary = {"backbone": cfg["backbone"], "steps": result.steps, "train_seconds": result.elapsed_s,
                   "final": task.history[-1] if task.history else None, "history": task.history}
        if info.is_main:
            _finish_report(task, summary, cfg, out, Logger(out / "log.txt", append=True), metrics_line)
        return summary
    finally:
        teardown_distributed(info)


def _evaluate_only(path: str, val_set, cfg: dict, info) -> dict:
    from .task import Logger, metrics_line
    model = load_detector(path).to(info.device)
    out = Path(cfg["output"])
    if info.is_main:
        check_output_dir(out)
        out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "log.txt" if info.is_main else None, append=True)
    metrics = evaluate(model, val_set, info.device, cfg["eval_batch_size"])
    log(metrics_line(f"eval {path}", metrics))
    log(metrics["summary"].rstrip())
    return metrics


def _finish_report(task, summary: dict, cfg: dict, out: Path, log, metrics_line) -> None:
    """On rank 0: the fused detector's evaluation (``eval_fused``) and ``metrics.json``."""
    if cfg["eval_fused"]:
        from ..reparam.fuse import fuse
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fused = fuse(task.model)
        except ValueError as e:  # e.g. a LayerNorm baseline: nothing to fold
            log(f"fused evaluation skipped: {e}")
        else:
            m = evaluate(fused, task.val_set, task.dist.device, cfg["eval_batch_size"])
            log(metrics_line("fused", m))
            log(m.pop("summary").rstrip())
            summary["fused"] = m
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    log(f"done in {summary['train_seconds']:.0f}s; metrics in {out / 'metrics.json'}, detector in {out / 'model.pth'}")
    log.close()
