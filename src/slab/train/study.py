"""The paper's norm/attention ablations at small scale, converged: one small ViT on Fashion-MNIST.

The architecture of ``slab demo`` (``slab_deit_nano_patch4_28`` with 7x7 patches: 16 tokens, 64
channels, 4 blocks); only ``norm`` and ``attn`` change:

* ``ln``, ``bn``, ``repbn``, ``prepbn`` with softmax attention: the norm ablation;
* ``prepbn+sla``: SLAB (SLA + PRepBN), against ``prepbn`` (softmax) for the attention ablation.

Each variant trains with its own tuned recipe (:data:`RECIPES`: the demo's for LN, PRepBN and
SLAB; plain BN and RepBN from the same sweep, docs/demo.md) for the same number of epochs, long
enough that LN's test accuracy has plateaued, and is evaluated on the test set after every epoch.
BN-based models are also evaluated after BN recalibration (the deployed form). :func:`verdicts`
sets each row against the paper's claim.

Every run is a :func:`slab.train.train` run with its own folder (``metrics.jsonl``, checkpoint),
so ``slab plot`` works on each and an interrupted study resumes.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

__all__ = ["VARIANTS", "RECIPES", "CLAIMS", "run_study", "summarise", "verdicts", "markdown_table", "plot_study"]

#: name -> (norm, attn)
VARIANTS = {
    "ln": ("ln", "softmax"),
    "bn": ("bn", "softmax"),
    "repbn": ("repbn", "softmax"),
    "prepbn": ("prepbn", "softmax"),
    "prepbn+sla": ("prepbn", "sla"),
}


def _recipes() -> dict[str, dict]:
    from slab.demo import RECIPES as DEMO
    recipes = {"ln": DEMO["LN"], "prepbn": DEMO["PRepBN"], "prepbn+sla": DEMO["SLAB"],
               # the bn/repbn rows of the sweep (docs/demo.md, 8 epochs): bn 88.15 % at lr 4e-3 vs 87.58 at
               # 8e-3; repbn 88.38 at 4e-3 vs 88.99 at 8e-3
               "bn": dict(DEMO["PRepBN"], lr=4e-3), "repbn": dict(DEMO["PRepBN"], lr=8e-3)}
    for name, (norm, _) in VARIANTS.items():
        recipes[name] = {k: v for k, v in recipes[name].items() if k != "prepbn_transition" or norm == "prepbn"}
        recipes[name].pop("epochs", None)  # the study sets one length for every variant
    return recipes


#: variant -> TrainConfig fields of its tuned recipe (the length comes from the study)
RECIPES = _recipes()

#: variant -> (the paper's claim, in words; does a summary table (variant -> row) agree with it?)
CLAIMS = {
    "ln": ("baseline", None),
    "bn": ("plain BN is worse than LN or unstable",
           lambda t: t["bn"]["diverged"] > 0 or t["bn"]["top1_recal"] < t["ln"]["top1"]),
    "repbn": ("RepBN alone is below PRepBN", lambda t: t["repbn"]["top1_recal"] < t["prepbn"]["top1_recal"]),
    "prepbn": ("PRepBN >= LN - 0.3", lambda t: t["prepbn"]["top1_recal"] >= t["ln"]["top1"] - 0.3),
    "prepbn+sla": ("SLA within 0.5 of softmax (both PRepBN)",
                   lambda t: t["prepbn+sla"]["top1_recal"] >= t["prepbn"]["top1_recal"] - 0.5),
}


def _run_one(variant: str, seed: int, output: str, epochs: float, max_steps: int | None, threads: int,
             recal_batches: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from slab.demo import MODEL, MODEL_KWARGS, TRAIN_SIZE

    from .config import TrainConfig
    from .evaluate import evaluate, recalibrate_bn
    from .plot import read_metrics
    from .task import NonFiniteLossError, build_loaders, recalibration_loader, train
    norm, attn = VARIANTS[variant]
    recipe = RECIPES[variant]
    run_dir = os.path.join(output, "runs", f"{variant.replace('+', '_')}_seed{seed}")
    cfg = TrainConfig(model=MODEL, model_kwargs={**MODEL_KWARGS, "norm": norm, "attn": attn}, data="fashion-mnist",
                      epochs=None if max_steps else epochs, max_steps=max_steps, seed=seed, output=run_dir,
                      progress=False, num_workers=0, keep_last=1, eval_batch_size=1000, resume="auto",
                      eval_every=TRAIN_SIZE // recipe["batch_size"], log_every=10_000, **recipe)
    t0 = time.time()
    rec = {"variant": variant, "norm": norm, "attn": attn, "seed": seed, "run_dir": run_dir, "epochs": epochs,
           "max_steps": max_steps, "recipe": recipe}
    try:
        r = train(cfg)
    except NonFiniteLossError as e:
        rec.update(diverged=True, diverged_step=e.step, top1=float("nan"), top1_recal=float("nan"),
                   final_loss=float("nan"), top1_per_epoch=[], time_s=time.time() - t0)
        return rec
    history, evals = read_metrics(run_dir)  # the whole run, also when it was resumed
    losses = [h["loss"] for h in history]
    rec.update(diverged=False, steps=r.steps, top1=r.final["top1"], eval_loss=r.final["loss"],
               final_loss=sum(losses[-50:]) / len(losses[-50:]),
               top1_per_epoch=[round(e["top1"], 2) for e in evals])
    if norm != "ln" and recal_batches > 0:
        model = r.model
        recalibrate_bn(model, recalibration_loader(cfg), recal_batches)
        _, _, _, val_loader = build_loaders(cfg)
        rec["top1_recal"] = evaluate(model, val_loader)["top1"]
    else:
        rec["top1_recal"] = rec["top1"]
    rec["time_s"] = time.time() - t0
    return rec


def run_study(output: str, variants: list[str] | None = None, seeds: tuple[int, ...] = (0, 1), epochs: float = 12,
              max_steps: int | None = None, jobs: int = 2, threads: int = 1, recal_batches: int = 100,
              log=print) -> list[dict]:
    """Run every variant x seed (``jobs`` processes of ``threads`` threads); write ``study.json``; return the runs.

    ``max_steps``, when given, replaces ``epochs`` (short runs for tests).
    """
    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown study variants {unknown}; choose from {list(VARIANTS)}")
    os.makedirs(output, exist_ok=True)
    # The slowest variant (SLA) first, so that the last job to finish is not the longest one.
    tasks = [(v, s) for s in seeds for v in sorted(variants, key=lambda v: VARIANTS[v][1] != "sla")]
    results: list[dict] = []
    t0 = time.time()
    args = dict(output=output, epochs=epochs, max_steps=max_steps, threads=threads, recal_batches=recal_batches)
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
    order = {(v, s): i for i, (v, s) in enumerate((v, s) for s in seeds for v in variants)}
    results.sort(key=lambda r: order[(r["variant"], r["seed"])])
    meta = {"epochs": epochs, "max_steps": max_steps, "seeds": list(seeds), "variants": variants, "jobs": jobs,
            "threads": threads, "recal_batches": recal_batches, "wall_s": time.time() - t0,
            "cpu_count": os.cpu_count(), "load_average_1min_end": os.getloadavg()[0]}
    with open(os.path.join(output, "study.json"), "w") as f:
        json.dump({"meta": meta, "runs": results, "summary": summarise(results)}, f, indent=1)
    return results


def _line(r: dict, elapsed: float) -> str:
    if r["diverged"]:
        return f"[{elapsed:6.0f}s] {r['variant']:11s} seed {r['seed']}: diverged at step {r['diverged_step']}"
    return (f"[{elapsed:6.0f}s] {r['variant']:11s} seed {r['seed']}: top-1 {r['top1']:.2f} (recalibrated "
            f"{r['top1_recal']:.2f}), per epoch {r['top1_per_epoch']}, {r['time_s']:.0f}s")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict]) -> list[dict]:
    """One row per variant: mean and std over seeds, the last-epochs gain, and the paper's claim with its verdict."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        row = {"variant": variant, "norm": runs[0]["norm"], "attn": runs[0]["attn"], "seeds": len(runs),
               "diverged": sum(r["diverged"] for r in runs)}
        for key in ("top1", "top1_recal", "final_loss"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in runs])
        row["per_seed_top1"] = [r["top1_recal"] for r in runs]
        # How much the last 3 epochs still added (mean over seeds): small once training has plateaued.
        gains = [r["top1_per_epoch"][-1] - r["top1_per_epoch"][-4] for r in runs if len(r["top1_per_epoch"]) >= 4]
        row["gain_last3_epochs"] = statistics.fmean(gains) if gains else float("nan")
        row["time_s"] = statistics.fmean(r["time_s"] for r in runs)
        rows.append(row)
    verdict = verdicts(rows)
    for row in rows:
        row["claim"], row["agrees"] = CLAIMS[row["variant"]][0], verdict.get(row["variant"])
    return rows


