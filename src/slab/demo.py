"""The main job of the README (``make demo`` / ``slab demo``), end to end on real data.

1. Train a LayerNorm + softmax baseline and a SLAB model (SLA + PRepBN) of the same size on
   Fashion-MNIST (the Debian package's IDX files), with a progress bar.
2. Recalibrate the SLAB model's BN statistics over training images (the authors do this before
   evaluation), fuse it into a norm-free model and verify, on the whole test set, that fused and
   unfused give the same logits (max abs difference) and the same predictions.
3. Measure latency at batch 1 and 64 of: LN, SLAB unfused, SLAB fused, and the norm-free bound
   (the same architecture built with ``norm='none'``), side by side in one process.
4. Print a table; write ``report.json`` and PNG plots (loss and accuracy curves, lam over steps).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

MODEL = "slab_deit_nano_patch4_28"
FORMS = {  # what each trained model is, as model kwargs
    "LN (softmax + LayerNorm)": dict(norm="ln", attn="softmax"),
    "SLAB (SLA + PRepBN)": dict(norm="prepbn", attn="sla"),
}


@dataclass
class DemoConfig:
    output: str = "outputs/demo"
    epochs: float = 3.0
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    recalibrate_batches: int = 100
    latency_repeats: int = 30
    progress: bool = True
    max_steps: int | None = None  # overrides epochs (tests use a few steps)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def compare_on_loader(reference: nn.Module, candidate: nn.Module, loader) -> dict:
    """Max abs logit difference, prediction agreement and accuracies of two models over a loader."""
    max_abs, max_ref, agree, correct_ref, correct_cand, n = 0.0, 0.0, 0, 0, 0, 0
    for x, y in loader:
        a, b = reference(x), candidate(x)
        max_abs = max(max_abs, (a - b).abs().max().item())
        max_ref = max(max_ref, a.abs().max().item())
        pa, pb = a.argmax(-1), b.argmax(-1)
        agree += int((pa == pb).sum())
        correct_ref += int((pa == y).sum())
        correct_cand += int((pb == y).sum())
        n += y.numel()
    return {"max_abs_logit_diff": max_abs, "max_abs_logit": max_ref, "identical_predictions": agree == n,
            "agreeing_predictions": agree, "n": n, "top1_reference": 100.0 * correct_ref / n,
            "top1_candidate": 100.0 * correct_cand / n}


@torch.no_grad()
def measure_latency(models: dict[str, nn.Module], batch: int, in_shape: tuple[int, ...], repeats: int) -> dict:
    """Median latency (ms) per model, measured interleaved (round-robin) so machine noise hits all alike."""
    x = torch.randn(batch, *in_shape)
    inner = max(1, 64 // batch)  # several calls per sample at batch 1 to beat timer noise
    for m in models.values():
        for _ in range(3):
            m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                m(x)
            times[name].append((time.perf_counter() - t0) / inner * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _plots(output: str, runs: dict[str, object]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, res in runs.items():
        steps = [r["step"] for r in res.history]
        axes[0].plot(steps, [r["loss"] for r in res.history], label=label, alpha=0.8)
        axes[1].plot([e["step"] for e in res.evals], [e["top1"] for e in res.evals], marker="o", label=label)
        axes[2].plot(steps, [r["lam"] for r in res.history], label=label)
    axes[0].set(title="training loss", xlabel="optimizer step", ylabel="loss")
    axes[1].set(title="test top-1 (%)", xlabel="optimizer step")
    axes[2].set(title="PRepBN lambda (1 = LayerNorm, 0 = RepBN)", xlabel="optimizer step", ylim=(-0.05, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(output, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def run_demo(cfg: DemoConfig) -> dict:
    import slab
    from slab.data import build_dataset
    from slab.train import TrainConfig, evaluate, recalibrate_bn, train

    os.makedirs(cfg.output, exist_ok=True)
    for sub in ("ln", "slab"):
        # The demo owns these run folders; a previous demo's checkpoints would otherwise be refused
        # (train() never silently mixes runs).
        shutil.rmtree(os.path.join(cfg.output, sub), ignore_errors=True)
    t0 = time.time()
    runs = {}
    for label, kwargs in FORMS.items():
        print(f"\n== training {label}: {MODEL} {kwargs}")
        tc = TrainConfig(model=MODEL, model_kwargs=dict(kwargs), data="fashion-mnist", epochs=None if cfg.max_steps else cfg.epochs,
                         max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                         output=os.path.join(cfg.output, "ln" if kwargs["norm"] == "ln" else "slab"),
                         eval_every=0, progress=cfg.progress, prepbn_transition=0.8, label_smoothing=0.1,
                         num_workers=0)
        runs[label] = train(tc)
    ln_label, slab_label = list(FORMS)
    ln_model, slab_model = runs[ln_label].model.eval(), runs[slab_label].model.eval()

    train_eval = build_dataset("fashion-mnist", "train", is_training=False)
    test = build_dataset("fashion-mnist", "val", is_training=False)
    g = torch.Generator().manual_seed(cfg.seed)
    recal_loader = DataLoader(train_eval, batch_size=cfg.batch_size, shuffle=True, generator=g)
    test_loader = DataLoader(test, batch_size=500)

    print(f"\n== recalibrating BN statistics over {cfg.recalibrate_batches} training batches")
    before = evaluate(slab_model, test_loader)["top1"]
    recalibrate_bn(slab_model, recal_loader, cfg.recalibrate_batches)
    slab_model.eval()

    print("== fusing the SLAB model and checking fused == unfused on the whole test set")
    fused = slab.fuse(slab_model)
    check = compare_on_loader(slab_model, fused, test_loader)
    ln_top1 = evaluate(ln_model, test_loader)["top1"]

    bound = slab.create_model(MODEL, norm="none", attn="sla").eval()
    models = {"LN": ln_model, "SLAB unfused": slab_model, "SLAB fused": fused, "norm-free bound": bound}
    in_shape = (1, 28, 28)
    print(f"== latency (median of {cfg.latency_repeats} interleaved rounds, {torch.get_num_threads()} threads)")
    lat1 = measure_latency(models, 1, in_shape, cfg.latency_repeats)
    lat64 = measure_latency(models, 64, in_shape, cfg.latency_repeats)

    top1 = {"LN": ln_top1, "SLAB unfused": check["top1_reference"], "SLAB fused": check["top1_candidate"],
            "norm-free bound": None}
    rows = []
    for name, m in models.items():
        rows.append({"model": name, "params": _params(m), "top1": top1[name], "latency_ms_b1": lat1[name],
                     "latency_ms_b64": lat64[name]})
    report = {
        "model": MODEL, "forms": FORMS, "config": cfg.__dict__, "rows": rows,
        "slab_top1_before_recalibration": before,
        "fusion_check": check,
        "ratios": {"fused_vs_bound_b1": lat1["SLAB fused"] / lat1["norm-free bound"],
                   "fused_vs_bound_b64": lat64["SLAB fused"] / lat64["norm-free bound"],
                   "fused_vs_unfused_b64": lat64["SLAB fused"] / lat64["SLAB unfused"],
                   "fused_vs_ln_b64": lat64["SLAB fused"] / lat64["LN"]},
        "slab_minus_ln_top1": check["top1_candidate"] - ln_top1,
        "train_time_s": {k: v.elapsed_s for k, v in runs.items()}, "steps": {k: v.steps for k, v in runs.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "elapsed_s": time.time() - t0,
    }
    report["plots"] = _plots(cfg.output, runs)
    with open(os.path.join(cfg.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print_report(report)
    return report


def print_report(report: dict) -> None:
    print("\n" + "=" * 78)
    print(f"SLAB demo on Fashion-MNIST ({report['model']}), test set of {report['fusion_check']['n']} images")
    print("=" * 78)
    print(f"{'model':18s} {'params':>9s} {'test top-1':>11s} {'latency b=1':>12s} {'latency b=64':>13s}")
    for r in report["rows"]:
        top1 = f"{r['top1']:.2f}%" if r["top1"] is not None else "-"
        print(f"{r['model']:18s} {r['params']:>9,d} {top1:>11s} {r['latency_ms_b1']:>9.3f} ms {r['latency_ms_b64']:>10.3f} ms")
    c, q = report["fusion_check"], report["ratios"]
    print("-" * 78)
    print(f"fused vs unfused on {c['n']} test images: max |logit diff| = {c['max_abs_logit_diff']:.2e} "
          f"(logits up to {c['max_abs_logit']:.1f}), identical predictions: {c['identical_predictions']}")
    print(f"SLAB - LN top-1: {report['slab_minus_ln_top1']:+.2f} points "
          f"(SLAB before BN recalibration: {report['slab_top1_before_recalibration']:.2f}%)")
    print(f"fused / norm-free bound latency: {q['fused_vs_bound_b1']:.3f} (b=1), {q['fused_vs_bound_b64']:.3f} (b=64); "
          f"fused / unfused (b=64): {q['fused_vs_unfused_b64']:.3f}")
    print(f"report: {report['plots'][0].rsplit('/', 1)[0]}/report.json, plots: {', '.join(report['plots'])}")
    print(f"total time {report['elapsed_s']:.0f} s")
