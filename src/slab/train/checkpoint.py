"""Moved to :mod:`slab.engine.checkpoint` (kept so existing imports work)."""
from ..engine.checkpoint import *  # noqa: F401,F403
from ..engine.checkpoint import __all__  # noqa: F401
