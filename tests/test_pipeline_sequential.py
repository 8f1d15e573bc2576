"""`jaxunlearn demo --sequential K`: request slicing, per-request forget quality against scipy,
the table / JSON / plot, bad input before model work, and the tiny preset end to end (slow)."""

import json

import numpy as np
import pytest
from scipy.stats import ks_2samp

from jaxunlearn.audit.sequential import SequentialResult, SequentialRow
from jaxunlearn.pipeline import sequential as Q


def test_request_slices_cover_the_items_in_order():
    assert Q.request_slices(40, 2) == [range(0, 20), range(20, 40)]  # one author each
    parts = Q.request_slices(10, 3)
    assert [i for r in parts for i in r] == list(range(10))
    assert sorted(len(r) for r in parts) == [3, 3, 4]
    for bad in (0, 11):
        with pytest.raises(ValueError, match="--sequential"):
            Q.request_slices(10, bad)


def test_request_forget_quality_is_ks_on_the_same_items():
    rng = np.random.default_rng(0)
    ours, oracle = rng.random(40), rng.random(40) ** 2
    items = range(5, 25)
    want = ks_2samp(ours[5:25], oracle[5:25]).pvalue
    assert Q.request_forget_quality(ours, oracle, items) == pytest.approx(want)
    logs = {"forget_truth_ratio": {"value_by_index": {str(i): {"score": v} for i, v in
                                                       enumerate(ours)}}}  # fmt: skip
    np.testing.assert_array_equal(Q.truth_ratios(logs, 40), ours)
    with pytest.raises(ValueError, match="no items"):
        Q.truth_ratios(logs, 41)
    with pytest.raises(KeyError):
        Q.truth_ratios({}, 3)


def _fake_seq():
    rows = (
        SequentialRow(0, {0: {"forget_quality": 1e-4}, 1: {"forget_quality": 2e-4}},
                      {"model_utility": 0.9}, None),
        SequentialRow(1, {0: {"forget_quality": 0.3}, 1: {"forget_quality": 3e-4}},
                      {"model_utility": 0.85}, 1.0),
        SequentialRow(2, {0: {"forget_quality": 0.05}, 1: {"forget_quality": 0.4}},
                      {"model_utility": 0.7}, 2.0),
    )  # fmt: skip
    result = SequentialResult(None, rows)
    return Q.SequentialTofu("npo", [range(0, 20), range(20, 40)], result, [None, 0.3, 0.1],
                            [30, 30], 1.0)  # fmt: skip


def test_sequential_outputs(tmp_path):
    seq = _fake_seq()
    paths = Q.write_sequential(seq, tmp_path, "small")
    record = json.loads(paths["json"].read_text())
    assert record["requests"] == [[0, 20], [20, 40]]
    assert [r["requests_done"] for r in record["rows"]] == [0, 1, 2]
    assert record["rows"][2] == {
        "requests_done": 2, "model_utility": 0.7, "union_fq": 0.1,
        "fq_request_1": 0.05, "fq_request_2": 0.4,
    }  # fmt: skip
    md = paths["markdown"].read_text()
    assert "| 2 | 0.05 | 0.4 | 0.1 | 0.7 |" in md and "| 0 | 0.0001 | 0.0002 | - | 0.9 |" in md
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_demo_sequential_rejects_bad_input_before_model_work(tmp_path, capsys):
    from jaxunlearn import cli

    common = ["demo", "--preset", "tiny", "--out", str(tmp_path), "--cache-dir",
              str(tmp_path / "c"), "--no-progress"]  # fmt: skip
    assert cli.main([*common, "--sequential", "2", "--methods", "npo,ssd"]) == 2
    assert "one-shot" in capsys.readouterr().err
    assert cli.main([*common, "--sequential", "21", "--methods", "npo"]) == 2
    assert "1 <= k <= 20" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing was trained


@pytest.mark.slow
def test_sequential_tiny_end_to_end(tmp_path):
    """Two requests on tiny: the last row's union is the whole forget split, so its FQ must
    equal the KS test of the final model's TOFU logs against the oracle's (eval.report)."""
    from jaxunlearn.eval.report import forget_quality_from_logs, load_eval_logs

    (seq,) = Q.run_sequential(
        "tiny", ["gradascent"], 2, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
        progress=False, log=lambda _: None,
    )  # fmt: skip
    table = seq.table()
    assert [r["requests_done"] for r in table] == [0, 1, 2]
    assert all({"fq_request_1", "fq_request_2", "model_utility"} <= set(r) for r in table)
    # Row 0 is the target: its per-request FQ equals scipy on the target's own logs.
    evals = tmp_path / "out" / "evals" / "forget10"
    target = load_eval_logs(evals / "target" / "TOFU_EVAL.json")
    oracle = load_eval_logs(evals / "oracle" / "TOFU_EVAL.json")
    tr_t, tr_o = Q.truth_ratios(target, 20), Q.truth_ratios(oracle, 20)
    assert table[0]["fq_request_1"] == pytest.approx(ks_2samp(tr_t[:10], tr_o[:10]).pvalue)
    assert table[0]["fq_request_2"] == pytest.approx(ks_2samp(tr_t[10:], tr_o[10:]).pvalue)
    # Union after both = the whole split: the leaderboard's FQ of the final model, evaluated
    # again through the benchmark's own path (TOFU suite + eval.report's KS).
    from jaxunlearn.pipeline import TofuBenchmark

    bench = TofuBenchmark("tiny", out_dir=tmp_path / "again", cache_dir=tmp_path / "cache",
                          progress=False, log=lambda _: None)  # fmt: skip
    row = bench.evaluate(seq.result.model, "final")
    assert table[2]["union_fq"] == pytest.approx(row.metrics["forget_quality"], rel=1e-6)
    assert table[2]["model_utility"] == pytest.approx(row.metrics["model_utility"], rel=1e-6)
    # The target row's union is not reported (nothing requested yet); its whole-split FQ is
    # the leaderboard's target FQ.
    assert table[0]["union_fq"] is None
    assert forget_quality_from_logs(target, oracle) == pytest.approx(ks_2samp(tr_t, tr_o).pvalue)
    assert seq.paths["plot"].is_file()
