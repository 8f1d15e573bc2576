"""Evaluate one classifier on one unlearning task in both metric conventions.

Returns a flat dict: SSD/Bad-Teacher's ``Df``, ``Dr``, ``TestAcc``, ``MIA``, ``ZRF``;
SalUn's ``UA``, ``RA``, ``TA``, ``MIA_efficacy``; and ``probe_forget`` (the linear probe
on penultimate features). Accuracies are in percent. The oracle-relative numbers
(SalUn's Avg. Gap) are added by the caller, which knows the oracle's metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from jaxunlearn.classifiers import metrics as m
from jaxunlearn.classifiers.scenarios import Task
from jaxunlearn.classifiers.training import predict


def probe_halves(n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed split of the test indices: (probe-fit half, probe-eval half)."""
    order = np.random.default_rng([seed, 3]).permutation(n_test)
    return np.sort(order[: n_test // 2]), np.sort(order[n_test // 2 :])


def evaluate_classifier(
    model: nnx.Module,
    task: Task,
    *,
    incompetent: nnx.Module,
    batch_size: int = 512,
    probe_seed: int = 0,
) -> dict[str, Any]:
    """All metrics of `model` on `task`.

    Args:
      model: the classifier (target, oracle or unlearned).
      task: the unlearning task.
      incompetent: the randomly initialised "incompetent teacher" of ZRF (same architecture).
      batch_size: inference batch size.
      probe_seed: the test-set split of the linear probe.

    Returns:
      {metric: float}; see the module docstring.
    """
    train_logits, _ = predict(model, task.train.images, batch_size=batch_size)
    test_logits, test_features = predict(model, task.test.images, batch_size=batch_size)
    test_features = np.nan_to_num(test_features, nan=0.0, posinf=1e30, neginf=-1e30)
    y_train, y_test = task.train.labels, task.test.labels
    f, r = task.forget, task.retain
    if task.kind == "random":  # SSD: forget_valid = forget_train
        df_logits, df_labels = train_logits[f], y_train[f]
    else:
        df_logits, df_labels = test_logits[task.forget_test], y_test[task.forget_test]
    df_images = task.forget_eval_set().images
    incompetent_logits, _ = predict(incompetent, df_images, batch_size=batch_size)
    out = {
        "Df": m.accuracy(df_logits, df_labels),
        "Dr": m.accuracy(test_logits[~task.forget_test], y_test[~task.forget_test]),
        "TestAcc": m.accuracy(test_logits, y_test),
        "MIA": m.entropy_mia(train_logits[r], test_logits, train_logits[f]),
        "ZRF": m.zrf(df_logits, incompetent_logits),
        "UA": 100.0 - m.accuracy(train_logits[f], y_train[f]),
        "RA": m.accuracy(train_logits[r], y_train[r]),
        "TA": m.accuracy(test_logits, y_test),
        "MIA_efficacy": m.svc_mia_efficacy(
            train_logits[r], y_train[r], test_logits, y_test, train_logits[f], y_train[f]
        ),
    }
    out["probe_forget"] = _probe(model, task, test_features, batch_size, probe_seed)
    return out


def _probe(model, task, test_features, batch_size, seed) -> float:
    fit, held = probe_halves(len(task.test), seed)
    if task.kind == "random":
        _, feats = predict(model, task.forget_set().images, batch_size=batch_size)
        eval_feats, eval_labels = feats, task.forget_set().labels
    else:
        keep = held[task.forget_test[held]]
        eval_feats, eval_labels = test_features[keep], task.test.labels[keep]
    return m.linear_probe_accuracy(
        test_features[fit], task.test.labels[fit], eval_feats, eval_labels
    )
