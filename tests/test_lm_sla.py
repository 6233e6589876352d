"""Causal SLA in SLAB-LLaMA: the op against its O(T^2) reference, causality, padding, the constant-size cache,
generate() with and without it, hybrid softmax/SLA models, PRepBN fusion, save/load and bad input."""
import pytest
import torch
from conftest import assert_close, randomize_bn_stats
from transformers import AutoModelForCausalLM, DynamicCache

import slab
from slab.layers.norm import set_prepbn_lambda
from slab.lm import SlabLlamaCache, SlabLlamaConfig, SlabLlamaForCausalLM
from slab.lm.sla import SlabLlamaSLAttention, causal_depthwise_conv, causal_sla_chunked, causal_sla_reference
from slab.lm.sla_cache import SLAStateLayer, cache_bytes

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=96, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            sla_chunk_size=8)


def tiny(attn_type="sla", norm="rmsnorm", **kw) -> SlabLlamaForCausalLM:
    torch.manual_seed(0)
    model = SlabLlamaForCausalLM(SlabLlamaConfig(**{**TINY, **kw}, norm=norm, attn_type=attn_type))
    with torch.no_grad():  # the default init makes the conv almost zero: give it weight so that tests see it
        for m in model.modules():
            if isinstance(m, SlabLlamaSLAttention):
                m.dwc.weight.normal_(0, 0.5)
                m.dwc.bias.normal_(0, 0.1)
    return model


def ids(b=2, t=12, seed=0):
    return torch.randint(3, TINY["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def qkv(b, h, t, d, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, d, generator=g).relu().requires_grad_() for _ in range(2))
    return q, k, torch.randn(b, h, t, e, generator=g).requires_grad_()


# ----------------------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("t,d,chunk", [(1, 8, 4), (13, 7, 4), (16, 8, 16), (37, 7, 64), (50, 5, 1)],
                         ids=["T1", "T13-d7-not-multiple", "T16-one-chunk", "T37-d7-chunk-above-T", "T50-recurrent"])
def test_chunked_matches_reference_outputs_and_gradients(t, d, chunk):
    q, k, v = qkv(2, 3, t, d, 6)
    ref = causal_sla_reference(q, k, v)
    out, state, key_sum = causal_sla_chunked(q, k, v, chunk_size=chunk)
    assert_close("output", ref, out, 1e-5)
    assert_close("state", (k.transpose(-1, -2) @ v), state, 1e-5)
    assert_close("key sum", k.sum(2), key_sum, 1e-5)
    cotangent = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * cotangent).sum(), (q, k, v))
    grads = torch.autograd.grad((out * cotangent).sum(), (q, k, v))
    for name, g_ref, g in zip("qkv", grads_ref, grads):
        assert_close(f"d{name}", g_ref, g, 1e-5)


def test_chunked_continues_from_a_state_as_one_sequence():
    q, k, v = qkv(1, 2, 29, 7, 7)
    ref = causal_sla_reference(q, k, v)
    first, state, key_sum = causal_sla_chunked(q[:, :, :11], k[:, :, :11], v[:, :, :11], chunk_size=4)
    pieces = [first]
    for i in range(11, 29):  # one token at a time, as in decoding
        out, state, key_sum = causal_sla_chunked(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], state, key_sum)
        pieces.append(out)
    assert_close("prefill + decode", ref, torch.cat(pieces, 2), 1e-5)


def test_output_at_t_sees_positions_up_to_t_only():
    q, k, v = qkv(1, 2, 20, 4, 4)
    out = causal_sla_chunked(q, k, v, chunk_size=8)[0]
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 9:] = torch.rand_like(k2[:, :, 9:]) * 5
    v2[:, :, 9:] = torch.randn_like(v2[:, :, 9:]) * 5
    out2 = causal_sla_chunked(q, k2, v2, chunk_size=8)[0]
    assert torch.equal(out[:, :, :9], out2[:, :, :9]) and not torch.allclose(out[:, :, 9:], out2[:, :, 9:])


