"""``slab study``: the paper's norm and attention ablations, small scale, on Fashion-MNIST."""
from __future__ import annotations

import os
import sys
import time

from ..errors import nonnegative_int_arg, positive_float_arg, positive_int_arg


def register(sub) -> None:
    from slab.train.study import VARIANTS
    p = sub.add_parser("study", help="re-run the paper's ablations at small scale on Fashion-MNIST",
                       description="Train the demo's ViT (slab_deit_nano_patch4_28, 7x7 patches) on Fashion-MNIST "
                                   "with norm in {ln, bn, repbn, prepbn} (softmax attention) and with prepbn + SLA, "
                                   "each with its tuned recipe (docs/demo.md), for several seeds; set each against "
                                   "the paper's claim; write OUTPUT/study.json, OUTPUT/study.md (table) and "
                                   "OUTPUT/study.png. Runs are resumable: re-running the same command continues "
                                   "unfinished runs.")
    p.add_argument("--output", default="runs/study", help="study folder (default runs/study)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=positive_float_arg, default=12.0,
                   help="epochs of every run (default 12: LN's test accuracy has plateaued, docs/study.md)")
    p.add_argument("--steps", type=positive_int_arg, default=None,
                   help="optimizer steps per run instead of --epochs (short runs, e.g. to try the command)")
    p.add_argument("--jobs", type=positive_int_arg, default=2, help="runs in parallel (processes; default 2)")
    p.add_argument("--threads", type=positive_int_arg, default=1, help="torch threads per run (default 1)")
    p.add_argument("--recal-batches", type=nonnegative_int_arg, default=100, help="BN recalibration batches for BN models (0: off)")
    p.set_defaults(func=run)


def run(args) -> int:
    from slab.errors import check_output_dir
    from slab.train.study import markdown_table, plot_study, run_study, summarise
    check_output_dir(args.output)
    t0 = time.time()
    results = run_study(args.output, variants=args.variants, seeds=tuple(args.seeds), epochs=args.epochs,
                        max_steps=args.steps, jobs=args.jobs, threads=args.threads,
                        recal_batches=args.recal_batches, log=lambda s: print(s, file=sys.stderr, flush=True))
    wall = time.time() - t0
    table = markdown_table(summarise(results))
    png = plot_study(results, os.path.join(args.output, "study.png"))
    command = "slab study " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 and sys.argv[1] == "study" else \
        "slab study (see study.json for the settings)"
    with open(os.path.join(args.output, "study.md"), "w") as f:
        f.write(f"# SLAB ablations on Fashion-MNIST\n\n{table}\n\n![curves]({os.path.basename(png)})\n\n"
                f"Command: `{command}`  \nWall time: {wall / 60:.1f} min ({os.cpu_count()} CPUs, {args.jobs} jobs x "
                f"{args.threads} threads)\n")
    print(table)
    print(f"\nwrote {os.path.join(args.output, 'study.md')} and {png} in {wall / 60:.1f} min")
    return 0
