"""The PRepBN training mix (:func:`slab.ops.prepbn_mix`): its torch and Triton paths against the reference.

The Triton kernels run on CUDA when there is a GPU, else in Triton's interpreter on CPU tensors. As in
``test_ops_triton.py``: ``TRITON_INTERPRET=1`` must be set before ``import triton``; run alone this module sets
it, and in a full-suite run (Triton already imported without it) the kernel tests skip here and
:func:`test_kernel_tests_in_a_fresh_interpreter` runs this file again in a subprocess with it set.
"""
import copy
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401
except ImportError as e:  # only a missing Triton skips; any other failure below is a real error
    pytest.skip(f"triton cannot be imported: {e}", allow_module_level=True)
from slab.ops import prepbn_mix, prepbn_mix_reference  # noqa: E402
from slab.ops import dispatch  # noqa: E402
from slab.ops import triton_prepbn as kernels  # noqa: E402

from conftest import assert_close, run_kernel_tests_in_fresh_interpreter  # noqa: E402

IN_PROCESS = DEVICE == "cuda" or kernels.INTERPRETED
kernel_test = pytest.mark.skipif(not IN_PROCESS, reason="Triton was imported without TRITON_INTERPRET=1: "
                                 "run by test_kernel_tests_in_a_fresh_interpreter")

# (M tokens, C channels). Token tiles of the reductions are 64 (130 = 2 full + 2, 197 = 3 full + 5); rows of
# the row passes are whole, C padded to a power of two (7 -> 16, 197 -> 256, 384 -> 512). Small M: the
# interpreter is slow.
CASES = {"m1-c7": (1, 7), "m1-c384": (1, 384), "m2-c96": (2, 96), "m197-c7": (197, 7), "m33-c197": (33, 197),
         "m130-c384": (130, 384)}
LAMS = {"after": None, "transition": 0.3}   # None: lam = 0, the LN not computed (its parameters get zeros)
HALF_CASES = {"m33-c197": (33, 197), "m130-c96": (130, 96)}
# Relative to max|truth|: float32 is rounding only; half is one rounding of the output / dx to that dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
NAMES = ("y", "running_mean", "running_var", "dx", "d ln_weight", "d ln_bias", "d bn_weight", "d bn_bias", "d alpha")


def _problem(case, dtype=torch.float32, param_dtype=torch.float32, shift=1.0):
    """``x``, the five parameters, running statistics and an upstream gradient (fixed by ``case``)."""
    m, c = case
    g = torch.Generator().manual_seed(m * 1000 + c)
    x = (torch.randn(m, c, generator=g) * 2 + shift).to(DEVICE, dtype)
    params = [1 + 0.3 * torch.randn(c, generator=g), 0.3 * torch.randn(c, generator=g),
              1 + 0.3 * torch.randn(c, generator=g), 0.3 * torch.randn(c, generator=g), torch.tensor([0.7])]
    params = [p.to(DEVICE, param_dtype) for p in params]
    running = (torch.randn(c, generator=g).to(DEVICE), (torch.rand(c, generator=g) + 0.5).to(DEVICE))
    grad = torch.randn(m, c, generator=g).to(DEVICE, dtype)
    return x, params, running, grad


def _run(fn, x, params, running, grad, lam, momentum=0.1, need_x=True, **kw):
    """``(y, running_mean, running_var, dx, d ln_w, d ln_b, d bn_w, d bn_b, d alpha)`` of one call of ``fn``."""
    x = x.detach().clone().requires_grad_(need_x)
    params = [p.detach().clone().requires_grad_() for p in params]
    rm, rv = (r.clone() for r in running)
    lam_t = None if lam is None else torch.tensor(lam, device=x.device)
    y = fn(x, *params, lam_t, rm, rv, momentum, 1e-5, 1e-6, **kw)
    wanted = ([x] if need_x else []) + params
    grads = torch.autograd.grad(y, wanted, grad)
    return (y, rm, rv) + ((None,) if not need_x else ()) + tuple(grads)


def _float64_truth(x, params, running, grad, lam):
    return _run(prepbn_mix_reference, x.double(), [p.double() for p in params],
                [r.double() for r in running], grad.double(), lam)


def _assert_matches(got, want, rel, slack=None):
    for i, (name, o, w) in enumerate(zip(NAMES, got, want)):
        if w is None:
            assert o is None, name
            continue
        assert o.shape == w.shape, name
        if torch.isnan(w).any():  # M = 1: the running variance is 0/0
            assert torch.equal(torch.isnan(o), torch.isnan(w)), name
            o, w = o.nan_to_num(), w.nan_to_num()
        atol = 0.0 if slack is None or slack[i] is None else 10 * slack[i]
        assert_close(name, w, o, rel, atol=atol)


def _max_errors(got, truth):
    return [None if t is None else (g.double() - t.double()).nan_to_num().abs().max().item()
            for g, t in zip(got, truth)]


