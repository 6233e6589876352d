"""The training loop: one process or many under torchrun (DDP), resumable at any optimizer step."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..data import ResumableDistributedSampler, ShardSampler, build_dataset, dataset_info
from ..errors import UserError, check_output_dir
from ..schedule import PRepBNSchedule
from . import checkpoint as ckpt
from .config import TrainConfig, resolve_steps
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, setup_distributed, teardown_distributed
from .evaluate import autocast_context, evaluate, recalibrate_bn

__all__ = ["train", "TrainResult", "NonFiniteLossError", "build_model", "build_loaders", "load_trained_model", "recalibration_loader",
           "FAULT_ENV"]

#: Kill this process (SIGKILL) right after the given optimizer step, on the first torchrun attempt only.
FAULT_ENV = "SLAB_FAULT_AT_STEP"
#: Which rank the injected fault kills (default: the last one).
FAULT_RANK_ENV = "SLAB_FAULT_RANK"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, lam and the likely causes."""

    def __init__(self, message: str, step: int, lam: float, lr: float):
        super().__init__(message)
        self.step, self.lam, self.lr = step, lam, lr


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``history``/``evals`` are rank 0's view, identical elsewhere)."""

    model: nn.Module                       # trained model, unwrapped from DDP, in eval mode
    ema_model: nn.Module | None            # the EMA weights (eval mode) when cfg.ema
    history: list[dict] = field(default_factory=list)   # one record per optimizer step: step, loss, lr, lam, ...
    evals: list[dict] = field(default_factory=list)     # one record per evaluation: step, top1, loss, ...
    final: dict = field(default_factory=dict)           # last evaluation (top1, loss[, ema_top1, ema_loss])
    steps: int = 0                         # optimizer steps done
    total_steps: int = 0
    output_dir: str | None = None
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    resumed_from: str | None = None
    stopped_early: bool = False
    elapsed_s: float = 0.0


# --- building blocks ---------------------------------------------------------------------------

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
    if str(cfg.data).lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"):
        return 0  # in memory: workers only add start-up time
    return min(8, os.cpu_count() or 1)


def build_loaders(cfg: TrainConfig, dist_info: DistInfo | None = None):
    """``(train_dataset, train_loader, train_sampler, val_loader)`` for ``cfg`` on this rank."""
    d = dist_info or DistInfo()
    tf = dict(auto_augment=cfg.auto_augment, re_prob=cfg.reprob, color_jitter=cfg.color_jitter)
    fmnist = str(cfg.data).lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist")
    if fmnist:
        if cfg.auto_augment:
            raise ValueError("auto_augment (RandAugment) applies to image folders; Fashion-MNIST uses random crop "
                             "and flip (set augment: false to turn them off)")
        tf = {}  # random erasing runs on the batch (see train())
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
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                              pin_memory=pin, drop_last=True, persistent_workers=False,
                              generator=torch.Generator().manual_seed(cfg.seed))
    # (a private generator: creating an iterator must not draw from the global RNG, or a resumed run,
    # which creates one more iterator, would see different dropout and mixup draws)
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


class _MetricsLog:
    """``metrics.jsonl`` on rank 0: one line per optimizer step, plus eval lines."""

    def __init__(self, output: str | None, enabled: bool, resume_step: int | None):
        self.path = os.path.join(output, "metrics.jsonl") if output else None
        self.enabled = enabled and self.path is not None
        if not self.enabled:
            self.f = None
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            # drop what a crashed attempt logged after the checkpoint we resume from
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)
        self.f = open(self.path, "a", buffering=1)

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


# --- the loop ------------------------------------------------------------------------------------

