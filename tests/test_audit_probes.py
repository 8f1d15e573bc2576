"""REMIND neighbourhoods, representation probes and trace detection against numpy/torch/sklearn."""

import numpy as np
import pytest
import torch
from _audit_tiny import FORGET, HOLDOUT, tiny_models, torch_answer_loss
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from jaxunlearn.audit import classify, probe, remind, trace
from jaxunlearn.data import encode_prompt
from jaxunlearn.eval.inference import tokenize_items


def plain_grouped_cv(x, y, groups, folds, seed):
    proba = np.zeros(len(y))
    for tr, te in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups):
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced")
        ).fit(x[tr], y[tr])
        proba[te] = clf.predict_proba(x[te])[:, 1]
    return proba


# ----------------------------------------------------------------------------- classify


def test_grouped_cv_matches_plain_sklearn_and_separates():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    groups = np.repeat(np.arange(20), 2)  # two rows per item, both of one class
    x = rng.normal(size=(40, 3)) + 1.5 * y[:, None]
    got = classify.grouped_cv(x, y, groups, folds=4, seed=1)
    want = plain_grouped_cv(x, y, groups, 4, 1)
    np.testing.assert_allclose(got.proba, want, rtol=1e-6, atol=1e-9)
    assert got.accuracy == pytest.approx(balanced_accuracy_score(y, want >= 0.5))
    assert got.auc == pytest.approx(roc_auc_score(y, want))
    assert got.accuracy > 0.8
    same = classify.grouped_cv(np.zeros((40, 2)) + 1.0, y, groups, folds=4)
    assert same.accuracy == pytest.approx(0.5)


