"""The paper's norm/attention ablations at small scale: one small ViT on Fashion-MNIST, several seeds.

Variants (``slab_deit_nano_patch4_28``: 64 channels, 4 blocks, 7x7 tokens, average pooling; only
``norm`` and ``attn`` change):

* ``ln``, ``bn``, ``repbn``, ``prepbn`` with softmax attention: the norm ablation (paper: plain BN
  trains worse or collapses, RepBN alone is below PRepBN, PRepBN matches or beats LN);
* ``prepbn+sla``: SLAB (SLA + PRepBN), against ``prepbn`` (softmax) for the attention ablation.

Every run is a :func:`slab.train.train` run with its own folder (``metrics.jsonl``, checkpoint),
so ``slab plot`` works on each. BN-based models are also evaluated after BN recalibration.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

__all__ = ["VARIANTS", "run_study", "summarise", "markdown_table", "plot_study"]

#: name -> (norm, attn)
VARIANTS = {
    "ln": ("ln", "softmax"),
    "bn": ("bn", "softmax"),
    "repbn": ("repbn", "softmax"),
    "prepbn": ("prepbn", "softmax"),
    "prepbn+sla": ("prepbn", "sla"),
}


def _run_one(variant: str, seed: int, output: str, steps: int, batch_size: int, lr: float, threads: int,
             recal_batches: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from .config import TrainConfig
    from .evaluate import evaluate, recalibrate_bn
    from .task import NonFiniteLossError, build_loaders, recalibration_loader, train
    norm, attn = VARIANTS[variant]
    run_dir = os.path.join(output, "runs", f"{variant.replace('+', '_')}_seed{seed}")
    cfg = TrainConfig(model="slab_deit_nano_patch4_28", model_kwargs=dict(norm=norm, attn=attn), data="fashion-mnist",
                      max_steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.05, lr_warmup=0.05,
                      min_lr=1e-5, label_smoothing=0.1, seed=seed, output=run_dir, progress=False, num_workers=0,
                      keep_last=1, eval_batch_size=1000, resume="auto", log_every=200)
    t0 = time.time()
    rec = {"variant": variant, "norm": norm, "attn": attn, "seed": seed, "run_dir": run_dir, "steps": steps}
    try:
        r = train(cfg)
    except NonFiniteLossError as e:
        rec.update(diverged=True, diverged_step=e.step, top1=float("nan"), top1_recal=float("nan"),
                   final_loss=float("nan"), time_s=time.time() - t0)
        return rec
    from .plot import read_metrics
    losses = [h["loss"] for h in read_metrics(run_dir)[0]]  # the whole run, also when it was resumed
    rec.update(diverged=False, top1=r.final["top1"], eval_loss=r.final["loss"],
               final_loss=sum(losses[-50:]) / len(losses[-50:]))
    if norm in ("bn", "repbn", "prepbn") and recal_batches > 0:
        model = r.model
        recalibrate_bn(model, recalibration_loader(cfg), recal_batches)
        _, _, _, val_loader = build_loaders(cfg)
        rec["top1_recal"] = evaluate(model, val_loader)["top1"]
    else:
        rec["top1_recal"] = rec["top1"]
    rec["time_s"] = time.time() - t0
    return rec


def run_study(output: str, variants: list[str] | None = None, seeds: tuple[int, ...] = (0, 1), steps: int = 600,
              batch_size: int = 128, lr: float = 2e-3, jobs: int = 2, threads: int = 1, recal_batches: int = 50,
              log=print) -> list[dict]:
    """Run every variant x seed (``jobs`` processes of ``threads`` threads); write ``study.json``; return the runs."""
    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown study variants {unknown}; choose from {list(VARIANTS)}")
    os.makedirs(output, exist_ok=True)
    tasks = [(v, s) for s in seeds for v in variants]
    results: list[dict] = []
    t0 = time.time()
    args = dict(output=output, steps=steps, batch_size=batch_size, lr=lr, threads=threads, recal_batches=recal_batches)
    if jobs <= 1:
        for v, s in tasks:
            results.append(_run_one(v, s, **args))
            log(_line(results[-1], time.time() - t0))
    else:
        import multiprocessing as mp
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, v, s, **args): (v, s) for v, s in tasks}
            for fut in as_completed(futures):
                results.append(fut.result())
                log(_line(results[-1], time.time() - t0))
    order = {(v, s): i for i, (v, s) in enumerate(tasks)}
    results.sort(key=lambda r: order[(r["variant"], r["seed"])])
    meta = {"steps": steps, "batch_size": batch_size, "lr": lr, "seeds": list(seeds), "variants": variants,
            "jobs": jobs, "threads": threads, "recal_batches": recal_batches, "wall_s": time.time() - t0}
    with open(os.path.join(output, "study.json"), "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=1)
    return results


def _line(r: dict, elapsed: float) -> str:
    if r["diverged"]:
        return f"[{elapsed:6.0f}s] {r['variant']:11s} seed {r['seed']}: diverged at step {r['diverged_step']}"
    return (f"[{elapsed:6.0f}s] {r['variant']:11s} seed {r['seed']}: top-1 {r['top1']:.2f} (recalibrated "
            f"{r['top1_recal']:.2f}), train loss {r['final_loss']:.4f}, {r['time_s']:.0f}s")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict]) -> list[dict]:
    """One row per variant: mean and std over seeds."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        row = {"variant": variant, "norm": runs[0]["norm"], "attn": runs[0]["attn"], "seeds": len(runs),
               "diverged": sum(r["diverged"] for r in runs)}
        for key in ("top1", "top1_recal", "final_loss"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in runs])
        row["per_seed_top1"] = [r["top1"] for r in runs]
        row["time_s"] = statistics.fmean(r["time_s"] for r in runs)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    out = ["| variant | norm | attention | top-1 (%) | top-1 after BN recalibration (%) | final train loss | "
           "per-seed top-1 | diverged | time/run (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = ", ".join("nan" if math.isnan(v) else f"{v:.2f}" for v in r["per_seed_top1"])
        recal = "" if r["norm"] == "ln" else f"{r['top1_recal']:.2f} ± {r['top1_recal_std']:.2f}"
        out.append(f"| {r['variant']} | {r['norm']} | {r['attn']} | {r['top1']:.2f} ± {r['top1_std']:.2f} | {recal} | "
                   f"{r['final_loss']:.4f} ± {r['final_loss_std']:.4f} | {seeds} | {r['diverged']}/{r['seeds']} | "
                   f"{r['time_s']:.0f} |")
    return "\n".join(out)


def plot_study(results: list[dict], output: str, smooth: int = 25) -> str:
    """Training loss of each variant (mean over seeds) and final top-1 per variant, to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import _smooth, read_metrics
    rows = summarise(results)
    fig, (ax_loss, ax_lam, ax_top1) = plt.subplots(1, 3, figsize=(15, 4.2))
    for row in rows:
        curves = []
        lam = None
        for r in results:
            if r["variant"] != row["variant"]:
                continue
            train, _ = read_metrics(r["run_dir"])
            curves.append([t["loss"] for t in train])
            lam = lam or ([t["step"] for t in train], [t["lam"] for t in train])
        n = min(len(c) for c in curves) if curves else 0
        if n:
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            ax_loss.plot(range(1, n + 1), _smooth(mean, smooth), label=row["variant"], lw=1.3)
            if row["norm"] == "prepbn" and lam:
                ax_lam.plot(*lam, label=row["variant"], lw=1.3)
    names = [r["variant"] for r in rows]
    ax_top1.bar([i - 0.2 for i in range(len(rows))], [0 if math.isnan(r["top1"]) else r["top1"] for r in rows],
                width=0.4, yerr=[0 if math.isnan(r["top1_std"]) else r["top1_std"] for r in rows], color="tab:blue",
                alpha=0.6, label="top-1 (mean, std)")
    ax_top1.bar([i + 0.2 for i in range(len(rows))], [0 if math.isnan(r["top1_recal"]) else r["top1_recal"]
                                                      for r in rows], width=0.4, color="tab:orange", alpha=0.6,
                label="after BN recalibration")
    for r in results:  # one dot per seed
        if not math.isnan(r["top1"]):
            ax_top1.scatter(names.index(r["variant"]) - 0.2, r["top1"], color="k", s=10, zorder=3)
    ax_top1.set_xticks(range(len(rows)), names)
    finite = [r["top1"] for r in rows if not math.isnan(r["top1"])]
    if finite:
        ax_top1.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    ax_loss.set(title=f"training loss (mean over seeds, moving average {smooth})", xlabel="optimizer step")
    ax_lam.set(title="PRepBN lam", xlabel="optimizer step", ylim=(-0.05, 1.05))
    ax_top1.set(title="Fashion-MNIST test top-1 (%)")
    ax_loss.legend(fontsize=8)
    ax_top1.legend(fontsize=8, loc="lower right")
    for ax in (ax_loss, ax_lam, ax_top1):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
