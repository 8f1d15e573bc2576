"""REMIND's low-FPR and 3-class readings and paraphrase neighbourhoods, against numpy, torch
and plain sklearn."""

import numpy as np
import pytest
from _audit_tiny import FORGET, HOLDOUT, RETAIN, build_tokenizer, tiny_models, torch_answer_loss
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from test_audit_probes import plain_grouped_cv

from jaxunlearn.audit import remind
from jaxunlearn.eval.inference import tokenize_items


def plain_tpr_at_fpr(pos, neg, fpr):
    """Every threshold t: flag scores >= t; the best TPR whose FPR stays <= fpr."""
    best = 0.0
    for t in np.unique(np.r_[pos, neg]):
        if np.mean(neg >= t) <= fpr:
            best = max(best, float(np.mean(pos >= t)))
    return best


def test_tpr_at_fpr_matches_a_threshold_sweep():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pos = np.round(rng.normal(1.0, 1.0, 60), 1)  # rounding makes ties
        neg = np.round(rng.normal(0.0, 1.0, 300), 1)
        y, s = np.r_[np.ones(60), np.zeros(300)], np.r_[pos, neg]
        for fpr in (0.0, 0.01, 0.1):
            assert remind.tpr_at_fpr(y, s, fpr) == pytest.approx(plain_tpr_at_fpr(pos, neg, fpr))
    # A confident minority: 10% of positives far above every negative -> TPR@1% = 0.1.
    pos = np.r_[np.full(10, 9.0), rng.normal(0, 1, 90)]
    neg = rng.normal(0, 1, 200)
    assert remind.tpr_at_fpr(np.r_[np.ones(100), np.zeros(200)], np.r_[pos, neg]) >= 0.1
    with pytest.raises(ValueError, match="both positive and negative"):
        remind.tpr_at_fpr(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="fpr"):
        remind.tpr_at_fpr(np.r_[1, 0], np.r_[1.0, 0.0], 1.5)


def plain_multiclass_auc(x, y, folds, seed):
    proba = np.zeros((len(y), 3))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced")
        ).fit(x[tr], y[tr])
        proba[te] = clf.predict_proba(x[te])
    # Macro one-vs-rest written out: each class against the others, then the mean.
    return np.mean([roc_auc_score(y == c, proba[:, c]) for c in range(3)])


def test_multiclass_cv_auc_matches_plain_one_vs_rest():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 15)
    x = rng.normal(size=(45, 4)) + 2.0 * np.eye(4)[y]
    got = remind.multiclass_cv_auc(x, y, folds=3, seed=2)
    assert got == pytest.approx(plain_multiclass_auc(x, y, 3, 2), abs=1e-9)
    assert got > 0.9
    noise = remind.multiclass_cv_auc(rng.normal(size=(45, 4)), y, folds=3)
    assert noise < 0.75
    with pytest.raises(ValueError, match="3 classes"):
        remind.multiclass_cv_auc(x[:20], np.r_[np.zeros(18), 1, 2], folds=3)


def test_remind_auc_three_class_wiring(monkeypatch):
    """remind_auc's item order and readings, the model's features replaced by known ones."""
    tok = build_tokenizer()
    rng = np.random.default_rng(3)
    n = 6  # per set; features: forget rows 0-5, holdout 6-11, retain 12-17
    known = rng.normal(size=(3 * n, 4)) + np.repeat([[1.0], [0.0], [0.5]], n, axis=0)
    monkeypatch.setattr(remind, "remind_features", lambda model, ex, *a, **k: known[: len(ex)])
    monkeypatch.setattr(remind, "input_embedding", lambda m: np.eye(128, 8, dtype=np.float32))
    res = remind.remind_auc(
        None, tok, FORGET[:n], HOLDOUT[:n], folds=3, retain=RETAIN[:n], n_neighbours=2
    )
    np.testing.assert_array_equal(res.retain, known[2 * n :])
    y = np.r_[np.ones(n), np.zeros(n)]
    for i, name in enumerate(remind.FEATURES):
        assert res.auc[name] == pytest.approx(roc_auc_score(y, -known[: 2 * n, i]))
        want = plain_tpr_at_fpr(-known[:n, i], -known[n : 2 * n, i], 0.01)
        assert res.tpr_at_1fpr[name] == pytest.approx(want)
    three = np.r_[known[:n], known[2 * n :], known[n : 2 * n]]
    labels = np.repeat([0, 1, 2], n)
    assert res.auc3 == pytest.approx(plain_multiclass_auc(three, labels, 3, 0), abs=1e-9)


