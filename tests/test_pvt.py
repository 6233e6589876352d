"""PVT v1 / v2 (PRepBN, SLAB): authors' conformance, released manifests, every registered name, fusion, inputs."""
import json

import pytest
import torch
from conftest import FIXTURES, assert_close, load_fixture, randomize_bn_stats

import slab
from slab.models import pvt, pvt_v2
from slab.models._builder import load_checkpoint_strict
from slab.reparam.fold import NotFoldableError
from slab.reparam.fuse import remaining_norms

PVT_NAMES = sorted(n for n in slab.list_models() if "pvt" in n)
# Reduced widths (heads divide every width), one block per stage: fast at any registered name.
SMALL = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))


def _manifests() -> dict:
    return json.loads((FIXTURES / "released_checkpoints.json").read_text())


def _zeros(manifest: dict) -> dict:
    return {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, (shape, dtype) in manifest["state_dict"].items()}


def test_registered_names():
    expected = {f"pvt_{s}_prepbn" for s in ("tiny", "small", "medium", "large")}
    expected |= {f"slab_pvt_{s}" for s in ("tiny", "small", "medium", "large")}
    expected |= {f"pvt_v2_b{i}_prepbn" for i in range(6)} | {f"slab_pvt_v2_b{i}" for i in range(6)}
    assert expected == set(PVT_NAMES)
    assert set(pvt.PAPER_TOP1) <= set(PVT_NAMES)
    assert set(pvt.AUTHORS_CHECKPOINTS.values()) <= set(PVT_NAMES)


