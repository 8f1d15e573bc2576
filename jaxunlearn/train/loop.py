"""The run driver: `unlearn` steps a model through deterministic batches with checkpoints.

Step s uses ``data.batch_at(s)``, a pure function of (seed, step), so a run is the same on any
number of devices and resumes exactly; orbax checkpoints carry params, optimizer state,
objective state and RNG; a guard stops on a non-finite loss without saving (or even applying)
the bad update.

Example:
  >>> import optax, jaxunlearn as ju
  >>> sampler = ju.data.forget_retain(tokenizer, "forget.jsonl", "retain.jsonl", batch_size=2)
  >>> objective = ju.objectives.forget_retain(ju.objectives.npo(0.1), ju.objectives.nll())
  >>> result = ju.unlearn(model, objective, optax.adamw(1e-5), sampler, steps=4,
  ...                     checkpoint_dir="run/ckpt", checkpoint_every=2,
  ...                     log_path="run/metrics.jsonl", progress=False)
  >>> result.step, len(result.metrics)
  (4, 4)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxunlearn.parallel import place_batch, place_split_model
from jaxunlearn.train.logging import MetricsLog, open_tensorboard
from jaxunlearn.train.reference import batch_source, plan_reference
from jaxunlearn.train.step import (
    StepBuilder,
    check_split_objective,
    init_objective_state,
    make_step,
    split_model,
    wants_retain_grads,
)


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


def run_record(model: nnx.Module, data: Any, seed: int, config: Mapping | None) -> dict:
    """What a checkpoint must match to be resumed: the seed, the data (its fingerprint when
    the sampler has one), the model's structure, and the caller's `config` (method,
    hyperparameters, files: whatever defines the run)."""
    from jaxunlearn._io import jsonable

    shapes = [
        (jax.tree_util.keystr(path), tuple(x.shape), str(x.dtype))
        for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    ]
    structure = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    fingerprint = data.fingerprint() if hasattr(data, "fingerprint") else None
    return jsonable(
        {
            "seed": seed,
            "data_seed": getattr(data, "seed", None),
            "data": fingerprint,
            "model_structure": structure,
            "config": dict(config or {}),
        }
    )


def _differences(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return out


def _restore(ckpt, state, mesh, record, steps):
    from jaxunlearn.checkpoints import abstract_target

    meta = ckpt.metadata()
    differ = _differences(meta.get("run") or {}, record)
    if differ:
        raise ValueError(
            f"checkpoint {ckpt.directory} (step {meta.get('step')}) belongs to another run: "
            + "; ".join(differ)
            + ". Resuming would mix the two. To start fresh, use a new checkpoint_dir (CLI: "
            "--checkpoint-dir) or delete this one; to resume, run with the settings above."
        )
    cursor = int(meta["step"])
    if cursor > steps:
        raise ValueError(
            f"checkpoint {ckpt.directory} is at step {cursor}, past steps={steps}; raise steps "
            "or use a new checkpoint_dir."
        )
    restored = ckpt.restore(abstract_state=abstract_target(state, mesh))
    return restored, cursor


def _check_arguments(steps, on_nonfinite, checkpoint_dir, checkpoint_every, tensorboard_dir):
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


def _build_step(graphdef, rest, params, params0, objective, objective_state, tx, data, *,
                ref_model, precompute, micro_batches, mesh, compiler_options=None):  # fmt: skip
    """The step for `tx` and the data source (wrapped to carry precomputed reference values)."""

    def reference():
        if ref_model is None:
            return graphdef, params0, rest
        ref_graphdef, ref_params, ref_rest = split_model(ref_model)
        return ref_graphdef, *place_split_model(ref_params, ref_rest, mesh)

    split = not isinstance(tx, StepBuilder) and wants_retain_grads(tx, params)
    if split:
        check_split_objective(objective)
    plan = plan_reference(
        objective, graphdef, params, rest, objective_state, data, split=split,
        precompute=precompute, ref=reference, mesh=mesh,
    )  # fmt: skip
    if isinstance(tx, StepBuilder):
        step_fn = tx.make_step(
            graphdef, rest, objective, ref_params=plan.in_step_params, micro_batches=micro_batches
        )
        return step_fn, plan.data
    ref_graphdef, ref_rest = graphdef, rest
    if plan.in_step_params is not None and ref_model is not None:
        ref_graphdef, _, ref_rest = split_model(ref_model)
    step_fn = make_step(
        graphdef, rest, objective, tx, ref_params=plan.in_step_params,
        ref_graphdef=ref_graphdef, ref_rest=ref_rest, micro_batches=micro_batches,
        compiler_options=compiler_options,
    )  # fmt: skip
    return step_fn, plan.data


def unlearn(
    model: nnx.Module,
    objective: Any,
    tx: optax.GradientTransformation | Any,
    data: Any,
    *,
    steps: int,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
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
    run_config: Mapping[str, Any] | None = None,
    compiler_options: Mapping[str, Any] | None = None,
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
    cursor), steps, the run record (`run_record`)}; it is written every `checkpoint_every`
    steps and at the end, and a new call with the same `checkpoint_dir` resumes from the latest one (pass the *starting*
    model again: it is the reference). When a step's loss or gradient norm is not finite the
    step's update is discarded inside the step, nothing is saved, and (by default)
    `NonFiniteLossError` names the step; the last good checkpoint stays the latest.

    Args:
      model: the model to unlearn (left untouched: its parameters are copied, not donated).
      objective: a combined objective (`objectives.forget_retain`, `objectives.pdu`, ...) or a
        plain term.
      tx: an optax transformation (a chain that reads ``retain_grads``, such as GU's
        `transforms.retain_projection` or HAMU, gets forget and retain gradients apart
        without further arguments: see `train.wants_retain_grads`), or a `train.StepBuilder`
        (e.g. `bilevel.OFMU`) whose ``make_step(graphdef, rest, objective,
        *, ref_params, micro_batches) -> TrainStep`` (e.g. `bilevel.OFMU`).
      data: a `data.ForgetRetainSampler` (or anything with ``batch_at(step)``, or a callable
        step -> batch; those cannot precompute reference values).
      steps: total steps of the run (a resumed run continues up to it).
      mesh: a `parallel.mesh`; params and optimizer state are FSDP-sharded over it and batches
        split over ("data", "fsdp"). Default: one device.
      seed: the run's seed (the data order is the sampler's; the seed is checked on resume and
        seeds the stored PRNG key).
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
      run_config: what defines the run beyond model and data (method, hyperparameters, input
        files, ...): recorded in every checkpoint with the seed, the data's fingerprint and
        the model's structure; resuming from a checkpoint whose record differs stops with a
        ValueError naming each difference (a resumed run is never a hybrid of two).
      compiler_options: XLA options for compiling the step of an optax `tx`, e.g.
        `train.step.CPU_MEMORY_SCHEDULING` for a large model on CPU (a lower peak; used by
        benchmarks/bench_1b_cpu.py). Default: XLA's.

    Returns:
      An `UnlearnResult`.

    Raises:
      NonFiniteLossError: a non-finite loss with ``on_nonfinite="raise"``.
      ValueError: bad arguments, or a checkpoint of another run (seed, data, model, config).
      ImportError: `tensorboard_dir` without tensorboardX / tensorflow.
    """
    _check_arguments(steps, on_nonfinite, checkpoint_dir, checkpoint_every, tensorboard_dir)
    batch_source(data)  # the data's protocol, checked before any work
    record = run_record(model, data, seed, run_config)
    if mesh is not None and mesh.shape.get("model", 1) > 1 and hasattr(model, "config"):
        from jaxunlearn.parallel_rules import check_model_axis

        check_model_axis(model.config, mesh)  # names the axis and the size it does not divide
    graphdef, params0, rest = split_model(model)
    params0, rest = place_split_model(params0, rest, mesh)
    # The step donates its params; copying keeps the caller's model (and reference) valid.
    params = jax.tree.map(jnp.copy, params0)
    objective_state = init_objective_state(objective)
    if mesh is not None:  # placed as the step returns it, so the second call hits the cache
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        objective_state = jax.device_put(objective_state, replicated)
    step_fn, data = _build_step(
        graphdef, rest, params, params0, objective, objective_state, tx, data,
        ref_model=ref_model, precompute=precompute_reference, micro_batches=micro_batches,
        mesh=mesh, compiler_options=compiler_options,
    )  # fmt: skip
    batch_at = batch_source(data)
    place = place_batch
    if getattr(data, "process_local", False):  # batches hold only this process's rows
        from jaxunlearn.distributed import place_process_batch as place
    opt_state = step_fn.init(params)
    rng = jax.random.PRNGKey(seed)
    if mesh is not None:  # a global array: orbax cannot save host-local ones from N processes
        rng = jax.device_put(rng, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

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
            restored, start = _restore(ckpt, state, mesh, record, steps)
            params, opt_state, rng = restored["params"], restored["opt_state"], restored["rng"]
            objective_state = restored.get("objective_state", objective_state)
        return _run(
            step_fn, graphdef, rest, params, opt_state, objective_state, rng, batch_at, place,
            start=start, steps=steps, mesh=mesh, run_info=record, ckpt=ckpt,
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
    step_fn, graphdef, rest, params, opt_state, objective_state, rng, batch_at, place, *, start,
    steps, mesh, run_info, ckpt, checkpoint_every, log_path, tensorboard_dir, progress,
    on_nonfinite, callback,
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
        meta = {"step": cursor, "steps": steps, "run": run_info}
        ckpt.save(cursor, state, metadata=meta, force=True)

    try:
        batch = place(batch_at(start), mesh) if start < steps else None
        for step in range(start, steps):
            t0 = time.perf_counter()
            params, opt_state, objective_state, metrics = step_fn(
                params, opt_state, batch, objective_state
            )
            # Build the next batch on the host while the device runs this step.
            batch = place(batch_at(step + 1), mesh) if step + 1 < steps else None
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
        f"(batch_at({step})). A run with other settings starts fresh (a new checkpoint_dir): "
        "resuming checks that the settings are the checkpoint's."
    )
    result.stopped = message
    if on_nonfinite == "stop":
        return result
    raise NonFiniteLossError(message, step=step, loss=loss, checkpoint_step=last, result=result)
