"""Train and evaluate a SLAB Mask R-CNN on COCO-format data (``slab train-det``).

One process, or DDP when launched by ``torchrun`` (``WORLD_SIZE > 1``): each process trains on its shard
of the images, rank 0 evaluates and writes. The PRepBN schedule (``prepbn: continue``) is driven from the
optimizer step; ``frozen`` keeps lam at 0 and BN statistics fixed.

Writes to ``output``: ``config.yaml``, ``log.txt``, ``checkpoint.pth`` (model, optimizer, schedules, step;
``--resume`` continues from it), ``model.pth`` (the detector's state_dict and ``slab_config``) and
``metrics.json`` (box/mask mAP per evaluation, the fused model's at the end, times).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import UserError, check_output_dir
from ..files import require_file, torch_load
from ..train.checkpoint import atomic_save
from ..train.distributed import setup_distributed, teardown_distributed
from .config import DEFAULTS, merge_config
from .backbone import inner_model
from .data import CocoInstances, collate, resolve_split
from .evaluate import evaluate
from .model import maskrcnn

__all__ = ["train_detector", "build_optimizer", "lr_lambda", "load_detector"]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norm parameters, RepBN alphas, position embeddings/encodings."""
    skip = set()
    body = model.backbone.body
    net = inner_model(body)
    if hasattr(net, "no_weight_decay"):
        skip = set(net.no_weight_decay())
    prefix = {id(p): n for n, p in net.named_parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        own = prefix.get(id(p), "")
        if p.ndim <= 1 or own in skip or name.endswith(("pos_embed", "positional_encoding", "cls_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))


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
DETECTOR_FIX = "Give OUTPUT/model.pth or OUTPUT/checkpoint.pth of a `slab train-det` run"


def load_detector(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """A detector saved by ``slab train-det`` (``model.pth`` or ``checkpoint.pth``), in eval mode."""
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


class _Logger:
    def __init__(self, path: Path | None, append: bool = False):
        self.file = open(path, "a" if append else "w") if path is not None else None

    def __call__(self, msg: str) -> None:
        if self.file is None:
            return
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


def _metrics_line(tag: str, m: dict) -> str:
    return (f"{tag}: box mAP {m['bbox']['mAP']:.4f} (AP50 {m['bbox']['mAP_50']:.4f}), mask mAP {m['segm']['mAP']:.4f} "
            f"(AP50 {m['segm']['mAP_50']:.4f}) on {m['images']} images in {m['seconds']:.1f}s")


def train_detector(cfg: dict | None = None, resume: bool = False, eval_only: str | None = None) -> dict:
    """Train (``cfg`` from :func:`slab.detection.config.load_config`) and return the final metrics.

    ``eval_only``: path of a saved detector to evaluate on the val split instead of training.
    """
    cfg = merge_config(DEFAULTS, cfg or {}, "train_detector")
    if not cfg["data"]:
        raise ValueError("no data: give --data DIR (a COCO-format folder; `slab data fmnist-scenes` makes one)")
    out = Path(cfg["output"])
    if eval_only:
        require_file(eval_only, "--eval-only detector")
    info = setup_distributed(None if cfg["device"] == "auto" else cfg["device"])
    world, rank, device = info.world_size, info.rank, info.device
    torch.manual_seed(cfg["seed"] + rank)
    # Every input is checked before the output folder is made: a refused run leaves nothing behind.
    val_set = CocoInstances(*resolve_split(cfg["data"], cfg["val_split"]), train=False, in_chans=cfg["in_chans"])
    if rank == 0:
        check_output_dir(out)
    if eval_only:
        model = load_detector(eval_only).to(device)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        log = _Logger(out / "log.txt" if rank == 0 else None, append=True)
        metrics = evaluate(model, val_set, device, cfg["eval_batch_size"])
        log(_metrics_line(f"eval {eval_only}", metrics))
        log(metrics["summary"].rstrip())
        teardown_distributed(info)
        return metrics

    train_set = CocoInstances(*resolve_split(cfg["data"], cfg["train_split"]), train=True, hflip=cfg["hflip"],
                              in_chans=cfg["in_chans"])
    if train_set.cat_ids != val_set.cat_ids:
        raise ValueError(f"train and val have different categories ({train_set.cat_ids} vs {val_set.cat_ids})")
    if len(train_set) == 0:
        raise UserError(f"the {cfg['train_split']!r} split of {cfg['data']} has no image with a usable annotation "
                        f"(a non-crowd box at least 1 pixel wide and high): nothing to train on")
    model = _build_model(cfg, train_set.num_classes).to(device)
    sampler = torch.utils.data.DistributedSampler(train_set, shuffle=True, seed=cfg["seed"]) if world > 1 else None
    gen = torch.Generator().manual_seed(cfg["seed"])
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=sampler is None,
                                         sampler=sampler, num_workers=cfg["num_workers"], collate_fn=collate,
                                         drop_last=True, generator=gen, persistent_workers=cfg["num_workers"] > 0)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images for batch size {cfg['batch_size']} x {world} processes")
    total_steps = int(cfg["max_steps"]) if cfg["max_steps"] else int(cfg["epochs"]) * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = build_optimizer(model, cfg["lr"], cfg["weight_decay"], cfg["betas"])
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        total_steps, _milestones(cfg, steps_per_epoch, total_steps), cfg["lr_gamma"], cfg["warmup_iters"],
        cfg["warmup_ratio"]))
    prepbn = _prepbn_schedule(model, cfg, total_steps)
    step, start_epoch, history = 0, 0, []
    ckpt_path = out / "checkpoint.pth"
    resumed = resume and ckpt_path.is_file()
    if resumed:
        ck = torch_load(ckpt_path, "Delete it to start again, or restore it (the run keeps only this one)",
                        map_location=device)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        lr_sched.load_state_dict(ck["lr_scheduler"])
        if prepbn is not None and ck.get("prepbn") is not None:
            prepbn.load_state_dict(ck["prepbn"])
        step, history = int(ck["step"]), ck.get("history", [])
        start_epoch = step // steps_per_epoch
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log = _Logger(out / "log.txt" if rank == 0 else None, append=resume)
    if resume:
        log(f"resumed from {ckpt_path} at step {step}" if resumed
            else f"--resume: no {ckpt_path} yet, starting from step 0")
    if rank == 0:
        import yaml
        (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"train-det: {cfg['backbone']} ({n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained), "
        f"{len(train_set)} train / {len(val_set)} val images, {train_set.num_classes - 1} classes, "
        f"{total_steps} steps ({steps_per_epoch}/epoch x {world} process(es)), prepbn={cfg['prepbn']}, device {device}")

    def save() -> None:
        if rank != 0:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": lr_sched.state_dict(), "prepbn": prepbn.state_dict() if prepbn else None,
                 "step": step, "history": history, "slab_config": model.slab_config}
        atomic_save(state, ckpt_path)
        atomic_save({"model": model.state_dict(), "slab_config": model.slab_config}, out / "model.pth")

    def run_eval(tag: str, net: nn.Module) -> dict:
        m = evaluate(net, val_set, device, cfg["eval_batch_size"])
        log(_metrics_line(tag, m))
        log(m.pop("summary").rstrip())
        return m

    train_start = time.perf_counter()
    tic = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        skip = step - epoch * steps_per_epoch
        for i, (images, targets) in enumerate(loader):
            if i < skip:
                continue
            if step >= total_steps:
                break
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            losses = ddp(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: {({k: v.item() for k, v in losses.items()})}"
                                         f"; lower the lr or use prepbn_transition of about 0.8")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            lr_sched.step()
            step += 1
            if prepbn is not None:
                prepbn.step()
            if step % cfg["log_every"] == 0 or step == total_steps:
                dt = time.perf_counter() - tic
                tic = time.perf_counter()
                parts = " ".join(f"{k[5:] if k.startswith('loss_') else k} {v.item():.3f}" for k, v in losses.items())
                lam = f" lam {prepbn.lam:.3f}" if prepbn is not None else ""
                log(f"epoch {epoch + 1} step {step}/{total_steps} loss {loss.item():.3f} ({parts}) "
                    f"lr {optimizer.param_groups[0]['lr']:.2e}{lam} {dt / cfg['log_every']:.2f}s/step")
        last = step >= total_steps
        if rank == 0 and (last or (cfg["eval_every"] and (epoch + 1) % cfg["eval_every"] == 0)):
            history.append({"epoch": epoch + 1, "step": step, **run_eval(f"epoch {epoch + 1}", model)})
            model.train()
        save()
        if world > 1:
            dist.barrier()
        if last:
            break
    train_seconds = time.perf_counter() - train_start
    result = {"backbone": cfg["backbone"], "steps": step, "train_seconds": train_seconds,
              "final": history[-1] if history else None, "history": history}
    if rank == 0 and cfg["eval_fused"]:
        from ..reparam.fuse import fuse
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fused = fuse(model)
        except ValueError as e:  # e.g. a LayerNorm baseline: nothing to fold
            log(f"fused evaluation skipped: {e}")
        else:
            result["fused"] = run_eval("fused", fused)
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        log(f"done in {train_seconds:.0f}s; metrics in {out / 'metrics.json'}, detector in {out / 'model.pth'}")
    teardown_distributed(info)
    return result
