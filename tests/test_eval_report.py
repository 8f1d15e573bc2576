"""Tests for jaxunlearn.eval.report: open-unlearning-shaped logs, summaries, oracle lookups."""

import json
import os

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from jaxunlearn.eval import metrics as M
from jaxunlearn.eval import report as R


def make_logs(seed=0, n=20, ids=None):
    rng = np.random.default_rng(seed)
    ids = list(range(n)) if ids is None else ids
    para = rng.uniform(0.2, 3, n)
    pert = rng.uniform(0.2, 3, (n, 5))
    tr = M.truth_ratio(para, pert)
    gens = [f"answer {i}" for i in range(n)]
    gts = [f"the answer {i}" for i in range(n)]
    scores = M.rouge_scores(gens, gts)
    return {
        "forget_Q_A_PARA_Prob": R.probability_result(para, ids=ids),
        "forget_Q_A_PERT_Prob": R.probability_result(pert, ids=ids),
        "forget_truth_ratio": R.truth_ratio_result(tr, "closer_to_1_better", ids=ids),
        "forget_Q_A_ROUGE": R.rouge_result(
            scores, "rougeL_recall", ids=ids, ground_truths=gts, generations=gens
        ),
        "mia_min_k": R.mia_result(rng.normal(0, 1, n), rng.normal(0.5, 1, n + 3)),
        "model_utility": {"agg_value": 0.61},
    }, tr