def verdicts(rows: list[dict]) -> dict[str, bool | None]:
    """variant -> whether its row agrees with the paper's claim (None: baseline, or a row it needs is missing)."""
    table = {r["variant"]: r for r in rows}
    out: dict[str, bool | None] = {}
    for variant, (_, check) in CLAIMS.items():
        if variant not in table:
            continue
        try:
            out[variant] = bool(check(table)) if check else None
        except KeyError:  # the claim compares with a variant this study did not run
            out[variant] = None
    return out


def markdown_table(rows: list[dict]) -> str:
    out = ["| variant | norm | attention | top-1 (%), as trained | top-1 (%), deployed (BN recalibrated) | "
           "per-seed (deployed) | gain in the last 3 epochs | final train loss | diverged | paper's claim | agrees |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = ", ".join("nan" if math.isnan(v) else f"{v:.2f}" for v in r["per_seed_top1"])
        agrees = {None: "-", True: "**yes**", False: "**no**"}[r["agrees"]]
        out.append(f"| {r['variant']} | {r['norm']} | {r['attn']} | {r['top1']:.2f} ± {r['top1_std']:.2f} | "
                   f"{r['top1_recal']:.2f} ± {r['top1_recal_std']:.2f} | {seeds} | {r['gain_last3_epochs']:+.2f} | "
                   f"{r['final_loss']:.4f} | {r['diverged']}/{r['seeds']} | {r['claim']} | {agrees} |")
    return "\n".join(out)


def plot_study(results: list[dict], output: str, smooth: int = 50) -> str:
    """Training loss and test top-1 per epoch of each variant (mean over seeds), and PRepBN's lam, to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slab.demo import TRAIN_SIZE

    from .plot import _smooth, read_metrics
    fig, (ax_loss, ax_top1, ax_lam) = plt.subplots(1, 3, figsize=(15, 4.2))
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant and not r["diverged"]]
        if not runs:
            continue
        per_epoch = TRAIN_SIZE // RECIPES[variant]["batch_size"]
        trains = [read_metrics(r["run_dir"])[0] for r in runs]
        n = min(len(t) for t in trains)
        mean_loss = [statistics.fmean(t[i]["loss"] for t in trains) for i in range(n)]
        epochs = [trains[0][i]["step"] / per_epoch for i in range(n)]
        ax_loss.plot(epochs, _smooth(mean_loss, smooth), label=variant, lw=1.3)
        m = min(len(r["top1_per_epoch"]) for r in runs)
        ax_top1.plot(range(1, m + 1), [statistics.fmean(r["top1_per_epoch"][i] for r in runs) for i in range(m)],
                     marker="o", ms=3, label=variant)
        if VARIANTS[variant][0] == "prepbn":
            ax_lam.plot(epochs, [trains[0][i]["lam"] for i in range(n)], label=variant, lw=1.3)
    ax_loss.set(title=f"training loss (mean over seeds, running mean {smooth})", xlabel="epoch")
    ax_top1.set(title="test top-1 (%), mean over seeds, as trained", xlabel="epoch")
    ax_lam.set(title="PRepBN lam (1 = LayerNorm, 0 = RepBN)", xlabel="epoch", ylim=(-0.05, 1.05))
    for ax in (ax_loss, ax_top1, ax_lam):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
