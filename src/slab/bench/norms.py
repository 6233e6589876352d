"""Training cost of PRepBN: the norm alone and a whole model's training step.

Compared side by side (interleaved) in one process:

* the norm alone, forward + backward on a block-sized input ``[B, N, C]``: LayerNorm, plain BN
  (:class:`slab.TokenBatchNorm`), RepBN, PRepBN in the transition (``0 < lam < 1``) and after it
  (``lam == 0``);
* a whole training step (forward, backward, SGD step) of a model built with ``norm='ln'``, ``'bn'``
  and ``'prepbn'`` (at ``lam = 0.5`` and ``lam = 0``).

Targets (issue 8): PRepBN in the transition <= 1.10x the LayerNorm step, after it <= 1.02x the BN step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.norm import PRepBN, RepBN, TokenBatchNorm, set_prepbn_lambda
from .timing import compare

__all__ = ["norm_training_cost", "model_training_cost"]


def _norms(dim: int) -> dict[str, nn.Module]:
    transition, after = PRepBN(dim), PRepBN(dim)
    transition.set_lambda(0.5)
    after.set_lambda(0.0)
    return {"LayerNorm": nn.LayerNorm(dim, eps=1e-6), "BN": TokenBatchNorm(dim), "RepBN": RepBN(dim),
            "PRepBN transition (lam=0.5)": transition, "PRepBN after (lam=0)": after}


def norm_training_cost(shape: tuple[int, int, int] = (64, 197, 384), repeats: int = 20,
                       max_time: float | None = 60.0) -> dict:
    """Forward + backward of each norm alone on ``x`` of ``shape``; times and ratios."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).requires_grad_()
    gy = torch.randn(*shape, generator=g)
    norms = {k: m.train() for k, m in _norms(shape[-1]).items()}

    def step(m: nn.Module):
        def run():
            x.grad = None
            for p in m.parameters():
                p.grad = None
            m(x).backward(gy)
        return run

    fwd = {k: (lambda m=m: m(x)) for k, m in norms.items()}
    with torch.no_grad():
        t_fwd = compare(fwd, repeats=repeats, max_time=max_time)
    t_step = compare({k: step(m) for k, m in norms.items()}, repeats=repeats, max_time=max_time)
    out = {"shape": list(shape), "forward_ms": {k: v.robust * 1e3 for k, v in t_fwd.items()},
           "forward_backward_ms": {k: v.robust * 1e3 for k, v in t_step.items()}}
    fb = out["forward_backward_ms"]
    out["ratios"] = {
        "transition_vs_ln": fb["PRepBN transition (lam=0.5)"] / fb["LayerNorm"],
        "after_vs_bn": fb["PRepBN after (lam=0)"] / fb["BN"],
        "repbn_vs_bn": fb["RepBN"] / fb["BN"],
    }
    return out


def model_training_cost(name: str = "slab_deit_small_patch16_224", batch: int = 8, img_size: int | None = None,
                        repeats: int = 5, max_time: float | None = 120.0, **kwargs) -> dict:
    """One SGD training step (forward, backward, update) of ``name`` with each norm form; times and ratios."""
    from .models import build_norm_form
    forms = {"LN": "ln", "BN": "bn", "PRepBN transition (lam=0.5)": "prepbn", "PRepBN after (lam=0)": "prepbn"}
    models, opts = {}, {}
    for label, norm in forms.items():
        torch.manual_seed(0)
        m = build_norm_form(name, norm, **kwargs).train()
        if label.startswith("PRepBN"):
            set_prepbn_lambda(m, 0.5 if "transition" in label else 0.0)
        models[label] = m
        opts[label] = torch.optim.SGD(m.parameters(), lr=1e-4)
    c, h, w = models["LN"].pretrained_cfg["input_size"]
    if img_size:
        h = w = img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=g)
    target = torch.randint(0, models["LN"].num_classes, (batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    def step(label: str):
        m, opt = models[label], opts[label]

        def run():
            opt.zero_grad(set_to_none=True)
            loss_fn(m(x), target).backward()
            opt.step()
        return run

    t = compare({k: step(k) for k in models}, repeats=repeats, warmup=1, max_time=max_time)
    ms = {k: v.robust * 1e3 for k, v in t.items()}
    return {"model": name, "batch": batch, "input": [c, h, w], "step_ms": ms, "ratios": {
        "transition_vs_ln": ms["PRepBN transition (lam=0.5)"] / ms["LN"],
        "after_vs_bn": ms["PRepBN after (lam=0)"] / ms["BN"],
        "after_vs_ln": ms["PRepBN after (lam=0)"] / ms["LN"]}}
