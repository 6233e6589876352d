"""Table of every registered slab model: form, parameters, GFLOPs, paper top-1, released checkpoint.

Builds each model of ``slab.list_models()`` at its default input size (``pretrained_cfg['input_size']``,
224x224 for all ImageNet models), counts parameters, runs one forward at batch 1 in eval mode under
``torch.no_grad()`` inside ``torch.utils.flop_counter.FlopCounterMode`` and reports multiply-accumulates
(GMACs, = FlopCounterMode's count / 2: the "FLOPs" convention of the DeiT/PVT/Swin/CSwin/SLAB papers).
FlopCounterMode counts matmuls, convolutions and attention kernels only: norms, activations, softmax and
other elementwise ops are not counted. Softmax attention is run with the math SDPA backend while counting:
FlopCounterMode counts 0 for PyTorch's fused CPU attention kernel.

The form is read off the built model, not its name: any linear-attention module (SLA) makes it ``SLAB``;
otherwise the block norms decide (``PRepBN`` > ``RepBN`` > ``BN`` > ``LN`` > ``none``).

Usage::

    .venv/bin/python benchmarks/model_table.py                      # print the table
    .venv/bin/python benchmarks/model_table.py --write-docs         # also rewrite docs/models.md
    .venv/bin/python benchmarks/model_table.py --json table.json 'slab_*'
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "models.md")
RELEASED = os.path.join(ROOT, "tests", "fixtures", "official", "released_checkpoints.json")

FORM_HELP = {
    "LN": "LayerNorm in every block (the baseline; any model built with `norm='ln'`).",
    "RepBN": "plain re-parameterised BatchNorm `BN(x) + alpha * x` in every block: the layout the authors' "
             "`deit_tiny_prepbn.pth` and `swin_tiny_prepbn.pth` actually store.",
    "PRepBN": "progressive RepBN: LayerNorm at the start of training, blended into RepBN by "
              "`slab.PRepBNSchedule`; RepBN in eval. Softmax attention.",
    "SLAB": "simplified linear attention (ReLU kernel + depthwise conv on V) in some or all blocks, with PRepBN "
            "norms. Hybrids (Swin, CSwin) keep softmax attention in the last stages; the cell says how many "
            "attention blocks are SLA.",
}


def family_of(model: nn.Module) -> str:
    return type(model).__module__.rsplit(".", 1)[-1]


def _attention_kind(m: nn.Module) -> str | None:
    """'L' for a linear-attention module, 'S' for a softmax one, None for anything else."""
    name = type(m).__name__
    if "LinearAttention" in name:
        return "L"
    if name.endswith("Attention"):
        return "S"
    return None


def attention_layout(model: nn.Module) -> Counter:
    """Count blocks by attention kind: a block is a module with an attention child (or one in a ModuleList child)."""
    blocks: Counter = Counter()
    for m in model.modules():
        if _attention_kind(m) is not None or isinstance(m, nn.ModuleList):
            continue
        kinds = set()
        for child in m.children():
            grand = child.children() if isinstance(child, nn.ModuleList) else [child]
            kinds |= {k for g in grand if (k := _attention_kind(g)) is not None}
        for k in kinds:
            blocks[k] += 1
    return blocks


def norm_kind(model: nn.Module) -> str:
    from slab.layers.norm import PRepBN, RepBN, TokenBatchNorm
    mods = list(model.modules())
    if any(isinstance(m, PRepBN) for m in mods):
        return "PRepBN"
    if any(isinstance(m, RepBN) for m in mods):
        return "RepBN"
    if any(isinstance(m, TokenBatchNorm) for m in mods):
        return "BN"
    if any(isinstance(m, nn.LayerNorm) for m in mods):
        return "LN"
    return "none"


def form_of(model: nn.Module) -> tuple[str, str, str]:
    """(form, norm, attention description) read off a built model."""
    norm = norm_kind(model)
    layout = attention_layout(model)
    n_sla, n_all = layout["L"], layout["L"] + layout["S"]
    attn = "softmax" if n_sla == 0 else ("SLA" if n_sla == n_all else f"SLA in {n_sla}/{n_all} blocks")
    if n_sla:
        form = "SLAB" if norm == "PRepBN" else f"SLA+{norm}"
        if n_sla != n_all:
            form += f" ({attn})"
    else:
        form = norm
    return form, norm, attn


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, *input_size)
    counter = FlopCounterMode(display=False)
    # FlopCounterMode has no formula for the fused CPU SDPA kernel (it counts 0): force the math backend,
    # whose two batched matmuls are counted.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return counter.get_total_flops() // 2


def released_by_model() -> dict[str, list[str]]:
    import slab
    out: dict[str, list[str]] = {}
    for file, name in slab.AUTHORS_CHECKPOINTS.items():
        out.setdefault(name, []).append(file)
    return out


def authors_params() -> dict[str, int]:
    """Released file -> the authors' parameter count (recorded in the fixtures), when the fixtures are present."""
    if not os.path.isfile(RELEASED):
        return {}
    with open(RELEASED) as f:
        return {file: rec["params"] for file, rec in json.load(f).items() if "params" in rec}


