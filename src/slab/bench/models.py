"""Per family and form: parameters, GFLOPs, latency and throughput in eager, torch.compile and ONNX Runtime.

Forms of one architecture (same attention, same widths):

* ``LN``: every norm a LayerNorm (the baseline);
* ``PRepBN``: the PRepBN model in eval mode, unfused (RepBN computed at inference);
* ``fused``: ``slab.fuse`` of the PRepBN model (what is deployed);
* ``none``: no normalization at all (``norm='none'``): the lower bound a fused model should reach.

All forms of a model are timed side by side (interleaved), so the ratios to ``LN`` and to ``none``
are meaningful even on a loaded machine.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..models import create_model
from ..reparam.fuse import fuse
from .latency import count_gflops, count_params
from .timing import compare

__all__ = ["FAMILY_MODELS", "FORMS", "GPU_MODELS", "build_forms", "bench_model", "bench_models_on_device"]

#: family -> the SLAB model of the paper benchmarked for it.
FAMILY_MODELS = {
    "deit": "slab_deit_tiny_patch16_224",
    "pvt": "slab_pvt_tiny",
    "pvt_v2": "slab_pvt_v2_b0",
    "swin": "slab_swin_tiny_patch4_224",
    "cswin": "slab_cswin_tiny_224",
}
FORMS = ("LN", "PRepBN", "fused", "none")
#: The models of the paper's GPU latency comparison (SLAB-Swin-S 16.2 ms at batch 64), and the smallest one.
GPU_MODELS = ("slab_swin_small_patch4_224", "slab_deit_tiny_patch16_224")


def build_norm_form(name: str, norm: str, **kwargs) -> nn.Module:
    """``create_model(name, norm=norm)``; SLAB-DeiT entry points that pin ``norm`` are rebuilt from the DeiT one."""
    try:
        return create_model(name, norm=norm, **kwargs)
    except TypeError:
        if not name.startswith("slab_deit_"):
            raise
        # The registered SLAB-DeiT functions fix norm='prepbn'; the same architecture from the DeiT entry point.
        base = name.replace("slab_deit_", "deit_").replace("_patch", "_prepbn_patch")
        return create_model(base, norm=norm, attn="sla", class_token=False, global_pool="avg",
                            authors_unused_class_token=True, **kwargs)


def build_forms(name: str, **kwargs) -> dict[str, nn.Module]:
    """The four forms of ``name`` (eval mode); BN statistics are made non-trivial before fusing."""
    torch.manual_seed(0)
    prepbn = create_model(name, **kwargs).eval()
    with torch.no_grad():
        for m in prepbn.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fuse(prepbn)
    return {"LN": build_norm_form(name, "ln", **kwargs).eval(), "PRepBN": prepbn, "fused": fused,
            "none": build_norm_form(name, "none", **kwargs).eval()}


def _ratios(times: dict[str, float]) -> dict[str, dict[str, float]]:
    return {form: {"vs_LN": t / times["LN"], "vs_none": t / times["none"]} for form, t in times.items()}


def bench_model(name: str, batch_sizes: tuple[int, ...] = (1, 64), backends: tuple[str, ...] = ("eager", "compile", "onnxruntime"),
                repeats: int = 10, max_time: float = 60.0, img_size: int | None = None, **kwargs) -> dict:
    """Benchmark the four forms of ``name``; returns a JSON-able dict (times in ms, throughput in img/s)."""
    from ..reparam.export import OnnxRuntimeModel, export_onnx
    forms = build_forms(name, **({"img_size": img_size} if img_size else {}), **kwargs)
    c, h, w = forms["PRepBN"].pretrained_cfg["input_size"]
    if img_size:
        h = w = img_size
    x1 = torch.randn(1, c, h, w)
    out: dict = {"model": name, "input": [c, h, w], "batch_sizes": list(batch_sizes),
                 "params": {f: count_params(m) for f, m in forms.items()},
                 "gflops": {f: count_gflops(m, x1) for f, m in forms.items()}, "latency_ms": {}, "notes": []}

    def record(backend: str, batch: int, fns: dict) -> None:
        with torch.no_grad():
            t = compare(fns, repeats=repeats, warmup=2, max_time=max_time)
        ms = {f: v.robust * 1e3 for f, v in t.items()}
        out["latency_ms"].setdefault(backend, {})[str(batch)] = {
            "ms": ms, "images_per_s": {f: batch / (v / 1e3) for f, v in ms.items()}, "ratios": _ratios(ms)}

    inputs = {b: torch.randn(b, c, h, w) for b in batch_sizes}
    if "eager" in backends:
        for b, x in inputs.items():
            record("eager", b, {f: (lambda m=m, x=x: m(x)) for f, m in forms.items()})
    if "compile" in backends:
        # Four compiled copies of one architecture share their code objects, and families whose stages run
        # at different shapes recompile per stage: dynamo's default limit (8) would fall back to eager.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 64)
        for b, x in inputs.items():
            compiled = {}
            for f, m in forms.items():
                try:
                    cm = torch.compile(m, dynamic=False)
                    with torch.no_grad():
                        cm(x)  # compile outside the timing
                    compiled[f] = cm
                except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
                    out["notes"].append(f"torch.compile failed for {f} at batch {b}: {type(e).__name__}: {e}"[:300])
            if len(compiled) == len(forms):
                record("compile", b, {f: (lambda m=m, x=x: m(x)) for f, m in compiled.items()})
            torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = limit
    if "onnxruntime" in backends:
        sessions = {}
        with tempfile.TemporaryDirectory() as tmp:
            for f, m in forms.items():
                path = Path(tmp) / f"{f}.onnx"
                deploy = f in ("fused", "none")
                try:
                    export_onnx(m, path, input_size=(2, c, h, w), dynamic_batch=True, fuse=False,
                                require_norm_free=deploy)
                    sessions[f] = OnnxRuntimeModel(path, threads=torch.get_num_threads())
                except Exception as e:  # noqa: BLE001
                    out["notes"].append(f"ONNX export failed for {f}: {type(e).__name__}: {e}"[:300])
            if len(sessions) == len(forms):
                for b, x in inputs.items():
                    xn = np.ascontiguousarray(x.numpy())
                    record("onnxruntime", b, {f: (lambda s=s, xn=xn: s.run(xn)) for f, s in sessions.items()})
    return out


def bench_models_on_device(names: tuple[str, ...] = GPU_MODELS, batch: int = 64, dtype: str = "float16",
                           device: str = "cuda", repeats: int = 30, max_time: float | None = 60.0) -> dict:
    """Forward latency (ms) and throughput of the four forms of each model on ``device`` in ``dtype``, the
    paper's GPU setting by default (batch 64, float16), synchronised after every call and interleaved.

    The forms are built and fused in float32, then cast. Returns ``{"skipped": why}`` for a CUDA ``device``
    when no GPU is visible; any other device runs (the tests use the CPU).
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU visible: run `slab bench --sections models_gpu` on a machine with one"}
    dt = getattr(torch, dtype)
    rows = []
    for name in names:
        forms = {f: m.to(device=device, dtype=dt) for f, m in build_forms(name).items()}
        c, h, w = forms["PRepBN"].pretrained_cfg["input_size"]
        x = torch.randn(batch, c, h, w, device=device, dtype=dt)
        with torch.no_grad():
            t = compare({f: (lambda m=m: m(x)) for f, m in forms.items()}, repeats=repeats, warmup=3,
                        max_time=max_time, device=device)
        ms = {f: v.robust * 1e3 for f, v in t.items()}
        rows.append({"model": name, "ms": ms, "images_per_s": {f: batch / (v / 1e3) for f, v in ms.items()},
                     "ratios": _ratios(ms)})
        del forms, x
    where = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else device
    return {"device": where, "dtype": dtype, "batch": batch, "unit": "ms", "rows": rows}
