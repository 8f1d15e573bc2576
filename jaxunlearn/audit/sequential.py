"""Sequential deletion requests: unlearn k requests one after another and watch what holds.

Real deletion requests arrive one at a time (one author, then another, ...). FIT
(arXiv:2601.21682) shows that methods tuned for one request degrade when applied repeatedly:
earlier forgetting can come back and utility can collapse. `sequential_unlearning` applies
`jaxunlearn.train.unlearn` to each request in turn, starting each from the previous result,
and after every request measures

- the forget metrics of every request so far (request i after requests 0..j), and
- the model's utility,

so the table's diagonal is "did this request's forgetting happen" and the columns below it
are "did it survive the later requests".

References:
  "FIT: Defying Catastrophic Forgetting in Continual LLM Unlearning", arXiv:2601.21682.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from flax import nnx


class SequentialRow(NamedTuple):
    """The state after `requests_done` requests.

    Attributes:
      requests_done: how many requests have been unlearned (0 = the starting model).
      forget: {request index: {metric: value}} for every request measured.
      utility: {metric: value} of the model.
      final_loss: the objective's loss at the last step of this request (None for row 0).
    """

    requests_done: int
    forget: dict[int, dict[str, float]]
    utility: dict[str, float]
    final_loss: float | None


class SequentialResult(NamedTuple):
    """What `sequential_unlearning` returns.

    Attributes:
      model: the model after the last request.
      rows: one `SequentialRow` before the first request and after each request.
    """

    model: nnx.Module
    rows: tuple[SequentialRow, ...]

    def table(self) -> list[dict[str, Any]]:
        """Flat rows {"requests_done", "request", metric..., "utility/<metric>"...} for logs."""
        out = []
        for row in self.rows:
            for request, values in row.forget.items():
                out.append(
                    {
                        "requests_done": row.requests_done,
                        "request": request,
                        **values,
                        **{f"utility/{k}": v for k, v in row.utility.items()},
                    }
                )
        return out


def sequential_unlearning(
    model: nnx.Module,
    requests: Sequence[Any],
    objective: Any,
    tx: Any,
    *,
    steps: int | Sequence[int],
    measure_forget: Callable[[nnx.Module, int], Mapping[str, float]],
    measure_utility: Callable[[nnx.Module], Mapping[str, float]],
    measure_all: bool = False,
    reference: str = "previous",
    **unlearn_kwargs: Any,
) -> SequentialResult:
    """Unlearns `requests` one after another, measuring after each.

    Args:
      model: the starting (target) model; left untouched.
      requests: one unlearning data source per request (a `data.ForgetRetainSampler` or
        anything `train.unlearn` accepts).
      objective: the unlearning objective (the same for every request).
      tx: the optax transformation; its state is re-initialised for each request.
      steps: steps per request (one int for all, or one per request).
      measure_forget: ``(model, request_index) -> {metric: value}`` on that request's items,
        e.g. TOFU forget quality of that author (`measures.forget_measures(...).aggregate`).
      measure_utility: ``model -> {metric: value}``, e.g. TOFU model utility.
      measure_all: also measure requests not yet unlearned (collateral forgetting).
      reference: "previous" (each request's reference model is the model it starts from,
        what a deployed system would have) or "initial" (always the starting model).
      **unlearn_kwargs: passed on to `train.unlearn` (mesh, seed, micro_batches, ...).

    Returns:
      `SequentialResult`.

    Raises:
      ValueError: no requests, a step count per request of the wrong length, or an unknown
        `reference`.
    """
    from jaxunlearn.train import unlearn

    k = len(requests)
    if k == 0:
        raise ValueError("sequential_unlearning got no deletion requests")
    per_request = [steps] * k if isinstance(steps, int) else list(steps)
    if len(per_request) != k or any(int(s) < 1 for s in per_request):
        raise ValueError(f"steps must be one positive int or {k} of them, got {steps!r}")
    if reference not in ("previous", "initial"):
        raise ValueError(f"reference must be 'previous' or 'initial', got {reference!r}")
    unlearn_kwargs.setdefault("progress", False)

    def row(current: nnx.Module, done: int, loss: float | None) -> SequentialRow:
        measured = range(k) if measure_all else range(done)
        forget = {i: dict(measure_forget(current, i)) for i in measured}
        return SequentialRow(done, forget, dict(measure_utility(current)), loss)

    current, rows = model, [row(model, 0, None)]
    for index, data in enumerate(requests):
        ref = model if reference == "initial" else None
        result = unlearn(
            current, objective, tx, data, steps=int(per_request[index]), ref_model=ref,
            **unlearn_kwargs,
        )  # fmt: skip
        current = result.model
        loss = float(result.metrics[-1]["loss"]) if result.metrics else None
        rows.append(row(current, index + 1, loss))
    return SequentialResult(current, tuple(rows))


__all__ = ["SequentialResult", "SequentialRow", "sequential_unlearning"]
