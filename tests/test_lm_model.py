"""SLAB-LLaMA on tiny configs: conversion from LLaMA, fusion, save/load, generation, causality, bad input."""
import copy

import pytest
import torch
from conftest import assert_close, randomize_bn_stats
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import slab
from slab.layers.norm import PRepBN, RepBN, set_prepbn_lambda
from slab.lm import SlabLlamaConfig, SlabLlamaForCausalLM, SlabLlamaModel
from slab.lm.causality import future_leak
from slab.reparam import NotFoldableError, remaining_norms

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=48, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(norm="prepbn", tie=True, **kw) -> SlabLlamaForCausalLM:
    return SlabLlamaForCausalLM(SlabLlamaConfig(**{**TINY, **kw}, norm=norm, tie_word_embeddings=tie))


def trained_like(norm="prepbn", **kw) -> SlabLlamaForCausalLM:
    """A model whose BN branches are non-trivial (random statistics, affine, alpha), in eval mode."""
    return randomize_bn_stats(tiny(norm, **kw)).eval()


def ids(b=3, t=12, seed=0):
    return torch.randint(3, TINY["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def test_config_validates_and_auto_classes_are_registered():
    with pytest.raises(ValueError, match="norm must be one of"):
        SlabLlamaConfig(**TINY, norm="layernorm")
    with pytest.raises(ValueError, match="bn_stats"):
        SlabLlamaConfig(**TINY, bn_stats="future")
    cfg = AutoConfig.for_model("slab_llama", **TINY)
    assert isinstance(cfg, SlabLlamaConfig) and cfg.norm == "prepbn"
    assert isinstance(AutoModelForCausalLM.from_config(cfg), SlabLlamaForCausalLM)
    assert isinstance(AutoModel.from_config(cfg), SlabLlamaModel)


def test_lm_initialisation_of_repbn_branch():
    m = tiny("prepbn")
    norms = [x for x in m.modules() if isinstance(x, RepBN)]
    assert len(norms) == 2 * TINY["num_hidden_layers"] + 1
    for n in norms:
        assert n.alpha.item() == 0 and not n.bn.weight.any() and not n.bn.bias.any()
    assert all(x.lam_value == 1.0 for x in m.modules() if isinstance(x, PRepBN))
    # keys are LLaMA's
    keys = set(m.state_dict())
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.input_layernorm.ln.weight", "model.layers.1.post_attention_layernorm.repbn.alpha",
              "model.norm.repbn.bn.running_var"):
        assert k in keys


@pytest.mark.parametrize("tie", [True, False])
def test_from_llama_rmsnorm_and_prepbn_match_llama(tie):
    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie)).eval()
    x = ids()
    ref = llama(x).logits
    rms = SlabLlamaForCausalLM.from_llama(llama, norm="rmsnorm")
    assert not rms.training
    assert_close("rmsnorm", ref, rms(x).logits, 1e-5)
    assert (rms.lm_head.weight is rms.model.embed_tokens.weight) == tie
    prep = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn").train()  # lam = 1: start of training
    assert_close("prepbn lam=1", ref, prep(x).logits, 1e-5)
    # weights are copied, not shared
    assert prep.model.embed_tokens.weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()
    assert_close("to_llama", ref, rms.to_llama().eval()(x).logits, 1e-6)
    with pytest.raises(ValueError, match="from_llama supports"):
        SlabLlamaForCausalLM.from_llama(llama, norm="none")


