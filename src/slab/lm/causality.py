"""Measure how much the output at a position depends on later tokens (the BatchNorm "future leak").

In eval every norm uses fixed statistics, so a causal LM is exactly causal. In training, BatchNorm
with batch statistics (``bn_stats='batch'``) normalises each token with the mean/variance of all real
tokens of the batch, including the later tokens of its own sequence: the logits at position ``t``
change when tokens after ``t`` change. ``bn_stats='causal'`` or ``'running'`` remove this.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["future_leak"]


@torch.no_grad()
def future_leak(model: nn.Module, input_ids: torch.Tensor, position: int, training: bool = True,
                seed: int = 0, replacement: torch.Tensor | None = None) -> float:
    """Max relative change of the logits at positions ``<= position`` when every token after ``position``
    is replaced by a random one, or by the tokens of ``replacement`` (same shape; e.g. other text)
    (``max|dl| / max|l|``; 0 means exactly causal).

    ``model`` is run on a copy (training mode updates BN running statistics), with ``training`` selecting
    train or eval mode. ``input_ids`` ``[B, T]`` with ``0 <= position < T - 1``.
    """
    if not 0 <= position < input_ids.shape[1] - 1:
        raise ValueError(f"position must be in [0, {input_ids.shape[1] - 1}), got {position}")
    net = copy.deepcopy(model).train(training)
    g = torch.Generator().manual_seed(seed)
    other = input_ids.clone()
    tail = other[:, position + 1:]
    if replacement is not None:
        other[:, position + 1:] = replacement[:, position + 1:].to(other.device)
    else:
        other[:, position + 1:] = torch.randint(0, net.config.vocab_size, tail.shape, generator=g).to(other.device)
    ref = net(input_ids=input_ids, use_cache=False).logits[:, : position + 1]
    net = copy.deepcopy(model).train(training)  # same running statistics as the first call
    out = net(input_ids=other, use_cache=False).logits[:, : position + 1]
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
