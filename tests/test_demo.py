"""``slab demo`` end to end on a few steps: the report's keys, the fusion checks, the plots, the verdicts."""
import json

import pytest

from slab.demo import FORMS, RECIPES, DemoConfig, run_demo, where_each_form_wins

ROW_NAMES = ["LN", "PRepBN unfused", "PRepBN fused", "SLAB unfused", "SLAB fused", "norm-free bound"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(output=str(out), max_steps=2, jobs=2, recalibrate_batches=1, latency_repeats=1,
                     scaling_repeats=1, scaling_sizes=(28, 56), progress=False)
    return run_demo(cfg), out


def test_report_has_the_issue_keys(report):
    rep, out = report
    assert json.loads((out / "report.json").read_text())["model"] == rep["model"]
    for key in ("model", "model_kwargs", "input_size", "rows", "fusion_checks", "timings", "machine"):
        assert key in rep
    assert [r["model"] for r in rep["rows"]] == ROW_NAMES
    for r in rep["rows"]:
        assert r["latency_ms_b1"] > 0 and r["latency_ms_b64"] > 0
        assert (r["top1"] is None) == (r["model"] == "norm-free bound")
    assert rep["recipes"]["LN"]["max_steps"] == 2 and "prepbn_transition" not in rep["recipes"]["LN"]


def test_fused_models_match_unfused_on_the_whole_test_set(report):
    rep, _ = report
    assert sorted(rep["fusion_checks"]) == ["PRepBN", "SLAB"]
    for check in rep["fusion_checks"].values():
        assert check["n"] == 10_000
        assert check["identical_predictions"]
        assert check["max_abs_logit_diff"] < 1e-3


def test_token_scaling_and_curves(report):
    rep, out = report
    assert [(r["tokens"], r["batch"]) for r in rep["token_scaling"]] == [(16, 1), (16, 4), (64, 1), (64, 4)]
    assert sorted(rep["top1_per_epoch"]) == sorted(FORMS)
    assert (out / "curves.png").stat().st_size > 0


def test_verdicts_say_where_each_form_wins():
    rows = [{"model": name, "top1": 90.0, "latency_ms_b1": 1.0, "latency_ms_b64": 10.0} for name in ROW_NAMES]
    rows[2].update(top1=89.0, latency_ms_b1=0.8, latency_ms_b64=9.0)  # PRepBN fused: faster, 1 point below
    rows[4].update(top1=90.2, latency_ms_b1=0.9, latency_ms_b64=11.0)  # SLAB fused: better, faster at b=1 only
    scaling = [{"tokens": 784, "batch": 1, "latency_ms": {"LN": 5.0, "PRepBN fused": 4.0, "SLAB fused": 2.0}}]
    lines = where_each_form_wins({"rows": rows, "token_scaling": scaling})
    assert "PRepBN fused vs LN: top-1 -1.00 points (MORE than 0.5 below LN)" in lines[0]
    assert "faster than LN" in lines[0]
    assert "top-1 +0.20 points (within 0.5 of LN or better)" in lines[1] and "mixed: faster at b=1" in lines[1]
    assert lines[-1].endswith("(SLA faster)")


def test_every_form_has_a_recipe():
    assert sorted(RECIPES) == sorted(FORMS)
