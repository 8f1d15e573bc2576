"""The frozen reference model at the lowest cost the objective allows.

Sequence log-probs for NPO/DPO-style terms are computed once per item (`ReferenceLogprobs`)
and carried in the batches as ``ref_logprob``; terms that need the reference's full output
(KL retain, UNDIAL, RMU retain) get a ``ref_forward`` inside the jitted step. Which is which
is found by tracing the objective (`reference_parts`), so no method list is needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxunlearn.parallel import place_batch
from jaxunlearn.train.step import Batch, loss_and_grads, model_forward


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

    def fn(p, r, b):  # rest is an argument too: it may be shapes (a LoRA model's frozen base)
        names = {
            id(part["input_ids"]): name
            for name, part in b.items()
            if isinstance(part, Mapping) and "input_ids" in part
        }
        forward = model_forward(graphdef, p, r)

        def ref_forward(**kwargs):
            calls.append(names.get(id(kwargs.get("input_ids")), "?"))
            return forward(**kwargs)

        _, metrics = loss_and_grads(
            objective, graphdef, r, p, b, objective_state, ref_forward, split=split
        )
        return metrics["loss"]

    jax.eval_shape(fn, params, rest, batch)
    return set(calls)


def _reference_logprob_fn(ref_graphdef: nnx.GraphDef) -> Callable:
    from jaxunlearn.objectives import reference_logprob

    def fn(ref_params, ref_rest, batch):  # both arguments: never compiled-in constants
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
      mesh: shard scoring batches over this mesh.

    Items are scored in calls of the sampler's batch size.
    """

    def __init__(
        self,
        sampler: Any,
        parts: Iterable[str],
        ref_params: Any,
        ref_graphdef: nnx.GraphDef,
        ref_rest: Any,
        *,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.sampler = sampler
        self.parts = tuple(sorted(set(parts)))
        unknown = set(self.parts) - {"forget", "retain", "alternate"}
        if unknown:
            raise ValueError(f"cannot precompute reference log-probs for parts {sorted(unknown)}.")
        self.ref_params = ref_params
        self.rows = int(sampler.batch_size)
        self.mesh = mesh
        self.ref_rest = ref_rest
        self._score = _reference_logprob_fn(ref_graphdef)
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
                values = self._score(self.ref_params, self.ref_rest, place_batch(seq, self.mesh))
                values = np.asarray(values)
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


def batch_source(data: Any) -> Callable[[int], Any]:
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
class ReferencePlan:
    data: Any  # the data source, possibly wrapped to add ref_logprob
    in_step_params: Any  # frozen params the step needs, or None
    precomputed: tuple[str, ...]
    in_step: tuple[str, ...]


def plan_reference(
    objective, graphdef, params, rest, objective_state, data, *, split, precompute, ref, mesh
) -> ReferencePlan:
    """Decides which reference values are precomputed and which run in the step."""
    probe = _without_ref_logprob(batch_source(data)(0))
    parts = reference_parts(objective, graphdef, params, rest, probe, objective_state, split=split)
    if not parts:
        return ReferencePlan(data, None, (), ())
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
    return ReferencePlan(data, in_step, tuple(sorted(precomputed)), tuple(sorted(parts)))
