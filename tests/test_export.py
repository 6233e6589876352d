"""ONNX export: parity with PyTorch in ONNX Runtime for every family, refusals, and `slab export`.

One representative per family and form (SLAB / plain), taken from the registry at collection time, at
the reduced widths of ``test_fuse.REDUCED``; batch 2, and the dynamic batch checked at batch 3.
"""
import json

import pytest
import torch
import torch.nn as nn

import slab
from slab.reparam.export import FORBIDDEN_ONNX_OPS, ExportError, export_onnx, run_onnx, save_fused

from conftest import randomize_bn_stats
from test_fuse import reduced_kwargs

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _representatives() -> list[str]:
    """The first registered name of each (family module, SLAB or not) group."""
    import timm
    groups: dict[tuple[str, bool], str] = {}
    for name in slab.list_models():
        module = timm.models.get_arch_name(name) and timm.models._registry._model_entrypoints[name].__module__
        groups.setdefault((module, name.startswith("slab_")), name)
    return sorted(groups.values())


REPRESENTATIVES = _representatives()


def _model(name: str) -> nn.Module:
    return randomize_bn_stats(slab.create_model(name, **reduced_kwargs(name))).eval()


def test_representatives_cover_every_family():
    import timm
    modules = {timm.models._registry._model_entrypoints[n].__module__ for n in slab.list_models()}
    covered = {timm.models._registry._model_entrypoints[n].__module__ for n in REPRESENTATIVES}
    assert covered == modules and any(n.startswith("slab_deit") for n in REPRESENTATIVES)


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_onnx_parity(name, tmp_path):
    model = _model(name)
    c, h, w = model.pretrained_cfg["input_size"]
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(model, path, input_size=(2, c, h, w), dynamic_batch=True)
    assert path.is_file() and report["exporter"] == "dynamo"
    assert set(report["max_abs_diff"]) == {2, 3} and max(report["max_abs_diff"].values()) <= 1e-4
    assert not FORBIDDEN_ONNX_OPS & set(report["ops"])
    if getattr(model, "attn_kind", None) == "sla" or name.startswith("slab_"):
        assert {"MatMul", "Relu", "Div"} <= set(report["ops"]), report["ops"]
    assert "Einsum" not in report["ops"]
    # Independent check of the written file at yet another batch size.
    x = torch.randn(5, c, h, w)
    with torch.no_grad():
        want = slab.fuse(model)(x)
    assert (run_onnx(path, x) - want).abs().max().item() <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_static_batch_one(tmp_path):
    model = _model("slab_deit_nano_patch4_28")
    report = export_onnx(model, tmp_path / "n.onnx", input_size=(1, 1, 28, 28), dynamic_batch=False)
    assert list(report["max_abs_diff"]) == [1]
    proto = onnx.load(str(tmp_path / "n.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_refuses_normalization_and_leaves_no_file(tmp_path):
    path = tmp_path / "ln.onnx"
    ln = slab.create_model("slab_deit_nano_patch4_28", norm="ln").eval()
    with pytest.raises(ValueError, match="cannot be folded"):
        export_onnx(ln, path, input_size=(2, 1, 28, 28))
    with pytest.raises(ExportError, match=r"normalization modules: .*LayerNorm"):
        export_onnx(ln, path, input_size=(2, 1, 28, 28), fuse=False)
    # An unfused PRepBN model exported as is: refused as well (it would export as an unfolded affine).
    with pytest.raises(ExportError, match=r"normalization modules: .*PRepBN"):
        export_onnx(_model("slab_deit_nano_patch4_28"), path, input_size=(2, 1, 28, 28), fuse=False)
    assert list(tmp_path.iterdir()) == []

    # A normalization hidden in functional code (no module to find) is caught node by node in the graph.
    class Sneaky(nn.Module):
        is_fused = True

        def __init__(self):
            super().__init__()
            self.inner = slab.fuse(_model("slab_deit_nano_patch4_28"))

        def forward(self, x):
            return torch.nn.functional.layer_norm(self.inner(x), (5,))

    with pytest.raises(ExportError, match="still normalizes: .*LayerNormalization"):
        export_onnx(Sneaky().eval(), path, input_size=(2, 1, 28, 28))
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_check_keeps_previous_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match="disagree"):
        export_onnx(_model("slab_deit_nano_patch4_28"), path, input_size=(2, 1, 28, 28), atol=-1.0)
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_input_model_untouched_and_bad_arguments(tmp_path):
    model = _model("slab_deit_nano_patch4_28").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", input_size=(2, 1, 28, 28))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(model, tmp_path / "x.onnx", input_size=(1, 28, 28))
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, tmp_path / "x.onnx", input_size=(1, 1, 28, 28), exporter="tf")


def test_cli_export_from_fused_checkpoint_and_from_model(tmp_path, capsys):
    from slab.cli import main
    model = _model("slab_deit_nano_patch4_28")
    fused_path = tmp_path / "nano.safetensors"
    save_fused(slab.fuse(model), fused_path, "slab_deit_nano_patch4_28", reduced_kwargs("slab_deit_nano_patch4_28"))
    out = tmp_path / "nano.onnx"
    assert main(["export", "--fused", str(fused_path), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no normalization or Sqrt node" in text and "batch 2" in text
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert (run_onnx(out, x) - slab.fuse(model)(x)).abs().max().item() <= 1e-4
    ckpt = tmp_path / "trained.pth"
    torch.save(model.state_dict(), ckpt)
    out2 = tmp_path / "nano2.onnx"
    assert main(["export", "--model", "slab_deit_nano_patch4_28", "--checkpoint", str(ckpt), "--output", str(out2),
                 "--model-kwargs", '{"num_classes": 5}', "--static-batch"]) == 0
    with torch.no_grad():
        assert (run_onnx(out2, x[:1]) - slab.fuse(model)(x[:1])).abs().max().item() <= 1e-4
    assert main(["export", "--fused", str(fused_path), "--checkpoint", str(ckpt), "--output", str(out2)]) == 2


def test_cli_verify_passes_and_catches_a_tampered_artifact(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from slab.cli import main
    model = _model("slab_deit_nano_patch4_28")
    ckpt = tmp_path / "trained.pth"
    torch.save(model.state_dict(), ckpt)
    fused_path = tmp_path / "nano.safetensors"
    save_fused(slab.fuse(model), fused_path, "slab_deit_nano_patch4_28", {"num_classes": 5})
    onnx_path = tmp_path / "nano.onnx"
    export_onnx(model, onnx_path, input_size=(2, 1, 28, 28))
    base = ["verify", "--model", "slab_deit_nano_patch4_28", "--checkpoint", str(ckpt), "--model-kwargs",
            '{"num_classes": 5}', "--batches", "2"]
    assert main(base + ["--fused", str(fused_path), "--onnx", str(onnx_path)]) == 0
    assert "all checks passed" in capsys.readouterr().out
    assert main(["verify", "--fused", str(fused_path), "--onnx", str(onnx_path)]) == 0  # reference = fused file
    state = load_file(str(fused_path))
    state["head.bias"] = state["head.bias"] + 0.1
    save_file(state, str(fused_path), metadata={"slab": json.dumps({"format": "slab-fused", "model": "x"})})
    assert main(base + ["--fused", str(fused_path)]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert main(["verify", "--model", "slab_deit_nano_patch4_28"]) == 2
