"""Mask R-CNN detection as a task of :class:`slab.engine.Trainer` (``slab train-det``)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from ..data import ResumableDistributedSampler
from ..engine.checkpoint import atomic_save
from ..engine.distributed import DistInfo
from ..engine.optim import LambdaSchedule
from ..engine.task import Task
from ..errors import UserError
from .data import CocoInstances, collate, resolve_split
from .evaluate import evaluate

__all__ = ["DetectionTask"]


class Logger:
    """Messages to stdout and ``log.txt`` (main rank only)."""

    def __init__(self, path: Path | None, append: bool = False):
        self.file = open(path, "a" if append else "w") if path is not None else None

    def __call__(self, msg: str) -> None:
        if self.file is None:
            return
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def metrics_line(tag: str, m: dict) -> str:
    return (f"{tag}: box mAP {m['bbox']['mAP']:.4f} (AP50 {m['bbox']['mAP_50']:.4f}), mask mAP {m['segm']['mAP']:.4f} "
            f"(AP50 {m['segm']['mAP_50']:.4f}) on {m['images']} images in {m['seconds']:.1f}s")


class DetectionTask(Task):
    """Train Mask R-CNN with a SLAB backbone on COCO-format data; rank 0 evaluates box and mask mAP."""

    name = "detection"
    program = "slab train-det"
    description = "train-det"
    find_unused_parameters = True  # e.g. the mask head gets no gradient for an image without positive proposals

    def __init__(self, cfg: dict, val_set: CocoInstances, resume: bool = False):
        self.cfg, self.val_set, self.resume = cfg, val_set, resume
        self.out = Path(cfg["output"])
        self.epoch, self.batch_in_epoch, self.history = 0, 0, []
        self.log_file = Logger(None)

    def setup(self, dist: DistInfo) -> None:
        from .engine import _build_model
        cfg, self.dist = self.cfg, dist
        train_set = CocoInstances(*resolve_split(cfg["data"], cfg["train_split"]), train=True, hflip=cfg["hflip"],
                                  in_chans=cfg["in_chans"])
        if train_set.cat_ids != self.val_set.cat_ids:
            raise ValueError(f"train and val have different categories ({train_set.cat_ids} vs "
                             f"{self.val_set.cat_ids})")
        if len(train_set) == 0:
            raise UserError(f"the {cfg['train_split']!r} split of {cfg['data']} has no image with a usable annotation "
                            f"(a non-crowd box at least 1 pixel wide and high): nothing to train on")
        self.train_set = train_set
        self.model = _build_model(cfg, train_set.num_classes).to(dist.device)
        # A resumable sampler: a resumed run continues the interrupted epoch in the same order, without
        # loading the batches it skips.
        self.sampler = ResumableDistributedSampler(len(train_set), dist.world_size, dist.rank, shuffle=True,
                                                   seed=cfg["seed"])
        self.loader = torch.utils.data.DataLoader(
            train_set, batch_size=cfg["batch_size"], sampler=self.sampler, num_workers=cfg["num_workers"],
            collate_fn=collate, drop_last=True, generator=torch.Generator().manual_seed(cfg["seed"]))
        self.steps_per_epoch = self.sampler.num_samples // cfg["batch_size"]
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train_set)} training images for batch size {cfg['batch_size']} x "
                             f"{dist.world_size} processes")
        self.total_steps = int(cfg["max_steps"]) if cfg["max_steps"] else int(cfg["epochs"]) * self.steps_per_epoch
        # eval_every counts epochs; a checkpoint ends every epoch unless --save-every says otherwise
        args = self.trainer.args
        args.eval_every = cfg["eval_every"] * self.steps_per_epoch
        args.save_every = args.save_every or self.steps_per_epoch

    def build_optimizer(self) -> torch.optim.Optimizer:
        from .engine import build_optimizer
        return build_optimizer(self.model, self.cfg["lr"], self.cfg["weight_decay"], self.cfg["betas"])

    def build_lr_schedule(self, optimizer):
        from .engine import _milestones, lr_lambda
        cfg = self.cfg
        milestones = _milestones(cfg, self.steps_per_epoch, self.total_steps)
        return LambdaSchedule(optimizer, lr_lambda(self.total_steps, milestones, cfg["lr_gamma"],
                                                   cfg["warmup_iters"], cfg["warmup_ratio"]))

    def build_prepbn_schedule(self):
        from .engine import _prepbn_schedule
        return _prepbn_schedule(self.model, self.cfg, self.total_steps)

    def run_settings(self) -> dict:
        keys = ("backbone", "backbone_kwargs", "pretrained", "prepbn", "prepbn_warmup", "prepbn_transition",
                "trainable_layers", "batch_size", "lr", "weight_decay", "lr_steps", "lr_gamma", "warmup_iters",
                "warmup_ratio", "min_size", "max_size")
        return {k: self.cfg[k] for k in keys}

    def on_train_begin(self) -> None:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            import yaml
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
        self.log_file = Logger(self.out / "log.txt" if main else None, append=self.resume)
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log_file(f"train-det: {cfg['backbone']} ({n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M "
                      f"trained), {len(self.train_set)} train / {len(self.val_set)} val images, "
                      f"{self.train_set.num_classes - 1} classes, {self.total_steps} steps ({self.steps_per_epoch}/"
                      f"epoch x {self.dist.world_size} process(es)), prepbn={cfg['prepbn']}, device {self.dist.device}")

    def train_batches(self):
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch * self.cfg["batch_size"])
            self.loader.generator.manual_seed(self.cfg["seed"] * 100_003 + self.epoch)  # workers' seeds, per epoch
            for batch in self.loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def loss(self, model: nn.Module, batch):
        images, targets = batch
        device = self.dist.device
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        return loss, {"loss": loss, **losses}

    def log_step(self, record: dict) -> None:
        parts = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
        lam = f" lam {record['lam']:.3f}" if record["lam"] is not None else ""
        epoch = math.ceil(record["step"] / self.steps_per_epoch)
        self.log_file(f"epoch {epoch} step {record['step']}/{self.total_steps} loss {record['loss']:.3f} ({parts}) "
                      f"lr {record['lr']:.2e}{lam} {record['step_time']:.2f}s/step")

    def evaluate(self, step: int, ema_model=None) -> dict | None:
        if not self.dist.is_main:
            return None
        epoch = math.ceil(step / self.steps_per_epoch)
        m = evaluate(self.model, self.val_set, self.dist.device, self.cfg["eval_batch_size"])
        self.log_file(metrics_line(f"epoch {epoch}", m))
        self.log_file(m.pop("summary").rstrip())
        self.history.append({"epoch": epoch, "step": step, **m})
        return {"type": "eval", **self.history[-1]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "history": self.history}

    def load_state_dict(self, state: dict, step: int) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.history = list(state["history"])

    def checkpoint_extras(self) -> dict:
        return {"slab_config": self.model.slab_config}

    def on_save(self, path: str, output: str) -> None:
        atomic_save({"model": self.model.state_dict(), "slab_config": self.model.slab_config}, self.out / "model.pth")

    def log(self, message: str) -> None:
        self.log_file(message)

    def nonfinite_message(self, step, lam, lr, loss, last_checkpoint) -> str:
        where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
        return (f"loss is {loss} at step {step} (on at least one process; every process stopped); lower the lr or "
                f"use prepbn_transition of about 0.8{where}")
