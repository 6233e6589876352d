"""slab.engine: the three training commands share one contract and resume bit-identically (8 == 4 + stop + 4),
alone and under DDP (2 gloo ranks); a NaN on one rank stops (or skips) every rank, without a hang."""
import json
import os
import subprocess
import sys

import pytest
import torch

from slab.data import FASHION_MNIST_DIR

HAVE_FMNIST = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed")

TEXT = "\n%\n".join(
    f"Entry {i}: the quick brown fox jumps over the lazy dog number {i % 7}, and the cat sleeps." for i in range(300))
NANO_KWARGS = json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2})
DET_SETS = ["--set", "backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, img_size: 64}", "--set", "min_size=[64]",
            "--set", "test_size=64", "--set", "fpn_channels=32", "--set", "mask_layers=[32]",
            "--set", "representation_size=64", "--set", "eval_fused=false", "--set", "warmup_iters=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    (d / "quotes").write_text(TEXT)
    return d


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from slab.detection.scenes import SceneConfig, make_fmnist_scenes
    out = tmp_path_factory.mktemp("scenes")
    make_fmnist_scenes(out, 8, 2, SceneConfig(canvas=64, max_items=2, min_scale=0.8, max_scale=1.6), seed=3)
    return out


def command(task, out, data):
    """argv (after ``slab``) of an 8-step run of ``task`` writing to ``out``."""
    common = ["--max-steps", "8", "--output", str(out), "--threads", "1"]
    if task == "train":
        return ["train", "--model", "slab_deit_nano_patch4_28", "--model-kwargs", NANO_KWARGS, "--batch-size", "8",
                "--no-progress", "--eval-max-batches", "1", "--prepbn-transition", "0.5", "--mixup", "0.2",
                "--drop-path", "0.1", *common]
    if task == "train-lm":
        return ["train-lm", "--text", str(data), "--batch-size", "4", "--hidden", "32", "--layers", "1", "--heads", "2",
                "--vocab-size", "300", "--seq-len", "16", "--eval-blocks", "4", "--recalibrate-batches", "1",
                "--warmup", "1", "--no-progress", "--grad-accum", "2", "--prepbn-warmup", "2",
                "--prepbn-transition", "0.5", "--save-every", "100", *common]
    return ["train-det", "--config", "det_fmnist_demo", "--backbone", "slab_deit_tiny_patch16_224", "--data",
            str(data), "--batch-size", "1", "--num-workers", "0", "--device", "cpu", *DET_SETS, *common]


def train_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "train"]


def final_weights(out):
    state = torch.load(os.path.join(out, "checkpoints", "step_00000008.pt"), weights_only=True)
    return state["model"]


def assert_same_run(a, b):
    ra, rb = train_records(a), train_records(b)
    assert [r["step"] for r in rb] == list(range(1, 9))
    for r in ra:  # the shared contract of metrics.jsonl
        assert {"type", "step", "loss", "lr", "lam"} <= set(r)
    for key in ("loss", "lr", "lam"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def data_for(task, corpus, scenes):
    return {"train": None, "train-lm": corpus, "train-det": scenes}[task]


TASKS = [pytest.param("train", marks=needs_fmnist), "train-lm", pytest.param("train-det", marks=needs_fmnist)]


@pytest.mark.parametrize("task", TASKS)
def test_resume_is_exact(task, corpus, scenes, tmp_path):
    from slab.cli import main
    data = data_for(task, corpus, scenes)
    assert main(command(task, tmp_path / "full", data)) == 0
    split = tmp_path / "split"
    assert main(command(task, split, data) + ["--stop-at-step", "4"]) == 0
    assert [r["step"] for r in train_records(split)] == [1, 2, 3, 4]
    assert main(command(task, split, data) + ["--resume", "auto"]) == 0
    assert_same_run(tmp_path / "full", split)


def test_resume_with_another_seed_is_refused(corpus, tmp_path, capsys):
    from slab.cli import main
    out = tmp_path / "run"
    argv = command("train-lm", out, corpus)
    assert main(argv + ["--stop-at-step", "2"]) == 0
    assert main(argv + ["--seed", "1"]) == 2
    assert "seed 0 there, 1 here" in capsys.readouterr().err


# ---------------------------------------------------------------- under torchrun (2 gloo ranks)
def torchrun(argv, env=None, timeout=400):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLAB_")}, "OMP_NUM_THREADS": "1",
           **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "slab",
           *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_ddp_resume_is_exact(task, corpus, scenes, tmp_path):
    data = data_for(task, corpus, scenes)
    p = torchrun(command(task, tmp_path / "full", data))
    assert p.returncode == 0, p.stderr[-3000:]
    split = tmp_path / "split"
    p = torchrun(command(task, split, data) + ["--stop-at-step", "4"])
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun(command(task, split, data) + ["--resume", "auto"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(tmp_path / "full", split)


@pytest.mark.slow
@pytest.mark.parametrize("task", [pytest.param("train-det", marks=needs_fmnist), "train-lm"])
def test_ddp_nan_on_one_rank_does_not_hang(task, corpus, scenes, tmp_path):
    """Rank 1 alone gets a NaN loss at step 3: detection (stop policy) stops on both ranks with the error,
    the language model (skip policy) skips that step on both ranks and finishes. Neither may hang."""
    out = tmp_path / "nan"
    p = torchrun(command(task, out, data_for(task, corpus, scenes)), env={"SLAB_NAN_AT_STEP": "3",
                                                                          "SLAB_NAN_RANK": "1"}, timeout=300)
    recs = train_records(out)
    if task == "train-det":
        assert p.returncode != 0 and "loss is nan at step 3" in p.stderr, p.stderr[-3000:]
        assert [r["step"] for r in recs] == [1, 2]
        with open(out / "metrics.jsonl") as f:
            assert [r for r in map(json.loads, f) if r["type"] == "error"][0]["step"] == 3
    else:
        assert p.returncode == 0, p.stderr[-3000:]
        assert "step 2: non-finite loss/gradient, step skipped" in p.stdout
        assert [r["step"] for r in recs] == list(range(1, 9)) and recs[2]["skipped"]
        assert json.loads((out / "results.json").read_text())["bad_steps"] == 1
