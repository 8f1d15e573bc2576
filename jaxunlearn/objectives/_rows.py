"""One model call for the forget and retain rows of an unlearning batch.

A combined objective scores its forget and retain batches with the same model. When the
parts have the same sequence length, `stacked_rows` returns a forward that runs the model
*once* on their rows stacked along the batch axis and hands each term its own rows: one
forward pass, one backward pass and, in the backward pass, one gradient of every weight
instead of one per part that the chain rule then sums. The losses and gradients are the
same sums (a causal LM treats rows independently); on a scanned bfloat16 model that is one
[L, ...] gradient stack instead of two alive at once.

A term is served from the shared call when it calls the forward (`run_model`) or scores
(`model_scores`) on one of the parts *as it was passed*, recognised by the identity of its
`input_ids` array; anything else (another batch, other inputs) goes to the model as before.

Only a forward marked `rowwise` (one whose rows do not interact; `jaxunlearn.train.
model_forward` marks its forwards, as every causal LM port qualifies) is stacked; any other
callable is called once per part, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxunlearn.models.outputs import CausalLMOutput, Head

# The batch entries a model call reads (position_ids only in packed batches).
_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")
# The entries whose per-row shapes must agree for rows to be stacked.
_ROW_KEYS = (*_MODEL_KEYS, "labels")


def rowwise(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Mark `forward` as treating the rows of a batch independently (no batch statistics,
    no interaction between rows), so combined objectives may stack their parts' rows into
    one call of it. Returns `forward`."""
    forward.rowwise = True
    return forward


def is_rowwise(forward: Any) -> bool:
    """Whether `forward` was marked with `rowwise`."""
    return bool(getattr(forward, "rowwise", False))


def _row_signature(part: Any) -> tuple | None:
    """(key, per-row shape, dtype) of a sequence batch's model entries; None if not one."""
    if not isinstance(part, Mapping) or "input_ids" not in part or "labels" not in part:
        return None
    sig = []
    for key in _ROW_KEYS:
        if part.get(key) is None:
            sig.append((key, None))
            continue
        value = part[key]
        shape, dtype = jnp.shape(value), jnp.result_type(value)
        if len(shape) < 2:
            return None
        sig.append((key, tuple(shape[1:]), str(dtype)))
    return tuple(sig)


def _is_lm_output(out: Any) -> bool:
    """A `CausalLMOutput`, or anything with its logits / head / hidden_states fields."""
    fields = ("logits", "head", "hidden_states")
    return all(hasattr(out, f) for f in fields) and getattr(out, "cache", None) is None


def _check_rows(out: Any, rows: int) -> None:
    """ValueError unless every per-row field of the stacked call's output has `rows` rows."""
    arrays = [out.logits, None if out.head is None else out.head.hidden]
    arrays += list(out.hidden_states.values())
    got = {int(jnp.shape(a)[0]) for a in arrays if a is not None}
    if got - {rows}:
        raise ValueError(
            f"one_call: the model returned {sorted(got)} rows for the {rows} stacked rows of "
            "the forget/retain parts; a forward must map rows to rows (pass one_call=False "
            "to forget_retain to call it once per part)."
        )


def _slice_output(out: Any, start: int, stop: int) -> CausalLMOutput:
    """Rows [start, stop) of a model output (the unembedding kernel is shared)."""
    rows = slice(start, stop)
    head = out.head
    if head is not None:
        head = Head(head.hidden[rows], head.kernel)
    return CausalLMOutput(
        logits=None if out.logits is None else out.logits[rows],
        head=head,
        hidden_states={k: v[rows] for k, v in out.hidden_states.items()},
        cache=None,
    )


