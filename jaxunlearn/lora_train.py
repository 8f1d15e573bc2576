"""LoRA unlearning runs: the training step with the frozen base as a jit argument.

A LoRA model (`jaxunlearn.models.lora.apply_lora`) splits into the adapters (its
``nnx.Param`` state, trained) and the frozen base (the rest). ``train.make_step`` would close
over the rest, and `jax.jit` compiles closed-over arrays into the program as constants: every
base weight would be embedded in the executable. `make_step` here passes the base as an
argument instead, and `FrozenBase` wraps an optax transformation so that `train.unlearn` uses
that step.

Example:
  >>> lora_model = apply_lora(model, rank=16, alpha=32)                    # doctest: +SKIP
  >>> tx = FrozenBase(optax.chain(transforms.retain_projection(), optax.adamw(1e-4)),
  ...                 split_grads=True)
  >>> result = train.unlearn(lora_model, objective, tx, sampler, steps=100)
  >>> save_peft_adapter(result.model, "out/adapter")
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from jaxunlearn import train


def make_step(
    graphdef: nnx.GraphDef,
    rest: Any,
    objective: Any,
    tx: optax.GradientTransformation,
    *,
    ref_params: Any = None,
    shard_base: bool = True,
    **kwargs: Any,
) -> Any:
    """`jaxunlearn.train.make_step` with the frozen base as a jit *argument*.

    ``train.make_step`` closes over `rest`; under `jax.jit` closed-over arrays are compiled
    into the program as constants. For a LoRA model `rest` is the whole frozen base, so the
    executable would embed every base weight (compile time and memory grow with the model).
    This builds the same step inside the trace, with `rest` passed through the `TrainStep`'s
    non-donated argument (where the reference parameters travel), so the base is an input
    buffer, shared and never copied. The result is a ``train.TrainStep``.

    When the base lives on a mesh (as `unlearn` places it, replicated) and `shard_base`, it
    is FSDP-sharded like the parameters (`jaxunlearn.parallel.param_sharding`), so a large
    base is not replicated on every device.

    Args:
      graphdef: from ``train.split_model(lora_model)``.
      rest: the frozen base (and any other non-parameter state).
      objective: as for ``train.make_step``.
      tx: as for ``train.make_step``.
      ref_params: frozen reference parameters, as for ``train.make_step``.
      shard_base: FSDP-shard a mesh-placed base.
      **kwargs: the other keyword arguments of ``train.make_step`` (``needs_split_grads``,
        ``micro_batches``, ``ref_graphdef``, ``ref_rest``).

    Returns:
      A ``train.TrainStep``.
    """
    if shard_base:
        rest = _shard_like_params(rest)

    def update_fn(params, opt_state, batch, objective_state, carried):
        ref, base = carried
        inner = train.make_step(graphdef, base, objective, tx, ref_params=ref, **kwargs)
        return inner.update_fn(params, opt_state, batch, objective_state, ref)

    # Validate the arguments now (make_step raises on bad ones), not at the first call.
    train.make_step(graphdef, rest, objective, tx, ref_params=ref_params, **kwargs)
    return train.TrainStep(update_fn, tx.init, (ref_params, rest))


def _shard_like_params(rest: Any) -> Any:
    leaves = jax.tree.leaves(rest)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return rest
    from jaxunlearn import parallel

    return jax.device_put(rest, parallel.param_sharding(rest, sharding.mesh))


class FrozenBase:
    """An optax transformation for `jaxunlearn.train.unlearn` on a LoRA model.

    `unlearn` builds its step with ``tx.make_step(...)`` when `tx` has one; this one is
    `make_step` above (the frozen base as a jit argument, FSDP-sharded on a mesh).

    Args:
      tx: the optax transformation (e.g. ``optax.chain(retain_projection(), adamw(...))``).
      split_grads: pass forget and retain gradients apart (GU, HAMU); `unlearn`'s own
        `split_grads` does not reach a `tx` with `make_step`.
      shard_base: see `make_step`.

    Example:
      >>> result = train.unlearn(apply_lora(model), objective,                # doctest: +SKIP
      ...                        FrozenBase(optax.adamw(1e-4)), sampler, steps=100)
    """

    def __init__(
        self, tx: optax.GradientTransformation, *, split_grads: bool = False, shard_base=True
    ):
        self.tx = tx
        self.split_grads = split_grads
        self.shard_base = shard_base

    def init(self, params: Any) -> Any:
        return self.tx.init(params)

    def update(self, updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return self.tx.update(updates, state, params, **extra)

    def make_step(
        self, graphdef: nnx.GraphDef, rest: Any, objective: Any, *, ref_params=None, **kwargs
    ) -> Any:
        """The step `unlearn` runs (see `make_step`)."""
        return make_step(
            graphdef, rest, objective, self.tx, ref_params=ref_params,
            needs_split_grads=self.split_grads, shard_base=self.shard_base, **kwargs,
        )  # fmt: skip


__all__ = ["FrozenBase", "make_step"]
