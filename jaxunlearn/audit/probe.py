"""Representation probe: do the hidden states still tell forget items from unseen ones?

Behavioural unlearning can leave the knowledge readable inside the network. For each decoder
layer we mean-pool the hidden states over an item's answer tokens and train a logistic
regression to tell forget items from holdout items, with leave-items-out cross-validation
(`classify.grouped_cv`: an item's rows, e.g. its answer and its paraphrase, are never split
across train and test). The held-out balanced accuracy per layer is the result: about the
oracle's value (near 0.5 for a model that never saw the forget set) means nothing is left;
the target's value is what there was to remove.

Hidden states come from one jitted forward pass per length bucket
(``model(..., hidden_layers=layers)``), batches split over a mesh's data axes as in
`eval.inference`; only the pooled [layers, batch, hidden] vectors leave the device.

References:
  "Probe-Geometry Alignment: Erasing the Cross-Sequence Memorization Signature Below Chance"
  (linear probes recover behaviourally unlearned data).
  "Suppression or Deletion: A Restoration-Based Representation-Level Analysis of Machine
  Unlearning" (representation-level residue after unlearning).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.audit.classify import HeldOut, check_cv_counts, grouped_cv
from jaxunlearn.audit.measures import DEFAULT_OPTIONS, ScoringOptions
from jaxunlearn.data import IGNORE_INDEX, pad_to_bucket
from jaxunlearn.eval import inference


@functools.partial(jax.jit, static_argnames=("graphdef", "layers"))
def _pooled_hidden(state, input_ids, attention_mask, labels, *, graphdef, layers):
    model = nnx.merge(graphdef, state)
    out = model(input_ids, attention_mask, hidden_layers=layers, return_logits=False)
    weight = (labels != IGNORE_INDEX).astype(jnp.float32)[..., None]
    count = jnp.maximum(weight.sum(1), 1.0)
    return jnp.stack(
        [(out.hidden_states[i].astype(jnp.float32) * weight).sum(1) / count for i in layers]
    )


def pooled_hidden_states(
    model: nnx.Module,
    examples: Sequence[Mapping[str, np.ndarray]],
    layers: Sequence[int],
    options: ScoringOptions = DEFAULT_OPTIONS,
    *,
    pad_id: int = 0,
) -> np.ndarray:
    """[L, N, D] decoder-layer outputs mean-pooled over each example's scored (answer) tokens.

    Args:
      model: a jaxunlearn causal LM.
      examples: {"input_ids", "labels"} examples (labels -100 outside the answer).
      layers: 0-based decoder layers.
      options: batching, buckets and mesh.
      pad_id: padding token id.
    """
    layers = tuple(int(i) for i in layers)
    graphdef, state = nnx.split(model)
    lengths = [len(e["input_ids"]) for e in examples]
    ways = inference._ways(options.mesh)
    out = None
    for bucket, rows, indices in inference._groups(
        lengths, options.buckets, options.batch_size, ways
    ):
        batch = pad_to_bucket(
            [examples[i] for i in inference._fill(indices, rows)], (bucket,), pad_id=pad_id
        )
        batch = parallel.place_batch(batch, options.mesh)
        pooled = _pooled_hidden(
            state, batch["input_ids"], batch["attention_mask"], batch["labels"],
            graphdef=graphdef, layers=layers,
        )  # fmt: skip
        pooled = np.asarray(jax.device_get(pooled))
        if out is None:
            out = np.zeros((len(layers), len(examples), pooled.shape[-1]), np.float32)
        out[:, indices] = pooled[:, : len(indices)]
    return out


class ProbeResult(NamedTuple):
    """Per-layer probe results of one model.

    Attributes:
      layers: the probed decoder layers.
      accuracy: [L] held-out balanced accuracy per layer (0.5 = nothing left).
      auc: [L] held-out ROC AUC per layer.
      proba: [L, N] out-of-fold P(forget) per row (forget rows first, then holdout).
      groups: [N] item id of each row (rows of one item share it).
    """

    layers: tuple[int, ...]
    accuracy: np.ndarray
    auc: np.ndarray
    proba: np.ndarray
    groups: np.ndarray


def probe_rows(
    forget: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]],
    *,
    paraphrases: bool = True,
) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
    """QA rows, labels (1 = forget) and item groups of a probe data set.

    With `paraphrases`, an item's ``paraphrased_answer`` (when present) is a second row of
    the same group.
    """
    rows, labels, groups = [], [], []
    for label, items in ((1, forget), (0, holdout)):
        for item in items:
            group = len(set(groups))
            for key in ("answer", "paraphrased_answer") if paraphrases else ("answer",):
                if key in item:
                    rows.append({"question": item["question"], "answer": item[key]})
                    labels.append(label)
                    groups.append(group)
    return rows, np.asarray(labels), np.asarray(groups)


def representation_probe(
    model: nnx.Module,
    tokenizer: Any,
    forget: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]],
    options: ScoringOptions = DEFAULT_OPTIONS,
    *,
    layers: Sequence[int] | None = None,
    folds: int = 5,
    seed: int = 0,
    paraphrases: bool = True,
    max_length: int = 512,
) -> ProbeResult:
    """Held-out accuracy of per-layer logistic-regression probes, forget vs holdout.

    Args:
      model: the model to probe.
      tokenizer: its tokenizer.
      forget: forget QA items.
      holdout: QA items the model never saw.
      options: prompt format, batching, mesh.
      layers: decoder layers to probe (default: all).
      folds: cross-validation folds (items, not rows, are split).
      seed: fold seed.
      paraphrases: add each item's paraphrased answer as a second row of its group.
      max_length: most tokens per item.

    Returns:
      `ProbeResult`.

    Raises:
      ValueError: fewer than `folds` items in either set (before any model work).
    """
    rows, labels, groups = probe_rows(forget, holdout, paraphrases=paraphrases)
    check_cv_counts(labels, groups, folds, "representation probe")
    n_layers = model.config.num_hidden_layers
    layers = tuple(range(n_layers)) if layers is None else tuple(int(i) for i in layers)
    examples = inference.tokenize_items(tokenizer, rows, options.fmt, max_length=max_length)
    hidden = pooled_hidden_states(
        model, examples, layers, options, pad_id=inference.pad_token_id(tokenizer)
    )
    results: list[HeldOut] = [
        grouped_cv(h, labels, groups, folds=folds, seed=seed, what="representation probe")
        for h in hidden
    ]
    return ProbeResult(
        layers,
        np.asarray([r.accuracy for r in results]),
        np.asarray([r.auc for r in results]),
        np.stack([r.proba for r in results]),
        groups,
    )


__all__ = ["ProbeResult", "pooled_hidden_states", "probe_rows", "representation_probe"]
