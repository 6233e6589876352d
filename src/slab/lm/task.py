"""Causal language modelling as a task of :class:`slab.engine.Trainer` (``slab train-lm``, ``slab convert-lm``)."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn

from ..engine.distributed import DistInfo
from ..engine.optim import LambdaSchedule
from ..engine.task import Task, has_prepbn
from ..layers.norm import pop_branch_gap, record_branch_gaps
from ..schedule import PRepBNSchedule

__all__ = ["LMTask", "TokenBatches"]

#: TrainLMConfig fields that do not change the run (a resumed run may set them otherwise)
BOOKKEEPING = ("save_every", "eval_every", "keep_last")


class TokenBatches:
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


class LMTask(Task):
    """Train a causal LM taking ``input_ids``/``attention_mask``/``labels`` on blocks of token ids.

    With ``cfg.distill`` the objective is the KL divergence from ``teacher``'s next-token
    distribution; the logged ``loss`` stays the cross-entropy on the text. Where ``bn_init`` asks,
    every RepBN branch is set from its RMSNorm when lam first drops below 1.
    """

    name = "lm"
    program = "slab train-lm"
    description = "train"

    def __init__(self, model: nn.Module, train_ids: torch.Tensor, cfg, train_mask=None, eval_ids=None,
                 eval_mask=None, teacher: nn.Module | None = None, log=print):
        self.model, self.cfg, self.teacher, self._log = model, cfg, teacher, log
        self.train_ids, self.train_mask, self.eval_ids, self.eval_mask = train_ids, train_mask, eval_ids, eval_mask
        self.total_steps = cfg.steps
        self.fitted, self.history, self.evals, self.tokens = False, [], [], 0

    def setup(self, dist_info: DistInfo) -> None:
        self.dist = dist_info
        self.model.to(dist_info.device)
        self.batches = TokenBatches(self.train_ids, self.train_mask, self.cfg.batch_size, dist_info.rank,
                                    dist_info.world_size, self.cfg.seed)

    def build_optimizer(self) -> torch.optim.Optimizer:
        from .train import build_optimizer
        return build_optimizer(self.model, self.cfg)

    def build_lr_schedule(self, optimizer):
        from .train import lr_factor
        return LambdaSchedule(optimizer, lr_factor(self.cfg))

    def build_prepbn_schedule(self) -> PRepBNSchedule | None:
        from .train import prepbn_warmup_steps
        self.schedule = None
        if has_prepbn(self.model):
            self.schedule = PRepBNSchedule(self.model, total_steps=self.cfg.steps,
                                           warmup_steps=prepbn_warmup_steps(self.cfg),
                                           transition_fraction=self.cfg.prepbn_transition)
        return self.schedule

    def run_settings(self) -> dict:
        from dataclasses import asdict
        return {k: v for k, v in asdict(self.cfg).items() if k not in BOOKKEEPING}

    def on_train_begin(self) -> None:
        self.consistency = self.schedule is not None and self.cfg.bn_consistency > 0
        self.model.train()
        record_branch_gaps(self.model, self.consistency)
        self.t_start = time.time()

    def train_batches(self):
        micro = self.trainer.step * self.cfg.grad_accum
        while True:
            yield self.batches.get(micro)
            micro += 1

    def before_step(self, step: int) -> None:
        cfg = self.cfg
        if (self.schedule is None or cfg.bn_init in ("zero", "keep") or self.fitted
                or self.schedule.lam_at(step) >= 1.0):
            return
        from .train import init_bn_branches
        device = self.dist.device
        fit_batches = [tuple(t.to(device) if t is not None else None for t in self.batches.get(i))
                       for i in range(cfg.fit_batches)]
        n = init_bn_branches(self.model, cfg.bn_init, fit_batches)
        if self.dist.distributed:  # each rank fitted on its own batches: every rank takes rank 0's branches
            from .train import _repbns
            for m in _repbns(self.model):
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, src=0)
        self.model.train()
        self.fitted = True
        if self.dist.is_main:
            self._log(f"step {step}: set {n} RepBN branches from their RMSNorm (bn_init={cfg.bn_init!r})")

    def loss(self, model: nn.Module, batch):
        ids, mask = batch
        device = self.dist.device
        ids = ids.to(device)
        mask = mask.to(device) if mask is not None else None
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        total = out.loss
        if self.cfg.distill:
            from .train import _distill
            total = _distill(out.logits, self.teacher, ids, mask)
        gap = pop_branch_gap(self.model) if self.consistency else None
        if gap is not None:
            total = total + self.cfg.bn_consistency * gap
        self.tokens += int(mask.sum()) if mask is not None else ids.numel()
        return total, {"loss": out.loss, "branch_gap": gap}

    def after_step(self, record: dict) -> None:
        self.history.append({"step": record["step"], "loss": record["loss"], "lam": record["lam"],
                             "lr": record["lr"],
                             "branch_gap": record.get("branch_gap", 0.0) if self.consistency else None})

    def progress_info(self) -> dict:
        return {"tok_s": f"{self.tokens_per_s():.0f}"}

    def tokens_per_s(self) -> float:
        return self.tokens * self.dist.world_size / max(1e-9, time.time() - self.t_start)

    def evaluate(self, step: int, ema_model=None) -> dict | None:
        cfg = self.cfg
        if self.eval_ids is None or not cfg.eval_every or step % cfg.eval_every or not self.dist.is_main:
            return None
        from .train import perplexity
        ppl = perplexity(self.model, self.eval_ids, self.eval_mask, batch_size=cfg.batch_size, device=self.dist.device)
        self.evals.append({"step": step, "ppl": ppl, "mode": "running-stats"})
        self._log(f"step {step}: held-out perplexity {ppl:.2f} (eval mode, running statistics)")
        return {"type": "eval", **self.evals[-1]}

    def state_dict(self) -> dict:
        return {"fitted": self.fitted, "history": self.history, "eval": self.evals}

    def load_state_dict(self, state: dict, step: int) -> None:
        self.fitted, self.history, self.evals = bool(state["fitted"]), list(state["history"]), list(state["eval"])

    def checkpoint_extras(self) -> dict:
        config = getattr(self.model, "config", None)
        return {"model_config": config.to_dict() if config is not None else None}

    def log(self, message: str) -> None:
        self._log(message)

    def log_step(self, record: dict) -> None:
        pass  # the progress bar, or nothing (the metrics log has every step)
