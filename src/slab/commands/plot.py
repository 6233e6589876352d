"""``slab plot``: PNG curves (loss, top-1, lr, lam) of one or more training runs."""
from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot loss, top-1, lr and lam of training runs to a PNG",
                       description="Read RUN_DIR/metrics.jsonl of one or more 'slab train' runs and write a 2x2 "
                                   "PNG: training loss, eval top-1, learning rate, PRepBN lam, against the step.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (the --output of slab train)")
    p.add_argument("--output", "-o", default=None, help="PNG path (default RUN_DIR/curves.png for one run)")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run")
    p.add_argument("--smooth", type=int, default=20, help="moving-average window of the loss (default 20)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from slab.errors import check_output_file
    from slab.train.plot import plot_runs
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise ValueError(f"--labels needs one label per run ({len(args.runs)}), got {len(args.labels)}")
    if args.output is None:
        if len(args.runs) > 1:
            raise ValueError("give --output when plotting several runs")
        args.output = os.path.join(args.runs[0], "curves.png")
    check_output_file(args.output)
    print(plot_runs(args.runs, args.output, labels=args.labels, smooth=args.smooth, title=args.title))
    return 0
