import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SLAB_TEST_THREADS", "1")))

FIXTURES = Path(__file__).parent / "fixtures" / "official"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_fixture(name: str):
    """(record, state_dict, io) of one of the authors' reference models."""
    from safetensors.torch import load_file
    record = json.loads((FIXTURES / f"{name}.json").read_text())
    return record, load_file(str(FIXTURES / f"{name}.safetensors")), load_file(str(FIXTURES / f"{name}.io.safetensors"))


def randomize_bn_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics, affine and RepBN alpha: default ones (0/1) hide folding bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.25)
                m.num_batches_tracked.fill_(10)
                if m.affine:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, rel: float, atol: float = 0.0) -> None:
    """``max|out-ref| <= rel * max|ref| + atol``; fails on NaN/inf.

    ``atol`` is for quantities that are legitimately ~0 (e.g. gradients through a saturated
    normaliser), where float32 rounding alone exceeds any relative bound.
    """
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item() + 1e-12
    assert err <= rel * scale + atol, f"{name}: relative error {err / scale:.3e} > {rel:.1e} (abs {err:.3e})"


def authors_param_count(model: torch.nn.Module) -> int:
    """The parameter count the authors report: ours plus the tensors we keep as buffers only so their files
    load (SLAB-DeiT's unused ``cls_token``, SLAB-CSwin's unused SLA ``scale``)."""
    kept = sum(b.numel() for n, b in model.named_buffers() if n == "cls_token" or n.endswith("attns.0.scale")
               or n.endswith("attns.1.scale"))
    return sum(p.numel() for p in model.parameters()) + kept


def run_kernel_tests_in_fresh_interpreter(test_file: str) -> None:
    """Run ``test_file`` again in a subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when imported, so a
    process that imported Triton without it cannot interpret kernels); every test there must pass, none skip."""
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(test_file),
           "-k", "not test_kernel_tests_in_a_fresh_interpreter"]
    run = subprocess.run(cmd, env=env, cwd=Path(test_file).parents[1], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]
