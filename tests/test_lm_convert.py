"""Converting a pretrained LLaMA: least-squares calibration (first-token map included), distillation,
`slab convert-lm --model DIR|GGUF` round trips and its bad-input errors."""
import json
from functools import partial

import pytest
import torch
from conftest import assert_close
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import slab
from slab.cli import main
from slab.layers.norm import PRepBN, RMSNorm
from slab.lm import SlabLlamaForCausalLM, data
from slab.lm.convert import (LeastSquares, set_fitted_map, calibrate_repbn, distillation_loss, residual_bounds,
                              residual_guard)
from slab.lm.norm import CausalRepBN, FirstTokenAffine
from slab.lm.train import TrainLMConfig, train_lm

TEXT = "\n%\n".join(f"Entry {i}: the quick brown fox jumps over the lazy dog number {i % 7}, and the cat sleeps "
                    f"while {i % 5} birds sing." for i in range(400))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    (d / "quotes").write_text(TEXT)
    ds = data.load_text(d, held_out=0.1, cache_dir=str(d / "cache"))
    tok = data.train_tokenizer(ds["train"]["text"], vocab_size=300)
    return d, ds, tok


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()


def llama_with_spread_token_scales(tok):
    """A tiny LLaMA whose tokens have very different scales, so that no per-channel map replaces its RMSNorms."""
    llama = tiny_llama(tok)
    with torch.no_grad():
        llama.model.embed_tokens.weight.mul_(torch.exp(torch.randn(len(tok), 1, generator=torch.Generator().manual_seed(1))))
    return llama


def test_least_squares_fit_is_exact_where_rmsnorm_is_linear():
    torch.manual_seed(0)
    norm = PRepBN(16, ln_layer=RMSNorm, bn_layer=partial(CausalRepBN, first_token_affine=True))
    with torch.no_grad():
        norm.ln.weight.copy_(torch.rand(16) + 0.5)
    # every token at one RMS (3), the first tokens at another (300): RMSNorm is linear on each group
    x = torch.randn(6, 10, 16)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * 3
    x[:, 0] *= 100
    y = norm.ln(x).detach()
    first = torch.zeros(6, 10, dtype=torch.bool)
    first[:, 0] = True
    fits = (LeastSquares(), LeastSquares())
    fits[0].add(x[~first], y[~first])
    fits[1].add(x[first], y[first])
    with torch.no_grad():
        set_fitted_map(norm, *fits)
    norm.eval()
    assert_close("fitted RepBN with first-token map", y, norm(x, None, first=first), 1e-4)
    shared = norm.repbn.bn(x.reshape(-1, 16)).reshape(x.shape)
    assert (shared[:, 0] - y[:, 0]).abs().max() > 1.0  # the shared map alone cannot serve the first token


