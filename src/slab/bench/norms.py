"""Training cost of PRepBN: the norm alone and a whole model's training step.

Compared side by side (interleaved) in one process:

* the norm alone, forward + backward on a block-sized input ``[B, N, C]``: LayerNorm, plain BN
  (:class:`slab.TokenBatchNorm`), RepBN, PRepBN in the transition (``0 < lam < 1``) and after it
  (``lam == 0``);
* a whole training step (forward, backward, SGD step) of a model built with ``norm='ln'``, ``'bn'``
  and ``'prepbn'`` (at ``lam = 0.5`` and ``lam = 0``).

Targets (issue 8): PRepBN in the transition <= 1.10x the LayerNorm step, after it <= 1.02x the BN step.

On a CUDA GPU, :func:`prepbn_gpu_cost` times the op itself (:func:`slab.ops.prepbn_mix`, ``impl='torch'`` vs
``impl='triton'``) against LayerNorm at token-tensor shapes of the vision models, in float32, float16 and
bfloat16, and records the Triton error against the float32 reference; without a GPU it records why it was
skipped.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.norm import PRepBN, RepBN, TokenBatchNorm, set_prepbn_lambda
from ..ops import prepbn_mix, prepbn_mix_reference
from .timing import compare

__all__ = ["norm_training_cost", "model_training_cost", "prepbn_gpu_cost"]


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


# ---------------------------------------------------------------- GPU: the PRepBN op, torch vs Triton
def _prepbn_gpu_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible: run `slab bench --sections prepbn_gpu` on a machine with one"
    try:
        from ..ops import triton_prepbn  # noqa: F401
    except ImportError as e:
        return f"triton cannot be imported: {e}"
    return None


def _prepbn_gpu_row(tokens: int, channels: int, dtype: torch.dtype, repeats: int, max_time: float | None) -> dict:
    """Forward and forward + backward ms of LayerNorm and the PRepBN op (transition and after), and the error."""
    g = torch.Generator(device="cuda").manual_seed(tokens + channels)
    x = torch.randn(tokens, channels, generator=g, device="cuda", dtype=dtype) * 2 + 1
    grad = torch.randn_like(x)
    params = [torch.ones(channels, device="cuda", dtype=dtype), torch.zeros(channels, device="cuda", dtype=dtype),
              torch.ones(channels, device="cuda", dtype=dtype), torch.zeros(channels, device="cuda", dtype=dtype),
              torch.ones(1, device="cuda", dtype=dtype)]
    running = (torch.zeros(channels, device="cuda"), torch.ones(channels, device="cuda"))
    lam = torch.tensor(0.5, device="cuda")

    def mix(impl, lam_t):
        return lambda x, p: prepbn_mix(x, *p, lam_t, *running, 0.1, 1e-5, 1e-6, impl=impl)

    ops = {"LayerNorm": lambda x, p: F.layer_norm(x, (channels,), p[0], p[1], 1e-6)}
    for impl in ("torch", "triton"):
        ops[f"PRepBN {impl} (lam=0.5)"] = mix(impl, lam)
        ops[f"PRepBN {impl} (lam=0)"] = mix(impl, None)
    xg = x.clone().requires_grad_()
    pg = [p.clone().requires_grad_() for p in params]

    def step(op):
        # LayerNorm leaves the BN parameters and alpha out of its graph.
        return lambda: torch.autograd.grad(op(xg, pg), [xg, *pg], grad, allow_unused=True)

    errors = {}
    for name, op in list(ops.items()):  # a path that cannot run this dtype is reported, not timed
        try:
            step(op)()
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
            del ops[name]
    with torch.no_grad():
        fwd = compare({name: (lambda op=op: op(x, params)) for name, op in ops.items()},
                      repeats=repeats, max_time=max_time, device="cuda")
    fb = compare({name: step(op) for name, op in ops.items()}, repeats=repeats, max_time=max_time, device="cuda")
    ref = prepbn_mix_reference(x.float(), *(p.float() for p in params), lam, running[0].clone(), running[1].clone(),
                               0.1, 1e-5, 1e-6)
    out = prepbn_mix(x, *params, lam, running[0].clone(), running[1].clone(), 0.1, 1e-5, 1e-6, impl="triton")
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    return {"tokens": tokens, "channels": channels, "dtype": str(dtype).removeprefix("torch."),
            "forward_ms": {name: t.robust * 1e3 for name, t in fwd.items()},
            "forward_backward_ms": {name: t.robust * 1e3 for name, t in fb.items()},
            "not_run": errors, "triton_rel_error_vs_reference": err}


def prepbn_gpu_cost(shapes: tuple[tuple[int, int], ...] = ((64 * 197, 192), (64 * 197, 384), (64 * 197, 768),
                                                            (64 * 3136, 96)),
                    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16"), repeats: int = 50,
                    max_time: float | None = 20.0) -> dict:
    """GPU latency (ms) of the PRepBN training op (:func:`slab.ops.prepbn_mix`, torch and Triton, in the
    transition ``lam = 0.5`` and after it) and of LayerNorm, on ``[tokens, channels]`` inputs.

    ``shapes`` default to DeiT-T/S/B blocks and Swin-T's first stage at batch 64. Forward and forward +
    backward, synchronised after every call. Returns ``{"skipped": why}`` without a CUDA GPU or Triton.
    """
    why = _prepbn_gpu_unavailable()
    if why is not None:
        return {"skipped": why}
    rows = [_prepbn_gpu_row(m, c, getattr(torch, dt), repeats, max_time) for dt in dtypes for m, c in shapes]
    return {"unit": "ms", "gpu": torch.cuda.get_device_name(0), "rows": rows}
