"""Fusion across the whole registry, the deploy checkpoint round trip, bad input, and `slab fuse`.

Every registered model is tested at reduced width: ``REDUCED`` maps a name prefix (the longest match
wins) to small architecture kwargs. A model whose family has no entry fails with a message saying so:
add the family here when it lands.
"""
import json
import warnings

import pytest
import torch
import torch.nn as nn

import slab
from slab.reparam.export import load_fused, read_sidecar, save_fused
from slab.reparam.fold import NORM_TYPES
from slab.reparam.fuse import remaining_norms

from conftest import assert_close, randomize_bn_stats

_DEIT = dict(embed_dim=32, depth=2, num_heads=2)
_PVT = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))
_SWIN = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4))  # 2 blocks: shifted windows too
_CSWIN = dict(embed_dim=16, depth=(1, 1, 1, 1), num_heads=(2, 2, 4, 4))

#: name prefix -> reduced architecture kwargs (the longest matching prefix wins).
REDUCED = {
    "slab_deit_nano": {},
    "deit_": _DEIT, "slab_deit_": _DEIT,
    "pvt_": _PVT, "slab_pvt_": _PVT, "pvt_v2_": _PVT, "slab_pvt_v2_": _PVT,
    "swin_": _SWIN, "slab_swin_": _SWIN,
    "cswin_": _CSWIN, "slab_cswin_": _CSWIN,
}
NUM_CLASSES = 5
MODELS = slab.list_models()


def reduced_kwargs(name: str) -> dict:
    prefixes = [p for p in REDUCED if name.startswith(p)]
    if not prefixes:
        raise LookupError(f"no reduced kwargs for registered model {name!r}: add its family to REDUCED in "
                          f"tests/test_fuse.py")
    return dict(REDUCED[max(prefixes, key=len)], num_classes=NUM_CLASSES)


def resolutions(model: nn.Module) -> list[tuple[int, int]]:
    """The model's default input size and a non-square one (which makes Swin pad its windows)."""
    _, h, w = model.pretrained_cfg["input_size"]
    return [(h, w), (h - 64, w) if h > 64 else (h - 8, w)]


def build(name: str, seed: int = 0) -> nn.Module:
    return randomize_bn_stats(slab.create_model(name, **reduced_kwargs(name)), seed=seed).eval()


def test_every_family_has_reduced_kwargs():
    missing = [n for n in MODELS if not any(n.startswith(p) for p in REDUCED)]
    assert not missing, f"add reduced kwargs to REDUCED for: {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_fused_equals_unfused(name, tmp_path):
    torch.manual_seed(0)
    kwargs = reduced_kwargs(name)
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]

    fused = slab.fuse(model)

    # No normalization left, and the input model untouched.
    assert not remaining_norms(fused), remaining_norms(fused)
    assert not any(isinstance(m, NORM_TYPES) for m in fused.modules())
    assert [type(m) for m in model.modules()] == types_before
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not fused.training

    c = model.pretrained_cfg["input_size"][0]
    for hw in resolutions(model):
        x = torch.randn(2, c, *hw)
        with torch.no_grad():
            assert_close(f"{name} {hw}", model(x), fused(x), 1e-5)

    # The fused state dict loads into the deploy-form architecture, directly and from a safetensors file.
    deploy = slab.create_model(name, deploy=True, **kwargs).eval()
    deploy.load_state_dict(fused.state_dict(), strict=True)
    path = tmp_path / "fused.safetensors"
    save_fused(fused, path, name, kwargs)
    loaded = slab.create_model(name, deploy=True, pretrained_file=path, **kwargs).eval()
    x = torch.randn(2, c, *resolutions(model)[0])
    with torch.no_grad():
        want = fused(x)
        assert_close(f"{name} deploy", want, deploy(x), 1e-6)
        assert_close(f"{name} loaded", want, loaded(x), 1e-6)


def test_fuse_training_mode_model_works_on_eval_copy():
    model = build("slab_deit_tiny_patch16_224").train()
    fused = slab.fuse(model)
    assert model.training and all(m.training for m in model.modules()), "fuse must not switch the input to eval"
    assert not fused.training
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close("train-mode input", model.eval()(x), fused(x), 1e-5)
    with pytest.raises(ValueError, match="training mode"):
        slab.fuse(model.train(), inplace=True)


