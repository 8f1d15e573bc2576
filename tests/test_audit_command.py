"""``jaxunlearn audit`` end to end on tiny random Llama directories, and its input checks."""

import json

import numpy as np
import pytest
from _audit_tiny import (
    FORGET,
    HOLDOUT,
    RETAIN,
    build_tokenizer,
    hf_model,
    llama_config,
    torch_answer_loss,
)

from jaxunlearn import cli
from jaxunlearn.cli import audit as command
from jaxunlearn.eval.inference import tokenize_items


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    tok = build_tokenizer()
    target = hf_model(llama_config(tok), seed=0)
    unlearned = hf_model(target.config, seed=1, noise=0.03, base=target)
    oracle = hf_model(target.config, seed=2, noise=0.05)
    other = hf_model(llama_config(tok, vocab=96), seed=3)
    paths = {"root": root, "hf_unlearned": unlearned, "tok": tok}
    for name, model in (
        ("target", target),
        ("unlearned", unlearned),
        ("oracle", oracle),
        ("other", other),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    paths["forget"] = write_jsonl(root / "forget.jsonl", FORGET[:10])
    plain = [{"question": r["question"], "answer": r["answer"]} for r in FORGET[:10]]
    paths["forget_plain"] = write_jsonl(root / "forget_plain.jsonl", plain)
    paths["holdout"] = write_jsonl(root / "holdout.jsonl", HOLDOUT[:10])
    paths["retain"] = write_jsonl(root / "retain.jsonl", RETAIN[:4])
    paths["prompts"] = write_jsonl(
        root / "prompts.jsonl", [{"question": r["question"]} for r in RETAIN[:6]]
    )
    return paths


def argv(ws, out, *extra, holdout=None, model=None, oracle=True, forget="forget"):
    return [
        "--model", model or ws["unlearned"], "--target", ws["target"],
        *(["--oracle", ws["oracle"]] if oracle else []), "--forget", ws[forget], "--holdout", holdout or ws["holdout"], "--retain", ws["retain"],
        "--out", str(out), "--template", "raw", "--trace-prompts", ws["prompts"],
        "--relearn-steps", "0,1", "--relearn-fraction", "0.2", "--relearn-lr", "1e-3",
        "--bits", "4", "--group-size", "16", "--folds", "2", "--max-length", "64",
        *extra,
    ]  # fmt: skip


def _check_common(ws, res, out, printed, checks, oracle=True):
    assert set(res["verdicts"]) == {"forgetting", *checks}
    assert all(line.split()[0] in ("PASS", "FAIL", "N/A") for line in res["verdicts"].values())
    assert all(line in printed for line in res["verdicts"].values())
    assert set(res["seconds"]) == {"baseline", *checks}
    assert "## Verdicts" in (out / "AUDIT.md").read_text()
    # Baseline forget probability of the unlearned model, recomputed with torch.
    examples = tokenize_items(ws["tok"], FORGET[:10], "raw", max_length=64)
    want = np.exp(-np.array([torch_answer_loss(ws["hf_unlearned"], e) for e in examples]))
    np.testing.assert_allclose(res["baseline"]["unlearned"]["per_item"]["prob"], want, rtol=2e-4)
    if oracle:
        assert res["baseline"]["oracle"]["aggregate"]["forget_quality"] == pytest.approx(1.0)
    logs = json.loads((out / "items" / "AUDIT_unlearned_EVAL.json").read_text())
    assert logs["baseline/prob"]["value_by_index"]["3"]["score"] == pytest.approx(want[3], rel=2e-4)
    return logs


def test_audit_writes_report(ws, capsys):
    """One quick check end to end, without an oracle or perturbed answers (all: slow test)."""
    out = ws["root"] / "report"
    args = argv(ws, out, oracle=False, forget="forget_plain")
    assert cli.main(["audit", *args, "--checks", "trace", "--batch-size", "16"]) == 0
    res = json.loads((out / "AUDIT.json").read_text())  # strict JSON: NaN would not parse
    logs = _check_common(ws, res, out, capsys.readouterr().out, ("trace",), oracle=False)
    assert set(res["trace"]) == {"target_vs_unlearned", "n_prompts"}
    assert set(res["baseline"]) == {"target", "unlearned"}
    assert set(res["utility"]) == {"target", "unlearned"}
    assert "## Unlearning-trace detection" in (out / "AUDIT.md").read_text()
    assert set(logs) == {"baseline/prob"}


@pytest.mark.slow
def test_full_audit_writes_report(ws, capsys):
    out = ws["root"] / "full"
    assert cli.main(["audit", *argv(ws, out)]) == 0
    res = json.loads((out / "AUDIT.json").read_text())
    logs = _check_common(ws, res, out, capsys.readouterr().out, command.CHECKS)
    md = (out / "AUDIT.md").read_text()
    assert "## Quantization" in md and "| layer |" in md and "## Relearning" in md
    assert (out / "plots" / "relearning.png").stat().st_size > 1000
    assert (out / "plots" / "probe_layers.png").stat().st_size > 1000
    q, b = res["quantization"]["4"], res["baseline"]
    u, t = b["unlearned"]["aggregate"]["prob"], b["target"]["aggregate"]["prob"]
    want = (q["unlearned"]["aggregate"]["prob"] - u) / (t - u)
    assert q["unlearned"]["recovery"]["prob"] == pytest.approx(want)
    assert len(res["probe"]["target"]["accuracy"]) == 2
    rl = res["relearning"]
    assert len(rl["relearn_items"]) == 2 and len(rl["measured_items"]) == 8
    assert rl["steps"] == [0, 1] and len(rl["models"]["oracle"]["losses"]) == 1
    assert set(logs["relearn1/prob"]["value_by_index"]) == {str(i) for i in rl["measured_items"]}
    assert {"remind/loss0", "quant4/truth_ratio", "probe/layer1_p_forget"} <= set(logs)
    # --retain (4 retain_perturbed items, 2 folds): REMIND's 3-class AUC and the paraphrase
    # check (forget and retain items both carry TOFU paraphrases) are in the report.
    for role in ("target", "unlearned", "oracle"):
        r = res["remind"][role]
        assert 0.0 <= r["auc3_forget_retain_holdout"] <= 1.0
        assert set(r["tpr_at_1fpr"]) == set(r["auc"])
        assert len(r["paraphrase_forget_vs_retain"]["retain"]) == 4
    assert "TPR at 1% FPR" in md and "forget / retain / holdout" in md and "Paraphrase" in md
    from scipy.stats import ks_2samp

    models = rl["models"]
    for i in range(2):
        tr_u = models["unlearned"]["per_item"]["truth_ratio"][i]
        tr_o = models["oracle"]["per_item"]["truth_ratio"][i]
        want = ks_2samp(tr_u, tr_o).pvalue
        assert models["unlearned"]["aggregate"]["forget_quality_vs_attacked_oracle"][
            i
        ] == pytest.approx(want)
    assert models["oracle"]["aggregate"]["forget_quality_vs_attacked_oracle"] == [1.0, 1.0]
    q = res["quantization"]["4"]
    want = ks_2samp(
        q["unlearned"]["per_item"]["truth_ratio"], q["oracle"]["per_item"]["truth_ratio"]
    ).pvalue
    assert q["unlearned"]["aggregate"]["forget_quality_vs_attacked_oracle"] == pytest.approx(want)
    assert set(res["trace"]) == {"target_vs_unlearned", "target_vs_oracle", "n_prompts"}


@pytest.fixture
def no_model_loading(monkeypatch):
    import jaxunlearn.checkpoints

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the input checks failed")

    monkeypatch.setattr(jaxunlearn.checkpoints, "load_pretrained", fail)


def _error(ws, capsys, args):
    assert cli.main(["audit", *args]) == 2
    return capsys.readouterr().err


def test_different_vocabulary_is_rejected(ws, capsys, no_model_loading, tmp_path):
    err = _error(ws, capsys, argv(ws, tmp_path / "o", model=ws["other"]))
    assert "--model" in err and "vocab_size (96 vs 128)" in err


def test_holdout_overlapping_forget_is_rejected(ws, capsys, no_model_loading, tmp_path):
    overlap = write_jsonl(tmp_path / "h.jsonl", HOLDOUT[:9] + [FORGET[4]])
    err = _error(ws, capsys, argv(ws, tmp_path / "o", holdout=overlap))
    assert "--holdout overlaps --forget" in err and "holdout line 10 = forget line 5" in err


def test_too_few_items_for_cv_are_rejected(ws, capsys, no_model_loading, tmp_path):
    few = write_jsonl(tmp_path / "h.jsonl", HOLDOUT[:2])
    err = _error(ws, capsys, [*argv(ws, tmp_path / "o", holdout=few), "--folds", "3"])
    assert "probe/REMIND" in err and "class 0 has 2 items, fewer than the 3" in err
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "q?"}])
    err = _error(ws, capsys, [*argv(ws, tmp_path / "o"), "--trace-prompts", prompts])
    assert "trace (--trace-prompts)" in err