def test_calibration_starts_close_to_the_original_and_fuses_exactly(corpus):
    _, ds, tok = corpus
    llama = tiny_llama(tok)
    ids = data.pack_tokens(tok, ds["train"]["text"], 24)[:16]
    zero = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", first_token_affine=True).eval()
    student = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", first_token_affine=True)
    report = calibrate_repbn(student, llama, [(ids[:8], None), (ids[8:], None)])
    assert len(report) == 2 * 2 + 1 and report[0]["name"] == "model.layers.0.input_layernorm"
    assert all(0 <= r["fit_error"] < 0.05 for r in report), report
    with torch.no_grad():
        ref = llama(input_ids=ids).logits
        kl_zero = float(distillation_loss(zero(input_ids=ids).logits, ref))
        out = student(input_ids=ids).logits
    kl_cal = float(distillation_loss(out, ref))
    assert kl_cal < 0.05 * kl_zero, (kl_cal, kl_zero)
    fused = slab.fuse(student)
    assert isinstance(fused.model.layers[0].input_layernorm, FirstTokenAffine)
    with torch.no_grad():
        assert_close("fused after calibration", out, fused(input_ids=ids).logits, 1e-4)
        mask = torch.ones_like(ids)
        mask[:3, :5] = 0  # left padding: the first real token is the one treated apart
        assert_close("left-padded rows", student(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                     fused(input_ids=ids, attention_mask=mask).logits[mask.bool()], 1e-4)


def _linear_io(model, ids, names):
    """``{name: (input, output)}`` of the named linear layers in one forward of ``model``."""
    seen, handles = {}, []
    for name in names:
        hook = (lambda n: lambda mod, args, out: seen.__setitem__(n, (args[0].detach(), out.detach())))(name)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def test_refitting_the_linear_layers_lowers_each_ones_error_and_fuses_exactly(corpus):
    _, ds, tok = corpus
    llama = llama_with_spread_token_scales(tok)
    blocks = data.pack_tokens(tok, ds["train"]["text"], 24)
    calib, probe = [(blocks[i: i + 8], None) for i in range(0, 64, 8)], blocks[64:80]
    refit = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", first_token_affine=True)
    report = calibrate_repbn(refit, llama, calib, refit_ridge=1e-4)
    assert len(report) == 2 * 2 + 1
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    ids = torch.cat([c for c, _ in calib])
    student, teacher = _linear_io(refit, ids, names), _linear_io(llama, ids, names)
    for name in names:  # on its own inputs, each refitted layer is closer to the original's outputs than before
        z, out = student[name]
        target = teacher[name][1]
        before = (z @ llama.get_submodule(name).weight.T - target).pow(2).sum()
        after = (out - target).pow(2).sum()
        assert after < before, (name, float(after), float(before))
    with torch.no_grad():
        assert_close("fused after refitting", refit(input_ids=probe).logits, slab.fuse(refit)(input_ids=probe).logits,
                     1e-4)
    with pytest.raises(ValueError, match="sequential"):
        calibrate_repbn(refit, llama, calib, sequential=False, refit_ridge=1e-3)
    with pytest.raises(ValueError, match="unknown groups"):
        calibrate_repbn(refit, llama, calib, refit_ridge=1e-3, refit=("qvk",))


def test_local_distillation_brings_each_layer_closer_to_the_original_and_fuses_exactly(corpus):
    _, ds, tok = corpus
    llama = llama_with_spread_token_scales(tok)
    blocks = data.pack_tokens(tok, ds["train"]["text"], 24)
    calib, probe = [(blocks[i: i + 8], None) for i in range(0, 32, 8)], blocks[64:80]

    def layer_errors(model):  # relative error of the residual stream after each decoder layer but the last
        with torch.no_grad():
            hs = model(input_ids=probe, output_hidden_states=True).hidden_states
            ht = llama(input_ids=probe, output_hidden_states=True).hidden_states
        return [float((a - b).norm() / b.norm()) for a, b in zip(hs[1:-1], ht[1:-1])]

    plain = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", first_token_affine=True)
    calibrate_repbn(plain, llama, calib)
    local = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", first_token_affine=True)
    calibrate_repbn(local, llama, calib, local_steps=48, local_lr=3e-3)
    before, after = layer_errors(plain), layer_errors(local)
    assert all(a < b for a, b in zip(after, before)), (after, before)  # held-out blocks, not the calibration's
    assert not local.training
    with torch.no_grad():
        assert_close("fused after local distillation", local(input_ids=probe).logits,
                     slab.fuse(local)(input_ids=probe).logits, 1e-4)
    with pytest.raises(ValueError, match="sequential"):
        calibrate_repbn(local, llama, calib, sequential=False, local_steps=2)


def test_refit_is_the_identity_where_every_norm_is_linear():
    from slab.lm.convert import RidgeRefit
    torch.manual_seed(0)
    w = torch.randn(5, 8)
    z = torch.randn(200, 8)
    fit = RidgeRefit()
    fit.add(z[:120], z[:120] @ w.T)
    fit.add(z[120:], z[120:] @ w.T)
    assert_close("exact targets give the same weight", w, fit.solve(torch.zeros_like(w), 0.0), 1e-6)
    assert_close("ridge towards the weight itself", w, fit.solve(w, 10.0), 1e-6)
    shrunk = fit.solve(torch.zeros_like(w), 10.0)
    assert shrunk.norm() < 0.5 * w.norm()  # a large ridge pulls towards w0 = 0


def test_distillation_lowers_the_converted_models_divergence(corpus, tmp_path):
    _, ds, tok = corpus
    llama = tiny_llama(tok)
    blocks = data.pack_tokens(tok, ds["train"]["text"], 16)
    student = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", bn_stats="running", first_token_affine=True)
    calibrate_repbn(student, llama, [(blocks[:8], None)])
    with torch.no_grad():  # a start away from the optimum: every BN map at 60 % of its calibrated scale
        for m in student.modules():
            if isinstance(m, CausalRepBN):
                m.bn.weight.mul_(0.6)
    probe = blocks[8:24]

    def kl():
        student.eval()
        with torch.no_grad():
            return float(distillation_loss(student(input_ids=probe).logits, llama(input_ids=probe).logits))

    before = kl()
    cfg = TrainLMConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=1, prepbn_warmup=0, prepbn_transition=0.0, weight_decay=0.0,
                        distill=True, save_every=100)
    res = train_lm(student, blocks, cfg, tmp_path / "run", progress=False, log=lambda *a: None, teacher=llama)
    assert res["lam"] == 0.0 and res["bad_steps"] == 0
    assert kl() < 0.8 * before
    with pytest.raises(ValueError, match="teacher"):
        train_lm(student, blocks, cfg, tmp_path / "run2", progress=False, log=lambda *a: None)


