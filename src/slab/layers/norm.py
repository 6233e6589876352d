"""Normalization layers of SLAB: BatchNorm for token tensors, RepBN, and progressive PRepBN.

Layouts: ``"tokens"`` means ``[B, N, C]`` (or any ``[..., C]``), ``"channels"`` means
``[B, C, H, W]``. All BatchNorm statistics are per channel over every token of the batch.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from ..ops.prepbn import prepbn_mix

__all__ = ["TokenBatchNorm", "RepBN", "PRepBN", "ChannelAffine", "RMSNorm", "get_norm_layer",
           "set_prepbn_lambda", "record_branch_gaps", "pop_branch_gap", "NORM_CHOICES"]

NORM_CHOICES = ("ln", "bn", "repbn", "prepbn", "none")
_LAYOUTS = ("tokens", "channels")


def _zero_anchor(module: nn.Module | None) -> torch.Tensor | float:
    """``0 * sum(parameters of module)``, or 0.0 when there is nothing to anchor (or no autograd).

    Added to a per-channel quantity (a bias, alpha), it changes no value but gives the parameters of an
    inactive branch exact zero gradients: every parameter then takes part in every backward, as DDP
    without ``find_unused_parameters`` and timm's contract require. It costs a few reductions over
    ``[C]`` vectors, never a pass over the activations.
    """
    if module is None or not torch.is_grad_enabled():
        return 0.0
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return 0.0
    return torch.stack([p.sum() for p in params]).sum() * 0.0


# The norms choose kernels by dtype, device and statistics state, and check shapes: FX keeps them as
# leaf modules (one graph node each), as timm does for its modules with data-dependent control flow.
@register_notrace_module
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
        if torch.jit.is_scripting():
            # TorchScript: the unmasked BatchNorm (the padding-aware one is for language models, not scripted).
            if mask is not None:
                raise RuntimeError("TokenBatchNorm: masked statistics are not supported under TorchScript")
        else:
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
                and x.dtype == bn.weight.dtype and not x.is_meta  # meta: autocast knows no such device
                and not torch.is_autocast_enabled(x.device.type))

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
        if torch.jit.is_scripting():
            return self.batch_norm(x, mask) + self.alpha * x
        else:
            return self.anchored_forward(x, mask)

    def anchored_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         inactive_ln: nn.Module | None = None) -> torch.Tensor:
        """``BN(x) + alpha * x`` through the fastest applicable kernels.

        ``inactive_ln`` (PRepBN's LN branch, unused here) receives exact zero gradients at no cost: its
        parameters enter the fused kernel, or a zero-valued term of the per-channel affine.
        """
        alpha = self.alpha
        if self._fast_path(x, mask):
            self._check(x)
            if self.training:
                if isinstance(inactive_ln, nn.LayerNorm) and inactive_ln.elementwise_affine:
                    return self.progressive(x, inactive_ln.weight, inactive_ln.bias, None, 0.0)
                return self.progressive(x, None, None, None, 0.0, alpha=alpha + _zero_anchor(inactive_ln))
            # Eval: one pass, x * (gamma * invstd + alpha) + (beta - mean * gamma * invstd).
            scale, shift = self._eval_affine(alpha)
            return torch.addcmul(shift + _zero_anchor(inactive_ln), x, scale)
        return self.batch_norm(x, mask) + (alpha + _zero_anchor(inactive_ln)) * x

    def fused_mix(self, x: torch.Tensor, ln: nn.Module, lam: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
        """Training-mode ``lam * ln(x) + (1 - lam) * RepBN(x)`` as one fused computation (hooks on ``ln`` do not
        fire), or None where the fused kernels do not apply (``ln`` not an affine LayerNorm, masked statistics,
        autocast, ...): PRepBN then composes the two branches."""
        if not (isinstance(ln, nn.LayerNorm) and ln.elementwise_affine and self._fast_path(x, mask)):
            return None
        self._check(x)
        return self.progressive(x, ln.weight, ln.bias, lam, ln.eps)

    def progressive(self, x: torch.Tensor, ln_weight, ln_bias, lam: torch.Tensor | None, ln_eps: float,
                    alpha: torch.Tensor | None = None) -> torch.Tensor:
        """Training-mode ``lam * LN(x) + (1 - lam) * RepBN(x)`` through :func:`slab.ops.prepbn.prepbn_mix`.

        ``lam`` None: 0, and the LN is not computed; LN parameters given then get zero gradients.
        ``alpha`` replaces ``self.alpha`` (PRepBN passes one carrying a zero-valued anchor).
        """
        bn = self.bn
        alpha = self.alpha if alpha is None else alpha
        y = prepbn_mix(x.reshape(-1, self.dim), ln_weight, ln_bias, bn.weight, bn.bias, alpha, lam,
                       bn.running_mean, bn.running_var, self._running_factor(), bn.eps, ln_eps)
        return y.reshape(x.shape)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (LLaMA's norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@register_notrace_module
class PRepBN(nn.Module):
    """Progressive RepBN: ``lam * LN(x) + (1 - lam) * RepBN(x)`` in training, ``RepBN(x)`` in eval.

    ``lam`` is not touched by forward(): it is set from outside, by :class:`slab.PRepBNSchedule`
    (driven by the optimizer step) or :func:`set_prepbn_lambda`. While ``lam == 1`` only the LN
    runs (BN statistics are not updated, as in the authors' warm-up); once ``lam == 0`` the LN is not
    computed at all.

    Args:
        dim: channels C.
        ln_layer: factory ``dim -> module`` of the LN branch ``self.ln``: a LayerNorm with eps 1e-6 by default
            (vision; :func:`get_norm_layer` passes its ``'ln'`` factory), an :class:`RMSNorm` in the language models.
        bn_layer: factory ``dim -> RepBN`` of the BN branch ``self.repbn``: :class:`RepBN` by default (its
            ``layout`` is this norm's), :class:`slab.lm.norm.CausalRepBN` in the language models.
    """

    def __init__(self, dim: int, ln_layer: Callable[[int], nn.Module] | None = None,
                 bn_layer: Callable[[int], RepBN] | None = None):
        super().__init__()
        self.dim = dim
        self.ln = (ln_layer or partial(nn.LayerNorm, eps=1e-6))(dim)
        self.repbn = (bn_layer or RepBN)(dim)
        if not isinstance(self.repbn, RepBN):
            raise TypeError(f"PRepBN's bn_layer must build a RepBN, got {type(self.repbn).__name__}")
        self.layout = self.repbn.layout
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

    def _anchored_layer_norm(self, x: torch.Tensor, bias_offset: torch.Tensor | float) -> torch.Tensor:
        """The LN branch with ``bias_offset`` (a zero anchor, see :func:`_zero_anchor`) in its bias."""
        ln = self.ln
        if isinstance(bias_offset, float):
            return ln(x)
        if type(ln) is nn.LayerNorm and ln.elementwise_affine:  # a token LayerNorm: the anchor rides in its bias
            return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias + bias_offset, ln.eps)
        return ln(x) + bias_offset  # RMSNorm has no bias, the channel LayerNorm permutes: one elementwise add

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, first: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``first`` goes to the RepBN branch (the language models' first-token mask, :class:`CausalRepBN`)."""
        if torch.jit.is_scripting():
            # TorchScript: the plain composition (the fused kernels and zero anchors are eager-only).
            if not self.training or self._lam <= 0.0:
                return self.repbn(x, mask)
            ln_out = self.ln(x)
            if self._lam >= 1.0:
                return ln_out
            lam = self.lam.to(x.dtype)
            return lam * ln_out + (1.0 - lam) * self.repbn(x, mask)
        else:
            return self._eager_forward(x, mask, first)

    def _eager_forward(self, x: torch.Tensor, mask: torch.Tensor | None, first: torch.Tensor | None
                       ) -> torch.Tensor:
        # The inactive branch (RepBN in warm-up, LN in eval and after the transition) is not computed, but
        # its parameters get zero gradients through a zero anchor (no pass over the activations).
        if not self.training or self._lam <= 0.0:
            if first is None:
                return self.repbn.anchored_forward(x, mask, inactive_ln=self.ln)
            y = self.repbn(x, mask, first=first)
            anchor = _zero_anchor(self.ln)
            return y if isinstance(anchor, float) else y + anchor  # the first-token variant: one cheap add
        if self._lam >= 1.0:
            return self._anchored_layer_norm(x, _zero_anchor(self.repbn))
        if not (self.record_branch_gap or first is not None):
            # Transition: one fused LN + BN + alpha computation where the kernels cover it.
            fused = self.repbn.fused_mix(x, self.ln, self.lam, mask)
            if fused is not None:
                return fused
        return self._mix(x, mask, first)

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None, first: torch.Tensor | None = None) -> torch.Tensor:
        """The composed transition mix, recording ``branch_gap`` when asked to."""
        ln_out = self.ln(x)
        bn_out = self.repbn(x, mask) if first is None else self.repbn(x, mask, first=first)
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
    :class:`RepBN`, 'prepbn' :class:`PRepBN` built from the 'ln' and 'repbn' factories, 'none' the identity
    (the norm-free lower bound).
    """
    if ln not in ("layernorm", "rmsnorm"):
        raise ValueError(f"ln must be 'layernorm' or 'rmsnorm', got {ln!r}")
    if layout == "channels" and ln != "layernorm":
        raise ValueError("the channel layout supports ln='layernorm' only")

    def layer_norm(dim: int) -> nn.Module:
        if ln == "rmsnorm":
            return RMSNorm(dim, eps=ln_eps)
        if layout == "channels":
            return _ChannelLayerNorm(dim, eps=ln_eps)
        return nn.LayerNorm(dim, eps=ln_eps)

    def repbn(dim: int) -> RepBN:
        return RepBN(dim, layout=layout, alpha_init=alpha_init)

    factories: dict[str, Callable[[int], nn.Module]] = {
        "ln": layer_norm,
        "bn": lambda dim: TokenBatchNorm(dim, layout=layout),
        "repbn": repbn,
        "prepbn": lambda dim: PRepBN(dim, ln_layer=layer_norm, bn_layer=repbn),
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
