"""Training curves from ``metrics.jsonl``: loss, top-1, learning rate and PRepBN lam against the step."""
from __future__ import annotations

import json
import os

from ..errors import UserError, did_you_mean, output_error

__all__ = ["read_metrics", "plot_runs"]


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """``(train_records, eval_records)`` of a run folder (or of a ``metrics.jsonl`` path)."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir!r} the --output folder of 'slab train'?")
    train, evals = [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            kind = rec.get("type", "train")
            if kind == "train":
                train.append(rec)
            elif kind == "eval":
                evals.append(rec)
    return train, evals


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(run_dirs: list[str], output: str, labels: list[str] | None = None, smooth: int = 20,
              title: str | None = None) -> str:
    """Write a 2x2 PNG (train loss, eval top-1, lr, lam) of one or more runs; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.normpath(r)) for r in run_dirs]
    runs = [read_metrics(run) for run in run_dirs]  # every run readable before anything is drawn
    for run, (train, evals) in zip(run_dirs, runs):
        if not train and not evals:
            raise UserError(f"{run} holds no training or evaluation records yet: plot it after its first step")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    kinds = fig.canvas.get_supported_filetypes()
    suffix = os.path.splitext(output)[1].lstrip(".").lower()
    if suffix not in kinds:
        plt.close(fig)
        raise UserError(f"cannot write a plot as {output!r}: the name must end in one of "
                        f"{', '.join('.' + k for k in sorted(kinds))}{did_you_mean(suffix, kinds)}")
    (ax_loss, ax_top1), (ax_lr, ax_lam) = axes
    for (train, evals), label in zip(runs, labels):
        if train:
            steps = [r["step"] for r in train]
            line, = ax_loss.plot(steps, _smooth([r["loss"] for r in train], smooth), label=label, lw=1.2)
            color = line.get_color()
            ax_lr.plot(steps, [r["lr"] for r in train], color=color, label=label, lw=1.2)
            ax_lam.plot(steps, [r["lam"] for r in train], color=color, label=label, lw=1.2)
        else:
            color = None
        if evals:
            ax_top1.plot([r["step"] for r in evals], [r["top1"] for r in evals], marker="o", ms=3, color=color,
                         label=label, lw=1.2)
            if any("ema_top1" in r for r in evals):
                ax_top1.plot([r["step"] for r in evals if "ema_top1" in r],
                             [r["ema_top1"] for r in evals if "ema_top1" in r], ls="--", color=color, lw=1.0,
                             label=f"{label} (EMA)")
    ax_loss.set(title=f"training loss (moving average of {smooth})" if smooth > 1 else "training loss",
                xlabel="optimizer step")
    ax_top1.set(title="eval top-1 (%)", xlabel="optimizer step")
    ax_lr.set(title="learning rate", xlabel="optimizer step")
    ax_lam.set(title="PRepBN lam (1 = LayerNorm, 0 = RepBN)", xlabel="optimizer step", ylim=(-0.05, 1.05))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles, names = ax_loss.get_legend_handles_labels()
    if len(run_dirs) > 1 or names:
        ax_top1.legend(fontsize=7, loc="lower right")
        ax_loss.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        fig.savefig(output, dpi=110)
    except OSError as e:
        raise output_error(output, e) from None
    finally:
        plt.close(fig)
    return output
