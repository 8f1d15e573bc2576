"""The jitted unlearning step: objective gradients, an optax transformation, the update.

`make_step` builds a single `jax.jit` over ``(params, opt_state, batch, objective_state)``
that differentiates an objective, runs an optax transformation and applies the update, with
params and optimizer state donated (never the frozen reference). The model is used
functionally: ``nnx.split`` once outside, ``nnx.merge`` inside the traced function.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

Batch = Mapping[str, Any]
Metrics = dict[str, Any]

# CPU (and some layouts elsewhere) cannot reuse every donated buffer; the warning is expected
# and says nothing about correctness, so it is silenced around our own jitted calls only.
_DONATION_WARNING = "Some donated buffers were not usable"

# XLA:CPU's default scheduler orders a program for concurrency: in the optimizer update it
# computes every leaf's clipped float32 gradient before any moment is written, so all of them
# are alive at once (4.9 GiB on a 1B model in bfloat16). The memory-optimised scheduler runs
# each leaf's update to the end first. Pass as `make_step(..., compiler_options=...)`.
CPU_MEMORY_SCHEDULING: dict[str, str] = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
}


def model_forward(graphdef: nnx.GraphDef, params: Any, rest: Any) -> Callable[..., Any]:
    """A forward function ``forward(**model_kwargs)`` for a split model.

    Args:
      graphdef: from ``nnx.split(model, nnx.Param, ...)``.
      params: the parameter state (possibly traced).
      rest: the remaining state.

    Returns:
      ``forward(**kw) = nnx.merge(graphdef, params, rest)(**kw)``, marked
      `objectives.rowwise`: combined objectives may run it once on their parts' rows
      stacked (the rows of a causal LM batch do not interact; image batches, the only
      input of the batch-norm vision models, are never stacked).
    """

    def forward(**kwargs):
        return nnx.merge(graphdef, params, rest)(**kwargs)

    forward.rowwise = True  # see jaxunlearn.objectives.rowwise
    return forward


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """``nnx.split(model, nnx.Param, ...)``: (graphdef, params, rest)."""
    return nnx.split(model, nnx.Param, ...)


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


def check_split_objective(objective: Any) -> None:
    """Raises ValueError unless `objective` gives forget and retain losses apart."""
    missing = [m for m in ("forget_loss", "retain_loss", "weights") if not hasattr(objective, m)]
    if missing:
        raise ValueError(
            "the optax transformation takes retain_grads= (GU's retain projection, HAMU), so the "
            "objective must give forget and retain losses apart: pass "
            "objectives.forget_retain(forget, retain) or objectives.pdu(...); "
            f"{type(objective).__name__} lacks {missing}."
        )
    if getattr(objective, "retain", True) is None:
        raise ValueError(
            "the optax transformation takes retain_grads= (GU's retain projection, HAMU), but the "
            "objective has no retain term: pass objectives.forget_retain(forget, retain=...) (a "
            "retain weight alpha of 0 is fine: the transformation still needs the direction)."
        )


def wants_retain_grads(tx: Any, params: Any) -> bool:
    """Whether an optax transformation reads the ``retain_grads`` extra argument.

    Found by tracing ``tx.update(g, state, params, retain_grads=r, retain_weight=1)`` on
    shapes (nothing is computed) and checking whether any operation reads `r`; so any chain
    that contains `transforms.retain_projection` or `transforms.hardness_aware` is detected,
    however deeply nested, and a plain ``optax.adamw`` is not.

    Args:
      tx: an optax transformation.
      params: the parameters (arrays or shapes).

    Returns:
      True when `tx` needs forget and retain gradients apart.
    """
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
        return False
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
    state = jax.eval_shape(tx.init, shapes)

    def update(g, r, s, p):
        return tx.update(g, s, p, retain_grads=r, retain_weight=jnp.ones((), jnp.float32))

    closed = jax.make_jaxpr(update)(shapes, shapes, state, shapes)
    n = len(jax.tree.leaves(shapes))
    return any(_used_inputs(closed.jaxpr)[n : 2 * n])


def _used_inputs(jaxpr: Any) -> list[bool]:
    """Which inputs of a jaxpr its outputs depend on (dead code removed first, so a cast of
    an argument that is then dropped, as ``with_extra_args_support`` wrappers do, does not
    count)."""
    try:
        from jax._src.interpreters import partial_eval as pe

        return list(pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[1])
    except (ImportError, AttributeError):  # no DCE in this jax: any read counts
        reads = [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars)
        used = {v for v in reads if not hasattr(v, "val")}  # literals carry .val
        return [v in used for v in jaxpr.invars]


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
      split: return ``(grad(gamma·L_forget), grad(L_retain))`` instead of one gradient (the
        retain gradient unweighted: a transformation that projects off its direction must
        see it even when alpha is 0; alpha is passed to it apart, as ``retain_weight``).

    Returns:
      (grads, metrics): grads a params-like tree, or a pair of them when `split`; metrics the
      scalar aux entries with "loss" (and "forget_loss" / "retain_loss" when known, and
      "retain_weight" = alpha when `split`).
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
            weight = gamma if part == "forget" else 1.0
            return weight * loss, (loss, aux)

        return fn

    (wf, (lf, aux_f)), g_f = jax.value_and_grad(weighted("forget"), has_aux=True)(params)
    (_, (lr, aux_r)), g_r = jax.value_and_grad(weighted("retain"), has_aux=True)(params)
    metrics = {f"forget/{k}": v for k, v in _scalars(aux_f).items()}
    metrics |= {f"retain/{k}": v for k, v in _scalars(aux_r).items()}
    metrics |= {
        "loss": jnp.asarray(wf + alpha * lr, jnp.float32),
        "forget_loss": jnp.asarray(lf, jnp.float32),
        "retain_loss": jnp.asarray(lr, jnp.float32),
        "retain_weight": jnp.asarray(alpha, jnp.float32),
    }
    return (g_f, g_r), metrics


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


def accumulate_with_state(
    grad_fn: Callable[[Batch, Any], tuple[Any, dict]],
    batch: Batch,
    count: int,
    objective: Any,
    state: Any,
) -> tuple[Any, dict, Any]:
    """`accumulate` for objectives with state (PDU's dual variable).

    When the objective says ``updates_per_micro_batch`` (PDU's open-unlearning default: the
    Hugging Face trainer calls the loss, and so the dual update, once per micro-batch), each
    micro-batch sees the state its predecessors left and advances it; otherwise the state is
    advanced once, from the metrics averaged over the step.

    Returns:
      (mean gradients, mean metrics, the new objective state).
    """
    if not has_state_protocol(objective):
        return (*accumulate(lambda part: grad_fn(part, state), batch, count), state)
    if not getattr(objective, "updates_per_micro_batch", False):
        grads, metrics = accumulate(lambda part: grad_fn(part, state), batch, count)
        return grads, metrics, objective.update_state(state, metrics)
    if count == 1:
        grads, metrics = grad_fn(batch, state)
        return grads, metrics, objective.update_state(state, metrics)
    parts = micro_batches(batch, count)
    first = jax.tree.map(lambda x: x[0], parts)
    shapes = jax.eval_shape(grad_fn, first, state)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, part):
        total, s = carry
        out = grad_fn(part, s)
        return (jax.tree.map(jnp.add, total, out), objective.update_state(s, out[1])), None

    (total, state), _ = lax.scan(body, (zeros, state), parts)
    grads, metrics = jax.tree.map(lambda x: x / count, total)
    return grads, metrics, state


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
    Everything frozen (the reference parameters, the model's non-trained state such as a LoRA
    model's base weights) travels as a separate, non-donated argument: closed over, `jax.jit`
    would compile those arrays into the executable as constants.

    Args:
      update_fn: pure ``(params, opt_state, batch, objective_state, frozen) ->
        (params, opt_state, objective_state, metrics)``.
      init_fn: ``params -> opt_state``.
      frozen: the frozen inputs passed to every call (any pytree, or None).
      compiler_options: XLA options for compiling the step (e.g. `CPU_MEMORY_SCHEDULING`),
        or None for the defaults.
    """

    def __init__(
        self,
        update_fn: Callable,
        init_fn: Callable,
        frozen: Any = None,
        compiler_options: Mapping[str, Any] | None = None,
    ):
        self.update_fn = update_fn
        self.init_fn = init_fn
        self.frozen = frozen
        self.compiler_options = dict(compiler_options) if compiler_options else None
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
        self._jitted = jax.jit(
            self.update_fn,
            donate_argnums=(0, 1),
            out_shardings=out_shardings,
            compiler_options=self.compiler_options,
        )

    def __call__(
        self, params: Any, opt_state: Any, batch: Batch, objective_state: Any = None
    ) -> tuple[Any, Any, Any, Metrics]:
        if self._jitted is None:
            self._compile_for(params, opt_state, objective_state)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DONATION_WARNING)
            return self._jitted(params, opt_state, batch, objective_state, self.frozen)

    def cache_size(self) -> int:
        """How many executables the step has compiled (one per batch shape)."""
        return 0 if self._jitted is None else self._jitted._cache_size()


