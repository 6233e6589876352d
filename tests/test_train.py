"""slab.train: schedules under accumulation, falling loss, exact resumption, checkpoints, NaN guard, CLI."""
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn

from slab.data import FASHION_MNIST_DIR, INSTALL_HINT
from slab.schedule import PRepBNSchedule
from slab.train import (NonFiniteLossError, TrainConfig, evaluate, find_resume_checkpoint, load_checkpoint,
                        recalibrate_bn, train)
from slab.train import task as train_loop

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
                                reason=f"Fashion-MNIST not installed ({INSTALL_HINT})")

TINY = dict(model="slab_deit_nano_patch4_28", model_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
            batch_size=32, progress=False, num_workers=0, eval_batch_size=1000)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def lines(run_dir, kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def test_schedules_count_optimizer_steps_not_forwards(monkeypatch):
    forwards = []
    real_build = train_loop.build_model

    def counting_build(cfg):
        m = real_build(cfg)
        m.register_forward_hook(lambda mod, i, o: forwards.append(mod.training) if mod.training else None)
        return m

    monkeypatch.setattr(train_loop, "build_model", counting_build)
    one = train(tiny(max_steps=8, prepbn_warmup=2, prepbn_transition=4, lr_warmup=2))
    n1 = len(forwards)
    three = train(tiny(max_steps=8, prepbn_warmup=2, prepbn_transition=4, lr_warmup=2, grad_accum=3))
    assert len(forwards) - n1 == 3 * n1  # three times the training forwards ...
    ref = PRepBNSchedule(None, 8, warmup_steps=2, transition_steps=4)
    lams = [r["lam"] for r in three.history]
    assert lams == [r["lam"] for r in one.history] == [ref.lam_at(s) for s in range(8)]  # ... the same lam
    assert [r["lr"] for r in three.history] == [r["lr"] for r in one.history]
    assert lams == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_short_training_loss_falls():
    r = train(tiny(max_steps=60, lr=3e-3, label_smoothing=0.0, augment=False, batch_size=64))
    losses = [h["loss"] for h in r.history]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert r.final["top1"] > 30 and not r.model.training


def test_exact_resume_20_plus_20_equals_40(tmp_path):
    kw = dict(max_steps=40, lr=2e-3, grad_accum=2, mixup=0.2, cutmix=0.2, reprob=0.25, drop_path=0.1, ema=True,
              ema_decay=0.9, clip_grad=1.0, eval_every=15, eval_max_batches=2)
    full = train(tiny(output=str(tmp_path / "full"), **kw))
    first = train(tiny(output=str(tmp_path / "split"), stop_at_step=20, **kw))
    assert first.stopped_early and first.steps == 20
    second = train(tiny(output=str(tmp_path / "split"), resume="auto", **kw))
    assert second.resumed_from.endswith("step_00000020.pt")
    a, b = lines(tmp_path / "full"), lines(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 41))
    for key in ("loss", "lr", "lam"):
        assert [r[key] for r in a[20:]] == [r[key] for r in b[20:]], key
    assert lines(tmp_path / "full", "eval") == lines(tmp_path / "split", "eval")
    for (k, v), w in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_corrupt_checkpoint_is_skipped(tmp_path):
    out = str(tmp_path / "run")
    train(tiny(max_steps=6, save_every=2, keep_last=5, output=out, stop_at_step=4))
    newest = os.path.join(out, "checkpoints", "step_00000004.pt")
    with open(newest, "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        path, state = find_resume_checkpoint(out)
    assert path.endswith("step_00000002.pt") and state["step"] == 2
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(newest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = train(tiny(max_steps=6, save_every=2, output=out, resume="auto"))
    assert r.resumed_from.endswith("step_00000002.pt") and r.steps == 6
    assert [x["step"] for x in lines(out)] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_is_complete_and_atomic(tmp_path):
    out = str(tmp_path / "run")
    r = train(tiny(max_steps=4, save_every=1, keep_last=2, output=out, ema=True))
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert names == ["best.pt", "step_00000003.pt", "step_00000004.pt"]  # the last 2 and the best, no temp files
    state = load_checkpoint(r.last_checkpoint)
    for key in ("model", "ema", "optimizer", "lr_scheduler", "prepbn", "rng", "position", "config"):
        assert state[key] is not None, key
    assert state["prepbn"]["last_step"] == 4 and state["lr_scheduler"] and len(state["rng"]) == 1
    with pytest.raises(ValueError, match="--resume auto"):
        train(tiny(max_steps=4, output=out))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_build = train_loop.build_model
    calls = {"n": 0}

    def poisoned_build(cfg):
        m = real_build(cfg)

        def hook(mod, inp, out):
            if mod.training:
                calls["n"] += 1
                if calls["n"] >= 5:
                    return out * float("nan")
            return out
        m.register_forward_hook(hook)
        return m

    monkeypatch.setattr(train_loop, "build_model", poisoned_build)
    out = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as e:
        train(tiny(max_steps=10, save_every=2, output=out))
    msg = str(e.value)
    assert e.value.step == 5 and "optimizer step 5" in msg and f"lam={e.value.lam:.4f}" in msg
    assert "PRepBN transition" in msg and "learning rate" in msg and "step_00000004.pt" in msg
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000002.pt", "step_00000004.pt"]
    assert lines(out, "error")[0]["step"] == 5


def test_transition_after_training_is_an_error():
    with pytest.raises(ValueError, match="transition would end after training"):
        train(tiny(max_steps=10, prepbn_transition=20))
    with pytest.raises(ValueError, match="fraction"):
        tiny(max_steps=10, prepbn_transition=1.5)


def test_evaluate_and_recalibrate_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.3), nn.Dropout(0.5), nn.Linear(6, 3))
    batches = [(torch.randn(8, 4) * 2 + 1, torch.randint(0, 3, (8,))) for _ in range(3)]
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    assert recalibrate_bn(model, batches, num_batches=2) == 2
    with torch.no_grad():
        h = [model[0](x) for x, _ in batches[:2]]
    expect_mean = (h[0].mean(0) + h[1].mean(0)) / 2
    expect_var = (h[0].var(0) + h[1].var(0)) / 2  # cumulative average of unbiased batch variances
    assert torch.allclose(model[1].running_mean, expect_mean, atol=1e-6)
    assert torch.allclose(model[1].running_var, expect_var, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.training and model[1].momentum == 0.3 and int(model[1].num_batches_tracked) == 2
    r = evaluate(model, batches)
    with torch.no_grad():
        model.eval()
        logits = torch.cat([model(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert r["n"] == 24 and abs(r["top1"] - 100 * (logits.argmax(1) == labels).float().mean().item()) < 1e-9


def test_recalibrate_prepbn_model_runs_repbn_branch():
    import slab
    model = slab.create_model("slab_deit_nano_patch4_28", embed_dim=32, depth=1, num_heads=2)
    slab.set_prepbn_lambda(model, 0.5)
    model.train()
    x = torch.randn(16, 1, 28, 28)
    recalibrate_bn(model, [(x, None)], num_batches=1)
    prep = [m for m in model.modules() if isinstance(m, slab.PRepBN)]
    assert all(m.lam_value == 0.5 for m in prep) and model.training
    assert all(int(m.repbn.bn.num_batches_tracked) == 1 for m in prep)  # the BN branch saw the batch


def test_cli_train_eval_recalibrate_plot(tmp_path, capsys):
    from slab.cli import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: slab_deit_nano_patch4_28\nmodel_kwargs: {embed_dim: 32, depth: 1, num_heads: 2}\n"
                   "max_steps: 50\nbatch_size: 16\nlr_warmup: 0\nprogress: false\neval_batch_size: 1000\n")
    out = str(tmp_path / "run")
    rc = main(["train", "--config", str(cfg), "--model", "slab_deit_nano_patch4_28", "--data", "fashion-mnist",
               "--max-steps", "6", "--batch-size", "32", "--seed", "1", "--output", out, "--resume", "auto",
               "--prepbn-transition", "0.5"])
    assert rc == 0
    recs = lines(out)
    assert len(recs) == 6 and recs[-1]["lam"] == 0.0  # CLI beats YAML; transition = 3 steps
    assert "6 steps" in capsys.readouterr().out
    ckpt = os.path.join(out, "checkpoints", "step_00000006.pt")
    assert main(["eval", ckpt, "--max-batches", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 512
    assert main(["recalibrate", ckpt, "--batches", "2"]) == 0
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_00000006_recal.pt"))
    assert main(["plot", out]) == 0 and os.path.getsize(os.path.join(out, "curves.png")) > 10000
    bad = main(["train", "--config", str(cfg), "--output", str(tmp_path / "bad"), "--prepbn-transition", "60000"])
    assert bad == 2 and "transition would end after training" in capsys.readouterr().err


def test_packaged_configs_are_valid():
    import slab
    from slab.train.config import list_configs, load_yaml
    names = list_configs()
    assert {"fashion_mnist_nano", "deit_tiny_prepbn_in1k", "slab_deit_tiny_in1k", "slab_swin_tiny_in1k"} <= set(names)
    for name in names:
        cfg = TrainConfig.from_dict(load_yaml(name))
        assert cfg.model in slab.list_models(), (name, cfg.model)
