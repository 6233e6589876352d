"""Training, evaluation and BatchNorm calibration for SLAB-LLaMA language models.

One loop serves ``slab train-lm`` (from scratch) and ``slab convert-lm`` (fine-tuning a LLaMA while
PRepBN replaces its RMSNorms). The PRepBN lambda follows the optimizer step (:class:`slab.PRepBNSchedule`),
so gradient accumulation does not shift it. Runs on one process, or under ``torchrun`` (DDP, one
rank per device) when ``WORLD_SIZE`` is set; each rank takes BatchNorm statistics of its own micro-batch.
Checkpoints are written atomically (temporary file, fsync, rename) and resume exactly where they stopped.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..layers.norm import PRepBN, RepBN, pop_branch_gap, record_branch_gaps
from ..schedule import PRepBNSchedule
from ..train.checkpoint import atomic_save

__all__ = ["TrainLMConfig", "train_lm", "perplexity", "fit_bn_to_ln", "init_bn_branches", "recalibrate_bn", "save_checkpoint",
           "load_checkpoint", "init_distributed"]


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
def recalibrate_bn(model: nn.Module, batches, all_ranks: bool = False) -> int:
    """Re-estimate every RepBN's running statistics over ``batches`` with the rest of the model in eval.

    Running statistics are reset and then averaged over all batches (momentum ``None``); only real
    tokens count. This is the authors' step before evaluation; call it after training, before
    :func:`slab.fuse`. With ``all_ranks`` (every DDP rank calls it) the statistics are averaged over ranks.
    Returns the number of batches used.
    """
    bns = _repbns(model)
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
    n = 0
    try:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            n += 1
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
    return torch.load(path, map_location=map_location, weights_only=False)


# --------------------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; starts the process group when launched by torchrun (WORLD_SIZE set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return rank, world, device


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
    amp: str = "none"                   # 'none' or 'bf16' (autocast)
    max_bad_steps: int = 20             # consecutive non-finite steps before aborting
    seed: int = 0
    train_params: str = "all"           # 'all' or 'no-embeddings' (freeze embed_tokens / lm_head)


class _Batches:
    """Deterministic micro-batches: a seeded permutation per epoch, ranks take interleaved slices."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int,
                 rank: int, world: int, seed: int):
        if input_ids.shape[0] < batch_size * world:
            raise ValueError(f"{input_ids.shape[0]} training sequences are fewer than one global batch "
                             f"({batch_size} x {world} ranks)")
        self.ids, self.mask = input_ids, attention_mask
        self.bs, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.per_epoch = input_ids.shape[0] // (batch_size * world)
        self._perm_epoch, self._perm = -1, None

    def get(self, micro_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        epoch, k = divmod(micro_index, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.ids.shape[0], generator=g), epoch
        start = (k * self.world + self.rank) * self.bs
        idx = self._perm[start: start + self.bs]
        return self.ids[idx], (self.mask[idx] if self.mask is not None else None)


def prepbn_warmup_steps(cfg: TrainLMConfig) -> int:
    """Steps with ``lam = 1``: ``cfg.prepbn_warmup``, or ``cfg.prepbn_warmup_fraction`` of ``cfg.steps``."""
    if cfg.prepbn_warmup is not None:
        return cfg.prepbn_warmup
    return int(round(cfg.prepbn_warmup_fraction * cfg.steps))


def _lr_lambda(cfg: TrainLMConfig):
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def _optimizer(model: nn.Module, cfg: TrainLMConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if cfg.train_params == "no-embeddings" and ("embed_tokens" in name or "lm_head" in name):
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


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


def _autocast(cfg: TrainLMConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    if cfg.amp != "bf16":
        raise ValueError(f"amp must be 'none' or 'bf16', got {cfg.amp!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_lm(model: nn.Module, train_ids: torch.Tensor, cfg: TrainLMConfig, output_dir: str | os.PathLike,
             train_mask: torch.Tensor | None = None, eval_ids: torch.Tensor | None = None,
             eval_mask: torch.Tensor | None = None, resume: bool = True, log=print, progress: bool = True,
             stop_after: int | None = None, teacher: nn.Module | None = None) -> dict:
    """Train ``model`` (a causal LM taking ``input_ids``/``attention_mask``/``labels``) for ``cfg.steps`` steps.

    Writes ``output_dir/checkpoint.pt`` every ``cfg.save_every`` steps and at the end, and resumes from it
    when ``resume`` (same config). The PRepBN lambda is a function of the optimizer step. A step whose
    gradients are not finite is skipped (counted in ``bad_steps``; the schedules still advance); after
    ``cfg.max_bad_steps`` such steps in a row training stops with an error. Returns a summary dict
    (``history`` of losses, ``eval`` perplexities, ``bad_steps``, ``lam``). ``stop_after`` ends the run after
    that many steps of this call (to test resuming). With ``cfg.distill`` the objective is the KL divergence
    from ``teacher``'s next-token distribution (:func:`slab.lm.convert.distillation_loss`); the logged ``loss``
    stays the cross-entropy on the text.
    """
    if cfg.distill and teacher is None:
        raise ValueError("cfg.distill needs a teacher model")
    from tqdm.auto import tqdm
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.seed)
    output_dir = Path(output_dir)
    ckpt_path = output_dir / "checkpoint.pt"
    model.to(device)
    schedule = PRepBNSchedule(model, total_steps=cfg.steps, warmup_steps=prepbn_warmup_steps(cfg),
                              transition_fraction=cfg.prepbn_transition) \
        if any(isinstance(m, PRepBN) for m in model.modules()) else None
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    state = {"step": 0, "bad_steps": 0, "history": [], "eval": [], "fitted": False}
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        saved = {k: v for k, v in ck["train_config"].items() if k not in ("save_every", "eval_every")}
        mine = {k: v for k, v in asdict(cfg).items() if k not in ("save_every", "eval_every")}
        if saved != mine:
            diff = {k: (saved.get(k), mine.get(k)) for k in mine if saved.get(k) != mine.get(k)}
            raise ValueError(f"{ckpt_path} was written with another configuration {diff}; use a new --output "
                             f"directory or --no-resume")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if schedule is not None:
            schedule.load_state_dict(ck["prepbn"])
        state = ck["state"]
        torch.set_rng_state(ck["rng"])
        if rank == 0:
            log(f"resumed from {ckpt_path} at step {state['step']}")
    ddp = world > 1
    # Every parameter is used in every step: PRepBN gives the branch it skips (RepBN while lam = 1, RMSNorm once
    # lam = 0) zero gradients, so DDP needs no search for unused parameters.
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None
                                              ) if ddp else model
    batches = _Batches(train_ids, train_mask, cfg.batch_size, rank, world, cfg.seed)
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not progress or rank != 0, desc="train",
               dynamic_ncols=True)
    bad_in_row = 0
    t0, tokens = time.time(), 0
    ran = 0

    def checkpoint():
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(),
                             "prepbn": schedule.state_dict() if schedule is not None else None,
                             "state": state, "rng": torch.get_rng_state(), "train_config": asdict(cfg),
                             "model_config": model.config.to_dict() if hasattr(model, "config") else None},
                            ckpt_path)
        if ddp:
            dist.barrier()

    model.train()
    consistency = schedule is not None and cfg.bn_consistency > 0
    record_branch_gaps(model, consistency)
    while state["step"] < cfg.steps:
        step = state["step"]
        if schedule is not None and cfg.bn_init not in ("zero", "keep") and not state["fitted"] \
                and schedule.lam_at(step) < 1.0:
            fit_batches = [tuple(t.to(device) if t is not None else None for t in batches.get(i))
                           for i in range(cfg.fit_batches)]
            n = init_bn_branches(model, cfg.bn_init, fit_batches)
            if ddp:  # each rank fitted on its own batches: every rank takes rank 0's branches
                for m in _repbns(model):
                    for t in list(m.parameters()) + list(m.buffers()):
                        dist.broadcast(t.data, src=0)
            model.train()
            state["fitted"] = True
            if rank == 0:
                log(f"step {step}: set {n} RepBN branches from their RMSNorm (bn_init={cfg.bn_init!r})")
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        gap_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            ids, mask = batches.get(step * cfg.grad_accum + micro)
            ids = ids.to(device)
            mask = mask.to(device) if mask is not None else None
            labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
            sync = contextlib.nullcontext() if (not ddp or micro == cfg.grad_accum - 1) else net.no_sync()
            with sync, _autocast(cfg, device):
                out = net(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
                loss = out.loss
                total = loss if not cfg.distill else _distill(out.logits, teacher, ids, mask)
                gap = pop_branch_gap(model) if consistency else None
                total = total if gap is None else total + cfg.bn_consistency * gap
                (total / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
            if gap is not None:
                gap_sum += gap.detach() / cfg.grad_accum
            tokens += int(mask.sum()) if mask is not None else ids.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss_sum)
        if ddp:
            flag = finite.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag > 0
        if bool(finite):
            optimizer.step()
            bad_in_row = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            state["bad_steps"] += 1
            bad_in_row += 1
            if rank == 0:
                log(f"step {step}: non-finite loss/gradient, step skipped ({bad_in_row} in a row)")
            if bad_in_row >= cfg.max_bad_steps:
                checkpoint()
                raise RuntimeError(f"{bad_in_row} consecutive non-finite steps at step {step}: lower --lr, use "
                                   f"--amp none, or lengthen the PRepBN transition")
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        lam = min(1.0, schedule.lam) if schedule is not None else None  # lam used by this step
        if schedule is not None:
            schedule.step()
        state["step"] = step + 1
        ran += 1
        loss_value = float(loss_sum)
        state["history"].append({"step": step + 1, "loss": loss_value, "lam": lam,
                                 "lr": scheduler.get_last_lr()[0], "branch_gap": float(gap_sum) if consistency else None})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lam=f"{lam:.3f}" if lam is not None else "-",
                        tok_s=f"{tokens * world / max(1e-9, time.time() - t0):.0f}")
        if eval_ids is not None and cfg.eval_every and state["step"] % cfg.eval_every == 0 and rank == 0:
            ppl = perplexity(model, eval_ids, eval_mask, batch_size=cfg.batch_size, device=device)
            state["eval"].append({"step": state["step"], "ppl": ppl, "mode": "running-stats"})
            log(f"step {state['step']}: held-out perplexity {ppl:.2f} (eval mode, running statistics)")
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            checkpoint()
        if stop_after is not None and ran >= stop_after:
            checkpoint()
            break
    bar.close()
    elapsed = time.time() - t0
    return {"step": state["step"], "bad_steps": state["bad_steps"], "history": state["history"],
            "eval": state["eval"], "lam": schedule.lam if schedule is not None else None,
            "train_tokens_per_s": tokens * world / max(elapsed, 1e-9), "rank": rank, "world_size": world}
