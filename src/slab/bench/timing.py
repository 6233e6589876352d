"""Timing helpers robust to a shared, noisy CPU.

Every comparison in ``slab.bench`` measures its candidates side by side in one process, interleaved
round-robin (so a burst of load from another process hits all of them alike), and reports a low
percentile of many short repeats rather than a mean. Ratios between candidates measured this way
are far more stable than absolute times.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Timing", "compare", "time_fn", "sync"]


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of each repeat of one candidate."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def percentile(self, p: float) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    @property
    def robust(self) -> float:
        """The 20th percentile: near the best, but not a single lucky sample."""
        return self.percentile(20)

    def as_dict(self) -> dict:
        return {"best_s": self.best, "p20_s": self.robust, "median_s": self.median, "repeats": len(self.samples)}


def compare(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 2, min_time: float = 0.0,
            max_time: float | None = None, device: str | None = None, clock: str = "wall") -> dict[str, Timing]:
    """Time each callable ``repeats`` times, interleaved round-robin, after ``warmup`` calls each.

    ``min_time``: keep repeating (round-robin) until every candidate has at least this much total
    time measured. ``max_time``: stop early once this many seconds have passed in total (at least
    3 repeats each). ``clock``: ``'wall'`` (``time.perf_counter``) or ``'cpu'`` (``time.thread_time``:
    CPU seconds of the calling thread, immune to being descheduled; meaningful only with
    ``torch.get_num_threads() == 1``).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.thread_time
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    out = {name: Timing(name) for name in fns}
    start = time.perf_counter()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        r = 0
        while True:
            for name, fn in fns.items():
                t0 = now()
                fn()
                sync(device)
                out[name].samples.append(now() - t0)
            r += 1
            elapsed = time.perf_counter() - start
            if max_time is not None and elapsed > max_time and r >= 3:
                break
            if r >= repeats and all(sum(t.samples) >= min_time for t in out.values()):
                break
    finally:
        if gc_was:
            gc.enable()
    return out


def time_fn(fn: Callable[[], object], repeats: int = 20, warmup: int = 2, **kw) -> Timing:
    """Time one callable (see :func:`compare`)."""
    return compare({"fn": fn}, repeats=repeats, warmup=warmup, **kw)["fn"]