def paper_top1() -> dict[str, float]:
    from slab import models
    out: dict[str, float] = {}
    for fam in models._FAMILIES:
        out.update(getattr(fam, "PAPER_TOP1", {}))
    return out


def collect(pattern: str = "*", verbose: bool = True) -> list[dict]:
    import slab
    released = released_by_model()
    top1 = paper_top1()
    theirs = authors_params()
    rows = []
    for name in slab.list_models(pattern):
        t0 = time.perf_counter()
        model = slab.create_model(name).eval()
        cfg = model.pretrained_cfg or {}
        input_size = tuple(cfg.get("input_size") or (3, 224, 224))
        form, norm, attn = form_of(model)
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, input_size)
        files = released.get(name, [])
        cfg_file = cfg.get("file")
        rows.append(dict(model=name, family=family_of(model), form=form, norm=norm, attention=attn,
                         params=params, params_m=round(params / 1e6, 2), input_size=list(input_size),
                         gmacs=round(macs / 1e9, 3), gflops_2x_macs=round(2 * macs / 1e9, 3),
                         paper_top1=top1.get(name), released_checkpoints=files, pretrained_cfg_file=cfg_file,
                         authors_params={f: theirs[f] for f in files if f in theirs}))
        for f, n in rows[-1]["authors_params"].items():
            if n != params:
                print(f"WARNING: {name} has {params} parameters, the authors' {f} has {n}", file=sys.stderr)
        if files and cfg_file not in files:
            print(f"WARNING: {name} loads {files} but its pretrained_cfg file is {cfg_file!r}", file=sys.stderr)
        del model
        if verbose:
            print(f"  {name:40s} {params / 1e6:7.2f}M {macs / 1e9:7.2f} GMACs  ({time.perf_counter() - t0:.1f}s)",
                  file=sys.stderr, flush=True)
    return rows


def _gflops_cell(r: dict) -> str:
    cell = f"{r['gmacs']:.2f}" if r["gmacs"] >= 0.1 else f"{r['gmacs']:.3f}"
    if tuple(r["input_size"][1:]) != (224, 224):
        cell += f" (@{r['input_size'][1]}x{r['input_size'][2]}, {r['input_size'][0]} ch)"
    return cell


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | family | form | params (M) | GFLOPs @224 | paper top-1 | released checkpoint it loads |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        top1 = f"{r['paper_top1']:.1f}" if r["paper_top1"] is not None else "–"
        files = ", ".join(f"`{f}`" for f in r["released_checkpoints"]) or "–"
        lines.append(f"| `{r['model']}` | {r['family']} | {r['form']} | {r['params_m']:.2f} | {_gflops_cell(r)} | "
                     f"{top1} | {files} |")
    return "\n".join(lines)


