"""Per-token scores of a causal LM: the shared currency of jaxunlearn's losses and metrics.

`token_scores` turns next-token logits (or a `Head`, from which logits are computed one
vocabulary chunk at a time) and Hugging Face labels into per-token log-probabilities and
masks; the sequence and batch reductions below turn those into the quantities the
objectives and the evaluation share, so a metric and the loss it mirrors cannot drift
apart. `kl_divergence`, `cross_entropy_to_target` and `logit_margin` are the
full-distribution primitives used by KL-retain, UNDIAL, CE-U and PDU.

Conventions (Hugging Face / open-unlearning):

* `labels[b, t]` is the token at position t, -100 where not scored. The logits at position
  t predict `labels[b, t + 1]`; this shift happens here and nowhere else, so per-token
  outputs are [B, T - 1] and aligned with `labels[:, 1:]`.
* All math is float32 whatever the model's dtype.
* The vocabulary is processed in chunks with an online (running-max) logsumexp, and the
  chunk body is rematerialised in the backward pass: with a `Head`, neither the forward nor
  the backward pass holds a [B, T, V] array (see `jaxunlearn._vocab_chunks`).
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from jaxunlearn._vocab_chunks import (
    DEFAULT_CHUNK_SIZE,
    check_source,
    fold_vocab,
    position_shape,
    vocab_size,
)
from jaxunlearn.models.outputs import Head

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IGNORE_INDEX",
    "Head",
    "LogitsOrHead",
    "TokenScores",
    "batch_mean_nll",
    "cross_entropy_to_target",
    "kl_divergence",
    "logit_margin",
    "sequence_length",
    "sequence_logprob",
    "sequence_mean_nll",
    "token_scores",
]

IGNORE_INDEX = -100
# open-unlearning's Min-K%++ clamps the per-position variance at 1e-6 before the sqrt
# (src/evals/metrics/mia/min_k_plus_plus.py); matching it keeps MIA scores comparable.
_MIN_KPP_VARIANCE = 1e-6

LogitsOrHead = Float[Array, "batch seq vocab"] | Head


class TokenScores(NamedTuple):
    """Per-token scores of one sequence batch, aligned with `labels[:, 1:]`.

    Attributes:
      logprob: [B, T-1] float32 log p(labels[:, t+1] | tokens <= t); 0 where not scored.
      mask: [B, T-1] float32, 1 where the label is scored (label != -100), else 0.
      entropy_mean: [B, T-1] mu_t = sum_v p_v log p_v (minus the entropy) for Min-K%++;
        0 where not scored; None unless `stats=True`.
      entropy_std: [B, T-1] sigma_t = sqrt(max(sum_v p_v (log p_v)^2 - mu_t^2, 1e-6)),
        the open-unlearning Min-K%++ clamp; 0 where not scored; None unless `stats=True`.
      argmax_match: [B, T-1] float32, 1 where the first argmax of the logits is the label
        (exact memorisation / extraction strength); None unless `stats=True`.
    """

    logprob: Float[Array, "batch seq_1"]
    mask: Float[Array, "batch seq_1"]
    entropy_mean: Float[Array, "batch seq_1"] | None = None
    entropy_std: Float[Array, "batch seq_1"] | None = None
    argmax_match: Float[Array, "batch seq_1"] | None = None


class _Merge(NamedTuple):
    """One chunk merged into a running (max, sum of exp(z - max)) pair."""

    max: jax.Array  # new running max (no gradient: logsumexp is shift invariant)
    sum: jax.Array  # new running sum of exp(z - max)
    weights: jax.Array  # [.., C] exp(z - chunk max), 0 for stale / excluded columns
    weight_sum: jax.Array  # sum of `weights`
    old_scale: jax.Array  # exp(old max - new max): rescales the old running sums
    new_scale: jax.Array  # exp(chunk max - new max): rescales this chunk's sums


def _merge(run_max: jax.Array, run_sum: jax.Array, masked: jax.Array) -> _Merge:
    """Online logsumexp step; `masked` holds -inf for columns that do not count."""
    chunk_max = lax.stop_gradient(masked.max(-1))
    new_max = jnp.maximum(run_max, chunk_max)
    # A chunk (or a prefix) with no counted column has max -inf; shifting by 0 instead
    # keeps exp(-inf - -inf) = NaN out of the sums.
    safe_chunk = jnp.where(jnp.isneginf(chunk_max), 0.0, chunk_max)
    safe_new = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
    weights = jnp.exp(masked - safe_chunk[..., None])
    weight_sum = weights.sum(-1)
    old_scale = jnp.exp(run_max - safe_new)
    new_scale = jnp.exp(chunk_max - safe_new)
    total = run_sum * old_scale + weight_sum * new_scale
    return _Merge(new_max, total, weights, weight_sum, old_scale, new_scale)


def _empty(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Initial (running max, running sum) of an online logsumexp."""
    return jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32)


