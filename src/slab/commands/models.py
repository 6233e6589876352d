"""``slab models``: list registered models."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'slab_*'")
    p.add_argument("--params", action="store_true", help="also print parameter counts (builds each model)")
    p.set_defaults(func=run)


def run(args) -> int:
    import slab
    names = slab.list_models(args.pattern)
    if not names:
        from ..errors import UserError, did_you_mean
        raise UserError(f"no registered model matches {args.pattern!r}{did_you_mean(args.pattern, slab.list_models())}; "
                        f"patterns are fnmatch globs, e.g. 'slab_*' or '*swin*'")
    for name in names:
        if args.params:
            m = slab.create_model(name)
            print(f"{name:45s} {sum(p.numel() for p in m.parameters()) / 1e6:8.2f}M")
        else:
            print(name)
    return 0
