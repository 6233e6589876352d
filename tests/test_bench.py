"""The benchmark suite runs, on tiny sizes, and writes its JSON, plot and tables (no timing assertions)."""
import json

import pytest
import torch

import slab
from slab.bench.attention import attention_by_tokens, plot_attention_by_tokens, sla_gpu_by_tokens, sla_op_speed
from slab.bench.latency import count_gflops, count_params
from slab.bench.machine import machine_info
from slab.bench.models import FAMILY_MODELS, build_forms, build_norm_form, bench_model
from slab.bench.norms import model_training_cost, norm_training_cost
from slab.bench.run import _prepbn_gpu_markdown, _sla_gpu_markdown, render_markdown
from slab.bench.timing import compare, time_fn
from slab.reparam.fuse import remaining_norms


def test_compare_interleaves_and_reports():
    calls = []
    res = compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then round-robin
    for t in res.values():
        assert len(t.samples) == 3 and t.best <= t.robust <= max(t.samples)
        assert set(t.as_dict()) == {"best_s", "p20_s", "median_s", "repeats"}
    assert len(time_fn(lambda: None, repeats=2, clock="cpu").samples) == 2
    with pytest.raises(ValueError, match="clock"):
        compare({"a": lambda: None}, clock="gpu")


def test_machine_info_fields():
    info = machine_info()
    assert {"cpu", "logical_cores", "torch_threads", "torch", "gpu"} <= set(info)


