"""The main job of the README (``make demo`` / ``slab demo``), end to end on real data.

1. Train one small ViT in three forms on Fashion-MNIST (the Debian package's IDX files), each
   with the recipe the sweep of docs/demo.md chose for it: LN (softmax + LayerNorm), PRepBN
   (softmax + PRepBN) and SLAB (SLA + PRepBN). The test top-1 is measured after every epoch.
2. For each PRepBN model: recalibrate its BN statistics over training images (the authors do this
   before evaluation), fuse it into a norm-free model and verify on the whole test set that fused
   and unfused give the same predictions (and the largest logit difference).
3. Latency at batch 1 and 64 of LN, each unfused and fused model, and the norm-free bound (the
   SLAB architecture built with ``norm='none'``), timed interleaved in one process.
4. A second latency table at larger inputs (the same architecture at 56 to 224 pixels, 64 to 1024
   tokens; random weights: latency does not depend on them), where linear attention pays.
5. Print a table that says where each form wins; write ``report.json`` and ``curves.png``.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

MODEL = "slab_deit_nano_patch4_28"
MODEL_KWARGS: dict = {"patch_size": 7}  # 7x7 patches: 4x4 tokens, 64 channels, 4 blocks (docs/demo.md: why)
FORMS = {  # form -> the model arguments that make it
    "LN": dict(norm="ln", attn="softmax"),
    "PRepBN": dict(norm="prepbn", attn="softmax"),
    "SLAB": dict(norm="prepbn", attn="sla"),
}
# The recipe of each form: TrainConfig fields, chosen by the sweep recorded in docs/demo.md.
_BASE = dict(epochs=8.0, batch_size=128, lr_warmup=0.1, min_lr=1e-5, weight_decay=0.05, label_smoothing=0.0,
             augment=False)
RECIPES = {
    "LN": dict(_BASE, lr=8e-3),
    "PRepBN": dict(_BASE, lr=4e-3, prepbn_transition=0.8),  # 8e-3 collapsed to 33 % mid-run (docs/demo.md)
    "SLAB": dict(_BASE, lr=4e-3, prepbn_transition=0.8),
}
SCALING_SIZES = (28, 56, 112, 224)  # input sides of the token-count table: 16, 64, 256 and 1024 tokens
SCALING_BATCHES = (1, 4)  # small batches: softmax at 1024 tokens and batch 16 takes seconds a call
TRAIN_SIZE = 60_000  # Fashion-MNIST training images


@dataclass
class DemoConfig:
    output: str = "outputs/demo"
    epochs: float | None = None     # overrides every recipe's epochs
    max_steps: int | None = None    # overrides epochs (tests use a few steps)
    seed: int = 0
    jobs: int = 3                   # forms trained at once, one thread each (on 2 cores the 3 share them)
    recalibrate_batches: int = 100
    latency_repeats: int = 30
    scaling_repeats: int = 5
    scaling_sizes: tuple[int, ...] = SCALING_SIZES
    progress: bool = True


def train_config(form: str, cfg: DemoConfig):
    """The TrainConfig of ``form``: its recipe, evaluated on the test set after every epoch."""
    from slab.train import TrainConfig
    recipe = dict(RECIPES[form])
    if cfg.epochs is not None:
        recipe["epochs"] = cfg.epochs
    if cfg.max_steps is not None:
        recipe["epochs"] = None
    steps_per_epoch = TRAIN_SIZE // recipe["batch_size"]
    return TrainConfig(model=MODEL, model_kwargs={**MODEL_KWARGS, **FORMS[form]}, data="fashion-mnist",
                       max_steps=cfg.max_steps, seed=cfg.seed, output=os.path.join(cfg.output, form.lower()),
                       eval_every=steps_per_epoch, eval_batch_size=1000, progress=cfg.progress, num_workers=0,
                       keep_last=1, **recipe)


def _train_form(form: str, cfg_dict: dict, threads: int | None) -> dict:
    """Train one form (in this process or a worker); the weights and the curves, picklable."""
    from slab.train import TrainConfig, train
    if threads:
        torch.set_num_threads(threads)
    tc = TrainConfig.from_dict(cfg_dict)

    def say_evals(record: dict) -> None:
        if record.get("type") == "eval" and not tc.progress:
            print(f"  [{form}] step {record['step']}: test top-1 {record['top1']:.2f}%", flush=True)

    cpu0 = time.process_time()
    result = train(tc, say_evals)
    return {"state_dict": result.model.state_dict(), "history": result.history, "evals": result.evals,
            "steps": result.steps, "elapsed_s": result.elapsed_s, "cpu_s": time.process_time() - cpu0}


def train_forms(cfg: DemoConfig) -> dict[str, dict]:
    """Train every form, ``cfg.jobs`` at a time (each worker one thread); form -> what _train_form returns."""
    configs = {form: train_config(form, cfg) for form in FORMS}
    for form, tc in configs.items():
        print(f"== {form}: {MODEL} {tc.model_kwargs}, recipe {RECIPES[form]}")
        # The demo owns its run folders; a previous demo's checkpoints would otherwise be refused
        # (train() never silently mixes runs).
        shutil.rmtree(tc.output, ignore_errors=True)
    if cfg.jobs <= 1:
        return {form: _train_form(form, tc.to_dict(), None) for form, tc in configs.items()}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    quiet = {form: tc.replace(progress=False).to_dict() for form, tc in configs.items()}  # bars would interleave
    with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
        # The slowest form (SLA's depthwise conv) first, so that with fewer jobs than forms it never waits.
        order = sorted(quiet, key=lambda form: FORMS[form]["attn"] != "sla")
        futures = {form: pool.submit(_train_form, form, quiet[form], 1) for form in order}
        return {form: futures[form].result() for form in FORMS}


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
def measure_latency(models: dict[str, nn.Module], batch: int, in_shape: tuple[int, ...], repeats: int,
                    calls_per_sample: int | None = None) -> dict:
    """Median latency (ms) per model, measured interleaved (round-robin) so machine noise hits all alike.

    Each sample times ``calls_per_sample`` calls (default ``64 // batch``: several at batch 1, to
    beat timer noise).
    """
    x = torch.randn(batch, *in_shape)
    inner = calls_per_sample or max(1, 64 // batch)
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


def recalibrate_fuse_check(model: nn.Module, recal_loader, test_loader, batches: int) -> tuple[nn.Module, dict]:
    """BN recalibration, fusion, and the fused == unfused check on ``test_loader``: ``(fused, check)``."""
    import slab
    from slab.train import evaluate, recalibrate_bn
    before = evaluate(model, test_loader)["top1"]
    recalibrate_bn(model, recal_loader, batches)
    model.eval()
    fused = slab.fuse(model)
    check = compare_on_loader(model, fused, test_loader)
    check["top1_before_recalibration"] = before
    return fused, check


def token_scaling(repeats: int, sizes: tuple[int, ...] = SCALING_SIZES) -> list[dict]:
    """Latency of LN, PRepBN fused and SLAB fused at each input side of ``sizes`` (random weights)."""
    import slab
    rows = []
    for side in sizes:
        models = {}
        for form, kwargs in FORMS.items():
            m = slab.create_model(MODEL, img_size=side, **MODEL_KWARGS, **kwargs).eval()
            models[form] = m if kwargs["norm"] == "ln" else slab.fuse(m, warn_default_stats=False)
        tokens = models["LN"].grid_size[0] * models["LN"].grid_size[1]
        for batch in SCALING_BATCHES:
            lat = measure_latency(models, batch, (1, side, side), repeats, calls_per_sample=2)
            rows.append({"input_size": [1, side, side], "tokens": tokens, "batch": batch,
                         "latency_ms": {"LN": lat["LN"], "PRepBN fused": lat["PRepBN"],
                                        "SLAB fused": lat["SLAB"]}})
    return rows


def _plots(output: str, runs: dict[str, dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for form, run in runs.items():
        per_epoch = TRAIN_SIZE // RECIPES[form]["batch_size"]
        epochs = [r["step"] / per_epoch for r in run["history"]]
        losses = [r["loss"] for r in run["history"]]
        window = max(1, min(50, len(losses) // 10))  # a running mean: per-step losses are noisy
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        axes[0].plot(epochs, smooth, label=form)
        axes[1].plot([e["step"] / per_epoch for e in run["evals"]], [e["top1"] for e in run["evals"]],
                     marker="o", label=form)
        if FORMS[form]["norm"] == "prepbn":  # LN has no lambda
            axes[2].plot(epochs, [r["lam"] for r in run["history"]], label=form)
    axes[0].set(title="training loss (running mean)", xlabel="epoch", ylabel="loss")
    axes[1].set(title="test top-1 (%)", xlabel="epoch")
    axes[2].set(title="PRepBN lambda (1 = LayerNorm, 0 = RepBN)", xlabel="epoch", ylim=(-0.05, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(output, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _machine(load_at_start: float) -> dict:
    """What the timings depend on, the load of the machine included (other jobs slow training down)."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min_start": load_at_start, "load_average_1min_end": os.getloadavg()[0]}


