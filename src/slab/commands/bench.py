"""``slab bench``: speed of SLA, PRepBN and the deploy forms of every family, as JSON, a plot and tables.

    slab bench --quick                      # a couple of minutes
    slab bench --output outputs/bench       # the full suite (about half an hour on 2 CPU cores)

Sections: ``sla`` (the SLA op vs the einsum form, and the memory-bandwidth bound), ``attention``
(SLA vs softmax vs einsum by token count, with a PNG plot), ``modules`` (whole SLA and SDPA attention
modules at 196 tokens and DeiT-T/S widths, eager and compiled, with the DWC's share), ``norms`` (PRepBN/RepBN/BN/LN training cost
of the norm alone), ``training`` (a whole training step per norm form), ``models`` (per family and form:
params, GFLOPs, latency at batch 1 and throughput at a larger batch in eager, torch.compile and ONNX
Runtime, with ratios to the LayerNorm form and the norm-free bound), ``sla_gpu`` (on a CUDA GPU: the SLA
op's torch and Triton paths vs SDPA by token count in float16/bfloat16), ``prepbn_gpu`` (on a CUDA GPU: the
PRepBN training op's torch and Triton paths vs LayerNorm), ``models_gpu`` (on a CUDA GPU: SLAB-Swin-S and
SLAB-DeiT-T forms LN, PRepBN, fused, none at batch 64 in float16, the paper's latency setting); the GPU
sections are skipped, with the reason, without one. Candidates are always timed side
by side, interleaved, and reported as the 20th percentile of the repeats: compare ratios, not
absolute times, on a shared machine.
"""
from __future__ import annotations

import argparse

from ..bench.run import SECTIONS
from ..errors import UserError, check_choices, check_output_dir, check_output_file, did_you_mean, positive_int_arg


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _positive_ints(text: str) -> tuple[int, ...]:
    """argparse ``type=`` for a comma-separated list of counts, e.g. ``1,64``."""
    values = tuple(positive_int_arg(t) for t in _csv(text))
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive whole numbers like 1,64, got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark SLA, PRepBN and the deploy forms (JSON, plot, tables)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models, few repeats: a couple of minutes")
    p.add_argument("--output", default="outputs/bench", help="folder for bench.json, bench.md and the plot")
    p.add_argument("--sections", type=_csv, default=None,
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--families", type=_csv, default=None,
                   help="comma-separated families (deit,pvt,pvt_v2,swin,cswin) or registered model names")
    p.add_argument("--backends", type=_csv, default=None, help="subset of eager,compile,onnxruntime")
    p.add_argument("--batch-sizes", type=_positive_ints, default=None,
                   help="batch sizes of the model section, e.g. 1,64")
    p.add_argument("--tokens", type=_positive_ints, default=None,
                   help="token counts of the attention section, e.g. 196,784,3136,12544")
    p.add_argument("--threads", type=positive_int_arg, default=None,
                   help="torch/ONNX Runtime threads (default: torch's)")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the tables to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..bench.models import FAMILY_MODELS
    from ..bench.run import FULL, QUICK, SECTIONS, render_markdown, run_bench
    # Everything is checked before the first timing: a full bench takes half an hour.
    check_output_dir(args.output)
    if args.markdown:
        check_output_file(args.markdown, "--markdown")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK() if args.quick else FULL()
    if args.sections is not None:
        check_choices(args.sections, SECTIONS, "sections")
        cfg.sections = args.sections
    if args.families is not None:
        import slab
        models = slab.list_models()
        for f in args.families:
            if f not in FAMILY_MODELS and f not in models:
                raise UserError(f"unknown family or model {f!r}{did_you_mean(f, [*FAMILY_MODELS, *models])}; "
                                f"families: {', '.join(FAMILY_MODELS)}; models: see `slab models`")
        cfg.families = {f: FAMILY_MODELS.get(f, f) for f in args.families}
    if args.backends is not None:
        check_choices(args.backends, ("eager", "compile", "onnxruntime"), "backends")
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
