"""Norms of SLAB-LLaMA: LLaMA's RMSNorm, or PRepBN/RepBN whose BatchNorm can take causal statistics.

BatchNorm in training normalises every token with statistics of the whole batch, so the output at
position ``t`` depends (weakly) on the tokens after ``t`` of the same sequence. :class:`CausalRepBN`
is :class:`slab.RepBN` with a choice of where the training statistics come from
(``stats`` in :data:`BN_STATS`); in eval all choices use the running statistics, so the folded model
is the same whatever was used in training.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..layers.norm import PRepBN, RepBN, RMSNorm
from ..reparam.fold import NotFoldableError, fold_into_consumers, norm_affine
from .configuration_slab_llama import BN_STATS, SlabLlamaConfig

__all__ = ["CausalRepBN", "FirstTokenAffine", "make_norm", "fold_norm", "apply_norm", "MASKED_NORMS"]


class CausalRepBN(RepBN):
    """``RepBN(x) = BN(x) + alpha * x`` for ``x`` of shape ``[B, T, C]`` with a choice of training statistics.

    ``stats='batch'``: all real tokens of the batch (the authors'). ``'causal'``: the output at position
    ``t`` uses the mean/variance of the real tokens at positions ``<= t`` of every row (prefix statistics,
    shifted by the running mean for accuracy), shrunk towards the running statistics with the weight of
    ``causal_prior`` tokens; with ``causal_prior=0``, positions with fewer than two such tokens use the
    running statistics. ``'running'``: the running statistics, as in eval (the statistics are updated from the
    batch afterwards, without gradient). ``'frozen'``: the running statistics, never updated: the training
    forward is the eval forward, so what is trained is exactly the model that folds (used to fine-tune a
    converted LLaMA in its deployed form). Running statistics are updated from all real tokens in every other
    mode.
    ``mask`` (``[B, T]`` bool, True = real token) excludes padding from the statistics.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, alpha_init: float = 0.0,
                 stats: str = "batch", first_token_affine: bool = False, causal_prior: float = 0.0):
        super().__init__(dim, eps=eps, momentum=momentum, layout="tokens", alpha_init=alpha_init)
        if stats not in BN_STATS:
            raise ValueError(f"stats must be one of {BN_STATS}, got {stats!r}")
        if not causal_prior >= 0.0:
            raise ValueError(f"causal_prior is a token count >= 0, got {causal_prior}")
        self.stats = stats
        self.causal_prior = float(causal_prior)
        # The first token of a sequence attends only to itself and becomes the attention sink: pretrained
        # LLaMAs give it a residual stream ~100x larger than the others', which no per-channel map shared
        # with the other tokens can normalise. It gets its own per-channel affine (and stays out of the BN
        # statistics); after folding that costs one elementwise op on one token per sequence, in prefill.
        if first_token_affine:
            self.first_scale = nn.Parameter(torch.zeros(dim))
            self.first_shift = nn.Parameter(torch.zeros(dim))
        else:
            self.first_scale = self.first_shift = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, first: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``first`` (``[B, T]`` bool) marks each sequence's first token: it is left out of the statistics and,
        with ``first_token_affine``, mapped by its own ``x * first_scale + first_shift``."""
        if first is None or self.first_scale is None:
            return super().forward(x, mask)
        stats_mask = ~first if mask is None else (mask.to(torch.bool) & ~first)
        y = super().forward(x, stats_mask)
        return torch.where(first.unsqueeze(-1), x * self.first_scale + self.first_shift, y)

    def _fast_path(self, x: torch.Tensor, mask: torch.Tensor | None) -> bool:
        # RepBN's fused kernels take batch statistics: causal/running training goes through batch_norm().
        if self.training and self.stats != "batch":
            return False
        return super()._fast_path(x, mask)

    def batch_norm(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or self.stats == "batch":
            return super().batch_norm(x, mask)
        self._check(x)
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__}(stats={self.stats!r}) expects [B, T, C], got {tuple(x.shape)}")
        bn = self.bn
        m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.to(torch.bool)
        if m.shape != x.shape[:2]:
            raise ValueError(f"mask of shape {tuple(m.shape)} does not match tokens of shape {tuple(x.shape[:2])}")
        run_mean = bn.running_mean.clone()
        run_var = bn.running_var.clone()
        if self.stats in ("running", "frozen"):
            mean, var = run_mean.to(x.dtype), run_var.to(x.dtype)
        else:
            mean, var = self._prefix_statistics(x, m, run_mean, run_var, self.causal_prior)
        if self.stats != "frozen":
            self._update_running(x, m)
        y = (x - mean) * torch.rsqrt(var + bn.eps)
        return y * bn.weight + bn.bias

    @staticmethod
    def _prefix_statistics(x: torch.Tensor, m: torch.Tensor, run_mean: torch.Tensor, run_var: torch.Tensor,
                           prior: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position ``[T, C]`` mean and biased variance of the real tokens at positions ``<= t``, plus
        ``prior`` pseudo-tokens distributed as the running statistics (mean ``run_mean``, variance ``run_var``)."""
        w = m.to(torch.float32).unsqueeze(-1)                            # [B, T, 1]
        xc = (x.float() - run_mean.float()) * w                           # centred: less cancellation
        count = w.sum(0).cumsum(0)                                        # [T, 1]
        s1 = xc.sum(0).cumsum(0)
        s2 = (xc * xc).sum(0).cumsum(0)
        if prior > 0:  # the pseudo-tokens add 0 to s1 (centred on the running mean) and prior * run_var to s2
            n = count + prior
            mean_c = s1 / n
            var = ((s2 + prior * run_var.float()) / n - mean_c * mean_c).clamp(min=0.0)
            return (mean_c + run_mean.float()).to(x.dtype), var.to(x.dtype)
        n = count.clamp(min=1.0)
        mean_c = s1 / n
        var = (s2 / n - mean_c * mean_c).clamp(min=0.0)
        enough = count >= 2
        mean = torch.where(enough, mean_c + run_mean.float(), run_mean.float())
        var = torch.where(enough, var, run_var.float())
        return mean.to(x.dtype), var.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, x: torch.Tensor, m: torch.Tensor) -> None:
        """Running statistics from the real tokens, as masked weighted sums: selecting the tokens (``x[m]``) or
        testing their count in Python would wait for the device; a batch with fewer than two real tokens leaves
        the statistics (and the counter) as they were."""
        bn = self.bn
        if not bn.track_running_stats:
            return
        w = m.reshape(-1, 1).to(torch.float32)
        xf = x.detach().reshape(-1, x.shape[-1]).float()
        n = w.sum()
        mean = (xf * w).sum(0) / n.clamp(min=1.0)
        var = ((xf - mean).square() * w).sum(0) / (n - 1.0).clamp(min=1.0)  # unbiased, as nn.BatchNorm keeps it
        enough = n > 1
        mom = bn.momentum if bn.momentum is not None else 1.0 / (bn.num_batches_tracked + 1).float()
        rate = torch.where(enough, torch.as_tensor(mom, dtype=torch.float32, device=x.device), 0.0)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), rate.to(bn.running_mean.dtype))
        bn.running_var.lerp_(var.to(bn.running_var.dtype), rate.to(bn.running_var.dtype))
        bn.num_batches_tracked.add_(enough.to(bn.num_batches_tracked.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stats={self.stats!r}"


#: Norms whose forward takes the padding mask.
MASKED_NORMS = (PRepBN, RepBN)


class FirstTokenAffine(nn.Module):
    """What a folded norm with a first-token affine leaves behind: ``x * scale + shift`` on each sequence's
    first token (``first`` mask), identity elsewhere and whenever ``first`` is None (decoding with a cache).

    The consumers already hold the shared map ``x * s + t``; ``scale = s0 / s`` and ``shift = (t0 - t) / s`` turn
    it into the first token's own ``x * s0 + t0``."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())

    def forward(self, x: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        if first is None:
            return x
        return torch.where(first.unsqueeze(-1), x * self.scale + self.shift, x)


def fold_norm(norm: nn.Module, consumers: list[nn.Linear]) -> nn.Module:
    """Fold ``norm`` into ``consumers``; returns what replaces it (Identity, or a :class:`FirstTokenAffine`)."""
    repbn = norm.repbn if isinstance(norm, PRepBN) else norm
    first = getattr(repbn, "first_scale", None) is not None
    if first:
        s, t = norm_affine(norm)
        if bool((s.abs() < 1e-12).any()):
            raise NotFoldableError("a norm with a zero per-channel scale cannot carry a first-token affine: its "
                                   "consumers lose that channel")
        s0, t0 = repbn.first_scale.detach().double(), repbn.first_shift.detach().double()
        ref = repbn.first_scale
        rest = FirstTokenAffine((s0 / s).to(ref.dtype), ((t0 - t) / s).to(ref.dtype)).to(ref.device)
    identity = fold_into_consumers(norm, consumers)
    return rest if first else identity


def make_norm(config: SlabLlamaConfig) -> nn.Module:
    """The norm module for ``config.norm`` (LLaMA's keys: RMSNorm ``weight``; PRepBN ``ln.weight`` and
    ``repbn.{alpha, bn.*}``)."""
    dim = config.hidden_size
    if config.norm == "rmsnorm":
        return LlamaRMSNorm(dim, eps=config.rms_norm_eps)
    if config.norm == "none":
        if config.first_token_affine:  # the fused form: an identity-initialised first-token affine, loaded after
            return FirstTokenAffine(torch.ones(dim), torch.zeros(dim))
        return nn.Identity()
    repbn = partial(CausalRepBN, eps=config.bn_eps, momentum=config.bn_momentum, alpha_init=config.repbn_alpha_init,
                    stats=config.bn_stats, first_token_affine=config.first_token_affine,
                    causal_prior=config.bn_causal_prior)
    if config.norm == "repbn":
        return repbn(dim)
    # PRepBN's LN branch is slab's RMSNorm (F.rms_norm); the plain 'rmsnorm' model keeps LLaMA's own module.
    return PRepBN(dim, ln_layer=partial(RMSNorm, eps=config.rms_norm_eps), bn_layer=repbn)


def apply_norm(norm: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, first: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``norm(x)``, passing the padding mask to the norms that take statistics and the first-token mask
    (None unless the config has ``first_token_affine``) to those that treat the first token apart."""
    if isinstance(norm, FirstTokenAffine):
        return norm(x, first)
    if isinstance(norm, MASKED_NORMS):
        return norm(x, mask) if first is None else norm(x, mask, first=first)
    return norm(x)
