"""REMIND-style neighbourhood losses: is the loss landscape around forget items still a basin?

REMIND (arXiv:2511.04228) looks at the loss of an item and of small variations of it. For a
sample x it builds neighbourhoods at radii r_1 < ... < r_m by replacing a fraction r of the
tokens with embedding-nearest tokens, and summarises the mean loss as a function of r:

- ``loss0``: Lbar at r = 0;
- ``slope`` and ``curvature``: the linear and quadratic coefficients of a least-squares
  parabola through (0, loss0), (r_j, mean loss at r_j);
- ``dispersion``: the mean over radii of the standard deviation of the neighbours' losses.

Memorised (forget or retain) items sit in sharp basins (low loss0, steep rise); unseen items
and truly forgotten ones do not. The audit reports the AUC of each feature, and of a
cross-validated logistic regression on all four, for telling forget from holdout items; 0.5
means the neighbourhoods reveal nothing.

Two more readings of the same features, for an auditor who wants more than one AUC:

- ``tpr_at_1fpr``: the fraction of forget items flagged when at most 1% of holdout items are
  (Carlini et al., arXiv:2112.03570: membership inference judged at low false-positive
  rates, where an average-case AUC hides a confident minority);
- ``auc3`` (with `retain` items): the macro one-vs-rest AUC of a cross-validated multinomial
  logistic regression telling forget / retain (seen, kept) / holdout (never seen) apart.
  For the oracle forget items look like holdout; for the target like retain.

Paraphrase neighbourhoods (`paraphrase_auc`): TOFU ships a paraphrased question and answer
for its forget and retain items, so a neighbour can also be the same fact in other words:
(question, paraphrased answer), (paraphrased question, answer), (paraphrased question,
paraphrased answer). Features: loss0, the neighbours' mean loss, its gap to loss0, and their
standard deviation (`PARAPHRASE_FEATURES`). TOFU's holdout items have no paraphrases, so this
check tells forget from retain items: a model that never saw the forget set (the oracle)
separates them; the target, which learned both, does not.

Here only answer tokens are replaced (the question is the same prompt the model sees), the
final EOS label is kept, and neighbours are scored with the jitted, mesh-sharded
`eval.inference.score_examples`. Build the neighbourhoods once (from the target model's
embeddings) and score every model on the same ones, so models are compared on equal inputs.

References:
  "REMIND: Input Loss Landscapes Reveal Residual Memorization in Post-Unlearning LLMs",
  arXiv:2511.04228.
  Carlini et al., "Membership Inference Attacks From First Principles", arXiv:2112.03570.
  Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv:2401.06121.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn.audit.classify import check_cv_counts, grouped_cv
from jaxunlearn.audit.measures import DEFAULT_OPTIONS, ScoringOptions
from jaxunlearn.data import IGNORE_INDEX
from jaxunlearn.eval import metrics as M
from jaxunlearn.eval.inference import pad_token_id, score_examples, tokenize_items

DEFAULT_RADII: tuple[float, ...] = (0.1, 0.2, 0.3)
FEATURES: tuple[str, ...] = ("loss0", "slope", "curvature", "dispersion")
PARAPHRASE_FEATURES: tuple[str, ...] = ("loss0", "para_loss", "para_gap", "para_dispersion")
# The low false-positive rate at which membership is judged (TPR at 1% FPR).
LOW_FPR = 0.01

Example = dict[str, np.ndarray]


def input_embedding(model: nnx.Module) -> jax.Array:
    """The [V, D] input embedding matrix of a jaxunlearn model (Llama family or GPT-2)."""
    for name in ("embed_tokens", "wte"):
        module = getattr(model, name, None)
        if module is not None:
            return module.embedding[...]
    raise ValueError(f"{type(model).__name__}: no input embedding (embed_tokens / wte) found")


@functools.partial(jax.jit, static_argnames=("k",))
def _nearest(embedding: jax.Array, ids: jax.Array, *, k: int) -> jax.Array:
    e = embedding.astype(jnp.float32)
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    sims = e[ids] @ e.T
    sims = sims.at[jnp.arange(ids.shape[0]), ids].set(-jnp.inf)  # never the token itself
    return jax.lax.top_k(sims, k)[1]


def nearest_tokens(
    embedding: jax.Array, token_ids: Sequence[int], k: int = 8, *, chunk: int = 256
) -> dict[int, np.ndarray]:
    """The `k` tokens of highest cosine similarity to each token in `token_ids` (not itself).

    Computed in chunks of `chunk` query tokens, so only [chunk, V] similarities are held.
    """
    ids = np.unique(np.asarray(list(token_ids), np.int32))
    if not 1 <= k < embedding.shape[0]:
        raise ValueError(f"k must be in [1, vocab size), got {k}")
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        padded = np.pad(part, (0, chunk - len(part)), mode="edge")
        top = np.asarray(_nearest(embedding, jnp.asarray(padded), k=k))
        out.update({int(t): top[i] for i, t in enumerate(part)})
    return out


def _answer_positions(example: Mapping[str, np.ndarray]) -> np.ndarray:
    scored = np.flatnonzero(np.asarray(example["labels"]) != IGNORE_INDEX)
    return scored[:-1] if len(scored) > 1 else scored  # keep the final (EOS) label


def build_neighbourhoods(
    examples: Sequence[Mapping[str, np.ndarray]],
    embedding: jax.Array,
    *,
    radii: Sequence[float] = DEFAULT_RADII,
    n_neighbours: int = 4,
    k_nearest: int = 8,
    seed: int = 0,
) -> list[list[list[Example]]]:
    """Token-substitution neighbours of each example: ``out[item][radius][j]``.

    A neighbour at radius r replaces max(1, round(r * n)) of the item's n answer tokens,
    chosen at random, each by one of its `k_nearest` embedding neighbours at random; the
    labels follow the new tokens.
    """
    if len(radii) < 2 or any(not 0.0 < r <= 1.0 for r in radii):
        raise ValueError(f"REMIND needs >= 2 radii in (0, 1], got {tuple(radii)}")
    if n_neighbours < 2:
        raise ValueError(f"n_neighbours must be >= 2 (for the dispersion), got {n_neighbours}")
    tokens = {int(e["input_ids"][p]) for e in examples for p in _answer_positions(e)}
    table = nearest_tokens(embedding, sorted(tokens), k_nearest)
    rng = np.random.default_rng(seed)
    out = []
    for example in examples:
        positions = _answer_positions(example)
        per_radius = []
        for r in radii:
            count = min(len(positions), max(1, round(r * len(positions))))
            group = []
            for _ in range(n_neighbours):
                ids = np.array(example["input_ids"], np.int32)
                labels = np.array(example["labels"], np.int32)
                for p in rng.choice(positions, size=count, replace=False):
                    ids[p] = table[int(ids[p])][rng.integers(k_nearest)]
                    labels[p] = ids[p]
                group.append({"input_ids": ids, "labels": labels})
            per_radius.append(group)
        out.append(per_radius)
    return out


def flatness_features(loss0: np.ndarray, losses: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    """[N, 4] (loss0, slope, curvature, dispersion) from [N] and [N, R, K] losses.

    slope and curvature are b and c of the least-squares fit mean_loss(r) = a + b r + c r^2
    through r = 0 and each radius.
    """
    r = np.asarray([0.0, *radii], np.float64)
    y = np.concatenate([loss0[:, None], losses.mean(-1)], axis=1)  # [N, R + 1]
    design = np.stack([np.ones_like(r), r, r**2], axis=1)
    coef, *_ = np.linalg.lstsq(design, y.T, rcond=None)  # [3, N]
    dispersion = losses.std(-1).mean(-1)
    return np.stack([loss0, coef[1], coef[2], dispersion], axis=1)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = LOW_FPR) -> float:
    """The highest true-positive rate over thresholds whose false-positive rate is <= `fpr`
    (label 1 positive, higher score = more likely positive; `sklearn.metrics.roc_curve`).

    Raises:
      ValueError: `fpr` outside [0, 1], or a class missing.
    """
    from sklearn.metrics import roc_curve

    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    y = np.asarray(labels, np.int64)
    if len(np.unique(y)) != 2:
        raise ValueError("tpr_at_fpr needs both positive and negative items")
    false_pos, true_pos, _ = roc_curve(y, np.asarray(scores, np.float64))
    return float(true_pos[false_pos <= fpr].max())


def multiclass_cv_auc(
    features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0, what: str = ""
) -> float:
    """Macro one-vs-rest ROC AUC of out-of-fold multinomial logistic-regression
    probabilities (standardised features, balanced classes, stratified folds).

    Raises:
      ValueError: a class with fewer items than `folds`, or non-finite features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.asarray(features, np.float64), np.asarray(labels, np.int64)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 3 or counts.min() < folds:
        raise ValueError(
            f"{what or 'multiclass AUC'}: needs 3 classes with >= {folds} items each, got "
            f"{dict(zip(classes.tolist(), counts.tolist()))}"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{what or 'multiclass AUC'}: non-finite features")
    proba = np.zeros((len(y), len(classes)))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced")
        )
        proba[test] = clf.fit(x[train], y[train]).predict_proba(x[test])
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro"))


