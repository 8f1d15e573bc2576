"""Classification loss terms in the objective protocol of `jaxunlearn.objectives`.

Each factory returns a term ``term(forward, batch, *, ref_forward=None) -> (loss, aux)``
where ``forward(images=...)`` runs an image classifier (`ClassifierOutput`) and `batch` is
``{"images": [B, H, W, C], "labels": [B]}`` (plus ``"random_labels"`` for relabelling).
They combine with `jaxunlearn.objectives.forget_retain` like the language-model terms, and
`jaxunlearn.train.make_step` differentiates them unchanged; the language-model terms
themselves score token sequences and do not apply here.

- `cross_entropy()`: mean softmax cross-entropy (fine-tuning, the retain term, OFMU's L_f).
- `gradient_ascent()`: its negation on the forget set (GradAscent; Thudi et al., arXiv
  2108.11577).
- `random_labels()`: cross-entropy against per-example random labels (the "RL" baseline of
  Hayase et al. / SalUn, arXiv 2310.12508).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

Batch = Mapping[str, Any]


def _check(batch: Batch, keys: tuple[str, ...], name: str) -> None:
    if not isinstance(batch, Mapping) or any(k not in batch for k in keys):
        have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"{name}: the batch needs {list(keys)} (images float32 [B, H, W, C], labels int32 "
            f"[B]); it has {have}. Build batches with jaxunlearn.classifiers.ForgetRetainImages."
        )


def mean_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy in float32 (torch's ``nn.CrossEntropyLoss()``)."""
    logits = jnp.asarray(logits, jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _ce_term(label_key: str, sign: float, name: str) -> Callable:
    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        _check(batch, ("images", label_key), name)
        logits = forward(images=batch["images"]).logits
        ce = mean_cross_entropy(logits, batch[label_key])
        acc = jnp.mean((jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32))
        return sign * ce, {"cross_entropy": ce, "accuracy": acc}

    term.__name__ = name
    return term


def cross_entropy() -> Callable:
    """Mean cross-entropy on the batch's true labels (minimised)."""
    return _ce_term("labels", 1.0, "cross_entropy")


def gradient_ascent() -> Callable:
    """Negated mean cross-entropy: minimising it raises the forget loss (GradAscent)."""
    return _ce_term("labels", -1.0, "gradient_ascent")


def random_labels() -> Callable:
    """Mean cross-entropy against ``batch["random_labels"]`` (relabelled forget examples).

    References:
      Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency",
      arXiv 2310.12508 (2023).
    """
    return _ce_term("random_labels", 1.0, "random_labels")
