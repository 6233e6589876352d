"""The command-line contract every training command shares (``slab train``, ``train-lm``, ``train-det``).

``--max-steps N``, ``--save-every N``, ``--stop-at-step N``, ``--resume auto|PATH``, ``--output DIR``
(``DIR/metrics.jsonl``: one line per optimizer step with type, step, loss, lr, lam) and ``--threads N``.
"""
from __future__ import annotations

import argparse

from ..errors import positive_int_arg

__all__ = ["add_run_arguments", "RUN_FLAGS"]

RUN_FLAGS = ("max_steps", "save_every", "stop_at_step", "resume", "output", "threads")


def add_run_arguments(p: argparse.ArgumentParser, defaults: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    """Add the shared flags that ``p`` does not define already (``skip``); ``defaults`` per flag (dest name)."""
    d = {k: None for k in RUN_FLAGS}
    d.update(threads=0, **(defaults or {}))
    flags = {
        "max_steps": dict(type=positive_int_arg, help="optimizer steps of the run"),
        "save_every": dict(type=int, help="checkpoint every N optimizer steps (DIR/checkpoints/step_*.pt)"),
        "stop_at_step": dict(type=positive_int_arg, help="stop after this step with a checkpoint, as if pre-empted "
                                                         "(continue with --resume auto)"),
        "resume": dict(nargs="?", const="auto", metavar="auto|PATH",
                       help="continue the run in --output from its newest valid checkpoint (auto), or from PATH"),
        "output": dict(help="run folder: metrics.jsonl (one line per optimizer step), checkpoints/, ..."),
        "threads": dict(type=int, help="torch CPU threads per process (0: torch's default)"),
    }
    for name, kw in flags.items():
        if name not in skip:
            p.add_argument("--" + name.replace("_", "-"), dest=name, default=d[name], **kw)
