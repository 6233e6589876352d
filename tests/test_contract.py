"""The timm contract, registry-wide, between runs of timm's own suite (``make peer-test-timm``).

Every registered model, shrunk to a tiny configuration of its own architecture (same family, norm and
attention form; fewer and narrower blocks, small images) so the whole file stays fast: forward,
backward with a gradient for every parameter in each PRepBN phase, FX tracing with timm's notrace
lists, TorchScript (the model, its FX graph and its fused form), intermediates and pruning, gradient
checkpointing, construction on the meta device, fusion.
"""
import copy

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import slab
from slab.layers.attention import get_attn_layer
from slab.layers.norm import PRepBN, set_prepbn_lambda

from conftest import assert_close, randomize_bn_stats

NAMES = slab.list_models()

#: Per family: a tiny configuration (the registered form's norm and attention are kept).
TINY = {
    "deit": dict(img_size=32, embed_dim=32, depth=3, num_heads=2),
    "pvt": dict(img_size=64, embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1)),
    "pvt_v2": dict(img_size=64, embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1)),
    "swin": dict(img_size=64, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 1, 2, 2)),
    "cswin": dict(img_size=64, embed_dim=16, depth=(1, 2, 1, 1), num_heads=(2, 2, 4, 4)),
}

#: Per family: a registered model (any form) and the attention form of its blocks.
FAMILY_ATTN = {
    "deit": ("slab_deit_tiny_patch16_224", "global"),
    "pvt": ("pvt_tiny_prepbn", "spatial_reduction"),
    "pvt_v2": ("pvt_v2_b0_prepbn", "spatial_reduction"),
    "swin": ("swin_tiny_prepbn_patch4_window7_224", "window"),
    "cswin": ("cswin_tiny_prepbn_224", "stripe"),
}


def _family(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _tiny(name: str, **kwargs):
    cfg = TINY[_family(name)]
    model = slab.create_model(name, **{**cfg, **kwargs})
    size = cfg["img_size"]
    return model, torch.randn(2, model.in_chans, size, size)


def _tracer_kwargs() -> dict:
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


@pytest.mark.parametrize("attn", ["softmax", "sla"])
@pytest.mark.parametrize("family", list(FAMILY_ATTN))
def test_attn_word_sets_every_block_of_every_family(family, attn):
    name, form = FAMILY_ATTN[family]
    model, x = _tiny(name, attn=attn)
    types = {type(m) for m in model.modules()}
    other = "sla" if attn == "softmax" else "softmax"
    assert get_attn_layer(attn, form) in types and get_attn_layer(other, form) not in types
    out = model(x)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient_in_every_phase(name):
    model, x = _tiny(name)
    has_prepbn = any(isinstance(m, PRepBN) for m in model.modules())
    for lam in ((1.0, 0.5, 0.0) if has_prepbn else (None,)):
        if lam is not None:
            set_prepbn_lambda(model, lam)
        model.zero_grad(set_to_none=True)
        out = model.train()(x)
        assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
        out.mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"lam={lam}: no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_matches_and_trains(name):
    model, x = _tiny(name)
    randomize_bn_stats(model)
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=_tracer_kwargs())
    fx = create_feature_extractor(model.eval(), return_nodes=[eval_nodes[-1]], tracer_kwargs=_tracer_kwargs())
    with torch.no_grad():
        assert_close("fx eval", model(x), next(iter(fx(x).values())), 1e-6)
    fx.train()
    next(iter(fx(x).values())).mean().backward()
    assert not [n for n, p in fx.named_parameters() if p.grad is None]


@pytest.mark.parametrize("name", NAMES)
def test_intermediates_pruning_and_checkpointing(name):
    model, x = _tiny(name)
    model.eval()
    n = len(model.feature_info)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        assert len(taps) == n and all(t.dim() == 4 and t.shape[0] == 2 for t in taps)
        assert_close("final", model.forward_features(x), final, 0.0)
        for i in (0, n - 1):
            early = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            assert_close(f"stop_early {i}", taps[i], early[0], 0.0)
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i])
            assert_close(f"pruned {i}", taps[i], pruned.forward_intermediates(x, indices=take,
                                                                               intermediates_only=True)[0], 0.0)
        features = timm.create_model(name, features_only=True, **TINY[_family(name)]).eval()
        assert len(features(x)) == len(features.feature_info.channels())
        ref = model(x)
        model.set_grad_checkpointing(True)
        assert_close("checkpointed eval", ref, model(x), 1e-6)
    model.train()(x).mean().backward()


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_and_dtype(name):
    model = timm.create_model(name, device="meta", dtype=torch.bfloat16, **TINY[_family(name)])
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.bfloat16 for t in tensors if t.is_floating_point())
    model.reset_classifier(3)
    head = model.get_classifier()
    assert head.weight.device.type == "meta" and head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", [n for n in NAMES if "_repbn" in n or "prepbn" in n or n.startswith("slab_")])
def test_fusion_keeps_outputs_and_features(name):
    model, x = _tiny(name)
    randomize_bn_stats(model).eval()
    fused = slab.fuse(model)
    with torch.no_grad():
        assert_close("logits", model(x), fused(x), 1e-5)
        assert_close("forward_features", model.forward_features(x), fused.forward_features(x), 1e-5)



@pytest.mark.parametrize("name", NAMES)
def test_torchscript_matches_eager(name):
    # timm's suite scripts every model (test_model_forward_torchscript) and the FX graph of every model
    # (test_model_forward_fx_torchscript); scripted code takes the plain-op paths (no autograd Functions,
    # no Triton), which must compute what eager mode does. Every registered model is foldable: the fused
    # form scripts too.
    with timm.set_scriptable(True):
        model, x = _tiny(name)
    randomize_bn_stats(model).eval()
    _, nodes = get_graph_node_names(model, tracer_kwargs=_tracer_kwargs())
    fx = create_feature_extractor(model, return_nodes=[nodes[-1]], tracer_kwargs=_tracer_kwargs())
    fused = slab.fuse(model)
    with torch.no_grad():
        ref = model(x)
        assert_close("scripted", ref, torch.jit.script(model)(x), 1e-5)
        assert_close("scripted fx", ref, next(iter(torch.jit.script(fx)(x).values())), 1e-5)
        assert_close("scripted fused", fused(x), torch.jit.script(fused)(x), 1e-5)
