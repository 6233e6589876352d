"""Swin / SLAB-Swin: authors' fixtures and manifests, registry, fusion with window padding, any input size."""
import json

import pytest
import timm
import torch

import slab
from slab.models import swin
from slab.models._builder import load_checkpoint_strict
from slab.reparam import remaining_norms

from conftest import FIXTURES, assert_close, load_fixture, randomize_bn_stats

SMALL = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), num_classes=7)
SWIN_NAMES = ["swin_tiny_prepbn_patch4_window7_224", "swin_small_prepbn_patch4_window7_224",
              "swin_base_prepbn_patch4_window7_224", "swin_tiny_repbn_patch4_window7_224",
              "slab_swin_tiny_patch4_224", "slab_swin_small_patch4_224", "slab_swin_base_patch4_224"]


def _small(name: str = "slab_swin_tiny_patch4_224", **kwargs) -> swin.SlabSwinTransformer:
    return slab.create_model(name, **{**SMALL, **kwargs}).eval()


@pytest.mark.parametrize("fixture", ["swin_repbn", "slab_swin"])
def test_authors_fixture(fixture):
    record, state_dict, io = load_fixture(fixture)
    model = slab.load_authors_model(record, state_dict)
    assert sum(p.numel() for p in model.parameters()) == record["params"]
    with torch.no_grad():
        out = model(io["input"])
    assert (out - io["logits"]).abs().max().item() <= 1e-4
    fused = slab.fuse(model)
    assert not remaining_norms(fused)
    with torch.no_grad():
        out = fused(io["input"])
    assert (out - io["logits"]).abs().max().item() <= 1e-4


def test_slab_swin_fixture_structure():
    record, state_dict, _ = load_fixture("slab_swin")
    model = slab.load_authors_model(record, state_dict)
    assert model.attn_type == "LLSS"
    stage0, stage2 = model.layers[0].blocks[0], model.layers[2].blocks[1]
    # SLA stages see the whole 56x56 / 28x28 map, unshifted; softmax stages use shifted 7x7 windows.
    assert stage0.attn.positional_encoding.shape == (1, 3136, 32)
    assert model.layers[1].blocks[0].attn.positional_encoding.shape == (1, 784, 64)
    assert stage0.window_shift((56, 56)) == ((56, 56), (0, 0))
    assert stage2.window_shift((14, 14)) == ((7, 7), (3, 3))
    assert stage2.attn_mask.shape == (4, 49, 49)
    assert not any("relative_position_bias_table" in k for k in model.layers[0].state_dict())


def test_fixture_into_other_img_size():
    """Bias tables / positional encodings made at 224 are resized for a model built at another size."""
    record, state_dict, _ = load_fixture("slab_swin")
    model = swin.SlabSwinTransformer(img_size=(160, 192), embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                                     num_classes=10, attn_type="LLSS", sla_window_size=56, norm="prepbn")
    load_checkpoint_strict(model, state_dict)
    assert model.layers[0].blocks[0].attn.positional_encoding.shape == (1, 40 * 48, 32)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 160, 192))).all()


@pytest.mark.parametrize("file", sorted(swin.AUTHORS_CHECKPOINTS))
def test_released_manifest(file):
    manifest = json.loads((FIXTURES / "released_checkpoints.json").read_text())[file]
    name = swin.AUTHORS_CHECKPOINTS[file]
    state_dict = {k: torch.zeros(shape, dtype=getattr(torch, dtype))
                  for k, (shape, dtype) in manifest["state_dict"].items()}
    model = slab.create_model(name)
    load_checkpoint_strict(model, state_dict, name)
    assert sum(p.numel() for p in model.parameters()) == manifest["params"]


@pytest.mark.parametrize("name", SWIN_NAMES)
def test_registered_forward_backward(name):
    assert name in slab.list_models()
    model = slab.create_model(name, **SMALL)
    assert model.norm_kind == ("repbn" if "_repbn" in name else "prepbn")
    assert model.attn_type == ("LLSS" if name.startswith("slab_") else "SSSS")
    model.train()
    slab.set_prepbn_lambda(model, 0.5)  # both branches of PRepBN get gradients
    out = model(torch.randn(2, 3, 96, 128))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.forward_head(model.forward_features(torch.randn(2, 3, 64, 64)), pre_logits=True).shape == (2, 128)


def test_features_only():
    model = _small(features_only=True)
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(2, 3, 160, 192))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 40, 48), (2, 32, 20, 24), (2, 64, 10, 12), (2, 128, 5, 6)]
    fused = slab.fuse(randomize_bn_stats(model))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):
            assert_close("features", a, b, 1e-5)


