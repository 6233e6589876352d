"""Image classification as a task of :class:`slab.engine.Trainer` (``slab train``)."""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..data import ResumableDistributedSampler, ShardSampler, build_dataset, dataset_info
from ..engine import checkpoint as ckpt
from ..engine.distributed import DistInfo
from ..engine.optim import TimmSchedule, weight_decay_groups
from ..engine.task import Task
from ..engine.trainer import NonFiniteLossError, Trainer, TrainerArgs, TrainResult
from ..errors import UserError
from ..schedule import PRepBNSchedule
from .config import TrainConfig, resolve_steps
from .evaluate import evaluate, recalibrate_bn

__all__ = ["train", "ClassificationTask", "TrainResult", "NonFiniteLossError", "build_model", "build_loaders",
           "load_trained_model", "recalibration_loader"]

_FMNIST = ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist")


def build_model(cfg: TrainConfig) -> nn.Module:
    """The registered model ``cfg.model`` shaped for ``cfg.data`` (classes, channels, size), with drop path."""
    import slab
    info = dataset_info(cfg.data)
    kwargs = dict(num_classes=info["num_classes"], in_chans=info["in_chans"])
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    elif info["img_size"] != 224:
        kwargs["img_size"] = info["img_size"]
    if cfg.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.drop_path
    kwargs.update(cfg.model_kwargs)
    return slab.create_model(cfg.model, **kwargs)


def _num_workers(cfg: TrainConfig) -> int:
    if cfg.num_workers is not None:
        return int(cfg.num_workers)
    if str(cfg.data).lower() in _FMNIST:
        return 0  # in memory: workers only add start-up time
    return min(8, os.cpu_count() or 1)


def build_loaders(cfg: TrainConfig, dist_info: DistInfo | None = None):
    """``(train_dataset, train_loader, train_sampler, val_loader)`` for ``cfg`` on this rank."""
    d = dist_info or DistInfo()
    tf = dict(auto_augment=cfg.auto_augment, re_prob=cfg.reprob, color_jitter=cfg.color_jitter)
    if str(cfg.data).lower() in _FMNIST:
        if cfg.auto_augment:
            raise ValueError("auto_augment (RandAugment) applies to image folders; Fashion-MNIST uses random crop "
                             "and flip (set augment: false to turn them off)")
        tf = {}  # random erasing runs on the batch (see ClassificationTask.loss)
    train_ds = build_dataset(cfg.data, "train", img_size=cfg.img_size, is_training=True, seed=cfg.seed,
                             augment=cfg.augment, **tf)
    val_ds = build_dataset(cfg.data, "val", img_size=cfg.img_size, is_training=False)
    workers = _num_workers(cfg)
    pin = d.device.type == "cuda"
    sampler = ResumableDistributedSampler(len(train_ds), d.world_size, d.rank, shuffle=True, seed=cfg.seed,
                                          drop_last=True)
    if sampler.num_samples < cfg.batch_size:
        raise ValueError(f"each of the {d.world_size} processes gets {sampler.num_samples} training samples per "
                         f"epoch, fewer than one batch of {cfg.batch_size}")
    # (a private generator: creating an iterator must not draw from the global RNG, or a resumed run,
    # which creates one more iterator, would see different dropout and mixup draws)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                              pin_memory=pin, drop_last=True, persistent_workers=False,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(val_ds, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                            sampler=ShardSampler(len(val_ds), d.world_size, d.rank), num_workers=workers,
                            pin_memory=pin, generator=torch.Generator())
    return train_ds, train_loader, sampler, val_loader


