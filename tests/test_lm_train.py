"""Language-model data, tokenizer, training loop (resume, NaN guard, checkpoints), BN calibration and CLI."""
import json
from functools import partial
import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_close
from transformers import AutoModelForCausalLM

from slab.layers.norm import PRepBN, RepBN, RMSNorm, set_prepbn_lambda
from slab.lm import SlabLlamaConfig, SlabLlamaForCausalLM, data
from slab.lm.train import (TrainLMConfig, fit_bn_to_ln, load_checkpoint, perplexity, recalibrate_bn,
                           save_checkpoint, train_lm)

TEXT = "\n%\n".join(
    f"Entry {i}: the quick brown fox jumps over the lazy dog number {i % 7}, and the cat sleeps." for i in range(300))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    (d / "quotes").write_text(TEXT)
    (d / "quotes.dat").write_bytes(b"\x00\x01")  # fortune index files are skipped
    (d / "prose.txt").write_text("A paragraph of prose.\nStill the same paragraph.\n\nA second paragraph here.\n")
    ds = data.load_text(d, held_out=0.1, cache_dir=str(d / "cache"))
    tok = data.train_tokenizer(ds["train"]["text"], vocab_size=300)
    return d, ds, tok


def tiny_lm(tok, norm="prepbn", **kw):
    torch.manual_seed(0)
    return SlabLlamaForCausalLM(SlabLlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, norm=norm, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **kw))


def test_text_loading_split_and_tokenizer(corpus):
    d, ds, tok = corpus
    assert data.text_files(d) == [str(d / "prose.txt"), str(d / "quotes")]
    assert data.split_entries("a\n%\nb\n%\n") == ["a", "b"]
    assert data.split_entries("p one\nline\n\np two") == ["p one\nline", "p two"]
    n = len(ds["train"]) + len(ds["test"])
    assert n == 302 and 20 <= len(ds["test"]) <= 40
    assert not set(ds["train"]["text"]) & set(ds["test"]["text"]) - {""}
    text = "the quick brown fox"
    assert tok.decode(tok(text)["input_ids"]) == text
    blocks = data.pack_tokens(tok, ds["train"]["text"], 16)
    assert blocks.shape[1] == 16 and (blocks == tok.eos_token_id).any()
    ids, mask = data.pad_rows(tok, ds["test"]["text"], 24)
    assert ids.shape == mask.shape and (mask.sum(1) >= 2).all()
    assert (ids[mask == 0] == tok.pad_token_id).all()
    with pytest.raises(FileNotFoundError):
        data.text_files(d / "missing")


def test_atomic_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint({"a": torch.ones(3)}, path)
    save_checkpoint({"a": torch.zeros(3)}, path)
    assert load_checkpoint(path)["a"].sum() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left


def test_training_resumes_exactly(corpus, tmp_path):
    _, ds, tok = corpus
    blocks = data.pack_tokens(tok, ds["train"]["text"], 16)
    cfg = TrainLMConfig(steps=6, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, save_every=2,
                        prepbn_warmup=0, prepbn_transition=0.5, bn_init="fit", fit_batches=2)
    full = tiny_lm(tok)
    res = train_lm(full, blocks, cfg, tmp_path / "a", progress=False, log=lambda *a: None)
    assert res["step"] == 6 and res["lam"] == 0.0 and res["bad_steps"] == 0
    assert [h["lam"] for h in res["history"]] == [1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0]
    part = tiny_lm(tok)
    train_lm(part, blocks, cfg, tmp_path / "b", progress=False, log=lambda *a: None, stop_after=3)
    resumed = tiny_lm(tok)
    res2 = train_lm(resumed, blocks, cfg, tmp_path / "b", progress=False, log=lambda *a: None)
    assert res2["step"] == 6 and res2["history"] == res["history"]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="another configuration"):
        train_lm(tiny_lm(tok), blocks, TrainLMConfig(steps=7, batch_size=4), tmp_path / "b", progress=False)


