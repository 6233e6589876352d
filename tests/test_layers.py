"""Norms, the PRepBN schedule and the SLA module."""
import copy

import pytest
import torch
import torch.nn as nn

import slab
from slab.layers import PRepBN, RepBN, SimplifiedLinearAttention, TokenBatchNorm, get_norm_layer
from slab.layers.attention import attn_letters, dwc_on_tokens, get_attn_layer, parse_attn
from slab.ops import linear_attention, linear_attention_reference
from slab.schedule import PRepBNSchedule

from conftest import assert_close


# ---------------------------------------------------------------- schedule
def test_schedule_values_step_by_step():
    s = PRepBNSchedule(None, total_steps=20, warmup_steps=3, transition_steps=4)
    got = [s.lam_at(i) for i in range(10)]
    # warm-up: 1, 1, 1; then r0 * remaining / T: 4/4, 3/4, 2/4, 1/4; then 0.
    assert got == [1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]


def test_schedule_fraction_and_bounds():
    s = PRepBNSchedule(None, total_steps=100, transition_fraction=0.5)
    assert s.transition_steps == 50 and s.lam_at(0) == 1.0 and s.lam_at(25) == 0.5 and s.lam_at(50) == 0.0
    with pytest.raises(ValueError, match="would end after training"):
        PRepBNSchedule(None, total_steps=100, warmup_steps=30, transition_steps=80)
    with pytest.raises(ValueError):
        PRepBNSchedule(None, total_steps=100, transition_steps=10, transition_fraction=0.1)


def test_schedule_drives_model_and_resumes():
    model = nn.Sequential(PRepBN(8), PRepBN(8))
    s = PRepBNSchedule(model, total_steps=10, warmup_steps=2, transition_steps=4)
    for _ in range(4):
        s.step()
    assert all(m.lam_value == pytest.approx(0.5) for m in model)
    state = s.state_dict()
    model2 = nn.Sequential(PRepBN(8), PRepBN(8))
    s2 = PRepBNSchedule(model2, total_steps=10, warmup_steps=2, transition_steps=4)
    s2.load_state_dict(state)
    assert s2.last_step == 4 and all(m.lam_value == pytest.approx(0.5) for m in model2)
    for a, b in zip(range(6), range(6)):
        assert s.step() == s2.step()


def test_lambda_unchanged_by_accumulation_extra_forwards_and_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), PRepBN(8))
    s = PRepBNSchedule(model, total_steps=100, warmup_steps=0, transition_steps=50)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):  # one optimizer step = 4 accumulated micro-batches + an eval forward
        for _ in range(4):
            model(torch.randn(4, 5, 8)).sum().backward()
        model.eval(); model(torch.randn(2, 5, 8)); model.train()
        opt.step(); opt.zero_grad(); s.step()
    assert model[1].lam_value == pytest.approx(s.lam_at(3)) == pytest.approx(47 / 50)


# ---------------------------------------------------------------- norms
def test_repbn_eval_formula_and_layouts():
    torch.manual_seed(0)
    m = RepBN(6).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1); m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 1.5); m.bn.bias.uniform_(-1, 1); m.alpha.fill_(0.7)
    x = torch.randn(3, 5, 6)
    bn = m.bn
    want = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias + 0.7 * x
    assert_close("repbn tokens", want, m(x), 1e-6)
    mc = RepBN(6, layout="channels").eval()
    mc.load_state_dict(m.state_dict())
    xc = x.reshape(3, 5, 6, 1).permute(0, 2, 1, 3)  # [B, C, H, W]
    assert_close("repbn channels", m(x), mc(xc).permute(0, 2, 1, 3).reshape(3, 5, 6), 1e-6)


def test_repbn_training_statistics_over_all_tokens():
    m = RepBN(4).train()
    x = torch.randn(2, 7, 4) * 3 + 1
    y = m(x)
    flat = x.reshape(-1, 4)
    want = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5) + flat
    assert_close("repbn train", want.reshape(x.shape), y, 1e-5)
    assert_close("running mean", 0.1 * flat.mean(0), m.bn.running_mean, 1e-5)


@pytest.mark.parametrize("cls", [RepBN, PRepBN])
def test_gradcheck_float64(cls):
    torch.manual_seed(0)
    m = cls(3).double().train()
    if isinstance(m, PRepBN):
        m.set_lambda(0.4)
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))


def test_masked_statistics_ignore_padding():
    torch.manual_seed(0)
    m = RepBN(4).train()
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    y = m(x, mask)
    x2 = x.clone()
    x2[~mask] = 1e4  # padding content must not change statistics of real tokens
    m2 = RepBN(4).train()
    y2 = m2(x2, mask)
    assert_close("masked real tokens", y[mask], y2[mask], 1e-6)
    valid = x[mask]
    assert_close("masked running mean", 0.1 * valid.mean(0), m.bn.running_mean, 1e-6)


