"""Training checkpoints: atomic writes, newest-valid lookup, pruning, RNG state capture.

One format for every task of :class:`slab.engine.Trainer` (``slab train``, ``train-lm``, ``train-det``):
``OUTPUT/checkpoints/step_XXXXXXXX.pt``, the newest ``keep_last`` kept, plus ``best.pt`` where the task
scores its evaluations. A checkpoint is one ``torch.save`` file of tensors and plain Python values (loadable with
``weights_only=True``): model, EMA, optimizer, grad scaler, LR and PRepBN schedules, the RNG states
of every rank (python, numpy, torch, CUDA) and the sampler position. Files are written to a
temporary name in the same folder, fsync'd, then renamed over the final name, so a crash leaves
either the old file or the new one, never half of one.
"""
from __future__ import annotations

import glob
import os
import random
import re
import warnings

import numpy as np
import torch

from ..errors import UserError, output_error
from ..files import is_fused_checkpoint, torch_load

__all__ = ["atomic_save", "load_checkpoint", "find_checkpoints", "find_resume_checkpoint", "prune_checkpoints", "remove_checkpoints",
           "capture_rng", "restore_rng", "checkpoint_path", "atomic_write_text", "CHECKPOINT_FORMAT", "CHECKPOINT_FIX"]

CHECKPOINT_FORMAT = "slab-train-checkpoint"
_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(output: str, step: int) -> str:
    return os.path.join(output, "checkpoints", f"step_{step:08d}.pt")


def atomic_save(obj, path: str | os.PathLike) -> str:
    """``torch.save(obj)`` to ``path`` through a temporary file, fsync and rename.

    A folder that cannot be written raises :class:`slab.errors.UserError` naming ``path`` (not the
    temporary file, which is removed).
    """
    return _atomic_write(path, lambda f: torch.save(obj, f), "checkpoint")


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file, fsync and rename (errors as atomic_save)."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")), "file")


def _atomic_write(path: str | os.PathLike, write, what: str) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise output_error(path, e, what) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


#: what to do about a training checkpoint that cannot be read
CHECKPOINT_FIX = ("Give a checkpoint written by `slab train` (RUN/checkpoints/step_*.pt or best.pt); "
                  "`--resume auto` skips damaged ones")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and check one training checkpoint; ``ValueError`` (a :class:`UserError`) when it is not one of ours."""
    path = os.fspath(path)
    if os.path.isfile(path) and is_fused_checkpoint(path):
        raise UserError(f"{path} is a fused deploy checkpoint written by `slab fuse`, not a training checkpoint: "
                        f"evaluate it with `slab eval {path} --data DATASET` or compare it with `slab verify "
                        f"--fused {path}`")
    state = torch_load(path, CHECKPOINT_FIX, map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a slab training checkpoint (no format={CHECKPOINT_FORMAT!r} entry); for a "
                        f"plain weights file give the model too, e.g. `slab eval {path} --model NAME --data DATASET`")
    for key in ("step", "model", "optimizer", "lr_scheduler", "prepbn", "rng", "position"):
        if key not in state:
            raise UserError(f"checkpoint {path} lacks {key!r}: it was not written by `slab train`, or is damaged")
    return state


def find_checkpoints(output: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the periodic checkpoints in ``output/checkpoints``, newest first."""
    found = []
    for p in glob.glob(os.path.join(output, "checkpoints", "step_*.pt")):
        m = _STEP_RE.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def find_resume_checkpoint(output: str, warn: bool = True) -> tuple[str, dict] | tuple[None, None]:
    """The newest checkpoint of ``output`` that loads; damaged ones are skipped with a warning."""
    for _, path in find_checkpoints(output):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            if warn:
                warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
    return None, None


def prune_checkpoints(output: str, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest periodic checkpoints (``best.pt`` is never touched)."""
    if keep_last <= 0:
        return
    for _, path in find_checkpoints(output)[keep_last:]:
        try:
            os.remove(path)
        except OSError:
            pass


def remove_checkpoints(output: str) -> None:
    """Delete every checkpoint of ``output`` (``--no-resume``: a new run in the same folder)."""
    paths = [p for _, p in find_checkpoints(output)] + [os.path.join(output, "checkpoints", "best.pt")]
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def capture_rng() -> dict:
    """This process's RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x):
    if isinstance(x, (list, tuple)):
        return tuple(_as_tuple(v) for v in x)
    return x
