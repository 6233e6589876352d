"""Run the installed timm's ``tests/test_models.py`` (from its sdist) on slab's registered models.

Usage: ``python tests/peer/run_timm.py [pytest args...]``, e.g. ``-k backward -x``. Exits with
pytest's status. The sdist is fetched once into ``~/.cache/slab/peer`` (see :mod:`peer_sdist`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    from peer_sdist import peer_tests
    root = peer_tests("timm")
    import pytest
    args = [str(root / "tests" / "test_models.py"), "-c", str(root / "pyproject.toml"), "--rootdir", str(root),
            "-p", "slab_timm_plugin", "-p", "no:cacheprovider", "-q", *argv]
    return pytest.main(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
