"""Normalization layers of SLAB: BatchNorm for token tensors, RepBN, and progressive PRepBN.

Layouts: ``"tokens"`` means ``[B, N, C]`` (or any ``[..., C]``), ``"channels"`` means
``[B, C, H, W]``. All BatchNorm statistics are per channel over every token of the batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TokenBatchNorm", "RepBN", "PRepBN", "ChannelAffine", "RMSNorm", "get_norm_layer",
           "set_prepbn_lambda", "record_branch_gaps", "pop_branch_gap", "NORM_CHOICES"]

NORM_CHOICES = ("ln", "bn", "repbn", "prepbn", "none")
_LAYOUTS = ("tokens", "channels")


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


class TokenBatchNorm(nn.Module):
    """BatchNorm over the channel dim of token tensors: ``BN(x)``.

    ``x`` is ``[..., C]`` (layout ``"tokens"``) or ``[B, C, H, W]`` (``"channels"``). Statistics are
    taken over all tokens of the batch. With ``mask`` (``[...]`` bool, True = real token), only real
    tokens enter the statistics (padding-aware BN for language models).

    The BatchNorm lives in ``self.bn`` (an ``nn.BatchNorm1d``/``2d``), so
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` and the authors' ``*.bn.*`` keys both work.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, layout: str = "tokens"):
        super().__init__()
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        self.dim = dim
        self.layout = layout
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum) if layout == "tokens" else \
            nn.BatchNorm2d(dim, eps=eps, momentum=momentum)

    def _check(self, x: torch.Tensor) -> None:
        c = x.shape[-1] if self.layout == "tokens" else (x.shape[1] if x.dim() == 4 else None)
        if c != self.dim:
            expect = "[..., C]" if self.layout == "tokens" else "[B, C, H, W]"
            raise ValueError(f"{type(self).__name__}({self.dim}, layout={self.layout!r}) expects {expect} "
                             f"with C={self.dim}; got shape {tuple(x.shape)}")
        if self.training:
            count = x.numel() // self.dim
            if count <= 1:
                raise ValueError(
                    f"{type(self).__name__} in training mode needs more than one value per channel to estimate "
                    f"batch statistics; got input {tuple(x.shape)}. Use a larger batch (or more tokens), or call "
                    f"model.eval() to use the running statistics.")

    def _masked_bn(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Statistics from real tokens only; every token is then normalised with them.
        bn = self.bn
        flat = x.reshape(-1, self.dim)
        m = mask.reshape(-1)
        if m.shape[0] != flat.shape[0]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match tokens of shape {tuple(x.shape[:-1])}")
        if self.training:
            valid = flat[m]
            n = valid.shape[0]
            if n <= 1:
                raise ValueError(f"{type(self).__name__}: need more than one non-padding token per batch in "
                                 f"training, got {n}")
            mean = valid.mean(0)
            var = valid.var(0, unbiased=False)
            if bn.track_running_stats:
                with torch.no_grad():
                    mom = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked + 1)
                    bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), mom)
                    bn.running_var.lerp_((var.detach() * n / (n - 1)).to(bn.running_var.dtype), mom)
                    bn.num_batches_tracked.add_(1)
        else:
            mean, var = bn.running_mean, bn.running_var
        y = (flat - mean) * torch.rsqrt(var + bn.eps)
        if bn.affine:
            y = y * bn.weight + bn.bias
        return y.reshape(x.shape)

    def batch_norm(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        if mask is not None and self.layout == "tokens":
            return self._masked_bn(x, mask)
        if self.layout == "tokens":
            # [..., C] -> [M, C]: BatchNorm1d normalises dim 1 without any transpose.
            return self.bn(x.reshape(-1, self.dim)).reshape(x.shape)
        return self.bn(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.batch_norm(x, mask)

    def _fast_path(self, x: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """True when the fused kernels apply: tokens, no mask, a plain affine BatchNorm1d tracking statistics,
        float32/64 input outside autocast (SyncBatchNorm and the rest take the module path)."""
        bn = self.bn
        return (self.layout == "tokens" and mask is None and type(bn) is nn.BatchNorm1d and bn.affine
                and bn.track_running_stats and x.dtype in (torch.float32, torch.float64)
                and x.dtype == bn.weight.dtype and not torch.is_autocast_enabled(x.device.type))

    def _running_factor(self) -> float:
        """nn.BatchNorm's ``exponential_average_factor`` for this training step (bumps the counter)."""
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)

    def _eval_affine(self, alpha: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)`` with ``BN(x) + alpha * x == x * s + t`` under the running statistics."""
        bn = self.bn
        k = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return k + alpha, bn.bias - bn.running_mean * k

    def extra_repr(self) -> str:
        return f"{self.dim}, layout={self.layout!r}"


class RepBN(TokenBatchNorm):
    """Re-parameterised BatchNorm: ``RepBN(x) = BN(x) + alpha * x``.

    ``alpha`` is one learnable scalar (1 for vision models; 0, with BN weight and bias also 0, for
    the authors' language models). In eval this is the per-channel affine map
    ``x * (gamma / sqrt(var + eps) + alpha) + (beta - mean * gamma / sqrt(var + eps))``, which
    :func:`slab.fuse` folds into a neighbouring Linear/Conv.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, layout: str = "tokens",
                 alpha_init: float = 1.0):
        super().__init__(dim, eps=eps, momentum=momentum, layout=layout)
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self._fast_path(x, mask):
            self._check(x)
            if self.training:
                return self.progressive(x, None, None, None, 0.0)
            # Eval: one pass, x * (gamma * invstd + alpha) + (beta - mean * gamma * invstd).
            scale, shift = self._eval_affine(self.alpha)
            return torch.addcmul(shift, x, scale)
        return self.batch_norm(x, mask) + self.alpha * x

    def progressive(self, x: torch.Tensor, ln_weight, ln_bias, lam: torch.Tensor | None, ln_eps: float
                    ) -> torch.Tensor:
        """Training-mode ``lam * LN(x) + (1 - lam) * RepBN(x)`` through the fused kernels (``lam`` None: 0)."""
        bn = self.bn
        use_ln = lam is not None
        lam_t = lam.to(x.dtype) if use_ln else x.new_zeros(())
        x2d = x.reshape(-1, self.dim)
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        y = _ProgressiveBNFunction.apply(x2d, ln_weight, ln_bias, bn.weight, bn.bias, self.alpha, lam_t,
                                         bn.running_mean, bn.running_var, self._running_factor(), bn.eps,
                                         ln_eps, use_ln)
        return y.reshape(x.shape)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (LLaMA's norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _zero_through(branch: nn.Module) -> torch.Tensor:
    """A scalar 0 that depends on every trainable parameter of ``branch``.

    Added to the output of a training forward that skips ``branch`` (PRepBN's RepBN during warm-up, its LN after
    the transition), it gives those parameters a zero gradient instead of none: DDP then runs without
    ``find_unused_parameters`` and every parameter has a gradient, at the cost of one sum per parameter tensor
    (the skipped branch itself is not computed, so the warm-up leaves the BN statistics alone).
    """
    anchor = None
    for p in branch.parameters():
        if p.requires_grad:
            anchor = p.sum() if anchor is None else anchor + p.sum()
    return anchor * 0.0 if anchor is not None else torch.zeros(())


class PRepBN(nn.Module):
    """Progressive RepBN: ``lam * LN(x) + (1 - lam) * RepBN(x)`` in training, ``RepBN(x)`` in eval.

    ``lam`` is not touched by forward(): it is set from outside, by :class:`slab.PRepBNSchedule`
    (driven by the optimizer step) or :func:`set_prepbn_lambda`. While ``lam == 1`` only the LN
    runs (BN statistics are not updated, as in the authors' warm-up); once ``lam == 0`` the LN is not
    computed at all. ``ln`` is a LayerNorm (vision) or an RMSNorm (language models).
    """

    def __init__(self, dim: int, ln_eps: float = 1e-6, bn_eps: float = 1e-5, layout: str = "tokens",
                 alpha_init: float = 1.0, ln: str = "layernorm"):
        super().__init__()
        if ln not in ("layernorm", "rmsnorm"):
            raise ValueError(f"ln must be 'layernorm' or 'rmsnorm', got {ln!r}")
        if layout == "channels" and ln != "layernorm":
            raise ValueError("the channel layout supports ln='layernorm' only")
        self.dim = dim
        self.layout = layout
        self.ln = nn.LayerNorm(dim, eps=ln_eps) if ln == "layernorm" else RMSNorm(dim, eps=ln_eps)
        self.repbn = RepBN(dim, eps=bn_eps, layout=layout, alpha_init=alpha_init)
        # A tensor for the mix (so torch.compile does not specialise on every value) and a float for
        # the branch (warm-up / transition / done), both set by set_lambda().
        self.register_buffer("lam", torch.ones(()), persistent=False)
        self._lam = 1.0
        # Branch consistency (opt-in, set by the training loop): while 0 < lam < 1 the forward stores
        # ``branch_gap``, the relative squared distance of the RepBN branch from the (detached) LN branch.
        # Penalising it makes the network reach a state where a per-channel affine map reproduces its LN,
        # so removing the LN at the end of the transition changes (almost) nothing.
        self.record_branch_gap = False
        self.branch_gap: torch.Tensor | None = None

    @property
    def lam_value(self) -> float:
        return self._lam

    def set_lambda(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"PRepBN lambda must be in [0, 1], got {value}")
        self._lam = value
        self.lam.fill_(value)

    def _layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "channels":
            return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.ln(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **repbn_kwargs) -> torch.Tensor:
        """``repbn_kwargs`` go to the RepBN branch (the language models' ``first=`` token mask)."""
        if not self.training:
            return self.repbn(x, mask, **repbn_kwargs)
        if self._lam <= 0.0:
            return self.repbn(x, mask, **repbn_kwargs) + _zero_through(self.ln)
        if self._lam >= 1.0:
            return self._layer_norm(x) + _zero_through(self.repbn)
        plain = not (self.record_branch_gap or repbn_kwargs)
        if plain and isinstance(self.ln, nn.LayerNorm) and self.ln.elementwise_affine and self.repbn._fast_path(x, mask):
            # Transition: one fused LN + BN + alpha computation (hooks on self.ln do not fire here).
            self.repbn._check(x)
            return self.repbn.progressive(x, self.ln.weight, self.ln.bias, self.lam, self.ln.eps)
        return self._mix(x, mask, **repbn_kwargs)

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None, **repbn_kwargs) -> torch.Tensor:
        """The composed transition mix, recording ``branch_gap`` when asked to."""
        ln_out = self._layer_norm(x)
        bn_out = self.repbn(x, mask, **repbn_kwargs)
        lam = self.lam.to(x.dtype)
        if self.record_branch_gap:
            self.branch_gap = self._gap(ln_out.detach(), bn_out, mask)
        return lam * ln_out + (1.0 - lam) * bn_out

    def _gap(self, target: torch.Tensor, bn_out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        err = (bn_out - target).pow(2).sum(-1 if self.layout == "tokens" else 1)
        ref = target.pow(2).sum(-1 if self.layout == "tokens" else 1)
        if mask is not None:
            err, ref = err[mask], ref[mask]
        return err.sum() / ref.sum().clamp_min(1e-12)

    def extra_repr(self) -> str:
        return f"{self.dim}, lam={self._lam:.4g}"


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel: a folded norm where no neighbouring weight can absorb it."""

    def __init__(self, dim: int, layout: str = "tokens"):
        super().__init__()
        self.layout = layout
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "channels":
            return x * self.scale[:, None, None] + self.shift[:, None, None]
        return x * self.scale + self.shift


def get_norm_layer(norm: str, ln_eps: float = 1e-6, layout: str = "tokens", alpha_init: float = 1.0,
                   ln: str = "layernorm") -> Callable[[int], nn.Module]:
    """Factory ``dim -> module`` for ``norm`` in ``{'ln', 'bn', 'repbn', 'prepbn', 'none'}``.

    'ln' is LayerNorm (or RMSNorm with ``ln='rmsnorm'``), 'bn' plain BatchNorm on tokens, 'repbn'
    :class:`RepBN`, 'prepbn' :class:`PRepBN`, 'none' the identity (the norm-free lower bound).
    """
    def layer_norm(dim: int) -> nn.Module:
        if ln == "rmsnorm":
            return RMSNorm(dim, eps=ln_eps)
        if layout == "channels":
            return _ChannelLayerNorm(dim, eps=ln_eps)
        return nn.LayerNorm(dim, eps=ln_eps)

    factories: dict[str, Callable[[int], nn.Module]] = {
        "ln": layer_norm,
        "bn": lambda dim: TokenBatchNorm(dim, layout=layout),
        "repbn": lambda dim: RepBN(dim, layout=layout, alpha_init=alpha_init),
        "prepbn": lambda dim: PRepBN(dim, ln_eps=ln_eps, layout=layout, alpha_init=alpha_init, ln=ln),
        "none": lambda dim: nn.Identity(),
    }
    if norm not in factories:
        raise ValueError(f"unknown norm {norm!r}; choose one of {list(factories)}")
    return factories[norm]


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over C of a ``[B, C, H, W]`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def record_branch_gaps(model: nn.Module, on: bool = True) -> int:
    """Make every :class:`PRepBN` of ``model`` record ``branch_gap`` in its transition forwards."""
    norms = [m for m in model.modules() if isinstance(m, PRepBN)]
    for m in norms:
        m.record_branch_gap = on
        m.branch_gap = None
    return len(norms)


def pop_branch_gap(model: nn.Module) -> torch.Tensor | None:
    """Mean ``branch_gap`` over the PRepBNs that recorded one since the last call (cleared), or None."""
    gaps = []
    for m in model.modules():
        if isinstance(m, PRepBN) and m.branch_gap is not None:
            gaps.append(m.branch_gap)
            m.branch_gap = None
    return torch.stack(gaps).mean() if gaps else None


def set_prepbn_lambda(model: nn.Module, value: float) -> int:
    """Set ``lam`` on every :class:`PRepBN` of ``model``; returns how many were set."""
    count = 0
    for m in model.modules():
        if isinstance(m, PRepBN):
            m.set_lambda(value)
            count += 1
    return count