def test_other_bad_inputs(ws, capsys, no_model_loading, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not an empty folder" in _error(ws, capsys, argv(ws, tmp_path / "full"))
    err = _error(ws, capsys, [*argv(ws, tmp_path / "o"), "--checks", "probe,magic"])
    assert "unknown check(s) ['magic']" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    err = _error(ws, capsys, [*argv(ws, tmp_path / "o", holdout=str(bad))])
    assert "--holdout file" in err and "answer" in err
    err = _error(ws, capsys, [*argv(ws, tmp_path / "o"), "--template", "chat"])
    assert "chat template" in err


def _results(prob_t=0.8, prob_u=0.2, q_u=0.3, q_o=0.05, rl_u=0.9, rl_o=0.5, probe=(0.9, 0.55)):
    base = {r: {"aggregate": {"prob": p}} for r, p in (("target", prob_t), ("unlearned", prob_u))}
    return {
        "baseline": base,
        "quantization": {
            "8": {"unlearned": {"recovery": {"prob": 0.0}}},
            "4": {"unlearned": {"recovery": {"prob": q_u}}, "oracle": {"recovery": {"prob": q_o}}},
        },
        "relearning": {
            "steps": [0, 50],
            "relearn_items": [1],
            "measured_items": [0, 2],
            "models": {
                "unlearned": {"recovery": {"prob": [0.0, rl_u]}},
                "oracle": {"recovery": {"prob": [0.1, rl_o]}},
            },
        },  # fmt: skip
        "probe": {
            "unlearned": {"best_accuracy": probe[0], "best_layer": 3},
            "oracle": {"best_accuracy": probe[1]},
        },
        "trace": {"target_vs_unlearned": {"accuracy": 0.55}, "n_prompts": 40},
    }


def test_verdict_rules():
    from jaxunlearn.audit import report

    v = report.verdicts(_results())
    assert v["forgetting"].startswith("PASS")  # 0.2 <= 0.5 * 0.8
    assert v["quantization"].startswith("FAIL") and "4-bit" in v["quantization"]  # 0.3 > 0.15
    assert v["relearning"].startswith("FAIL") and "pass at <= 0.6" in v["relearning"]
    assert v["probe"].startswith("FAIL")  # |0.9 - 0.5| > |0.55 - 0.5| + 0.1
    assert v["trace"].startswith("PASS")
    v = report.verdicts(_results(prob_u=0.6, q_u=0.1, rl_u=0.55, probe=(0.6, 0.55)))
    assert v["forgetting"].startswith("FAIL") and v["quantization"].startswith("PASS")
    assert v["probe"].startswith("PASS") and v["relearning"].startswith("PASS")
    v = report.verdicts(_results(prob_u=0.79))  # a 1% change: recovery is noise
    assert (
        v["quantization"].startswith("N/A quantization") and "not meaningful" in v["quantization"]
    )
