"""MUSE evaluation of a causal LM: VerbMem, KnowMem, PrivLeak (and MIA AUCs), per item.

`evaluate_muse` follows muse_bench (`eval.py`, `metrics/{verbmem,knowmem,privleak}.py`,
commit fcd6651) for what is generated and scored, and writes open-unlearning's metric names
and layout (`configs/eval/muse_metrics/*.yaml`, `MUSE_EVAL.json`); MUSE paper arXiv 2407.06460:

- forget/retain_knowmem_ROUGE (`knowmem/{forget,retain}_qa` with the 10 ICL pairs of
  `*_qa_icl`): the prompt is the ICL pairs as `"Question: {q}\nAnswer: {a}\n\n"`, then
  `"Question: {q}\nAnswer: "`; greedy 32 tokens, cut at "\n\n", "\nQuestion" and
  "Question:"; ROUGE-L F1 against the answer.
- forget_verbmem_ROUGE (`verbmem/forget`): greedy 128 tokens after `prompt`; the ground truth
  is the first 128 tokens of `gt` (BOS included, as muse_bench); ROUGE-L F1.
- mia_min_k and privleak (`privleak/{forget,holdout}`): Min-40% over every token after BOS,
  count floor(0.4 T); PrivLeak against the retrained model's AUC (0.4772 News, 0.5393 Books
  in MUSE's orientation).
- mia_loss, mia_zlib, mia_min_k_plus_plus (same texts): Lbar, Lbar / zlib size of the text,
  Min-K%++ with k = 0.4.
- extraction_strength, exact_memorization (`verbmem/forget` as `prompt + " " + gt`, open-
  unlearning's completion item): teacher-forced argmax over the gt tokens.

Prompts are raw text with BOS (`add_special_tokens=True`), as muse_bench; no chat template.

Deliberate choices where muse_bench and open-unlearning differ:
  - ROUGE: stemmer on and a 0-1 scale by default (open-unlearning); `stemmer=False` gives
    muse_bench's numbers (x100 for its leaderboard).
  - Min-K on PrivLeak texts scores every token after BOS with a count of floor(0.4 T)
    (muse_bench, whose published retrain AUCs we compare with); open-unlearning drops the last
    token and uses max(1, .). The other MIA scores use the same tokens.
  - PrivLeak reference: the retain logs' `mia_min_k` AUC when given, else the published
    retrain AUC of the corpus (open-unlearning would fall back to 0.5).

References:
  Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", 2024,
  arXiv:2407.06460.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxunlearn.data import IGNORE_INDEX, load_muse
from jaxunlearn.eval import metrics as M
from jaxunlearn.eval import mia, report
from jaxunlearn.eval.inference import (
    EVAL_BUCKETS,
    EvalResult,
    generate_answers,
    make_result,
    pad_token_id,
    score_examples,
    score_items,
)

MUSE_METRICS: tuple[str, ...] = (
    "forget_knowmem_ROUGE",
    "retain_knowmem_ROUGE",
    "forget_verbmem_ROUGE",
    "privleak",
    "extraction_strength",
    "exact_memorization",
    "mia_min_k",
    "mia_loss",
    "mia_zlib",
    "mia_min_k_plus_plus",
    "mia_reference",
)

# open-unlearning configs/eval/muse.yaml.
DEFAULT_MUSE_METRICS: tuple[str, ...] = (
    "forget_knowmem_ROUGE",
    "retain_knowmem_ROUGE",
    "forget_verbmem_ROUGE",
    "privleak",
    "extraction_strength",
)

_MIA = ("privleak", "mia_min_k", "mia_loss", "mia_zlib", "mia_min_k_plus_plus", "mia_reference")
MIN_K = 0.4  # muse_bench privleak key `Min-40%`; open-unlearning mia_min_k.yaml k


def knowmem_prompt(question: str, icl: Sequence[tuple[str, str]]) -> str:
    """muse_bench KnowMem prompt: the in-context pairs, then the question (s.2.2)."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in icl)
    return shots + f"Question: {question}\nAnswer: "


def _rows(data_dir, config: str, split: str, hub: bool, corpus: str, limit: int | None):
    rows = load_muse(data_dir, config, split, hub=hub, corpus=corpus).to_list()
    rows = rows if limit is None else rows[:limit]
    if not rows:
        raise ValueError(f"MUSE {config} split '{split}' has no items to evaluate")
    return rows


