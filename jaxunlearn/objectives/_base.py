"""The objective protocol, shared helpers, and the forget/retain combinators.

A *term* is a pure function `term(forward, batch, *, ref_forward=None) -> (loss, aux)`:
`forward(**model_kwargs)` returns a `CausalLMOutput`, `batch` is a sequence batch (or,
for a *paired* term such as DPO or FLAT, an unlearning batch with "forget" and
"alternate"), and `aux` is a dict of scalar metrics. `forget_retain` combines a forget
term and a retain term into the objective the training step differentiates.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from jaxunlearn.models.outputs import CausalLMOutput
from jaxunlearn.objectives._rows import StackedRowsForward, stacked_rows
from jaxunlearn.scores import DEFAULT_CHUNK_SIZE, sequence_logprob, token_scores

Batch = Mapping[str, Any]
Aux = dict[str, jax.Array]
Forward = Callable[..., CausalLMOutput]


class Term(Protocol):
    """A loss term: `term(forward, batch, *, ref_forward=None) -> (loss, aux)`."""

    def __call__(
        self, forward: Forward, batch: Batch, *, ref_forward: Forward | None = None
    ) -> tuple[jax.Array, Aux]: ...


def paired(term: Callable) -> Callable:
    """Mark `term` as reading an unlearning batch {"forget", "alternate", ...} (DPO, FLAT)."""
    term.paired = True
    return term


def is_paired(term: Callable) -> bool:
    """Whether `term` reads an unlearning batch rather than one sequence batch."""
    return bool(getattr(term, "paired", False))


def sequence_batch(batch: Batch, name: str) -> Batch:
    """Check that `batch` is a sequence batch and return it; errors say what to pass."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"{name}: expected a dict sequence batch, got {type(batch).__name__}.")
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing and "forget" in batch:
        raise ValueError(
            f"{name}: got an unlearning batch (keys {sorted(batch)}); this term scores one "
            "sequence batch. Combine it with objectives.forget_retain(...) or pass "
            "batch['forget'] / batch['retain']."
        )
    if missing:
        raise ValueError(
            f"{name}: the sequence batch has no {missing}; it needs input_ids, attention_mask "
            "and labels int32 [B, T] (labels -100 where not scored), as built by jaxunlearn.data."
        )
    return batch


def batch_part(batch: Batch, key: str, name: str) -> Batch:
    """`batch[key]` of an unlearning batch, with an error naming the missing part."""
    if not isinstance(batch, Mapping) or key not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"{name}: the unlearning batch has no {key!r} part (it has {keys}); build it "
            "with jaxunlearn.data (DPO/FLAT-style methods also need 'alternate')."
        )
    return batch[key]


def run_model(forward: Forward, batch: Batch, *, hidden_layers: tuple[int, ...] = ()) -> Any:
    """Call `forward` on a sequence batch without materialising logits."""
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask"),
        "return_logits": False,
        "hidden_layers": tuple(hidden_layers),
    }
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    return forward(**kwargs)


def run_reference(
    ref_forward: Forward | None, batch: Batch, name: str, *, hidden_layers: tuple[int, ...] = ()
) -> Any:
    """Run the frozen reference model on `batch`, with its outputs under stop_gradient."""
    if ref_forward is None:
        raise ValueError(
            f"{name} needs the frozen reference model: pass ref_forward= (a forward with the "
            "original parameters) to the objective."
        )
    return jax.tree.map(
        lax.stop_gradient, run_model(ref_forward, batch, hidden_layers=hidden_layers)
    )


def scoring_source(out: Any, name: str) -> Any:
    """The Head of a model output (chunked scoring), else its logits."""
    head = getattr(out, "head", None)
    if head is not None:
        return head
    if getattr(out, "logits", None) is not None:
        return out.logits
    raise ValueError(f"{name}: the model output has neither .head nor .logits to score.")


def model_scores(
    forward: Forward, batch: Batch, name: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE
):
    """Run the model on a sequence batch and return its `TokenScores` (from the shared
    scoring pass when `forward` stacks this batch's rows with others: `stacked_rows`)."""
    batch = sequence_batch(batch, name)
    if isinstance(forward, StackedRowsForward):
        shared = forward.scores(batch, chunk_size)
        if shared is not None:
            return shared
    out = run_model(forward, batch)
    return token_scores(scoring_source(out, name), batch["labels"], chunk_size=chunk_size)