@pytest.mark.parametrize("hw", [(224, 224), (160, 192), (164, 196)], ids=["224", "160x192", "odd-merge"])
@pytest.mark.parametrize("form", ["softmax", "slab", "sla-windows"])
def test_fuse_matches_unfused(form, hw):
    """Fused == unfused with random BN statistics, also where windows are zero-padded."""
    kwargs = {"softmax": dict(attn_type="SSSS"), "slab": dict(attn_type="LLSS"),
              "sla-windows": dict(attn_type="LLLL", sla_window_size=7)}[form]
    model = randomize_bn_stats(_small(**kwargs))
    x = torch.randn(2, 3, *hw)
    fused = slab.fuse(model)
    assert not remaining_norms(fused)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert_close(f"fused {form} {hw}", ref, out, 1e-5)
    if hw != (224, 224):
        # The windows were padded: padding the fused block with zeros would be wrong.
        for blk in fused.modules():
            if isinstance(blk, swin.SwinBlock):
                blk.pad_value = None
        with torch.no_grad():
            assert (fused(x) - ref).abs().max() / ref.abs().max() > 1e-4


def test_deploy_loads_fused_state():
    model = randomize_bn_stats(_small())
    fused = slab.fuse(model)
    deploy = slab.create_model("slab_swin_tiny_patch4_224", deploy=True, **SMALL)
    deploy.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 3, 168, 200)
    with torch.no_grad():
        assert_close("deploy", model(x), deploy(x), 1e-5)
    assert slab.fuse(deploy) is not None  # fusing twice is harmless


@pytest.mark.parametrize("hw", [(4, 4), (8, 12), (36, 60), (96, 256), (448, 448)])
def test_any_input_size(hw):
    model = _small()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *hw)).shape == (1, 7)


def test_windows_and_masks():
    blk = _small(attn_type="SSSS").layers[1].blocks[1]
    assert blk.window_shift((56, 56)) == ((7, 7), (3, 3))
    assert blk.window_shift((5, 10)) == ((5, 7), (0, 3))
    assert swin.shifted_window_mask((7, 7), (7, 7), (0, 0)) is None
    mask = swin.shifted_window_mask((14, 14), (7, 7), (3, 3))
    assert mask.shape == (4, 49, 49) and mask[0].eq(0).all() and mask[3].lt(0).any()
    table = torch.randn(13 * 13, 2)
    # The centre of a 7x7 table serves a 3x3 window exactly.
    small = swin.resize_bias_table(table, (7, 7), (3, 3))
    grid = table.t().reshape(2, 13, 13)
    assert torch.equal(small.t().reshape(2, 5, 5), grid[:, 4:9, 4:9])
    assert swin.resize_bias_table(table, (7, 7), (9, 9)).shape == (17 * 17, 2)


def test_timm_swin_checkpoint_ln_form():
    """timm's Swin (LayerNorm) loads into norm='ln' through checkpoint_filter_fn and computes the same."""
    ref = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4),
                            num_classes=7).eval()
    model = _small("swin_tiny_prepbn_patch4_window7_224", norm="ln")
    load_checkpoint_strict(model, ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_close("timm swin", ref(x), model(x), 1e-5)


def test_interface():
    model = _small()
    nwd = model.no_weight_decay()
    assert any(k.endswith("positional_encoding") for k in nwd)
    assert any(k.endswith("relative_position_bias_table") for k in nwd)
    assert not any(k.endswith("relative_position_index") or k.endswith("attn_mask") for k in model.state_dict())
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)
    fused = slab.fuse(randomize_bn_stats(model))  # no head: the final norm becomes a channel affine
    assert not remaining_norms(fused)
    model.train().set_grad_checkpointing(True)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert swin.PAPER_TOP1["slab_swin_tiny_patch4_224"] == 81.8
    assert set(swin.AUTHORS_CHECKPOINTS.values()) <= set(slab.list_models())
    assert set(swin.AUTHORS_CHECKPOINTS) <= set(slab.AUTHORS_CHECKPOINTS)


def test_bad_inputs():
    model = _small()
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(1, 3, 222, 224))
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match="attn_type"):
        _small(attn_type="LLS")
    with pytest.raises(ValueError, match="patch_size"):
        _small(img_size=230)
    with pytest.raises(ValueError, match="cannot be folded"):
        slab.fuse(_small(norm="ln"))