def recalibration_loader(cfg: TrainConfig, dist_info: DistInfo | None = None, batch_size: int | None = None):
    """Training images without augmentation, in a seeded shuffled order (this rank's share), for BN recalibration."""
    d = dist_info or DistInfo()
    ds = build_dataset(cfg.data, "train", img_size=cfg.img_size, is_training=False)
    sampler = ResumableDistributedSampler(len(ds), d.world_size, d.rank, shuffle=True, seed=cfg.seed + 1,
                                          drop_last=True)
    return DataLoader(ds, batch_size=batch_size or cfg.batch_size, sampler=sampler, num_workers=_num_workers(cfg),
                      drop_last=True, generator=torch.Generator())


def _criterion(cfg: TrainConfig, mixup: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup:
        return SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


class ClassificationTask(Task):
    """A registered model on Fashion-MNIST or an ImageNet-layout folder: timm augmentation, mixup, cosine LR."""

    name = "classification"
    program = "slab train"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.description = f"train {cfg.model}"
        self.epoch, self.micro_in_epoch = 0, 0

    def setup(self, dist: DistInfo) -> None:
        cfg, self.dist = self.cfg, dist
        _check_sync_bn(cfg, dist)
        model = build_model(cfg)
        if cfg.sync_bn and dist.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(dist.device)
        self.train_ds, self.train_loader, self.sampler, self.val_loader = build_loaders(cfg, dist)
        self.micro_per_epoch = len(self.sampler) // cfg.batch_size  # the sampler starts at position 0 here
        self.steps_per_epoch = max(1, self.micro_per_epoch // cfg.grad_accum)
        self.total_steps = (int(cfg.max_steps) if cfg.max_steps is not None
                            else max(1, int(round(cfg.epochs * self.steps_per_epoch))))
        self.mixup_fn = self.batch_erase = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            self.mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                                  switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                                  num_classes=dataset_info(cfg.data)["num_classes"])
        if cfg.reprob > 0 and hasattr(self.train_ds, "set_epoch"):  # Fashion-MNIST: erase on the batch
            from timm.data.random_erasing import RandomErasing
            self.batch_erase = RandomErasing(probability=cfg.reprob, mode="pixel", device=str(dist.device))
        self.criterion = _criterion(cfg, self.mixup_fn is not None)

    def _steps(self, name: str) -> int:
        return resolve_steps(name, getattr(self.cfg, name), self.total_steps, self.steps_per_epoch)

    def build_optimizer(self) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2
        cfg, d = self.cfg, self.dist
        global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
        lr = cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr
        skip = set(self.model.no_weight_decay()) if hasattr(self.model, "no_weight_decay") else set()
        groups = weight_decay_groups(self.model.named_parameters(), cfg.weight_decay, lambda n, p: n in skip)
        opt_kwargs = {"betas": tuple(cfg.betas)} if cfg.betas else {}
        return create_optimizer_v2(groups, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, **opt_kwargs)

    def build_lr_schedule(self, optimizer):
        from timm.scheduler import CosineLRScheduler
        cfg = self.cfg
        return TimmSchedule(CosineLRScheduler(optimizer, t_initial=self.total_steps, lr_min=cfg.min_lr,
                                              warmup_t=self._steps("lr_warmup"), warmup_lr_init=cfg.warmup_lr,
                                              t_in_epochs=False))

    def build_prepbn_schedule(self) -> PRepBNSchedule:
        return PRepBNSchedule(self.model, self.total_steps, warmup_steps=self._steps("prepbn_warmup"),
                              transition_steps=self._steps("prepbn_transition"))

    def run_settings(self) -> dict:
        keys = ("model", "model_kwargs", "img_size", "opt", "lr", "lr_base_batch", "lr_warmup", "min_lr", "warmup_lr")
        return {k: getattr(self.cfg, k) for k in keys}

    def on_train_begin(self) -> None:
        if self.cfg.output and self.dist.is_main:
            import yaml
            with open(os.path.join(self.cfg.output, "config.yaml"), "w") as f:
                yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)

    def train_batches(self):
        cfg = self.cfg
        while True:
            self.sampler.set_position(self.epoch, self.micro_in_epoch * cfg.batch_size)
            if hasattr(self.train_ds, "set_epoch"):
                self.train_ds.set_epoch(self.epoch)
            self.train_loader.generator.manual_seed(cfg.seed * 100_003 + self.epoch)  # workers' seeds, per epoch
            for batch in self.train_loader:
                self.micro_in_epoch += 1
                yield batch
            self.epoch += 1
            self.micro_in_epoch = 0

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        device = self.dist.device
        x, y = (t.to(device, non_blocking=True) for t in batch)
        if self.batch_erase is not None:
            x = self.batch_erase(x)
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        out = model(x)
        with torch.autocast(device.type, enabled=False):  # the loss in float32, outside autocast
            return self.criterion(out.float(), y)

    def after_step(self, record: dict) -> None:
        record["epoch"] = self.epoch

    def evaluate(self, step: int, ema_model: nn.Module | None = None) -> dict:
        cfg, device = self.cfg, self.dist.device
        r = evaluate(self.model, self.val_loader, device=device, amp=cfg.amp, max_batches=cfg.eval_max_batches)
        record = {"type": "eval", "step": step, "top1": r["top1"], "loss": r["loss"]}
        if ema_model is not None:
            r = evaluate(ema_model, self.val_loader, device=device, amp=cfg.amp, max_batches=cfg.eval_max_batches)
            record.update(ema_top1=r["top1"], ema_loss=r["loss"])
        return record

    def score(self, record: dict) -> float:
        return record.get("ema_top1", record["top1"])

    def before_final_eval(self, step: int) -> None:
        cfg = self.cfg
        if cfg.recalibrate_batches > 0:
            recalibrate_bn(self.model, recalibration_loader(cfg, self.dist), cfg.recalibrate_batches,
                           device=self.dist.device, amp=cfg.amp)
            self.trainer.emit({"type": "recalibrate", "step": step, "batches": cfg.recalibrate_batches})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "world_size": self.dist.world_size,
                "batch_size": self.cfg.batch_size}

    def load_state_dict(self, pos: dict, step: int) -> None:
        d, bs = self.dist, self.cfg.batch_size
        self.epoch, self.micro_in_epoch = int(pos["epoch"]), int(pos["micro_in_epoch"])
        if int(pos["world_size"]) != d.world_size or int(pos["batch_size"]) != bs:
            # same global sample count, new sharding: the order of the rest of the epoch changes
            consumed = self.micro_in_epoch * int(pos["batch_size"]) * int(pos["world_size"])
            self.micro_in_epoch = min(consumed // (bs * d.world_size), self.micro_per_epoch)
            if d.is_main:
                warnings.warn(f"resuming with {d.world_size} processes x batch {bs} from a checkpoint written with "
                              f"{pos['world_size']} x {pos['batch_size']}: the rest of epoch {self.epoch} is "
                              f"re-sharded, so the run is not bit-identical to an uninterrupted one")

    def checkpoint_extras(self) -> dict:
        best = self.trainer.best_score
        return {"config": self.cfg.to_dict(), "model_name": self.cfg.model, "best_top1": best if best > -1 else -1.0}

    def nonfinite_message(self, step, lam, lr, loss, last_checkpoint) -> str:
        return _nonfinite_message(step, lam, lr, loss, self.cfg, self.trainer.prepbn, last_checkpoint)


def trainer_args(cfg: TrainConfig) -> TrainerArgs:
    """The engine's share of a :class:`TrainConfig`."""
    keys = ("output", "resume", "seed", "grad_accum", "amp", "clip_grad", "ema", "ema_decay", "eval_every",
            "save_every", "keep_last", "stop_at_step", "log_every", "progress", "device", "threads")
    return TrainerArgs(nonfinite="stop", **{k: getattr(cfg, k) for k in keys})


def train(cfg: TrainConfig, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` as ``cfg`` says; returns the model and its history.

    Runs alone or as one rank of a torchrun job (see :class:`slab.engine.Trainer`). ``metrics.jsonl``
    gets one line per step (``type='train'``: step, loss, lr, lam, epoch, time) and one per
    evaluation (``type='eval'``: step, top1, loss[, ema_top1, ema_loss]); checkpoints go to
    ``output/checkpoints/step_*.pt`` (the last ``keep_last``) and ``best.pt``.

    Raises :class:`NonFiniteLossError` when the loss becomes NaN/inf (before that step's update;
    checkpoints written so far are kept) and ``ValueError`` for inconsistent settings, e.g. a PRepBN
    transition that would end after training.
    """
    return Trainer(ClassificationTask(cfg), trainer_args(cfg), callback).train()


def _check_sync_bn(cfg: TrainConfig, d: DistInfo) -> None:
    if not cfg.sync_bn:
        return
    if d.device.type != "cuda":
        raise UserError(f"--sync-bn synchronises BatchNorm statistics across GPU processes (torch implements "
                        f"SyncBatchNorm for CUDA only); this run is on {d.device}: drop --sync-bn")
    if not d.distributed and d.is_main:
        warnings.warn("--sync-bn in a single process has nothing to synchronise: BatchNorm runs as usual (launch "
                      "with torchrun --nproc_per_node N for SyncBatchNorm across GPUs)", stacklevel=3)


def _nonfinite_message(step: int, lam: float, lr: float, loss: float, cfg: TrainConfig, prepbn: PRepBNSchedule,
                       last_ckpt: str | None) -> str:
    end = prepbn.warmup_steps + prepbn.transition_steps
    causes = []
    if 0.0 < lam < 1.0:
        causes.append(f"the PRepBN transition is in progress (lam={lam:.4f}); a transition that is too short for the "
                      f"learning rate lets the BN branch take over before it is trained: lengthen "
                      f"prepbn_transition (now {prepbn.transition_steps} steps, ends at step {end})")
    elif lam == 0.0:
        causes.append(f"the model runs on RepBN alone since step {end}; with a tiny per-device batch the BN "
                      f"statistics are noisy (try --sync-bn or a larger batch)")
    causes.append(f"the learning rate ({lr:.3g}) is too high for the global batch: lower lr or raise lr_warmup")
    if cfg.clip_grad is None:
        causes.append("no gradient clipping: try --clip-grad 5.0")
    if cfg.amp == "fp16":
        causes.append("fp16 overflow: use --amp bf16 or --amp none")
    where = (f"the last good checkpoint is {last_ckpt}; resume from it with --resume auto after the change"
             if last_ckpt else "no checkpoint was written yet")
    return (f"non-finite training loss ({loss}) at optimizer step {step} (lam={lam:.4f}, lr={lr:.3g}); training "
            f"stopped. Likely causes: " + "; ".join(f"({i + 1}) {c}" for i, c in enumerate(causes)) + f". {where}.")


def load_trained_model(path: str, use_ema: bool = False, map_location="cpu") -> tuple[nn.Module, TrainConfig, dict]:
    """``(model, config, checkpoint)`` from a checkpoint written by :func:`train` (model in eval mode).

    ``use_ema`` loads the EMA weights (an error when the run kept none).
    """
    state = ckpt.load_checkpoint(path, map_location=map_location)
    if "config" not in state:
        raise UserError(f"{path} is a `slab {state.get('task', '?')}` checkpoint, not one of `slab train` "
                        f"(an image classifier)")
    cfg_dict = dict(state["config"])
    cfg_dict.update(resume=None, output=None)
    cfg = TrainConfig.from_dict(cfg_dict)
    model = build_model(cfg)
    weights = state["model"]
    if use_ema:
        if state.get("ema") is None:
            raise ValueError(f"{path} holds no EMA weights (the run was trained without --ema)")
        weights = state["ema"]
    if any(k.startswith("module.") for k in weights):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    model.load_state_dict(weights)
    return model.eval(), cfg, state
