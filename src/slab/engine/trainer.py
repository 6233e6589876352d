"""The training engine: one loop for every task, one process or many under torchrun, resumable at any step."""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError, check_output_dir
from . import checkpoint as ckpt
from .distributed import all_gather_objects, all_reduce_sum, barrier, setup_distributed, teardown_distributed
from .metrics import MetricsLog
from .task import Task

__all__ = ["Trainer", "TrainerArgs", "TrainResult", "NonFiniteLossError", "autocast_context", "seed_everything",
           "FAULT_ENV", "FAULT_RANK_ENV", "NAN_ENV", "NAN_RANK_ENV"]

#: Kill this process (SIGKILL) right after the given optimizer step, on the first torchrun attempt only.
FAULT_ENV = "SLAB_FAULT_AT_STEP"
#: Which rank the injected fault kills (default: the last one).
FAULT_RANK_ENV = "SLAB_FAULT_RANK"
#: Make the loss of the given optimizer step (1-based) NaN on one rank (tests of the non-finite policy).
NAN_ENV = "SLAB_NAN_AT_STEP"
#: Which rank gets the NaN (default: the last one).
NAN_RANK_ENV = "SLAB_NAN_RANK"

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` in {'bf16', 'fp16'}; a no-op for None/'none'."""
    if amp in (None, "none"):
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_AMP_DTYPES[amp])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, lam and the likely causes."""

    def __init__(self, message: str, step: int, lam: float | None, lr: float):
        super().__init__(message)
        self.step, self.lam, self.lr = step, lam, lr


@dataclass
class TrainerArgs:
    """What every training run shares, whatever the task."""

    output: str | None = None         # run folder: metrics.jsonl, checkpoints/
    resume: str | None = None         # None (refuse a folder with checkpoints), 'auto', a checkpoint, 'restart'
    seed: int = 0
    grad_accum: int = 1               # micro-batches per optimizer step
    amp: str = "none"                 # 'none', 'bf16', 'fp16' (with a gradient scaler)
    clip_grad: float | None = None    # global gradient-norm clipping
    ema: bool = False
    ema_decay: float = 0.9998
    nonfinite: str = "stop"           # 'stop': raise; 'skip': skip the update, raise after max_bad_steps in a row
    max_bad_steps: int = 20
    eval_every: int = 0               # optimizer steps (0: only at the end)
    save_every: int = 0               # optimizer steps (0: only at the end)
    keep_last: int = 3
    stop_at_step: int | None = None   # stop with a checkpoint after this step, as if pre-empted
    stop_after: int | None = None     # ... or after this many steps of this call
    log_every: int = 50
    progress: bool = True
    device: str | None = None
    threads: int = 0                  # torch CPU threads (0: torch's default)

    def __post_init__(self) -> None:
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if self.amp not in ("none", *_AMP_DTYPES):
            raise ValueError(f"amp must be one of none, bf16, fp16, got {self.amp!r}")


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns (on every rank; ``history``/``evals`` are this call's records)."""

    model: nn.Module                       # trained model, unwrapped from DDP, in eval mode
    ema_model: nn.Module | None            # the EMA weights (eval mode) when args.ema
    history: list[dict] = field(default_factory=list)   # one record per optimizer step: step, loss, lr, lam, ...
    evals: list[dict] = field(default_factory=list)     # one record per evaluation
    final: dict = field(default_factory=dict)           # the last evaluation
    steps: int = 0                         # optimizer steps done
    total_steps: int = 0
    bad_steps: int = 0                     # skipped non-finite steps of the whole run
    output_dir: str | None = None
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    resumed_from: str | None = None
    stopped_early: bool = False
    finished_before: bool = False          # resumed from the end of a finished run: nothing trained
    elapsed_s: float = 0.0


class Trainer:
    """Runs ``task`` as ``args`` say: ``Trainer(task, args).train()``.

    Alone or as one rank of a torchrun job (DDP; gloo on CPU, NCCL on GPU). One optimizer step
    consumes ``grad_accum`` micro-batches (DDP syncs gradients on the last one only); the LR and
    PRepBN schedules advance once per optimizer step. A non-finite loss is decided across ranks, so
    every rank skips or stops at the same step. With ``args.output``: ``metrics.jsonl`` (one line
    per step: type, step, loss, lr, lam, ...) and ``checkpoints/step_*.pt`` holding every stateful
    object and every rank's RNG, from which ``resume='auto'`` continues bit-identically.
    ``callback(record)`` is called on the main rank with every record logged.
    """

    def __init__(self, task: Task, args: TrainerArgs, callback=None):
        self.task, self.args, self.callback = task, args, callback
        task.trainer = self
        self.step, self.bad_steps, self.bad_in_row, self.best_score = 0, 0, 0, -math.inf
        self.history, self.evals = [], []
        self.last_checkpoint = self.best_checkpoint = self.resume_path = self.state = None
        self.log = self.bar = None

    # --- the run ---------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        t_start = time.time()
        self.dist = setup_distributed(self.args.device)
        try:
            self._setup()
            self._restore()
            self._open_outputs()
            stopped = self._loop() if not self.finished_before else False
            final = self._finish(stopped)
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.log is not None:
                self.log.close()
            teardown_distributed(self.dist)
        model = self.task.model.eval()
        ema = self.ema.module.eval() if self.ema is not None else None
        return TrainResult(model=model, ema_model=ema, history=self.history, evals=self.evals, final=final,
                           steps=self.step, total_steps=self.total_steps, bad_steps=self.bad_steps,
                           output_dir=self.args.output, last_checkpoint=self.last_checkpoint,
                           best_checkpoint=self.best_checkpoint, resumed_from=self.resume_path,
                           stopped_early=stopped, finished_before=self.finished_before,
                           elapsed_s=time.time() - t_start)

    def _loop(self) -> bool:
        """Optimizer steps until the end of the run (False) or a requested stop (True)."""
        a, started = self.args, self.step
        stream = self.task.train_batches()
        self.ddp_model.train()
        self.t_start = self.t_last = time.time()
        while self.step < self.total_steps:
            record = self._optimizer_step(stream)
            final_step = self.step == self.total_steps
            self._log_step(record)
            if a.eval_every and self.step % a.eval_every == 0 and not final_step:
                self._evaluate()
            stop = not final_step and ((a.stop_at_step is not None and self.step >= a.stop_at_step)
                                       or (a.stop_after is not None and self.step - started >= a.stop_after))
            if (a.save_every and self.step % a.save_every == 0 and not final_step) or stop:
                self._save()
            self._maybe_inject_fault()
            if stop:
                return True
        return False

    def _optimizer_step(self, stream) -> dict:
        """One optimizer step: schedules, accumulated micro-batches, clipping, the non-finite decision, update."""
        step = self.step
        lr = self.lr_schedule.set(step)
        lam = min(1.0, self.prepbn.lam) if self.prepbn is not None else None
        self.task.before_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        logs = self._accumulate(stream)
        grad_norm = None
        if self.args.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.task.model.parameters(), self.args.clip_grad)
        loss, finite = self._agree(logs.pop("loss"), grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.bad_in_row = 0
        else:
            self._non_finite(step, lam, lr, loss)
        self.step += 1
        if self.prepbn is not None:
            self.prepbn.step()
        if self.ema is not None:
            self.ema.update(self.task.model, step=self.step)
        now = time.time()
        record = {"type": "train", "step": self.step, "loss": loss, "lr": lr, "lam": lam,
                  "time": round(now - self.t_start, 3), "step_time": round(now - self.t_last, 4)}
        self.t_last = now
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if not finite:
            record["skipped"] = True
        record.update({k: float(v) for k, v in logs.items()})
        return record

    def _accumulate(self, stream) -> dict:
        """Forward and backward of ``grad_accum`` micro-batches; their logs, averaged."""
        n, d = self.args.grad_accum, self.dist
        sums: dict = {}
        for micro in range(n):
            batch = next(stream)
            sync = nullcontext() if (micro == n - 1 or not d.distributed) else self.ddp_model.no_sync()
            with sync:
                with autocast_context(d.device, self.args.amp):
                    out = self.task.loss(self.ddp_model, batch)
                objective, logs = (out, {"loss": out}) if torch.is_tensor(out) else out
                if self.nan_step == self.step + 1:
                    objective = objective * float("nan")
                    logs = {**logs, "loss": logs["loss"] * float("nan")}
                self.scaler.scale(objective / n).backward()
            for k, v in logs.items():
                if v is not None:
                    sums[k] = sums.get(k, 0) + v.detach().float() / n
        return sums

    def _agree(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> tuple[float, bool]:
        """The loss averaged over ranks, and whether every rank's loss and gradients are finite.

        One all-reduce decides for all ranks: a NaN on one rank stops or skips every rank at the same step
        (a rank deciding alone would leave the others waiting in the next collective). Under fp16 the
        gradient scaler handles overflowing gradients itself.
        """
        bad = ~torch.isfinite(loss)
        if grad_norm is not None and not self.scaler.is_enabled():
            bad = bad | ~torch.isfinite(grad_norm.to(loss.device))
        if not self.dist.distributed:
            return loss.item(), not bool(bad)
        both = torch.stack([loss, bad.float()])
        all_reduce_sum(both)
        return (both[0] / self.dist.world_size).item(), not bool(both[1] > 0)

    def _non_finite(self, step: int, lam: float | None, lr: float, loss: float) -> None:
        """Skip this update (``nonfinite='skip'``, up to ``max_bad_steps`` in a row) or stop with an error."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.bad_in_row += 1
        if self.args.nonfinite == "skip":
            if self.bad_in_row < self.args.max_bad_steps:
                self._say(f"step {step}: non-finite loss/gradient, step skipped ({self.bad_in_row} in a row)")
                return
            self._save()
            msg = (f"{self.bad_in_row} consecutive non-finite steps at step {step}: lower --lr, use --amp none, or "
                   f"lengthen the PRepBN transition")
        else:
            msg = self.task.nonfinite_message(step + 1, lam, lr, loss, self.last_checkpoint)
        self.emit({"type": "error", "step": step + 1, "loss": loss, "lr": lr, "lam": lam, "message": msg})
        raise NonFiniteLossError(msg, step + 1, lam, lr)

    def _finish(self, stopped: bool) -> dict:
        if stopped:
            return {}
        if self.finished_before:
            # Evaluating and saving again would append a second final evaluation to metrics.jsonl on every call.
            return self.state.get("final") or self._evaluate() or {}
        self.task.before_final_eval(self.step)
        final = self._evaluate() or {}
        self._save(final=final)
        return final

    # --- building and restoring --------------------------------------------------------------------
    def _setup(self) -> None:
        a, d = self.args, self.dist
        if a.threads:
            torch.set_num_threads(a.threads)
        if a.amp == "bf16" and d.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16: use --amp fp16 or --amp none")
        if a.resume == "auto" and not a.output:
            raise ValueError("--resume auto needs --output (where the checkpoints are)")
        if a.output and d.is_main:
            check_output_dir(a.output)  # before minutes of work whose checkpoints could not be kept
        self._find_resume()
        seed_everything(a.seed)
        self.task.setup(d)
        self.total_steps = int(self.task.total_steps)
        self.optimizer = self.task.build_optimizer()
        self.lr_schedule = self.task.build_lr_schedule(self.optimizer)
        self.prepbn = self.task.build_prepbn_schedule()
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=a.amp == "fp16")
        self.ema = None
        if a.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.task.model, decay=a.ema_decay)
        self.nan_step = self._env_step(NAN_ENV, NAN_RANK_ENV)
        self.fault_step = (self._env_step(FAULT_ENV, FAULT_RANK_ENV)
                           if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 else None)

    def _env_step(self, step_env: str, rank_env: str) -> int | None:
        if not os.environ.get(step_env):
            return None
        rank = int(os.environ.get(rank_env, str(self.dist.world_size - 1)))
        return int(os.environ[step_env]) if rank == self.dist.rank else None

    def _find_resume(self) -> None:
        """The checkpoint to resume from (every rank reads the same file), or none."""
        a, d = self.args, self.dist
        if a.resume == "auto":
            with warnings.catch_warnings():
                if not d.is_main:
                    warnings.simplefilter("ignore")
                self.resume_path, self.state = ckpt.find_resume_checkpoint(a.output)
        elif a.resume == "restart":
            barrier()
            if d.is_main and a.output:  # start over: the run's old checkpoints are not this run's
                ckpt.remove_checkpoints(a.output)
            barrier()
        elif a.resume:
            self.resume_path, self.state = a.resume, ckpt.load_checkpoint(a.resume)
        elif a.output and ckpt.find_checkpoints(a.output):
            raise ValueError(f"{a.output} already holds checkpoints of a run: continue it with --resume auto, or "
                             f"choose another --output")

    def run_settings(self) -> dict:
        """What a checkpoint must share with this run to be resumed by it: seed, length, schedules, the task's."""
        settings = {"seed": self.args.seed, "total_steps": self.total_steps}
        if self.prepbn is not None:
            settings["prepbn"] = [self.prepbn.warmup_steps, self.prepbn.transition_steps]
        return {**settings, **self.task.run_settings()}

    def _check_same_run(self) -> None:
        """Refuse to resume a checkpoint with settings that would make another run than the one it belongs to."""
        saved, mine = self.state.get("run") or {}, _plain(self.run_settings())
        diffs = [f"{k} {saved[k]!r} there, {mine[k]!r} here" for k in mine
                 if k in saved and _plain(saved[k]) != mine[k] and k != "total_steps"]
        saved_total = int(self.state.get("total_steps", self.state["prepbn"]["total_steps"]
                                         if self.state.get("prepbn") else self.total_steps))
        if saved_total != self.total_steps:
            diffs.insert(0, f"{saved_total} optimizer steps there, {self.total_steps} here (the LR and PRepBN "
                            f"schedules depend on the length: give the same --max-steps/--epochs)")
        if diffs:
            raise UserError(f"checkpoint {self.resume_path} belongs to another run (written with another "
                            f"configuration): " + "; ".join(diffs) + ". Resume with the run's settings (its "
                            f"config.yaml), or start a new --output")

    def _restore(self) -> None:
        d, st = self.dist, self.state
        self.finished_before = False
        if st is None:
            seed_everything(self.args.seed + d.rank)  # per-rank randomness (dropout, mixup) after the shared init
            self._wrap_ddp()
            return
        self._check_same_run()
        try:
            self.task.model.load_state_dict(st["model"])
        except RuntimeError as e:
            raise UserError(f"the weights in {self.resume_path} do not fit the model of this run "
                            f"({str(e).splitlines()[0]}): resume with the run's settings (its config.yaml), or "
                            f"start a new --output") from None
        self.optimizer.load_state_dict(st["optimizer"])
        self.lr_schedule.load_state_dict(st["lr_scheduler"])
        if self.prepbn is not None and st.get("prepbn") is not None:
            self.prepbn.load_state_dict(st["prepbn"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.module.load_state_dict(st["ema"])
        elif self.ema is not None:
            self.ema.set(self.task.model)
        self.step, self.bad_steps = int(st["step"]), int(st.get("bad_steps", 0))
        self.best_score = float(st.get("best_score", -math.inf))
        self.finished_before = self.step >= self.total_steps
        self.last_checkpoint = self.resume_path
        self.task.load_state_dict(st["position"], self.step)
        rngs = st["rng"]
        if len(rngs) == d.world_size:
            ckpt.restore_rng(rngs[d.rank])
        else:
            seed_everything(self.args.seed + 1000 * self.step + d.rank)
        self._wrap_ddp()

    def _wrap_ddp(self) -> None:
        self.ddp_model = self.task.model
        if self.dist.distributed:
            # depthwise convs with one input channel have grads whose strides differ from DDP's bucket views
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            from torch.nn.parallel import DistributedDataParallel as DDP
            # PRepBN's inactive branch (lam 0 or 1) gets exact zero gradients: every parameter takes part in
            # every backward, so DDP needs no unused-parameter search unless the task says otherwise.
            dev = self.dist.device
            self.ddp_model = DDP(self.task.model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                 find_unused_parameters=self.task.find_unused_parameters)

    def _open_outputs(self) -> None:
        a, d = self.args, self.dist
        if a.output and d.is_main:
            os.makedirs(os.path.join(a.output, "checkpoints"), exist_ok=True)
            best = os.path.join(a.output, "checkpoints", "best.pt")
            if self.state is not None and os.path.exists(best):
                self.best_checkpoint = best
        self.log = MetricsLog(a.output, d.is_main, self.step if self.state is not None else None)
        self.task.on_train_begin()
        from tqdm import tqdm
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not (a.progress and d.is_main),
                        dynamic_ncols=True, desc=getattr(self.task, "description", "train"), file=sys.stderr)
        if self.finished_before:
            self._say(f"{self.resume_path} ends a finished run ({self.step}/{self.total_steps} steps): nothing left "
                      f"to train; choose another --output, or a longer run in a new one, to train again")
        elif self.state is not None:
            self._say(f"resumed from {self.resume_path} at step {self.step}/{self.total_steps}")

    # --- records, evaluation, checkpoints ------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.dist.is_main:
            self.task.log(message)

    def emit(self, record: dict) -> None:
        """Log ``record`` to metrics.jsonl and the callback (main rank)."""
        if self.dist.is_main:
            self.log.write(record)
            if self.callback is not None:
                self.callback(record)

    def _log_step(self, record: dict) -> None:
        self.task.after_step(record)  # the task may add its fields (epoch, ...)
        self.history.append(record)
        self.emit(record)
        self.bar.update(1)
        if self.step % max(1, self.args.log_every) == 0 or self.step == self.total_steps:
            lam = "-" if record["lam"] is None else f"{record['lam']:.3f}"
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", lam=lam,
                                 **self.task.progress_info(), refresh=False)
            if self.dist.is_main and not self.args.progress:
                self.task.log_step(record)

    def _evaluate(self) -> dict | None:
        was_training = self.ddp_model.training
        self.ddp_model.eval()
        record = self.task.evaluate(self.step, self.ema.module if self.ema is not None else None)
        self.ddp_model.train(was_training)
        if record is None:
            return None
        self.evals.append(record)
        self.emit(record)
        score = self.task.score(record)
        if score is not None and score > self.best_score:
            self.best_score = score
            self._save(best=True)
        return record

    def _save(self, best: bool = False, final: dict | None = None) -> None:
        a, d = self.args, self.dist
        if not a.output:
            return
        rng_all = all_gather_objects(ckpt.capture_rng())  # every rank's, so each continues its own stream
        path = os.path.join(a.output, "checkpoints", "best.pt") if best else ckpt.checkpoint_path(a.output, self.step)
        if d.is_main:
            ckpt.atomic_save(self._checkpoint(rng_all, final), path)
            if not best:
                ckpt.prune_checkpoints(a.output, a.keep_last)
                self.task.on_save(path, a.output)
        barrier()
        if best:
            self.best_checkpoint = path
        else:
            self.last_checkpoint = path

    def _checkpoint(self, rng_all: list, final: dict | None) -> dict:
        """Everything a resumed run needs, as tensors and plain values (loadable with ``weights_only=True``)."""
        return {"format": ckpt.CHECKPOINT_FORMAT, "version": 2, "task": self.task.name, "step": self.step,
                "total_steps": self.total_steps, "run": _plain(self.run_settings()),
                "model": self.task.model.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "lr_scheduler": self.lr_schedule.state_dict(),
                "prepbn": self.prepbn.state_dict() if self.prepbn is not None else None,
                "rng": rng_all, "position": self.task.state_dict(), "bad_steps": self.bad_steps,
                "best_score": self.best_score, "final": final, **self.task.checkpoint_extras()}

    def _maybe_inject_fault(self) -> None:
        """``SLAB_FAULT_AT_STEP``: kill this rank after that step (tests of torchrun --max-restarts)."""
        if self.fault_step is not None and self.step == self.fault_step:
            self.bar.close()
            print(f"{self.task.program}: {FAULT_ENV}={self.fault_step}: killing rank {self.dist.rank} (injected "
                  f"fault)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _plain(value):
    # YAML, JSON and the CLI give lists where Python callers give tuples: compare them alike.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
