"""PRepBN's training-time mix as one op: ``lam * LN(x) + (1 - lam) * (BN(x) + alpha * x)`` on ``[M, C]`` tokens.

``LN`` is an affine LayerNorm over the channels of each token; ``BN`` uses the batch statistics of each
channel over the ``M`` tokens and updates the running statistics (as ``nn.BatchNorm1d`` in training does);
``alpha`` is RepBN's scalar. Three implementations of one contract:

* :func:`slab.ops.naive.prepbn_mix_reference`: the specification, plain autograd ops, for tests;
* ``impl='torch'``: :class:`_ProgressiveBNFunction` below, PyTorch's native normalization kernels with a
  hand-written backward (what :meth:`slab.layers.RepBN.progressive` has always run);
* ``impl='triton'``: the fused kernels of :mod:`slab.ops.triton_prepbn`.

Not covered by this op (the layers never send these here; they compose modules instead): RMSNorm as the LN
branch (the language models), the causal / first-token RepBN variant, masked (padding-aware) statistics,
SyncBatchNorm, the channel layout, and ``0 < lam`` with a LayerNorm that has no affine parameters.
"""
from __future__ import annotations

import torch

from .dispatch import IMPLS, choose_impl, load_kernels

__all__ = ["prepbn_mix", "IMPLS"]