def _bn_branch_only(model):
    """lam = 0 in every PRepBN, as fine-tuning after calibration sets it (the BN branch alone, as in eval)."""
    for m in model.modules():
        if isinstance(m, PRepBN):
            m.set_lambda(0.0)


def test_frozen_statistics_train_the_eval_form_and_are_never_recalibrated(corpus):
    _, ds, tok = corpus
    llama = tiny_llama(tok)
    blocks = data.pack_tokens(tok, ds["train"]["text"], 16)
    student = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", bn_stats="frozen", first_token_affine=True)
    calibrate_repbn(student, llama, [(blocks[:8], None)])
    _bn_branch_only(student)
    bns = [m for m in student.modules() if isinstance(m, CausalRepBN)]
    stats = [(m.bn.running_mean.clone(), m.bn.running_var.clone()) for m in bns]
    probe = blocks[8:16]
    with torch.no_grad():
        eval_logits = student.eval()(input_ids=probe).logits
        train_logits = student.train()(input_ids=probe).logits  # training forward == the eval (folded) forward
    assert_close("frozen: train forward == eval forward", eval_logits, train_logits, 1e-5)
    from slab.lm.train import recalibrate_bn
    assert recalibrate_bn(student, [(blocks[16:24], None)]) == 0
    for m, (mean, var) in zip(bns, stats):  # neither the training forward nor recalibration moved them
        assert torch.equal(m.bn.running_mean, mean) and torch.equal(m.bn.running_var, var)
    running = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", bn_stats="running", first_token_affine=True)
    running.load_state_dict(student.state_dict())
    _bn_branch_only(running)
    with torch.no_grad():
        running.train()(input_ids=probe)
    moved = [m for m in running.modules() if isinstance(m, CausalRepBN)]
    assert not torch.equal(moved[0].bn.running_mean, stats[0][0])  # 'running' does update them (the contrast)


def test_residual_guard_clamps_each_layer_in_training_only(corpus):
    _, ds, tok = corpus
    llama = tiny_llama(tok)
    blocks = data.pack_tokens(tok, ds["train"]["text"], 16)
    bounds = residual_bounds(llama, [(blocks[:4], None)], factor=4.0)
    assert len(bounds) == len(llama.model.layers) and all(b > 0 for b in bounds)
    assert residual_bounds(llama, [(blocks[:4], None)], factor=2.0) == pytest.approx([b / 2 for b in bounds])
    student = SlabLlamaForCausalLM.from_llama(llama, norm="rmsnorm")
    probe = blocks[4:8]
    seen = []  # the largest |value| layer 1 receives: layer 0's output, clamped or not
    hook = student.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(float(a[0].abs().max())))
    with torch.no_grad():
        with residual_guard(student, [1e-3] * len(bounds)):  # so tight that every output is clamped
            student.eval()(input_ids=probe)
            student.train()(input_ids=probe)
        student.train()(input_ids=probe)  # the guard is gone once the block ends
    hook.remove()
    assert seen[0] > 1e-2 and seen[1] == pytest.approx(1e-3) and seen[2] == pytest.approx(seen[0])
    with pytest.raises(ValueError, match="bounds for"):
        with residual_guard(student, [1.0]):
            pass


def _save_llama_dir(tok, path):
    llama = tiny_llama(tok)
    llama.save_pretrained(path)
    tok.save_pretrained(path)
    return llama


def _convert_args(src, text, out, *extra):
    return ["convert-lm", "--model", str(src), "--text", str(text), "--output", str(out), "--steps", "3",
            "--seq-len", "16", "--batch-size", "4", "--calib-batches", "1", "--eval-blocks", "2",
            "--recalibrate-batches", "2", "--no-bench", "--no-progress", "--no-resume", *extra]


def test_convert_lm_from_a_save_pretrained_directory_round_trips(corpus, tmp_path):
    d, _, tok = corpus
    _save_llama_dir(tok, tmp_path / "llama")
    out = tmp_path / "out"
    assert main(_convert_args(tmp_path / "llama", d / "quotes", out)) == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("ppl_original", "ppl_calibrated", "ppl_converted", "ppl_fused", "samples_fused", "history"):
        assert key in res
    assert res["ppl_fused"] == pytest.approx(res["ppl_converted"], rel=1e-4)
    assert res["ppl_calibrated"] < 1.5 * res["ppl_original"]
    loaded = AutoModelForCausalLM.from_pretrained(out / "fused")
    assert loaded.config.norm == "none" and loaded.config.first_token_affine
    assert not any(isinstance(m, (PRepBN, CausalRepBN)) for m in loaded.modules())
    from slab.lm.train import perplexity
    ids = data.pack_tokens(tok, data.load_text(d / "quotes", seed=0)["test"]["text"], 32, max_blocks=2)
    assert perplexity(loaded, ids, batch_size=2) == pytest.approx(res["ppl_fused"], rel=1e-4)
    assert (out / "fused" / "tokenizer.json").is_file()