@pytest.mark.slow
def test_remind_three_class_and_low_fpr_from_the_features():
    tok, _, _, model, _ = tiny_models()
    forget, holdout, retain = FORGET[:4], HOLDOUT[:4], RETAIN[:4]
    res = remind.remind_auc(
        model, tok, forget, holdout, radii=(0.2, 0.5), n_neighbours=2, folds=2, retain=retain
    )
    feats = np.r_[res.forget, res.holdout]
    y = np.r_[np.ones(4), np.zeros(4)]
    for i, name in enumerate(remind.FEATURES):
        assert res.auc[name] == pytest.approx(roc_auc_score(y, -feats[:, i]), abs=1e-9)
        want = plain_tpr_at_fpr(-feats[:4, i], -feats[4:, i], 0.01)
        assert res.tpr_at_1fpr[name] == pytest.approx(want)
    proba = plain_grouped_cv(feats, y.astype(int), np.arange(8), 2, 0)
    assert res.tpr_at_1fpr["classifier"] == pytest.approx(
        plain_tpr_at_fpr(proba[:4], proba[4:], 0.01)
    )
    three = np.r_[res.forget, res.retain, res.holdout]
    labels = np.repeat([0, 1, 2], 4)
    assert res.auc3 == pytest.approx(plain_multiclass_auc(three, labels, 2, 0), abs=1e-9)
    with pytest.raises(ValueError, match="retain items"):
        remind.remind_auc(model, tok, forget, holdout, folds=2, retain=retain[:1])


def test_paraphrase_neighbourhoods_match_torch_losses():
    tok, hf, _, model, _ = tiny_models()
    forget, retain = FORGET[:5], RETAIN[:5]
    res = remind.paraphrase_auc(model, tok, forget, retain, folds=2)
    items = forget + retain
    loss0 = [torch_answer_loss(hf, e) for e in tokenize_items(tok, items, "raw", max_length=512)]
    losses = []
    for item in items:
        hood = [
            {"question": item["question"], "answer": item["paraphrased_answer"]},
            {"question": item["paraphrased_question"], "answer": item["answer"]},
            {"question": item["paraphrased_question"], "answer": item["paraphrased_answer"]},
        ]
        examples = tokenize_items(tok, hood, "raw", max_length=512)
        losses.append([torch_answer_loss(hf, e) for e in examples])
    loss0, losses = np.array(loss0), np.array(losses)
    mean = losses.mean(1)
    want = np.stack([loss0, mean, mean - loss0, losses.std(1)], axis=1)
    np.testing.assert_allclose(np.r_[res.positive, res.negative], want, rtol=2e-4, atol=1e-4)
    y = np.r_[np.ones(5), np.zeros(5)]
    for i, name in enumerate(remind.PARAPHRASE_FEATURES):
        assert res.auc[name] == pytest.approx(roc_auc_score(y, -want[:, i]), abs=1e-9)
    proba = plain_grouped_cv(want, y.astype(int), np.arange(10), 2, 0)
    assert res.auc["classifier"] == pytest.approx(roc_auc_score(y, proba), abs=1e-6)


def test_paraphrase_rejects_items_without_paraphrases():
    with pytest.raises(ValueError, match="item 5 has no .*paraphrased_question"):
        remind.paraphrase_auc(None, None, FORGET[:5], HOLDOUT[:5], folds=2)


def test_report_shows_the_low_fpr_three_class_and_paraphrase_tables():
    from jaxunlearn.audit import report

    def role(auc, tpr, auc3, para):
        return {
            "auc": {"loss0": auc, "classifier": auc},
            "tpr_at_1fpr": {"loss0": tpr, "classifier": tpr},
            "auc3_forget_retain_holdout": auc3,
            "paraphrase_forget_vs_retain": {
                "auc": {"loss0": para, "classifier": para},
                "tpr_at_1fpr": {"loss0": 0.0, "classifier": 0.125},
            },
        }

    res = {"target": role(0.91, 0.375, 0.61, 0.52), "unlearned": role(0.83, 0.25, 0.67, 0.74)}
    text = "\n".join(report._remind_extra(res, ["target", "unlearned"], ["loss0", "classifier"]))
    assert "TPR at 1% FPR" in text and "0.375" in text and "0.25" in text
    assert "forget / retain / holdout" in text and "0.61" in text and "0.67" in text
    assert "Paraphrase" in text and "0.74" in text and "0.125" in text
    del res["target"]["paraphrase_forget_vs_retain"]
    res["target"]["auc3_forget_retain_holdout"] = None
    text = "\n".join(report._remind_extra(res, ["target", "unlearned"], ["loss0"]))
    assert "Paraphrase" not in text and "forget / retain / holdout" not in text
