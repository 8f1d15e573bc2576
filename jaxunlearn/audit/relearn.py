"""Relearning attack: fine-tune an unlearned model briefly on part of the forget set.

The attacker holds the unlearned weights and a small relearn set: a fraction of the forget
items (default 10%) or related public text. They fine-tune with the plain NLL loss for a few
steps and measure the forget metrics on the *other* forget items. If forgetting was real,
relearning a few items should not bring back the rest faster than it would for a model that
never saw them (the oracle, relearned with the same budget).

The fine-tune is the jitted `jaxunlearn.train.make_step` with
`objectives.forget_retain(objectives.nll())` and `optax.adamw`, fed by a `ForgetRetainSampler`,
exactly what `train.unlearn` runs; the curve at steps {0, 10, 25, 50, ...} is measured along
one run (one compile per batch shape), so step 50 is the step-25 model trained 25 steps more
with the same optimizer state and data order as `unlearn(..., steps=50)`.

References:
  Hu et al., "Jogging the Memory of Unlearned LLMs Through Targeted Relearning Attacks",
  arXiv:2406.13356.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxunlearn.audit.measures import ForgetMeasures
from jaxunlearn.data import ForgetRetainSampler, tokenize_records
from jaxunlearn.eval.inference import pad_token_id
from jaxunlearn.parallel import place_batch
from jaxunlearn.train import make_step, split_model

DEFAULT_STEPS: tuple[int, ...] = (0, 10, 25, 50, 100)


class RelearnSplit(NamedTuple):
    """Which forget items the attacker trains on and which ones are measured.

    Attributes:
      relearn: indices of the relearn items (sorted).
      measured: indices of the remaining, measured items (sorted); disjoint from `relearn`.
    """

    relearn: np.ndarray
    measured: np.ndarray


class RelearnCurve(NamedTuple):
    """Forget metrics of the measured items after each number of relearning steps.

    Attributes:
      split: the relearn / measured items.
      steps: the step counts measured, ascending.
      measures: one `ForgetMeasures` per step count (over `split.measured` items).
      losses: the relearning NLL at every step run (host floats).
    """

    split: RelearnSplit
    steps: tuple[int, ...]
    measures: tuple[ForgetMeasures, ...]
    losses: tuple[float, ...]


def relearn_split(n_items: int, fraction: float = 0.1, *, seed: int = 0) -> RelearnSplit:
    """Draws round(fraction * n) (at least 1) relearn items; the rest (at least 1) are measured.

    Raises:
      ValueError: `fraction` outside (0, 1) or fewer than 2 items.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"relearn fraction must be in (0, 1), got {fraction}")
    if n_items < 2:
        raise ValueError(
            f"relearning needs >= 2 forget items (some to relearn, some to measure); got {n_items}"
        )
    k = min(max(1, round(fraction * n_items)), n_items - 1)
    order = np.random.default_rng(seed).permutation(n_items)
    return RelearnSplit(np.sort(order[:k]), np.sort(order[k:]))


def relearn_curve(
    model: nnx.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    measure: Callable[[nnx.Module, list[dict]], ForgetMeasures],
    *,
    fmt: Any = "raw",
    split: RelearnSplit | None = None,
    relearn_items: Sequence[Mapping[str, Any]] | None = None,
    steps: Sequence[int] = DEFAULT_STEPS,
    learning_rate: float = 1e-5,
    batch_size: int = 4,
    max_length: int = 512,
    seed: int = 0,
    mesh: Any = None,
) -> RelearnCurve:
    """Relearns `model` on some items and measures the others after each step count.

    Args:
      model: the model to attack (unchanged; each relearned model is a copy).
      tokenizer: its tokenizer.
      items: the forget items ({question, answer} or {text}).
      measure: ``(model, measured_items) -> ForgetMeasures``, e.g. a `functools.partial` of
        `measures.forget_measures` (its jitted scoring runs on the same mesh).
      fmt: prompt format used to tokenise the relearn items.
      split: which items to relearn / measure (default `relearn_split(len(items), seed=seed)`).
      relearn_items: relearn on these instead (e.g. related public text); then every item in
        `items` is measured.
      steps: step counts to measure after (0 = the model as given).
      learning_rate: AdamW learning rate (Hu et al.: 1e-5; no weight decay).
      batch_size: relearn items per step.
      max_length: most tokens per relearn item.
      seed: data-order seed.
      mesh: train on this mesh (`parallel.mesh`), as `unlearn` does.

    Returns:
      `RelearnCurve`.
    """
    from jaxunlearn import objectives

    steps = tuple(sorted({int(s) for s in steps}))
    if not steps or steps[0] < 0:
        raise ValueError(f"steps must be non-negative step counts, got {steps}")
    if relearn_items is None:
        split = split or relearn_split(len(items), seed=seed)
        train_rows = [items[i] for i in split.relearn]
    else:
        split = RelearnSplit(np.zeros(0, np.int64), np.arange(len(items)))
        train_rows = list(relearn_items)
    overlap = set(split.relearn.tolist()) & set(split.measured.tolist())
    if overlap:
        raise ValueError(f"relearn and measured items overlap at indices {sorted(overlap)[:10]}")
    measured = [dict(items[i]) for i in split.measured]
    examples = tokenize_records(tokenizer, train_rows, fmt, max_length)
    if not examples:
        raise ValueError("no relearn item has a token to score; raise max_length")
    sampler = ForgetRetainSampler(
        examples, None, batch_size=min(batch_size, len(examples)), seed=seed,
        pad_id=pad_token_id(tokenizer),
    )  # fmt: skip
    graphdef, params, rest = split_model(model)
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs; keep `model` intact
    step_fn = make_step(
        graphdef, rest, objectives.forget_retain(objectives.nll()),
        optax.adamw(learning_rate, weight_decay=0.0),
    )  # fmt: skip
    opt_state = step_fn.init(params)
    results, losses = [], []
    for step in range(steps[-1] + 1):
        if step in steps:  # measured before the next step donates these parameters
            results.append(measure(nnx.merge(graphdef, params, rest), measured))
        if step == steps[-1]:
            break
        batch = place_batch(sampler.batch_at(step), mesh)
        params, opt_state, _, metrics = step_fn(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    return RelearnCurve(split, steps, tuple(results), tuple(losses))


__all__ = ["DEFAULT_STEPS", "RelearnCurve", "RelearnSplit", "relearn_curve", "relearn_split"]
