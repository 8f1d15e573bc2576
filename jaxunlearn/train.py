"""The training layer: one jitted unlearning step, and the run driver around it.

`make_step` builds the step: a single `jax.jit` over ``(params, opt_state, batch,
objective_state)`` that differentiates an objective, runs an optax transformation and applies
the update, with params and optimizer state donated (never the frozen reference). The model is
used functionally: ``nnx.split`` once outside, ``nnx.merge`` inside the traced function.

`unlearn` drives a run: deterministic batches from the data layer (``batch_at(step)``, a pure
function of (seed, step)), reference log-probs precomputed once per item, sharding over a
mesh, orbax checkpoints with resume, a tqdm bar, JSON Lines / TensorBoard metrics, and a guard
that stops on a non-finite loss without saving (or even applying) the bad update.

`ssd_unlearn` is the one-shot member of the family (Selective Synaptic Dampening).

Example:
  >>> import optax, jaxunlearn as ju                                    # doctest: +SKIP
  >>> objective = ju.objectives.forget_retain(ju.objectives.npo(0.1), ju.objectives.nll())
  >>> result = ju.train.unlearn(model, objective, optax.adamw(1e-5), sampler, steps=100,
  ...                           checkpoint_dir="run/ckpt", checkpoint_every=25,
  ...                           log_path="run/metrics.jsonl")          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

Batch = Mapping[str, Any]
Metrics = dict[str, Any]

# CPU (and some layouts elsewhere) cannot reuse every donated buffer; the warning is expected
# and says nothing about correctness, so it is silenced around our own jitted calls only.
_DONATION_WARNING = "Some donated buffers were not usable"


# ----------------------------------------------------------------------------- the model


def model_forward(graphdef: nnx.GraphDef, params: Any, rest: Any) -> Callable[..., Any]:
    """A forward function ``forward(**model_kwargs)`` for a split model.

    Args:
      graphdef: from ``nnx.split(model, nnx.Param, ...)``.
      params: the parameter state (possibly traced).
      rest: the remaining state.

    Returns:
      ``forward(**kw) = nnx.merge(graphdef, params, rest)(**kw)``.
    """

    def forward(**kwargs):
        return nnx.merge(graphdef, params, rest)(**kwargs)

    return forward


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """``nnx.split(model, nnx.Param, ...)``: (graphdef, params, rest)."""
    return nnx.split(model, nnx.Param, ...)


# ----------------------------------------------------------------------------- objectives


def has_state_protocol(objective: Any) -> bool:
    """Whether `objective` offers `init_state` / `update_state` (ForgetRetain, PrimalDual)."""
    return hasattr(objective, "init_state") and hasattr(objective, "update_state")


def init_objective_state(objective: Any) -> Any:
    """The objective's initial state (PDU's dual variable), or None."""
    return objective.init_state() if has_state_protocol(objective) else None


def call_objective(
    objective: Any, forward: Callable, batch: Batch, ref_forward: Callable | None, state: Any
) -> tuple[jax.Array, dict]:
    """Evaluates a combined objective or a plain term ``(forward, batch, *, ref_forward)``."""
    if has_state_protocol(objective):
        return objective(forward, batch, ref_forward=ref_forward, state=state)
    return objective(forward, batch, ref_forward=ref_forward)


def _scalars(aux: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The scalar entries of an aux dict as float32 (metrics must be scalars)."""
    out = {}
    for key, value in aux.items():
        value = jnp.asarray(value)
        if value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.number):
            out[key] = value.astype(jnp.float32)
    return out


def _check_split_objective(objective: Any) -> None:
    missing = [m for m in ("forget_loss", "retain_loss", "weights") if not hasattr(objective, m)]
    if missing:
        raise ValueError(
            f"needs_split_grads=True needs an objective with forget_loss/retain_loss/weights "
            f"(objectives.forget_retain(...) or objectives.pdu(...)); {type(objective).__name__} "
            f"lacks {missing}."
        )


