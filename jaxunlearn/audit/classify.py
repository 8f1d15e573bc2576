"""Held-out classification for the audit's probes: grouped cross-validation with sklearn.

The probe, REMIND and trace-detection checks all ask one question: can a linear classifier
tell two sets apart from some features, on rows it was not trained on? Rows that come from
the same item (neighbours of one question, the original and unlearned model's outputs on one
prompt) share a group and are always in the same fold (leave-items-out), so a classifier
cannot score by recognising an item it has seen.

The classifier is sklearn's `LogisticRegression` (classes weighted to balance, so features
that carry nothing give 0.5 even with unequal set sizes) after a `StandardScaler`; folds are
`StratifiedGroupKFold`. A balanced accuracy of 0.5 means nothing separates the sets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class HeldOut(NamedTuple):
    """Out-of-fold predictions of a grouped cross-validation.

    Attributes:
      proba: [N] out-of-fold P(label 1) per row.
      accuracy: balanced accuracy of ``proba >= 0.5`` (0.5 = chance).
      auc: ROC AUC of `proba` (label 1 positive).
    """

    proba: np.ndarray
    accuracy: float
    auc: float


def check_cv_counts(labels: np.ndarray, groups: np.ndarray, folds: int, what: str) -> None:
    """Raises ValueError unless each class has at least `folds` distinct groups (items).

    Args:
      labels: [N] 0/1 labels.
      groups: [N] item ids.
      folds: cross-validation folds.
      what: names the check in the message (e.g. "representation probe").
    """
    if folds < 2:
        raise ValueError(f"{what}: cross-validation needs >= 2 folds, got {folds}")
    for label in (0, 1):
        n = len(np.unique(groups[labels == label]))
        if n < folds:
            raise ValueError(
                f"{what}: class {label} has {n} items, fewer than the {folds} cross-validation "
                f"folds; give at least {folds} items per set (or lower the folds)"
            )


def grouped_cv(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    what: str = "classifier",
) -> HeldOut:
    """Out-of-fold logistic-regression predictions with items kept within one fold.

    Args:
      features: [N, F] features (non-finite values are an error).
      labels: [N] 0/1 labels.
      groups: [N] item ids (default: one item per row).
      folds: number of folds.
      seed: fold shuffling seed.
      what: names the check in error messages.

    Returns:
      `HeldOut`.

    Raises:
      ValueError: too few items per class for `folds`, or non-finite features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, np.float64).reshape(len(labels), -1)
    y = np.asarray(labels, np.int64)
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    check_cv_counts(y, g, folds, what)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"{what}: non-finite features in rows {bad[:10].tolist()}")
    proba = np.zeros(len(y))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, g):
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced")
        )
        clf.fit(x[train], y[train])
        proba[test] = clf.predict_proba(x[test])[:, 1]
    accuracy = float(balanced_accuracy_score(y, (proba >= 0.5).astype(np.int64)))
    return HeldOut(proba, accuracy, float(roc_auc_score(y, proba)))


__all__ = ["HeldOut", "check_cv_counts", "grouped_cv"]
