"""Training, evaluation and BatchNorm calibration for SLAB-LLaMA language models.

:func:`train_lm` serves ``slab train-lm`` (from scratch) and ``slab convert-lm`` (fine-tuning a LLaMA while
PRepBN replaces its RMSNorms): the task :class:`slab.lm.task.LMTask` run by :class:`slab.engine.Trainer`.
The PRepBN lambda follows the optimizer step (:class:`slab.PRepBNSchedule`), so gradient accumulation
does not shift it. Runs on one process, or under ``torchrun`` (DDP, one rank per device) when
``WORLD_SIZE`` is set; each rank takes BatchNorm statistics of its own micro-batch. Checkpoints are the
engine's (atomic, every rank's RNG) and resume exactly where they stopped.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..engine.checkpoint import atomic_save
from ..engine.distributed import setup_distributed
from ..engine.optim import weight_decay_groups
from ..files import torch_load
from ..layers.norm import PRepBN, RepBN

__all__ = ["TrainLMConfig", "train_lm", "perplexity", "fit_bn_to_ln", "init_bn_branches", "recalibrate_bn",
           "save_checkpoint", "load_checkpoint", "init_distributed", "build_optimizer", "lr_factor"]


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               batch_size: int = 8, device: str | torch.device | None = None) -> float:
    """``exp`` of the mean next-token NLL over every predicted real token of ``input_ids`` ``[N, T]`` (eval mode)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[i: i + batch_size].to(device)
        mask = attention_mask[i: i + batch_size].to(device) if attention_mask is not None else None
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        target = ids[:, 1:]
        valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
        nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                          reduction="none").view_as(target)
        total += float(nll[valid].sum())
        count += int(valid.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no token to predict")
    mean_nll = total / count
    return math.exp(mean_nll) if mean_nll < 700 else math.inf  # a diverged model: inf, not an OverflowError


# ------------------------------------------------------------------------------------------ BN calibration
def _repbns(model: nn.Module) -> list[RepBN]:
    return [m for m in model.modules() if isinstance(m, RepBN)]


@torch.no_grad()
def fit_bn_to_ln(model: nn.Module, batches) -> int:
    """Initialise every PRepBN's RepBN branch as the per-channel affine map closest to its RMSNorm branch.

    Over ``batches`` (iterable of ``(input_ids, attention_mask or None)``), with ``lam = 1``, collects for
    each PRepBN the input ``x`` and RMSNorm output ``y`` of real tokens and sets the BN so that in eval
    ``RepBN(x) = s * x + t`` with ``s = Cov(x, y) / Var(x)``, ``t = E[y] - s E[x]`` per channel (least
    squares), alpha 0, each on the unchanged model's activations (``bn_init='calibrate'`` fits them in forward
    order on the replaced model's, which composes far better). Returns the number of norms fitted.
    """
    from .convert import LeastSquares, set_fitted_map
    norms = [m for m in model.modules() if isinstance(m, PRepBN)]
    if not norms:
        return 0
    lams = [m.lam_value for m in norms]
    fits = [LeastSquares() for _ in norms]
    current_mask: list[torch.Tensor | None] = [None]

    def hook(fit):
        def fn(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            y = output.detach().reshape(-1, output.shape[-1])
            if current_mask[0] is not None:
                keep = current_mask[0].reshape(-1)
                x, y = x[keep], y[keep]
            fit.add(x, y)
        return fn

    handles = [m.ln.register_forward_hook(hook(fit)) for m, fit in zip(norms, fits)]
    was_training = model.training
    try:
        for m in norms:
            m.set_lambda(1.0)
        model.train()
        for ids, mask in batches:
            current_mask[0] = mask.bool().to(ids.device) if mask is not None else None
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for m, lam in zip(norms, lams):
            m.set_lambda(lam)
        model.train(was_training)
    fitted = 0
    for m, fit in zip(norms, fits):
        fit.all_reduce()
        if fit.n >= 2:
            set_fitted_map(m, fit, None)
            fitted += 1
    return fitted


@torch.no_grad()
def forward_batches(model: nn.Module, batches) -> int:
    """Run ``model`` (no cache) over ``(input_ids, attention_mask or None)`` pairs, for what its hooks or BN
    statistics see; returns how many batches there were."""
    n = 0
    for ids, mask in batches:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        n += 1
    return n


def recalibrate_bn(model: nn.Module, batches, all_ranks: bool = False) -> int:
    """Re-estimate every RepBN's running statistics over ``batches`` with the rest of the model in eval.

    Running statistics are reset and then averaged over all batches (momentum ``None``); only real
    tokens count. This is the authors' step before evaluation; call it after training, before
    :func:`slab.fuse`. With ``all_ranks`` (every DDP rank calls it) the statistics are averaged over ranks.
    Returns the number of batches used.
    """
    # 'frozen' statistics are part of what was trained (the eval form itself): left as they are.
    bns = [m for m in _repbns(model) if getattr(m, "stats", None) != "frozen"]
    if not bns:
        return 0
    was_training = model.training
    model.eval()
    momenta, stats = [], []
    for m in bns:
        momenta.append(m.bn.momentum)
        stats.append(getattr(m, "stats", None))
        m.bn.reset_running_stats()
        m.bn.momentum = None
        m.train()  # a PRepBN in eval calls its RepBN, which in train mode takes batch statistics
        if stats[-1] is not None:
            # 'running'/'causal' training statistics would feed the layers downstream with the reset running
            # statistics or prefix estimates while they are being measured: measure with whole-batch ones.
            m.stats = "batch"
    try:
        n = forward_batches(model, batches)
    finally:
        for m, mom, st in zip(bns, momenta, stats):
            m.bn.momentum = mom
            if st is not None:
                m.stats = st
        model.train(was_training)
    if all_ranks and n and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        for m in bns:
            dist.all_reduce(m.bn.running_mean)
            dist.all_reduce(m.bn.running_var)
            m.bn.running_mean /= world
            m.bn.running_var /= world
    return n


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A file written by :func:`save_checkpoint` (tensors and plain values only: ``weights_only`` loading)."""
    return torch_load(path, "Give a checkpoint of `slab train-lm` (OUTPUT/checkpoints/step_*.pt)",
                      map_location=map_location)


# --------------------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; joins the process group when launched by torchrun (WORLD_SIZE set)."""
    info = setup_distributed()
    return info.rank, info.world_size, info.device


# ------------------------------------------------------------------------------------------------- training
@dataclass
class TrainLMConfig:
    """Hyper-parameters of :func:`train_lm` (all saved in the checkpoint)."""
    steps: int = 200                    # optimizer steps
    batch_size: int = 16                # sequences per micro-batch per rank
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20              # LR warm-up
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # The PRepBN recipe (docs/language_models.md): RMSNorm alone for 60 % of the run, then every RepBN branch
    # calibrated against the model's RMSNorm form and the switch made at once (T = 0); the authors' is a zero
    # start (bn_init='zero') and a linear decay over most of the run (prepbn_transition=0.8).
    prepbn_warmup: int | None = None    # steps with lam = 1; None: prepbn_warmup_fraction of the steps
    prepbn_warmup_fraction: float = 0.6
    prepbn_transition: float = 0.0      # PRepBN decay length T as a fraction of the total steps
    bn_init: str = "calibrate"          # 'zero' (authors), 'fit' (least squares to each RMSNorm branch), or
                                        # 'calibrate' (sequential least squares, see slab.lm.convert);
                                        # 'keep': leave the branches as they are (set before training)
    bn_consistency: float = 0.0         # weight of the PRepBN branch-consistency loss during the transition
    distill: bool = False               # objective: KL to a teacher's next-token distribution instead of the labels
    fit_batches: int = 4
    eval_every: int = 0                 # 0: only at the end
    save_every: int = 50
    keep_last: int = 1                  # checkpoints kept (OUTPUT/checkpoints/step_*.pt)
    amp: str = "none"                   # 'none' or 'bf16' (autocast)
    max_bad_steps: int = 20             # consecutive non-finite steps before aborting
    seed: int = 0
    train_params: str = "all"           # 'all' or 'no-embeddings' (freeze embed_tokens / lm_head)


def prepbn_warmup_steps(cfg: TrainLMConfig) -> int:
    """Steps with ``lam = 1``: ``cfg.prepbn_warmup``, or ``cfg.prepbn_warmup_fraction`` of ``cfg.steps``."""
    if cfg.prepbn_warmup is not None:
        return cfg.prepbn_warmup
    return int(round(cfg.prepbn_warmup_fraction * cfg.steps))


def lr_factor(cfg: TrainLMConfig):
    """Step -> lr factor: linear warm-up over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def build_optimizer(model: nn.Module, cfg: TrainLMConfig) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.95), weight decay on matrices only; ``no-embeddings`` freezes embed_tokens / lm_head."""
    if cfg.train_params == "no-embeddings":
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.requires_grad_(False)
    return torch.optim.AdamW(weight_decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr,
                             betas=(0.9, 0.95))


def init_bn_branches(model: nn.Module, how: str, batches: list) -> int:
    """``fit``: each RepBN to its own RMSNorm branch; ``calibrate``: in forward order, on the activations of the
    model whose earlier norms are already RepBN, against the model's RMSNorm form (``lam = 1``)."""
    if how == "fit":
        return fit_bn_to_ln(model, batches)
    if how != "calibrate":
        raise ValueError(f"bn_init must be 'zero', 'fit' or 'calibrate', got {how!r}")
    from .convert import calibrate_repbn, rmsnorm_form
    return len(calibrate_repbn(model, rmsnorm_form(model), batches, sequential=True))


def _distill(logits: torch.Tensor, teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    from .convert import distillation_loss
    with torch.no_grad():
        target = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return distillation_loss(logits, target, mask)


def train_lm(model: nn.Module, train_ids: torch.Tensor, cfg: TrainLMConfig, output_dir: str | os.PathLike,
             train_mask: torch.Tensor | None = None, eval_ids: torch.Tensor | None = None,
             eval_mask: torch.Tensor | None = None, resume: bool | str = True, log=print, progress: bool = True,
             stop_after: int | None = None, teacher: nn.Module | None = None, stop_at_step: int | None = None,
             threads: int = 0) -> dict:
    """Train ``model`` (a causal LM taking ``input_ids``/``attention_mask``/``labels``) for ``cfg.steps`` steps.

    Runs :class:`slab.lm.task.LMTask` on :class:`slab.engine.Trainer`: ``output_dir/metrics.jsonl`` (one line
    per step) and ``output_dir/checkpoints/step_*.pt`` every ``cfg.save_every`` steps and at the end.
    ``resume``: True or ``'auto'`` continues from the newest checkpoint (same config, else an error), False
    starts over (the old checkpoints are deleted), a path resumes from that file. The PRepBN lambda is a
    function of the optimizer step. A step whose loss or gradients are not finite on any rank is skipped on
    every rank (counted in ``bad_steps``; the schedules still advance); after ``cfg.max_bad_steps`` such steps
    in a row training stops with an error. Returns a summary dict (``history`` of losses, ``eval``
    perplexities, ``bad_steps``, ``lam``). ``stop_after`` ends the run after that many steps of this call,
    ``stop_at_step`` after that step (both with a checkpoint, to resume). With ``cfg.distill`` the objective is
    the KL divergence from ``teacher``'s next-token distribution (:func:`slab.lm.convert.distillation_loss`);
    the logged ``loss`` stays the cross-entropy on the text.
    """
    from ..engine import Trainer, TrainerArgs
    from .task import LMTask
    if cfg.distill and teacher is None:
        raise ValueError("cfg.distill needs a teacher model")
    task = LMTask(model, train_ids, cfg, train_mask, eval_ids, eval_mask, teacher=teacher, log=log)
    mode = "auto" if resume is True else ("restart" if resume is False else resume)
    legacy = os.path.join(os.fspath(output_dir), "checkpoint.pt")
    if mode == "auto" and os.path.isfile(legacy) and not os.path.isdir(os.path.join(os.fspath(output_dir),
                                                                                     "checkpoints")):
        from ..errors import UserError
        raise UserError(f"{legacy} is a checkpoint of the earlier single-file format, which this version does not "
                        f"resume: finish that run with the slab that wrote it, or start over with --no-resume")
    args = TrainerArgs(output=os.fspath(output_dir), resume=mode, seed=cfg.seed, grad_accum=cfg.grad_accum,
                       amp=cfg.amp, clip_grad=cfg.grad_clip, nonfinite="skip", max_bad_steps=cfg.max_bad_steps,
                       eval_every=cfg.eval_every, save_every=cfg.save_every, keep_last=cfg.keep_last,
                       stop_at_step=stop_at_step, stop_after=stop_after, progress=progress, threads=threads)
    result = Trainer(task, args).train()
    return {"step": result.steps, "bad_steps": result.bad_steps, "history": task.history, "eval": task.evals,
            "lam": task.schedule.lam if task.schedule is not None else None,
            "train_tokens_per_s": task.tokens_per_s(), "rank": task.dist.rank, "world_size": task.dist.world_size,
            "stopped_early": result.stopped_early, "metrics": os.path.join(os.fspath(output_dir), "metrics.jsonl")}