def test_family_models_are_registered_and_every_form_builds():
    assert set(FAMILY_MODELS.values()) <= set(slab.list_models())
    forms = build_forms("slab_deit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2)
    assert list(forms) == ["LN", "PRepBN", "fused", "none"]
    assert not remaining_norms(forms["fused"]) and not remaining_norms(forms["none"])
    assert any(isinstance(m, torch.nn.LayerNorm) for m in forms["LN"].modules())
    assert all(not m.training for m in forms.values())
    x = torch.randn(1, 3, 224, 224)
    # the fused model keeps its final norm as a per-channel affine (so forward_features means the same before and
    # after fusion): exactly 2 x embed_dim parameters over the norm-free bound
    assert count_params(forms["fused"]) == count_params(forms["none"]) + 2 * 32
    assert count_gflops(forms["fused"], x) == pytest.approx(count_gflops(forms["none"], x))
    # SLAB-DeiT entry points pin norm='prepbn': the LN form is the same architecture from the DeiT entry point.
    ln = build_norm_form("slab_deit_tiny_patch16_224", "ln", embed_dim=32, depth=1, num_heads=2)
    assert ln.attn_kind == "sla" and ln.global_pool == "avg" and ln.num_prefix_tokens == 0


def test_bench_model_small():
    r = bench_model("slab_deit_nano_patch4_28", batch_sizes=(1, 2), backends=("eager", "onnxruntime"), repeats=2,
                    max_time=5, depth=1)
    assert set(r["latency_ms"]) == {"eager", "onnxruntime"}, r["notes"]
    for by_batch in r["latency_ms"].values():
        assert set(by_batch) == {"1", "2"}
        for v in by_batch.values():
            assert set(v["ms"]) == {"LN", "PRepBN", "fused", "none"}
            assert v["ratios"]["LN"]["vs_LN"] == 1.0 and v["ratios"]["none"]["vs_none"] == 1.0


def test_attention_and_sla_sections(tmp_path):
    r = sla_op_speed(batch=1, heads=2, tokens=64, head_dim=8, repeats=2)
    assert r["speedup_forward"] > 0 and r["bandwidth_bound_ms"] > 0
    a = attention_by_tokens((16, 64), repeats=2)
    assert [row["tokens"] for row in a["rows"]] == [16, 64]
    assert {"SLA (fast)", "softmax (SDPA)", "SLA (einsum)"} <= set(a["rows"][0])
    path = plot_attention_by_tokens(a, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000 and path.endswith("p.png")


def test_modules_section_times_sla_softmax_and_the_dwc_share():
    from slab.bench.attention import attention_modules
    from slab.bench.run import render_markdown
    r = attention_modules(16, widths=((16, 2),), batches=(1, 2), repeats=2, compiled=False)
    assert [(row["dim"], row["batch"]) for row in r["rows"]] == [(16, 1), (16, 2)]
    for row in r["rows"]:
        assert {"SLA", "softmax (SDPA)", "SLA without DWC"} <= set(row) and row["sla_over_softmax"] > 0
        assert row["dwc_share"] < 1.0
    md = render_markdown({"machine": {"cpu": "x", "logical_cores": 2, "torch_threads": 1, "torch": "t", "gpu": None},
                          "config": {}, "modules": r})
    assert "### Attention modules at N = 16" in md and md.count("| 16 / 2 |") == 2
    with pytest.raises(ValueError, match="square token count"):
        attention_modules(15, repeats=1, compiled=False)


def test_sla_gpu_section_skips_without_a_gpu_and_renders():
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in sla_gpu_by_tokens((16,))["skipped"]
    assert "Skipped: why." in "\n".join(_sla_gpu_markdown({"skipped": "why"}))
    ms = {"SLA torch": 2.0, "SLA triton": 1.0, "softmax (SDPA)": 3.0}
    row = {"tokens": 196, "dtype": "float16", "forward_ms": ms, "forward_backward_ms": ms,
           "triton_rel_error_vs_reference": 1e-4}
    text = "\n".join(_sla_gpu_markdown({"gpu": "G", "batch": 8, "heads": 3, "head_dim": 32, "rows": [row]}))
    assert "| float16 | 196 | 2.000 | 1.000 | 3.000 |" in text and "1.0e-04" in text


def test_prepbn_gpu_section_skips_without_a_gpu_and_renders():
    from slab.bench.norms import prepbn_gpu_cost
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in prepbn_gpu_cost(((16, 8),))["skipped"]
    assert "Skipped: why." in "\n".join(_prepbn_gpu_markdown({"skipped": "why"}))
    ms = {"LayerNorm": 1.0, "PRepBN torch (lam=0.5)": 3.0, "PRepBN triton (lam=0.5)": 1.5}
    row = {"tokens": 12608, "channels": 384, "dtype": "bfloat16", "forward_ms": ms, "forward_backward_ms": ms,
           "not_run": {"PRepBN torch (lam=0)": "RuntimeError: no"}, "triton_rel_error_vs_reference": 2e-3}
    text = "\n".join(_prepbn_gpu_markdown({"gpu": "G", "unit": "ms", "rows": [row]}))
    assert "| bfloat16 | 12608 x 384 | 1.000 | 3.000 | 1.500 |" in text and "2.0e-03" in text and "(G; ms)" in text
    assert "bfloat16 PRepBN torch (lam=0): not run (RuntimeError: no)" in text


def test_norm_and_training_sections():
    r = norm_training_cost((2, 16, 8), repeats=2)
    assert set(r["ratios"]) == {"transition_vs_ln", "after_vs_bn", "repbn_vs_bn"}
    t = model_training_cost("slab_deit_nano_patch4_28", batch=4, repeats=1, depth=1)
    assert set(t["step_ms"]) == {"LN", "BN", "PRepBN transition (lam=0.5)", "PRepBN after (lam=0)"}


def test_cli_bench_writes_json_plot_and_tables(tmp_path, capsys):
    from slab.cli import main
    md = tmp_path / "tables.md"
    rc = main(["bench", "--quick", "--output", str(tmp_path), "--sections", "sla,attention", "--tokens", "16,64",
               "--markdown", str(md)])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {"machine", "config", "sla_op", "attention"} <= set(result)
    assert (tmp_path / "attention_latency.png").is_file()
    text = md.read_text()
    assert "SLA op vs the einsum" in text and "| 64 |" in text
    assert render_markdown(result) == (tmp_path / "bench.md").read_text()
    assert main(["bench", "--sections", "bogus"]) == 2
    assert main(["bench", "--families", "nope"]) == 2


def test_models_gpu_section_skips_without_a_gpu_runs_on_any_device_and_renders():
    from slab.bench.models import bench_models_on_device
    from slab.bench.run import _models_gpu_markdown
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in bench_models_on_device()["skipped"]
    assert "Skipped: why." in "\n".join(_models_gpu_markdown({"skipped": "why"}))
    # The same measurement on the CPU (the 28x28 SLAB-DeiT, float32): the four forms, timed, with ratios.
    r = bench_models_on_device(("slab_deit_nano_patch4_28",), batch=2, dtype="float32", device="cpu", repeats=2,
                               max_time=5.0)
    (row,) = r["rows"]
    assert set(row["ms"]) == {"LN", "PRepBN", "fused", "none"} and all(v > 0 for v in row["ms"].values())
    assert row["ratios"]["LN"]["vs_LN"] == 1.0
    assert row["images_per_s"]["fused"] == pytest.approx(2 / (row["ms"]["fused"] / 1e3))
    text = "\n".join(_models_gpu_markdown(r))
    assert "(cpu; batch 2, float32, forward, ms)" in text and "| slab_deit_nano_patch4_28 |" in text
