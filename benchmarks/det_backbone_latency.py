"""Latency of detection backbones (body + FPN, what Mask R-CNN runs on every image): LN vs SLAB fused.

For each model name, three forms of the same architecture are built as :class:`slab.detection.SlabBackboneWithFPN`
(random weights, eval mode, batch 1, ``torch.inference_mode``):

* ``LN``: the model with ``norm='ln'`` (the LayerNorm baseline of the same attention);
* ``SLAB``: the model as registered (PRepBN norms), unfused (RepBN in eval);
* ``SLAB fused``: ``slab.fuse`` of it (every norm folded into its neighbours).

Timings are taken side by side: each repeat runs every form once, in a rotating order, after warm-up, so a
slow-down of a shared machine hits all forms alike; the table gives the median per form and the ratio
``LN / SLAB fused`` (> 1: the fused backbone is faster). Fused and unfused FPN outputs are checked to agree.

Usage::

    .venv/bin/python benchmarks/det_backbone_latency.py                          # DeiT / SLAB-DeiT, 512x512
    .venv/bin/python benchmarks/det_backbone_latency.py --size 800 1216 --repeats 20 --device cuda \\
        --json det_latency.json slab_deit_small_patch16_224 deit_small_prepbn_patch16_224
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

DEFAULT_MODELS = ["deit_tiny_prepbn_patch16_224", "slab_deit_tiny_patch16_224"]


# Registered SLAB-DeiT entry points fix norm='prepbn' and reject a norm= override (see the report of issue 9):
# their LayerNorm form is the DeiT entry point with SLAB-DeiT's layout.
_SLAB_DEIT_LAYOUT = dict(attn="sla", class_token=False, global_pool="avg", authors_unused_class_token=True)
_LN_FALLBACK = {"slab_deit_tiny_patch16_224": ("deit_tiny_prepbn_patch16_224", _SLAB_DEIT_LAYOUT),
                "slab_deit_small_patch16_224": ("deit_small_prepbn_patch16_224", _SLAB_DEIT_LAYOUT)}


def _ln_body(name: str, **kwargs):
    from slab.detection import build_body
    try:
        return build_body(name, norm="ln", **kwargs)
    except TypeError:
        if name not in _LN_FALLBACK:
            raise
        other, layout = _LN_FALLBACK[name]
        return build_body(other, norm="ln", **layout, **kwargs)


def build_forms(name: str, device: torch.device, **kwargs) -> dict[str, torch.nn.Module]:
    import slab
    from slab.detection import SlabBackboneWithFPN, build_body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ln = SlabBackboneWithFPN(_ln_body(name, **kwargs), prepbn="continue").eval()
        torch.manual_seed(0)
        prep = SlabBackboneWithFPN(build_body(name, **kwargs), prepbn="frozen")
        # Non-trivial statistics so that folding is exercised (random weights otherwise).
        g = torch.Generator().manual_seed(0)
        for m in prep.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1)
        prep.eval()
        fused = slab.fuse(prep)
    return {"LN": ln.to(device), "SLAB": prep.to(device), "SLAB fused": fused.to(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(forms: dict[str, torch.nn.Module], x: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    times = {k: [] for k in forms}
    names = list(forms)
    with torch.inference_mode():
        for _ in range(warmup):
            for m in forms.values():
                m(x)
        for r in range(repeats):
            for k in names[r % len(names):] + names[: r % len(names)]:
                _sync(x.device)
                t = time.perf_counter()
                forms[k](x)
                _sync(x.device)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def check_equal(forms: dict[str, torch.nn.Module], x: torch.Tensor) -> float:
    with torch.inference_mode():
        a, b = forms["SLAB"](x), forms["SLAB fused"](x)
    return max(((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)).item() for k in a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=DEFAULT_MODELS, help="registered model names")
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"), help="input size (512 512)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = torch.randn(1, 3, *args.size, device=device)
    rows = []
    for name in args.models:
        forms = build_forms(name, device)
        err = check_equal(forms, x)
        ms = measure(forms, x, args.warmup, args.repeats)
        row = {"model": name, "size": args.size, "device": str(device), "threads": torch.get_num_threads(),
               **{f"{k} ms": round(v, 2) for k, v in ms.items()},
               "LN / SLAB fused": round(ms["LN"] / ms["SLAB fused"], 3),
               "SLAB / SLAB fused": round(ms["SLAB"] / ms["SLAB fused"], 3), "fused rel. error": err}
        rows.append(row)
        print(f"{name}: LN {ms['LN']:.1f} ms, SLAB {ms['SLAB']:.1f} ms, SLAB fused {ms['SLAB fused']:.1f} ms; "
              f"LN / fused = {row['LN / SLAB fused']:.3f}x (fused vs unfused rel. error {err:.1e})", flush=True)
    print()
    print(f"| model | LN ms | SLAB ms | SLAB fused ms | LN / SLAB fused |  ({args.size[0]}x{args.size[1]}, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats})")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['LN ms']} | {r['SLAB ms']} | {r['SLAB fused ms']} | {r['LN / SLAB fused']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
