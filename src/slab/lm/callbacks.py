"""PRepBN inside transformers' ``Trainer``: the schedule driven by the optimizer step.

``Trainer`` counts optimizer steps in ``state.global_step`` (restored on ``resume_from_checkpoint``) and calls
``on_step_end`` once per optimizer step, after all micro-batches of gradient accumulation. The callback sets
every PRepBN's ``lam`` from that count, so the forwards of optimizer step ``s`` use ``lam(s)`` whatever
``gradient_accumulation_steps`` is, and a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

from transformers import TrainerCallback

from ..schedule import PRepBNSchedule

__all__ = ["PRepBNCallback"]


class PRepBNCallback(TrainerCallback):
    """Drive every PRepBN of the trained model from ``state.global_step``.

    Args are those of :class:`slab.PRepBNSchedule` (``total_steps`` is the Trainer's ``max_steps``):
    ``warmup_steps`` with ``lam = 1``, then a linear decay over ``transition_steps`` steps, or over
    ``transition_fraction`` of the run (default 0.8), from ``r0``. With ``calibration_batches`` (a list of
    ``(input_ids, attention_mask or None)``), every RepBN branch is calibrated against the model's RMSNorm form
    when ``lam`` first drops below 1 (``bn_init='calibrate'`` of ``slab train-lm``; the authors' zero branches
    otherwise).
    """

    def __init__(self, warmup_steps: int = 0, transition_steps: int | None = None,
                 transition_fraction: float | None = None, r0: float = 1.0, calibration_batches: list | None = None):
        self.kwargs = dict(warmup_steps=warmup_steps, transition_steps=transition_steps,
                           transition_fraction=transition_fraction, r0=r0)
        self.calibration_batches = calibration_batches
        self.schedule: PRepBNSchedule | None = None
        self.calibrated = False

    def _sync(self, state) -> None:
        self.schedule.last_step = state.global_step
        self.schedule.apply()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("PRepBNCallback needs the Trainer's model")
        if state.max_steps <= 0:
            raise ValueError("PRepBNCallback needs a known number of optimizer steps (set max_steps or "
                             "num_train_epochs with a sized dataset)")
        self.schedule = PRepBNSchedule(model, total_steps=state.max_steps, **self.kwargs)
        # a run resumed after the switch has its calibrated branches in the checkpoint
        self.calibrated = state.global_step > self.schedule.warmup_steps
        self._sync(state)  # a resumed run starts at the restored global_step
        self._maybe_calibrate(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._sync(state)  # global_step already counts the step that just ended: lam of the next one
        self._maybe_calibrate(model)

    def _maybe_calibrate(self, model) -> None:
        if self.calibration_batches is None or self.calibrated or self.schedule.lam >= 1.0:
            return
        from .train import init_bn_branches
        device = next(model.parameters()).device
        batches = [(ids.to(device), None if mask is None else mask.to(device)) for ids, mask in self.calibration_batches]
        init_bn_branches(model, "calibrate", batches)
        model.train()
        self.calibrated = True

    @property
    def lam(self) -> float | None:
        return None if self.schedule is None else self.schedule.lam
