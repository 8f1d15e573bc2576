"""Forget metrics of one model on one set of items, and how much an attack recovers of them.

Every audit check re-measures the same things on a model after an attack (quantization,
relearning) and compares three models side by side (target, unlearned, oracle). The
measurements are the TOFU / open-unlearning forget metrics that need no second model:

- ``prob``: per item the length-normalised answer probability exp(-Lbar(a|q)), as TOFU's
  ``forget_Q_A_Prob``;
- ``truth_ratio``: per item, when the items carry ``perturbed_answer`` lists, TOFU's truth
  ratio (correct answer = ``paraphrased_answer`` if present, else ``answer``); aggregated as
  open-unlearning's forget-side ``closer_to_1_better`` mean(min(R, 1/R));
- ``forget_quality``: the KS-test p-value of those truth ratios against the oracle's (given
  as ``oracle_truth_ratio``);
- ``rouge``: ROUGE-L recall of greedy answers (optional: generation is the costly part);
- ``mia_loss_auc``: the LOSS membership-inference AUC of forget vs holdout items (aggregate
  only), when a holdout set is given.

Scoring goes through `eval.inference.score_items` (jit-compiled per length bucket, batches split
over a mesh's data axes), so every check is as fast and as sharded as the evaluation suite.

References:
  Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv:2401.06121.
  Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", arXiv:2410.16454.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxunlearn.data import PromptFormat
from jaxunlearn.eval import metrics as M
from jaxunlearn.eval import mia
from jaxunlearn.eval.inference import EVAL_BUCKETS, generate_answers, score_items

# Metrics where a larger value means more is remembered (the direction recovery is read in).
FORGET_METRICS: tuple[str, ...] = (
    "prob",
    "truth_ratio",
    "forget_quality",
    "rouge",
    "mia_loss_auc",
)


class ForgetMeasures(NamedTuple):
    """Forget metrics of one model on one item set.

    Attributes:
      per_item: {metric: [N] float64 values, item order as given}.
      aggregate: {metric: float}, the suite's aggregate of each metric (plus the set-level
        ``forget_quality`` and ``mia_loss_auc`` that have no per-item value).
    """

    per_item: dict[str, np.ndarray]
    aggregate: dict[str, float]


class ScoringOptions(NamedTuple):
    """How a check scores items (passed on to `eval.inference.score_items`).

    Attributes:
      fmt: prompt format of QA items ("raw", "qa", "llama2", "chat" or a `PromptFormat`).
      batch_size: rows per forward pass.
      buckets: padded lengths (one compile per bucket used).
      mesh: split batches over this mesh's ("data", "fsdp") axes, or None.
      max_new_tokens: greedy generation budget for ROUGE.
      max_length: most tokens per item (longer items are cut; default the largest bucket).
    """

    fmt: str | PromptFormat = "raw"
    batch_size: int = 32
    buckets: Sequence[int] = EVAL_BUCKETS
    mesh: jax.sharding.Mesh | None = None
    max_new_tokens: int = 32
    max_length: int | None = None

    def score_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `score_examples` (and `generate_answers`)."""
        return {"batch_size": self.batch_size, "buckets": self.buckets, "mesh": self.mesh}


DEFAULT_OPTIONS = ScoringOptions()


def _qa(items: Sequence[Mapping[str, Any]], key: str = "answer") -> list[dict[str, str]]:
    return [{"question": r["question"], "answer": r[key]} for r in items]


def answer_losses(
    model: nnx.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    options: ScoringOptions = DEFAULT_OPTIONS,
) -> np.ndarray:
    """Lbar(a|q) per item: mean token NLL of the answer (with EOS), float64 [N]."""
    arrays = score_items(
        model, tokenizer, _qa(items), options.fmt, max_length=options.max_length,
        **options.score_kwargs(),
    )  # fmt: skip
    return np.asarray(M.length_normalised_loss(arrays.logprob, arrays.mask), np.float64)


