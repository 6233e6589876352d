"""Moved to :mod:`slab.engine.distributed` (kept so existing imports work)."""
from ..engine.distributed import *  # noqa: F401,F403
from ..engine.distributed import __all__  # noqa: F401