def evaluate_muse(
    model: nnx.Module,
    tokenizer: Any,
    data_dir: str | os.PathLike | None,
    *,
    corpus: str = "news",
    metrics: Sequence[str] | None = None,
    hub: bool = False,
    knowmem_max_new_tokens: int = 32,
    verbmem_max_new_tokens: int = 128,
    batch_size: int = 16,
    limit: int | None = None,
    retain_logs: str | os.PathLike | Mapping[str, Any] | None = None,
    retrain_auc: float | None = None,
    stemmer: bool = True,
    privleak_max_length: int = 2048,
    mesh: jax.sharding.Mesh | None = None,
    buckets: Sequence[int] = EVAL_BUCKETS,
    eos_token_id: int | Sequence[int] | None = None,
    reference_model: nnx.Module | None = None,
    model_path: str | None = None,
) -> EvalResult:
    """Evaluates a model on MUSE (arXiv 2407.06460; module docstring for the protocol).

    Args:
      model: the jaxunlearn causal LM to evaluate.
      tokenizer: its Hugging Face tokenizer.
      data_dir: folder laid out like `muse-bench/MUSE-News` (`knowmem/`, `verbmem/`,
        `privleak/` JSON Lines splits); ignored with `hub=True`.
      corpus: "news" or "books": picks the published retrain AUC (and the hub dataset).
      metrics: names from `MUSE_METRICS`; default `DEFAULT_MUSE_METRICS` (open-unlearning's
        suite). "mia_reference" needs `reference_model`.
      hub: read the splits from the Hugging Face hub.
      knowmem_max_new_tokens: KnowMem generation budget (32).
      verbmem_max_new_tokens: VerbMem generation budget and gt truncation (128).
      batch_size: rows per forward pass / generation call.
      limit: only the first `limit` items of each split (quick runs, tests).
      retain_logs: the retain/retrain model's `MUSE_EVAL.json`; its `mia_min_k` AUC is the
        PrivLeak reference.
      retrain_auc: the retrained model's Min-40% AUC in MUSE orientation, overriding the
        published constant (`mia.MUSE_AUC_RETRAIN`).
      stemmer: Porter stemming in ROUGE (open-unlearning True, muse_bench False).
      privleak_max_length: most tokens per PrivLeak text (open-unlearning truncates at 2048).
      mesh: shard batches over this mesh.
      buckets: padded sequence lengths.
      eos_token_id: id(s) that stop generation (default: the tokenizer's EOS).
      reference_model: model for the Reference attack.
      model_path: recorded in the metadata.

    Returns:
      `EvalResult(logs, summary, metadata)`; `result.write(out_dir, "MUSE")` writes the files.

    Raises:
      ValueError: unknown metric, missing or empty split, `limit` < 1, "mia_reference" without
        a reference model.
    """
    requested, needed = _select(metrics, limit, reference_model)

    def load(config: str, split: str, n: int | None = limit) -> list[dict]:
        return _rows(data_dir, config, split, hub, corpus, n)

    common = dict(batch_size=batch_size, buckets=buckets, mesh=mesh)
    logs: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for side in ("forget", "retain"):
        if f"{side}_knowmem_ROUGE" in needed:
            # `limit` picks evaluated items; the in-context examples always stay all 10.
            qa, icl = load("knowmem", f"{side}_qa"), load("knowmem", f"{side}_qa_icl", None)
            counts[f"knowmem_{side}"] = len(qa)
            logs[f"{side}_knowmem_ROUGE"] = _knowmem(
                model, tokenizer, qa, icl, common, knowmem_max_new_tokens, stemmer, eos_token_id
            )
    if needed & {"forget_verbmem_ROUGE", "extraction_strength", "exact_memorization"}:
        rows = load("verbmem", "forget")
        counts["verbmem_forget"] = len(rows)
        logs.update(
            _verbmem(
                model,
                tokenizer,
                rows,
                needed,
                common,
                verbmem_max_new_tokens,
                stemmer,
                eos_token_id,
            )  # fmt: skip
        )
    reference = None
    if needed & set(_MIA):
        forget, holdout = load("privleak", "forget"), load("privleak", "holdout")
        counts.update(privleak_forget=len(forget), privleak_holdout=len(holdout))
        mia_logs = _privleak_mias(
            model,
            tokenizer,
            [r["text"] for r in forget],
            [r["text"] for r in holdout],
            needed,
            common,
            privleak_max_length,
            reference_model,
        )
        logs.update(mia_logs)
        reference, source = _reference_auc(corpus, retain_logs, retrain_auc)
        if "privleak" in needed:
            logs["privleak"] = {
                "agg_value": mia.privleak(logs["mia_min_k"]["agg_value"], reference)
            }
    metadata = report.eval_metadata(
        benchmark=f"MUSE-{corpus.capitalize()}",
        model_path=model_path or "",
        split="forget",
        n_items=counts,
        prompt_format="raw (muse_bench: 'Question: {q}\\nAnswer: ' with 10 ICL pairs for KnowMem)",
        knowmem_max_new_tokens=knowmem_max_new_tokens,
        verbmem_max_new_tokens=verbmem_max_new_tokens,
        rouge_stemmer=stemmer,
        limit=limit,
        privleak_reference_auc=reference,
        privleak_reference_source=None if reference is None else source,
        privleak_max_length=privleak_max_length,
        batch_size=batch_size,
        metrics=requested,
    )
    return make_result(logs, requested, metadata)