def test_nan_guard_skips_and_aborts(corpus, tmp_path):
    _, ds, tok = corpus
    blocks = data.pack_tokens(tok, ds["train"]["text"], 16)
    model = tiny_lm(tok, norm="rmsnorm")
    poison = {"steps": {1}}
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] in poison["steps"] else output

    model.model.embed_tokens.register_forward_hook(hook)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_lm(model, blocks, TrainLMConfig(steps=1, batch_size=4, save_every=1), tmp_path / "a",
                   progress=False, log=lambda *a: None)
    assert res["bad_steps"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # skipped step changes nothing
    poison["steps"] = set(range(100))
    model = tiny_lm(tok, norm="rmsnorm")
    model.model.embed_tokens.register_forward_hook(hook)
    with pytest.raises(RuntimeError, match="consecutive non-finite"):
        train_lm(model, blocks, TrainLMConfig(steps=10, batch_size=4, max_bad_steps=3),
                 tmp_path / "b", progress=False, log=lambda *a: None)


class _Probe(nn.Module):
    """input_ids -> embeddings -> one PRepBN: lets the BN fit be checked exactly."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.norm = PRepBN(table.shape[1], ln_layer=RMSNorm, bn_layer=partial(RepBN, alpha_init=0.0))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.norm(self.table[input_ids], attention_mask.bool() if attention_mask is not None else None)


def test_fit_bn_to_rmsnorm_is_exact_where_rmsnorm_is_linear():
    torch.manual_seed(0)
    v = torch.randn(8) * 3 + 1
    table = torch.stack([v, -v])  # every token has the same RMS: RMSNorm is linear on them
    probe = _Probe(table)
    with torch.no_grad():
        probe.norm.ln.weight.copy_(torch.rand(8) + 0.5)
    batches = [(torch.randint(0, 2, (4, 6)), None) for _ in range(3)]
    assert fit_bn_to_ln(probe, batches) == 1
    x = torch.randint(0, 2, (2, 5))
    probe.train()
    ref = probe(x)  # lam = 1: RMSNorm
    probe.eval()  # RepBN with running statistics
    assert_close("fitted RepBN", ref, probe(x), 1e-4)
    assert probe.norm.lam_value == 1.0


def test_recalibration_uses_real_tokens_only(corpus):
    _, ds, tok = corpus
    model = tiny_lm(tok, norm="repbn").eval()
    ids, mask = data.pad_rows(tok, ds["train"]["text"][:32], 24)
    assert recalibrate_bn(model, [(ids, mask)]) == 1
    assert not model.training and not any(m.training for m in model.modules())
    bn = model.model.layers[0].input_layernorm.bn
    x = model.model.embed_tokens(ids)[mask.bool()]
    assert_close("mean over real tokens", x.mean(0), bn.running_mean, 1e-4)
    assert bn.momentum == 0.1
    assert math.isfinite(perplexity(model, ids, mask, batch_size=8))


def test_train_lm_cli_end_to_end(corpus, tmp_path):
    from slab.cli import main
    d, _, _ = corpus
    out = tmp_path / "run"
    args = ["train-lm", "--text", str(d), "--output", str(out), "--steps", "4", "--batch-size", "4", "--hidden", "32",
            "--layers", "1", "--heads", "2", "--vocab-size", "300", "--seq-len", "16", "--eval-blocks", "8",
            "--save-every", "2", "--recalibrate-batches", "2", "--no-progress", "--padding", "pad",
            "--bn-stats", "causal", "--warmup", "1"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and math.isfinite(res["ppl"])
    assert abs(res["ppl_fused"] - res["ppl"]) <= 1e-4 * res["ppl"]
    fused = AutoModelForCausalLM.from_pretrained(out / "fused")
    assert fused.config.norm == "none" and fused.config.folded_bias
    assert main(args) == 0  # resumes from the finished checkpoint: nothing left to train


def test_lm_bench_cli(capsys):
    from slab.cli import main
    assert main(["lm-bench", "--size", "tiny", "--batch-sizes", "1,2", "--prompt-len", "8", "--new-tokens", "2",
                 "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fused-prepbn" in out and "ratio batch2" in out
    assert main(["lm-bench", "--size", "huge"]) == 2


def test_schedule_lambda_reaches_model_through_training(corpus, tmp_path):
    _, ds, tok = corpus
    blocks = data.pack_tokens(tok, ds["train"]["text"], 16)
    model = tiny_lm(tok)
    set_prepbn_lambda(model, 1.0)
    train_lm(model, blocks, TrainLMConfig(steps=2, batch_size=4, prepbn_warmup=0, prepbn_transition=0.5), tmp_path,
             progress=False, log=lambda *a: None)
    assert all(m.lam_value == 0.0 for m in model.modules() if isinstance(m, PRepBN))


@pytest.mark.slow
def test_train_lm_ddp_two_processes(corpus, tmp_path):
    """torchrun with 2 CPU ranks (gloo), DDP without find_unused_parameters (PRepBN gives the branch it skips zero
    gradients): ranks agree, rank 0 saves."""
    import os
    import subprocess
    import sys
    d, _, _ = corpus
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
           "-m", "slab", "train-lm", "--text", str(d), "--output", str(out), "--steps", "3", "--batch-size", "4",
           "--hidden", "32", "--layers", "1", "--heads", "2", "--vocab-size", "300", "--seq-len", "16",
           "--eval-blocks", "8", "--recalibrate-batches", "2", "--no-progress", "--threads", "1", "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["steps"] == 3 and math.isfinite(res["ppl_fused"])
    assert "bn_init='calibrate'" in proc.stdout  # the default recipe's switch ran under DDP (branches from rank 0)


def test_calibrated_transition_starts_at_the_rmsnorm_model(corpus, tmp_path):
    """bn_init='calibrate': when lam first drops, every RepBN is fitted (in forward order) to the model's own
    RMSNorm form, so the abrupt switch keeps the logits close where the authors' zero branches give zeros."""
    from slab.lm.convert import rmsnorm_form
    from slab.lm.train import init_bn_branches
    _, ds, tok = corpus
    blocks = data.pack_tokens(tok, ds["train"]["text"], 16)
    logs = []
    model = tiny_lm(tok)
    cfg = TrainLMConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, prepbn_warmup=3, prepbn_transition=0.0,
                        bn_init="calibrate", fit_batches=2, save_every=100)
    res = train_lm(model, blocks, cfg, tmp_path / "a", progress=False, log=logs.append)
    assert any("step 3:" in line and "bn_init='calibrate'" in line for line in logs), logs
    assert [h["lam"] for h in res["history"]] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    teacher = rmsnorm_form(model)
    init_bn_branches(model, "calibrate", [(blocks[i * 8:(i + 1) * 8], None) for i in range(2)])
    probe = blocks[16:24]
    with torch.no_grad():
        ref = teacher(input_ids=probe).logits
        got = model.eval()(input_ids=probe).logits
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.3, rel  # the authors' zero branches give zero logits: relative error 1