def _truth_ratios(model, tokenizer, items, options) -> np.ndarray:
    correct_key = "paraphrased_answer" if "paraphrased_answer" in items[0] else "answer"
    perturbed = [list(r["perturbed_answer"]) for r in items]
    k = len(perturbed[0])
    if k == 0 or any(len(p) != k for p in perturbed):
        bad = next(i for i, p in enumerate(perturbed) if len(p) != k or not p)
        raise ValueError(
            f"item {bad}: every item needs the same number (>= 1) of 'perturbed_answer' entries "
            f"(item 0 has {k}, item {bad} has {len(perturbed[bad])})"
        )
    pert_items = [
        {"question": r["question"], "answer": a} for r, ps in zip(items, perturbed) for a in ps
    ]
    losses = answer_losses(model, tokenizer, [*_qa(items, correct_key), *pert_items], options)
    correct, pert = losses[: len(items)], losses[len(items) :].reshape(len(items), k)
    return M.truth_ratio(correct, pert)


def forget_measures(
    model: nnx.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    options: ScoringOptions = DEFAULT_OPTIONS,
    *,
    holdout: Sequence[Mapping[str, Any]] | None = None,
    oracle_truth_ratio: np.ndarray | None = None,
    rouge: bool = False,
) -> ForgetMeasures:
    """The forget metrics of `model` on QA `items` (see the module docstring).

    Args:
      model: a jaxunlearn causal LM.
      tokenizer: its tokenizer.
      items: {"question", "answer"} records; with "perturbed_answer" (and optionally
        "paraphrased_answer") the truth ratio is measured too.
      options: prompt format, batching, mesh.
      holdout: items never trained on; gives ``mia_loss_auc``.
      oracle_truth_ratio: the oracle's truth ratios on the same items; gives
        ``forget_quality``.
      rouge: also generate greedy answers and measure ROUGE-L recall.

    Returns:
      `ForgetMeasures`.

    Raises:
      ValueError: no items, or an oracle truth-ratio vector of another length.
    """
    if not items:
        raise ValueError("forget_measures got no items")
    # Forget and holdout answers in one scoring call: one compile per shape, not per set.
    losses = answer_losses(model, tokenizer, [*items, *(holdout or ())], options)
    loss, h_loss = losses[: len(items)], losses[len(items) :]
    per_item = {"prob": np.exp(-loss)}
    aggregate = {"prob": float(np.nanmean(per_item["prob"]))}
    if "perturbed_answer" in items[0]:
        tr = _truth_ratios(model, tokenizer, items, options)
        per_item["truth_ratio"] = tr
        aggregate["truth_ratio"] = M.truth_ratio_closer_to_1(tr)
        if oracle_truth_ratio is not None:
            oracle = np.asarray(oracle_truth_ratio, np.float64)
            if oracle.shape != tr.shape:
                raise ValueError(
                    f"oracle_truth_ratio has shape {oracle.shape}, the items {tr.shape}"
                )
            aggregate["forget_quality"] = M.forget_quality(tr, oracle)
    if rouge:
        gens = generate_answers(
            model,
            tokenizer,
            [r["question"] for r in items],
            options.fmt,
            max_new_tokens=options.max_new_tokens,
            **options.score_kwargs(),
        )
        scores = M.rouge_scores(gens, [r["answer"] for r in items])
        per_item["rouge"] = np.asarray([s["rougeL_recall"] for s in scores], np.float64)
        aggregate["rouge"] = float(per_item["rouge"].mean())
    if holdout:
        aggregate["mia_loss_auc"] = mia.mia_auc(loss, h_loss)
    return ForgetMeasures(per_item, aggregate)


def recovery(
    attacked: Mapping[str, float], unlearned: Mapping[str, float], target: Mapping[str, float]
) -> dict[str, float]:
    """Recovery = (M_attacked - M_unlearned) / (M_target - M_unlearned) per shared metric.

    0 means the attack brought nothing back, 1 means it restored the target's value. A metric
    on which unlearning changed nothing (|M_target - M_unlearned| < 1e-12) gets NaN: there was
    nothing to recover.

    References:
      Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization",
      arXiv:2410.16454 (recovery of forget metrics after quantization).
    """
    out = {}
    for name in attacked:
        if name not in unlearned or name not in target:
            continue
        a, u, t = (float(d[name]) for d in (attacked, unlearned, target))
        out[name] = (a - u) / (t - u) if abs(t - u) >= 1e-12 else float("nan")
    return out


__all__ = [
    "FORGET_METRICS",
    "DEFAULT_OPTIONS",
    "ForgetMeasures",
    "ScoringOptions",
    "answer_losses",
    "forget_measures",
    "recovery",
]