@pytest.mark.parametrize("name", ["pvt_prepbn", "slab_pvt", "slab_pvt_v2"])
def test_authors_fixture(name):
    record, state_dict, io = load_fixture(name)
    model = slab.load_authors_model(record, state_dict)
    assert sum(p.numel() for p in model.parameters()) == record["params"]
    with torch.no_grad():
        out = model(io["input"])
        assert (out - io["logits"]).abs().max().item() <= 1e-4
        fused = slab.fuse(model, warn_default_stats=False)
        assert not remaining_norms(fused)
        assert (fused(io["input"]) - io["logits"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("file", sorted(pvt.AUTHORS_CHECKPOINTS))
def test_released_manifest_loads(file):
    manifest = _manifests()[file]
    name = pvt.AUTHORS_CHECKPOINTS[file]
    assert slab.AUTHORS_CHECKPOINTS[file] == name
    model = slab.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == manifest["params"]
    load_checkpoint_strict(model, _zeros(manifest), name)


@pytest.mark.parametrize("name", PVT_NAMES)
def test_forward_backward_every_name(name):
    model = slab.create_model(name, num_classes=7, **SMALL)
    slab.set_prepbn_lambda(model, 0.5)  # both the LN and the RepBN branch take part
    model.train()
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert {"alpha" in n or "pos" in n for n in model.no_weight_decay()} == {True}


@pytest.mark.parametrize("name", ["slab_pvt_tiny", "pvt_v2_b0_prepbn"])
def test_features_only(name):
    model = slab.create_model(name, features_only=True, **SMALL).eval()
    feats = model(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(1, c, 96 // r, 128 // r) for c, r in
                                               zip(SMALL["embed_dims"], (4, 8, 16, 32))]
    assert model.feature_info.channels() == list(SMALL["embed_dims"])
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    two = slab.create_model(name, features_only=True, out_indices=(0, 2), **SMALL).eval()
    assert [f.shape[1] for f in two(torch.randn(1, 3, 64, 64))] == [16, 48]


@pytest.mark.parametrize("name", ["slab_pvt_tiny", "pvt_tiny_prepbn", "slab_pvt_v2_b0"])
def test_non_square_input(name):
    model = slab.create_model(name, **SMALL).eval()
    x = torch.randn(1, 3, 160, 224)
    feats = model.forward_features(x)
    assert feats.shape == (1, 64, 5, 7)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 64)
    # A model made for a non-square training size works at the square one too.
    other = slab.create_model(name, img_size=(160, 224), **SMALL).eval()
    assert other(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_bad_inputs():
    model = slab.create_model("slab_pvt_tiny", **SMALL).eval()
    with pytest.raises(ValueError, match="wrong channel count"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match=r"multiples of 32.*225x224.*256x224"):
        model(torch.randn(1, 3, 225, 224))
    v2 = slab.create_model("slab_pvt_v2_b0", **SMALL).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        v2(torch.randn(1, 3, 224, 100))
    with pytest.raises(ValueError, match="attn_type"):
        slab.create_model("slab_pvt_tiny", attn_type="LLX")
    with pytest.raises(ValueError, match="la_sr_ratios"):
        slab.create_model("slab_pvt_tiny", la_sr_ratios="11")
    with pytest.raises(ValueError, match="multiple of 32"):
        slab.create_model("pvt_tiny_prepbn", img_size=200)


def test_checkpoint_of_another_family():
    manifests = _manifests()
    # A PVT v1 checkpoint into a PVT v2 model of the same widths: names the keys that do not fit.
    model = slab.create_model("pvt_v2_b1_prepbn")
    with pytest.raises(ValueError) as err:
        load_checkpoint_strict(model, _zeros(manifests["pvt_tiny_prepbn.pth"]), "pvt_v2_b1_prepbn")
    msg = str(err.value)
    assert "missing" in msg and "norm1.ln.weight" in msg
    assert "unexpected" in msg and "pos_embed1" in msg
    assert "patch_embed1.proj.weight" in msg and "pvt_tiny_prepbn" in msg
    # A DeiT checkpoint into SLAB-PVT.
    model = slab.create_model("slab_pvt_tiny")
    with pytest.raises(ValueError, match=r"missing.*unexpected.*deit_tiny_repbn_patch16_224"):
        load_checkpoint_strict(model, _zeros(manifests["deit_tiny_prepbn.pth"]), "slab_pvt_tiny")


FUSE_CASES = [
    ("pvt_tiny_prepbn", {}),
    ("slab_pvt_tiny", {}),
    ("slab_pvt_tiny", dict(la_sr_ratios="4211")),  # SLA with K/V reduction: sr conv + norm, DWC on interpolated V
    ("slab_pvt_tiny", dict(attn_type="LLSS")),
    ("pvt_v2_b0_prepbn", {}),
    ("slab_pvt_v2_b0", dict(la_sr_ratios="8421")),
    ("slab_pvt_v2_b0", dict(num_classes=0)),  # last stage norm kept as an affine (no head to absorb it)
]


@pytest.mark.parametrize("name,extra", FUSE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FUSE_CASES)])
def test_fuse_matches_unfused(name, extra):
    extra = {"num_classes": 10, **extra}
    model = randomize_bn_stats(slab.create_model(name, **SMALL, **extra)).eval()
    fused = slab.fuse(model)
    assert not remaining_norms(fused)
    for shape in ((2, 3, 224, 224), (1, 3, 160, 224)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert_close(f"{name} {shape}", model(x), fused(x), 1e-5)


@pytest.mark.parametrize("name", ["pvt_tiny_prepbn", "slab_pvt_v2_b0"])
def test_fused_checkpoint_loads_into_deploy_model(name):
    model = randomize_bn_stats(slab.create_model(name, num_classes=5, **SMALL)).eval()
    fused = slab.fuse(model)
    deploy = slab.create_model(name, num_classes=5, deploy=True, **SMALL)
    load_checkpoint_strict(deploy, fused.state_dict(), name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(name, model(x), deploy.eval()(x), 1e-5)


@pytest.mark.parametrize("name", ["slab_pvt", "pvt_prepbn"])
def test_checkpoint_at_another_resolution(name):
    # Loading a 224 checkpoint into a 320 model resizes pos_embedI / positional_encoding as running the
    # 224 model at 320 does.
    record, state_dict, _ = load_fixture(name)
    model224 = slab.load_authors_model(record, state_dict)
    model320 = pvt.PyramidVisionTransformer(**dict(pvt.authors_args(record), img_size=320))
    load_checkpoint_strict(model320, state_dict, name)
    assert model320.pos_embed1.shape == (1, 80 * 80, 32)
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        assert_close(name, model224(x), model320.eval()(x), 1e-5)


def test_fuse_features_only_v2():
    model = randomize_bn_stats(slab.create_model("slab_pvt_v2_b0", features_only=True, **SMALL)).eval()
    fused = slab.fuse(model)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(model(x), fused(x))):
            assert_close(f"feature {i}", a, b, 1e-5)


def test_layernorm_form_is_not_foldable():
    model = slab.create_model("slab_pvt_tiny", norm="ln", **SMALL).eval()
    assert not any(isinstance(m, slab.PRepBN) for m in model.modules())
    with pytest.raises(NotFoldableError):
        slab.fuse(model)


def test_authors_classes_and_cfgs():
    assert set(pvt.AUTHORS_CLASSES) == {"slab_pvt.PyramidVisionTransformer"}
    assert set(pvt_v2.AUTHORS_CLASSES) == {"slab_pvt_v2.PyramidVisionTransformerV2"}
    model = slab.create_model("slab_pvt_tiny", **SMALL)
    assert model.pretrained_cfg["first_conv"] == "patch_embed1.proj"
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