class StepBuilder(abc.ABC):
    """A method that builds its own jitted step instead of an optax update.

    `unlearn` accepts, in place of an optax transformation, any instance of a subclass (OFMU's
    bi-level loop, `bilevel.OFMU`, is one): it calls ``make_step`` once and drives the
    returned `TrainStep` like the standard one.
    """

    @abc.abstractmethod
    def make_step(
        self,
        graphdef: nnx.GraphDef,
        rest: Any,
        objective: Any,
        *,
        ref_params: Any = None,
        micro_batches: int = 1,
    ) -> TrainStep:
        """The jitted step over a split model (see `make_step` for the contract)."""


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
    micro_batches: int = 1,
    compiler_options: Mapping[str, Any] | None = None,
) -> TrainStep:
    """Builds the jitted unlearning step for a split model.

    One call computes the objective's gradients (averaged over `micro_batches` with a
    `lax.scan`), transforms them with `tx`, applies the update and advances the objective's
    state (PDU's dual variable). When the loss or the gradient norm is not finite the
    parameters, optimizer state and objective state are returned unchanged (a guard inside
    the step: the donated buffers of the last good parameters are never overwritten by a bad
    update) and ``metrics["finite"]`` is 0.

    When `tx` reads the ``retain_grads`` extra argument (`wants_retain_grads`: a chain with
    GU's retain projection or HAMU), the step computes ``g_f = grad(gamma·L_forget)`` and
    ``g_r = grad(L_retain)`` separately (``(gamma, alpha) = objective.weights(state)``) and
    calls ``tx.update(g_f, opt_state, params, retain_grads=g_r, retain_weight=alpha)``;
    otherwise it calls ``tx.update(grad(L), opt_state, params)`` with one joint gradient.

    Everything that changes during a run is an array in the step's inputs: learning-rate
    schedules live in the optimizer state (``optax.inject_hyperparams``), PDU's multiplier in
    the objective state. Python floats closed over by the objective or `tx` are compile-time
    constants, and the step compiles once per batch shape (one per length bucket).

    Args:
      graphdef: from ``nnx.split(model, nnx.Param, ...)``.
      rest: the model's non-parameter state (constant during training; a jit argument, so a
        LoRA model's frozen base is an input buffer, not compiled-in constants).
      objective: a combined objective (`objectives.forget_retain`, `objectives.pdu`, ...) or any
        ``term(forward, batch, *, ref_forward=None) -> (loss, aux)``.
      tx: the optax transformation.
      ref_params: frozen reference parameters for objectives that run the reference in the
        step (KL retain, UNDIAL, RMU); None when none is needed.
      ref_graphdef: the reference's graph (default: `graphdef`).
      ref_rest: the reference's other state (default: `rest`).
      micro_batches: gradient-accumulation micro-batches per step; the batch size must be a
        multiple of it.
      compiler_options: XLA options for the step's compilation, e.g. `CPU_MEMORY_SCHEDULING`
        (XLA:CPU's memory-optimised scheduler: a lower peak for large models on CPU).

    Returns:
      A `TrainStep`: ``step(params, opt_state, batch, objective_state) -> (params, opt_state,
      objective_state, metrics)``; ``step.init(params)`` gives the optimizer state.

    Raises:
      ValueError: `micro_batches` < 1; at the first call, a `tx` that takes retain_grads with
        an objective that has no separate retain loss.
    """
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}.")
    ref_graphdef = graphdef if ref_graphdef is None else ref_graphdef
    ref_rest = rest if ref_rest is None else ref_rest

    def update_fn(params, opt_state, batch, objective_state, frozen):
        ref_params, rest, ref_rest = frozen
        split = wants_retain_grads(tx, params)  # decided once per compilation, from shapes
        if split:
            check_split_objective(objective)
        ref_forward = None
        if ref_params is not None:
            ref_forward = model_forward(ref_graphdef, lax.stop_gradient(ref_params), ref_rest)

        def grad_fn(part, state):
            return loss_and_grads(
                objective, graphdef, rest, params, part, state, ref_forward, split=split
            )

        grads, metrics, new_state = accumulate_with_state(
            grad_fn, batch, micro_batches, objective, objective_state
        )
        if split:
            g_f, g_r = grads
            metrics["forget_grad_norm"] = optax.global_norm(g_f)
            metrics["retain_grad_norm"] = optax.global_norm(g_r)
            alpha = metrics["retain_weight"]
            metrics["grad_norm"] = optax.global_norm(
                jax.tree.map(lambda f, r: f + alpha * r, g_f, g_r)
            )
        else:
            metrics["grad_norm"] = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])

        def apply_update(_):
            if split:
                g_f, g_r = grads
                updates, new_opt_state = tx.update(
                    g_f, opt_state, params, retain_grads=g_r, retain_weight=alpha
                )
            else:
                updates, new_opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        # A conditional, not a select between new and old values: with `jnp.where` both
        # versions of every parameter and moment are live at once, so XLA copies the donated
        # buffers (on a 1B model ~9 GiB of float32 moment copies); with `lax.cond` the update
        # writes into them in place and the skipped branch passes them through.
        # The skipped branch keeps the values in the update's dtypes (an optimizer may
        # promote, e.g. bfloat16 moments updated with float32 gradients), as `where` did.
        updated = jax.eval_shape(apply_update, None)

        def keep(_):
            kept = (params, opt_state)
            return jax.tree.map(lambda x, s: jnp.asarray(x, s.dtype), kept, updated)

        new_params, new_opt_state = lax.cond(finite, apply_update, keep, None)
        new_state = keep_if_finite(finite, new_state, objective_state)
        lr = learning_rate(new_opt_state)
        if lr is not None:
            metrics["lr"] = lr
        metrics["finite"] = finite.astype(jnp.float32)
        metrics["stop"] = stop_requested(new_opt_state).astype(jnp.float32)
        return new_params, new_opt_state, new_state, metrics

    return TrainStep(update_fn, tx.init, (ref_params, rest, ref_rest), compiler_options)