def train(cfg: TrainConfig, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` as ``cfg`` says; returns the model and its history.

    Runs alone or as one rank of a torchrun job (DDP; gloo on CPU, NCCL on GPU). One optimizer
    step consumes ``cfg.grad_accum`` micro-batches; the LR schedule (timm cosine with warm-up) and
    the PRepBN schedule advance once per optimizer step. With ``cfg.output`` set, ``metrics.jsonl``
    gets one JSON line per step (``type='train'``: step, loss, lr, lam, epoch, time) and one per
    evaluation (``type='eval'``: step, top1, loss[, ema_top1, ema_loss]); checkpoints go to
    ``output/checkpoints/step_*.pt`` (the last ``keep_last``) and ``best.pt``.

    ``callback(record)`` is called on rank 0 with every record as it is logged.

    Raises :class:`NonFiniteLossError` when the loss becomes NaN/inf (before that step's update;
    checkpoints written so far are kept) and ``ValueError`` for inconsistent settings, e.g. a PRepBN
    transition that would end after training.
    """
    t_start = time.time()
    d = setup_distributed(cfg.device)
    try:
        return _train(cfg, d, callback, t_start)
    finally:
        teardown_distributed(d)


def _train(cfg: TrainConfig, d: DistInfo, callback, t_start: float) -> TrainResult:
    device = d.device
    if cfg.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16: use --amp fp16 or --amp none")
    _check_sync_bn(cfg, d)
    if cfg.resume == "auto" and not cfg.output:
        raise ValueError("--resume auto needs --output (where the checkpoints are)")
    if cfg.output and d.is_main:
        check_output_dir(cfg.output)  # before minutes of work whose checkpoints could not be kept

    # resume point (every rank reads the same file)
    resume_path, state = None, None
    if cfg.resume == "auto":
        with warnings.catch_warnings():
            if not d.is_main:
                warnings.simplefilter("ignore")
            resume_path, state = ckpt.find_resume_checkpoint(cfg.output)
    elif cfg.resume:
        resume_path, state = cfg.resume, ckpt.load_checkpoint(cfg.resume)
    elif cfg.output and ckpt.find_checkpoints(cfg.output):
        raise ValueError(f"{cfg.output} already holds checkpoints of a run: continue it with --resume auto, or "
                         f"choose another --output")

    _seed_everything(cfg.seed)
    model = build_model(cfg)
    if cfg.sync_bn and d.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)

    train_ds, train_loader, sampler, val_loader = build_loaders(cfg, d)
    micro_per_epoch = len(sampler) // cfg.batch_size  # sampler starts at position 0 here
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total_steps = int(cfg.max_steps) if cfg.max_steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
    lr = cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr

    lr_warmup = resolve_steps("lr_warmup", cfg.lr_warmup, total_steps, steps_per_epoch)
    prepbn = PRepBNSchedule(model, total_steps,
                            warmup_steps=resolve_steps("prepbn_warmup", cfg.prepbn_warmup, total_steps, steps_per_epoch),
                            transition_steps=resolve_steps("prepbn_transition", cfg.prepbn_transition, total_steps,
                                                           steps_per_epoch))

    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    opt_kwargs = {"betas": tuple(cfg.betas)} if cfg.betas else {}
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, **opt_kwargs)
    lr_sched = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.min_lr, warmup_t=lr_warmup,
                                 warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.ema_decay)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                         switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                         num_classes=dataset_info(cfg.data)["num_classes"])
    batch_erase = None
    if cfg.reprob > 0 and hasattr(train_ds, "set_epoch"):  # Fashion-MNIST: erase on the batch
        from timm.data.random_erasing import RandomErasing
        batch_erase = RandomErasing(probability=cfg.reprob, mode="pixel", device=str(device))
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif cfg.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    # restore
    step, epoch, micro_in_epoch, best_top1 = 0, 0, 0, -1.0
    finished_before = False
    if state is not None:
        _check_same_run(cfg, state, resume_path, total_steps)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            first_line = str(e).splitlines()[0]
            raise UserError(f"the weights in {resume_path} do not fit the model of this run ({first_line}): "
                            f"resume with the run's settings (its config.yaml), or start a new --output") from None
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        prepbn.load_state_dict(state["prepbn"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if state.get("ema") is not None:
                ema.module.load_state_dict(state["ema"])
            else:
                ema.set(model)
        step = int(state["step"])
        finished_before = step >= total_steps
        best_top1 = float(state.get("best_top1", -1.0))
        pos = state["position"]
        epoch, micro_in_epoch = int(pos["epoch"]), int(pos["micro_in_epoch"])
        if int(pos["world_size"]) != d.world_size or int(pos["batch_size"]) != cfg.batch_size:
            # same global sample count, new sharding: the order of the rest of the epoch changes
            consumed = micro_in_epoch * int(pos["batch_size"]) * int(pos["world_size"])
            micro_in_epoch = min(consumed // (cfg.batch_size * d.world_size), micro_per_epoch)
            if d.is_main:
                warnings.warn(f"resuming with {d.world_size} processes x batch {cfg.batch_size} from a checkpoint "
                              f"written with {pos['world_size']} x {pos['batch_size']}: the rest of epoch {epoch} "
                              f"is re-sharded, so the run is not bit-identical to an uninterrupted one")
        rngs = state["rng"]
        if len(rngs) == d.world_size:
            ckpt.restore_rng(rngs[d.rank])
        else:
            _seed_everything(cfg.seed + 1000 * step + d.rank)
    else:
        _seed_everything(cfg.seed + d.rank)  # per-rank randomness (dropout, mixup) after the shared init

    ddp_model = model
    if d.distributed:
        # depthwise convs with one input channel have grads whose strides differ from DDP's bucket views: harmless
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        from torch.nn.parallel import DistributedDataParallel as DDP
        # PRepBN's inactive branch (lam 0 or 1) gets exact zero gradients: every parameter takes part in
        # every backward, so DDP needs no unused-parameter search.
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # output
    if cfg.output and d.is_main:
        os.makedirs(os.path.join(cfg.output, "checkpoints"), exist_ok=True)
        import yaml
        with open(os.path.join(cfg.output, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    log = _MetricsLog(cfg.output, d.is_main, step if state is not None else None)
    history: list[dict] = []
    evals: list[dict] = []
    last_ckpt = resume_path if state is not None else None
    best_ckpt = None
    if cfg.output and os.path.exists(os.path.join(cfg.output, "checkpoints", "best.pt")) and state is not None:
        best_ckpt = os.path.join(cfg.output, "checkpoints", "best.pt")

    def emit(rec: dict) -> None:
        if d.is_main:
            log.write(rec)
            if callback is not None:
                callback(rec)

    def save(kind: str, final: dict | None = None) -> str | None:
        nonlocal last_ckpt, best_ckpt
        if not cfg.output:
            return None
        rng_all = all_gather_objects(ckpt.capture_rng())
        path = None
        if d.is_main:
            obj = {"format": ckpt.CHECKPOINT_FORMAT, "version": 1, "step": step, "total_steps": total_steps,
                   "model": model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
                   "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                   "lr_scheduler": lr_sched.state_dict(), "prepbn": prepbn.state_dict(), "rng": rng_all,
                   "position": {"epoch": epoch, "micro_in_epoch": micro_in_epoch, "world_size": d.world_size,
                                "batch_size": cfg.batch_size},
                   "best_top1": best_top1, "config": cfg.to_dict(), "model_name": cfg.model, "final": final}
            if kind == "best":
                path = ckpt.atomic_save(obj, os.path.join(cfg.output, "checkpoints", "best.pt"))
                best_ckpt = path
            else:
                path = ckpt.atomic_save(obj, ckpt.checkpoint_path(cfg.output, step))
                ckpt.prune_checkpoints(cfg.output, cfg.keep_last)
                last_ckpt = path
        barrier()
        if kind != "best":
            last_ckpt = ckpt.checkpoint_path(cfg.output, step)
        return path

    def run_eval() -> dict:
        nonlocal best_top1
        rec = {"type": "eval", "step": step}
        r = evaluate(model, val_loader, device=device, amp=cfg.amp, max_batches=cfg.eval_max_batches)
        rec.update(top1=r["top1"], loss=r["loss"])
        if ema is not None:
            re_ = evaluate(ema.module, val_loader, device=device, amp=cfg.amp, max_batches=cfg.eval_max_batches)
            rec.update(ema_top1=re_["top1"], ema_loss=re_["loss"])
        evals.append(rec)
        emit(rec)
        score = rec.get("ema_top1", rec["top1"])
        if score > best_top1:
            best_top1 = score
            save("best")
        return rec

    # fault injection (tests of torchrun --max-restarts): only on the first attempt
    fault_step = None
    if os.environ.get(FAULT_ENV) and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        fault_rank = int(os.environ.get(FAULT_RANK_ENV, str(d.world_size - 1)))
        if fault_rank == d.rank:
            fault_step = int(os.environ[FAULT_ENV])

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and d.is_main), dynamic_ncols=True,
               desc=f"train {cfg.model}", file=sys.stderr)
    if d.is_main and finished_before:
        print(f"slab train: {resume_path} ends a finished run ({step}/{total_steps} steps): nothing left to train; "
              f"choose another --output, or a longer run in a new one, to train again", file=sys.stderr, flush=True)
    elif d.is_main and resume_path and state is not None:
        print(f"slab train: resumed from {resume_path} at step {step}/{total_steps}", file=sys.stderr, flush=True)

    def micro_batches():
        nonlocal epoch, micro_in_epoch
        while True:
            sampler.set_position(epoch, micro_in_epoch * cfg.batch_size)
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)  # loader workers' seeds, per epoch
            for batch in train_loader:
                micro_in_epoch += 1
                yield batch
            epoch += 1
            micro_in_epoch = 0

    stream = micro_batches()
    ddp_model.train()
    stopped_early = False
    t_last = time.time()
    try:
        while step < total_steps:
            lr_sched.step_update(step)
            lam = prepbn.lam
            cur_lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            loss_acc = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = next(stream)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if batch_erase is not None:
                    x = batch_erase(x)
                if mixup_fn is not None:
                    x, y = mixup_fn(x, y)
                sync = nullcontext() if (micro == cfg.grad_accum - 1 or not d.distributed) else ddp_model.no_sync()
                with sync:
                    with autocast_context(device, cfg.amp):
                        out = ddp_model(x)
                    loss = criterion(out.float(), y)
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_acc += loss.detach().float()
            loss_mean = loss_acc / cfg.grad_accum
            if d.distributed:
                all_reduce_sum(loss_mean)
                loss_mean /= d.world_size
            loss_val = loss_mean.item()
            if not math.isfinite(loss_val):
                msg = _nonfinite_message(step + 1, lam, cur_lr, loss_val, cfg, prepbn, last_ckpt)
                if d.is_main:
                    emit({"type": "error", "step": step + 1, "loss": loss_val, "lr": cur_lr, "lam": lam,
                          "message": msg})
                raise NonFiniteLossError(msg, step + 1, lam, cur_lr)
            grad_norm = None
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad))
            scaler.step(optimizer)
            scaler.update()
            step += 1
            prepbn.step()
            if ema is not None:
                ema.update(model, step=step)
            now = time.time()
            rec = {"type": "train", "step": step, "loss": loss_val, "lr": cur_lr, "lam": lam, "epoch": epoch,
                   "time": round(now - t_start, 3), "step_time": round(now - t_last, 4)}
            t_last = now
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            history.append(rec)
            emit(rec)
            bar.update(1)
            if step % max(1, cfg.log_every) == 0 or step == total_steps:
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{cur_lr:.2e}", lam=f"{lam:.3f}", refresh=False)
                if d.is_main and not cfg.progress:
                    print(f"step {step}/{total_steps} loss {loss_val:.4f} lr {cur_lr:.3e} lam {lam:.4f}",
                          file=sys.stderr, flush=True)
            final_step = step == total_steps
            if cfg.eval_every and step % cfg.eval_every == 0 and not final_step:
                ddp_model.eval()
                run_eval()
                ddp_model.train()
            stop = cfg.stop_at_step is not None and step >= cfg.stop_at_step and not final_step
            if (cfg.save_every and step % cfg.save_every == 0 and not final_step) or stop:
                save("periodic")
            if fault_step is not None and step == fault_step:
                bar.close()
                print(f"slab train: {FAULT_ENV}={fault_step}: killing rank {d.rank} (injected fault)",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                stopped_early = True
                break
    finally:
        bar.close()

    final: dict = {}
    if finished_before:
        # Evaluating and saving again would append a second final evaluation to metrics.jsonl on every call.
        final = state.get("final") or _logged_eval(cfg.output, step) or run_eval()
    elif not stopped_early:
        if cfg.recalibrate_batches > 0:
            recalibrate_bn(model, recalibration_loader(cfg, d), cfg.recalibrate_batches, device=device, amp=cfg.amp)
            if d.is_main:
                emit({"type": "recalibrate", "step": step, "batches": cfg.recalibrate_batches})
        final = run_eval()
        save("periodic", final)
    log.close()
    model.eval()
    if ema is not None:
        ema.module.eval()
    return TrainResult(model=model, ema_model=ema.module if ema is not None else None, history=history, evals=evals,
                       final=final, steps=step, total_steps=total_steps, output_dir=cfg.output,
                       last_checkpoint=last_ckpt, best_checkpoint=best_ckpt, resumed_from=resume_path,
                       stopped_early=stopped_early, elapsed_s=time.time() - t_start)


def _check_sync_bn(cfg: TrainConfig, d: DistInfo) -> None:
    if not cfg.sync_bn:
        return
    if d.device.type != "cuda":
        raise UserError(f"--sync-bn synchronises BatchNorm statistics across GPU processes (torch implements "
                        f"SyncBatchNorm for CUDA only); this run is on {d.device}: drop --sync-bn")
    if not d.distributed and d.is_main:
        warnings.warn("--sync-bn in a single process has nothing to synchronise: BatchNorm runs as usual (launch "
                      "with torchrun --nproc_per_node N for SyncBatchNorm across GPUs)", stacklevel=3)


#: settings a resumed run must share with its checkpoint: they decide the weights' shapes or the data order
_SAME_RUN_FIELDS = ("model", "model_kwargs", "img_size", "seed", "opt")


def _plain(value):
    # YAML, JSON and the CLI give lists where Python callers give tuples: compare them alike.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_same_run(cfg: TrainConfig, state: dict, resume_path: str, total_steps: int) -> None:
    """Refuse to resume a checkpoint with settings that would make a different run than the one it belongs to."""
    saved = state.get("config") or {}
    diffs = [f"{k} {saved[k]!r} there, {getattr(cfg, k)!r} here" for k in _SAME_RUN_FIELDS
             if k in saved and _plain(saved[k]) != _plain(getattr(cfg, k))]
    saved_total = state["prepbn"]["total_steps"]
    if saved_total != total_steps:
        diffs.insert(0, f"{saved_total} optimizer steps there, {total_steps} here (the LR and PRepBN schedules depend "
                        f"on the length: give the same --max-steps/--epochs)")
    if diffs:
        raise UserError(f"checkpoint {resume_path} belongs to another run: " + "; ".join(diffs) + ". Resume with the "
                        f"run's settings (its config.yaml), or start a new --output")


def _logged_eval(output: str | None, step: int) -> dict | None:
    """The last evaluation ``metrics.jsonl`` holds for ``step`` (how a finished run reports without re-evaluating)."""
    from .plot import read_metrics
    try:
        evals = read_metrics(output)[1] if output else []
    except FileNotFoundError:
        return None
    return next((r for r in reversed(evals) if r.get("step") == step), None)


def load_trained_model(path: str, use_ema: bool = False, map_location="cpu") -> tuple[nn.Module, TrainConfig, dict]:
    """``(model, config, checkpoint)`` from a checkpoint written by :func:`train` (model in eval mode).

    ``use_ema`` loads the EMA weights (an error when the run kept none).
    """
    state = ckpt.load_checkpoint(path, map_location=map_location)
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