def test_cv_counts_and_nonfinite_errors():
    y = np.array([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="class 1 has 2 items, fewer than the 3"):
        classify.check_cv_counts(y, np.arange(5), 3, "probe")
    with pytest.raises(ValueError, match="non-finite features in rows \\[2\\]"):
        x = np.ones((6, 2))
        x[2, 1] = np.nan
        classify.grouped_cv(x, np.array([0, 0, 0, 1, 1, 1]), folds=2)


def test_too_few_items_fail_before_model_work():
    # model=None: any model work would raise AttributeError instead.
    with pytest.raises(ValueError, match="representation probe: class 0 has 2 items"):
        probe.representation_probe(None, None, FORGET[:6], HOLDOUT[:2], folds=5)
    with pytest.raises(ValueError, match="trace detection: class 0 has 3 items"):
        trace.trace_detection(None, None, None, ["a", "b", "c"], folds=5)
    with pytest.raises(ValueError, match="REMIND: class 1 has 1 items"):
        remind.remind_auc(None, None, FORGET[:1], HOLDOUT[:6], folds=2)


# ----------------------------------------------------------------------------- REMIND


def test_nearest_tokens_match_numpy():
    e = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    got = remind.nearest_tokens(e, [3, 7, 3, 49], k=5, chunk=2)
    n = e / np.linalg.norm(e, axis=1, keepdims=True)
    for t in (3, 7, 49):
        sims = n @ n[t]
        sims[t] = -np.inf
        np.testing.assert_array_equal(got[t], np.argsort(-sims)[:5])


def test_neighbourhoods_replace_answer_tokens_only():
    tok, *_ = tiny_models()
    e = np.random.default_rng(1).normal(size=(128, 8)).astype(np.float32)
    examples = tokenize_items(tok, FORGET[:3], "raw", max_length=512)
    hoods = remind.build_neighbourhoods(examples, e, radii=(0.1, 0.5), n_neighbours=3, k_nearest=4)
    table = remind.nearest_tokens(e, range(128), k=4)
    for ex, per_radius in zip(examples, hoods):
        scored = np.flatnonzero(ex["labels"] != -100)[:-1]
        for r, group in zip((0.1, 0.5), per_radius):
            assert len(group) == 3
            for nb in group:
                changed = np.flatnonzero(nb["input_ids"] != ex["input_ids"])
                assert set(changed) <= set(scored)
                # a chosen position may map to itself only if the nearest list holds it (never)
                assert len(changed) == max(1, round(r * len(scored)))
                for p in changed:
                    assert nb["input_ids"][p] in table[int(ex["input_ids"][p])]
                np.testing.assert_array_equal(nb["labels"][scored], nb["input_ids"][scored])
                assert nb["labels"][scored[-1] + 1] == ex["labels"][scored[-1] + 1]  # EOS kept


def test_flatness_features_match_polyfit():
    rng = np.random.default_rng(2)
    loss0, losses, radii = rng.random(4), rng.random((4, 3, 5)), (0.1, 0.2, 0.4)
    got = remind.flatness_features(loss0, losses, radii)
    for i in range(4):
        c2, c1, _ = np.polyfit([0, *radii], [loss0[i], *losses[i].mean(-1)], 2)
        np.testing.assert_allclose(got[i], [loss0[i], c1, c2, losses[i].std(-1).mean()], rtol=1e-7)


def test_remind_scores_match_torch_and_sklearn():
    tok, hf, _, model, _ = tiny_models()
    forget, holdout = FORGET[:5], HOLDOUT[:5]
    res = remind.remind_auc(model, tok, forget, holdout, radii=(0.2, 0.5), n_neighbours=2, folds=2)
    examples = tokenize_items(tok, forget + holdout, "raw", max_length=512)
    hoods = remind.build_neighbourhoods(
        examples, remind.input_embedding(model), radii=(0.2, 0.5), n_neighbours=2
    )
    loss0 = np.array([torch_answer_loss(hf, e) for e in examples])
    losses = np.array([[[torch_answer_loss(hf, nb) for nb in g] for g in item] for item in hoods])
    want = remind.flatness_features(loss0, losses, (0.2, 0.5))
    np.testing.assert_allclose(np.r_[res.forget, res.holdout], want, rtol=2e-4, atol=1e-4)
    y = np.r_[np.ones(5), np.zeros(5)]
    for i, name in enumerate(remind.FEATURES):
        assert res.auc[name] == pytest.approx(roc_auc_score(y, -want[:, i]))
    proba = plain_grouped_cv(want, y.astype(int), np.arange(10), 2, 0)
    assert res.auc["classifier"] == pytest.approx(roc_auc_score(y, proba), abs=1e-6)


# ----------------------------------------------------------------------------- probe


def _torch_pooled(hf, examples, layer):
    captured = {}
    hook = hf.model.layers[layer].register_forward_hook(
        lambda mod, inp, out: captured.update(h=out[0] if isinstance(out, tuple) else out)
    )
    rows = []
    with torch.no_grad():
        for ex in examples:
            hf(torch.tensor(ex["input_ids"][None].astype(np.int64)))
            keep = ex["labels"] != -100
            rows.append(captured["h"][0].numpy()[keep].mean(0))
    hook.remove()
    return np.stack(rows)


def test_pooled_hidden_states_match_torch():
    tok, hf, _, model, _ = tiny_models()
    examples = tokenize_items(tok, FORGET[:3] + HOLDOUT[:2], "raw", max_length=512)
    got = probe.pooled_hidden_states(model, examples, (0, 1))
    for i, layer in enumerate((0, 1)):
        np.testing.assert_allclose(got[i], _torch_pooled(hf, examples, layer), atol=2e-5)


def test_representation_probe_is_grouped_cv_on_pooled_states():
    tok, hf, _, model, _ = tiny_models()
    forget, holdout = FORGET[:6], HOLDOUT[:6]
    res = probe.representation_probe(model, tok, forget, holdout, folds=3, seed=2)
    rows, labels, groups = probe.probe_rows(forget, holdout)
    assert len(rows) == 12 + 6 and (groups[:12] == np.repeat(np.arange(6), 2)).all()
    assert res.layers == (0, 1) and res.accuracy.shape == (2,)
    examples = tokenize_items(tok, rows, "raw", max_length=512)
    for i, layer in enumerate(res.layers):
        proba = plain_grouped_cv(_torch_pooled(hf, examples, layer), labels, groups, 3, 2)
        np.testing.assert_allclose(res.proba[i], proba, atol=1e-3)
        assert res.accuracy[i] == pytest.approx(balanced_accuracy_score(labels, proba >= 0.5))


# ----------------------------------------------------------------------------- trace


def _torch_output_features(hf, tok, prompts, k):
    rows = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor(np.asarray([encode_prompt(tok, p, "raw")], np.int64))
            logp = torch.log_softmax(hf(ids).logits[0, -1].double(), -1)
            top = torch.sort(logp, descending=True).values[:k]
            rows.append(np.r_[top.numpy(), -(logp.exp() * logp).sum().item()])
    return np.stack(rows)


def test_output_features_match_torch():
    tok, hf, _, model, _ = tiny_models()
    prompts = [r["question"] for r in HOLDOUT[:4]]
    got = trace.output_features(model, tok, prompts, k=5)
    np.testing.assert_allclose(got, _torch_output_features(hf, tok, prompts, 5), atol=2e-5)


def test_trace_detection_matches_sklearn_and_is_chance_for_same_model():
    tok, hf, hf_u, model, unlearned = tiny_models()
    prompts = [r["question"] for r in HOLDOUT[:8]]
    res = trace.trace_detection(model, unlearned, tok, prompts, k=4, folds=4)
    feats = np.r_[
        _torch_output_features(hf, tok, prompts, 4), _torch_output_features(hf_u, tok, prompts, 4)
    ]
    y, groups = np.repeat([0, 1], 8), np.r_[np.arange(8), np.arange(8)]
    proba = plain_grouped_cv(feats, y, groups, 4, 0)
    np.testing.assert_allclose(res.proba, proba, atol=1e-3)
    assert res.accuracy == pytest.approx(balanced_accuracy_score(y, proba >= 0.5))
    same = trace.trace_detection(model, model, tok, prompts, k=4, folds=4)
    assert same.accuracy == pytest.approx(0.5)