def test_entries_have_open_unlearning_shape_and_values():
    logs, tr = make_logs()
    tr_entry = logs["forget_truth_ratio"]
    assert list(tr_entry["value_by_index"])[:3] == ["0", "1", "2"]
    assert tr_entry["value_by_index"]["3"] == {"score": pytest.approx(tr[3])}
    assert tr_entry["agg_value"] == pytest.approx(np.mean(np.minimum(tr, 1 / (tr + 1e-10))))
    true_better = R.truth_ratio_result(tr, "true_better")
    assert true_better["agg_value"] == pytest.approx(np.mean(np.maximum(0, 1 - tr)))

    pert = logs["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]
    assert len(pert["prob"]) == 5 and len(pert["avg_loss"]) == 5
    np.testing.assert_allclose(pert["prob"], np.exp(-np.array(pert["avg_loss"])))

    rouge = logs["forget_Q_A_ROUGE"]["value_by_index"]["1"]
    assert set(rouge) == {
        "rouge1_recall",
        "rougeL_f1",
        "rougeL_recall",
        "ground_truth",
        "generation",
    }

    mia = logs["mia_min_k"]
    f = [v["score"] for v in mia["forget"]["value_by_index"].values()]
    h = [v["score"] for v in mia["holdout"]["value_by_index"].values()]
    want_auc = roc_auc_score([0] * len(f) + [1] * len(h), f + h)
    assert mia["auc"] == mia["agg_value"] == pytest.approx(want_auc)
    with pytest.raises(ValueError, match="aggregator"):
        R.truth_ratio_result(tr, "prob_mean")


def test_round_trip_summary_markdown_and_metadata(tmp_path):
    logs, _ = make_logs()
    meta = R.eval_metadata(
        benchmark="TOFU",
        model_path="/models/tiny",
        split="forget10",
        n_items=20,
        prompt_format="llama2-chat",
        seed=3,
    )
    paths = R.write_eval_logs(logs, tmp_path / "out", "TOFU", metadata=meta)
    assert paths["eval"].name == "TOFU_EVAL.json"
    loaded = R.load_eval_logs(paths["eval"])
    assert loaded == R.load_eval_logs(tmp_path / "out")  # folder form
    meta_back = loaded.pop(R.METADATA_KEY)
    assert meta_back["model_path"] == "/models/tiny" and meta_back["seed"] == 3
    assert meta_back["jaxunlearn_version"] and meta_back["n_items"] == 20
    assert loaded == json.loads(json.dumps(logs))  # exact round trip of every entry
    assert list(json.loads(paths["eval"].read_text())) == sorted([*logs, R.METADATA_KEY])

    summary = json.loads(paths["summary"].read_text())
    assert summary == {k: v["agg_value"] for k, v in logs.items()}
    md = paths["markdown"].read_text()
    for name, value in summary.items():
        assert f"| {name} | {value:.4g} |" in md
    assert "/models/tiny" in md

    # What open-unlearning's ks_test / privleak / Evaluator.summarize read still works with
    # the metadata entry present.
    ou_scores = [e["score"] for e in loaded["forget_truth_ratio"]["value_by_index"].values()]
    assert len(ou_scores) == 20
    ou_summary = {
        k: v.get("agg_value") for k, v in json.loads(paths["eval"].read_text()).items() if k in logs
    }
    assert ou_summary == summary


def test_nan_items_are_written_as_null(tmp_path):
    entry = R.metric_result(np.array([0.5, np.nan, 1.0]), ids=[10, 11, 12])
    assert entry["value_by_index"]["11"] == {"score": None}
    assert entry["agg_value"] == pytest.approx(0.75)  # mean over non-None items, like OU
    paths = R.write_eval_logs({"extraction_strength": entry}, tmp_path)
    text = paths["eval"].read_text()
    assert (
        "NaN" not in text
        and json.loads(text)["extraction_strength"]["value_by_index"]["11"]["score"] is None
    )
    with pytest.raises(ValueError, match="3 ids for 2"):
        R.metric_result([1.0, 2.0], ids=[1, 2, 3])


def test_forget_quality_from_logs_aligns_by_id(tmp_path):
    rng = np.random.default_rng(1)
    ours = rng.lognormal(0, 0.5, 30)
    retain = rng.lognormal(0.1, 0.5, 30)
    ids = list(range(100, 130))
    our_logs = {"forget_truth_ratio": R.truth_ratio_result(ours, ids=ids)}
    # The retain logs as open-unlearning writes them: ids in another order, indent 4.
    order = rng.permutation(30)
    ou_retain = {
        "forget_truth_ratio": {
            "agg_value": 0.6,
            "value_by_index": {str(ids[i]): {"score": float(retain[i])} for i in order},
        },
        "model_utility": {"agg_value": 0.59},
    }
    retain_path = tmp_path / "retain" / "TOFU_EVAL.json"
    retain_path.parent.mkdir()
    retain_path.write_text(json.dumps(ou_retain, indent=4))
    got = R.forget_quality_from_logs(our_logs, retain_path)
    assert got == scipy.stats.ks_2samp(ours, retain).pvalue
    assert R.forget_quality_from_logs(our_logs, retain_path.parent) == got


def test_forget_quality_from_logs_names_mismatched_ids():
    ours = {"forget_truth_ratio": R.truth_ratio_result(np.ones(5), ids=[0, 1, 2, 3, 5])}
    retain = {"forget_truth_ratio": R.truth_ratio_result(np.ones(5), ids=[0, 1, 2, 3, 4])}
    with pytest.raises(ValueError, match=r"Missing from ours: \['4'\]; extra in ours: \['5'\]"):
        R.forget_quality_from_logs(ours, retain)
    with pytest.raises(KeyError, match="forget_truth_ratio"):
        R.forget_quality_from_logs({"model_utility": {"agg_value": 1.0}}, retain)
    bad = {"forget_truth_ratio": R.truth_ratio_result([1.0, np.nan, 1.0, 1.0, 1.0])}
    ok = {"forget_truth_ratio": R.truth_ratio_result(np.ones(5))}
    with pytest.raises(ValueError, match=r"items \['1'\] have no finite 'score'"):
        R.forget_quality_from_logs(bad, ok)


def test_privleak_from_logs_with_and_without_retain():
    ours = {"mia_min_k": {"agg_value": 0.9}}
    retain = {"mia_min_k": {"agg_value": 0.55}}
    assert R.privleak_from_logs(ours, retain) == pytest.approx((0.1 - 0.45) / 0.45 * 100)
    with pytest.warns(UserWarning, match="fallback"):
        assert R.privleak_from_logs(ours) == pytest.approx((0.1 - 0.5) / 0.5 * 100)
    with pytest.raises(KeyError, match="mia_min_k"):
        R.privleak_from_logs({}, retain)


def test_load_eval_logs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        R.load_eval_logs(tmp_path / "nope.json")
    (tmp_path / "A_EVAL.json").write_text("{}")
    (tmp_path / "B_EVAL.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="2 \\*_EVAL.json"):
        R.load_eval_logs(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        R.load_eval_logs(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        R.load_eval_logs(bad)


def test_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "TOFU_EVAL.json"
    R.atomic_write_text(target, '{"old": 1}')

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        R.atomic_write_text(target, '{"new": 2}')
    assert json.loads(target.read_text()) == {"old": 1}  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TOFU_EVAL.json"]  # no temp left