def run_demo(cfg: DemoConfig) -> dict:
    import slab
    from slab.data import build_dataset

    os.makedirs(cfg.output, exist_ok=True)
    load_at_start = os.getloadavg()[0]
    t0 = time.time()
    runs = train_forms(cfg)
    t_trained = time.time()
    models = {}
    for form, run in runs.items():
        m = slab.create_model(MODEL, num_classes=10, in_chans=1, **MODEL_KWARGS, **FORMS[form])
        m.load_state_dict(run["state_dict"])
        models[form] = m.eval()

    train_eval = build_dataset("fashion-mnist", "train", is_training=False)
    test_loader = DataLoader(build_dataset("fashion-mnist", "val", is_training=False), batch_size=500)
    print(f"\n== BN recalibration ({cfg.recalibrate_batches} training batches), fusion, fused == unfused on the "
          f"test set")
    fused, checks = {}, {}
    for form in ("PRepBN", "SLAB"):
        recal_loader = DataLoader(train_eval, batch_size=128, shuffle=True,
                                  generator=torch.Generator().manual_seed(cfg.seed))
        fused[form], checks[form] = recalibrate_fuse_check(models[form], recal_loader, test_loader,
                                                           cfg.recalibrate_batches)
    from slab.train import evaluate
    ln_top1 = evaluate(models["LN"], test_loader)["top1"]
    t_checked = time.time()

    timed = {"LN": models["LN"], "PRepBN unfused": models["PRepBN"], "PRepBN fused": fused["PRepBN"],
             "SLAB unfused": models["SLAB"], "SLAB fused": fused["SLAB"],
             "norm-free bound": slab.create_model(MODEL, **MODEL_KWARGS, **dict(FORMS["SLAB"], norm="none")).eval()}
    print(f"== latency (median of {cfg.latency_repeats} interleaved rounds, {torch.get_num_threads()} threads)")
    lat1 = measure_latency(timed, 1, (1, 28, 28), cfg.latency_repeats)
    lat64 = measure_latency(timed, 64, (1, 28, 28), cfg.latency_repeats)
    print(f"== latency at larger inputs {cfg.scaling_sizes} (random weights)")
    scaling = token_scaling(cfg.scaling_repeats, tuple(cfg.scaling_sizes))
    t_end = time.time()

    top1 = {"LN": ln_top1, "norm-free bound": None}
    for form in ("PRepBN", "SLAB"):
        top1[f"{form} unfused"] = checks[form]["top1_reference"]
        top1[f"{form} fused"] = checks[form]["top1_candidate"]
    rows = [{"model": name, "params": _params(m), "top1": top1[name], "latency_ms_b1": lat1[name],
             "latency_ms_b64": lat64[name]} for name, m in timed.items()]
    report = {
        "model": MODEL, "model_kwargs": MODEL_KWARGS, "input_size": [1, 28, 28], "forms": FORMS,
        "recipes": {form: recipe_as_run(form, cfg) for form in FORMS},
        "rows": rows, "fusion_checks": checks, "token_scaling": scaling,
        "top1_per_epoch": {form: [round(e["top1"], 2) for e in run["evals"]] for form, run in runs.items()},
        "timings": {"train_s": {form: run["elapsed_s"] for form, run in runs.items()},
                    "train_cpu_s": {form: run["cpu_s"] for form, run in runs.items()},
                    "train_wall_s": t_trained - t0, "recalibrate_fuse_check_s": t_checked - t_trained,
                    "latency_s": t_end - t_checked, "total_s": t_end - t0},
        "machine": _machine(load_at_start), "config": asdict(cfg),
    }
    report["plots"] = _plots(cfg.output, runs)
    with open(os.path.join(cfg.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print_report(report)
    return report


def recipe_as_run(form: str, cfg: DemoConfig) -> dict:
    """The recipe ``form`` was trained with, as run (epochs or max_steps overridden by ``cfg``)."""
    tc = train_config(form, cfg)
    keys = ("epochs", "max_steps", "batch_size", "lr", "lr_warmup", "min_lr", "weight_decay", "label_smoothing",
            "augment", "prepbn_transition", "seed")
    return {k: getattr(tc, k) for k in keys if k != "prepbn_transition" or FORMS[form]["norm"] == "prepbn"}


def where_each_form_wins(report: dict) -> list[str]:
    """Plain sentences: accuracy against LN, the fused models against LN, SLA against softmax by token count."""
    row = {r["model"]: r for r in report["rows"]}
    ln = row["LN"]
    lines = []
    for form in ("PRepBN", "SLAB"):
        f = row[f"{form} fused"]
        gap = f["top1"] - ln["top1"]
        verdict = "within 0.5 of LN or better" if gap >= -0.5 else "MORE than 0.5 below LN"
        lines.append(f"{form} fused vs LN: top-1 {gap:+.2f} points ({verdict}); "
                     f"latency x{f['latency_ms_b1'] / ln['latency_ms_b1']:.2f} at b=1, "
                     f"x{f['latency_ms_b64'] / ln['latency_ms_b64']:.2f} at b=64 "
                     f"({_faster_or_slower(f, ln)} than LN)")
    for form in ("PRepBN", "SLAB"):
        u, f = row[f"{form} unfused"], row[f"{form} fused"]
        lines.append(f"{form}: fusion removes the norm cost: fused / unfused latency "
                     f"x{f['latency_ms_b1'] / u['latency_ms_b1']:.2f} "
                     f"(b=1), x{f['latency_ms_b64'] / u['latency_ms_b64']:.2f} (b=64)")
    bound = row["norm-free bound"]
    slab_fused = row["SLAB fused"]
    lines.append(f"SLAB fused / norm-free bound: x{slab_fused['latency_ms_b1'] / bound['latency_ms_b1']:.3f} (b=1), "
                 f"x{slab_fused['latency_ms_b64'] / bound['latency_ms_b64']:.3f} (b=64)")
    for r in report["token_scaling"]:
        sla, soft = r["latency_ms"]["SLAB fused"], r["latency_ms"]["PRepBN fused"]
        lines.append(f"SLA vs softmax at {r['tokens']} tokens, b={r['batch']}: x{sla / soft:.2f} "
                     f"({'SLA faster' if sla < soft else 'softmax faster'})")
    return lines


def _faster_or_slower(a: dict, b: dict) -> str:
    faster = [a[k] < b[k] for k in ("latency_ms_b1", "latency_ms_b64")]
    return "faster" if all(faster) else "slower" if not any(faster) else "mixed: faster at " + (
        "b=1" if faster[0] else "b=64")


def print_report(report: dict) -> None:
    checks = report["fusion_checks"]
    print("\n" + "=" * 78)
    print(f"SLAB demo on Fashion-MNIST ({report['model']} {report['model_kwargs'] or ''}), "
          f"test set of {checks['SLAB']['n']} images, {report['machine']['threads']} threads")
    print("=" * 78)
    print(f"{'model':18s} {'params':>9s} {'test top-1':>11s} {'latency b=1':>12s} {'latency b=64':>13s}")
    for r in report["rows"]:
        top1 = f"{r['top1']:.2f}%" if r["top1"] is not None else "-"
        print(f"{r['model']:18s} {r['params']:>9,d} {top1:>11s} {r['latency_ms_b1']:>9.3f} ms "
              f"{r['latency_ms_b64']:>10.3f} ms")
    print("-" * 78)
    for form, c in checks.items():
        print(f"{form} fused vs unfused on {c['n']} test images: max |logit diff| {c['max_abs_logit_diff']:.2e} "
              f"(logits up to {c['max_abs_logit']:.1f}), identical predictions: {c['identical_predictions']} "
              f"(top-1 before BN recalibration {c['top1_before_recalibration']:.2f}%)")
    print("-" * 78)
    print(f"latency at larger inputs (random weights, ms): {'tokens':>6s} {'batch':>5s} {'LN':>9s} "
          f"{'PRepBN fused':>13s} {'SLAB fused':>11s}")
    for r in report["token_scaling"]:
        lat = r["latency_ms"]
        print(f"{'':47s}{r['tokens']:>6d} {r['batch']:>5d} {lat['LN']:>9.2f} {lat['PRepBN fused']:>13.2f} "
              f"{lat['SLAB fused']:>11.2f}")
    print("-" * 78)
    print("where each form wins:")
    for line in where_each_form_wins(report):
        print("  " + line)
    print("top-1 per epoch: " + "; ".join(f"{k} {v}" for k, v in report["top1_per_epoch"].items()))
    out = os.path.dirname(report["plots"][0])
    print(f"report: {out}/report.json, plots: {', '.join(report['plots'])}")
    t = report["timings"]
    m = report["machine"]
    print(f"total time {t['total_s']:.0f} s (training {t['train_wall_s']:.0f} s; CPU s per form: "
          + ", ".join(f"{k} {v:.0f}" for k, v in t["train_cpu_s"].items())
          + f"; 1-min load average {m['load_average_1min_start']:.1f} -> {m['load_average_1min_end']:.1f} "
            f"on {m['cores']} cores)")
