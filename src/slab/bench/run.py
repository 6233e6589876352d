"""The ``slab bench`` suite: what runs in ``--quick`` and full mode, the JSON, the plot and the tables."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .machine import machine_info

__all__ = ["BenchConfig", "QUICK", "FULL", "run_bench", "render_markdown"]

SECTIONS = ("sla", "attention", "modules", "norms", "training", "models", "sla_gpu", "prepbn_gpu", "models_gpu")


@dataclass
class BenchConfig:
    """What to measure. ``QUICK`` finishes in a couple of minutes on 2 CPU cores; ``FULL`` takes ~30."""

    sections: tuple[str, ...] = SECTIONS
    families: dict[str, str] = field(default_factory=dict)      # family -> model name
    model_kwargs: dict = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = (1, 64)
    backends: tuple[str, ...] = ("eager", "compile", "onnxruntime")
    compile_batch_sizes: tuple[int, ...] | None = None           # None: all of batch_sizes
    model_repeats: int = 10
    model_max_time: float = 60.0
    sla_shape: tuple[int, int, int, int] = (8, 3, 3136, 32)      # batch, heads, tokens, head_dim
    sla_repeats: int = 20
    tokens: tuple[int, ...] = (196, 784, 3136, 12544)
    gpu_tokens: tuple[int, ...] = (196, 784, 3136, 12544)       # sla_gpu: skipped without a CUDA GPU
    gpu_models: tuple[str, ...] = ()                             # models_gpu: () = models.GPU_MODELS
    gpu_batch: int = 64
    attention_batch: int = 1
    attention_repeats: int = 10
    module_tokens: int = 196                                      # modules: SLA vs SDPA module at DeiT widths
    module_compiled: bool = True
    module_repeats: int = 50
    norm_shape: tuple[int, int, int] = (64, 197, 384)            # SLAB-DeiT-S block input at batch 64
    norm_repeats: int = 20
    training_model: str = "slab_deit_small_patch16_224"
    training_batch: int = 16
    training_kwargs: dict = field(default_factory=dict)
    training_repeats: int = 5
    notes: list[str] = field(default_factory=list)


def _quick() -> BenchConfig:
    return BenchConfig(
        families={"deit (Fashion-MNIST nano)": "slab_deit_nano_patch4_28"}, batch_sizes=(1, 64),
        backends=("eager", "onnxruntime"), model_repeats=10, model_max_time=10.0, sla_repeats=6,
        tokens=(196, 784, 3136), attention_repeats=5, module_compiled=False, module_repeats=20, norm_shape=(16, 197, 192), norm_repeats=8,
        training_model="slab_deit_nano_patch4_28", training_batch=64, training_repeats=3,
        notes=["--quick: the 28x28 Fashion-MNIST SLAB-DeiT stands in for the families; no torch.compile; "
               "token counts up to 3136; a DeiT-T-sized norm input at batch 16; few repeats."])


def _full() -> BenchConfig:
    from .models import FAMILY_MODELS
    return BenchConfig(
        families=dict(FAMILY_MODELS), batch_sizes=(1, 16), compile_batch_sizes=(1,), model_repeats=6,
        model_max_time=60.0, training_batch=16,
        notes=["Throughput is measured at batch 16, not 64, and torch.compile at batch 1 only: on 2 shared CPU "
               "cores a batch-64 forward of Swin-T/CSwin-T takes seconds and compiling every form at every batch "
               "size takes most of an hour. The SLAB-DeiT-S training step runs at batch 16."])


QUICK = _quick
FULL = _full


def run_bench(cfg: BenchConfig, output: str | os.PathLike, log=print) -> dict:
    """Run the sections of ``cfg``; writes ``bench.json``, ``attention_latency.png`` and ``bench.md`` to ``output``."""
    from . import attention, models, norms
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine_info(), "config": asdict(cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - t0
        tmp = out_dir / "bench.json.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out_dir / "bench.json")

    if "sla" in cfg.sections:
        b, h, n, d = cfg.sla_shape
        log(f"== SLA op vs einsum: B={b}, heads={h}, N={n}, head_dim={d}")
        result["sla_op"] = attention.sla_op_speed(b, h, n, d, repeats=cfg.sla_repeats)
        r = result["sla_op"]
        log(f"   forward {r['speedup_forward']:.2f}x, forward+backward {r['speedup_forward_backward']:.2f}x faster; "
            f"{r['fast_forward_vs_bound']:.1f}x the copy-bandwidth bound")
        save()
    if "attention" in cfg.sections:
        log(f"== attention by token count {cfg.tokens}")
        result["attention"] = attention.attention_by_tokens(cfg.tokens, batch=cfg.attention_batch,
                                                            repeats=cfg.attention_repeats)
        result["attention_plot"] = attention.plot_attention_by_tokens(result["attention"],
                                                                      str(out_dir / "attention_latency.png"))
        for row in result["attention"]["rows"]:
            log(f"   N={row['tokens']:6d}: softmax / SLA = {row['softmax_over_sla']:.2f}")
        save()
    if "modules" in cfg.sections:
        log(f"== attention modules at N = {cfg.module_tokens}: SLA vs softmax (SDPA), DWC share"
            + (", compiled" if cfg.module_compiled else ""))
        result["modules"] = attention.attention_modules(cfg.module_tokens, repeats=cfg.module_repeats,
                                                        compiled=cfg.module_compiled)
        for row in result["modules"]["rows"]:
            log(f"   dim {row['dim']} batch {row['batch']}: SLA / softmax = {row['sla_over_softmax']:.2f} "
                f"(DWC {100 * row['dwc_share']:.0f} % of SLA)"
                + (f", compiled {row['compiled_sla_over_softmax']:.2f}" if "compiled_sla_over_softmax" in row else ""))
        save()
    if "sla_gpu" in cfg.sections:
        log(f"== SLA torch vs Triton vs SDPA on the GPU, N = {cfg.gpu_tokens}")
        result["sla_gpu"] = attention.sla_gpu_by_tokens(cfg.gpu_tokens)
        if "skipped" in result["sla_gpu"]:
            log(f"   skipped: {result['sla_gpu']['skipped']}")
        save()
    if "prepbn_gpu" in cfg.sections:
        log("== PRepBN op torch vs Triton vs LayerNorm on the GPU")
        result["prepbn_gpu"] = norms.prepbn_gpu_cost()
        if "skipped" in result["prepbn_gpu"]:
            log(f"   skipped: {result['prepbn_gpu']['skipped']}")
        save()
    if "models_gpu" in cfg.sections:
        names = cfg.gpu_models or models.GPU_MODELS
        log(f"== {', '.join(names)} on the GPU: forms LN, PRepBN, fused, none at batch {cfg.gpu_batch}, float16")
        result["models_gpu"] = models.bench_models_on_device(names, batch=cfg.gpu_batch)
        if "skipped" in result["models_gpu"]:
            log(f"   skipped: {result['models_gpu']['skipped']}")
        for row in result["models_gpu"].get("rows", []):
            q = row["ratios"]["fused"]
            log(f"   {row['model']}: fused {row['ms']['fused']:.2f} ms, fused/LN {q['vs_LN']:.3f}")
        save()
    if "norms" in cfg.sections:
        log(f"== norm training cost on {cfg.norm_shape}")
        result["norms"] = norms.norm_training_cost(cfg.norm_shape, repeats=cfg.norm_repeats)
        log("   " + ", ".join(f"{k} {v:.2f}" for k, v in result["norms"]["ratios"].items()))
        save()
    if "training" in cfg.sections:
        log(f"== training step of {cfg.training_model} at batch {cfg.training_batch}")
        result["training"] = norms.model_training_cost(cfg.training_model, batch=cfg.training_batch,
                                                       repeats=cfg.training_repeats, **cfg.training_kwargs)
        log("   " + ", ".join(f"{k} {v:.3f}" for k, v in result["training"]["ratios"].items()))
        save()
    if "models" in cfg.sections:
        result["models"] = []
        for family, name in cfg.families.items():
            log(f"== {family}: {name} ({', '.join(cfg.backends)}; batch {cfg.batch_sizes})")
            backends = tuple(b for b in cfg.backends if b != "compile")
            r = models.bench_model(name, cfg.batch_sizes, backends, repeats=cfg.model_repeats,
                                   max_time=cfg.model_max_time, **cfg.model_kwargs)
            if "compile" in cfg.backends:
                rc = models.bench_model(name, cfg.compile_batch_sizes or cfg.batch_sizes, ("compile",),
                                        repeats=cfg.model_repeats, max_time=cfg.model_max_time, **cfg.model_kwargs)
                r["latency_ms"].update(rc["latency_ms"])
                r["notes"] += rc["notes"]
            r["family"] = family
            result["models"].append(r)
            for backend, by_batch in r["latency_ms"].items():
                for batch, v in by_batch.items():
                    q = v["ratios"]["fused"]
                    log(f"   {backend:12s} batch {batch:>3s}: fused/LN {q['vs_LN']:.3f}, fused/none {q['vs_none']:.3f}")
            save()
    save()
    (out_dir / "bench.md").write_text(render_markdown(result))
    log(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'} in {result['elapsed_s']:.0f} s")
    return result


# ---------------------------------------------------------------- markdown
def _f(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}"


def _sla_gpu_markdown(r: dict) -> list[str]:
    title = "### SLA torch vs Triton vs softmax (SDPA) on the GPU"
    if "skipped" in r:
        return [title, "", f"Skipped: {r['skipped']}.", ""]
    names = list(r["rows"][0]["forward_ms"])
    header = [f"{n} fwd" for n in names] + [f"{n} fwd+bwd" for n in names] + ["Triton rel. error"]
    lines = [f"{title} ({r['gpu']}; batch {r['batch']}, {r['heads']} heads x {r['head_dim']}, ms)", "",
             "| dtype | N | " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(header)]
    for row in r["rows"]:
        lines.append(f"| {row['dtype']} | {row['tokens']} | " + " | ".join(_f(row["forward_ms"][n], 3) for n in names)
                     + " | " + " | ".join(_f(row["forward_backward_ms"][n], 3) for n in names)
                     + f" | {row['triton_rel_error_vs_reference']:.1e} |")
    return lines + [""]


def _prepbn_gpu_markdown(r: dict) -> list[str]:
    title = "### PRepBN training op, torch vs Triton vs LayerNorm on the GPU"
    if "skipped" in r:
        return [title, "", f"Skipped: {r['skipped']}.", ""]
    names = list(dict.fromkeys(n for row in r["rows"] for n in row["forward_ms"]))
    header = [f"{n} fwd" for n in names] + [f"{n} fwd+bwd" for n in names] + ["Triton rel. error"]
    lines = [f"{title} ({r['gpu']}; ms)", "",
             "| dtype | tokens x C | " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(header)]
    notes = []
    for row in r["rows"]:
        cells = [_f(row[key][n], 3) if n in row[key] else "-" for key in ("forward_ms", "forward_backward_ms")
                 for n in names]
        lines.append(f"| {row['dtype']} | {row['tokens']} x {row['channels']} | " + " | ".join(cells)
                     + f" | {row['triton_rel_error_vs_reference']:.1e} |")
        notes += [f"{row['dtype']} {n}: not run ({why})" for n, why in row.get("not_run", {}).items()]
    return lines + [""] + ([f"* {n}" for n in dict.fromkeys(notes)] + [""] if notes else [])


def _models_gpu_markdown(r: dict) -> list[str]:
    title = "### Model latency on the GPU: forms LN, PRepBN (unfused), fused, none (norm-free bound)"
    if "skipped" in r:
        return [title, "", f"Skipped: {r['skipped']}.", ""]
    forms = list(r["rows"][0]["ms"])
    lines = [f"{title} ({r['device']}; batch {r['batch']}, {r['dtype']}, forward, ms)", "",
             "| model | " + " | ".join(forms) + " | fused / LN | fused / none | fused images/s |",
             "|---|" + "---:|" * (len(forms) + 3)]
    for row in r["rows"]:
        q = row["ratios"]["fused"]
        lines.append(f"| {row['model']} | " + " | ".join(_f(row["ms"][f]) for f in forms)
                     + f" | {_f(q['vs_LN'], 3)} | {_f(q['vs_none'], 3)} | {row['images_per_s']['fused']:.0f} |")
    return lines + [""]


def render_markdown(result: dict, plot_path: str | None = None) -> str:
    """The result tables as markdown (what docs/benchmarks.md holds)."""
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['torch_threads']} torch thread(s), "
             f"torch {m['torch']}, onnxruntime {m.get('onnxruntime')}, load average {m.get('loadavg_1m', 0):.1f} "
             f"at start; GPU: {m['gpu'] or 'none'}.", ""]
    for note in result["config"].get("notes", []):
        lines += [f"Note: {note}", ""]
    if "sla_op" in result:
        r = result["sla_op"]
        s = r["shape"]
        lines += [f"### SLA op vs the einsum formulation (B={s['batch']}, {s['heads']} heads, N={s['tokens']}, "
                  f"head_dim {s['head_dim']}, float32)", "",
                  "| | einsum (ms) | fast (ms) | speed-up |", "|---|---:|---:|---:|",
                  f"| forward | {_f(r['forward_ms']['einsum'])} | {_f(r['forward_ms']['fast'])} | "
                  f"{_f(r['speedup_forward'])}x |",
                  f"| forward + backward | {_f(r['forward_backward_ms']['einsum'])} | "
                  f"{_f(r['forward_backward_ms']['fast'])} | {_f(r['speedup_forward_backward'])}x |", "",
                  f"Copy bandwidth {_f(r['copy_bandwidth_GBps'], 1)} GB/s: reading q, k, v once and writing the "
                  f"output once takes {_f(r['bandwidth_bound_ms'])} ms; the fast forward is "
                  f"{_f(r['fast_forward_vs_bound'], 1)}x that bound.", ""]
    if "modules" in result:
        lines += _modules_markdown(result["modules"])
    if "attention" in result:
        a = result["attention"]
        names = [k for k in a["rows"][0] if k not in ("tokens", "softmax_over_sla")]
        lines += [f"### Attention core by token count (batch {a['batch']}, {a['heads']} heads x {a['head_dim']}, "
                  f"forward, ms)", "", "| N | " + " | ".join(names) + " | softmax / SLA |",
                  "|---:|" + "---:|" * (len(names) + 1)]
        for row in a["rows"]:
            lines.append(f"| {row['tokens']} | " + " | ".join(_f(row[n], 3) if n in row else "-" for n in names)
                         + f" | {_f(row['softmax_over_sla'])} |")
        if plot_path or result.get("attention_plot"):
            lines += ["", f"![latency against N]({plot_path or Path(result['attention_plot']).name})"]
        lines.append("")
    if "sla_gpu" in result:
        lines += _sla_gpu_markdown(result["sla_gpu"])
    if "prepbn_gpu" in result:
        lines += _prepbn_gpu_markdown(result["prepbn_gpu"])
    if "models_gpu" in result:
        lines += _models_gpu_markdown(result["models_gpu"])
    if "norms" in result:
        r = result["norms"]
        lines += [f"### Norm training cost, forward + backward on {tuple(r['shape'])} (ms)", "",
                  "| norm | forward | forward + backward |", "|---|---:|---:|"]
        for k in r["forward_backward_ms"]:
            lines.append(f"| {k} | {_f(r['forward_ms'][k])} | {_f(r['forward_backward_ms'][k])} |")
        q = r["ratios"]
        lines += ["", f"PRepBN transition / LayerNorm: **{_f(q['transition_vs_ln'])}x**; PRepBN after the "
                      f"transition / BN: **{_f(q['after_vs_bn'])}x**; RepBN / BN: {_f(q['repbn_vs_bn'])}x.", ""]
    if "training" in result:
        r = result["training"]
        lines += [f"### Training step of {r['model']} (batch {r['batch']}, forward + backward + SGD, ms)", "",
                  "| form | step |", "|---|---:|"]
        lines += [f"| {k} | {_f(v, 1)} |" for k, v in r["step_ms"].items()]
        q = r["ratios"]
        lines += ["", f"PRepBN transition / LN step: **{_f(q['transition_vs_ln'], 3)}x**; PRepBN after / BN step: "
                      f"**{_f(q['after_vs_bn'], 3)}x**; after / LN: {_f(q['after_vs_ln'], 3)}x.", ""]
    if result.get("models"):
        lines += ["### Models: forms LN, PRepBN (unfused), fused, none (norm-free bound)", "",
                  "| family | model | form | params (M) | GFLOPs |", "|---|---|---|---:|---:|"]
        for r in result["models"]:
            for f in r["params"]:
                lines.append(f"| {r['family']} | {r['model']} | {f} | {r['params'][f] / 1e6:.2f} | "
                             f"{_f(r['gflops'][f])} |")
        lines += ["", "Latency (ms) and ratios of each form to LN and to the norm-free bound, per backend and batch:",
                  "", "| model | backend | batch | LN | PRepBN | fused | none | fused / LN | fused / none | "
                      "PRepBN / none |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["models"]:
            for backend, by_batch in r["latency_ms"].items():
                for batch, v in by_batch.items():
                    ms, q = v["ms"], v["ratios"]
                    lines.append(f"| {r['model']} | {backend} | {batch} | " + " | ".join(_f(ms[f], 2) for f in
                                 ("LN", "PRepBN", "fused", "none")) + f" | {_f(q['fused']['vs_LN'], 3)} | "
                                 f"{_f(q['fused']['vs_none'], 3)} | {_f(q['PRepBN']['vs_none'], 3)} |")
        notes = [n for r in result["models"] for n in r.get("notes", [])]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
    lines.append(f"Total benchmark time: {result.get('elapsed_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def _modules_markdown(r: dict) -> list[str]:
    names = [k for k in r["rows"][0] if k not in ("dim", "heads", "batch") and not k.endswith(("_softmax", "_share"))]
    lines = [f"### Attention modules at N = {r['tokens']} (qkv + attention + proj, forward, ms, {r['threads']} "
             f"thread(s), DWC {r['kernel_size']}x{r['kernel_size']})", "",
             "| dim / heads | batch | " + " | ".join(names) + " | SLA / softmax | DWC share of SLA |"
             + (" compiled SLA / compiled softmax |" if "compiled_sla_over_softmax" in r["rows"][0] else ""),
             "|---|---:|" + "---:|" * (len(names) + 2 + ("compiled_sla_over_softmax" in r["rows"][0]))]
    for row in r["rows"]:
        line = (f"| {row['dim']} / {row['heads']} | {row['batch']} | " + " | ".join(_f(row[n], 3) for n in names)
                + f" | {_f(row['sla_over_softmax'])} | {100 * row['dwc_share']:.0f} % |")
        if "compiled_sla_over_softmax" in row:
            line += f" {_f(row['compiled_sla_over_softmax'])} |"
        lines.append(line)
    return lines + [""]

