"""``slab study``: the short version of the committed study (docs/study.md), and its verdicts."""
import json
import math

import pytest

from slab.train.study import CLAIMS, RECIPES, VARIANTS, markdown_table, run_study, summarise, verdicts


def _row(variant, top1, diverged=0):
    return {"variant": variant, "top1": top1, "top1_recal": top1, "diverged": diverged}


def test_every_variant_has_a_recipe_and_a_claim():
    assert set(RECIPES) == set(VARIANTS) == set(CLAIMS)
    for variant, (norm, _) in VARIANTS.items():
        assert "epochs" not in RECIPES[variant]  # one length for the whole study
        assert ("prepbn_transition" in RECIPES[variant]) == (norm == "prepbn")


def test_verdicts_follow_the_paper_claims():
    agreeing = [_row("ln", 88.0), _row("bn", 87.0), _row("repbn", 88.1), _row("prepbn", 88.3),
                _row("prepbn+sla", 87.9)]
    assert verdicts(agreeing) == {"ln": None, "bn": True, "repbn": True, "prepbn": True, "prepbn+sla": True}
    disagreeing = [_row("ln", 88.0), _row("bn", 88.5), _row("repbn", 88.4), _row("prepbn", 87.6),
                   _row("prepbn+sla", 86.9)]
    assert verdicts(disagreeing) == {"ln": None, "bn": False, "repbn": False, "prepbn": False, "prepbn+sla": False}
    # a diverged plain-BN run is the paper's "unstable", whatever the other seed reached
    assert verdicts([_row("ln", 88.0), _row("bn", 89.0, diverged=1)])["bn"] is True
    # a claim against a variant that was not run has no verdict
    assert verdicts([_row("prepbn", 88.0)]) == {"prepbn": None}


@pytest.mark.xdist_group("fmnist")
def test_short_study_writes_runs_summary_and_table(tmp_path):
    results = run_study(str(tmp_path), variants=["ln", "prepbn"], seeds=(0,), max_steps=3, jobs=1,
                        recal_batches=2, log=lambda s: None)
    assert [(r["variant"], r["seed"], r["diverged"]) for r in results] == [("ln", 0, False), ("prepbn", 0, False)]
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["meta"]["max_steps"] == 3 and len(saved["runs"]) == 2
    for r in results:
        assert r["steps"] == 3 and 0.0 <= r["top1_recal"] <= 100.0 and math.isfinite(r["final_loss"])
        assert (tmp_path / "runs" / f"{r['variant']}_seed0" / "metrics.jsonl").is_file()
    rows = summarise(results)
    assert [r["agrees"] for r in rows] == [None, rows[1]["top1_recal"] >= rows[0]["top1"] - 0.3]
    table = markdown_table(rows)
    assert "PRepBN >= LN - 0.3" in table and table.count("\n") == 3
