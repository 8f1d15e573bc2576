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