def test_prepbn_phases():
    torch.manual_seed(0)
    m = PRepBN(8).train()
    x = torch.randn(4, 3, 8)
    m.set_lambda(1.0)
    assert_close("warm-up = LN", m.ln(x), m(x), 1e-6)
    assert int(m.repbn.bn.num_batches_tracked) == 0  # BN untouched during warm-up
    m.set_lambda(0.25)
    ref = copy.deepcopy(m)
    y = m(x)
    assert_close("mix", 0.25 * ref.ln(x) + 0.75 * ref.repbn(x), y, 1e-6)
    m.set_lambda(0.0)
    calls = []
    m.ln.register_forward_hook(lambda *a: calls.append(1))
    m(x)
    assert not calls, "LN must not be computed once lam == 0"
    m.eval()
    m.set_lambda(1.0)
    assert_close("eval = RepBN", m.repbn(x), m(x), 0)
    assert slab.set_prepbn_lambda(nn.Sequential(PRepBN(2), PRepBN(2)), 0.3) == 2
    with pytest.raises(ValueError):
        m.set_lambda(1.5)


def test_single_value_per_channel_error():
    m = RepBN(4).train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        m(torch.randn(1, 1, 4))
    with pytest.raises(ValueError, match="expects"):
        m(torch.randn(2, 3, 5))


def test_get_norm_layer_choices():
    assert isinstance(get_norm_layer("ln")(4), nn.LayerNorm)
    assert type(get_norm_layer("bn")(4)) is TokenBatchNorm
    assert isinstance(get_norm_layer("repbn")(4), RepBN)
    assert isinstance(get_norm_layer("prepbn")(4), PRepBN)
    assert isinstance(get_norm_layer("none")(4), nn.Identity)
    with pytest.raises(ValueError, match="unknown norm"):
        get_norm_layer("layernorm")


# ---------------------------------------------------------------- SLA
SIZES = [  # (B, H, N, D, grid)
    pytest.param(2, 1, 1, 7, (1, 1), id="N1-one-head-d7"),
    pytest.param(1, 3, 15, 7, (3, 5), id="nonsquare-3x5"),
    pytest.param(2, 2, 63, 32, (7, 9), id="N63"),
    pytest.param(1, 3, 500, 16, (20, 25), id="N500"),
]


@pytest.mark.parametrize("b,h,n,d,grid", SIZES)
def test_linear_attention_fast_vs_reference(b, h, n, d, grid):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    ref = linear_attention_reference(q, k, v)
    out = linear_attention(q, k, v)
    assert_close("out", ref, out, 1e-5)
    g = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, (q, k, v), g)
    go = torch.autograd.grad(out, (q, k, v), g)
    for name, a, c in zip("qkv", gr, go):
        assert_close(f"grad {name}", a, c, 1e-4, atol=1e-6)


@pytest.mark.parametrize("b,h,n,d,grid", SIZES)
def test_sla_module_fast_vs_reference(b, h, n, d, grid):
    torch.manual_seed(0)
    fast = SimplifiedLinearAttention(h * d, h, grid_size=(4, 4), kernel_size=5)
    ref = copy.deepcopy(fast)
    ref.impl = "reference"
    x = torch.randn(b, n, h * d, requires_grad=True)
    y1, y2 = fast(x, grid), ref(x, grid)
    assert_close("sla module", y2, y1, 1e-5)
    g = torch.randn_like(y1)
    (g1,) = torch.autograd.grad(y1, x, g)
    (g2,) = torch.autograd.grad(y2, x, g)
    assert_close("sla module grad", g2, g1, 1e-4)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_dwc_on_tokens_is_one_shared_conv_per_head(bias):
    """The token-layout DWC against the plain per-head form: each head's ``d`` channels as an image, one conv
    shared by the heads; on a strided slice of a fused qkv, a non-square grid and an even batch."""
    torch.manual_seed(0)
    b, h, d, grid = 2, 3, 7, (3, 5)
    conv = nn.Conv2d(d, d, 5, padding=2, groups=d, bias=bias)
    v = torch.randn(b, grid[0] * grid[1], 3 * h * d)[..., 2 * h * d:]  # strided along N, like qkv.chunk
    got = dwc_on_tokens(v, grid, conv.weight, conv.bias, h)
    heads = v.reshape(b, grid[0], grid[1], h, d)
    want = torch.stack([conv(heads[..., i, :].permute(0, 3, 1, 2)).permute(0, 2, 3, 1) for i in range(h)], dim=3)
    assert got.shape == v.shape and got.is_contiguous()
    assert_close("dwc", want.reshape(v.shape), got, 1e-6)


def test_sla_normaliser_float32_under_autocast():
    q, k, v = (torch.randn(1, 2, 256, 16) * 50 for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_sla_positional_encoding_resized_for_other_grids():
    m = SimplifiedLinearAttention(8, 2, grid_size=(4, 4))
    assert m(torch.randn(2, 6 * 3, 8), (6, 3)).shape == (2, 18, 8)
    with pytest.raises(ValueError, match="tokens"):
        m(torch.randn(2, 10, 8), (3, 3))


def test_one_parser_of_attn_words_and_stage_letters():
    assert parse_attn("sla", 3) == ["sla"] * 3 and parse_attn("softmax", 1) == ["softmax"]
    assert parse_attn("llSs", 4) == ["sla", "sla", "softmax", "softmax"]
    assert attn_letters(parse_attn("LSLS", 4)) == "LSLS"
    for bad in ("LLX", "LLL", "linear", None):
        with pytest.raises(ValueError, match="one per stage"):
            parse_attn(bad, 2 if bad == "LLL" else 3)
    with pytest.raises(ValueError, match="form"):
        get_attn_layer("sla", "diagonal")


def test_linear_attention_shape_errors():
    with pytest.raises(ValueError, match=r"\[B, heads, N, head_dim\]"):
        linear_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
