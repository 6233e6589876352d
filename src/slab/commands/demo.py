"""``slab demo``: train LN, PRepBN and SLAB on Fashion-MNIST, fuse, verify, time (what ``make demo`` runs)."""
from __future__ import annotations

from ..errors import positive_int_arg


def register(sub) -> None:
    p = sub.add_parser("demo", help="train LN, PRepBN and SLAB models on Fashion-MNIST, fuse, verify, and compare "
                                    "latency")
    p.add_argument("--output", default="outputs/demo", help="directory for report.json, plots and runs")
    p.add_argument("--epochs", type=float, default=None,
                   help="training epochs of every form (default: each form's tuned recipe, docs/demo.md)")
    p.add_argument("--max-steps", type=positive_int_arg, default=None,
                   help="optimizer steps per model (overrides --epochs)")
    p.add_argument("--jobs", type=positive_int_arg, default=3,
                   help="models trained at once, one thread each (default 3: all three, sharing the cores; "
                        "1: one after the other)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recalibrate-batches", type=positive_int_arg, default=100)
    p.add_argument("--latency-repeats", type=positive_int_arg, default=30)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DemoConfig, run_demo
    from ..errors import check_output_dir
    check_output_dir(args.output)
    run_demo(DemoConfig(output=args.output, epochs=args.epochs, max_steps=args.max_steps, jobs=args.jobs,
                        seed=args.seed, recalibrate_batches=args.recalibrate_batches,
                        latency_repeats=args.latency_repeats, progress=not args.no_progress))
    return 0
