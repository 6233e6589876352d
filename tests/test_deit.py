"""DeiT / SLAB-DeiT: the authors' fixtures, released manifests, fusion, shapes and bad input."""
import json

import pytest
import torch
import torch.nn as nn

import slab
from slab.models._builder import load_checkpoint_strict
from slab.reparam import NORM_TYPES

from conftest import FIXTURES, assert_close, load_fixture, randomize_bn_stats, authors_param_count

SMALL = dict(embed_dim=32, depth=2, num_heads=2, num_classes=7)


@pytest.mark.parametrize("name", ["deit_prepbn", "deit_repbn", "slab_deit"])
def test_authors_fixture_logits_unfused_and_fused(name):
    record, sd, io = load_fixture(name)
    model = slab.load_authors_model(record, sd)
    assert authors_param_count(model) == record["params"]
    with torch.no_grad():
        out = model(io["input"])
        fused = slab.fuse(model)(io["input"])
    assert (out - io["logits"]).abs().max() <= 1e-4
    assert (fused - io["logits"]).abs().max() <= 1e-4


DEIT_FILES = ["deit_tiny_prepbn.pth", "deit_small_prepbn.pth", "slab_deit_tiny.pth", "slab_deit_small.pth"]


@pytest.fixture(scope="module")
def manifests():
    return json.loads((FIXTURES / "released_checkpoints.json").read_text())


@pytest.mark.parametrize("file", DEIT_FILES)
def test_released_manifest_loads_strictly(file, manifests):
    entry = manifests[file]
    model = slab.create_model(slab.AUTHORS_CHECKPOINTS[file])
    assert authors_param_count(model) == entry["params"]
    sd = {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, (shape, dtype) in entry["state_dict"].items()}
    load_checkpoint_strict(model, {"model": sd}["model"], slab.AUTHORS_CHECKPOINTS[file])


def test_wrong_checkpoint_names_keys_and_lookalike(manifests, tmp_path):
    entry = manifests["slab_deit_small.pth"]
    sd = {k: torch.zeros(shape) for k, (shape, _) in entry["state_dict"].items() if "num_batches" not in k}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as e:
        slab.create_model("slab_deit_tiny_patch16_224", pretrained_file=path)
    assert "other shapes" in str(e.value) and "slab_deit_small_patch16_224" in str(e.value)


@pytest.mark.parametrize("name", ["slab_deit_tiny_patch16_224", "deit_tiny_prepbn_patch16_224",
                                  "deit_tiny_repbn_patch16_224", "slab_deit_nano_patch4_28"])
@pytest.mark.parametrize("size", ["default", "nonsquare"])
def test_fuse_matches_with_random_statistics(name, size):
    model = slab.create_model(name, **SMALL)
    randomize_bn_stats(model).eval()
    c, h, w = model.in_chans, *model.img_size
    if size == "nonsquare":
        h, w = h + 2 * model.patch_size, w - model.patch_size
    x = torch.randn(2, c, h, w)
    fused = slab.fuse(model)
    assert not [n for n, m in fused.named_modules() if isinstance(m, NORM_TYPES)]
    with torch.no_grad():
        assert_close(name, model(x), fused(x), 1e-5)
    assert model.training is False and any(isinstance(m, NORM_TYPES) for m in model.modules()), "input untouched"


def test_fuse_training_model_uses_eval_copy_and_warns_on_default_stats():
    model = slab.create_model("slab_deit_nano_patch4_28").train()
    with pytest.warns(UserWarning, match="initial running statistics"):
        fused = slab.fuse(model)
    assert model.training and not fused.training


def test_fuse_refuses_layernorm_and_unknown_norms():
    with pytest.raises(ValueError, match="cannot be folded"):
        slab.fuse(slab.create_model("slab_deit_nano_patch4_28", norm="ln"))
    model = slab.create_model("slab_deit_nano_patch4_28")
    model.blocks[1].extra = nn.GroupNorm(2, 64)
    with pytest.raises(ValueError, match=r"blocks\.1\.extra"):
        slab.fuse(model, warn_default_stats=False)


def test_deploy_form_loads_fused_state():
    model = randomize_bn_stats(slab.create_model("slab_deit_nano_patch4_28")).eval()
    fused = slab.fuse(model)
    deploy = slab.create_model("slab_deit_nano_patch4_28", deploy=True)
    deploy.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert_close("deploy", model(x), deploy(x), 1e-5)


@pytest.mark.parametrize("norm", ["ln", "bn", "repbn", "prepbn", "none"])
@pytest.mark.parametrize("attn", ["softmax", "sla"])
def test_every_norm_and_attn_trains(norm, attn):
    kw = dict(norm=norm, attn=attn) if attn == "sla" else dict(norm=norm, attn=attn, class_token=True, global_pool="token")
    model = slab.create_model("slab_deit_nano_patch4_28", **kw)
    slab.set_prepbn_lambda(model, 0.5)
    out = model(torch.randn(2, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_bad_inputs_speak():
    model = slab.create_model("slab_deit_nano_patch4_28")
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(2, 1, 30, 28))
    with pytest.raises(ValueError, match="slab_deit_tiny_patch16_224"):
        slab.create_model("slab_deit_tiny_patch16")
    with pytest.raises(ValueError, match="class_token=False"):
        slab.create_model("slab_deit_nano_patch4_28", class_token=True)


def test_registered_defaults_can_be_overridden():
    model = slab.create_model("slab_deit_tiny_patch16_224", norm="ln", attn="softmax", class_token=True,
                              global_pool="token", **SMALL)
    assert model.norm_kind == "ln" and model.attn_kind == "softmax" and model.cls_token.requires_grad


def test_interface():
    model = slab.create_model("deit_tiny_prepbn_patch16_224", **SMALL)
    x = torch.randn(2, 3, 64, 96)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 4 * 6, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert "pos_embed" in model.no_weight_decay()
