"""Simplified linear attention (SLA), the production path.

Same signature and result as :func:`slab.ops.naive.linear_attention_reference`:
``relu(q) (relu(k)^T v) / (relu(q) sum_j relu(k_j) + eps)`` per batch and head. What makes it
faster than the plain einsum chain:

* associativity chosen by shape: ``q (k^T v)`` costs ``O(N d^2)``, ``(q k^T) v`` costs
  ``O(N^2 d)``; we take the cheaper one (only very short sequences prefer the second);
* ``kv = k^T v`` and ``ks = sum_j k_j`` are tiny (``[d, dv]``, ``[d]``); the normaliser ``q ks + eps``
  comes from one batched matrix-vector product, and the division runs in place on the last product,
  so the output is written once, contiguous, with no ``torch.cat`` of ones and no slicing;
* a custom autograd Function with a hand-written backward (skipped when no gradient is needed) that saves
  only ``q``, ``k``, ``v`` (plus the tiny ``kv`` and ``ks``), recomputing the ReLUs and the normaliser: the
  einsum chain's autograd keeps several ``[B, H, N, d]`` intermediates alive and its backward is an order of
  magnitude slower;
* everything is computed in float32 (float64 for float64 inputs) with autocast disabled: the ReLU
  kernel is unbounded and the sums over N overflow in half precision. Half-precision inputs are cast
  once and the output is cast back to ``q``'s dtype.

``impl='triton'`` (automatic for CUDA inputs) runs the fused Triton kernels of
:mod:`slab.ops.triton_linear_attention` instead; the path described above is ``impl='torch'``.

:func:`linear_attention_compiled` is an optional ``torch.compile`` path (needs a C++ compiler on
CPU): inductor fuses the ReLUs, the normaliser and the division into the surrounding loops.
"""
from __future__ import annotations

import contextlib

import torch

from .dispatch import IMPLS, choose_impl, load_kernels, triton_auto_allowed  # noqa: F401 (re-exported)

