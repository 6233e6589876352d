"""The Triton SLA kernels against the float32 reference: on CUDA when there is a GPU, else in Triton's
interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be set before ``import triton``: Triton's own ``tl.sum`` & co. are
``@triton.jit`` functions decorated on import (ours when ``slab.ops.triton_linear_attention`` is
imported), and the interpreter cannot call compiled ones; Triton also reads it again on lazy imports at
the first launch, so it stays set. Run alone, this module sets it before anything imports Triton. In a
full-suite run earlier modules have already imported Triton
(``import slab`` pulls it in through torch), so the kernel tests skip here and
:func:`test_kernel_tests_in_a_fresh_interpreter` runs this file again in a subprocess with it set.
"""
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_SET_INTERPRET = DEVICE == "cpu" and "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401
except ImportError as e:  # only a missing Triton skips; any other failure below is a real error
    pytest.skip(f"triton cannot be imported: {e}", allow_module_level=True)
from slab.ops import linear_attention, linear_attention_reference  # noqa: E402
from slab.ops import triton_linear_attention as kernels  # noqa: E402

from conftest import assert_close, run_kernel_tests_in_fresh_interpreter  # noqa: E402

IN_PROCESS = DEVICE == "cuda" or kernels.INTERPRETED
kernel_test = pytest.mark.skipif(not IN_PROCESS, reason="Triton was imported without TRITON_INTERPRET=1: "
                                 "run by test_kernel_tests_in_a_fresh_interpreter")

# (B, heads, Nq, Nk, head_dim, value_dim). Tiles are 64 tokens: 197 = 3 full tiles + 5, 3136 = 49 tiles.
CASES = {
    "n1-d32-h1": (2, 1, 1, 1, 32, 32),
    "n1-d7-h3": (1, 3, 1, 1, 7, 7),
    "n197-d7-h3": (1, 3, 197, 197, 7, 7),
    "n197-d32-h3": (2, 2, 197, 197, 32, 32),
    "n197-d64-h1": (1, 1, 197, 197, 64, 64),
    "n197-d128-h1": (1, 1, 197, 197, 128, 128),
    "n3136-d32-h1": (1, 1, 3136, 3136, 32, 32),
    "nq197-nk63-d7-dv32": (1, 2, 197, 63, 7, 32),
    "nq1-nk197-d32-dv7": (1, 3, 1, 197, 32, 7),
}
SMALL = (1, 1, 197, 197, 7, 7)  # the cheapest multi-tile case, for tests about something else than size
HALF_CASES = {"n197-d32-h3": (1, 3, 197, 197, 32, 32), "n197-d7-h1": SMALL}
# Relative to max|ref|: float32 is rounding only; half is the output / gradient rounding of that dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _inputs(case, dtype=torch.float32, scale=1.0):
    b, h, nq, nk, d, dv = case
    g = torch.Generator().manual_seed(sum(case))
    shapes = ((b, h, nq, d), (b, h, nk, d), (b, h, nk, dv))
    return [(torch.randn(s, generator=g) * scale).to(DEVICE, dtype).requires_grad_() for s in shapes]


def _max_error(ref, out):
    return (out.double() - ref.double()).abs().max().item()


