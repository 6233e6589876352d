"""What a task plugs into :class:`slab.engine.Trainer`: model, data, ``loss(batch)``, evaluation, recalibration.

The trainer owns everything a training run shares (processes, precision, accumulation, the non-finite
policy, clipping, EMA, the LR and PRepBN schedules, checkpoints, metrics, the progress bar); a task
owns what only it knows. Subclass :class:`Task` and override what differs from the defaults.
"""
from __future__ import annotations

import sys
from typing import Iterator

import torch
import torch.nn as nn

from ..layers.norm import PRepBN
from ..schedule import PRepBNSchedule
from .distributed import DistInfo

__all__ = ["Task"]


class Task:
    """Base class of training tasks.

    After :meth:`setup`, ``model`` (on ``dist.device``) and ``total_steps`` are set. The trainer
    then asks for the optimizer and schedules, restores a checkpoint (:meth:`load_state_dict`),
    and calls, per optimizer step: :meth:`before_step`, ``grad_accum`` x :meth:`loss` on the next
    item of :meth:`train_batches`, then :meth:`after_step`. :meth:`evaluate` runs every
    ``eval_every`` steps and at the end, after :meth:`before_final_eval`.
    """

    name = "task"                     # stored in checkpoints
    program = "slab"                  # prefix of the messages printed
    find_unused_parameters = False    # DDP: some parameters get no gradient in some steps
    model: nn.Module
    total_steps: int
    trainer = None                    # the Trainer running this task (set by it)

    # --- building ----------------------------------------------------------------------------
    def setup(self, dist: DistInfo) -> None:
        """Build the model (on ``dist.device``) and this rank's data; set ``total_steps``."""
        raise NotImplementedError

    def build_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def build_lr_schedule(self, optimizer: torch.optim.Optimizer):
        """An object with ``set(step) -> lr``, ``state_dict()``, ``load_state_dict()`` (see :mod:`.optim`)."""
        raise NotImplementedError

    def build_prepbn_schedule(self) -> PRepBNSchedule | None:
        return None

    def run_settings(self) -> dict:
        """Settings a resumed run must share with its checkpoint (shapes of the weights, the data order)."""
        return {}

    # --- training ----------------------------------------------------------------------------
    def on_train_begin(self) -> None:
        """Every rank, once the run is set up and any checkpoint restored (e.g. write the run's config)."""

    def train_batches(self) -> Iterator:
        """Micro-batches without end, from the position restored by :meth:`load_state_dict`."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch):
        """The objective of one micro-batch (run under the trainer's autocast), or ``(objective, logs)``
        where ``logs`` maps names to scalar tensors (``logs['loss']`` is what is logged and checked)."""
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        """Called before optimizer step ``step`` (0-based), e.g. to calibrate at the PRepBN switch."""

    def after_step(self, record: dict) -> None:
        """Called with each step's record (``step`` counts the steps done)."""

    def progress_info(self) -> dict:
        """Extra fields of the progress bar."""
        return {}

    # --- evaluation and the end --------------------------------------------------------------
    def evaluate(self, step: int, ema_model: nn.Module | None = None) -> dict | None:
        """An evaluation record (``{'type': 'eval', 'step': step, ...}``), or None (nothing to evaluate here)."""
        return None

    def score(self, record: dict) -> float | None:
        """Higher is better; the trainer keeps ``best.pt`` of the best-scored evaluation when not None."""
        return None

    def before_final_eval(self, step: int) -> None:
        """After the last step, before the final evaluation (e.g. BatchNorm recalibration)."""

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Task state a resumed run needs (the data position, counters); tensors and plain values only."""
        return {}

    def load_state_dict(self, state: dict, step: int) -> None:
        pass

    def checkpoint_extras(self) -> dict:
        """Further top-level entries of every checkpoint (e.g. the config its readers rebuild the model from)."""
        return {}

    def on_save(self, path: str, output: str) -> None:
        """On the main rank, after a periodic or final checkpoint was written to ``path``."""

    # --- messages ----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """Messages of the trainer (main rank only)."""
        print(f"{self.program}: {message}", file=sys.stderr, flush=True)

    def log_step(self, record: dict) -> None:
        """Every ``log_every`` steps when there is no progress bar."""
        lam = "-" if record["lam"] is None else f"{record['lam']:.4f}"
        print(f"step {record['step']}/{self.total_steps} loss {record['loss']:.4f} lr {record['lr']:.3e} lam {lam}",
              file=sys.stderr, flush=True)

    def nonfinite_message(self, step: int, lam: float | None, lr: float, loss: float,
                          last_checkpoint: str | None) -> str:
        where = (f"the last good checkpoint is {last_checkpoint}; resume from it with --resume auto after the "
                 f"change" if last_checkpoint else "no checkpoint was written yet")
        return (f"non-finite training loss ({loss}) at optimizer step {step} (lam={lam}, lr={lr:.3g}); training "
                f"stopped: lower the learning rate, clip gradients or lengthen the PRepBN transition. {where}.")


def has_prepbn(module: nn.Module) -> bool:
    return any(isinstance(m, PRepBN) for m in module.modules())