def test_default_statistics_warn():
    model = slab.create_model("slab_deit_tiny_patch16_224", **reduced_kwargs("slab_deit_tiny_patch16_224"))
    with pytest.warns(UserWarning, match="initial running statistics"):
        slab.fuse(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slab.fuse(randomize_bn_stats(model))  # trained-looking statistics: no warning


def test_unknown_norm_is_an_error_naming_its_path():
    model = build("deit_tiny_prepbn_patch16_224")
    model.blocks[1].attn.proj_drop = nn.GroupNorm(2, 32)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj_drop \(GroupNorm\)"):
        slab.fuse(model)


def test_layernorm_model_cannot_be_fused():
    model = slab.create_model("deit_tiny_prepbn_patch16_224", norm="ln", **reduced_kwargs("deit_tiny_prepbn_patch16_224"))
    with pytest.raises(ValueError, match="cannot be folded"):
        slab.fuse(model)


def test_save_fused_refuses_unfused_and_writes_atomically(tmp_path):
    model = build("slab_deit_nano_patch4_28")
    with pytest.raises(ValueError, match="fuse it first"):
        save_fused(model, tmp_path / "x.safetensors", "slab_deit_nano_patch4_28")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=".safetensors"):
        save_fused(slab.fuse(model), tmp_path / "x.pth", "slab_deit_nano_patch4_28")
    assert list(tmp_path.iterdir()) == []


def test_load_fused_round_trip_with_tuple_kwargs(tmp_path):
    name = "slab_pvt_v2_b0"
    kwargs = reduced_kwargs(name)
    fused = slab.fuse(build(name))
    path = tmp_path / "pvt.safetensors"
    save_fused(fused, path, name, kwargs, extra={"note": "test"})
    meta = read_sidecar(path)
    assert meta["model"] == name and meta["deploy"] is True and meta["kwargs"]["embed_dims"] == [16, 32, 48, 64]
    (tmp_path / "pvt.json").unlink()  # the safetensors header carries the same record
    model = load_fused(path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_close("load_fused", fused(x), model(x), 1e-6)


def test_torch_compile_on_fused_model():
    fused = slab.fuse(build("slab_deit_nano_patch4_28"))
    compiled = torch.compile(fused)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert_close("compiled fused", fused(x), compiled(x), 1e-5)


# ---------------------------------------------------------------- CLI
def _checkpoint(tmp_path, name: str = "slab_deit_nano_patch4_28", **kwargs):
    model = randomize_bn_stats(slab.create_model(name, **kwargs)).eval()
    path = tmp_path / "trained.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_cli_fuse_end_to_end(tmp_path, capsys):
    from slab.cli import main
    model, ckpt = _checkpoint(tmp_path)
    out = tmp_path / "deploy" / "nano.safetensors"
    rc = main(["fuse", "--model", "slab_deit_nano_patch4_28", "--checkpoint", str(ckpt), "--output", str(out),
               "--verify-data", "fashion-mnist", "--verify-limit", "256", "--latency-repeats", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fashion-mnist" in text and "norm-free bound" in text and "LN form" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["nano.json", "nano.safetensors"]  # no temporaries
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"] == "slab_deit_nano_patch4_28" and meta["deploy"] is True
    assert meta["verification"]["fashion-mnist"]["n"] == 256
    deploy = slab.create_model("slab_deit_nano_patch4_28", deploy=True, pretrained_file=out).eval()
    assert not remaining_norms(deploy)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert_close("cli fused", model(x), deploy(x), 1e-5)


def test_cli_fuse_model_kwargs_and_failed_verification_writes_nothing(tmp_path, capsys):
    from slab.cli import main
    name = "slab_swin_tiny_patch4_224"
    kwargs = reduced_kwargs(name)
    _, ckpt = _checkpoint(tmp_path, name, **kwargs)
    out = tmp_path / "swin.safetensors"
    args = ["fuse", "--model", name, "--checkpoint", str(ckpt), "--output", str(out), "--no-latency",
            "--verify-batches", "1", "--batch-size", "2", "--model-kwargs", json.dumps(kwargs)]
    assert main(args + ["--rtol", "0"]) == 2
    assert "nothing written" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert main(args) == 0
    model = load_fused(out)
    assert model.num_classes == NUM_CLASSES
    assert main(["fuse", "--model", name, "--checkpoint", str(ckpt), "--output", str(out),
                 "--model-kwargs", "[1, 2]"]) == 2