class RemindResult(NamedTuple):
    """REMIND features of forget and holdout items under one model, and how well they separate.

    Attributes:
      forget: [N_f, 4] features (`FEATURES` order) per forget item.
      holdout: [N_h, 4] features per holdout item.
      auc: {feature: ROC AUC with forget items positive, on -feature (lower loss/flatter =
        member)} plus "classifier": the cross-validated logistic regression on all four.
      tpr_at_1fpr: the same keys: TPR at 1% FPR of forget vs holdout (`tpr_at_fpr`).
      retain: [N_r, 4] features of retain items (None unless `retain` was given).
      auc3: macro one-vs-rest AUC of forget / retain / holdout (None without retain items).
    """

    forget: np.ndarray
    holdout: np.ndarray
    auc: dict[str, float]
    tpr_at_1fpr: dict[str, float] | None = None
    retain: np.ndarray | None = None
    auc3: float | None = None


def remind_features(
    model: nnx.Module,
    examples: Sequence[Mapping[str, np.ndarray]],
    neighbourhoods: Sequence[Sequence[Sequence[Example]]],
    radii: Sequence[float],
    options: ScoringOptions = DEFAULT_OPTIONS,
    *,
    pad_id: int = 0,
) -> np.ndarray:
    """[N, 4] flatness features of each example under `model` (one batched scoring call)."""
    r, k = len(neighbourhoods[0]), len(neighbourhoods[0][0])
    flat = list(examples) + [n for item in neighbourhoods for rad in item for n in rad]
    arrays = score_examples(model, flat, pad_id=pad_id, **options.score_kwargs())
    loss = np.asarray(M.length_normalised_loss(arrays.logprob, arrays.mask), np.float64)
    n = len(examples)
    return flatness_features(loss[:n], loss[n:].reshape(n, r, k), radii)


