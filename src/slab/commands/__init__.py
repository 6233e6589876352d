"""Subcommands of the ``slab`` CLI: one module each, with ``register(subparsers)``."""
