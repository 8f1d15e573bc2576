"""Classifier-unlearning metrics in the two published conventions, plus a linear probe.

SSD / Bad-Teacher convention (Foster et al., arXiv 2308.07707, ``metrics.py``;
Chundawat et al., arXiv 2205.08096):

- `accuracy` on Df (forget-test), Dr (retain-test) and the full test set, in percent;
- `entropy_mia`: a logistic regression (class-balanced, lbfgs) on the entropy of the
  softmax, fitted on retain-train (member, 1) vs test (non-member, 0); the score is the
  share of forget-train examples it calls members (lower = more forgotten; compare with
  the retrained oracle, not with 0);
- `zrf`: 1 - mean over forget examples of the Jensen-Shannon divergence (natural log)
  between the model's softmax and a randomly initialised "incompetent teacher"'s.

SalUn convention (Fan et al., arXiv 2310.12508, ``evaluation/SVC_MIA.py``):

- UA = 100 - acc(forget-train), RA = acc(retain-train), TA = acc(test);
- `svc_mia_efficacy`: an RBF SVC (C=3, gamma="auto") on the true-class probability,
  fitted on the first |test| retain-train examples (member) vs the test set
  (non-member); MIA-Efficacy = 100 · share of forget examples predicted non-member;
- `average_gap`: mean |metric - oracle| over (UA, RA, TA, MIA-Efficacy).

Representation check (restoration view: does the forgotten class stay linearly readable
from the penultimate features, i.e. was it suppressed rather than deleted?):

- `linear_probe_accuracy`: a multinomial logistic regression fitted on features of one
  half of the test set (seen by no model) and scored on the forgotten examples' features.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SALUN_KEYS = ("UA", "RA", "TA", "MIA_efficacy")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64.

    A diverged model (gradient ascent run too far) can emit inf or NaN logits; +-inf are
    clipped to +-1e300 and NaN set to 0 so every metric still gets a distribution instead
    of failing inside scikit-learn.
    """
    z = np.nan_to_num(np.asarray(logits, np.float64), nan=0.0, posinf=1e300, neginf=-1e300)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent (NaN for an empty set)."""
    if len(labels) == 0:
        return float("nan")
    return float(100.0 * np.mean(np.argmax(logits, axis=-1) == labels))


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row, with 0 log 0 = 0 (SSD's ``metrics.entropy``)."""
    p = np.asarray(probs, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def entropy_mia(
    retain_logits: np.ndarray, test_logits: np.ndarray, forget_logits: np.ndarray
) -> float:
    """SSD's membership attack: the share of forget examples classified as members."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([entropy(softmax(retain_logits)), entropy(softmax(test_logits))])
    y = np.concatenate([np.ones(len(retain_logits)), np.zeros(len(test_logits))])
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs")
    clf.fit(x[:, None], y)
    return float(clf.predict(entropy(softmax(forget_logits))[:, None]).mean())


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-row Jensen-Shannon divergence (nats) of two probability matrices."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = 0.5 * (p + q)

    def kl(a, b):
        return np.sum(np.where(a > 0, a * (np.log(np.where(a > 0, a, 1.0)) - np.log(b)), 0.0), -1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def zrf(model_logits: np.ndarray, incompetent_logits: np.ndarray) -> float:
    """Zero Retrain Forgetting score: 1 - mean JS(model, incompetent teacher) on D_f."""
    return float(1.0 - np.mean(js_divergence(softmax(model_logits), softmax(incompetent_logits))))


def true_class_probability(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return softmax(logits)[np.arange(len(labels)), labels]


def svc_mia_efficacy(
    retain_logits: np.ndarray,
    retain_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    forget_logits: np.ndarray,
    forget_labels: np.ndarray,
) -> float:
    """SalUn's MIA-Efficacy (percent): forget examples an SVC on p_y calls non-members.

    The shadow members are the first |test| retain examples (in the given order), as
    SalUn's ``main_forget.py`` takes them from its retain loader.
    """
    from sklearn.svm import SVC

    n = min(len(test_labels), len(retain_labels))
    member = true_class_probability(retain_logits[:n], retain_labels[:n])
    non_member = true_class_probability(test_logits, test_labels)
    x = np.concatenate([member, non_member])[:, None]
    y = np.concatenate([np.ones(n), np.zeros(len(non_member))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    target = true_class_probability(forget_logits, forget_labels)[:, None]
    return float(100.0 * (1.0 - clf.predict(target).mean()))


def average_gap(metrics: Mapping[str, float], oracle: Mapping[str, float]) -> float:
    """SalUn's Avg. Gap: mean |metric - oracle| over UA, RA, TA and MIA-Efficacy."""
    return float(np.mean([abs(metrics[k] - oracle[k]) for k in SALUN_KEYS]))


def linear_probe_accuracy(
    fit_features: np.ndarray,
    fit_labels: np.ndarray,
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
) -> float:
    """Accuracy (percent) of a logistic-regression probe on frozen features.

    Features are standardised with the fit set's mean and std; the probe is sklearn's
    multinomial `LogisticRegression` (lbfgs, C=1, up to 2000 iterations).
    """
    from sklearn.linear_model import LogisticRegression

    if len(eval_labels) == 0:
        return float("nan")
    mean, std = fit_features.mean(0), fit_features.std(0) + 1e-8
    clf = LogisticRegression(max_iter=2000)
    clf.fit((fit_features - mean) / std, fit_labels)
    return float(100.0 * np.mean(clf.predict((eval_features - mean) / std) == eval_labels))
