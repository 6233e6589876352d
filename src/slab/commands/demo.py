"""``slab demo``: train LN and SLAB models on Fashion-MNIST, fuse, verify, time (what ``make demo`` runs)."""
from __future__ import annotations

from ..errors import positive_int_arg


def register(sub) -> None:
    p = sub.add_parser("demo", help="train LN and SLAB on Fashion-MNIST, fuse, verify, and compare latency")
    p.add_argument("--output", default="outputs/demo", help="directory for report.json, plots and runs")
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs per model (default 3)")
    p.add_argument("--max-steps", type=positive_int_arg, default=None,
                   help="optimizer steps per model (overrides --epochs)")
    p.add_argument("--batch-size", type=positive_int_arg, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recalibrate-batches", type=int, default=100)
    p.add_argument("--latency-repeats", type=positive_int_arg, default=30)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DemoConfig, run_demo
    from ..errors import check_output_dir
    check_output_dir(args.output)
    run_demo(DemoConfig(output=args.output, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed, recalibrate_batches=args.recalibrate_batches,
                        latency_repeats=args.latency_repeats, progress=not args.no_progress))
    return 0
