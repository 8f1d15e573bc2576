"""Selective Synaptic Dampening as a run: two Fisher passes and one parameter transform.

The one-shot member of the family; the transforms it composes (`transforms.fisher_diagonal`,
`transforms.ssd`) are pure and work on any parameter pytree.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn.parallel import place_batch, place_split_model
from jaxunlearn.train.loop import UnlearnResult
from jaxunlearn.train.step import Batch, model_forward, split_model


def ssd_unlearn(
    model: nnx.Module,
    forget_data: Iterable[Batch],
    full_data: Iterable[Batch] | None,
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
    convention: str = "batch_mean",
    importance_full: Any = None,
    loss: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> UnlearnResult:
    """Selective Synaptic Dampening: one-shot unlearning from two Fisher diagonals.

    Computes the importance of every parameter on the forget set (I_f) and on the full
    training data (I_D), then scales the parameters with I_f > alpha · I_D by
    min(lam · I_D / I_f, 1) (`transforms.ssd`). No training loop, no reference model.

    Args:
      model: the model (left untouched).
      forget_data: sequence batches of the forget set.
      full_data: sequence batches of the full training data (retain + forget), with the same
        batch size as `forget_data` under ``convention="batch_mean"``; None when
        `importance_full` is given.
      alpha: selection weighting (SSD: 10 for ResNet18 / ViT random forgetting).
      lam: dampening constant lambda.
      convention: "batch_mean" (the SSD code's squared batch-mean gradients, batch-size
        dependent) or "per_example" (the empirical Fisher), see `transforms.fisher_diagonal`.
      importance_full: a precomputed I_D (it depends only on the full data, so it can be
        computed once before any unlearning request).
      loss: the per-batch loss term (default `objectives.nll()`, the token-mean
        cross-entropy that SSD's ``nn.CrossEntropyLoss`` is).
      mesh: place parameters and batches on this mesh.

    Returns:
      An `UnlearnResult` with one metrics record: parameters selected and their fraction.

    Raises:
      ValueError: neither `full_data` nor `importance_full`, or an empty data iterable.

    References:
      Foster, Schoepf, Brintrup, "Fast Machine Unlearning Without Retraining Through
      Selective Synaptic Dampening", arXiv 2308.07707 (2023).
    """
    from jaxunlearn import objectives, transforms

    if full_data is None and importance_full is None:
        raise ValueError(
            "ssd_unlearn needs full_data (retain + forget batches) or importance_full."
        )
    graphdef, params, rest = split_model(model)
    params, rest = place_split_model(params, rest, mesh)
    term = objectives.nll() if loss is None else loss

    def loss_fn(p, batch):
        return term(model_forward(graphdef, p, rest), batch)[0]

    def placed(batches):
        return (place_batch(b, mesh) for b in batches)

    t0 = time.perf_counter()
    i_forget = transforms.fisher_diagonal(
        loss_fn, params, placed(forget_data), convention=convention
    )
    if importance_full is None:
        importance_full = transforms.fisher_diagonal(
            loss_fn, params, placed(full_data), convention=convention
        )
    new_params = transforms.ssd(params, importance_full, i_forget, alpha=alpha, lam=lam)
    selected = sum(
        int(jnp.sum(f > alpha * d))
        for f, d in zip(jax.tree.leaves(i_forget), jax.tree.leaves(importance_full))
    )
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    record = {
        "step": 0,
        "selected": float(selected),
        "selected_fraction": selected / max(total, 1),
        "wall_time": time.time(),
        "step_time": time.perf_counter() - t0,
    }
    return UnlearnResult(nnx.merge(graphdef, new_params, rest), [record], 0, 0)


def ssd_unlearn_sampler(
    model: nnx.Module,
    sampler: Any,
    hyperparameters: Any,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> UnlearnResult:
    """`ssd_unlearn` with a `data.ForgetRetainSampler`'s forget set against its retain + forget
    set (the model's training data), in consecutive batches of one size (SSD's batch-mean
    Fisher depends on the batch size).

    Args:
      model: the model (left untouched).
      sampler: a sampler with a retain set (`data.forget_retain(..., retain=...)`).
      hyperparameters: ``alpha``, ``lam`` and ``convention`` (e.g. ``recipe("ssd").hyperparameters``).
      mesh: place parameters and batches on this mesh.
    """
    return ssd_unlearn(
        model,
        sampler.sequential_batches("forget"),
        sampler.sequential_batches("full"),
        alpha=hyperparameters["alpha"],
        lam=hyperparameters["lam"],
        convention=hyperparameters["convention"],
        mesh=mesh,
    )
