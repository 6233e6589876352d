"""CSwin / SLAB-CSwin: the authors' fixture, the released manifest, fusion with padding, shapes, bad input."""
import json

import pytest
import timm
import torch

import slab
from slab.models._builder import load_checkpoint_strict
from slab.models.cswin import PAPER_TOP1, CSwinTransformer
from slab.reparam import NORM_TYPES

from conftest import FIXTURES, assert_close, load_fixture, randomize_bn_stats, authors_param_count

NAMES = ["cswin_tiny_prepbn_224", "cswin_small_prepbn_224", "cswin_base_prepbn_224",
         "slab_cswin_tiny_224", "slab_cswin_small_224", "slab_cswin_base_224"]
SMALL = dict(embed_dim=16, depth=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), num_classes=5)


def test_authors_fixture_logits_unfused_and_fused():
    record, sd, io = load_fixture("slab_cswin")
    model = slab.load_authors_model(record, sd)
    assert authors_param_count(model) == record["params"]
    with torch.no_grad():
        out = model(io["input"])
        fused = slab.fuse(model)(io["input"])
    assert (out - io["logits"]).abs().max() <= 1e-4
    assert (fused - io["logits"]).abs().max() <= 1e-4


def test_released_manifest_loads_strictly():
    entry = json.loads((FIXTURES / "released_checkpoints.json").read_text())["slab_cswin_tiny.pth"]
    name = slab.AUTHORS_CHECKPOINTS["slab_cswin_tiny.pth"]
    assert name == "slab_cswin_tiny_224" and PAPER_TOP1[name] == 82.8
    model = slab.create_model(name)
    assert authors_param_count(model) == entry["params"]
    sd = {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, (shape, dtype) in entry["state_dict"].items()}
    load_checkpoint_strict(model, sd, name)


def test_checkpoint_at_other_resolution_resizes_encodings():
    record, sd, _ = load_fixture("slab_cswin")
    model = CSwinTransformer(img_size=160, embed_dim=32, depth=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                             attn_type="LLSS", la_split_size="56-28-14-7", num_classes=10)
    load_checkpoint_strict(model, sd)
    assert model.stage1[0].attns[0].positional_encoding.shape == (1, 40 * 40, 32)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_every_name(name):
    model = slab.create_model(name, **SMALL)
    slab.set_prepbn_lambda(model, 0.5)
    out = model(torch.randn(2, 3, 96, 80))
    out.sum().backward()
    assert out.shape == (2, 5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("attn_type,la_split", [("SSSS", "56-28-14-7"), ("LLSS", "56-28-14-7"), ("LLLL", "1-2-7-7")])
@pytest.mark.parametrize("size", [(224, 224), (192, 256)])
def test_fuse_matches_with_random_statistics(attn_type, la_split, size):
    # (192, 256): stage 3 is 12x16, padded to 14x21 for its 7-wide stripes (SLA stripes too with LLLL).
    model = slab.create_model("slab_cswin_tiny_224", attn_type=attn_type, la_split_size=la_split, **SMALL)
    randomize_bn_stats(model).eval()
    x = torch.randn(2, 3, *size)
    fused = slab.fuse(model)
    assert not [n for n, m in fused.named_modules() if isinstance(m, NORM_TYPES)]
    assert fused.stage3[0].pad_value is not None
    with torch.no_grad():
        assert_close(attn_type, model(x), fused(x), 1e-5)


def test_deploy_form_loads_fused_state():
    model = randomize_bn_stats(slab.create_model("cswin_tiny_prepbn_224", **SMALL)).eval()
    fused = slab.fuse(model)
    deploy = slab.create_model("cswin_tiny_prepbn_224", deploy=True, **SMALL)
    deploy.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 3, 100, 120)
    with torch.no_grad():
        assert_close("deploy", model(x), deploy(x), 1e-5)


def test_layernorm_form_runs_and_refuses_fusion():
    model = slab.create_model("slab_cswin_tiny_224", norm="ln", **SMALL)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    with pytest.raises(ValueError, match="cannot be folded"):
        slab.fuse(model)


def test_features_only_and_interface():
    feats = timm.create_model("slab_cswin_tiny_224", features_only=True, **SMALL)
    assert feats.feature_info.channels() == [16, 32, 64, 128]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    outs = feats(torch.randn(2, 3, 224, 160))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 56, 40), (2, 32, 28, 20), (2, 64, 14, 10), (2, 128, 7, 5)]

    model = slab.create_model("cswin_tiny_prepbn_224", **SMALL).eval()
    x = torch.randn(1, 3, 70, 45)  # odd, non-square: grids 17x11, 9x6, 5x3, 3x2
    f = model.forward_features(x)
    assert f.shape == (1, 3, 2, 128)
    assert model.forward_head(f, pre_logits=True).shape == (1, 128)
    model.reset_classifier(3)
    assert model(x).shape == (1, 3)
    assert "stage1.0.norm1.repbn.alpha" in model.no_weight_decay()
    sla = slab.create_model("slab_cswin_tiny_224", **SMALL)
    assert "stage1.0.attns.0.positional_encoding" in sla.no_weight_decay()


def test_bad_inputs_speak():
    model = slab.create_model("slab_cswin_tiny_224", **SMALL)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="at least 3x3"):
        model(torch.randn(2, 3, 2, 64))
    with pytest.raises(ValueError, match="attn_type"):
        slab.create_model("slab_cswin_tiny_224", attn_type="LLX", **SMALL)
    with pytest.raises(ValueError, match="la_split_size"):
        slab.create_model("slab_cswin_tiny_224", la_split_size="56-28", **SMALL)
    with pytest.raises(ValueError, match="must be even"):
        slab.create_model("cswin_tiny_prepbn_224", **dict(SMALL, num_heads=(1, 2, 4, 4)))
    with pytest.raises(ValueError, match="slab_cswin_tiny_224"):
        slab.create_model("slab_cswin_tiny")
