"""Optimizer pieces every task shares: the weight-decay split and learning-rate schedules set per optimizer step."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

__all__ = ["weight_decay_groups", "LambdaSchedule", "TimmSchedule"]


def weight_decay_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                        no_decay: Callable[[str, nn.Parameter], bool] | None = None) -> list[dict]:
    """``[decayed, not decayed]`` parameter groups of the trainable parameters.

    Vectors and scalars (biases, norm affines, RepBN alphas) are never decayed; ``no_decay(name, p)``
    names further ones (a model's ``no_weight_decay()``: position embeddings, class tokens).
    """
    decay, keep = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (keep if p.ndim <= 1 or (no_decay is not None and no_decay(name, p)) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


class LambdaSchedule:
    """``lr = base_lr * factor(step)`` for each group, set before optimizer step ``step`` (as ``LambdaLR``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float]):
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]

    def set(self, step: int) -> float:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(step)
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])


class TimmSchedule:
    """A timm scheduler (``t_in_epochs=False``) driven by the optimizer step."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def set(self, step: int) -> float:
        self.scheduler.step_update(step)
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