@pytest.mark.parametrize("case", ["empty", "one-entry", "warmup", "short-steps", "output-file", "tiny-text"])
def test_train_lm_bad_input_is_a_clear_error_and_writes_nothing(case, corpus, tmp_path, capsys):
    from slab.cli import main
    d, _, _ = corpus
    text, out, extra = d, tmp_path / "run", []
    if case == "empty":
        text = tmp_path / "empty.txt"
        text.write_text("   \n\n  \n")
        want = "0 entries"
    elif case == "one-entry":
        text = tmp_path / "one.txt"
        text.write_text("Just one line of text.\n")
        want = "1 entry"
    elif case == "warmup":
        extra = ["--warmup", "10"]
        want = "never reach"
    elif case == "short-steps":
        extra = ["--prepbn-warmup", "8"]
        want = "after training"
    elif case == "output-file":
        out.write_text("not a directory")
        want = "not a directory"
    else:
        text = tmp_path / "tiny.txt"
        text.write_text("\n\n".join(f"Word {i}." for i in range(20)))  # a held-out entry shorter than a block
        want = "too short"
    args = ["train-lm", "--text", str(text), "--output", str(out), "--steps", "4", "--batch-size", "4",
            "--hidden", "32", "--layers", "1", "--heads", "2", "--vocab-size", "300", "--seq-len", "16",
            "--warmup", "1", "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err
    assert out.is_file() if case == "output-file" else not out.exists()