__all__ = ["linear_attention", "linear_attention_compiled", "kv_first", "triton_auto_allowed", "IMPLS"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"linear_attention expects q, k, v of shape [B, heads, N, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "linear_attention: q [B,H,Nq,D], k [B,H,Nk,D] and v [B,H,Nk,Dv] must agree on B, H, D and Nk; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def kv_first(nq: int, nk: int, d: int, dv: int) -> bool:
    """True when ``q (k^T v)`` needs fewer multiply-adds than ``(q k^T) v`` (normaliser included)."""
    cost_kv_first = nk * d * (dv + 1) + nq * d * (dv + 1)
    cost_qk_first = nq * nk * d + nq * nk * (dv + 1)
    return cost_kv_first <= cost_qk_first


def _no_autocast(device: torch.device):
    """Autocast off on ``device``; nothing to switch on the meta device (shape-only runs), which autocast
    does not know."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 input (never half precision)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kv_state(k3r: torch.Tensor, v3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv = relu(k)^T v`` ``[S, D, Dv]`` and ``ks = sum_j relu(k_j)`` as ``[S, D, 1]``."""
    kv = torch.bmm(k3r.transpose(1, 2), v3)
    ks = k3r.sum(dim=1).unsqueeze(-1)
    return kv, ks


def _denominator(q3r: torch.Tensor, ks: torch.Tensor, eps: float) -> torch.Tensor:
    """``relu(q) ks + eps`` as ``[S, Nq, 1]``: a batched matrix-vector product, then ``eps`` in place on the tiny
    result (``baddbmm`` with a broadcast ``eps`` costs twice the product at 196 tokens)."""
    return torch.bmm(q3r, ks).add_(eps)


def _relu_into(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(x)`` written into a contiguous buffer (``out``, or a new one), whatever ``x``'s strides.

    ``torch.relu`` would keep the strides of a permuted head view (``[B, N, H, d]`` memory), which the
    batched products then have to copy again: one pass instead of two.
    """
    if torch.compiler.is_compiling():
        # torch.compile / torch.export: ``out=`` is functionalized with the input's strides; plain ops.
        return torch.relu(x).contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.clamp_min(x, 0.0, out=out)


def _kv_first_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q (k^T v)`` forward on ``[B, H, N, D]`` tensors of any strides: the output ``[B, H, Nq, Dv]`` and the
    state ``kv`` ``[S, D, Dv]``, ``ks`` ``[S, D, 1]`` (``S = B * H``) the backward needs. Two
    ``[B, H, N, D]``-sized buffers, one of them the output."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    s = b * h
    buf = _relu_into(k)
    # reshape, not view: a view in eager (the buffers are contiguous), and exporters that
    # functionalize ``out=`` may hand back other strides.
    kv, ks = _kv_state(buf.reshape(s, nk, d), v.reshape(s, nk, dv))
    # relu(q) into the same buffer when it fits (self-attention); the division then runs in place on the
    # product, the output's only buffer (dividing the rows of relu(q) first measured slower: issue 16).
    qr = _relu_into(q, buf if q.shape == k.shape else None).reshape(s, nq, d)
    den = _denominator(qr, ks, eps)
    return torch.bmm(qr, kv).div_(den).reshape(b, h, nq, dv), kv, ks


class _LinearAttentionKVFirst(torch.autograd.Function):
    """``q (k^T v)`` association with a hand-written backward, on ``[B, H, N, D]`` tensors of any strides.

    Saves only q, k, v (the views it was given: no copy) and the tiny ``kv`` ``[S, D, Dv]`` and ``ks``
    ``[S, D, 1]``; the ReLUs and the normaliser are recomputed in the backward. Large temporaries are few
    and reused (``out=`` and in-place ops on buffers this function owns): the forward allocates two
    ``[B, H, N, D]``-sized buffers (one is the output), the backward four (three are the gradients).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
        out, kv, ks = _kv_first_forward(q, k, v, eps)
        ctx.save_for_backward(q, k, v, kv, ks)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, kv, ks = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        b, h, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[3]
        s_ = b * h
        dq = dk = dv_ = None
        with _no_autocast(grad.device):
            grad = grad.to(q.dtype).reshape(s_, nq, dv)
            # out = num / den with num = qr kv, den = qr ks + eps, gd = grad / den:
            #   d qr = gd kv^T - s ks^T  with  s = gd . out = (qr . (gd kv^T)) / den   (row-wise dots)
            #   d kv = qr^T gd,  d ks = -qr^T s,  d kr = v d kv^T + d ks^T,  d v = kr d kv
            qr = _relu_into(q).reshape(s_, nq, d)                    # buffer A
            den = _denominator(qr, ks, ctx.eps)
            gd = grad / den                                       # buffer B
            g_kv = torch.bmm(gd, kv.transpose(1, 2))              # buffer C: [S, Nq, D]
            s = torch.linalg.vecdot(qr, g_kv).unsqueeze(-1).div_(den)
            if need_q:
                g_kv.baddbmm_(s, ks.transpose(1, 2), alpha=-1.0)  # C = d qr
                c4 = g_kv.view(b, h, nq, d)
                dq = torch.ops.aten.threshold_backward.grad_input(c4, q, 0.0, grad_input=c4)
            del g_kv
            if need_k or need_v:
                dkv = torch.bmm(qr.transpose(1, 2), gd)           # [S, D, Dv]
                dks = torch.bmm(qr.transpose(1, 2), s).neg_()     # [S, D, 1]
                if need_k:
                    v3 = v.reshape(s_, nk, dv)
                    dkr = torch.bmm(v3, dkv.transpose(1, 2), out=qr) if q.shape == k.shape else \
                        torch.bmm(v3, dkv.transpose(1, 2))        # reuse A for d kr when it fits
                    dkr.add_(dks.transpose(1, 2))
                    a4 = dkr.view(b, h, nk, d)
                    dk = torch.ops.aten.threshold_backward.grad_input(a4, k, 0.0, grad_input=a4)
                if need_v:
                    kr = _relu_into(k, gd.view(k.shape) if gd.shape == (s_, nk, d) else None)  # reuse B
                    dv_ = torch.bmm(kr.reshape(s_, nk, d), dkv).view(b, h, nk, dv)
        return dq, dk, dv_, None


def _qk_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """``(q k^T) v`` association (very short sequences), through ordinary autograd ops."""
    qr, kr = torch.relu(q), torch.relu(k)
    scores = qr @ kr.transpose(-2, -1)                         # [.., Nq, Nk]
    den = scores.sum(dim=-1, keepdim=True).add_(eps)
    return (scores @ v).div_(den)


def _triton_module():
    """``slab.ops.triton_linear_attention``, imported on first use (importing Triton is slow)."""
    from . import triton_linear_attention
    return triton_linear_attention


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                     impl: str | None = None) -> torch.Tensor:
    """SLA core: ``relu(q) (relu(k)^T v) / (relu(q) sum_j relu(k_j) + eps)``.

    Args:
        q: ``[B, H, Nq, D]`` queries before the kernel.
        k: ``[B, H, Nk, D]`` keys before the kernel (positional encoding already added).
        v: ``[B, H, Nk, Dv]`` values.
        eps: added to the normaliser (the authors use 1e-6).
        impl: ``'torch'`` (batched products, any device and dtype), ``'triton'`` (the fused kernels of
            :mod:`slab.ops.triton_linear_attention`: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
            float32/float16/bfloat16, ``D, Dv <= 128``) or None: Triton for CUDA inputs it supports when Triton
            imports, else torch.

    Returns:
        ``[B, H, Nq, Dv]`` in ``q``'s dtype (state and normaliser in float32, or float64 for float64 input
        on the torch path). Differentiable in q, k and v.
    """
    if torch.jit.is_scripting():
        # TorchScript compiles only this branch: the plain-op torch path (no autograd Function, no Triton).
        return _linear_attention_scripted(q, k, v, eps)
    return _linear_attention_dispatch(q, k, v, eps, impl)


def _linear_attention_dispatch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                               impl: str | None) -> torch.Tensor:
    """Eager :func:`linear_attention`: checks the shapes, then the Triton kernels or the torch path."""
    _check(q, k, v)
    if choose_impl("linear_attention", impl, _triton_module, q, q, k, v) == "triton":
        return load_kernels("linear_attention", _triton_module).linear_attention_triton(q, k, v, eps)
    return _linear_attention_torch(q, k, v, eps)