def reference_logprob(
    ref_forward: Forward, batch: Batch, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> jax.Array:
    """Sequence log-probs [B] of a batch under the frozen reference model.

    Precompute these once per item and store them as `batch["ref_logprob"]`: NPO and DPO
    then need no reference forward pass per step.

    Args:
      ref_forward: forward function with the original (pre-unlearning) parameters.
      batch: sequence batch.
      chunk_size: vocabulary columns per chunk.

    Returns:
      float32 [B]: sum over scored tokens of log pi_ref(y_t | x, y_<t).
    """
    batch = sequence_batch(batch, "reference_logprob")
    out = run_reference(ref_forward, batch, "reference_logprob")
    src = scoring_source(out, "reference_logprob")
    return sequence_logprob(token_scores(src, batch["labels"], chunk_size=chunk_size))


def reference_sequence_logprob(
    batch: Batch, ref_forward: Forward | None, name: str, chunk_size: int
) -> jax.Array:
    """`batch["ref_logprob"]` when precomputed, else a reference forward pass."""
    if "ref_logprob" in batch:
        ref = jnp.asarray(batch["ref_logprob"], jnp.float32)
        if ref.shape != batch["labels"].shape[:1]:
            raise ValueError(
                f"{name}: batch['ref_logprob'] has shape {ref.shape}; expected float32 "
                f"[B] = {batch['labels'].shape[:1]} (one summed reference log-prob per item)."
            )
        return lax.stop_gradient(ref)
    if ref_forward is None:
        raise ValueError(
            f"{name} needs reference log-probs: store batch['ref_logprob'] (float32 [B], "
            "precomputed once with jaxunlearn.objectives.reference_logprob) or pass ref_forward=."
        )
    return reference_logprob(ref_forward, batch, chunk_size=chunk_size)


def check_positive(name: str, **values: Any) -> None:
    """ValueError unless each concrete hyperparameter is > 0 (arrays pass unchecked)."""
    for key, value in values.items():
        if isinstance(value, int | float) and not value > 0:
            raise ValueError(f"{name}: {key} must be > 0, got {value}.")


def check_non_negative(name: str, **values: Any) -> None:
    """ValueError unless each concrete hyperparameter is >= 0 (arrays pass unchecked)."""
    for key, value in values.items():
        if isinstance(value, int | float) and not value >= 0:
            raise ValueError(f"{name}: {key} must be >= 0, got {value}.")


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over positions where `mask` is 1; 0 when nothing is masked in."""
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def combined_aux(loss, forget_loss, retain_loss, forget_aux: Aux, retain_aux: Aux) -> Aux:
    """The aux dict of a combined objective: totals plus each term's metrics, prefixed."""
    aux = {"loss": loss, "forget_loss": forget_loss, "retain_loss": retain_loss}
    aux |= {f"forget/{k}": v for k, v in forget_aux.items()}
    aux |= {f"retain/{k}": v for k, v in retain_aux.items()}
    return aux


@dataclasses.dataclass(frozen=True, eq=False)
class ForgetRetain:
    """L = gamma · L_forget(batch["forget"]) + alpha · L_retain(batch["retain"]).

    Call it as `objective(forward, batch, *, ref_forward=None, state=None) -> (loss, aux)`
    on an unlearning batch; `aux` has "loss", "forget_loss", "retain_loss" (both
    unweighted) and each term's metrics prefixed "forget/" and "retain/".

    A call runs the model once on the forget and retain rows stacked (when the parts have
    the same sequence length and the forward is marked `rowwise`, as `train.model_forward`'s
    are; `stacked_rows`), not once per part: the same losses and gradients, with one
    backward pass. For gradient transforms that need the two gradients
    apart (GU, HAMU), evaluate `forget_loss` and `retain_loss` separately (one call each)
    and weight them with `weights(state)`.
    Every combined objective (this one and PDU's `PrimalDual`) offers the same state
    protocol, so a training step can treat them alike:
    `state = objective.init_state()`, pass `state=state` to each call, then
    `state = objective.update_state(state, aux)`; here the state is always None.

    Attributes:
      forget: forget term; a paired term receives the whole unlearning batch.
      retain: retain term, or None for no retain term (GA, CE-U, FLAT).
      gamma: forget weight.
      alpha: retain weight.
      one_call: stack the parts' rows into one model call when the forward is marked
        `rowwise` (its rows do not interact, as in causal LMs); False calls the model once
        per part.
    """

    forget: Term
    retain: Term | None = None
    gamma: float | jax.Array = 1.0
    alpha: float | jax.Array = 1.0
    one_call: bool = True

    def forget_loss(
        self, forward: Forward, batch: Batch, *, ref_forward: Forward | None = None
    ) -> tuple[jax.Array, Aux]:
        """Unweighted forget loss on an unlearning batch."""
        part = batch if is_paired(self.forget) else batch_part(batch, "forget", "forget term")
        return self.forget(forward, part, ref_forward=ref_forward)

    def retain_loss(
        self, forward: Forward, batch: Batch, *, ref_forward: Forward | None = None
    ) -> tuple[jax.Array, Aux]:
        """Unweighted retain loss on an unlearning batch (0 without a retain term)."""
        if self.retain is None:
            return jnp.zeros((), jnp.float32), {}
        part = batch_part(batch, "retain", "retain term")
        return self.retain(forward, part, ref_forward=ref_forward)

    def shared_forward(self, forward: Forward, batch: Batch) -> Forward:
        """`forward`, serving the parts the terms read from one model call on their stacked
        rows (`stacked_rows`); `forward` itself when `one_call` is False or no two parts
        have the same sequence length."""
        if not self.one_call or not isinstance(batch, Mapping):
            return forward
        if is_paired(self.forget):
            parts = [v for k, v in batch.items() if k != "retain"]
        else:
            parts = [batch.get("forget")]
        if self.retain is not None:
            parts.append(batch.get("retain"))
        return stacked_rows(forward, parts)

    def init_state(self) -> None:
        """No state: returns None."""
        return None

    def weights(self, state: Any = None) -> tuple[Any, Any]:
        """(gamma, alpha), the weights of the forget and retain losses."""
        del state
        return self.gamma, self.alpha

    def update_state(self, state: Any, aux: Aux) -> Any:
        """No state to update: returns `state`."""
        del aux
        return state

    def __call__(
        self,
        forward: Forward,
        batch: Batch,
        *,
        ref_forward: Forward | None = None,
        state: Any = None,
    ) -> tuple[jax.Array, Aux]:
        if self.retain is not None:  # fail before the forget forward pass, not after it
            batch_part(batch, "retain", "retain term")
        forward = self.shared_forward(forward, batch)
        forget_loss, forget_aux = self.forget_loss(forward, batch, ref_forward=ref_forward)
        retain_loss, retain_aux = self.retain_loss(forward, batch, ref_forward=ref_forward)
        gamma, alpha = self.weights(state)
        loss = gamma * forget_loss + alpha * retain_loss
        return loss, combined_aux(loss, forget_loss, retain_loss, forget_aux, retain_aux)


def forget_retain(
    forget: Term,
    retain: Term | None = None,
    *,
    gamma: float | jax.Array = 1.0,
    alpha: float | jax.Array = 1.0,
    one_call: bool = True,
) -> ForgetRetain:
    """Combine a forget term and a retain term: L = gamma · L_forget + alpha · L_retain.

    This is open-unlearning's GradDiff-family combination (`grad_diff.py`); e.g.
    `forget_retain(npo(beta=0.1), nll())` is NPO with an NLL retain loss.

    Args:
      forget: forget term, applied to batch["forget"] (paired terms get the whole batch).
      retain: retain term applied to batch["retain"], or None (no retain forward pass).
      gamma: forget weight.
      alpha: retain weight.
      one_call: run the model once on the forget and retain rows stacked (same losses and
        gradients; one backward pass); False runs it once per part.

    Returns:
      A `ForgetRetain` objective.

    Example:
      >>> from jaxunlearn import objectives as ob
      >>> objective = ob.forget_retain(ob.npo(beta=0.1), ob.nll(), alpha=1.0)
      >>> objective.weights()
      (1.0, 1.0)
    """
    return ForgetRetain(forget=forget, retain=retain, gamma=gamma, alpha=alpha, one_call=one_call)


def weighted_sum(*weighted_terms: tuple[float | jax.Array, Term]) -> Term:
    """Sum several terms on the same batch: sum_i w_i · term_i.

    Args:
      *weighted_terms: (weight, term) pairs; all paired or all unpaired.

    Returns:
      A term whose aux holds each part's loss as "term<i>_loss" and its metrics as
      "term<i>/<name>".
    """
    if not weighted_terms:
        raise ValueError("weighted_sum: give at least one (weight, term) pair.")
    kinds = {is_paired(term) for _, term in weighted_terms}
    if len(kinds) > 1:
        raise ValueError("weighted_sum: cannot mix paired terms (DPO, FLAT) with sequence terms.")

    def term(forward, batch, *, ref_forward=None):
        total, aux = jnp.zeros((), jnp.float32), {}
        for i, (weight, part) in enumerate(weighted_terms):
            loss, part_aux = part(forward, batch, ref_forward=ref_forward)
            total = total + weight * loss
            aux[f"term{i}_loss"] = loss
            aux |= {f"term{i}/{k}": v for k, v in part_aux.items()}
        return total, aux

    return paired(term) if kinds == {True} else term