def loss_and_grads(
    objective: Any,
    graphdef: nnx.GraphDef,
    rest: Any,
    params: Any,
    batch: Batch,
    objective_state: Any,
    ref_forward: Callable | None,
    *,
    split: bool,
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients and scalar metrics of the objective on one (micro-)batch.

    Args:
      objective: a combined objective or a plain term.
      graphdef: the model's graph.
      rest: the model's non-parameter state.
      params: the parameters to differentiate.
      batch: an unlearning batch.
      objective_state: the objective's state (or None).
      ref_forward: the frozen reference's forward, or None.
      split: return ``(grad(gamma·L_forget), grad(alpha·L_retain))`` instead of one gradient.

    Returns:
      (grads, metrics): grads a params-like tree, or a pair of them when `split`; metrics the
      scalar aux entries with "loss" (and "forget_loss" / "retain_loss" when known).
    """

    def forward_at(p):
        return model_forward(graphdef, p, rest)

    if not split:

        def total(p):
            loss, aux = call_objective(
                objective, forward_at(p), batch, ref_forward, objective_state
            )
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(total, has_aux=True)(params)
        return grads, {**_scalars(aux), "loss": jnp.asarray(loss, jnp.float32)}

    gamma, alpha = objective.weights(objective_state)

    def weighted(part):
        def fn(p):
            term = objective.forget_loss if part == "forget" else objective.retain_loss
            loss, aux = term(forward_at(p), batch, ref_forward=ref_forward)
            weight = gamma if part == "forget" else alpha
            return weight * loss, (loss, aux)

        return fn

    (wf, (lf, aux_f)), g_f = jax.value_and_grad(weighted("forget"), has_aux=True)(params)
    (wr, (lr, aux_r)), g_r = jax.value_and_grad(weighted("retain"), has_aux=True)(params)
    metrics = {f"forget/{k}": v for k, v in _scalars(aux_f).items()}
    metrics |= {f"retain/{k}": v for k, v in _scalars(aux_r).items()}
    metrics |= {
        "loss": jnp.asarray(wf + wr, jnp.float32),
        "forget_loss": jnp.asarray(lf, jnp.float32),
        "retain_loss": jnp.asarray(lr, jnp.float32),
    }
    return (g_f, g_r), metrics


# ----------------------------------------------------------------------------- accumulation


def micro_batches(batch: Batch, count: int) -> Any:
    """Splits every leaf [B, ...] of a batch into [count, B / count, ...].

    Micro-batch k holds rows k, k + count, k + 2·count, ...: a reshape to [B / count, count]
    followed by a swap of the two axes, so a batch sharded along B needs no communication and
    the partition depends only on the row index, never on the device count.
    """

    def split(path, x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % count:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has shape {x.shape}: its batch size "
                f"must be a multiple of micro_batches = {count}."
            )
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map_with_path(split, batch)


def accumulate(
    grad_fn: Callable[[Batch], tuple[Any, dict]], batch: Batch, count: int
) -> tuple[Any, dict]:
    """Mean of `grad_fn`'s gradients and metrics over `count` micro-batches (lax.scan).

    Each micro-batch loss is averaged with equal weight, as Hugging Face / open-unlearning
    gradient accumulation does; for per-item-mean losses this equals the full-batch gradient.
    """
    if count == 1:
        return grad_fn(batch)
    parts = micro_batches(batch, count)
    first = jax.tree.map(lambda x: x[0], parts)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, first))

    def body(carry, part):
        return jax.tree.map(jnp.add, carry, grad_fn(part)), None

    total, _ = lax.scan(body, zeros, parts)
    return jax.tree.map(lambda x: x / count, total)


# ----------------------------------------------------------------------------- the step


def learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate of the last update, when the optimizer exposes it.

    Found in the state of ``optax.inject_hyperparams(...)(learning_rate=...)`` (after an
    update it holds the rate that update used); None for optimizers that do not expose it.
    """
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate")
    for path, value in found:
        names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        if "hyperparams" in names and hasattr(value, "ndim") and value.ndim == 0:
            return jnp.asarray(value, jnp.float32)
    return None


def stop_requested(opt_state: Any) -> jax.Array:
    """True when a transform in `opt_state` asks the run to end (a boolean ``stop`` field).

    HAMU's `HardnessAwareState.stop` is set once its constraint becomes infeasible or its
    stopping criterion is met; the transform then emits zero updates.
    """
    flags = [
        jnp.asarray(v)
        for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "stop")
        if hasattr(v, "dtype") and jnp.asarray(v).dtype == jnp.bool_ and jnp.ndim(v) == 0
    ]
    return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), jnp.bool_)


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `finite`, else `old`, leaf by leaf (the guard against a bad update)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class TrainStep:
    """A jitted unlearning step with donated params and optimizer state.

    Call it as ``params, opt_state, objective_state, metrics = step(params, opt_state, batch,
    objective_state)``. The inputs `params` and `opt_state` are donated: do not reuse them.
    The frozen reference parameters travel as a separate, non-donated argument.

    Args:
      update_fn: pure ``(params, opt_state, batch, objective_state, ref_params) ->
        (params, opt_state, objective_state, metrics)``.
      init_fn: ``params -> opt_state``.
      ref_params: frozen reference parameters passed to every call (or None).
    """

    def __init__(self, update_fn: Callable, init_fn: Callable, ref_params: Any = None):
        self.update_fn = update_fn
        self.init_fn = init_fn
        self.ref_params = ref_params
        self._jitted = None

    def init(self, params: Any) -> Any:
        """The optimizer state for `params` (sharded like them)."""
        shapes = jax.eval_shape(self.init_fn, params)
        shardings = _shardings_like(params, shapes)
        init = (
            jax.jit(self.init_fn, out_shardings=shardings) if shardings else jax.jit(self.init_fn)
        )
        return init(params)

    def _compile_for(self, params: Any, opt_state: Any, objective_state: Any) -> None:
        out_shardings = None
        param_sh = _tree_shardings(params)
        if param_sh is not None:
            mesh = jax.tree.leaves(param_sh)[0].mesh
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            opt_sh = _tree_shardings(opt_state) or replicated
            # Outputs keep the inputs' shardings, so the next call hits the same executable.
            out_shardings = (param_sh, opt_sh, replicated, replicated)
        self._jitted = jax.jit(self.update_fn, donate_argnums=(0, 1), out_shardings=out_shardings)

    def __call__(
        self, params: Any, opt_state: Any, batch: Batch, objective_state: Any = None
    ) -> tuple[Any, Any, Any, Metrics]:
        if self._jitted is None:
            self._compile_for(params, opt_state, objective_state)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DONATION_WARNING)
            return self._jitted(params, opt_state, batch, objective_state, self.ref_params)

    def cache_size(self) -> int:
        """How many executables the step has compiled (one per batch shape)."""
        return 0 if self._jitted is None else self._jitted._cache_size()