def _check_float32(impl, case, lam, **problem):
    """``impl`` within 1e-5 of max|float64 truth|, with slack of 10x what the float32 reference gets wrong
    (where terms cancel, e.g. the BN part of dx at M = 1, rounding exceeds any bound relative to the result)."""
    x, params, running, grad = _problem(case, **problem)
    truth = _float64_truth(x, params, running, grad, lam)
    reference = _run(prepbn_mix_reference, x, params, running, grad, lam)
    got = _run(prepbn_mix, x, params, running, grad, lam, impl=impl)
    assert got[0].dtype == x.dtype
    slack = _max_errors(reference, truth)
    if impl == "torch":
        # The torch path folds BN into x * s + t with s ~ bn_w * invstd: its output carries the rounding of
        # those terms, ~|x| bn_w invstd * 2^-24 each, which at M = 1 (invstd = 1/sqrt(eps) ~ 316) is ~300x the
        # result's. (The Triton kernel normalises x - mean first and has no such term.)
        xd = x.double()
        invstd = torch.rsqrt(xd.var(0, unbiased=False) + 1e-5)
        folded = (xd.abs() * (params[2].double() * invstd).abs()).max().item()
        slack[0] = max(slack[0], 2 * folded * 2.0 ** -24 / 10)
    _assert_matches(got, truth, TOLERANCE[torch.float32], slack=slack)


# ---------------------------------------------------------------- torch path (no Triton involved)
@pytest.mark.parametrize("lam", list(LAMS.values()), ids=list(LAMS))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_torch_path_matches_reference(case, lam):
    if DEVICE == "cuda":
        pytest.skip("the torch path is checked on CPU")
    _check_float32("torch", case, lam)


# ---------------------------------------------------------------- Triton
@kernel_test
@pytest.mark.parametrize("lam", list(LAMS.values()), ids=list(LAMS))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_triton_matches_reference_float32(case, lam):
    _check_float32("triton", case, lam)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(HALF_CASES.values()), ids=list(HALF_CASES))
def test_triton_matches_reference_half(case, dtype):
    # A half model (parameters in the half dtype too), held against the float32 reference on the same half
    # inputs: both round the same float32 results to the half dtype.
    x, params, running, grad = _problem(case, dtype, param_dtype=dtype)
    want = _run(prepbn_mix_reference, x, params, running, grad, 0.3)
    got = _run(prepbn_mix, x, params, running, grad, 0.3, impl="triton")
    assert got[0].dtype == dtype and got[3].dtype == dtype and got[4].dtype == dtype
    _assert_matches(got, want, TOLERANCE[dtype])


@kernel_test
def test_triton_half_input_with_float32_parameters():
    x, params, running, grad = _problem((33, 197), torch.bfloat16)
    want = _run(prepbn_mix_reference, x, params, running, grad, 0.3)
    got = _run(prepbn_mix, x, params, running, grad, 0.3, impl="triton")
    assert got[4].dtype == torch.float32
    _assert_matches(got, want, TOLERANCE[torch.bfloat16])


@kernel_test
def test_triton_large_mean_keeps_the_variance():
    # Channels at ~1000 with unit spread: sum(x^2) - M mean^2 would lose every digit in float32; the
    # kernel merges per-tile means and squared deviations instead.
    _check_float32("triton", (197, 7), 0.3, shift=1000.0)


@kernel_test
def test_triton_strided_inputs_and_gradient():
    m, c = 130, 96
    x, params, running, grad = _problem((m, c))
    x_t = x.t().contiguous().t()                                 # column-major [M, C]: strides (1, M)
    wide = torch.zeros(m, 2 * c, device=DEVICE)
    wide[:, ::2] = x
    x_s = wide[:, ::2]                                            # last-dim stride 2
    g_t = grad.t().contiguous().t()
    assert not x_t.is_contiguous() and x_s.stride(-1) == 2 and not g_t.is_contiguous()
    want = _run(prepbn_mix_reference, x, params, running, grad, 0.3)
    for xv in (x_t, x_s):
        got = _run(prepbn_mix, xv, params, running, g_t, 0.3, impl="triton")
        _assert_matches(got, want, TOLERANCE[torch.float32])


@kernel_test
def test_triton_parameter_gradients_without_input_gradient():
    x, params, running, grad = _problem((33, 197))
    want = _run(prepbn_mix_reference, x, params, running, grad, 0.3, need_x=False)
    got = _run(prepbn_mix, x, params, running, grad, 0.3, need_x=False, impl="triton")
    _assert_matches(got, want, TOLERANCE[torch.float32])


@kernel_test
def test_triton_cumulative_momentum_and_no_ln_parameters():
    # lam None without LN parameters (RepBN alone), momentum 1/3 (a cumulative average's third step).
    x, params, running, grad = _problem((70, 96))
    params_no_ln = params[2:]

    def without_ln(fn):
        return lambda x, bw, bb, a, lam, *rest, **kw: fn(x, None, None, bw, bb, a, lam, *rest, **kw)

    want = _run(without_ln(prepbn_mix_reference), x, params_no_ln, running, grad, None, momentum=1 / 3)
    got = _run(without_ln(prepbn_mix), x, params_no_ln, running, grad, None, momentum=1 / 3, impl="triton")
    names = ("y", "running_mean", "running_var", "dx", "d bn_weight", "d bn_bias", "d alpha")
    for name, o, w in zip(names, got, want):
        assert_close(name, w, o, TOLERANCE[torch.float32])