def _gguf(path, arch):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", ["not-llama-dir", "no-tokenizer", "gguf-not-llama", "not-gguf", "missing",
                                  "short-text", "warmup", "output-is-file", "frozen-zero", "guard"])
def test_convert_lm_bad_input_is_a_clear_error_and_writes_nothing(case, corpus, tmp_path, capsys):
    d, _, tok = corpus
    src, text, extra = tmp_path / "llama", d / "quotes", []
    out = tmp_path / "out"
    if case == "not-llama-dir":
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        want = "not a LLaMA-architecture"
    elif case == "no-tokenizer":
        tiny_llama(tok).save_pretrained(src)
        want = "no tokenizer"
    elif case == "gguf-not-llama":
        src = tmp_path / "m.gguf"
        _gguf(src, "gpt2")
        want = "not LLaMA"
    elif case == "not-gguf":
        src = tmp_path / "m.gguf"
        src.write_bytes(b"\x00garbage" * 10)
        want = "not a readable GGUF"
    elif case == "missing":
        src = tmp_path / "nowhere"
        want = "does not exist"
    elif case == "short-text":
        _save_llama_dir(tok, src)
        text = tmp_path / "short.txt"
        text.write_text("\n\n".join(f"Word {i}." for i in range(20)))
        want = "too short"
    elif case == "warmup":
        _save_llama_dir(tok, src)
        extra = ["--warmup", "5"]
        want = "never reach"
    elif case == "frozen-zero":
        _save_llama_dir(tok, src)
        extra = ["--bn-stats", "frozen", "--init", "zero"]
        want = "needs --init calibrate"
    elif case == "guard":
        _save_llama_dir(tok, src)
        extra = ["--residual-guard", "-1"]
        want = "--residual-guard must be >= 0"
    else:
        _save_llama_dir(tok, src)
        out.write_text("a file")
        want = "not a directory"
    assert main(_convert_args(src, text, out, *extra)) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err
    assert case == "output-is-file" or not out.exists()


def _trainer(model, blocks, out, steps, accum, callback):
    from transformers import Trainer, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return blocks.shape[0]

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=accum, learning_rate=1e-3, save_steps=3, save_strategy="steps",
                             logging_steps=100, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[callback])


def _trainer_model(corpus):
    from slab.lm import SlabLlamaConfig
    _, ds, tok = corpus
    torch.manual_seed(0)
    model = SlabLlamaForCausalLM(SlabLlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 max_position_embeddings=16, norm="prepbn"))
    return model, data.pack_tokens(tok, ds["train"]["text"], 16)


def test_prepbn_callback_drives_lam_from_the_optimizer_step_under_accumulation_and_resume(corpus, tmp_path):
    from slab.lm.callbacks import PRepBNCallback
    from slab.schedule import PRepBNSchedule
    model, blocks = _trainer_model(corpus)
    seen = []
    model.model.norm.register_forward_pre_hook(lambda m, a: seen.append(m.lam_value) if m.training else None)
    want = PRepBNSchedule(None, 6, warmup_steps=1, transition_steps=4)
    _trainer(model, blocks, tmp_path / "run", 6, 2, PRepBNCallback(warmup_steps=1, transition_steps=4)).train()
    assert seen == [want.lam_at(s) for s in range(6) for _ in range(2)]  # both micro-batches of step s
    seen.clear()
    callback = PRepBNCallback(warmup_steps=1, transition_steps=4)
    _trainer(model, blocks, tmp_path / "run", 6, 2, callback).train(resume_from_checkpoint=str(tmp_path / "run" /
                                                                                              "checkpoint-3"))
    assert seen == [want.lam_at(s) for s in range(3, 6) for _ in range(2)]
    assert callback.lam == 0.0


def test_prepbn_callback_calibrates_the_branches_when_lam_first_drops(corpus, tmp_path):
    from slab.lm.callbacks import PRepBNCallback
    model, blocks = _trainer_model(corpus)
    callback = PRepBNCallback(warmup_steps=2, transition_steps=0, calibration_batches=[(blocks[:8], None)])
    weights = []
    model.model.norm.register_forward_pre_hook(
        lambda m, a: weights.append(float(m.repbn.bn.weight.abs().sum())) if m.training else None)
    _trainer(model, blocks, tmp_path / "run", 4, 1, callback).train()
    assert callback.calibrated
    assert weights[:2] == [0.0, 0.0] and weights[2] > 0  # zero branches until the switch, calibrated at it