def _float64_truth(q, k, v, grad):
    """Output and gradients of the float64 torch path (gradcheck-ed in test_ops.py)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = linear_attention(q, k, v, impl="torch")
    return (out, *torch.autograd.grad(out, (q, k, v), grad.double()))


def _check_against_reference(q, k, v, rel, grad=None):
    """Triton output and gradients within ``rel * max|reference|`` of the reference.

    Float32 is held against the float64 truth, with slack of 10x what the float32 reference itself gets
    wrong there: where gradient terms cancel (N = 1: out = v whatever q and k) float32 rounding of the
    cancelling terms exceeds any bound relative to the tiny result. Half precision is held against the
    float32 reference on the same half inputs: both round the same float32 results to the half dtype.
    """
    out = linear_attention(q, k, v, impl="triton")
    ref = linear_attention_reference(q, k, v)
    assert out.shape == ref.shape and out.dtype == q.dtype
    grad = torch.randn(ref.shape).to(DEVICE, ref.dtype) if grad is None else grad
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    want = (ref, *torch.autograd.grad(ref, (q, k, v), grad))
    truth = _float64_truth(q, k, v, grad) if q.dtype == torch.float32 else want
    for name, t, w, o in zip(("out", "dq", "dk", "dv"), truth, want, got):
        assert o.dtype == w.dtype
        assert_close(name, t, o, rel, atol=10 * _max_error(t, w) if t is not w else 0.0)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@kernel_test
def test_triton_matches_reference_float32(case):
    _check_against_reference(*_inputs(case), TOLERANCE[torch.float32])


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(HALF_CASES.values()), ids=list(HALF_CASES))
def test_triton_matches_reference_half(case, dtype):
    _check_against_reference(*_inputs(case, dtype), TOLERANCE[dtype])


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_keep_float32_state_and_normaliser(dtype):
    # Activations of 30: the normaliser reaches ~1e6, past float16's 65504; the state and sums are float32.
    q, k, v = _inputs((1, 1, 500, 500, 32, 32), dtype, scale=30.0)
    normaliser = (torch.relu(q.float()) * torch.relu(k.float()).sum(2, keepdim=True)).sum(-1)
    assert normaliser.max() > torch.finfo(torch.float16).max
    _check_against_reference(q, k, v, TOLERANCE[dtype])


@kernel_test
def test_strided_inputs_and_gradient():
    # Head views of one qkv projection ([B, N, 3 * H * 2D] memory) with a last-dim stride of 2, and a
    # transposed upstream gradient.
    b, n, h, d = 1, 197, 3, 16
    qkv = torch.randn(b, n, 3 * h * 2 * d, device=DEVICE)
    q, k, v = (t.reshape(b, n, h, 2 * d).transpose(1, 2)[..., ::2].requires_grad_() for t in qkv.chunk(3, dim=-1))
    assert q.stride(-1) == 2 and not q.is_contiguous()
    grad = torch.randn(b, h, d, n, device=DEVICE).transpose(2, 3)
    _check_against_reference(q, k, v, TOLERANCE[torch.float32], grad=grad)


@kernel_test
@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)], ids=["q", "k", "v", "kv"])
def test_gradient_subsets(which):
    tensors = [t.detach().requires_grad_(need) for t, need in zip(_inputs(SMALL), which)]
    wanted = [t for t in tensors if t.requires_grad]
    grad = torch.randn(1, 1, 197, 7, device=DEVICE)
    got = torch.autograd.grad(linear_attention(*tensors, impl="triton"), wanted, grad)
    want = torch.autograd.grad(linear_attention_reference(*tensors), wanted, grad)
    for w, o in zip(want, got):
        assert_close("subset grad", w, o, TOLERANCE[torch.float32])


@kernel_test
def test_token_chunks_sum_to_the_single_pass():
    # On a GPU with few streams the reductions over tokens are split into chunks; the interpreter never
    # chooses that itself, so force it (3 chunks of 66 tokens: boundaries inside tiles).
    q, k, v = (t.detach() for t in _inputs(CASES["n197-d32-h3"]))
    out, state, ksum = kernels._forward(q, k, v, 1e-6, chunks=3)
    assert_close("chunked out", linear_attention_reference(q, k, v), out, TOLERANCE[torch.float32])
    assert_close("chunked ks", torch.relu(k).sum(2).reshape(4, 32), ksum, TOLERANCE[torch.float32])
    grad = torch.randn_like(out)
    one = kernels._query_grads(q, grad, state, ksum, 1e-6, True, True, chunks=1)
    three = kernels._query_grads(q, grad, state, ksum, 1e-6, True, True, chunks=3)
    for name, a, b in zip(("dq", "dS", "dks"), one, three):
        assert_close(f"chunked {name}", a, b, TOLERANCE[torch.float32])


@kernel_test
def test_all_negative_queries_give_zero_not_nan():
    q, k, v = _inputs(SMALL)
    q = (-q.detach().abs()).requires_grad_()
    out = linear_attention(q, k, v, impl="triton")
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.equal(v.grad, torch.zeros_like(v))


def test_impl_choice_and_errors(monkeypatch):
    q, k, v = (t.detach().cpu() for t in _inputs(CASES["n197-d7-h3"]))
    with pytest.raises(ValueError, match="None .*'torch', 'triton'"):
        linear_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="dtype"):
        linear_attention(q.double(), k.double(), v.double(), impl="triton")
    with pytest.raises(ValueError, match="<= 128"):
        linear_attention(*(torch.randn(1, 1, 4, 129) for _ in range(3)), impl="triton")

    def no_kernels(*args):
        raise AssertionError("the automatic choice took the Triton path for CPU tensors")

    monkeypatch.setattr(kernels, "linear_attention_triton", no_kernels)
    assert_close("auto on CPU", linear_attention_reference(q, k, v), linear_attention(q, k, v), 1e-5)
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_attention(q, k, v, impl="triton")


@pytest.mark.slow
@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests ran in this process")
def test_kernel_tests_in_a_fresh_interpreter():
    run_kernel_tests_in_fresh_interpreter(__file__)
