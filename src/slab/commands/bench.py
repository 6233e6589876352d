"""``slab bench``: speed of SLA, PRepBN and the deploy forms of every family, as JSON, a plot and tables.

    slab bench --quick                      # a couple of minutes
    slab bench --output outputs/bench       # the full suite (about half an hour on 2 CPU cores)

Sections: ``sla`` (the SLA op vs the einsum form, and the memory-bandwidth bound), ``attention``
(SLA vs softmax vs einsum by token count, with a PNG plot), ``norms`` (PRepBN/RepBN/BN/LN training cost
of the norm alone), ``training`` (a whole training step per norm form), ``models`` (per family and form:
params, GFLOPs, latency at batch 1 and throughput at a larger batch in eager, torch.compile and ONNX
Runtime, with ratios to the LayerNorm form and the norm-free bound), ``sla_gpu`` (on a CUDA GPU: the SLA
op's torch and Triton paths vs SDPA by token count in float16/bfloat16; skipped, with the reason, without
one). Candidates are always timed side
by side, interleaved, and reported as the 20th percentile of the repeats: compare ratios, not
absolute times, on a shared machine.
"""
from __future__ import annotations

import argparse


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark SLA, PRepBN and the deploy forms (JSON, plot, tables)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models, few repeats: a couple of minutes")
    p.add_argument("--output", default="outputs/bench", help="folder for bench.json, bench.md and the plot")
    p.add_argument("--sections", type=_csv, default=None,
                   help="comma-separated subset of sla,attention,norms,training,models,sla_gpu (default: all)")
    p.add_argument("--families", type=_csv, default=None,
                   help="comma-separated families (deit,pvt,pvt_v2,swin,cswin) or registered model names")
    p.add_argument("--backends", type=_csv, default=None, help="subset of eager,compile,onnxruntime")
    p.add_argument("--batch-sizes", type=lambda t: tuple(int(v) for v in _csv(t)), default=None,
                   help="batch sizes of the model section, e.g. 1,64")
    p.add_argument("--tokens", type=lambda t: tuple(int(v) for v in _csv(t)), default=None,
                   help="token counts of the attention section, e.g. 196,784,3136,12544")
    p.add_argument("--threads", type=int, default=None, help="torch/ONNX Runtime threads (default: torch's)")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the tables to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..bench.models import FAMILY_MODELS
    from ..bench.run import FULL, QUICK, SECTIONS, render_markdown, run_bench
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK() if args.quick else FULL()
    if args.sections is not None:
        unknown = set(args.sections) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
        cfg.sections = args.sections
    if args.families is not None:
        import slab
        names = set(slab.list_models())
        fams = {}
        for f in args.families:
            if f in FAMILY_MODELS:
                fams[f] = FAMILY_MODELS[f]
            elif f in names:
                fams[f] = f
            else:
                raise ValueError(f"unknown family or model {f!r}; families: {', '.join(FAMILY_MODELS)}")
        cfg.families = fams
    if args.backends is not None:
        bad = set(args.backends) - {"eager", "compile", "onnxruntime"}
        if bad:
            raise ValueError(f"unknown backends {sorted(bad)}; choose from eager, compile, onnxruntime")
        cfg.backends = args.backends
    if args.batch_sizes:
        cfg.batch_sizes = args.batch_sizes
    if args.tokens:
        cfg.tokens = args.tokens
    result = run_bench(cfg, args.output)
    if args.markdown:
        from pathlib import Path
        plot = result.get("attention_plot")
        Path(args.markdown).write_text(render_markdown(result, plot_path=plot))
    return 0
