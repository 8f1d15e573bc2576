"""Membership-inference scores, AUC and PrivLeak for unlearning evaluation.

Every score is oriented like a loss: **higher = less member-like** (open-unlearning
`mia/__init__.py`), so an AUC with forget labelled 0 and holdout labelled 1 tends to 1 when the
forget set still looks like training data. Per-token scores take the `logprob` / `mask` (and
for Min-K%++ `entropy_mean` / `entropy_std`) fields of `jaxunlearn.scores.TokenScores`, shaped
[..., T], and run under `jax.jit`.

Which scores drop the final (EOS) label follows open-unlearning exactly: the token-wise attacks
(Min-K%, Min-K%++, GradNorm) use `tokenwise_logprobs`, which drops it, so they default to
`drop_last=True`; LOSS, ZLib and Reference use `evaluate_probability`, which keeps it, so
`loss_score` defaults to `drop_last=False`. For MUSE PrivLeak (muse_bench `privleak.py`)
score every token after BOS with no EOS appended: `drop_last=False, at_least_one=False`.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from jaxunlearn.eval.metrics import _mask, _xp, length_normalised_loss

# AUC of the retrained MUSE model for `forget_holdout_Min-40%`, in MUSE's own orientation
# (AUC_MUSE = 1 - AUC_OU): muse_bench `constants.AUC_RETRAIN` (s.2.2). Kept bit-exact.
MUSE_AUC_RETRAIN: Mapping[str, float] = {"news": 0.47719999999999996, "books": 0.5392999999999999}

# open-unlearning `privleak.yaml` `ref_value`: the retain AUC used without retain logs.
PRIVLEAK_DEFAULT_RETAIN_AUC = 0.5


def loss_score(
    logprob: Float[ArrayLike, "*batch seq"],
    mask: Float[ArrayLike, "*batch seq"],
    *,
    drop_last: bool = False,
) -> Float[Array, "*batch"]:
    """LOSS attack: Lbar(x), the mean token NLL (s.4).

    Args:
      logprob: [..., T] log p(label) per position.
      mask: [..., T] 1 where the label is scored.
      drop_last: drop the final (EOS) label. open-unlearning's LOSS keeps it (False).

    Returns:
      [...] scores; higher = less member-like.

    References:
      Yeom et al., "Privacy Risk in Machine Learning", CSF 2018 (arXiv 1709.01604).
    """
    return length_normalised_loss(logprob, mask, drop_last=drop_last)


def zlib_score(mean_nll: Float[ArrayLike, " batch"], texts: Sequence[str]) -> np.ndarray:
    """ZLib attack: Lbar(x) / len(zlib.compress(text.encode("utf-8"))) (s.4).

    Args:
      mean_nll: [B] Lbar per item (`loss_score`).
      texts: the decoded target tokens of each item (open-unlearning decodes the non -100
        labels with `skip_special_tokens=True`).

    Returns:
      [B] float64 scores.

    References:
      Carlini et al., "Extracting Training Data from Large Language Models", USENIX Security
      2021 (arXiv 2012.07805).
    """
    import zlib

    loss = np.asarray(mean_nll, dtype=np.float64).ravel()
    if loss.shape[0] != len(texts):
        raise ValueError(f"zlib_score got {loss.shape[0]} losses but {len(texts)} texts.")
    sizes = np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)
    return loss / sizes


def reference_score(
    target_mean_nll: Float[ArrayLike, " batch"],
    reference_mean_nll: Float[ArrayLike, " batch"],
) -> np.ndarray:
    """Reference attack: Lbar_target(x) - Lbar_ref(x) (s.4).

    Args:
      target_mean_nll: [B] Lbar under the evaluated model.
      reference_mean_nll: [B] Lbar under the reference model (open-unlearning: the retain
        model; MIMIR-style: another pretrained model).

    Returns:
      [B] float64 scores.
    """
    t = np.asarray(target_mean_nll, dtype=np.float64)
    r = np.asarray(reference_mean_nll, dtype=np.float64)
    if t.shape != r.shape:
        raise ValueError(f"target_mean_nll shape {t.shape} != reference_mean_nll {r.shape}.")
    return t - r


def _lowest_k_mean(values: Array, mask: Array, k: float, at_least_one: bool) -> Array:
    """-mean of the lowest count(n) scored values per row, count(n) = int(k·n) [>= 1].

    The count is read from a table built with Python's `int(n * k)` for every n <= T (T is
    static), so it matches open-unlearning's float64 rounding exactly under jit.
    """
    seq = values.shape[-1]
    counts = [int(n * k) for n in range(seq + 1)]
    if at_least_one:
        counts = [max(1, c) for c in counts]
    xp = _xp(values, mask)
    m = mask > 0
    n = xp.sum(m, axis=-1)
    count = xp.asarray(counts, xp.int32)[n]
    lowest_first = xp.sort(xp.where(m, values, xp.inf), axis=-1)
    keep = xp.arange(seq) < count[..., None]
    total = xp.sum(xp.where(keep, lowest_first, 0.0), axis=-1)
    # count 0 (MUSE convention, short text) gives NaN like np.mean([])
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (-total / count).astype(xp.float32)
    # open-unlearning scores an item with no target tokens as 0.
    return xp.where(n > 0, score, 0.0) if at_least_one else score


def _check_k(k: float) -> None:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}.")


def min_k_score(
    logprob: Float[ArrayLike, "*batch seq"],
    mask: Float[ArrayLike, "*batch seq"],
    k: float = 0.4,
    *,
    drop_last: bool = True,
    at_least_one: bool = True,
) -> Float[Array, "*batch"]:
    """Min-K% Prob: -mean of the lowest k-fraction of token log-probs (MUSE PrivLeak).

    The count is max(1, floor(k·T)) in open-unlearning (`at_least_one=True`) and floor(k·T) in
    muse_bench (`at_least_one=False`, NaN when that is 0).

    Args:
      logprob: [..., T] log p(label) per position.
      mask: [..., T] 1 where the label is scored.
      k: fraction of tokens kept; 0.4 in open-unlearning and MUSE.
      drop_last: drop the final (EOS) label (open-unlearning: True).
      at_least_one: use max(1, .) for the count.

    Returns:
      [...] scores; 0 for an item with no scored labels when `at_least_one`.

    References:
      Shi et al., "Detecting Pretraining Data from Large Language Models", arXiv 2310.16789.
    """
    _check_k(k)
    m = _mask(mask, drop_last)
    xp = _xp(logprob, mask)
    return _lowest_k_mean(xp.asarray(logprob, xp.float32), m, k, at_least_one)


def min_k_plus_plus_score(
    logprob: Float[ArrayLike, "*batch seq"],
    entropy_mean: Float[ArrayLike, "*batch seq"],
    entropy_std: Float[ArrayLike, "*batch seq"],
    mask: Float[ArrayLike, "*batch seq"],
    k: float = 0.4,
    *,
    drop_last: bool = True,
    at_least_one: bool = True,
) -> Float[Array, "*batch"]:
    """Min-K%++: -mean of the lowest k-fraction of z_t = (l_t - mu_t) / sigma_t (s.4).

    mu_t = sum_v p_v log p_v and sigma_t^2 = sum_v p_v (log p_v)^2 - mu_t^2 under the model's
    next-token distribution. open-unlearning clamps sigma_t^2 >= 1e-6; the same clamp is
    applied here (sigma_t >= 1e-3), which is a no-op when the scorer already clamped.

    Args:
      logprob: [..., T] l_t = log p(label).
      entropy_mean: [..., T] mu_t.
      entropy_std: [..., T] sigma_t.
      mask: [..., T] 1 where the label is scored.
      k: fraction kept; 0.4 in open-unlearning's config.
      drop_last: drop the final (EOS) label (open-unlearning: True).
      at_least_one: count = max(1, floor(k·T)) (open-unlearning) instead of floor(k·T).

    Returns:
      [...] scores.

    References:
      Zhang et al., "Min-K%++: Improved Baseline for Detecting Pre-Training Data from Large
      Language Models", arXiv 2404.02936.
    """
    _check_k(k)
    xp = _xp(logprob, entropy_mean, entropy_std, mask)
    sigma = xp.maximum(xp.asarray(entropy_std, xp.float32), np.float32(1e-3))
    z = (xp.asarray(logprob, xp.float32) - xp.asarray(entropy_mean, xp.float32)) / sigma
    return _lowest_k_mean(z, _mask(mask, drop_last), k, at_least_one)


def gradnorm_score(grads: Any, p: float = 2) -> Array:
    """GradNorm from one example's gradient pytree: mean over tensors of ||g_tensor||_p (s.4).

    The average of per-tensor norms, not the global norm (open-unlearning `gradnorm.py`:
    `torch.stack([param.grad.norm(p) ...]).mean()`). Tensors are flattened; p = inf is the
    max absolute entry.

    Args:
      grads: pytree of gradient arrays for a single example (batch size 1).
      p: 1, 2 or inf (open-unlearning configs use 2).

    Returns:
      Scalar score; higher = less member-like.

    References:
      Wang et al., "Gradient-based membership inference for LLMs", arXiv 2402.17012 (the
      paper open-unlearning cites).
    """
    if p not in (1, 2, float("inf")):
        raise ValueError(f"p must be 1, 2 or inf, got {p}.")
    leaves = [x for x in jax.tree.leaves(grads) if x is not None]
    if not leaves:
        raise ValueError("gradnorm_score got an empty gradient pytree.")
    norms = [jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32), ord=p) for x in leaves]
    return jnp.mean(jnp.stack(norms))


def gradnorm_scores(
    loss_fn: Callable[[Any, Any], Array],
    params: Any,
    examples: Any,
    *,
    p: float = 2,
) -> np.ndarray:
    """Per-example GradNorm scores at batch size 1 (s.4).

    `loss_fn(params, example)` must return the scalar mean token NLL of one example, with the
    EOS label dropped to match open-unlearning (e.g. `loss_score(ts.logprob, ts.mask,
    drop_last=True)[0]`). The gradient-and-norm function is jitted once and reused for every
    example of the same shapes. open-unlearning runs the model in `train()` mode; the Llama
    family has no dropout, so a deterministic forward pass is the same computation.

    Args:
      loss_fn: (params, example) -> scalar loss.
      params: parameter pytree to differentiate. Every leaf enters the mean, so pass only
        the trainable tensors the loss uses (torch skips parameters whose `.grad` is None;
        JAX would give them zero gradients and lower the mean); close over the rest.
      examples: a sequence of examples, each a pytree with leading batch size 1, or one pytree
        whose leaves share a leading axis N (sliced into [i:i+1]).
      p: 1, 2 or inf.

    Returns:
      [N] float64 scores.
    """
    if p not in (1, 2, float("inf")):
        raise ValueError(f"p must be 1, 2 or inf, got {p}.")

    @jax.jit
    def one(params, example):
        return gradnorm_score(jax.grad(loss_fn)(params, example), p)

    if isinstance(examples, (list, tuple)):
        items = examples
    else:
        sizes = {x.shape[0] for x in jax.tree.leaves(examples)}
        if len(sizes) != 1:
            raise ValueError(f"examples leaves disagree on the leading axis: sizes {sizes}.")
        (n,) = sizes
        items = [jax.tree.map(lambda x, i=i: x[i : i + 1], examples) for i in range(n)]
    return np.array([float(one(params, ex)) for ex in items], dtype=np.float64)


def mia_auc(
    forget_scores: Float[ArrayLike, " n_forget"],
    holdout_scores: Float[ArrayLike, " n_holdout"],
) -> float:
    """ROC AUC of an MIA score, forget labelled 0 and holdout labelled 1 (s.4).

    `sklearn.metrics.roc_auc_score`, as open-unlearning `mia/utils.mia_auc`. With loss-like
    scores, AUC -> 1 means the forget set still looks like members; a retrained oracle sits
    near 0.5.
    """
    from sklearn.metrics import roc_auc_score

    f = np.asarray(forget_scores, dtype=np.float64).ravel()
    h = np.asarray(holdout_scores, dtype=np.float64).ravel()
    if f.size == 0 or h.size == 0:
        raise ValueError(f"mia_auc needs both sets non-empty (forget {f.size}, holdout {h.size}).")
    for name, x in (("forget_scores", f), ("holdout_scores", h)):
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise ValueError(f"{name} has non-finite scores at positions {bad[:10].tolist()}.")
    labels = np.concatenate([np.zeros(f.size), np.ones(h.size)])
    return float(roc_auc_score(labels, np.concatenate([f, h])))


def privleak(auc_model: float, auc_retain: float | None = None) -> float:
    """PrivLeak in open-unlearning's convention (s.4, `privacy.py::privleak`).

    s = 1 - AUC_model, r = 1 - AUC_retain (both from `mia_auc` on Min-K% with k = 0.4);
    PrivLeak = (s - r) / (r + 1e-10) x 100. Negative means the forget set still looks like
    members (under-unlearning; the MUSE target gives about -99.8), positive means
    over-unlearning, 0 matches the retain model.

    Args:
      auc_model: `mia_auc` of the evaluated model.
      auc_retain: `mia_auc` of the retain / retrain model; None uses open-unlearning's
        fallback 0.5 (`PRIVLEAK_DEFAULT_RETAIN_AUC`).

    Returns:
      PrivLeak in percent.
    """
    ref = PRIVLEAK_DEFAULT_RETAIN_AUC if auc_retain is None else float(auc_retain)
    s, r = 1.0 - float(auc_model), 1.0 - ref
    return (s - r) / (r + 1e-10) * 100.0


def muse_auc(auc_model: float) -> float:
    """Converts a `mia_auc` value to muse_bench's orientation: AUC_MUSE = 1 - AUC (s.2.2).

    muse_bench scores -s with forget labelled 0, i.e. P(holdout looks more likely than forget).
    """
    return 1.0 - float(auc_model)


def privleak_muse(auc_muse_model: float, auc_muse_retrain: float) -> float:
    """PrivLeak in muse_bench's convention: (AUC - AUC_retrain) / AUC_retrain x 100 (s.2.2).

    Both AUCs in MUSE orientation (`muse_auc`); `MUSE_AUC_RETRAIN[corpus]` holds the published
    retrain values. Equal to `privleak(1 - a, 1 - b)` up to open-unlearning's 1e-10.
    """
    ret = float(auc_muse_retrain)
    if ret <= 0:
        raise ValueError(f"auc_muse_retrain must be > 0, got {ret}.")
    return (float(auc_muse_model) - ret) / ret * 100.0


__all__ = [
    "MUSE_AUC_RETRAIN",
    "PRIVLEAK_DEFAULT_RETAIN_AUC",
    "gradnorm_score",
    "gradnorm_scores",
    "loss_score",
    "mia_auc",
    "min_k_plus_plus_score",
    "min_k_score",
    "muse_auc",
    "privleak",
    "privleak_muse",
    "reference_score",
    "zlib_score",
]
