"""Preference-style forget terms: NPO, SimNPO and DPO / IdkDPO.

All use sequence-summed log-probs over the answer tokens and open-unlearning's 2/beta
scaling (standard DPO uses 1; open-unlearning `src/trainer/utils.py::compute_dpo_loss`).
Reference log-probs are read from `batch["ref_logprob"]` (precomputed once per item with
`reference_logprob`) when present, else computed with `ref_forward` under stop_gradient.
"""

import jax
import jax.numpy as jnp

from jaxunlearn.objectives._base import (
    Term,
    batch_part,
    check_positive,
    model_scores,
    paired,
    reference_sequence_logprob,
)
from jaxunlearn.scores import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, sequence_logprob


def npo(beta: float | jax.Array = 0.1, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """Negative preference optimisation: (2/beta) · mean_i softplus(beta · log-ratio_i).

    log-ratio_i = log pi_theta(y_i|x_i) - log pi_ref(y_i|x_i), both summed over answer
    tokens (open-unlearning `compute_dpo_loss(win=None)`).

    Args:
      beta: inverse temperature (> 0).
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term with aux {"log_ratio"} (batch mean); needs `batch["ref_logprob"]` or
      `ref_forward`.

    References:
      Zhang, Lin, Bai, Mei, "Negative Preference Optimization: From Catastrophic Collapse
      to Effective Unlearning", arXiv 2404.05868 (2024).
    """
    check_positive("npo", beta=beta)

    def term(forward, batch, *, ref_forward=None):
        ref = reference_sequence_logprob(batch, ref_forward, "npo", chunk_size)
        logp = sequence_logprob(model_scores(forward, batch, "npo", chunk_size=chunk_size))
        log_ratio = logp - ref
        loss = (2.0 / beta) * jnp.mean(jax.nn.softplus(beta * log_ratio))
        return loss, {"log_ratio": log_ratio.mean()}

    return term


def simnpo(
    beta: float | jax.Array = 4.5,
    delta: float | jax.Array = 0.0,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Term:
    """SimNPO: -(2/beta) · mean_i logsigmoid(beta · (NLL_i / |y_i| - delta)); no reference.

    |y_i| counts labels != -100 over the *unshifted* labels, as open-unlearning's
    `simnpo.py` does (it equals the scored-token count when the first position is not
    scored, as in every prompt/answer batch). The paper's gamma equals beta · delta.
    open-unlearning pairs it with gamma = 0.125, alpha = 1.

    Args:
      beta: inverse temperature (> 0).
      delta: reward margin subtracted before scaling by beta.
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term with aux {"mean_nll"}.

    References:
      Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization for
      LLM Unlearning", arXiv 2410.07163 (2024).
    """
    check_positive("simnpo", beta=beta)

    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        ts = model_scores(forward, batch, "simnpo", chunk_size=chunk_size)
        length = (batch["labels"] != IGNORE_INDEX).sum(-1).astype(jnp.float32)
        mean_nll = -sequence_logprob(ts) / jnp.maximum(length, 1.0)
        loss = -(2.0 / beta) * jnp.mean(jax.nn.log_sigmoid(beta * (mean_nll - delta)))
        return loss, {"mean_nll": mean_nll.mean()}

    return term


def dpo(beta: float | jax.Array = 0.1, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """DPO with the alternate answer preferred over the forget answer (IdkDPO, AltPO).

    L = -(2/beta) · mean_i logsigmoid(beta · [(log pi_theta - log pi_ref)(alternate_i)
    - (log pi_theta - log pi_ref)(forget_i)]). A paired term: it reads an unlearning batch
    with "forget" and "alternate" sequence batches (alternate = the refusal or alternate
    answer to the same question), each with its own `ref_logprob` or scored by
    `ref_forward`.

    Args:
      beta: inverse temperature (> 0).
      chunk_size: vocabulary columns per chunk.

    Returns:
      A paired term with aux {"forget_log_ratio", "alternate_log_ratio"}.

    References:
      Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290 (2023);
      Maini et al., "TOFU", arXiv 2401.06121 (2024), for the "I don't know" variant.
    """
    check_positive("dpo", beta=beta)

    def log_ratio(forward, part, ref_forward, name):
        ref = reference_sequence_logprob(part, ref_forward, name, chunk_size)
        return sequence_logprob(model_scores(forward, part, name, chunk_size=chunk_size)) - ref

    def term(forward, batch, *, ref_forward=None):
        forget = batch_part(batch, "forget", "dpo")
        alternate = batch_part(batch, "alternate", "dpo")
        lose = log_ratio(forward, forget, ref_forward, "dpo (forget)")
        win = log_ratio(forward, alternate, ref_forward, "dpo (alternate)")
        loss = -(2.0 / beta) * jnp.mean(jax.nn.log_sigmoid(beta * (win - lose)))
        return loss, {"forget_log_ratio": lose.mean(), "alternate_log_ratio": win.mean()}

    return paired(term)


def idk_dpo(beta: float | jax.Array = 0.1, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """IdkDPO: `dpo` where batch["alternate"] holds "I don't know" refusals (TOFU)."""
    return dpo(beta, chunk_size=chunk_size)