class _ProgressiveBNFunction(torch.autograd.Function):
    """Training-mode ``lam * LN(x) + (1 - lam) * (BN(x) + alpha * x)`` on ``[M, C]`` tokens, ``0 <= lam < 1``.

    Built from PyTorch's native normalization kernels with as few passes over ``x`` as eager mode
    allows (the plain composition needs about three times as many):

    * forward: one ``native_batch_norm`` for the per-channel batch statistics (it also updates the
      running statistics); the BN branch and ``alpha`` become a per-channel affine ``x * s + t``;
      ``t`` rides in the bias of one ``native_layer_norm`` (weight ``lam * g``) and ``x * s`` is
      added in place. With ``lam == 0`` the LN is skipped and the output is one ``addcmul``;
    * backward: ``native_layer_norm_backward`` and ``native_batch_norm_backward`` (whose weight
      carries the ``lam`` mix), plus ``alpha * grad``; ``d alpha = sum(grad * x)`` comes for free from
      the BN weight and bias gradients: ``sum_n grad x = d_gamma / invstd + mean * d_beta``.
    """

    @staticmethod
    def forward(ctx, x2d, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam, running_mean, running_var,
                factor: float, bn_eps: float, ln_eps: float, use_ln: bool):
        # Batch statistics (and the running-statistics update) from the native kernel; its output is unused.
        _, mean, invstd = torch.native_batch_norm(x2d, None, None, running_mean, running_var, True, factor, bn_eps)
        keep = 1.0 - lam
        k = bn_weight * invstd
        scale = (k + alpha) * keep
        shift = (bn_bias - mean * k) * keep
        if use_ln:
            y, mu, rstd = torch.native_layer_norm(x2d, (x2d.shape[1],), ln_weight * lam, ln_bias * lam + shift,
                                                  ln_eps)
            y.addcmul_(x2d, scale)
        else:
            y, mu, rstd = torch.addcmul(shift, x2d, scale), None, None
        ctx.use_ln, ctx.bn_eps = use_ln, bn_eps
        ctx.save_for_backward(x2d, ln_weight, bn_weight, alpha, lam, mean, invstd, mu, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, ln_weight, bn_weight, alpha, lam, mean, invstd, mu, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        keep = 1.0 - lam
        need_x = ctx.needs_input_grad[0]
        dx, d_bnw, d_bnb = torch.ops.aten.native_batch_norm_backward(
            grad, x2d, bn_weight * keep, None, None, mean, invstd, True, ctx.bn_eps, [need_x, True, True])
        # d_bnw, d_bnb are sum(grad * xhat), sum(grad): gradients w.r.t. the weight/bias passed.
        d_alpha = (keep * ((d_bnw / invstd) + mean * d_bnb).sum()).reshape(alpha.shape)
        d_lnw = d_lnb = None
        if ln_weight is not None and not ctx.use_ln:
            # An inactive LN branch (lam == 0) passed in only to receive zero gradients (see PRepBN).
            d_lnw, d_lnb = torch.zeros_like(ln_weight), torch.zeros_like(ln_weight)
        if ctx.use_ln:
            dx_ln, g_lnw, g_lnb = torch.ops.aten.native_layer_norm_backward(
                grad, x2d, [x2d.shape[1]], mu, rstd, ln_weight * lam, ln_weight, [need_x, True, True])
            d_lnw, d_lnb = g_lnw * lam, g_lnb * lam
            if need_x:
                dx.add_(dx_ln)
        if need_x:
            dx.addcmul_(grad, alpha * keep)
        return (dx if need_x else None, d_lnw, d_lnb, d_bnw * keep, d_bnb * keep, d_alpha, None, None, None,
                None, None, None, None)


def _check(x2d, ln_weight, ln_bias, lam) -> None:
    if x2d.dim() != 2:
        raise ValueError(f"prepbn_mix expects tokens x channels [M, C]; got shape {tuple(x2d.shape)}")
    if lam is not None and (ln_weight is None or ln_bias is None):
        raise ValueError("prepbn_mix: the LN branch (lam given) needs an affine LayerNorm: ln_weight and ln_bias")


def _triton_module():
    """``slab.ops.triton_prepbn``, imported on first use (importing Triton is slow)."""
    from . import triton_prepbn
    return triton_prepbn


def prepbn_mix(x2d: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
               bn_weight: torch.Tensor, bn_bias: torch.Tensor, alpha: torch.Tensor, lam: torch.Tensor | None,
               running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, bn_eps: float,
               ln_eps: float, impl: str | None = None) -> torch.Tensor:
    """Training-time ``lam * LN(x) + (1 - lam) * (BN(x) + alpha * x)`` on ``x2d`` ``[M, C]``.

    Args:
        x2d: ``[M, C]`` tokens x channels (any strides; the torch path copies non-contiguous input once).
        ln_weight, ln_bias: the LayerNorm's ``[C]`` affine parameters. With ``lam`` None they may still be given:
            they then receive exact zero gradients (PRepBN's inactive branch, for DDP).
        bn_weight, bn_bias: the BatchNorm's ``[C]`` affine parameters; ``alpha``: RepBN's ``[1]`` scalar.
        lam: 0-dim tensor in ``[0, 1)``, or None for 0 with the LN not computed at all.
        running_mean, running_var: ``[C]`` updated in place from the batch statistics, as
            ``torch.native_batch_norm`` does: ``r = (1 - momentum) r + momentum * stat``, the variance unbiased
            (NaN for ``M == 1``, 0/0, as there).
        momentum: the exponential-average factor of this step (BatchNorm's ``exponential_average_factor``).
        impl: ``'torch'`` (native kernels, any device and dtype), ``'triton'`` (:mod:`slab.ops.triton_prepbn`:
            CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; float32/float16/bfloat16 ``x``,
            ``C <= 8192``) or None: Triton for CUDA inputs it covers when ``SLAB_TRITON=1`` is set, else torch.

    Returns:
        ``[M, C]`` in ``x2d``'s dtype. Differentiable in ``x2d`` and the five parameters (not in ``lam``).
    """
    _check(x2d, ln_weight, ln_bias, lam)
    # Automatic: Triton only where the shared opt-in allows it and the kernels cover these inputs; everything
    # else (float64, very wide C, CPU) takes the torch path.
    if choose_impl("prepbn_mix", impl, _triton_module, x2d, x2d, ln_weight, ln_bias, bn_weight, bn_bias, alpha,
                   lam) == "triton":
        return load_kernels("prepbn_mix", _triton_module).prepbn_mix_triton(x2d, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam, running_mean,
                                         running_var, momentum, bn_eps, ln_eps)
    use_ln = lam is not None
    lam_t = lam.to(x2d.dtype) if use_ln else x2d.new_zeros(())
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    return _ProgressiveBNFunction.apply(x2d, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam_t, running_mean,
                                        running_var, momentum, bn_eps, ln_eps, use_ln)
