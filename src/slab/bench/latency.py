"""Latency of whole models, measured side by side (interleaved) in one process."""
from __future__ import annotations

import torch
import torch.nn as nn

from .timing import Timing, compare

__all__ = ["model_latency", "count_params", "count_gflops"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward GFLOPs (2 x multiply-adds of matmuls/convs/attention) by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def model_latency(models: dict[str, object], x: torch.Tensor, repeats: int = 20, warmup: int = 2,
                  max_time: float | None = None) -> dict[str, Timing]:
    """Forward latency of each callable on ``x`` (``torch.no_grad``), interleaved round-robin."""
    for m in models.values():
        if isinstance(m, nn.Module) and m.training:
            raise ValueError("model_latency expects models in eval mode")
    return compare({name: (lambda m=m: m(x)) for name, m in models.items()}, repeats=repeats, warmup=warmup,
                   max_time=max_time)
