"""Evaluation (top-1, loss) and BatchNorm recalibration."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.distributed import all_reduce_sum
from ..engine.trainer import autocast_context
from ..layers.norm import PRepBN, TokenBatchNorm

__all__ = ["evaluate", "recalibrate_bn", "autocast_context"]


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device | None = None, amp: str | None = None,
             max_batches: int | None = None, reduce: bool | None = None) -> dict:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` (in eval mode) over ``loader``.

    Args:
        loader: yields ``(images, labels)`` batches.
        device: where to run (default: the model's).
        amp: ``'bf16'``/``'fp16'`` autocast, or None.
        max_batches: stop after this many batches.
        reduce: sum the counts over all processes (default: when a process group is initialised;
            each process must then see its own shard of the data, e.g. :class:`slab.data.ShardSampler`).

    Returns ``{'top1': float, 'loss': float, 'n': int}``. The model's train/eval mode is restored.
    """
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast_context(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=-1) == y).sum().double()
            count += y.numel()
    finally:
        model.train(was_training)
    if reduce is None:
        reduce = torch.distributed.is_available() and torch.distributed.is_initialized()
    stats = torch.stack([correct, loss_sum, count])
    if reduce:
        all_reduce_sum(stats)
    correct, loss_sum, count = stats.tolist()
    if count == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"top1": 100.0 * correct / count, "loss": loss_sum / count, "n": int(count)}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int, device: str | torch.device | None = None,
                   amp: str | None = None, reduce: bool | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics over ``num_batches`` batches of ``loader``.

    Everything else stays frozen in eval mode: no dropout or drop-path, no parameter update, and
    PRepBN layers run their RepBN branch only (as in eval: the LN branch plays no part). Each BN's
    statistics are reset and re-accumulated as a cumulative average (``momentum=None``), so the
    result is the plain mean of per-batch statistics, independent of the order of the batches. With
    ``reduce`` (default: when a process group is initialised) the statistics are averaged over all
    processes afterwards. The model's modes and momenta are restored; returns the number of
    batches used.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    device = _device_of(model, device)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm with running statistics to recalibrate")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    prepbn_lams = {m: m.lam_value for m in model.modules() if isinstance(m, PRepBN)}
    used = 0
    try:
        model.eval()
        for m in prepbn_lams:
            m.set_lambda(0.0)  # eval already routes through RepBN only; this makes it explicit
        for m in model.modules():
            if isinstance(m, TokenBatchNorm):
                m.train()  # its own checks and masked statistics follow the training path
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x, *_ in loader:
            if used >= num_batches:
                break
            x = x.to(device, non_blocking=True)
            with autocast_context(device, amp):
                model(x)
            used += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, mom in momenta.items():
            m.momentum = mom
        for m, lam in prepbn_lams.items():
            m.set_lambda(lam)
    if used == 0:
        raise ValueError("recalibrate_bn: the loader yielded no batches")
    if reduce is None:
        reduce = torch.distributed.is_available() and torch.distributed.is_initialized()
    if reduce:
        world = torch.distributed.get_world_size()
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                all_reduce_sum(buf)
                buf.div_(world)
    return used
