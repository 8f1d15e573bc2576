"""FLAT: forget-only unlearning by maximising an f-divergence between template and forget answers.

FLAT needs no retain set and no reference model: it raises the mean token probability of
a template (e.g. refusal) answer and lowers that of the forget answer, through the
variational form of an f-divergence.
"""

import math

import jax
import jax.numpy as jnp

from jaxunlearn.objectives._base import Term, batch_part, model_scores, paired
from jaxunlearn.scores import DEFAULT_CHUNK_SIZE

_LOG2 = math.log(2.0)

# divergence -> (activation g*, conjugate f*), as in FLAT's `get_contrastive_loss`
# (UCSC-REAL/FLAT dataloader.py).
_DIVERGENCES = {
    "tv": (lambda v: jnp.tanh(v) / 2.0, lambda t: t),
    "kl": (lambda v: v, lambda t: jnp.exp(t - 1.0)),
    "js": (lambda v: _LOG2 - jax.nn.softplus(-v), lambda t: -jnp.log(2.0 - jnp.exp(t))),
    "pearson": (lambda v: v, lambda t: t * t / 4.0 + t),
}


def mean_token_probability(scores) -> jax.Array:
    """FLAT's P: mean over all B·(T-1) positions of mask · p(label); padding counts as 0."""
    return (jnp.exp(scores.logprob) * scores.mask).mean()


def flat(divergence: str = "tv", *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """FLAT loss: -g*(P_e) + f*(g*(P_f)).

    P_f and P_e are the mean token probabilities (over all B·(T-1) positions, unscored ones
    counting 0) of the forget answers batch["forget"] and the template answers
    batch["alternate"]. A paired term: it reads the unlearning batch.

    Args:
      divergence: "tv" (total variation, FLAT's default), "kl", "js" (Jensen-Shannon) or
        "pearson" (Pearson chi^2).
      chunk_size: vocabulary columns per chunk.

    Returns:
      A paired term with aux {"forget_prob", "alternate_prob"}.

    References:
      Wang et al., "LLM Unlearning via Loss Adjustment with Only Forget Data", ICLR 2025,
      arXiv 2410.11143.
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(
            f"flat: divergence must be one of {sorted(_DIVERGENCES)}, got {divergence!r}."
        )
    activation, conjugate = _DIVERGENCES[divergence]

    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        forget = batch_part(batch, "forget", "flat")
        alternate = batch_part(batch, "alternate", "flat")
        p_forget = mean_token_probability(
            model_scores(forward, forget, "flat (forget)", chunk_size=chunk_size)
        )
        p_alternate = mean_token_probability(
            model_scores(forward, alternate, "flat (alternate)", chunk_size=chunk_size)
        )
        loss = -activation(p_alternate) + conjugate(activation(p_forget))
        return loss, {"forget_prob": p_forget, "alternate_prob": p_alternate}

    return paired(term)