def _linear_attention_scripted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch path in TorchScript: the same plain ops the tracer records (see :func:`_linear_attention_torch`),
    computed in float32 (float64 for float64 input) and returned in ``q``'s dtype."""
    out_dtype = q.dtype
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    if kv_first(q.shape[2], k.shape[2], q.shape[3], v.shape[3]):
        out = _composite(qf, kf, vf, float(eps))
    else:
        out = _qk_first(qf, kf, vf, float(eps))
    return out.to(out_dtype)


def _linear_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch path: computed in float32 (float64 for float64 input) with autocast off."""
    out_dtype = q.dtype
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    ct = _compute_dtype(q)
    with _no_autocast(q.device):
        qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
        eps = float(eps)
        if not kv_first(nq, nk, d, dv):
            out = _qk_first(qf, kf, vf, eps)
        elif torch.jit.is_tracing() or torch.jit.is_scripting():
            out = _composite(qf, kf, vf, eps)  # the TorchScript tracer / ONNX exporter cannot see into a Function
        elif torch.is_grad_enabled() and (qf.requires_grad or kf.requires_grad or vf.requires_grad):
            out = _LinearAttentionKVFirst.apply(qf, kf, vf, eps)
        else:
            out = _kv_first_forward(qf, kf, vf, eps)[0]  # no gradients: the Function's bookkeeping is overhead
    return out.to(out_dtype)


def _composite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    # The same math in plain differentiable ops, for torch.compile to fuse (no custom Function).
    ct = _compute_dtype(q)
    qr, kr, vf = torch.relu(q.to(ct)), torch.relu(k.to(ct)), v.to(ct)
    kv = kr.transpose(-2, -1) @ vf
    den = qr @ kr.sum(dim=-2).unsqueeze(-1) + eps
    return ((qr @ kv) / den).to(q.dtype)


_compiled = None


def linear_attention_compiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`linear_attention` through ``torch.compile`` (compiled on first use; optional fast path).

    Needs a working inductor backend (a C++ compiler on CPU). Only the ``q (k^T v)`` association is
    compiled; shapes that prefer ``(q k^T) v`` use the eager path.
    """
    global _compiled
    _check(q, k, v)
    if not kv_first(q.shape[2], k.shape[2], q.shape[3], v.shape[3]):
        return _linear_attention_torch(q, k, v, eps)
    if _compiled is None:
        _compiled = torch.compile(_composite, dynamic=None)
    with _no_autocast(q.device):
        return _compiled(q, k, v, float(eps))
