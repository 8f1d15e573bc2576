"""Unlearning-trace detection: can an observer tell the unlearned model from the original?

Chen et al. (arXiv:2506.14003) train a classifier on model outputs to tell an original model
from its unlearned version, and find it works even on prompts unrelated to the forget set.
The minimal, query-only version here: for each forget-irrelevant prompt we take the model's
next-token distribution at the start of the answer and keep its top-k log-probabilities
(sorted) and its entropy; a logistic regression, cross-validated with both models' rows of a
prompt always in the same fold, tells the two models apart. Held-out balanced accuracy 0.5
means the unlearning left no trace on those prompts.

The features come from one jitted forward pass per length bucket; the [B, V] log-softmax of
the last prompt position is taken from the model's `Head` in float32 (no [B, T, V] logits).

References:
  Chen et al., "Unlearning Isn't Invisible: Detecting Unlearning Traces in LLMs from Model
  Outputs", arXiv:2506.14003.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.audit.classify import check_cv_counts, grouped_cv
from jaxunlearn.audit.measures import DEFAULT_OPTIONS, ScoringOptions
from jaxunlearn.data import encode_prompt, pad_to_bucket
from jaxunlearn.eval import inference


@functools.partial(jax.jit, static_argnames=("graphdef", "k"))
def _next_token_features(state, input_ids, attention_mask, *, graphdef, k):
    model = nnx.merge(graphdef, state)
    head = model(input_ids, attention_mask, return_logits=False).head
    last = jnp.sum(attention_mask, axis=1).astype(jnp.int32) - 1  # right padding
    hidden = head.hidden[jnp.arange(input_ids.shape[0]), last].astype(jnp.float32)
    logp = jax.nn.log_softmax(hidden @ head.kernel.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.concatenate([jax.lax.top_k(logp, k)[0], entropy[:, None]], axis=-1)


def output_features(
    model: nnx.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    options: ScoringOptions = DEFAULT_OPTIONS,
    *,
    k: int = 10,
) -> np.ndarray:
    """[N, k + 1] sorted top-k next-token log-probs and the entropy at each prompt's end.

    Prompts are rendered with the prompt format (`data.encode_prompt`), so the position is
    where the model starts its answer.
    """
    if not prompts:
        raise ValueError("output_features got no prompts")
    examples = [
        {"input_ids": np.asarray(encode_prompt(tokenizer, p, options.fmt), np.int32)}
        for p in prompts
    ]
    graphdef, state = nnx.split(model)
    lengths = [len(e["input_ids"]) for e in examples]
    out = np.zeros((len(prompts), k + 1), np.float32)
    groups = inference._groups(
        lengths, options.buckets, options.batch_size, inference._ways(options.mesh)
    )
    for bucket, rows, indices in groups:
        batch = pad_to_bucket(
            [examples[i] for i in inference._fill(indices, rows)], (bucket,),
            pad_id=inference.pad_token_id(tokenizer),
        )  # fmt: skip
        batch = parallel.place_batch(
            {n: batch[n] for n in ("input_ids", "attention_mask")}, options.mesh
        )
        feats = _next_token_features(
            state, batch["input_ids"], batch["attention_mask"], graphdef=graphdef, k=k
        )
        out[indices] = np.asarray(jax.device_get(feats))[: len(indices)]
    return out


class TraceResult(NamedTuple):
    """How well outputs tell model A (label 0) from model B (label 1).

    Attributes:
      accuracy: held-out balanced accuracy (0.5 = undetectable).
      auc: held-out ROC AUC.
      proba: [2N] out-of-fold P(model B): rows 0..N-1 are model A's prompts, N..2N-1 B's.
      features: [2N, k + 1] the features classified.
    """

    accuracy: float
    auc: float
    proba: np.ndarray
    features: np.ndarray


def trace_detection(
    original: nnx.Module,
    unlearned: nnx.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    options: ScoringOptions = DEFAULT_OPTIONS,
    *,
    k: int = 10,
    folds: int = 5,
    seed: int = 0,
) -> TraceResult:
    """Held-out accuracy of telling `original` from `unlearned` by their outputs on `prompts`.

    Args:
      original: the model before unlearning (label 0).
      unlearned: the model after unlearning (label 1).
      tokenizer: the shared tokenizer.
      prompts: forget-irrelevant questions (e.g. real-author or world-fact questions).
      options: prompt format, batching, mesh.
      k: top-k log-probs per feature vector.
      folds: cross-validation folds; both models' rows of a prompt share a fold.
      seed: fold seed.

    Returns:
      `TraceResult`.

    Raises:
      ValueError: fewer than `folds` prompts (before any model work).
    """
    n = len(prompts)
    labels = np.r_[np.zeros(n), np.ones(n)].astype(np.int64)
    groups = np.r_[np.arange(n), np.arange(n)]
    check_cv_counts(labels, groups, folds, "trace detection")
    features = np.concatenate(
        [output_features(m, tokenizer, prompts, options, k=k) for m in (original, unlearned)]
    )
    held = grouped_cv(features, labels, groups, folds=folds, seed=seed, what="trace detection")
    return TraceResult(held.accuracy, held.auc, held.proba, features)


__all__ = ["TraceResult", "output_features", "trace_detection"]
