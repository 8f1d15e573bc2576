"""Soft-target forget terms: UNDIAL (distil adjusted reference logits) and CE-U.

Both are a cross-entropy from the model to a whole target distribution, computed in
vocabulary chunks by `jaxunlearn.scores.cross_entropy_to_target`.
"""

import jax
import jax.numpy as jnp

from jaxunlearn._vocab_chunks import vocab_size
from jaxunlearn.objectives._base import (
    Term,
    check_non_negative,
    masked_mean,
    run_model,
    run_reference,
    scoring_source,
    sequence_batch,
)
from jaxunlearn.scores import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, cross_entropy_to_target

# Torch reads label -100 as vocabulary slot V - 100 (negative indexing), so the quirk needs
# at least 100 slots; torch itself would raise an index error below that.
_QUIRK_MIN_VOCAB = 100


def undial(
    beta: float | jax.Array = 10.0,
    *,
    ou_label_quirk: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Term:
    """UNDIAL: distil the reference with the label's logit lowered by beta.

    q_t = softmax(z_ref,t - beta · onehot(y_t+1)); L = mean CE(p_theta,t, q_t).

    By default the mean runs over scored positions (label != -100) only. open-unlearning
    (`utils.compute_undial_loss`) has no label mask: it averages over all B·(T-1)
    positions and, through torch's negative indexing, lowers vocabulary slot V - 100
    wherever the label is -100. `ou_label_quirk=True` reproduces that exactly, for parity
    runs; the default is the intended objective (prompt and padding positions are not
    part of the forget target). open-unlearning pairs it with alpha = 0 and lr 1e-4.

    Args:
      beta: how far the label's reference logit is lowered (>= 0).
      ou_label_quirk: replicate open-unlearning's unmasked mean and -100 -> V - 100.
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term that requires `ref_forward`.

    References:
      Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning
      in Large Language Models", arXiv 2402.10052 (2024).
    """
    check_non_negative("undial", beta=beta)

    def term(forward, batch, *, ref_forward=None):
        batch = sequence_batch(batch, "undial")
        labels = batch["labels"]
        ref = scoring_source(run_reference(ref_forward, batch, "undial"), "undial")
        theta = scoring_source(run_model(forward, batch), "undial")
        if ou_label_quirk:
            vocab = vocab_size(theta)
            if vocab < _QUIRK_MIN_VOCAB:
                raise ValueError(
                    f"undial(ou_label_quirk=True) maps label -100 to slot V - 100, which needs "
                    f"V >= 100; this model has V = {vocab}."
                )
            labels = jnp.where(labels < 0, labels + vocab, labels)
        ce = cross_entropy_to_target(
            theta, labels, target=ref, label_shift=-beta, chunk_size=chunk_size
        )
        if ou_label_quirk:
            return ce.mean(), {}
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).astype(jnp.float32)
        return masked_mean(ce, mask), {}

    return term


def ceu(ignore_first_n_answer_tokens: int = 1, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Term:
    """CE-U: cross-entropy to the model's own detached distribution without the label.

    Target q_t = softmax(sg(z_theta,t) with the label's logit set to -inf); the loss is
    CE(p_theta,t, q_t) averaged over scored positions, skipping the first n scored tokens of
    each sequence (the paper's footnote trick, as in open-unlearning `ceu.py`). No
    reference model and no retain term.

    Args:
      ignore_first_n_answer_tokens: leading scored tokens per sequence left out (>= 0).
      chunk_size: vocabulary columns per chunk.

    Returns:
      A term.

    References:
      "CE-U: Cross Entropy Unlearning", arXiv 2503.01224 (2025).
    """
    if not isinstance(ignore_first_n_answer_tokens, int) or ignore_first_n_answer_tokens < 0:
        raise ValueError(
            "ceu: ignore_first_n_answer_tokens must be an int >= 0, got "
            f"{ignore_first_n_answer_tokens!r}."
        )

    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        batch = sequence_batch(batch, "ceu")
        labels = batch["labels"]
        scored = labels != IGNORE_INDEX
        leading = (jnp.cumsum(scored, axis=-1) <= ignore_first_n_answer_tokens) & scored
        labels = jnp.where(leading, IGNORE_INDEX, labels)
        theta = scoring_source(run_model(forward, batch), "ceu")
        ce = cross_entropy_to_target(
            theta, labels, label_shift=-float("inf"), chunk_size=chunk_size
        )
        mask = (labels[:, 1:] != IGNORE_INDEX).astype(jnp.float32)
        return masked_mean(ce, mask), {}

    return term