def test_normaliser_is_float32_under_autocast():
    q, k, v = (x.detach().to(torch.bfloat16) * 100 for x in qkv(1, 1, 300, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_sla_chunked(q, k, v)[0]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_causal_conv_with_tail_equals_the_whole_sequence():
    conv = torch.nn.Conv1d(7, 7, 4, groups=7)
    v = torch.randn(2, 3, 10, 7)
    whole, _ = causal_depthwise_conv(v, conv)
    head, tail = causal_depthwise_conv(v[:, :, :2], conv)  # shorter than the kernel: the tail keeps zeros
    rest = []
    for i in range(2, 10):
        out, tail = causal_depthwise_conv(v[:, :, i:i + 1], conv, tail)
        rest.append(out)
    assert tail.shape == (2, 3, 3, 7)
    assert_close("conv in pieces", whole, torch.cat([head, *rest], 2), 1e-6)


# ------------------------------------------------------------------------------------------------ the model
def test_attn_type_validation_and_layer_letters():
    assert SlabLlamaConfig(num_hidden_layers=3).layer_attn_types == "SSS"
    assert SlabLlamaConfig(num_hidden_layers=3, attn_type="sla").layer_attn_types == "LLL"
    assert SlabLlamaConfig(num_hidden_layers=3, attn_type="LSL").layer_attn_types == "LSL"
    # the grammar of the vision models' attn= (one parser): letters in any case
    assert SlabLlamaConfig(num_hidden_layers=4, attn_type="slsl").layer_attn_types == "SLSL"
    for bad in ("SLS", "SLSLX", "SLXL", "linear", "", None):
        with pytest.raises(ValueError, match="attn_type"):
            SlabLlamaConfig(num_hidden_layers=4, attn_type=bad)
    for field, value in (("sla_position", "learned"), ("sla_conv_kernel", 0), ("sla_chunk_size", 0)):
        with pytest.raises(ValueError, match=field):
            SlabLlamaConfig(**{field: value})
    kinds = [type(layer.self_attn).__name__ for layer in tiny("SLLS").model.layers]
    assert kinds == ["LlamaAttention", "SlabLlamaSLAttention", "SlabLlamaSLAttention", "LlamaAttention"]


@pytest.mark.parametrize("attn_type", ["sla", "LSSL"])
def test_model_is_causal_in_training(attn_type):
    m = tiny(attn_type).train()
    x = ids(2, 20)
    y = x.clone()
    y[:, 11:] = ids(2, 9, seed=5)
    a, b = m(x).logits, m(y).logits
    assert torch.equal(a[:, :11], b[:, :11]) and not torch.allclose(a[:, 11:], b[:, 11:])


@pytest.mark.parametrize("attn_type", ["sla", "SLSL"])
def test_left_and_right_padding_match_unpadded(attn_type):
    m = tiny(attn_type).eval()
    x = ids(1, 9)
    alone = m(x).logits
    pad = torch.zeros(1, 4, dtype=torch.long)
    left = torch.cat([pad, x], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], 1).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    assert_close("left padding", alone, m(left, attention_mask=mask, position_ids=positions).logits[:, 4:], 1e-5)
    right = torch.cat([x, pad], 1)
    assert_close("right padding", alone, m(right, attention_mask=mask.flip(1)).logits[:, :9], 1e-5)


@pytest.mark.parametrize("attn_type", ["sla", "SLSL", "LLLS"])
def test_cached_decoding_equals_the_full_forward_and_generate_agrees(attn_type):
    m = tiny(attn_type).eval()
    x = ids(2, 21)
    full = m(x).logits
    out = m(x[:, :13], use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, SlabLlamaCache) and cache.get_seq_length() == 13
    steps = [out.logits]
    for i in range(13, 21):
        out = m(x[:, i:i + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    assert_close("prefill + decode", full, torch.cat(steps, 1), 1e-5)
    prompt = x[:, :5]
    mask = torch.ones_like(prompt)
    cached = m.generate(prompt, attention_mask=mask, max_new_tokens=15, do_sample=False)
    uncached = m.generate(prompt, attention_mask=mask, max_new_tokens=15, do_sample=False, use_cache=False)
    assert cached.shape[1] > 15 and torch.equal(cached, uncached)  # may stop early at EOS, both alike


def test_sla_state_is_constant_in_the_context_and_only_kv_grows_in_a_hybrid():
    def size(model, length):
        return cache_bytes(model(ids(1, length), use_cache=True).past_key_values)

    sla, hybrid = tiny("sla").eval(), tiny("SLSL").eval()
    assert size(sla, 8) == size(sla, 80) > 0
    per_layer = 4 * 4 * (8 * 8 + 8 + 3 * 8)  # fp32 x (B=1) x (H=4) x (d^2 + d + (kernel - 1) d), d = 8
    assert size(sla, 8) == 4 * per_layer
    kv_per_token = 2 * 2 * 2 * 8 * 4  # softmax layers x (k, v) x kv heads x d x fp32
    assert size(hybrid, 80) - size(hybrid, 8) == 72 * kv_per_token
    layers = tiny("SLSL").eval()(ids(1, 8), use_cache=True).past_key_values.layers
    assert [type(layer).__name__ for layer in layers] == ["DynamicLayer", "SLAStateLayer"] * 2


def test_save_load_with_auto_class(tmp_path):
    m = tiny("LSSL").eval()
    x = ids()
    m.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, SlabLlamaForCausalLM) and loaded.config.attn_type == "LSSL"
    assert loaded.config.sla_conv_kernel == 4 and loaded.config.sla_position == "rope"
    assert_close("loaded", m(x).logits, loaded(x).logits, 1e-7)


def test_every_sla_parameter_gets_a_gradient():
    m = tiny("SLSL").train()
    m(ids(), labels=ids()).loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert m.model.layers[1].self_attn.dwc.weight.grad.abs().sum() > 0


def test_prepbn_sla_trains_with_the_schedule_and_fuses_to_identical_outputs():
    m = tiny("SLSL", norm="prepbn").train()
    schedule = slab.PRepBNSchedule(m, total_steps=6, warmup_steps=0, transition_fraction=0.5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for step in range(6):
        x = ids(4, 16, seed=step)
        m(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    set_prepbn_lambda(m, 0.0)
    randomize_bn_stats(m)
    m.eval()
    x = ids(2, 16, seed=9)
    fused = slab.fuse(m)
    assert fused.config.norm == "none" and fused.config.attn_type == "SLSL"
    assert_close("fused logits", m(x).logits, fused(x).logits, 1e-5)
    prompt = x[:, :4]
    assert torch.equal(m.generate(prompt, max_new_tokens=8, do_sample=False),
                       fused.generate(prompt, max_new_tokens=8, do_sample=False))


def test_bad_input_is_a_clear_error():
    m = tiny("SLSL").eval()
    x = ids()
    with pytest.raises(ValueError, match="SLA layers .* not a KV cache"):
        m(x, past_key_values=DynamicCache(), use_cache=True)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        m.generate(x, max_new_tokens=2, do_sample=False, cache_implementation="static")
    with pytest.raises(ValueError, match="2D padding attention_mask"):
        m(x, attention_mask=torch.ones(2, 1, 12, 12))
    wrong = SlabLlamaCache(SlabLlamaConfig(**{**TINY, "attn_type": "LSLS"}))
    with pytest.raises(ValueError, match="built for layers 'LSLS'"):
        m(x, past_key_values=wrong, use_cache=True)
    wrong.layer_attn_types = m.config.layer_attn_types  # a hand-made mismatch: the layer itself refuses
    with pytest.raises(ValueError, match="update\\(keys, values\\) was called on an SLA layer"):
        m(x, past_key_values=wrong, use_cache=True)
    with pytest.raises(ValueError, match="cannot be cropped"):
        SLAStateLayer().crop(1)
    with pytest.raises(ValueError, match="softmax-attention"):
        m.to_llama()


def test_lm_bench_contexts_cli(capsys):
    from slab.cli import main
    assert main(["lm-bench", "--size", "tiny", "--contexts", "4,12", "--attn-types", "softmax,sla,SLSL",
                 "--new-tokens", "2", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "hybrid SLSL" in out and "decode_12_over_4" in out and "softmax_over_this_at_12" in out
    assert main(["lm-bench", "--contexts", "8", "--attn-types", "SLS"]) == 2  # 3 letters for 4 layers


def test_train_lm_cli_sla_and_bad_attn_type(tmp_path, capsys):
    from slab.cli import main
    text = tmp_path / "quotes"
    text.write_text("\n%\n".join(f"Entry {i}: the quick brown fox jumps over the lazy dog {i % 7}." for i in range(200)))
    base = ["train-lm", "--text", str(text), "--steps", "2", "--batch-size", "4", "--hidden", "32", "--layers", "2",
            "--heads", "2", "--vocab-size", "300", "--seq-len", "16", "--eval-blocks", "4", "--recalibrate-batches",
            "1", "--no-progress", "--warmup", "1", "--prepbn-warmup", "1"]
    assert main(base + ["--output", str(tmp_path / "bad"), "--attn-type", "SLS"]) == 2
    assert "attn_type" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(base + ["--output", str(tmp_path / "run"), "--attn-type", "LS"]) == 0
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "fused")
    assert fused.config.attn_type == "LS" and fused.config.norm == "none"