@kernel_test
def test_token_chunks_match_the_single_pass():
    # On a GPU the reductions over tokens split into chunks when few channel blocks would leave it idle; the
    # interpreter never chooses that itself, so force it (3 chunks of 66 tokens: boundaries inside tiles).
    x, params, running, grad = _problem((197, 96))
    lam = torch.tensor(0.3)
    args = (x, *params, lam, None, None, 0.1, 1e-5, 1e-6, True)
    one = kernels._forward(*args, chunks=1)
    three = kernels._forward(*args, chunks=3)
    for name, a, b in zip(("y", "mean", "invstd", "mu", "rstd"), one, three):
        assert_close(f"chunked {name}", a, b, TOLERANCE[torch.float32])
    _, mean, invstd, mu, rstd = one
    sums_one = kernels._grad_channel_sums(x, grad, mean, invstd, mu, rstd, True, chunks=1)
    sums_three = kernels._grad_channel_sums(x, grad, mean, invstd, mu, rstd, True, chunks=3)
    for name, a, b in zip(("sum g", "sum g xhat_bn", "sum g xhat_ln", "sum g x"), sums_one, sums_three):
        assert_close(f"chunked {name}", a, b, TOLERANCE[torch.float32])


@kernel_test
def test_prepbn_layer_takes_the_triton_path_when_chosen(monkeypatch):
    # The layer's automatic choice through the kernels (as on CUDA with SLAB_TRITON=1) against the torch path:
    # output, every gradient, running statistics and the batch counter, in the transition and after it.
    from slab.layers import PRepBN
    calls = []
    real = kernels.prepbn_mix_triton

    def counted(*args):
        calls.append(1)
        return real(*args)

    for lam in (0.3, 0.0):
        torch.manual_seed(0)
        m = PRepBN(96).train().to(DEVICE)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        m.set_lambda(lam)
        twin = copy.deepcopy(m)
        x = torch.randn(2, 33, 96, device=DEVICE) * 2 + 1
        g = torch.randn_like(x)
        monkeypatch.setattr(dispatch, "triton_auto_allowed", lambda t: True)
        monkeypatch.setattr(kernels, "prepbn_mix_triton", counted)
        xa = x.clone().requires_grad_()
        m(xa).backward(g)
        monkeypatch.undo()
        xb = x.clone().requires_grad_()
        twin(xb).backward(g)
        assert_close("dx", xb.grad, xa.grad, TOLERANCE[torch.float32])
        for (name, p), (_, q) in zip(m.named_parameters(), twin.named_parameters()):
            assert_close(f"d {name}", q.grad, p.grad, 1e-4 if name.endswith("alpha") else 1e-5, atol=1e-6)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(m.repbn.bn, name).double(), getattr(twin.repbn.bn, name).double(),
                                  rtol=1e-6, atol=1e-7), name
    assert len(calls) == 2


def test_impl_choice_and_errors(monkeypatch):
    x, params, running, _ = (t for t in _problem((33, 96)))
    x, params, running = x.cpu(), [p.cpu() for p in params], [r.cpu() for r in running]
    lam = torch.tensor(0.3)

    def call(x, params, lam, **kw):
        return prepbn_mix(x, *params, lam, running[0].clone(), running[1].clone(), 0.1, 1e-5, 1e-6, **kw)

    with pytest.raises(ValueError, match="None .*'torch', 'triton'"):
        call(x, params, lam, impl="cuda")
    with pytest.raises(ValueError, match=r"\[M, C\]"):
        call(x.reshape(3, 11, 96), params, lam)
    with pytest.raises(ValueError, match="affine LayerNorm"):
        call(x, [None, None] + params[2:], lam)
    with pytest.raises(ValueError, match="dtype|float64"):
        call(x.double(), [p.double() for p in params], lam, impl="triton")
    wide = 8200
    with pytest.raises(ValueError, match="<= 8192"):
        call(torch.randn(4, wide), [torch.ones(wide)] * 4 + [params[4]], lam, impl="triton")

    def no_kernels(*args):
        raise AssertionError("the automatic choice took the Triton path")

    monkeypatch.setattr(kernels, "prepbn_mix_triton", no_kernels)
    want = prepbn_mix_reference(x, *params, lam)
    assert_close("auto on CPU", want, call(x, params, lam), 1e-5)
    # Where the switch allows Triton, inputs the kernels do not cover still take the torch path (explicitly).
    monkeypatch.setattr(dispatch, "triton_auto_allowed", lambda t: True)
    running = [r.double() for r in running]
    assert_close("auto float64", want.double(), call(x.double(), [p.double() for p in params], lam), 1e-5)
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        call(x, params, lam, impl="triton")


@pytest.mark.slow
@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests ran in this process")
def test_kernel_tests_in_a_fresh_interpreter():
    run_kernel_tests_in_fresh_interpreter(__file__)
