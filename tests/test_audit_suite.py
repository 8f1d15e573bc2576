"""`run_audit` argument checks and `robustness_summary`'s reduction to leaderboard columns."""

import pytest

from jaxunlearn.audit import suite


def test_run_audit_checks_roles_and_checks():
    with pytest.raises(ValueError, match=r"missing \['unlearned'\]"):
        suite.run_audit({"target": None}, None, [], [])
    with pytest.raises(ValueError, match=r"unknown \['retrained'\]"):
        suite.run_audit({"target": None, "unlearned": None, "retrained": None}, None, [], [])
    with pytest.raises(ValueError, match=r"unknown audit check\(s\) \['magic'\]"):
        suite.run_audit(
            {"target": None, "unlearned": None}, None, [], [],
            config=suite.AuditConfig(checks=("probe", "magic")),
        )  # fmt: skip


def test_robustness_summary_reads_the_last_step_and_fewest_bits(monkeypatch):
    seen = {}

    def fake_run_audit(models, tokenizer, forget, holdout, **kw):
        seen.update(models=sorted(models), config=kw["config"])
        unlearned = {
            "aggregate": {
                "prob": [0.1, 0.2, 0.3],
                "forget_quality": [0.5, 0.2, 0.05],
                suite.ATTACKED_FQ: [0.5, 0.3, 0.2],
            },
            "recovery": {"prob": [0.0, 0.4, 0.7]},
        }
        return {
            "relearning": {"models": {"unlearned": unlearned}},
            "quantization": {
                "8": {
                    "unlearned": {"aggregate": {"forget_quality": 0.4}, "recovery": {"prob": 0.01}}
                },
                "4": {
                    "unlearned": {
                        "aggregate": {"forget_quality": 0.1, suite.ATTACKED_FQ: 0.15},
                        "recovery": {"prob": 0.6},
                    }
                },
            },
            "probe": {"unlearned": {"best_accuracy": 0.8}, "oracle": {"best_accuracy": 0.55}},
            "trace": {"target_vs_unlearned": {"accuracy": 0.9}},
            "seconds": {"baseline": 1.0, "probe": 2.5},
        }

    monkeypatch.setattr(suite, "run_audit", fake_run_audit)
    config = suite.AuditConfig(relearn_steps=(0, 25, 50), bits=(8, 4))
    out = suite.robustness_summary("t", "u", "o", None, [], [], trace_prompts=[], config=config)
    assert seen["models"] == ["oracle", "target", "unlearned"] and seen["config"] is config
    assert out == {
        "fq_relearn50": 0.2, "fq_relearn50_static_oracle": 0.05, "recovery_relearn50": 0.7,
        "fq_quant4": 0.15, "fq_quant4_static_oracle": 0.1, "recovery_quant4": 0.6,
        "probe_best_accuracy": 0.8, "probe_best_accuracy_oracle": 0.55, "trace_accuracy": 0.9,
        "audit_seconds": 3.5,
    }  # fmt: skip
    out = suite.robustness_summary("t", "u", None, None, [], [], trace_prompts=[])
    assert seen["models"] == ["target", "unlearned"]
    assert seen["config"].relearn_steps == (0, 50) and seen["config"].bits == (4,)
    assert "remind" not in seen["config"].checks


def _fake_results():
    per = {"prob": [0.5, 0.25], "truth_ratio": [0.9, 1.1]}

    def measured(prob):
        return {"aggregate": {"prob": prob, "forget_quality": 0.3}, "per_item": per}

    roles = ("target", "unlearned", "oracle")
    curve = {
        "aggregate": {"prob": [0.2, 0.4], suite.ATTACKED_FQ: [0.5, 0.1]},
        "recovery": {"prob": [0.0, 0.5]},
        "per_item": {"prob": [[0.1], [0.3]]},
        "losses": [1.0],
    }
    return {
        "baseline": {r: measured(p) for r, p in zip(roles, (0.8, 0.2, 0.1))},
        "utility": {r: {"retain_prob": 0.9} for r in roles},
        "quantization": {
            "4": {
                **{r: {**measured(0.3), "recovery": {"prob": 0.1}} for r in roles},
                "changed_code_fraction": 0.4,
            }
        },
        "relearning": {
            "relearn_items": [1],
            "measured_items": [0],
            "steps": [0, 50],
            "models": {r: curve for r in roles},
        },  # fmt: skip
        "remind": {
            r: {
                "auc": {"loss0": 0.7, "classifier": 0.6},
                "features": ["loss0"],
                "forget": [[1.0]],
                "holdout": [[2.0]],
            }
            for r in roles
        },  # fmt: skip
        "probe": {
            r: {
                "layers": [0, 1],
                "accuracy": [0.6, 0.7],
                "auc": [0.6, 0.7],
                "best_layer": 1,
                "best_accuracy": 0.7,
                "proba": [[0.4, 0.6, 0.5], [0.3, 0.7, 0.5]],
                "groups": [0, 0, 1],
            }
            for r in roles
        },  # fmt: skip
        "trace": {"target_vs_unlearned": {"accuracy": 0.55, "auc": 0.6}, "n_prompts": 10},
        "seconds": {"baseline": 1.0},
    }


def test_write_report_files(tmp_path):
    import json

    from jaxunlearn.audit import report

    res = _fake_results()
    res["quantization"]["4"]["unlearned"]["recovery"]["prob"] = float("nan")
    paths = report.write_report(res, tmp_path, {"unlearned model": "u"})
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN became null
    assert data["quantization"]["4"]["unlearned"]["recovery"]["prob"] is None
    assert data["metadata"] == {"unlearned model": "u"} and set(data["verdicts"]) == {
        "forgetting", "quantization", "relearning", "remind", "probe", "trace",
    }  # fmt: skip
    md = paths["markdown"].read_text()
    for heading in ("Verdicts", "Quantization", "Relearning (1 items relearned, 1 measured)",
                    "REMIND", "Representation probe", "Unlearning-trace", "Utility", "Cost"):  # fmt: skip
        assert f"## {heading}" in md, heading
    assert "| 50 | unlearned | 0.4 | - | 0.1 | 0.5 |" in md
    assert "| 1 | 0.7 | 0.7 | 0.7 |" in md  # probe layer 1 for the three models
    assert paths["relearning"].stat().st_size > 1000 and paths["probe"].stat().st_size > 1000
    logs = json.loads(paths["items_unlearned"].read_text())
    assert logs["baseline/prob"]["value_by_index"]["1"]["score"] == 0.25
    assert logs["relearn50/prob"]["value_by_index"] == {"0": {"score": 0.3}}
    assert set(logs["remind/loss0"]["value_by_index"]) == {"forget_0", "holdout_0"}
    assert logs["probe/layer1_p_forget"]["value_by_index"]["1"]["score"] == 0.7