def markdown_doc(rows: list[dict]) -> str:
    forms = "\n".join(f"* **{k}**: {v}" for k, v in FORM_HELP.items())
    checked = [(r["params"], n) for r in rows for n in r["authors_params"].values()]
    same = sum(a == b for a, b in checked)
    params_note = (f"\nFor the {len(checked)} models that load a released file, the count equals the authors' model\n"
                   f"exactly in {same} of {len(checked)} cases (their counts are recorded in\n"
                   "`tests/fixtures/official/released_checkpoints.json`).") if checked else ""
    return f"""# Registered models

Every model of `slab.list_models()` ({len(rows)} names), regenerated by
`.venv/bin/python benchmarks/model_table.py --write-docs`. Each name is also a timm model
(`timm.create_model(name)` works once `slab` is imported).

Forms (read off the built model: any linear-attention module makes it SLAB, otherwise the block norm
decides):

{forms}

Every model takes `norm=` (`'ln'`, `'bn'`, `'repbn'`, `'prepbn'`, `'none'`) and `attn=`/`attn_type=`
overrides, so e.g. `slab.create_model("slab_deit_tiny_patch16_224", norm="ln")` is the LN + SLA baseline.

## Loading the authors' checkpoints

The authors released 12 files (https://github.com/xinghaochen/SLAB/releases/tag/ckpts); the last
column names the file each model loads. Nothing is downloaded: fetch the file, then

```python
import slab
model = slab.create_model("slab_deit_tiny_patch16_224", pretrained_file="slab_deit_tiny.pth").eval()
deployed = slab.fuse(model)   # norm-free: norms folded into neighbouring Linear/Conv layers
```

The file is loaded strictly through the family's `checkpoint_filter_fn` (norm renames, resized position
encodings); a file that belongs to another model fails with a message naming the model it looks like.
A checkpoint of a fused model (e.g. `torch.save(slab.fuse(model).state_dict(), PATH)`) loads into the fused
architecture: `slab.create_model(name, pretrained_file=PATH, deploy=True)`.

Note that `deit_tiny_prepbn.pth` and `swin_tiny_prepbn.pth` store plain RepBN norms (no LayerNorm branch),
so they load into `deit_tiny_repbn_patch16_224` and `swin_tiny_repbn_patch4_window7_224`; for these two the
paper's top-1 is listed under both the PRepBN and the RepBN name.

## Table

{markdown_table(rows)}

How the numbers were counted: parameters are `sum(p.numel() for p in model.parameters())` of the
training-form model (PRepBN keeps both its LayerNorm and its RepBN, so the deployed, fused model is a little
smaller; SLAB-DeiT keeps the authors' unused class token so the count matches theirs).{params_note}

GFLOPs are multiply-accumulates (1 MAC counted as 1 FLOP, the convention of the DeiT/PVT/Swin/CSwin/SLAB papers; double
them for "2 x multiply-adds"), measured with `torch.utils.flop_counter.FlopCounterMode` on one forward at
batch 1 at the model's default input size (224x224 unless the cell says otherwise) in eval mode under
`torch.no_grad()`, with the math backend of `scaled_dot_product_attention` forced (FlopCounterMode counts
nothing for PyTorch's fused CPU attention kernel, which would drop the softmax attention's two matmuls).
FlopCounterMode counts matrix multiplies, convolutions and attention kernels only:
norms, activations, softmax, the ReLU kernel of SLA and other elementwise ops are not counted. "–": the
paper gives no top-1 for that model, or no released file loads into it.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern over registered names")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite {os.path.relpath(DOCS, ROOT)} (all models only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no per-model progress on stderr")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.write_docs and args.pattern != "*":
        p.error("--write-docs needs every model (no pattern)")
    t0 = time.perf_counter()
    rows = collect(args.pattern, verbose=not args.quiet)
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.write_docs:
        with open(DOCS, "w") as f:
            f.write(markdown_doc(rows))
    print(f"{len(rows)} models in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