def test_fuse_folds_every_norm_and_matches(tmp_path):
    m = trained_like("prepbn")
    x = ids()
    ref = m(x).logits
    fused = slab.fuse(m)
    assert m.config.norm == "prepbn"  # input untouched
    assert fused.config.norm == "none" and fused.config.folded_bias and not fused.config.tie_word_embeddings
    assert fused.lm_head.weight is not fused.model.embed_tokens.weight and fused.lm_head.bias is not None
    assert not remaining_norms(fused)
    assert not any(isinstance(mod, (RepBN, PRepBN)) for mod in fused.modules())
    assert_close("fused", ref, fused(x).logits, 1e-5)
    again = slab.fuse(fused)  # fusing twice is harmless
    assert_close("fused twice", ref, again(x).logits, 1e-5)
    fused.save_pretrained(tmp_path / "fused")
    assert (tmp_path / "fused" / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    assert isinstance(loaded, SlabLlamaForCausalLM) and loaded.config.norm == "none"
    assert_close("fused loaded", fused(x).logits, loaded(x).logits, 1e-7)
    prompt = x[:, :4]
    g_ref = m.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(g_ref, fused.generate(prompt, max_new_tokens=10, do_sample=False))
    assert torch.equal(g_ref, loaded.generate(prompt, max_new_tokens=10, do_sample=False))


def test_fuse_untied_and_repbn():
    m = trained_like("repbn", tie=False)
    x = ids()
    assert_close("repbn fused", m(x).logits, slab.fuse(m)(x).logits, 1e-5)


def test_rmsnorm_is_not_foldable():
    with pytest.raises(NotFoldableError, match="cannot be"):
        slab.fuse(tiny("rmsnorm").eval())


def test_save_load_unfused_keeps_statistics(tmp_path):
    m = trained_like("prepbn")
    set_prepbn_lambda(m, 0.25)
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = ids()
    assert_close("unfused loaded", m(x).logits, loaded(x).logits, 1e-7)
    assert all(x.lam_value == 1.0 for x in loaded.modules() if isinstance(x, PRepBN))  # lam is not a weight


@pytest.mark.parametrize("norm", ["rmsnorm", "prepbn", "none"])
def test_generate_with_and_without_cache(norm):
    m = trained_like(norm)
    prompt = ids(2, 5)
    a = m.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    b = m.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert a.shape == (2, 17) and torch.equal(a, b)


def test_padded_batch_matches_unpadded_in_eval():
    m = trained_like("prepbn")
    x = ids(2, 10)
    alone = m(x[:1, :6]).logits
    padded = x.clone()
    padded[0, 6:] = 0
    mask = torch.ones_like(padded)
    mask[0, 6:] = 0
    out = m(padded, attention_mask=mask).logits
    assert_close("right padding", alone, out[:1, :6], 1e-5)


def test_padding_never_enters_training_statistics():
    m = tiny("repbn", bn_stats="batch")
    randomize_bn_stats(m).train()
    x = ids(3, 10)
    mask = torch.ones_like(x)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    other = x.clone()
    other[mask == 0] = 5
    a = m(x, attention_mask=mask).logits
    b = m(other, attention_mask=mask).logits
    real = mask.bool()
    assert_close("real tokens", a[real], b[real], 1e-6)


def test_eval_is_causal():
    for model in (trained_like("prepbn"), slab.fuse(trained_like("prepbn"))):
        assert future_leak(model, ids(4, 16), position=7, training=False) == 0.0


def test_training_leak_is_measured_and_removed():
    """Batch statistics leak future tokens into earlier positions in training; causal/running do not."""
    x = ids(4, 16)
    leaks = {}
    for stats in ("batch", "causal", "running"):
        m = randomize_bn_stats(tiny("prepbn", bn_stats=stats))
        set_prepbn_lambda(m, 0.0)
        leaks[stats] = future_leak(m, x, position=7, training=True)
    assert leaks["batch"] > 1e-4, leaks
    assert leaks["causal"] <= 1e-6 and leaks["running"] <= 1e-6, leaks


def test_causal_statistics_match_batch_statistics_at_last_position():
    from slab.lm.norm import CausalRepBN
    torch.manual_seed(0)
    x = torch.randn(3, 9, 8) * 2 + 1
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    batch = CausalRepBN(8, stats="batch").train()
    causal = CausalRepBN(8, stats="causal").train()
    with torch.no_grad():
        for n in (batch, causal):
            n.bn.weight.fill_(1.0)
    a, b = batch(x, mask), causal(x, mask)
    assert_close("last position", a[:, -1], b[:, -1], 1e-5)
    assert_close("running mean", batch.bn.running_mean, causal.bn.running_mean, 1e-6)
    assert_close("running var", batch.bn.running_var, causal.bn.running_var, 1e-6)


def test_causal_prior_pools_the_prefix_with_the_running_statistics():
    """Position t's statistics are those of its prefix tokens pooled with ``causal_prior`` pseudo-tokens of the
    running mean and variance: 0 gives the plain prefix statistics, a huge prior the running statistics."""
    from slab.lm.norm import CausalRepBN
    torch.manual_seed(0)
    x = torch.randn(3, 9, 8) * 2 + 1
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False

    def out(prior=0.0, stats="causal"):
        n = CausalRepBN(8, stats=stats, causal_prior=prior).train()
        with torch.no_grad():
            n.bn.weight.fill_(1.0)
            n.bn.running_mean.copy_(torch.linspace(-1, 1, 8))
            n.bn.running_var.copy_(torch.linspace(0.5, 3, 8))
        return n, n(x, mask)

    norm, y = out(prior=10.0)
    rm, rv, t = torch.linspace(-1, 1, 8), torch.linspace(0.5, 3, 8), 4
    prefix = x[:, : t + 1][mask[:, : t + 1]]                                   # [n, C]
    n = prefix.shape[0]
    mean = (prefix.sum(0) + 10.0 * rm) / (n + 10.0)
    second = ((prefix - mean).pow(2).sum(0) + 10.0 * (rv + (rm - mean).pow(2))) / (n + 10.0)  # pooled
    expected = (x[:, t] - mean) / torch.sqrt(second + norm.bn.eps)
    assert_close("pooled statistics at position 4", expected, y[:, t], 1e-5)
    assert (out(prior=0.0)[1] - out(prior=10.0)[1]).abs().max() > 1e-2
    assert_close("a huge prior is the running statistics", out(stats="running")[1], out(prior=1e9)[1], 1e-4)
    with pytest.raises(ValueError, match="causal_prior"):
        CausalRepBN(8, stats="causal", causal_prior=-1.0)
    with pytest.raises(ValueError, match="bn_causal_prior"):
        SlabLlamaConfig(bn_causal_prior=-2.0)


def test_bad_input(caplog):
    m = trained_like("prepbn")
    # RoPE has no hard limit and LLaMA's forward does not refuse (RoPE scaling relies on it): a warning, once
    with caplog.at_level("WARNING"):
        assert torch.isfinite(m(ids(1, TINY["max_position_embeddings"] + 3)).logits).all()
    assert "beyond max_position_embeddings=48" in caplog.text
    with pytest.raises(ValueError, match="empty batch"):
        m(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        m(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be in"):
        m(torch.full((1, 4), TINY["vocab_size"]))
    for dtype in (torch.float64, torch.float32, torch.uint8, torch.bool):
        with pytest.raises(ValueError, match="integer token ids"):
            m(ids(1, 4).to(dtype))
    with pytest.raises(ValueError, match="too long"):
        m.generate(ids(1, 40), max_new_tokens=20, do_sample=False)
    # a row that is all padding: finite outputs, in eval and in training
    x = ids(2, 8)
    mask = torch.ones_like(x)
    mask[1] = 0
    assert torch.isfinite(m(x, attention_mask=mask).logits).all()
    set_prepbn_lambda(m, 0.5)
    m.train()
    out = m(x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="non-padding token"):
        m(x, attention_mask=torch.zeros_like(x))


def test_schedule_drives_lambda_of_every_norm():
    m = tiny("prepbn")
    sched = slab.PRepBNSchedule(m, total_steps=10, warmup_steps=2, transition_steps=4)
    lams = [sched.step() for _ in range(8)]
    assert lams == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert all(x.lam_value == sched.lam for x in m.modules() if isinstance(x, PRepBN))


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0])
def test_every_parameter_gets_a_gradient_and_the_inactive_branch_zero(lam):
    """At lam = 1 the RepBN branch is not computed, at lam = 0 the RMSNorm: their parameters still get gradients,
    of zero (DDP without find_unused_parameters, gradient checkpointing), and the output is that of the branch run."""
    m = tiny("prepbn", first_token_affine=True)
    randomize_bn_stats(m)
    set_prepbn_lambda(m, lam)
    m.train()
    x = ids(4, 10)
    m(x, labels=x).loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    for name, p in m.named_parameters():
        inactive = (lam == 1.0 and ".repbn." in name) or (lam == 0.0 and ".ln." in name)
        if inactive:
            assert not p.grad.any(), name
    grads = {n: p.grad.abs().sum().item() for n, p in m.named_parameters()}
    assert grads["model.norm.ln.weight"] > 0 if lam > 0 else grads["model.norm.repbn.alpha"] > 0


def test_outputs_from_transformers_hooks_and_tuple_return():
    m = trained_like("prepbn")
    m.set_attn_implementation("eager")  # sdpa returns no attention weights, in LLaMA as here
    x = ids(2, 9)
    out = m(x, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert out.hidden_states[-1].shape == (2, 9, TINY["hidden_size"])
    assert [a.shape for a in out.attentions] == [(2, TINY["num_attention_heads"], 9, 9)] * TINY["num_hidden_layers"]
    logits = m(x, return_dict=False)[0]
    assert_close("tuple logits", out.logits, logits, 0.0)
    # shift_labels (already aligned targets, as sequence-parallel trainers pass them) replace labels in the loss
    shifted = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
    assert_close("shift_labels loss", m(x, labels=x).loss, m(x, labels=x, shift_labels=shifted).loss, 1e-6)


def test_vocabulary_check_follows_resized_embeddings():
    m = trained_like("prepbn")
    m.resize_token_embeddings(TINY["vocab_size"] + 7)
    assert m(torch.full((1, 4), TINY["vocab_size"] + 6)).logits.shape[-1] == TINY["vocab_size"] + 7
    with pytest.raises(ValueError, match="input_ids must be in"):
        m(torch.full((1, 4), TINY["vocab_size"] + 7))


def test_eval_forward_compiles_without_graph_breaks():
    """No data-dependent Python in the eval forward (what generate() compiles): fullgraph tracing succeeds."""
    m = trained_like("prepbn", first_token_affine=True)
    x = ids(2, 8)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    ref = m(x, attention_mask=mask, use_cache=False).logits
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    assert_close("compiled logits", ref, compiled(x, attention_mask=mask, use_cache=False).logits, 1e-6)


def test_padded_training_forward_with_causal_statistics_compiles_without_graph_breaks():
    """bn_stats='causal' in the transition, with padding: statistics and running updates from masked sums, with
    nothing read back to the host (a .item() or a boolean selection would break the graph)."""
    m = randomize_bn_stats(tiny("prepbn", bn_stats="causal", first_token_affine=True))
    set_prepbn_lambda(m, 0.5)
    m.train()
    x = ids(3, 8)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    labels = x.masked_fill(mask == 0, -100)
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    out = compiled(x, attention_mask=mask, labels=labels, use_cache=False)
    ref = eager(x, attention_mask=mask, labels=labels, use_cache=False)
    assert_close("compiled training loss", ref.loss, out.loss, 1e-6)
    assert_close("running mean", eager.model.norm.repbn.bn.running_mean, m.model.norm.repbn.bn.running_mean, 1e-6)