def _check_labels(source: Any, labels: Any, name: str) -> jax.Array:
    check_source(source, f"{name}: logits_or_head")
    labels = jnp.asarray(labels)
    shape = position_shape(source)
    if labels.shape != shape:
        raise ValueError(
            f"{name}: labels have shape {tuple(labels.shape)} but the logits cover "
            f"(batch, seq) = {shape}; labels must be int [B, T] in Hugging Face alignment "
            "(the token at each position, -100 where not scored)."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name}: labels must be an integer array, got {labels.dtype}.")
    if shape[1] < 2:
        raise ValueError(f"{name}: need at least 2 positions to score a next token, got {shape}.")
    return labels[:, 1:].astype(jnp.int32)


def token_scores(
    logits_or_head: LogitsOrHead,
    labels: Int[Array, "batch seq"],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    stats: bool = False,
) -> TokenScores:
    """Per-token log-probabilities of the labels (and optional Min-K%++ statistics).

    Args:
      logits_or_head: logits [B, T, V] or a `Head(hidden [B, T, D], kernel [D, V])`.
      labels: int [B, T], Hugging Face alignment, -100 where not scored. Labels must lie in
        [0, V) or be -100; an out-of-range label silently scores as logit 0.
      chunk_size: vocabulary columns per chunk (any positive size; V need not divide).
      stats: also compute `entropy_mean`, `entropy_std` and `argmax_match` (no gradient
        flows through them).

    Returns:
      `TokenScores` with [B, T-1] fields aligned with `labels[:, 1:]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxunlearn.scores import batch_mean_nll, token_scores
      >>> logits = jnp.zeros((1, 3, 4))  # uniform over a 4-token vocabulary
      >>> ts = token_scores(logits, jnp.array([[-100, 2, 1]]), chunk_size=3)
      >>> [round(x, 4) for x in ts.logprob[0].tolist()], ts.mask.tolist()
      ([-1.3863, -1.3863], [[1.0, 1.0]])
      >>> round(float(batch_mean_nll(ts)), 4)  # log 4
      1.3863

    References:
      Zhang et al., "Min-K%++: Improved Baseline for Detecting Pre-Training Data from
      Large Language Models", arXiv 2404.02936 (2024), for mu_t and sigma_t.
    """
    targets = _check_labels(logits_or_head, labels, "token_scores")
    shape = targets.shape
    run_max, run_sum = _empty(shape)
    init = {"max": run_max, "sum": run_sum, "label": jnp.zeros(shape, jnp.float32)}
    if stats:
        init |= {
            "mean": jnp.zeros(shape, jnp.float32),
            "m2": jnp.zeros(shape, jnp.float32),
            "argmax": jnp.zeros(shape, jnp.int32),
        }

    def body(carry, chunks, cols, fresh):
        (z,) = chunks
        masked = jnp.where(fresh, z, -jnp.inf)
        m = _merge(carry["max"], carry["sum"], masked)
        hit = (cols == targets[..., None]) & fresh
        out = {"max": m.max, "sum": m.sum, "label": carry["label"] + jnp.where(hit, z, 0.0).sum(-1)}
        if stats:
            out |= _merge_moments(carry, m, lax.stop_gradient(jnp.where(fresh, z, 0.0)))
            # Strictly greater keeps the first maximal column, like numpy/torch argmax.
            better = lax.stop_gradient(masked.max(-1)) > carry["max"]
            out["argmax"] = jnp.where(better, cols[jnp.argmax(masked, -1)], carry["argmax"])
        return out

    carry = fold_vocab((logits_or_head,), body, init, chunk_size=chunk_size, positions=shape[1])
    lse = carry["max"] + jnp.log(carry["sum"])
    scored = targets != IGNORE_INDEX
    mask = scored.astype(jnp.float32)
    logprob = jnp.where(scored, carry["label"] - lse, 0.0)
    if not stats:
        return TokenScores(logprob, mask)
    lse, total = lax.stop_gradient(lse), lax.stop_gradient(carry["sum"])
    entropy_mean = jnp.where(scored, carry["mean"] - lse, 0.0)
    variance = jnp.maximum(carry["m2"] / total, _MIN_KPP_VARIANCE)
    entropy_std = jnp.where(scored, jnp.sqrt(variance), 0.0)
    argmax_match = ((carry["argmax"] == targets) & scored).astype(jnp.float32)
    return TokenScores(logprob, mask, entropy_mean, entropy_std, argmax_match)


