"""timm's own ``tests/test_models.py`` on our models (``make peer-test-timm``), as one test of this suite.

It fetches the timm sdist (network, once) and takes minutes, so it runs only with ``SLAB_PEER_TESTS=1``;
:mod:`test_contract` checks the same contract quickly on every run.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).parent / "peer" / "run_timm.py"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SLAB_PEER_TESTS") != "1", reason="set SLAB_PEER_TESTS=1 (fetches timm's sdist)")
def test_timm_test_models_pass_on_our_models():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(RUNNER), "-q", "--tb=line"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
