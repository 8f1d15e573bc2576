"""PDU: primal-dual unlearning with logit-margin flattening and an explicit dual variable.

PDU minimises the forget loss subject to L_retain <= eps. The Lagrangian
L = gamma · L_forget + lambda · (L_retain - eps) is minimised over the parameters, and the
dual variable is updated by projected ascent, lambda <- max(0, lambda + eta (L_retain - eps)).
Here lambda is explicit state (`PDUState`), threaded through the training step:

    state = objective.init_state()
    loss, aux = objective(forward, batch, ref_forward=ref, state=state)   # differentiate
    state = objective.update_state(state, aux)                            # after the step

When the dual variable moves is `dual_update`:

- "micro_batch" (default, open-unlearning's `dual_update_upon: step`): open-unlearning updates
  lambda inside `compute_loss`, which the Hugging Face trainer calls once per *micro-batch*, so
  with gradient accumulation (its default: 4) lambda moves 4 times per optimizer step and each
  micro-batch's loss uses the lambda its predecessors left. The training step threads the
  state through its micro-batch scan to do the same (`train.accumulate_with_state`).
- "step": once per optimizer step, from the retain loss averaged over its micro-batches.
- "epoch": only through `objective.update_dual(state, mean_retain_loss)` after each full
  retain pass; None: lambda stays alpha.

Each update uses the retain loss at the parameters before the optimizer step. The warm-up
counts dual updates: open-unlearning's 5 epochs are ``5 · steps_per_epoch · micro_batches``
updates with "micro_batch" (``5 · steps_per_epoch`` with "step").
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxunlearn.objectives._base import (
    Aux,
    Batch,
    ForgetRetain,
    Forward,
    Term,
    combined_aux,
    run_model,
    scoring_source,
    sequence_batch,
)
from jaxunlearn.objectives._likelihood import nll
from jaxunlearn.scores import DEFAULT_CHUNK_SIZE, logit_margin


class PDUState(NamedTuple):
    """State of PDU's dual ascent.

    Attributes:
      multiplier: float32 scalar, the dual variable lambda weighting (L_retain - eps).
      count: int32 scalar, dual updates offered so far (the first `dual_warmup` are skipped).
    """

    multiplier: jax.Array
    count: jax.Array


def pdu_margin(*, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """Logit-margin flattening: mean over all B·T positions of (max_v z - mean_v z)^2.

    Like open-unlearning `pdu.py`, the mean runs over every position of the unshifted
    logits, prompt and padding included (the paper writes a mean over valid positions; the
    code has no mask).

    Args:
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term.

    References:
      Entesari et al., "Constrained Entropic Unlearning: A Primal-Dual Framework for Large
      Language Models", arXiv 2506.05314 (2025).
    """

    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        batch = sequence_batch(batch, "pdu_margin")
        source = scoring_source(run_model(forward, batch), "pdu_margin")
        return jnp.mean(logit_margin(source, chunk_size=chunk_size) ** 2), {}

    return term


@dataclasses.dataclass(frozen=True, eq=False)
class PrimalDual:
    """PDU objective: gamma · L_forget + lambda · (L_retain - eps), lambda in `PDUState`.

    Offers the same protocol as `ForgetRetain` (`forget_loss`, `retain_loss`, `weights`,
    `init_state`, `update_state`, and a call taking `state=`). `weights(state)` returns
    (gamma, lambda), so gradient transforms that need the two gradients apart weight the
    retain gradient by the current lambda.

    Attributes:
      objective: the forget/retain pair; its alpha is the initial lambda.
      retain_loss_eps: the retain-loss bound eps.
      dual_step_size: eta, the dual ascent step.
      dual_update: "micro_batch" (open-unlearning: once per micro-batch), "step" (once per
        optimizer step), "epoch" (only via `update_dual`) or None (lambda stays alpha:
        open-unlearning's `primal_dual: false`).
      dual_warmup: number of dual updates skipped at the start.
    """

    objective: ForgetRetain
    retain_loss_eps: float | jax.Array
    dual_step_size: float | jax.Array = 1.0
    dual_update: str | None = "micro_batch"
    dual_warmup: int = 0

    @property
    def updates_per_micro_batch(self) -> bool:
        """Whether the training step calls `update_state` after every micro-batch."""
        return self.dual_update == "micro_batch"

    def init_state(self) -> PDUState:
        """lambda = alpha, no updates seen."""
        return PDUState(jnp.asarray(self.objective.alpha, jnp.float32), jnp.zeros((), jnp.int32))

    def weights(self, state: PDUState | None = None) -> tuple[Any, Any]:
        """(gamma, lambda); lambda = alpha when `state` is None."""
        lam = self.objective.alpha if state is None else state.multiplier
        return self.objective.gamma, lam

    def forget_loss(self, forward: Forward, batch: Batch, *, ref_forward: Forward | None = None):
        """Unweighted forget loss on an unlearning batch."""
        return self.objective.forget_loss(forward, batch, ref_forward=ref_forward)

    def retain_loss(self, forward: Forward, batch: Batch, *, ref_forward: Forward | None = None):
        """Unweighted retain loss (eps not subtracted) on an unlearning batch."""
        return self.objective.retain_loss(forward, batch, ref_forward=ref_forward)

    def update_dual(self, state: PDUState, retain_loss: jax.Array) -> PDUState:
        """lambda <- max(0, lambda + eta (retain_loss - eps)) once past the warm-up.

        Args:
          state: current `PDUState`.
          retain_loss: the unweighted retain loss (a step's, or a full retain pass's mean).

        Returns:
          The new `PDUState` (count incremented even during warm-up).
        """
        violation = lax.stop_gradient(retain_loss) - self.retain_loss_eps
        ascended = jnp.maximum(0.0, state.multiplier + self.dual_step_size * violation)
        active = state.count >= self.dual_warmup
        multiplier = jnp.where(active, ascended, state.multiplier).astype(jnp.float32)
        return PDUState(multiplier, state.count + 1)

    def update_state(self, state: PDUState, aux: Aux) -> PDUState:
        """Dual update from `aux["retain_loss"]` when `dual_update` is "micro_batch" or "step"
        (the training step calls it after each micro-batch or after each step)."""
        if self.dual_update not in ("micro_batch", "step"):
            return state
        return self.update_dual(state, aux["retain_loss"])

    def __call__(
        self,
        forward: Forward,
        batch: Batch,
        *,
        ref_forward: Forward | None = None,
        state: PDUState | None = None,
    ) -> tuple[jax.Array, Aux]:
        forward = self.objective.shared_forward(forward, batch)  # one model call for both
        forget_loss, forget_aux = self.forget_loss(forward, batch, ref_forward=ref_forward)
        retain_loss, retain_aux = self.retain_loss(forward, batch, ref_forward=ref_forward)
        gamma, lam = self.weights(state)
        loss = gamma * forget_loss + lam * (retain_loss - self.retain_loss_eps)
        aux = combined_aux(loss, forget_loss, retain_loss, forget_aux, retain_aux)
        aux["lagrange_multiplier"] = jnp.asarray(lam, jnp.float32)
        return loss, aux


def pdu(
    *,
    retain_loss_eps: float | jax.Array,
    gamma: float | jax.Array = 1.0,
    alpha: float | jax.Array = 1.0,
    retain: Term | None = None,
    dual_step_size: float | jax.Array = 1.0,
    dual_update: str | None = "micro_batch",
    dual_warmup: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PrimalDual:
    """PDU: logit-margin flattening on the forget set under a retain-loss constraint.

    open-unlearning requires eps (its yaml leaves `???`; the paper suggests
    (1 + tolerance) · the original model's retain loss), uses eta = 1, updates lambda once per
    micro-batch, and warms up for 5 epochs. Warm-up here counts dual updates: with the default
    `dual_update="micro_batch"` pass `dual_warmup = 5 · steps_per_epoch · micro_batches`; with
    "step", `5 · steps_per_epoch`; with "epoch" open-unlearning first updates at the end of
    epoch `w`, i.e. pass `dual_warmup = max(w - 1, 0)`.

    Args:
      retain_loss_eps: the bound eps on the retain loss (required).
      gamma: forget weight.
      alpha: initial dual variable lambda (open-unlearning's retain preference).
      retain: retain term; default `nll()`.
      dual_step_size: eta (>= 0).
      dual_update: "micro_batch", "step", "epoch" or None (no dual ascent).
      dual_warmup: dual updates skipped at the start (>= 0).
      chunk_size: vocabulary columns per chunk.

    Returns:
      A `PrimalDual` objective.

    References:
      Entesari et al., "Constrained Entropic Unlearning: A Primal-Dual Framework for Large
      Language Models", arXiv 2506.05314 (2025); open-unlearning `pdu.py`.
    """
    if dual_update not in ("micro_batch", "step", "epoch", None):
        raise ValueError(
            f"pdu: dual_update must be 'micro_batch', 'step', 'epoch' or None, got {dual_update!r}."
        )
    if not isinstance(dual_warmup, int) or dual_warmup < 0:
        raise ValueError(f"pdu: dual_warmup must be an int >= 0, got {dual_warmup!r}.")
    if isinstance(dual_step_size, int | float) and dual_step_size < 0:
        raise ValueError(f"pdu: dual_step_size must be >= 0, got {dual_step_size}.")
    if isinstance(alpha, int | float) and alpha < 0:
        raise ValueError(f"pdu: alpha (the initial dual variable) must be >= 0, got {alpha}.")
    retain = nll(chunk_size=chunk_size) if retain is None else retain
    pair = ForgetRetain(pdu_margin(chunk_size=chunk_size), retain, gamma=gamma, alpha=alpha)
    return PrimalDual(pair, retain_loss_eps, dual_step_size, dual_update, dual_warmup)