def _tree_shardings(tree: Any) -> Any:
    """The leaves' NamedShardings, or None when any leaf is not mesh-sharded."""
    leaves = jax.tree.leaves(tree)
    if not leaves or not all(
        isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) for x in leaves
    ):
        return None
    return jax.tree.map(lambda x: x.sharding, tree)


def _shardings_like(params: Any, state_shapes: Any) -> Any:
    """FSDP shardings for an optimizer state when `params` live on a mesh, else None."""
    param_sh = _tree_shardings(params)
    if param_sh is None:
        return None
    from jaxunlearn import parallel

    return parallel.param_sharding(state_shapes, jax.tree.leaves(param_sh)[0].mesh)


def make_step(
    graphdef: nnx.GraphDef,
    rest: Any,
    objective: Any,
    tx: optax.GradientTransformation,
    *,
    ref_params: Any = None,
    ref_graphdef: nnx.GraphDef | None = None,
    ref_rest: Any = None,
    needs_split_grads: bool = False,
    micro_batches: int = 1,
) -> TrainStep:
    """Builds the jitted unlearning step for a split model.

    One call computes the objective's gradients (averaged over `micro_batches` with a
    `lax.scan`), transforms them with `tx`, applies the update and advances the objective's
    state (PDU's dual variable). When the loss or the gradient norm is not finite the
    parameters, optimizer state and objective state are returned unchanged (a guard inside
    the step: the donated buffers of the last good parameters are never overwritten by a bad
    update) and ``metrics["finite"]`` is 0.

    With `needs_split_grads` (transforms that combine forget and retain gradients themselves:
    GU's retain projection, HAMU), the step computes ``g_f = grad(gamma·L_forget)`` and
    ``g_r = grad(alpha·L_retain)`` separately (``(gamma, alpha) = objective.weights(state)``)
    and calls ``tx.update(g_f, opt_state, params, retain_grads=g_r)``; otherwise it calls
    ``tx.update(grad(L), opt_state, params)``.

    Everything that changes during a run is an array in the step's inputs: learning-rate
    schedules live in the optimizer state (``optax.inject_hyperparams``), PDU's multiplier in
    the objective state. Python floats closed over by the objective or `tx` are compile-time
    constants, and the step compiles once per batch shape (one per length bucket).

    Args:
      graphdef: from ``nnx.split(model, nnx.Param, ...)``.
      rest: the model's non-parameter state (constant during training).
      objective: a combined objective (`objectives.forget_retain`, `objectives.pdu`, ...) or any
        ``term(forward, batch, *, ref_forward=None) -> (loss, aux)``.
      tx: the optax transformation (an ExtraArgs one accepting ``retain_grads`` when
        `needs_split_grads`).
      ref_params: frozen reference parameters for objectives that run the reference in the
        step (KL retain, UNDIAL, RMU); None when none is needed.
      ref_graphdef: the reference's graph (default: `graphdef`).
      ref_rest: the reference's other state (default: `rest`).
      needs_split_grads: pass forget and retain gradients apart (see above).
      micro_batches: gradient-accumulation micro-batches per step; the batch size must be a
        multiple of it.

    Returns:
      A `TrainStep`: ``step(params, opt_state, batch, objective_state) -> (params, opt_state,
      objective_state, metrics)``; ``step.init(params)`` gives the optimizer state.

    Raises:
      ValueError: `micro_batches` < 1, or a split-gradient setup the objective or `tx` cannot
        serve.
    """
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}.")
    if needs_split_grads:
        _check_split_objective(objective)
        if not isinstance(tx, optax.GradientTransformationExtraArgs):
            raise ValueError(
                "needs_split_grads=True passes retain_grads= to tx.update, but tx is a plain "
                "optax.GradientTransformation; build it with optax.chain(...) around a transform "
                "that takes retain_grads (e.g. jaxunlearn.transforms.retain_projection)."
            )
    ref_graphdef = graphdef if ref_graphdef is None else ref_graphdef
    ref_rest = rest if ref_rest is None else ref_rest

    def update_fn(params, opt_state, batch, objective_state, ref_params):
        ref_forward = None
        if ref_params is not None:
            ref_forward = model_forward(ref_graphdef, lax.stop_gradient(ref_params), ref_rest)

        def grad_fn(part):
            return loss_and_grads(
                objective, graphdef, rest, params, part, objective_state, ref_forward,
                split=needs_split_grads,
            )  # fmt: skip

        grads, metrics = accumulate(grad_fn, batch, micro_batches)
        if needs_split_grads:
            g_f, g_r = grads
            updates, new_opt_state = tx.update(g_f, opt_state, params, retain_grads=g_r)
            metrics["forget_grad_norm"] = optax.global_norm(g_f)
            metrics["retain_grad_norm"] = optax.global_norm(g_r)
            grads = jax.tree.map(jnp.add, g_f, g_r)
        else:
            updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_state = objective_state
        if has_state_protocol(objective):
            new_state = objective.update_state(objective_state, metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        new_params, new_opt_state, new_state = keep_if_finite(
            finite, (new_params, new_opt_state, new_state), (params, opt_state, objective_state)
        )
        lr = learning_rate(new_opt_state)
        if lr is not None:
            metrics["lr"] = lr
        metrics["finite"] = finite.astype(jnp.float32)
        metrics["stop"] = stop_requested(new_opt_state).astype(jnp.float32)
        return new_params, new_opt_state, new_state, metrics

    return TrainStep(update_fn, tx.init, ref_params)


# ----------------------------------------------------------------------------- reference


def reference_parts(
    objective: Any,
    graphdef: nnx.GraphDef,
    params: Any,
    rest: Any,
    batch: Batch,
    objective_state: Any = None,
    *,
    split: bool = False,
) -> set[str]:
    """Which parts of an unlearning batch the objective runs the reference model on.

    Traces the objective abstractly (`jax.eval_shape`, no computation) with a recording
    reference forward and maps each call back to the batch part whose ``input_ids`` it got.
    A call on anything else is reported as "?".

    Args:
      objective: the objective.
      graphdef: the model's graph.
      params: the parameters (arrays or shapes).
      rest: the model's other state.
      batch: an unlearning batch (host arrays are fine).
      objective_state: the objective's state.
      split: trace the split-gradient path (forget and retain losses apart).

    Returns:
      The set of part names (e.g. {"forget"} for NPO without precomputed log-probs, {"retain"}
      for a KL retain term); empty when no reference is needed.
    """
    calls: list[str] = []

    def fn(p, b):
        names = {
            id(part["input_ids"]): name
            for name, part in b.items()
            if isinstance(part, Mapping) and "input_ids" in part
        }
        forward = model_forward(graphdef, p, rest)

        def ref_forward(**kwargs):
            calls.append(names.get(id(kwargs.get("input_ids")), "?"))
            return forward(**kwargs)

        _, metrics = loss_and_grads(
            objective, graphdef, rest, p, b, objective_state, ref_forward, split=split
        )
        return metrics["loss"]

    jax.eval_shape(fn, params, batch)
    return set(calls)


def _reference_logprob_fn(ref_graphdef: nnx.GraphDef, ref_rest: Any) -> Callable:
    from jaxunlearn.objectives import reference_logprob

    def fn(ref_params, batch):
        return reference_logprob(model_forward(ref_graphdef, ref_params, ref_rest), batch)

    return jax.jit(fn)


class ReferenceLogprobs:
    """Wraps a `data.ForgetRetainSampler` so batches carry reference sequence log-probs.

    ``batch_at(step)`` is the sampler's batch with ``batch[part]["ref_logprob"]`` (float32 [B],
    the summed log-prob of each item's scored tokens under the frozen reference) added for the
    chosen parts. Each item is scored once: the forget set up front, retain items and
    alternates (an item's refusal candidates) the first time a step uses them, then cached.
    Scoring is canonical so a resumed run reproduces an uninterrupted one bit for bit: items
    are grouped by their own length bucket and scored in fixed [rows, bucket] shapes (one
    compile per bucket), so a value never depends on which other items share its batch.

    Args:
      sampler: a `jaxunlearn.data.ForgetRetainSampler` (needs `indices_at`, `forget`,
        `retain`, `alternates`).
      parts: the parts to annotate ("forget", "retain", "alternate").
      ref_params: the frozen reference parameters.
      ref_graphdef: the reference's graph.
      ref_rest: the reference's other state.
      rows: rows per scoring call (default: the sampler's batch size).
      mesh: shard scoring batches over this mesh.
    """

    def __init__(
        self,
        sampler: Any,
        parts: Iterable[str],
        ref_params: Any,
        ref_graphdef: nnx.GraphDef,
        ref_rest: Any,
        *,
        rows: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.sampler = sampler
        self.parts = tuple(sorted(set(parts)))
        unknown = set(self.parts) - {"forget", "retain", "alternate"}
        if unknown:
            raise ValueError(f"cannot precompute reference log-probs for parts {sorted(unknown)}.")
        self.ref_params = ref_params
        self.rows = int(rows or sampler.batch_size)
        self.mesh = mesh
        self._score = _reference_logprob_fn(ref_graphdef, ref_rest)
        self._cache: dict[str, dict[Any, float]] = {part: {} for part in self.parts}
        pad = dict(getattr(sampler, "_pad", {}))
        self._buckets = tuple(pad.pop("buckets", ()))
        self._pad = pad
        if "forget" in self.parts:
            self._fill("forget", list(range(len(sampler.forget))))

    def __getattr__(self, name: str) -> Any:
        # Everything else (steps_per_epoch, batch_size, seed, ...) is the sampler's.
        if name == "sampler":  # not yet set (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)

    def _example(self, part: str, key: Any) -> Mapping[str, Any]:
        if part == "forget":
            return self.sampler.forget[key]
        if part == "retain":
            return self.sampler.retain[key]
        return self.sampler.alternates.example(*key)

    def _keys(self, part: str, step: int) -> list[Any]:
        idx = self.sampler.indices_at(step)
        if part == "forget":
            return idx.forget.tolist()
        if part == "retain":
            return [] if idx.retain is None else idx.retain.tolist()
        if idx.alternate is None:
            return []
        return list(zip(idx.forget.tolist(), idx.alternate.tolist()))

    def _fill(self, part: str, keys: Sequence[Any]) -> None:
        from jaxunlearn.data import bucket_length, pad_to_bucket

        cache = self._cache[part]
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        groups: dict[int, list[Any]] = {}
        for key in missing:
            length = len(self._example(part, key)["input_ids"])
            bucket = bucket_length(length, self._buckets) if self._buckets else length
            groups.setdefault(bucket, []).append(key)
        for bucket, group in sorted(groups.items()):
            for start in range(0, len(group), self.rows):
                chunk = group[start : start + self.rows]
                examples = [
                    {k: self._example(part, key)[k] for k in ("input_ids", "labels")}
                    for key in chunk
                ]
                examples += [examples[-1]] * (self.rows - len(chunk))  # fixed shape: pad rows
                seq = pad_to_bucket(examples, (bucket,), **self._pad)
                values = np.asarray(self._score(self.ref_params, _place(seq, self.mesh)))
                cache.update(zip(chunk, values[: len(chunk)].tolist()))

    def batch_at(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """The sampler's batch at `step` with ``ref_logprob`` on the chosen parts."""
        batch = self.sampler.batch_at(step)
        for part in self.parts:
            if part not in batch:
                continue
            keys = self._keys(part, step)
            self._fill(part, keys)
            values = np.asarray([self._cache[part][k] for k in keys], np.float32)
            batch[part] = {**batch[part], "ref_logprob": values}
        return batch


def _place(batch: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """Host batch -> device arrays (split along the batch over `mesh` when given)."""
    if mesh is None:
        return jax.device_put(jax.tree.map(np.asarray, batch))
    from jaxunlearn import parallel

    return parallel.shard_batch(batch, mesh)


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """Per-step metrics to JSON Lines and, when asked, TensorBoard.

    On resume the JSON Lines file keeps only the lines of steps before the resumed step, so an
    interrupted-and-resumed run leaves the same lines as an uninterrupted one. Non-finite
    values are written as null (JSON has no NaN). Only process 0 writes.

    Args:
      path: the JSON Lines file, or None.
      tensorboard_dir: a TensorBoard log directory, or None.
      start_step: the first step this run will log.
    """

    def __init__(self, path: str | os.PathLike | None, tensorboard_dir: Any, start_step: int):
        leader = jax.process_index() == 0
        self._writer = open_tensorboard(tensorboard_dir) if tensorboard_dir and leader else None
        self._file = None
        if path is None or jax.process_index() != 0:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists() and start_step > 0:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", math.inf) < start_step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Appends one step's record (flushed, so a crash loses nothing logged)."""
        if self._file is not None:
            clean = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in record.items()
            }
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        if self._writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, float):
                    self._writer.add_scalar(f"unlearn/{key}", value, step)

    def close(self) -> None:
        """Closes the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _TFWriter:
    """`tf.summary` behind tensorboardX's `add_scalar` / `close` interface."""

    def __init__(self, tf: Any, logdir: str):
        self._tf = tf
        self._writer = tf.summary.create_file_writer(logdir)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        with self._writer.as_default():
            self._tf.summary.scalar(tag, value, step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def open_tensorboard(logdir: str | os.PathLike) -> Any:
    """A TensorBoard scalar writer from tensorboardX, else TensorFlow.

    Raises:
      ImportError: neither package is installed (the message says what to install).
    """
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(os.fspath(logdir))
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return _TFWriter(tf, os.fspath(logdir))
    except ImportError:
        pass
    raise ImportError(
        f"tensorboard_dir={os.fspath(logdir)!r} needs tensorboardX or tensorflow to write "
        "TensorBoard files, and neither is installed: `pip install tensorboardX`, or drop "
        "tensorboard_dir (metrics still go to the JSON Lines log)."
    )


# ----------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class UnlearnResult:
    """What `unlearn` returns.

    Attributes:
      model: the unlearned model (a new NNX module; the input model is left untouched).
      metrics: one dict per step run in this call (host floats), as written to the log.
      step: steps completed in total, i.e. the data cursor: the next step would use
        ``batch_at(step)``.
      start_step: the step this call started from (> 0 when resumed from a checkpoint).
      opt_state: the final optimizer state.
      objective_state: the final objective state (PDU's dual variable), or None.
      stopped: None, or why the run stopped early (``on_nonfinite="stop"``, or a
        transformation's stop signal).
      compiles: executables the step compiled in this call (one per batch shape).
    """

    model: nnx.Module
    metrics: list[dict[str, Any]]
    step: int
    start_step: int
    opt_state: Any = None
    objective_state: Any = None
    stopped: str | None = None
    compiles: int = 0


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the bad update was not applied or saved.

    Attributes:
      step: the step whose loss was not finite.
      loss: that loss (NaN or inf).
      checkpoint_step: the last checkpoint kept on disk (its data cursor), or None.
      result: an `UnlearnResult` holding the last good parameters (before `step`).
    """

    def __init__(self, message: str, *, step: int, loss: float, checkpoint_step, result):
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.checkpoint_step = checkpoint_step
        self.result = result


def _batch_source(data: Any) -> Callable[[int], Any]:
    if hasattr(data, "batch_at"):
        return data.batch_at
    if callable(data):
        return data
    raise TypeError(
        f"data must have batch_at(step) (jaxunlearn.data.ForgetRetainSampler) or be a callable "
        f"step -> batch; got {type(data).__name__}."
    )


def _can_precompute(data: Any) -> bool:
    return all(hasattr(data, a) for a in ("indices_at", "forget", "retain", "alternates"))


def _without_ref_logprob(batch: Mapping[str, Any]) -> dict:
    return {
        name: {k: v for k, v in part.items() if k != "ref_logprob"}
        if isinstance(part, Mapping)
        else part
        for name, part in batch.items()
    }


def _with_dummy_ref_logprob(batch: Mapping[str, Any], parts: Iterable[str]) -> dict:
    out = dict(batch)
    for name in parts:
        rows = np.asarray(batch[name]["input_ids"]).shape[0]
        out[name] = {**batch[name], "ref_logprob": np.zeros((rows,), np.float32)}
    return out


@dataclasses.dataclass
class _Reference:
    data: Any  # the data source, possibly wrapped to add ref_logprob
    in_step_params: Any  # frozen params the step needs, or None
    precomputed: tuple[str, ...]
    in_step: tuple[str, ...]


def _plan_reference(
    objective, graphdef, params, rest, objective_state, data, *, split, precompute, ref, mesh
) -> _Reference:
    """Decides which reference values are precomputed and which run in the step."""
    probe = _without_ref_logprob(_batch_source(data)(0))
    parts = reference_parts(objective, graphdef, params, rest, probe, objective_state, split=split)
    if not parts:
        return _Reference(data, None, (), ())
    ref_graphdef, ref_params, ref_rest = ref()
    candidates = parts & {"forget", "retain", "alternate"}
    precomputed: set[str] = set()
    if precompute and candidates and _can_precompute(data):
        annotated = _with_dummy_ref_logprob(probe, candidates)
        still = reference_parts(
            objective, graphdef, params, rest, annotated, objective_state, split=split
        )
        precomputed = candidates - still
        parts = still | (parts - candidates)
    if precomputed:
        data = ReferenceLogprobs(data, precomputed, ref_params, ref_graphdef, ref_rest, mesh=mesh)
    in_step = ref_params if parts else None
    return _Reference(data, in_step, tuple(sorted(precomputed)), tuple(sorted(parts)))


def _restore(ckpt, state, mesh, seed, data_seed, steps):
    from jaxunlearn.checkpoints import abstract_target

    meta = ckpt.metadata()
    for key, value in (("seed", seed), ("data_seed", data_seed)):
        if meta.get(key, value) != value:
            raise ValueError(
                f"checkpoint {ckpt.directory} was written with {key} {meta.get(key)}, but this "
                f"run uses {key} {value}: the data order would differ. Use the same seed, "
                "resume=False, or a new checkpoint_dir."
            )
    cursor = int(meta["step"])
    if cursor > steps:
        raise ValueError(
            f"checkpoint {ckpt.directory} is at step {cursor}, past steps={steps}; raise steps "
            "or use a new checkpoint_dir."
        )
    restored = ckpt.restore(abstract_state=abstract_target(state, mesh))
    return restored, cursor


def unlearn(
    model: nnx.Module,
    objective: Any,
    tx: optax.GradientTransformation | Any,
    data: Any,
    *,
    steps: int,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
    split_grads: bool = False,
    micro_batches: int = 1,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    max_checkpoints: int | None = 3,
    resume: bool = True,
    log_path: str | os.PathLike | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    progress: bool = True,
    ref_model: nnx.Module | None = None,
    precompute_reference: bool = True,
    on_nonfinite: str = "raise",
    callback: Callable[[int, dict], None] | None = None,
) -> UnlearnResult:
    """Runs `steps` unlearning steps on `model` and returns the unlearned model.

    Step s uses ``data.batch_at(s)``, a pure function of (seed, step), so the run is the same on
    any number of devices and resumes exactly: the data cursor is the step. The reference
    model (the frozen starting model unless `ref_model` is given) is handled as cheaply as the
    objective allows: sequence log-probs for NPO/DPO-style terms are computed once per item
    (`ReferenceLogprobs`) and carried in the batches as ``ref_logprob``; terms that need the
    reference's full output (KL retain, UNDIAL, RMU retain) get a ``ref_forward`` with frozen
    parameters inside the same jitted step. Which is which is found by tracing the objective
    (`reference_parts`), so no method list is needed.

    A checkpoint holds {params, opt_state, objective_state, rng} plus metadata {step (the data
    cursor), seed, steps}; it is written every `checkpoint_every` steps and at the end, and a
    new call with the same `checkpoint_dir` resumes from the latest one (pass the *starting*
    model again: it is the reference). When a step's loss or gradient norm is not finite the
    step's update is discarded inside the step, nothing is saved, and (by default)
    `NonFiniteLossError` names the step; the last good checkpoint stays the latest.

    Args:
      model: the model to unlearn (left untouched: its parameters are copied, not donated).
      objective: a combined objective (`objectives.forget_retain`, `objectives.pdu`, ...) or a
        plain term.
      tx: an optax transformation, or an object with ``make_step(graphdef, rest, objective,
        *, ref_params, micro_batches) -> TrainStep`` (e.g. `bilevel.OFMU`).
      data: a `data.ForgetRetainSampler` (or anything with ``batch_at(step)``, or a callable
        step -> batch; those cannot precompute reference values).
      steps: total steps of the run (a resumed run continues up to it).
      mesh: a `parallel.mesh`; params and optimizer state are FSDP-sharded over it and batches
        split over ("data", "fsdp"). Default: one device.
      seed: the run's seed (the data order is the sampler's; the seed is checked on resume and
        seeds the stored PRNG key).
      split_grads: pass forget and retain gradients apart to `tx` (GU, HAMU).
      micro_batches: gradient-accumulation micro-batches per step.
      checkpoint_dir: orbax checkpoint directory (None: no checkpoints, no resume).
      checkpoint_every: save every this many steps (default: only at the end).
      max_checkpoints: checkpoints kept (None: all).
      resume: continue from the latest checkpoint in `checkpoint_dir` when there is one.
      log_path: JSON Lines metrics file, one line per step.
      tensorboard_dir: also write TensorBoard scalars (needs tensorboardX or tensorflow).
      progress: show a tqdm progress bar.
      ref_model: the frozen reference (default: the starting `model`).
      precompute_reference: precompute reference log-probs per item when the data allows.
      on_nonfinite: "raise" (`NonFiniteLossError`) or "stop" (return the last good state with
        `stopped` set).
      callback: called as ``callback(step, metrics)`` after each step (host floats).

    Returns:
      An `UnlearnResult`.

    Raises:
      NonFiniteLossError: a non-finite loss with ``on_nonfinite="raise"``.
      ValueError: bad arguments, or a checkpoint from another seed.
      ImportError: `tensorboard_dir` without tensorboardX / tensorflow.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}.")
    if on_nonfinite not in ("raise", "stop"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'stop', got {on_nonfinite!r}.")
    if checkpoint_every is not None and (
        not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}.")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir= (where to save).")
    if tensorboard_dir is not None:
        open_tensorboard(tensorboard_dir).close()  # fail before any work, not after it
    batch_at = _batch_source(data)

    graphdef, params0, rest = split_model(model)
    if mesh is not None:
        from jaxunlearn import parallel

        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params0 = jax.device_put(params0, parallel.param_sharding(params0, mesh))
        rest = jax.device_put(rest, replicated)
    # The step donates its params; copying keeps the caller's model (and reference) valid.
    params = jax.tree.map(jnp.copy, params0)
    objective_state = init_objective_state(objective)
    if mesh is not None:  # placed as the step returns it, so the second call hits the cache
        objective_state = jax.device_put(objective_state, replicated)

    def reference():
        if ref_model is None:
            return graphdef, params0, rest
        ref_graphdef, ref_params, ref_rest = split_model(ref_model)
        if mesh is not None:
            from jaxunlearn import parallel

            ref_params = jax.device_put(ref_params, parallel.param_sharding(ref_params, mesh))
            ref_rest = jax.device_put(ref_rest, replicated)
        return ref_graphdef, ref_params, ref_rest

    plan = _plan_reference(
        objective, graphdef, params, rest, objective_state, data, split=split_grads,
        precompute=precompute_reference, ref=reference, mesh=mesh,
    )  # fmt: skip
    ref_graphdef, ref_rest = graphdef, rest
    if plan.in_step_params is not None and ref_model is not None:
        ref_graphdef, _, ref_rest = split_model(ref_model)
    if hasattr(tx, "make_step"):
        step_fn = tx.make_step(
            graphdef, rest, objective, ref_params=plan.in_step_params, micro_batches=micro_batches
        )
    else:
        step_fn = make_step(
            graphdef, rest, objective, tx, ref_params=plan.in_step_params,
            ref_graphdef=ref_graphdef, ref_rest=ref_rest, needs_split_grads=split_grads,
            micro_batches=micro_batches,
        )  # fmt: skip
    batch_at = _batch_source(plan.data)
    opt_state = step_fn.init(params)
    rng = jax.random.PRNGKey(seed)

    ckpt, start = None, 0
    if checkpoint_dir is not None:
        from jaxunlearn.checkpoints import TrainCheckpointer

        ckpt = TrainCheckpointer(checkpoint_dir, max_to_keep=max_checkpoints)
    try:
        if ckpt is not None and not resume and ckpt.latest_step() is not None:
            raise ValueError(
                f"{ckpt.directory} already holds checkpoints (latest step {ckpt.latest_step()}) "
                "and resume=False; choose an empty checkpoint_dir or resume from it."
            )
        if ckpt is not None and resume and ckpt.latest_step() is not None:
            state = {"params": params, "opt_state": opt_state, "rng": rng}
            if objective_state is not None:
                state["objective_state"] = objective_state
            restored, start = _restore(ckpt, state, mesh, seed, getattr(data, "seed", None), steps)
            params, opt_state, rng = restored["params"], restored["opt_state"], restored["rng"]
            objective_state = restored.get("objective_state", objective_state)
        return _run(
            step_fn, graphdef, rest, params, opt_state, objective_state, rng, batch_at,
            start=start, steps=steps, mesh=mesh, seed=seed, data_seed=getattr(data, "seed", None),
            ckpt=ckpt,
            checkpoint_every=checkpoint_every, log_path=log_path,
            tensorboard_dir=tensorboard_dir, progress=progress, on_nonfinite=on_nonfinite,
            callback=callback,
        )  # fmt: skip
    finally:
        if ckpt is not None:
            ckpt.close()


def _host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def _run(
    step_fn, graphdef, rest, params, opt_state, objective_state, rng, batch_at, *, start, steps,
    mesh, seed, data_seed, ckpt, checkpoint_every, log_path, tensorboard_dir, progress, on_nonfinite,
    callback,
) -> UnlearnResult:  # fmt: skip
    from tqdm.auto import tqdm

    log = MetricsLog(log_path, tensorboard_dir, start)
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="unlearn", dynamic_ncols=True)
    history: list[dict[str, Any]] = []

    def result(stopped=None, step=steps):
        return UnlearnResult(
            nnx.merge(graphdef, params, rest), history, step, start, opt_state,
            objective_state, stopped, step_fn.cache_size(),
        )  # fmt: skip

    def save(cursor):
        state = {"params": params, "opt_state": opt_state, "rng": rng}
        if objective_state is not None:
            state["objective_state"] = objective_state
        meta = {"step": cursor, "seed": seed, "data_seed": data_seed, "steps": steps}
        ckpt.save(cursor, state, metadata=meta, force=True)

    try:
        batch = _place(batch_at(start), mesh) if start < steps else None
        for step in range(start, steps):
            t0 = time.perf_counter()
            params, opt_state, objective_state, metrics = step_fn(
                params, opt_state, batch, objective_state
            )
            # Build the next batch on the host while the device runs this step.
            batch = _place(batch_at(step + 1), mesh) if step + 1 < steps else None
            record = {"step": step, **_host_metrics(metrics)}
            finite = record.pop("finite") > 0
            stop = record.pop("stop", 0.0) > 0
            record["wall_time"] = time.time()
            record["step_time"] = time.perf_counter() - t0
            log.write(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
            if not finite:
                return _nonfinite(record, ckpt, on_nonfinite, result(step=step))
            if callback is not None:
                callback(step, record)
            cursor = step + 1
            if ckpt is not None and (
                stop or cursor == steps or (checkpoint_every and cursor % checkpoint_every == 0)
            ):
                save(cursor)
            if stop:
                message = (
                    f"the transformation asked to stop after step {step} (e.g. HAMU's stopping "
                    "criterion or an infeasible constraint); its last update was zero."
                )
                return result(message, step=cursor)
        return result()
    finally:
        bar.close()
        log.close()


def _nonfinite(record, ckpt, on_nonfinite, result) -> UnlearnResult:
    step, loss = record["step"], record["loss"]
    last = None if ckpt is None else ckpt.latest_step()
    if ckpt is None:
        kept = "no checkpoints were being written (pass checkpoint_dir= to keep some)"
    elif last is None:
        kept = f"no checkpoint had been written yet in {ckpt.directory}"
    else:
        kept = f"the last good checkpoint is {ckpt.directory / str(last)} (data cursor {last})"
    message = (
        f"non-finite loss ({loss}, grad norm {record.get('grad_norm')}) at step {step}: the "
        f"update of step {step} was discarded and nothing was saved for it; {kept}. Lower the "
        "learning rate, clip gradients (max_grad_norm), or inspect the data of this step "
        f"(batch_at({step}))."
    )
    result.stopped = message
    if on_nonfinite == "stop":
        return result
    raise NonFiniteLossError(message, step=step, loss=loss, checkpoint_step=last, result=result)


# ----------------------------------------------------------------------------- one-shot


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
    if mesh is not None:
        from jaxunlearn import parallel

        params = jax.device_put(params, parallel.param_sharding(params, mesh))
        rest = jax.device_put(rest, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    term = objectives.nll() if loss is None else loss

    def loss_fn(p, batch):
        return term(model_forward(graphdef, p, rest), batch)[0]

    def placed(batches):
        return (_place(b, mesh) for b in batches)

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
