"""Classifier metrics against plain independent computations (scipy, sklearn, torch)."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy

from jaxunlearn.classifiers import metrics as m

torch = pytest.importorskip("torch")


def _logits(n, k=5, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=(n, k)) * scale


def test_accuracy_and_entropy():
    logits, labels = _logits(40), np.random.default_rng(1).integers(0, 5, 40)
    hits = sum(int(np.argmax(row) == y) for row, y in zip(logits, labels))
    assert m.accuracy(logits, labels) == pytest.approx(100.0 * hits / 40)
    probs = torch.softmax(torch.tensor(logits), -1).numpy()
    np.testing.assert_allclose(m.entropy(probs), scipy_entropy(probs, axis=1), rtol=1e-12)
    assert m.entropy(np.array([[1.0, 0.0, 0.0]]))[0] == 0.0


def test_zrf_is_one_minus_mean_jensen_shannon():
    a, b = _logits(30, seed=2), _logits(30, seed=3)
    p = torch.softmax(torch.tensor(a), -1).numpy()
    q = torch.softmax(torch.tensor(b), -1).numpy()
    js = np.array([jensenshannon(pi, qi) ** 2 for pi, qi in zip(p, q)])  # natural log
    assert m.zrf(a, b) == pytest.approx(1.0 - js.mean(), rel=1e-10)
    assert m.zrf(a, a) == pytest.approx(1.0)


def test_entropy_mia_matches_plain_sklearn_recipe():
    from sklearn.linear_model import LogisticRegression

    # members: confident (low entropy); non-members: diffuse
    retain, test = _logits(80, seed=4, scale=6.0), _logits(60, seed=5, scale=1.0)
    forget = np.concatenate([_logits(10, seed=6, scale=6.0), _logits(10, seed=7, scale=0.5)])
    h = [
        scipy_entropy(torch.softmax(torch.tensor(x), -1).numpy(), axis=1)
        for x in (retain, test, forget)
    ]
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs")
    clf.fit(np.concatenate(h[:2])[:, None], np.r_[np.ones(80), np.zeros(60)])
    expected = clf.predict(h[2][:, None]).mean()
    assert m.entropy_mia(retain, test, forget) == pytest.approx(expected)
    assert 0.3 < expected < 0.7  # the confident half is flagged, the diffuse half is not


def test_svc_mia_efficacy_matches_plain_sklearn_recipe():
    from sklearn.svm import SVC

    rng = np.random.default_rng(8)
    retain, test, forget = _logits(100, seed=9, scale=5), _logits(40, seed=10), _logits(25, seed=11)
    yr, yt, yf = rng.integers(0, 5, 100), rng.integers(0, 5, 40), rng.integers(0, 5, 25)

    def p_true(logits, y):
        probs = torch.softmax(torch.tensor(logits), -1)
        return torch.gather(probs, 1, torch.tensor(y)[:, None]).numpy()

    x = np.concatenate([p_true(retain[:40], yr[:40]), p_true(test, yt)])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, np.r_[np.ones(40), np.zeros(40)])
    expected = 100.0 * (1 - clf.predict(p_true(forget, yf)).mean())
    got = m.svc_mia_efficacy(retain, yr, test, yt, forget, yf)
    assert got == pytest.approx(expected)


def test_average_gap():
    a = {"UA": 10.0, "RA": 90.0, "TA": 80.0, "MIA_efficacy": 20.0, "Df": 3.0}
    o = {"UA": 12.0, "RA": 95.0, "TA": 79.0, "MIA_efficacy": 30.0, "Df": 0.0}
    assert m.average_gap(a, o) == pytest.approx((2 + 5 + 1 + 10) / 4)


def test_linear_probe_matches_plain_sklearn_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(12)
    centers = rng.normal(size=(3, 6)) * 3
    y = rng.integers(0, 3, 90)
    x = centers[y] + rng.normal(size=(90, 6))
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[:60], y[:60])
    expected = 100.0 * np.mean(pipe.predict(x[60:]) == y[60:])
    assert m.linear_probe_accuracy(x[:60], y[:60], x[60:], y[60:]) == pytest.approx(expected)
    assert expected > 80


def test_diverged_logits_still_give_distributions():
    logits = np.array([[np.inf, 0.0, 1.0], [np.nan, 2.0, 0.0], [-np.inf, 0.0, 0.0]])
    probs = m.softmax(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert probs[0, 0] == 1.0
