"""ACU's closed-form forgetting for a ridge (analytic) linear head on frozen features.

With features X (a bias column appended), one-hot targets Y and ridge strength gamma, the
head is W = R X^T Y with R = (X^T X + gamma I)^-1. Forgetting (X_f, Y_f) updates R by the
Woodbury identity and W by the recursive-least-squares correction

    R' = R + R X_f^T (I - X_f R X_f^T)^-1 X_f R     (= (R^-1 - X_f^T X_f)^-1)
    W' = W - R' X_f^T (Y_f - X_f W)

which is exactly the ridge solution retrained without D_f, computed from the forget
features alone. Everything runs in float64 numpy (the analytic-learning code keeps float64
too); sequential requests simply iterate.

References:
  Tang et al., "Analytic Continual Unlearning" (ACU), arXiv 2505.12239 (2025); Zhuang et
  al., "ACIL: Analytic Class-Incremental Learning", arXiv 2205.14922 (2022), for the
  recursive least squares.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class RidgeHead(NamedTuple):
    """A ridge-regression linear head and the memory that makes forgetting exact.

    Attributes:
      weights: float64 [D + 1, K]; logits = [features, 1] @ weights.
      inverse_gram: float64 [D + 1, D + 1], R = (X^T X + gamma I)^-1 of the data so far.
      gamma: the ridge strength.
    """

    weights: np.ndarray
    inverse_gram: np.ndarray
    gamma: float


def with_bias(features: np.ndarray) -> np.ndarray:
    """[features, 1] in float64."""
    x = np.asarray(features, np.float64)
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def one_hot(labels: np.ndarray, num_labels: int) -> np.ndarray:
    return np.eye(num_labels, dtype=np.float64)[np.asarray(labels)]


def ridge_head(
    features: np.ndarray, labels: np.ndarray, num_labels: int, *, gamma: float = 0.1
) -> RidgeHead:
    """Fits the ridge head on (features, labels) in closed form.

    Args:
      features: [N, D] frozen features.
      labels: [N] int labels.
      num_labels: K.
      gamma: ridge strength (> 0; ACIL's default 0.1).
    """
    if not gamma > 0:
        raise ValueError(f"ridge_head: gamma must be > 0, got {gamma!r}.")
    x = with_bias(features)
    inverse_gram = np.linalg.inv(x.T @ x + gamma * np.eye(x.shape[1]))
    return RidgeHead(inverse_gram @ (x.T @ one_hot(labels, num_labels)), inverse_gram, gamma)


def acu_forget(head: RidgeHead, features: np.ndarray, labels: np.ndarray) -> RidgeHead:
    """Removes (features, labels) from a ridge head exactly (ACU's closed form).

    Args:
      head: the current head (fitted on data that includes the forget examples).
      features: [N_f, D] features of the examples to forget.
      labels: [N_f] their labels.

    Returns:
      The head of the ridge regression on the remaining data.

    Raises:
      ValueError: I - X_f R X_f^T is singular (the examples were not all in the head's data).
    """
    x_f = with_bias(features)
    y_f = one_hot(labels, head.weights.shape[1])
    r = head.inverse_gram
    inner = np.eye(len(x_f)) - x_f @ r @ x_f.T
    try:
        r_new = r + r @ x_f.T @ np.linalg.solve(inner, x_f @ r)
    except np.linalg.LinAlgError as err:
        raise ValueError(
            "acu_forget: I - X_f R X_f^T is singular; the forget features were not (all) part "
            "of the data this head was fitted on."
        ) from err
    weights = head.weights - r_new @ x_f.T @ (y_f - x_f @ head.weights)
    return RidgeHead(weights, r_new, head.gamma)


def ridge_logits(head: RidgeHead, features: np.ndarray) -> np.ndarray:
    """[N, K] logits of the head on features."""
    return with_bias(features) @ head.weights
