"""The ``slab`` command line. Each subcommand lives in ``slab/commands/<name>.py`` and exposes
``register(subparsers)``; this module only discovers and dispatches them."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, commands
    parser = argparse.ArgumentParser(prog="slab", description="SLAB transformers: train, fuse, verify, export, bench.")
    parser.add_argument("--version", action="version", version=f"slab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Errors we raise on bad input (slab.errors.UserError is a ValueError) carry their fix; a traceback
        # would bury it.
        print(f"slab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # The system refused a file operation no check foresaw: which file and why matter, not where in slab.
        where = f"{e.filename}: " if e.filename else ""
        print(f"slab {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
