"""The PRepBN schedule: lam as a function of the optimizer step.

``lam = 1`` for the first ``warmup_steps`` steps (LayerNorm only), then decays linearly to 0 over
``transition_steps`` steps (``lam = r0 * remaining / T``), then stays 0 (RepBN only). The authors
decrement counters inside every training forward, so gradient accumulation, extra forwards or
evaluation in train mode shift their schedule; here the step is the optimizer step, held by this
object, saved and restored with the rest of a checkpoint.
"""
from __future__ import annotations

import math

import torch.nn as nn

from .layers.norm import set_prepbn_lambda


class PRepBNSchedule:
    """Drives ``lam`` of every PRepBN of ``model`` from the optimizer step.

    Args:
        model: the model whose PRepBN layers are driven (may be None to only compute values).
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps with ``lam = 1``.
        transition_steps: length ``T`` of the linear decay, in steps; or
        transition_fraction: ``T`` as a fraction of ``total_steps`` (default 0.8, what worked for
            the authors' users; an absolute T tuned for one batch size diverged at another).
        r0: the value of lam when the decay starts (the authors use 1).

    Call :meth:`step` once after each ``optimizer.step()``.
    """

    def __init__(self, model: nn.Module | None, total_steps: int, warmup_steps: int = 0,
                 transition_steps: int | None = None, transition_fraction: float | None = None, r0: float = 1.0):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if transition_steps is not None and transition_fraction is not None:
            raise ValueError("give transition_steps or transition_fraction, not both")
        if transition_steps is None:
            frac = 0.8 if transition_fraction is None else float(transition_fraction)
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"transition_fraction must be in [0, 1], got {frac}")
            transition_steps = int(math.floor(frac * total_steps))
        if transition_steps < 0:
            raise ValueError(f"transition_steps must be >= 0, got {transition_steps}")
        if warmup_steps + transition_steps > total_steps:
            raise ValueError(
                f"the PRepBN transition would end after training: warmup {warmup_steps} + transition "
                f"{transition_steps} > total {total_steps} steps. Models whose transition never ends are "
                f"evaluated with a BN branch that was never trained alone (the authors' users got NaN this way). "
                f"Use a shorter transition, e.g. --prepbn-transition 0.8 (a fraction of the total steps).")
        self.model = model
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.transition_steps = int(transition_steps)
        self.r0 = float(r0)
        self.last_step = 0
        self.apply()

    def lam_at(self, step: int) -> float:
        """lam used by the forward passes of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return 1.0
        if self.transition_steps == 0:
            return 0.0
        remaining = self.transition_steps - (step - self.warmup_steps)
        return max(0.0, self.r0 * remaining / self.transition_steps)

    @property
    def lam(self) -> float:
        return self.lam_at(self.last_step)

    def apply(self) -> None:
        if self.model is not None:
            set_prepbn_lambda(self.model, min(1.0, self.lam))

    def step(self) -> float:
        """Advance one optimizer step and apply the new lam; returns it."""
        self.last_step += 1
        self.apply()
        return self.lam

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "transition_steps": self.transition_steps, "r0": self.r0}

    def load_state_dict(self, state: dict) -> None:
        for key in ("total_steps", "warmup_steps", "transition_steps", "r0"):
            if key in state:
                setattr(self, key, type(getattr(self, key))(state[key]))
        self.last_step = int(state["last_step"])
        self.apply()

    def __repr__(self) -> str:
        return (f"PRepBNSchedule(step={self.last_step}, lam={self.lam:.4f}, warmup={self.warmup_steps}, "
                f"transition={self.transition_steps}, total={self.total_steps})")
