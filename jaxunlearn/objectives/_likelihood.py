"""Token-likelihood terms: NLL, gradient ascent, KL to the reference, WGA and SatImp.

All follow open-unlearning's averaging (`src/trainer/unlearn/grad_diff.py`,
`src/trainer/utils.py`): NLL-style losses are the Hugging Face token-weighted batch mean; KL
retain averages over every B·T position.
"""

import jax
import jax.numpy as jnp
from jax import lax

from jaxunlearn.objectives._base import (
    ForgetRetain,
    Term,
    check_non_negative,
    forget_retain,
    masked_mean,
    model_scores,
    run_model,
    run_reference,
    scoring_source,
    sequence_batch,
)
from jaxunlearn.scores import DEFAULT_CHUNK_SIZE, batch_mean_nll, kl_divergence


def nll(*, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """Token-weighted mean NLL of a sequence batch (Hugging Face `outputs.loss`).

    Args:
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term; the usual retain loss (open-unlearning `retain_loss_type: NLL`).
    """

    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        return batch_mean_nll(model_scores(forward, batch, "nll", chunk_size=chunk_size)), {}

    return term


def grad_ascent(*, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """Gradient ascent: minus the token-weighted mean NLL of the forget batch.

    Args:
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term with aux {"nll"}.

    References:
      open-unlearning `src/trainer/unlearn/grad_ascent.py`; Maini et al., "TOFU: A Task of
      Fictitious Unlearning for LLMs", arXiv 2401.06121 (2024).
    """

    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        loss = batch_mean_nll(model_scores(forward, batch, "grad_ascent", chunk_size=chunk_size))
        return -loss, {"nll": loss}

    return term


def kl_retain(*, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """KL(p_ref || p_theta) averaged over all B·T positions, padding included.

    Equals torch `kl_div(log_softmax(theta), log_softmax(ref), reduction="batchmean",
    log_target=True)` on (B·T, V) rows, open-unlearning's `retain_loss_type: KL`. The
    reference runs in the same step (`ref_forward`, under stop_gradient); both
    distributions are compared in vocabulary chunks.

    Args:
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term that requires `ref_forward`.
    """

    def term(forward, batch, *, ref_forward=None):
        batch = sequence_batch(batch, "kl_retain")
        ref = scoring_source(run_reference(ref_forward, batch, "kl_retain"), "kl_retain")
        theta = scoring_source(run_model(forward, batch), "kl_retain")
        return kl_divergence(ref, theta, chunk_size=chunk_size).mean(), {}

    return term


def grad_diff(
    *,
    gamma: float | jax.Array = 1.0,
    alpha: float | jax.Array = 1.0,
    retain_loss: str = "nll",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ForgetRetain:
    """Gradient difference: gamma · (-NLL(forget)) + alpha · retain loss.

    Args:
      gamma: forget weight.
      alpha: retain weight.
      retain_loss: "nll" (token-mean NLL) or "kl" (KL to the reference; TOFU's "KL").
      chunk_size: vocabulary columns per chunk.

    Returns:
      A `ForgetRetain` objective.

    References:
      open-unlearning `src/trainer/unlearn/grad_diff.py`; Liu et al., "Continual Learning
      and Private Unlearning", arXiv 2203.12817 (2022).
    """
    retains = {"nll": nll, "kl": kl_retain}
    if retain_loss not in retains:
        raise ValueError(f"grad_diff: retain_loss must be 'nll' or 'kl', got {retain_loss!r}.")
    return forget_retain(
        grad_ascent(chunk_size=chunk_size),
        retains[retain_loss](chunk_size=chunk_size),
        gamma=gamma,
        alpha=alpha,
    )


def wga(beta: float | jax.Array = 1.0, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """Weighted gradient ascent: -mean_valid[ sg(p_t)^beta · c_t ].

    c_t = -log p_t is the token cross-entropy; the detached weight p_t^beta concentrates
    the ascent on tokens the model still predicts well.

    Args:
      beta: weight exponent (>= 0); 0 is gradient ascent with a per-token mean.
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term.

    References:
      Wang et al., "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go
      Beyond", arXiv 2502.19301 (2025); open-unlearning `utils.compute_wga_loss`.
    """
    check_non_negative("wga", beta=beta)

    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        ts = model_scores(forward, batch, "wga", chunk_size=chunk_size)
        weight = lax.stop_gradient(jnp.exp(beta * ts.logprob))
        return -masked_mean(weight * -ts.logprob, ts.mask), {}

    return term


def satimp(
    beta1: float | jax.Array = 5.0,
    beta2: float | jax.Array = 1.0,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Term:
    """SatImp: -mean_valid[ sg(p_t)^beta1 · sg(1 - p_t)^beta2 · c_t ].

    open-unlearning's yaml pairs it with gamma = 0.1, alpha = 1 (its class defaults are the
    reverse); pass those to `forget_retain`.

    Args:
      beta1: exponent of the saturation weight p_t (>= 0).
      beta2: exponent of the importance weight 1 - p_t (>= 0).
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term.

    References:
      Yang et al., "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning",
      arXiv 2505.11953 (2025); open-unlearning `utils.compute_satimp_loss`.
    """
    check_non_negative("satimp", beta1=beta1, beta2=beta2)

    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        ts = model_scores(forward, batch, "satimp", chunk_size=chunk_size)
        # 1 - p computed as -expm1(log p) keeps its precision when p is close to 1.
        weight = jnp.exp(beta1 * ts.logprob) * (-jnp.expm1(ts.logprob)) ** beta2
        return -masked_mean(lax.stop_gradient(weight) * -ts.logprob, ts.mask), {}

    return term