def _merge_moments(carry: dict, m: _Merge, z: jax.Array) -> dict:
    """Chan et al.'s parallel update of the softmax-weighted mean and M2 of the logits.

    Var_p(log p) = Var_p(z), and accumulating it as (mean, M2) of chunks avoids the
    cancellation of E[z^2] - E[z]^2 when logits are large and the distribution peaked.
    """
    w, w_sum = lax.stop_gradient(m.weights), lax.stop_gradient(m.weight_sum)
    # Entries of zero weight (a -inf logit, or one far below the max) contribute nothing; they
    # are zeroed before the products, where 0 * -inf or 0 * an overflowed square is NaN.
    z = jnp.where(w > 0, z, 0.0)
    chunk_mean = (w * z).sum(-1) / w_sum
    chunk_m2 = (w * jnp.where(w > 0, z - chunk_mean[..., None], 0.0) ** 2).sum(-1)
    old = lax.stop_gradient(carry["sum"]) * m.old_scale
    new = w_sum * m.new_scale
    # One of old/new is >= 1 (the running max sits in one of them), so total > 0.
    total = old + new
    delta = chunk_mean - carry["mean"]
    return {
        "mean": carry["mean"] + delta * new / total,
        # delta * (delta * weight): with nothing merged yet (old = 0) a huge first mean gives
        # 0, where delta**2 alone would overflow to inf and inf * 0 = NaN
        "m2": carry["m2"] * m.old_scale
        + chunk_m2 * m.new_scale
        + delta * (delta * (old * new / total)),
    }


def sequence_logprob(scores: TokenScores) -> Float[Array, " batch"]:
    """Sum of the scored tokens' log-probs per sequence, log pi(y|x) (NPO/DPO's unit)."""
    return scores.logprob.sum(-1)


def sequence_length(scores: TokenScores) -> Float[Array, " batch"]:
    """Number of scored tokens per sequence, |y| (float32)."""
    return scores.mask.sum(-1)


def sequence_mean_nll(scores: TokenScores) -> Float[Array, " batch"]:
    """Length-normalised NLL per sequence, NLL(y|x)/|y|; 0 for a sequence with no scored token."""
    return -sequence_logprob(scores) / jnp.maximum(sequence_length(scores), 1.0)


def batch_mean_nll(scores: TokenScores) -> Float[Array, ""]:
    """Token-weighted mean NLL over the whole batch: Hugging Face `outputs.loss`.

    This is sum_{i,t} m c / sum_{i,t} m, not a mean of per-sequence means; 0 when the batch
    has no scored token (Hugging Face would return NaN).
    """
    return -scores.logprob.sum() / jnp.maximum(scores.mask.sum(), 1.0)