class StackedRowsForward:
    """A forward that serves several same-length sequence batches from one model call.

    Calling it like the model (``forward(input_ids=..., attention_mask=..., ...)``) with one
    of `parts`' own arrays runs `forward` once on all parts' rows concatenated (at the first
    such call with the same other keyword arguments; later calls reuse it) and returns that
    part's rows of the output. `scores(part, chunk_size)` does the same for the token scores,
    so the vocabulary-chunk loop also runs once. Any other call goes to `forward` unchanged.

    Valid only for models that treat the rows of a batch independently, as causal LMs do
    (attention, normalisation and the MLP act per row; no batch statistics).

    Attributes:
      forward: the model's forward.
      parts: the sequence batches whose rows are stacked, in order.
      bounds: each part's [start, stop) rows in the stacked batch.
    """

    def __init__(self, forward: Callable[..., Any], parts: Sequence[Mapping[str, Any]]):
        self.forward = forward
        self.parts = tuple(parts)
        sizes = [int(jnp.shape(p["input_ids"])[0]) for p in self.parts]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.bounds = tuple((s, s + n) for s, n in zip(starts, sizes, strict=True))
        self._stacked: dict[str, Any] | None = None
        self._outputs: dict[tuple, Any] = {}
        self._scores: dict[int, Any] = {}

    def part_index(self, input_ids: Any) -> int | None:
        """Which part `input_ids` is (by identity), or None."""
        for i, part in enumerate(self.parts):
            if part["input_ids"] is input_ids:
                return i
        return None

    def _stacked_batch(self) -> dict[str, Any]:
        if self._stacked is None:
            first = self.parts[0]
            self._stacked = {
                key: jnp.concatenate([jnp.asarray(p[key]) for p in self.parts])
                for key in _ROW_KEYS
                if first.get(key) is not None
            }
        return self._stacked

    def _served(self, kwargs: Mapping[str, Any]) -> tuple[int, tuple] | None:
        """(part index, cache key) when this call can be served from the stacked call."""
        index = self.part_index(kwargs.get("input_ids"))
        if index is None:
            return None
        part = self.parts[index]
        for key in _MODEL_KEYS[1:]:  # the mask / positions must be the part's own too
            if kwargs.get(key) is not part.get(key):
                return None
        other = {k: v for k, v in kwargs.items() if k not in _MODEL_KEYS}
        try:
            key = tuple(sorted(other.items()))
            hash(key)
        except TypeError:
            return None
        return index, key

    def _stacked_output(self, key: tuple) -> Any:
        if key not in self._outputs:
            stacked = self._stacked_batch()
            model_kwargs = {k: stacked[k] for k in _MODEL_KEYS if k in stacked}
            self._outputs[key] = self.forward(**model_kwargs, **dict(key))
        return self._outputs[key]

    def stacked_call(self, kwargs: Mapping[str, Any]) -> tuple[int, Any] | None:
        """(part index, output of the stacked call) for a model call on one of the parts
        (computed once per distinct set of other keyword arguments), else None."""
        served = self._served(kwargs)
        if served is None:
            return None
        index, key = served
        out = self._stacked_output(key)
        if not _is_lm_output(out):
            return None  # nothing to slice; under jit the unused stacked call is dead code
        _check_rows(out, self.bounds[-1][1])
        return index, out

    def __call__(self, **kwargs: Any) -> Any:
        found = self.stacked_call(kwargs)
        if found is None:
            return self.forward(**kwargs)
        index, out = found
        return _slice_output(out, *self.bounds[index])

    def scores(self, part: Mapping[str, Any], chunk_size: int) -> Any:
        """`token_scores` of `part`'s rows, from one scoring pass over all parts' rows;
        None when `part` is not one of the parts (as passed)."""
        from jaxunlearn.objectives._base import run_model, scoring_source
        from jaxunlearn.scores import token_scores

        index = self.part_index(part.get("input_ids"))
        if index is None or part is not self.parts[index]:
            return None
        if chunk_size not in self._scores:
            found = self.stacked_call(run_model(lambda **kw: kw, part))  # run_model's call
            if found is None:
                return None
            src = scoring_source(found[1], "stacked rows")
            labels = self._stacked_batch()["labels"]
            self._scores[chunk_size] = token_scores(src, labels, chunk_size=chunk_size)
        start, stop = self.bounds[index]
        return jax.tree.map(lambda x: x[start:stop], self._scores[chunk_size])


def stacked_rows(forward: Callable[..., Any], parts: Sequence[Any]) -> Callable[..., Any]:
    """`forward`, serving the largest group of same-length sequence batches in `parts`
    from one model call (a `StackedRowsForward`); `forward` itself when it is not marked
    `rowwise` or no two parts match.

    Args:
      forward: the model's forward.
      parts: candidate parts (sequence batches; anything else is skipped).

    Returns:
      A forward for the objective's terms.
    """
    if not is_rowwise(forward):
        return forward
    groups: dict[tuple, list] = {}
    for part in parts:
        sig = _row_signature(part)
        if sig is not None and not any(p is part for p in groups.get(sig, [])):
            groups.setdefault(sig, []).append(part)
    best = max(groups.values(), key=len, default=[])
    if len(best) < 2:
        return forward
    return StackedRowsForward(forward, best)