def _select(metrics, limit, reference_model) -> tuple[list[str], set[str]]:
    """(requested metrics, everything they are computed from), checked."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all items), got {limit}")
    requested = list(DEFAULT_MUSE_METRICS if metrics is None else metrics)
    unknown = sorted(set(requested) - set(MUSE_METRICS))
    if unknown:
        raise ValueError(f"unknown MUSE metric(s) {unknown}; choose from {list(MUSE_METRICS)}")
    needed = set(requested) | ({"mia_min_k"} if "privleak" in requested else set())
    if "mia_reference" in needed and reference_model is None:
        raise ValueError("metric 'mia_reference' needs reference_model (e.g. the retrain model)")
    return requested, needed


def _knowmem(model, tokenizer, qa, icl, common, max_new_tokens, stemmer, eos) -> dict[str, Any]:
    """KnowMem ROUGE-L F1 entry of one QA split (muse_bench `metrics/knowmem.py`)."""
    shots = [(r["question"], r["answer"]) for r in icl]
    prompts = [knowmem_prompt(r["question"], shots) for r in qa]
    answers = [r["answer"] for r in qa]
    generations = generate_answers(
        model,
        tokenizer,
        prompts,
        "raw",
        max_new_tokens=max_new_tokens,
        stop_strings=M.MUSE_KNOWMEM_STOPS,
        eos_token_id=eos,
        **common,
    )
    return report.rouge_result(
        M.rouge_scores(generations, answers, stemmer=stemmer),
        "rougeL_f1",
        inputs=[r["question"] for r in qa],
        ground_truths=answers,
        generations=generations,
    )


def _verbmem(model, tokenizer, rows, needed, common, max_new_tokens, stemmer, eos):
    """VerbMem ROUGE-L F1 (muse_bench `metrics/verbmem.py`) and ES / EM of the gt tokens."""
    logs = {}
    prompts = [r["prompt"] for r in rows]
    if "forget_verbmem_ROUGE" in needed:
        # muse_bench tokenises gt with add_special_tokens=True, so BOS counts in the 128.
        gts = [
            tokenizer.decode(
                tokenizer(r["gt"], add_special_tokens=True)["input_ids"][:max_new_tokens],
                skip_special_tokens=True,
            )
            for r in rows
        ]
        generations = generate_answers(
            model,
            tokenizer,
            prompts,
            "raw",
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            **common,
        )
        logs["forget_verbmem_ROUGE"] = report.rouge_result(
            M.rouge_scores(generations, gts, stemmer=stemmer),
            "rougeL_f1",
            inputs=prompts,
            ground_truths=gts,
            generations=generations,
        )
    if needed & {"extraction_strength", "exact_memorization"}:
        examples = [
            completion_example(tokenizer, r["prompt"], r["gt"], max(common["buckets"]))
            for r in rows
        ]
        arrays = score_examples(
            model, examples, stats=True, pad_id=pad_token_id(tokenizer), **common
        )
        if "extraction_strength" in needed:
            es = M.extraction_strength(arrays.argmax_match, arrays.mask)
            logs["extraction_strength"] = report.metric_result(es)
        if "exact_memorization" in needed:
            em = M.exact_memorisation(arrays.argmax_match, arrays.mask)
            logs["exact_memorization"] = report.metric_result(em)
    return logs


def completion_example(
    tokenizer: Any, prefix: str, text: str, max_length: int, *, insert_space: bool = True
) -> dict[str, np.ndarray]:
    """A prefix + completion item with labels on the completion only (no EOS).

    As open-unlearning's `preprocess_pretraining_instance` for MUSE VerbMem (`insert_space:
    True`): the prefix and the full text are tokenised separately with special tokens, labels
    are -100 over the prefix's tokens, and the result is cut at `max_length` tokens.

    Returns:
      {"input_ids": int32 [L], "labels": int32 [L]}.
    """
    full = tokenizer(prefix + (" " if insert_space else "") + text, add_special_tokens=True)
    prefix_len = max(1, len(tokenizer(prefix, add_special_tokens=True)["input_ids"]))
    ids = np.asarray(full["input_ids"][:max_length], dtype=np.int32)
    labels = ids.copy()
    labels[:prefix_len] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _privleak_mias(model, tokenizer, forget, holdout, needed, common, max_length, reference_model):
    """MIA entries on PrivLeak texts, forget (members) vs holdout, muse_bench token set."""
    items = [{"text": t} for t in (*forget, *holdout)]
    stats = "mia_min_k_plus_plus" in needed
    arrays = score_items(model, tokenizer, items, stats=stats, max_length=max_length, **common)
    n = len(forget)
    # muse_bench scores all tokens after BOS with no EOS appended: nothing is dropped.
    loss = np.asarray(mia.loss_score(arrays.logprob, arrays.mask, drop_last=False), np.float64)
    scores = {}
    if "mia_min_k" in needed:
        scores["mia_min_k"] = np.asarray(
            mia.min_k_score(arrays.logprob, arrays.mask, MIN_K, drop_last=False, at_least_one=False)
        )
    if "mia_loss" in needed:
        scores["mia_loss"] = loss
    if "mia_zlib" in needed:
        # muse_bench's PPL/zlib compresses the text itself.
        scores["mia_zlib"] = mia.zlib_score(loss, [*forget, *holdout])
    if stats:
        scores["mia_min_k_plus_plus"] = np.asarray(
            mia.min_k_plus_plus_score(
                arrays.logprob,
                arrays.entropy_mean,
                arrays.entropy_std,
                arrays.mask,
                MIN_K,
                drop_last=False,
            )
        )
    if "mia_reference" in needed:
        ref = score_items(reference_model, tokenizer, items, max_length=max_length, **common)
        ref_loss = mia.loss_score(ref.logprob, ref.mask, drop_last=False)
        scores["mia_reference"] = mia.reference_score(loss, ref_loss)
    return {name: report.mia_result(s[:n], s[n:]) for name, s in scores.items()}


def _reference_auc(corpus: str, retain_logs: Any, retrain_auc: float | None) -> tuple[float, str]:
    """The retrain model's Min-40% AUC in open-unlearning orientation, and where it came from."""
    if retain_logs is not None:
        value = report.load_eval_logs(retain_logs).get("mia_min_k", {}).get("agg_value")
        if value is None:
            raise ValueError(
                "retain logs have no 'mia_min_k' agg_value to use as the PrivLeak reference; "
                "evaluate the retrain model with metric mia_min_k (or privleak) first"
            )
        return float(value), "retain_logs mia_min_k"
    if retrain_auc is not None:
        return 1.0 - float(retrain_auc), "retrain_auc argument (MUSE orientation)"
    if corpus.lower() in mia.MUSE_AUC_RETRAIN:
        muse_auc = mia.MUSE_AUC_RETRAIN[corpus.lower()]
        return 1.0 - muse_auc, f"muse_bench AUC_RETRAIN[{corpus.lower()}] = {muse_auc:.4f}"
    return mia.PRIVLEAK_DEFAULT_RETAIN_AUC, "open-unlearning fallback 0.5"


__all__ = [
    "DEFAULT_MUSE_METRICS",
    "MUSE_METRICS",
    "completion_example",
    "evaluate_muse",
    "knowmem_prompt",
]