def kl_divergence(
    ref: LogitsOrHead,
    theta: LogitsOrHead,
    mask: Float[Array, "batch seq"] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Float[Array, "batch seq"]:
    """Forward KL(p_ref || p_theta) at every position (no shift, no label mask).

    KL_t = sum_v p_ref(v) [log p_ref(v) - log p_theta(v)], computed in vocabulary chunks.
    Both arguments are differentiable; stop the gradient of a frozen reference yourself.

    Args:
      ref: reference logits [B, T, V] or Head.
      theta: trained model logits [B, T, V] or Head (same B, T, V).
      mask: optional [B, T] weights multiplied into the result.
      chunk_size: vocabulary columns per chunk.

    Returns:
      [B, T] float32 per-position KL. Its mean over all B·T positions is
      torch `kl_div(log_softmax(theta), log_softmax(ref), reduction="batchmean",
      log_target=True)` on (B·T, V) rows, open-unlearning's KL retain loss.
    """
    check_source(ref, "kl_divergence: ref")
    check_source(theta, "kl_divergence: theta")
    shape = position_shape(theta)
    r_max, r_sum = _empty(shape)
    t_max, t_sum = _empty(shape)
    init = {"r_max": r_max, "r_sum": r_sum, "t_max": t_max, "t_sum": t_sum,
            "diff": jnp.zeros(shape, jnp.float32)}  # fmt: skip

    def body(carry, chunks, cols, fresh):
        z_ref, z_theta = chunks
        r = _merge(carry["r_max"], carry["r_sum"], jnp.where(fresh, z_ref, -jnp.inf))
        t = _merge(carry["t_max"], carry["t_sum"], jnp.where(fresh, z_theta, -jnp.inf))
        # sum_v p_ref(v) (z_ref - z_theta)(v), kept as one sum so that near-equal models
        # do not lose the difference to cancellation between two large expectations.
        # (where p_ref = 0, e.g. a -inf reference logit, the term is 0, not 0 * -inf)
        diff = (r.weights * jnp.where(fresh & (r.weights > 0), z_ref - z_theta, 0.0)).sum(-1)
        return {"r_max": r.max, "r_sum": r.sum, "t_max": t.max, "t_sum": t.sum,
                "diff": carry["diff"] * r.old_scale + diff * r.new_scale}  # fmt: skip

    c = fold_vocab((ref, theta), body, init, chunk_size=chunk_size)
    lse_ref = c["r_max"] + jnp.log(c["r_sum"])
    lse_theta = c["t_max"] + jnp.log(c["t_sum"])
    kl = c["diff"] / c["r_sum"] - lse_ref + lse_theta
    return kl if mask is None else kl * mask


def cross_entropy_to_target(
    theta: LogitsOrHead,
    labels: Int[Array, "batch seq"],
    *,
    target: LogitsOrHead | None = None,
    label_shift: float | jax.Array = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Float[Array, "batch seq_1"]:
    """Cross-entropy from p_theta to a soft target whose label logit is shifted.

    At each position t (predicting labels[:, t + 1]) the target is
    q = softmax(z_target + label_shift · onehot(label)), treated as a constant
    (stop-gradient), and the result is CE_t = -sum_v q_v log p_theta(v). UNDIAL uses the
    reference logits with label_shift = -beta; CE-U uses theta's own logits
    (`target=None`) with label_shift = -inf, which drops the label from q.

    Args:
      theta: trained model logits [B, T, V] or Head.
      labels: int [B, T] Hugging Face labels. A negative label shifts nothing (q is the
        plain softmax of the target there); the result is not masked.
      target: logits or Head of the target distribution; None uses stop_gradient(theta).
      label_shift: added to the label's target logit; -inf removes the label from q.
      chunk_size: vocabulary columns per chunk.

    Returns:
      [B, T-1] float32 per-position cross-entropy, unmasked.

    References:
      Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning
      in Large Language Models", arXiv 2402.10052 (2024); Yang et al., "CE-U: Cross
      Entropy Unlearning", arXiv 2503.01224 (2025).
    """
    # A Python float may be -inf (static: the label column is dropped); an array shift
    # (e.g. a traced hyperparameter) must be finite.
    static = isinstance(label_shift, int | float)
    if static and (math.isnan(label_shift) or label_shift == math.inf):
        raise ValueError(f"label_shift must be finite or -inf, got {label_shift}.")
    exclude = static and label_shift == -math.inf
    targets = _check_labels(theta, labels, "cross_entropy_to_target")
    if target is not None:
        check_source(target, "cross_entropy_to_target: target")
    shape = targets.shape
    t_max, t_sum = _empty(shape)
    q_max, q_sum = _empty(shape)
    init = {"t_max": t_max, "t_sum": t_sum, "q_max": q_max, "q_sum": q_sum,
            "dot": jnp.zeros(shape, jnp.float32)}  # fmt: skip

    def body(carry, chunks, cols, fresh):
        z_theta = chunks[0]
        z_q = lax.stop_gradient(chunks[-1])
        hit = (cols == targets[..., None]) & fresh
        if exclude:
            q_logits = jnp.where(fresh & ~hit, z_q, -jnp.inf)
        else:
            q_logits = jnp.where(fresh, z_q + jnp.where(hit, label_shift, 0.0), -jnp.inf)
        t = _merge(carry["t_max"], carry["t_sum"], jnp.where(fresh, z_theta, -jnp.inf))
        q = _merge(carry["q_max"], carry["q_sum"], q_logits)
        dot = (q.weights * jnp.where(fresh, z_theta, 0.0)).sum(-1)
        return {"t_max": t.max, "t_sum": t.sum, "q_max": q.max, "q_sum": q.sum,
                "dot": carry["dot"] * q.old_scale + dot * q.new_scale}  # fmt: skip

    sources = (theta,) if target is None else (theta, target)
    c = fold_vocab(sources, body, init, chunk_size=chunk_size, positions=shape[1])
    # CE = logsumexp(z_theta) - E_q[z_theta], since sum_v q_v = 1.
    return c["t_max"] + jnp.log(c["t_sum"]) - c["dot"] / c["q_sum"]


def logit_margin(
    logits_or_head: LogitsOrHead, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Float[Array, "batch seq"]:
    """max_v z_v - mean_v z_v at every position (no shift, no mask): PDU's flattening target.

    Args:
      logits_or_head: logits [B, T, V] or Head.
      chunk_size: vocabulary columns per chunk.

    Returns:
      [B, T] float32 margins (differentiable; the max passes its gradient to the argmax).
    """
    check_source(logits_or_head, "logit_margin: logits_or_head")
    shape = position_shape(logits_or_head)
    init = {"max": jnp.full(shape, -jnp.inf, jnp.float32), "sum": jnp.zeros(shape, jnp.float32)}

    def body(carry, chunks, cols, fresh):
        (z,) = chunks
        return {
            "max": jnp.maximum(carry["max"], jnp.where(fresh, z, -jnp.inf).max(-1)),
            "sum": carry["sum"] + jnp.where(fresh, z, 0.0).sum(-1),
        }

    c = fold_vocab((logits_or_head,), body, init, chunk_size=chunk_size)
    return c["max"] - c["sum"] / vocab_size(logits_or_head)