def remind_auc(
    model: nnx.Module,
    tokenizer: Any,
    forget: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]],
    options: ScoringOptions = DEFAULT_OPTIONS,
    *,
    embedding: jax.Array | None = None,
    radii: Sequence[float] = DEFAULT_RADII,
    n_neighbours: int = 4,
    k_nearest: int = 8,
    folds: int = 5,
    seed: int = 0,
    max_length: int = 512,
    retain: Sequence[Mapping[str, Any]] | None = None,
) -> RemindResult:
    """REMIND features and forget-vs-holdout AUCs of `model` (see the module docstring).

    Args:
      model: the model to audit.
      tokenizer: its tokenizer.
      forget: forget QA items.
      holdout: items the model never saw.
      options: prompt format, batching, mesh.
      embedding: [V, D] embeddings to find neighbours with (default: `model`'s own; pass
        the target's to score several models on the same neighbourhoods).
      radii: fractions of answer tokens replaced.
      n_neighbours: neighbours per radius.
      k_nearest: candidate replacements per token.
      folds: cross-validation folds of the combined classifier.
      seed: neighbour and fold seed.
      max_length: most tokens per item.
      retain: items the model saw and kept; with them the 3-class AUC is computed too.

    Returns:
      `RemindResult`.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(forget)), np.zeros(len(holdout))]
    check_cv_counts(labels.astype(np.int64), np.arange(len(labels)), folds, "REMIND")
    retain = list(retain or [])
    if retain and len(retain) < folds:
        raise ValueError(f"REMIND: {len(retain)} retain items, fewer than the {folds} folds")
    items = [*forget, *holdout, *retain]
    examples = tokenize_items(tokenizer, items, options.fmt, max_length=max_length)
    embedding = input_embedding(model) if embedding is None else embedding
    hoods = build_neighbourhoods(
        examples, embedding, radii=radii, n_neighbours=n_neighbours, k_nearest=k_nearest,
        seed=seed,
    )  # fmt: skip
    all_feats = remind_features(
        model, examples, hoods, radii, options, pad_id=pad_token_id(tokenizer)
    )
    n = len(labels)
    feats = all_feats[:n]
    auc = {name: float(roc_auc_score(labels, -feats[:, i])) for i, name in enumerate(FEATURES)}
    tpr = {name: tpr_at_fpr(labels, -feats[:, i]) for i, name in enumerate(FEATURES)}
    held = grouped_cv(feats, labels, folds=folds, seed=seed, what="REMIND")
    auc["classifier"], tpr["classifier"] = held.auc, tpr_at_fpr(labels, held.proba)
    auc3 = None
    if retain:
        three = np.r_[np.zeros(len(forget)), np.ones(len(retain)), np.full(len(holdout), 2)]
        stacked = np.r_[feats[: len(forget)], all_feats[n:], feats[len(forget) :]]
        auc3 = multiclass_cv_auc(stacked, three, folds=folds, seed=seed, what="REMIND 3-class")
    return RemindResult(
        feats[: len(forget)], feats[len(forget) :], auc, tpr,
        all_feats[n:] if retain else None, auc3,
    )  # fmt: skip


def paraphrase_neighbours(item: Mapping[str, Any], index: int = 0) -> list[dict[str, str]]:
    """The three paraphrase neighbours of a TOFU item (see the module docstring).

    Raises:
      ValueError: the item has no non-empty "paraphrased_question" / "paraphrased_answer"
        (names its position).
    """
    missing = [
        k
        for k in ("question", "answer", "paraphrased_question", "paraphrased_answer")
        if not isinstance(item.get(k), str) or not item[k].strip()
    ]
    if missing:
        raise ValueError(
            f"paraphrase neighbourhoods: item {index} has no {missing}; use TOFU's "
            "forgetXX_perturbed / retain_perturbed rows (holdout rows have no paraphrases)"
        )
    q, a = item["question"], item["answer"]
    pq, pa = item["paraphrased_question"], item["paraphrased_answer"]
    return [
        {"question": q, "answer": pa},
        {"question": pq, "answer": a},
        {"question": pq, "answer": pa},
    ]


def paraphrase_flatness(loss0: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """[N, 4] (loss0, mean neighbour loss, gap, neighbour std) from [N] and [N, K] losses."""
    mean = losses.mean(-1)
    return np.stack([loss0, mean, mean - loss0, losses.std(-1)], axis=1)


class ParaphraseResult(NamedTuple):
    """Paraphrase-neighbourhood features of two item sets under one model.

    Attributes:
      positive: [N_p, 4] features (`PARAPHRASE_FEATURES`) of the positive set (forget).
      negative: [N_n, 4] features of the negative set (retain).
      auc: {feature: AUC on -feature, positive set as label 1} plus "classifier" (CV).
      tpr_at_1fpr: the same keys, TPR at 1% FPR.
    """

    positive: np.ndarray
    negative: np.ndarray
    auc: dict[str, float]
    tpr_at_1fpr: dict[str, float]


def paraphrase_auc(
    model: nnx.Module,
    tokenizer: Any,
    positive: Sequence[Mapping[str, Any]],
    negative: Sequence[Mapping[str, Any]],
    options: ScoringOptions = DEFAULT_OPTIONS,
    *,
    folds: int = 5,
    seed: int = 0,
    max_length: int = 512,
) -> ParaphraseResult:
    """Paraphrase-neighbourhood features and the AUC / TPR@1%FPR of telling `positive`
    (forget) from `negative` (retain) items apart (one batched scoring call).

    Raises:
      ValueError: an item without paraphrases, or fewer items per set than `folds`.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    check_cv_counts(labels.astype(np.int64), np.arange(len(labels)), folds, "paraphrase")
    items = [*positive, *negative]
    hoods = [paraphrase_neighbours(item, i) for i, item in enumerate(items)]
    flat = [*items, *(nb for group in hoods for nb in group)]
    examples = tokenize_items(tokenizer, flat, options.fmt, max_length=max_length)
    arrays = score_examples(
        model, examples, pad_id=pad_token_id(tokenizer), **options.score_kwargs()
    )
    loss = np.asarray(M.length_normalised_loss(arrays.logprob, arrays.mask), np.float64)
    n = len(items)
    feats = paraphrase_flatness(loss[:n], loss[n:].reshape(n, -1))
    auc = {k: float(roc_auc_score(labels, -feats[:, i])) for i, k in enumerate(PARAPHRASE_FEATURES)}
    tpr = {k: tpr_at_fpr(labels, -feats[:, i]) for i, k in enumerate(PARAPHRASE_FEATURES)}
    held = grouped_cv(feats, labels, folds=folds, seed=seed, what="paraphrase")
    auc["classifier"], tpr["classifier"] = held.auc, tpr_at_fpr(labels, held.proba)
    return ParaphraseResult(feats[: len(positive)], feats[len(positive) :], auc, tpr)


__all__ = [
    "DEFAULT_RADII",
    "FEATURES",
    "LOW_FPR",
    "PARAPHRASE_FEATURES",
    "ParaphraseResult",
    "RemindResult",
    "build_neighbourhoods",
    "flatness_features",
    "input_embedding",
    "multiclass_cv_auc",
    "nearest_tokens",
    "paraphrase_auc",
    "paraphrase_flatness",
    "paraphrase_neighbours",
    "remind_auc",
    "remind_features",
    "tpr_at_fpr",
]
