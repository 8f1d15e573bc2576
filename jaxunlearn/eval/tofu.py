"""TOFU evaluation of a causal LM: open-unlearning's metric suite, per item and aggregated.

`evaluate_tofu` scores and generates with the model over the TOFU evaluation splits and
returns logs shaped like open-unlearning's `TOFU_EVAL.json` (commit d3d7cf9), so either side
can serve as the other's oracle. Splits (Hugging Face `locuslab/TOFU`, open-unlearning
`configs/eval/tofu_metrics/*.yaml`):

| logs prefix | split | "correct" answer for the truth ratio |
|---|---|---|
| forget_ | `forgetXX_perturbed` (question, answer, paraphrased, 5 perturbed) | paraphrased_answer |
| retain_ | `retain_perturbed` (400 rows) | paraphrased_answer |
| ra_ | `real_authors_perturbed` (3 perturbed) | answer |
| wf_ | `world_facts_perturbed` (3 perturbed) | answer |
| MIA non-members | `holdoutXX` | - |

Metric names, per-item layouts and aggregates are open-unlearning's; the formulas live in
`eval.metrics` / `eval.mia` (see their docstrings for the conventions matched). The entries a
metric is built from (`forget_Q_A_PARA_Prob`, `ra_Q_A_PERT_Prob`, `mia_min_k`, ...) are
written too, as open-unlearning's evaluator caches them into the same file.

Deliberate differences from open-unlearning:
  - ROUGE ground truth is the dataset's answer string; open-unlearning decodes the label
    tokens and strips the decoded prompt from them, which gives the same text up to
    tokenizer round-trip artefacts that ROUGE's tokeniser ignores.
  - Attention masks cover each item's real tokens; open-unlearning masks every token equal
    to pad = EOS (`data.pad_to_bucket` documents the `ou_eos_masking` switch).
  - Retain logs whose item ids differ from the evaluated items stop the run with the ids
    named (open-unlearning pairs them by position).

References:
  Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024, arXiv:2401.06121.
  Dorna et al., "OpenUnlearning: Accelerating LLM Unlearning via Unified Benchmarking of
  Methods and Metrics", 2025, arXiv:2506.12618.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxunlearn.data import (
    PromptFormat,
    bucket_length,
    load_tofu,
    pad_to_bucket,
    prompt_format,
    tofu_holdout_split,
    tofu_perturbed_split,
)
from jaxunlearn.eval import inference, mia, report
from jaxunlearn.eval import metrics as M
from jaxunlearn.eval.inference import (
    EVAL_BUCKETS,
    EvalResult,
    TokenArrays,
    generate_answers,
    make_result,
    pad_token_id,
    score_items,
    target_texts,
    tokenize_items,
)
from jaxunlearn.scores import token_scores

# Every top-level TOFU metric this runner computes, in open-unlearning's names.
TOFU_METRICS: tuple[str, ...] = (
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_Q_A_PARA_Prob",
    "forget_Q_A_PERT_Prob",
    "forget_truth_ratio",
    "forget_quality",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Q_A_PARA_Prob",
    "retain_Q_A_PERT_Prob",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob",
    "ra_Q_A_PERT_Prob",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob",
    "wf_Q_A_PERT_Prob",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
    "model_utility",
    "extraction_strength",
    "exact_memorization",
    "privleak",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "mia_gradnorm",
    "mia_reference",
)

# open-unlearning's default TOFU suite (configs/eval/tofu.yaml) plus the metrics it ships
# commented out, except the two that cost extra models or backward passes.
DEFAULT_TOFU_METRICS: tuple[str, ...] = (
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_truth_ratio",
    "forget_quality",
    *M.MODEL_UTILITY_KEYS,
    "model_utility",
    "extraction_strength",
    "exact_memorization",
    "privleak",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_plus_plus",
)

_MIA = (
    "privleak",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "mia_gradnorm",
    "mia_reference",
)

# metric -> the entries it is computed from (open-unlearning `pre_compute`).
_DEPENDS: dict[str, tuple[str, ...]] = {
    "forget_quality": ("forget_truth_ratio",),
    "forget_truth_ratio": ("forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob"),
    "retain_Truth_Ratio": ("retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob"),
    "model_utility": M.MODEL_UTILITY_KEYS,
    "privleak": ("mia_min_k",),
    **{f"{p}_Q_A_Prob_normalised": (f"{p}_Q_A_Prob", f"{p}_Q_A_PERT_Prob") for p in ("ra", "wf")},
    **{f"{p}_Truth_Ratio": (f"{p}_Q_A_Prob", f"{p}_Q_A_PERT_Prob") for p in ("ra", "wf")},
}

# prefix -> (split, key of the truth ratio's "correct" answer), open-unlearning
# `configs/eval/tofu_metrics/*_Truth_Ratio.yaml`.
_QA_SETS = {
    "retain": ("retain_perturbed", "paraphrased_answer"),
    "ra": ("real_authors_perturbed", "answer"),
    "wf": ("world_facts_perturbed", "answer"),
}
_TR_NAME = {
    "forget": "forget_truth_ratio",
    "retain": "retain_Truth_Ratio",
    "ra": "ra_Truth_Ratio",
    "wf": "wf_Truth_Ratio",
}
MIN_K = 0.4  # open-unlearning configs/eval/tofu_metrics/mia_min_k*.yaml `k`


def _closure(names: Sequence[str]) -> set[str]:
    needed, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(_DEPENDS.get(name, ()))
    return needed


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_chat_template(tokenizer: Any, fmt: PromptFormat) -> None:
    """Raises a ValueError naming the tokenizer if `fmt` needs a chat template it lacks."""
    if fmt.use_chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"prompt format '{fmt.name}' needs a chat template, but tokenizer "
            f"'{_tokenizer_name(tokenizer)}' has none; evaluate with the format the model was "
            "trained with ('llama2' or 'qa' for models without a template), or set "
            "tokenizer.chat_template"
        )


def _rows(split: str, data_dir: Any, limit: int | None, given: Mapping | None) -> list[dict]:
    if given is not None and split in given:
        rows = [dict(r) for r in given[split]]
    else:
        rows = load_tofu(split, data_dir=data_dir).to_list()
    rows = rows if limit is None else rows[:limit]
    if not rows:
        raise ValueError(f"TOFU split '{split}' has no items to evaluate")
    return rows


def _retain_provenance_check(logs: Mapping[str, Any], source: Any, expected: Mapping) -> None:
    """Refuses retain logs recorded for another benchmark, forget split, prompt format or
    item count (jaxunlearn's metadata; open-unlearning's logs carry none and pass)."""
    meta = logs.get(report.METADATA_KEY)
    if not isinstance(meta, Mapping):
        return
    recorded = {
        "benchmark": meta.get("benchmark"),
        "split": tofu_perturbed_split(meta["split"]) if meta.get("split") else None,
        "prompt_format": meta.get("prompt_format"),
        "forget items": (meta.get("n_items") or {}).get("forget"),
    }
    differ = [
        f"{key} {recorded[key]!r} (evaluating {value!r})"
        for key, value in expected.items()
        if recorded.get(key) is not None and recorded[key] != value
    ]
    if differ:
        raise ValueError(
            f"{source}: the retain logs were recorded with {'; '.join(differ)}, so forget "
            "quality and PrivLeak against them would compare different items; pass the retain "
            "model's TOFU_EVAL.json of this split, format and item count."
        )


def _retain_ids_check(
    retain_logs: Any, ids: Sequence[str], expected: Mapping[str, Any]
) -> dict[str, Any]:
    """Loads the retain model's logs and checks their provenance (`_retain_provenance_check`)
    and that they cover exactly the evaluated forget ids."""
    logs = report.load_eval_logs(retain_logs)
    source = retain_logs if isinstance(retain_logs, str | os.PathLike) else "retain logs"
    _retain_provenance_check(logs, source, expected)
    entry = logs.get("forget_truth_ratio")
    if not isinstance(entry, Mapping) or not isinstance(entry.get("value_by_index"), Mapping):
        raise ValueError(
            f"{source}: no 'forget_truth_ratio' entry with value_by_index, so forget quality "
            "cannot be computed; pass the TOFU_EVAL.json of the retain model on this forget split"
        )
    theirs, ours = set(map(str, entry["value_by_index"])), set(ids)
    if theirs != ours:
        missing = sorted(theirs - ours, key=lambda s: (len(s), s))
        extra = sorted(ours - theirs, key=lambda s: (len(s), s))
        raise ValueError(
            f"{source}: forget_truth_ratio item ids differ from the evaluated split "
            f"({len(ours)} evaluated, {len(theirs)} in the retain logs). In the retain logs but "
            f"not evaluated: {missing[:20]}{' ...' if len(missing) > 20 else ''}; evaluated but "
            f"not in the retain logs: {extra[:20]}{' ...' if len(extra) > 20 else ''}. Evaluate "
            "the same split without --limit, or drop the retain logs."
        )
    return logs


class _Blocks:
    """Items of several splits scored in one call, and the row span of each block."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.spans: dict[str, slice] = {}

    def add(self, name: str, items: list[dict]) -> None:
        self.spans[name] = slice(len(self.items), len(self.items) + len(items))
        self.items.extend(items)

    def take(self, arrays: TokenArrays, name: str, per_item: int = 1) -> TokenArrays:
        block = arrays.take(self.spans[name])
        return block if per_item == 1 else block.stack(per_item)


def _perturbed(rows: list[dict], split: str, key: str = "perturbed_answer") -> list[list[str]]:
    answers = [list(r[key]) for r in rows]
    counts = {len(a) for a in answers}
    if len(counts) != 1 or 0 in counts:
        bad = next(i for i, a in enumerate(answers) if len(a) != len(answers[0]) or not a)
        raise ValueError(
            f"TOFU split '{split}': every item needs the same number (>= 1) of '{key}' entries; "
            f"item 0 has {len(answers[0])}, item {bad} has {len(answers[bad])}"
        )
    return answers


def _loss(arrays: TokenArrays) -> np.ndarray:
    return np.asarray(M.length_normalised_loss(arrays.logprob, arrays.mask), np.float64)


def evaluate_tofu(
    model: nnx.Module,
    tokenizer: Any,
    *,
    forget_split: str = "forget10",
    data_dir: str | os.PathLike | None = None,
    fmt: str | PromptFormat = "chat",
    retain_logs: str | os.PathLike | Mapping[str, Any] | None = None,
    max_new_tokens: int = 200,
    batch_size: int = 32,
    limit: int | None = None,
    holdout: bool = True,
    metrics: Sequence[str] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    buckets: Sequence[int] = EVAL_BUCKETS,
    eos_token_id: int | Sequence[int] | None = None,
    reference_model: nnx.Module | None = None,
    model_path: str | None = None,
    rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    ou_eos_masking: bool = False,
    packed: bool = True,
) -> EvalResult:
    """Evaluates a model on TOFU with open-unlearning's metrics (TOFU paper, arXiv 2401.06121).

    Args:
      model: the jaxunlearn causal LM to evaluate.
      tokenizer: its Hugging Face tokenizer (with a chat template for fmt="chat").
      forget_split: forget01, forget05 or forget10 (the `_perturbed` suffix is optional).
      data_dir: folder of TOFU `<split>.json` files; default the packaged copy.
      fmt: the prompt format the model was fine-tuned and unlearned with; recorded in the
        metadata and in every generation prompt.
      retain_logs: the retain (oracle) model's `TOFU_EVAL.json` on the same forget split:
        `forget_truth_ratio` gives forget quality, `mia_min_k` the PrivLeak reference.
        Without it forget quality is None and PrivLeak uses the reference AUC 0.5.
      max_new_tokens: greedy generation budget for the ROUGE metrics (open-unlearning: 200).
      batch_size: rows per forward pass / generation call.
      limit: evaluate only the first `limit` items of each split (quick runs, tests); forget
        quality then needs retain logs over the same items.
      holdout: compute the MIA metrics and PrivLeak (forget vs `holdoutXX`).
      metrics: top-level metrics (names in `TOFU_METRICS`); default `DEFAULT_TOFU_METRICS`
        (without the MIA ones when `holdout` is False). "mia_reference" needs
        `reference_model`; "mia_gradnorm" runs one backward pass per item.
      mesh: shard batches over this mesh (load the model onto it with
        `checkpoints.load_pretrained(..., mesh=mesh)`).
      buckets: padded sequence lengths (one compile per bucket used).
      eos_token_id: id(s) that stop generation (default: the tokenizer's EOS).
      reference_model: model for the Reference attack (open-unlearning: the retain model).
      model_path: recorded in the metadata.
      rows: evaluation rows in memory, {TOFU split name: rows} (e.g. "forget10_perturbed",
        "retain_perturbed", "holdout10"); splits not given are loaded from `data_dir`.
      ou_eos_masking: open-unlearning's attention mask (input_ids != pad): with pad = EOS it
        also hides EOS-valued tokens inside prompts (Llama-3's ``<|eot_id|>``); see
        `inference.score_examples`. Off by default; recorded in the metadata.
      packed: teacher-forced scoring with `inference.score_packed`: each question's prompt,
        and every answer beginning its answer, paraphrase and perturbed answers share, is
        encoded once, and rows are packed without padding into one shape. False scores
        each (question, answer) on its own (`inference.score_examples`); the numbers agree
        to float rounding. It also left-pads
        all generation prompts to one length (`inference.generate_tokens(one_length=True)`):
        one compilation for the ROUGE generations.

    Returns:
      `EvalResult(logs, summary, metadata)`; `result.write(out_dir, "TOFU")` writes the
      open-unlearning files.

    Raises:
      ValueError: unknown metric, empty split, `limit` < 1, a chat format without a chat
        template (names the tokenizer), retain logs whose item ids differ from the evaluated
        forget items (names the ids), or "mia_reference" without a reference model.
    """
    fmt = prompt_format(fmt)
    check_chat_template(tokenizer, fmt)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all items), got {limit}")
    requested, needed = _select(metrics, holdout, reference_model)
    forget_name = tofu_perturbed_split(forget_split)
    data = _load_splits(forget_split, needed, data_dir, limit, rows)
    ids = {name: [str(i) for i in range(len(split_rows))] for name, split_rows in data.items()}
    oracle = None
    if retain_logs is not None:
        # Checked before any model work: a mismatch found after an hour of generation helps no one.
        expected = {
            "benchmark": "TOFU",
            "split": forget_name,
            "prompt_format": fmt.name,
            "forget items": len(data["forget"]),
        }
        oracle = _load_oracle(retain_logs, ids["forget"], expected, "forget_quality" in needed)

    common = dict(batch_size=batch_size, buckets=buckets, mesh=mesh, ou_eos_masking=ou_eos_masking)
    scored = _score_blocks(model, tokenizer, fmt, data, needed, common, forget_name, packed)
    logs: dict[str, Any] = {}
    with inference.phase("metrics"):
        for prefix in ("forget", *_QA_SETS):
            if f"{prefix}/perturbed" in scored:
                logs.update(_qa_entries(prefix, ids[prefix], scored))
    logs.update(
        _generation_metrics(
            model,
            tokenizer,
            fmt,
            data,
            ids,
            needed,
            common,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            one_length=packed,
        )
    )
    with inference.phase("metrics"):
        if "model_utility" in needed:
            values = {k: logs[k]["agg_value"] for k in M.MODEL_UTILITY_KEYS}
            logs["model_utility"] = {"agg_value": M.model_utility(values)}
        if "forget_quality" in needed:
            fq = None if oracle is None else report.forget_quality_from_logs(logs, oracle)
            logs["forget_quality"] = {"agg_value": fq}
        logs.update(_memorisation_entries(scored, ids, needed))
        privleak_ref = None
        if needed & set(_MIA):
            mia_logs, privleak_ref = _mia_entries(
                model, tokenizer, fmt, data, ids, needed, common, scored, oracle, reference_model
            )
            logs.update(mia_logs)
    metadata = report.eval_metadata(
        benchmark="TOFU",
        model_path=model_path or "",
        split=forget_split,
        n_items={name: len(split_rows) for name, split_rows in data.items()},
        prompt_format=fmt.name,
        prompt_format_spec=fmt.to_dict(),
        max_new_tokens=max_new_tokens,
        limit=limit,
        retain_logs=None
        if retain_logs is None or isinstance(retain_logs, Mapping)
        else str(retain_logs),
        privleak_reference_auc=privleak_ref,
        ks_n=len(data["forget"]),
        batch_size=batch_size,
        metrics=requested,
        ou_eos_masking=ou_eos_masking,
    )
    return make_result({k: v for k, v in logs.items() if k in needed}, requested, metadata)


def check_retain_logs(
    retain_logs: str | os.PathLike | Mapping[str, Any],
    *,
    forget_split: str = "forget10",
    fmt: str | PromptFormat = "chat",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    metrics: Sequence[str] | None = None,
    holdout: bool = True,
    reference_model: Any = None,
) -> None:
    """The checks `evaluate_tofu` makes on retain logs (benchmark, split, prompt format, item
    count and ids), without a model: a command line can run them before loading any weights.

    Raises:
      ValueError: the logs belong to another benchmark, split, format or item set.
    """
    _, needed = _select(metrics, holdout, reference_model)
    forget_rows = _rows(tofu_perturbed_split(forget_split), data_dir, limit, rows)
    expected = {
        "benchmark": "TOFU",
        "split": tofu_perturbed_split(forget_split),
        "prompt_format": prompt_format(fmt).name,
        "forget items": len(forget_rows),
    }
    ids = [str(i) for i in range(len(forget_rows))]
    _load_oracle(retain_logs, ids, expected, "forget_quality" in needed)


def _load_splits(forget_split, needed, data_dir, limit, rows) -> dict[str, list[dict]]:
    """The rows of every split the needed metrics read, keyed forget / retain / ... / holdout."""
    data = {"forget": _rows(tofu_perturbed_split(forget_split), data_dir, limit, rows)}
    for prefix, (split, _) in _QA_SETS.items():
        if any(n.startswith(prefix + "_") for n in needed):
            data[prefix] = _rows(split, data_dir, limit, rows)
    if needed & set(_MIA):
        data["holdout"] = _rows(tofu_holdout_split(forget_split), data_dir, limit, rows)
    return data


def _load_oracle(retain_logs, forget_ids, expected, item_ids: bool) -> dict[str, Any]:
    """The retain model's logs, checked for provenance (and for the forget ids when forget
    quality is computed from them)."""
    if item_ids:
        return _retain_ids_check(retain_logs, forget_ids, expected)
    oracle = report.load_eval_logs(retain_logs)
    _retain_provenance_check(oracle, retain_logs, expected)
    return oracle


def _select(metrics, holdout: bool, reference_model) -> tuple[list[str], set[str]]:
    """(requested top-level metrics, everything they are computed from), checked."""
    if metrics is None:
        requested = [m for m in DEFAULT_TOFU_METRICS if holdout or m not in _MIA]
    else:
        requested = list(metrics)
    unknown = sorted(set(requested) - set(TOFU_METRICS))
    if unknown:
        raise ValueError(f"unknown TOFU metric(s) {unknown}; choose from {list(TOFU_METRICS)}")
    needed = _closure(requested)
    if not holdout and needed & set(_MIA):
        raise ValueError(f"metrics {sorted(needed & set(_MIA))} need holdout=True")
    if "mia_reference" in needed and reference_model is None:
        raise ValueError("metric 'mia_reference' needs reference_model (e.g. the retain model)")
    return requested, needed


def _qa(rows: list[dict], key: str = "answer") -> list[dict]:
    return [{"question": r["question"], "answer": r[key]} for r in rows]


def _score_blocks(
    model, tokenizer, fmt, data, needed, common, forget_name: str, packed: bool
) -> dict[str, TokenArrays]:
    """Scores every answer the needed metrics use in one batched call (the timing phase
    ``score/all``); returns block name -> arrays, perturbed [N, K, L].

    One call for all splits lets `inference.score_packed` share each question's prompt (and
    shared answer beginnings) among its answer, paraphrase and perturbed answers and fill
    its packed rows across splits: on TOFU's five splits a per-split call left about a
    third of the row slots as padding (each split's last, partly filled batch), one call
    about 4%. The forget blocks carry the entropy and argmax statistics when a memorisation
    or MIA metric needs them; the holdout answers always do. Only those items pay for the
    statistics (packed scoring computes them per label); the other blocks drop the zeroed
    fields.
    """
    stats_for_forget = bool(needed & {"extraction_strength", "exact_memorization", *_MIA})
    sets = {"forget": (forget_name, "paraphrased_answer"), **_QA_SETS}
    blocks, per_item, with_stats = _Blocks(), {}, set()
    for prefix, (split, correct_key) in sets.items():
        # ROUGE needs generations only; every other metric of a split needs its scores.
        if prefix not in data or not any(
            n.startswith(prefix + "_") and not n.endswith("_ROUGE") for n in needed
        ):
            continue
        rows = data[prefix]
        blocks.add(f"{prefix}/answer", _qa(rows))
        if correct_key != "answer":
            blocks.add(f"{prefix}/correct", _qa(rows, correct_key))
        perturbed = _perturbed(rows, split)
        name = f"{prefix}/perturbed"
        blocks.add(
            name,
            [
                {"question": r["question"], "answer": a}
                for r, ans in zip(rows, perturbed)
                for a in ans
            ],
        )
        per_item[name] = len(perturbed[0])
        if prefix == "forget" and stats_for_forget:
            with_stats |= {n for n in blocks.spans if n.startswith("forget/")}
    if stats_for_forget and "forget/answer" not in blocks.spans:
        blocks.add("forget/answer", _qa(data["forget"]))
        with_stats.add("forget/answer")
    if "holdout" in data:
        blocks.add("holdout/answer", _qa(data["holdout"]))
        with_stats.add("holdout/answer")
    if not blocks.items:
        return {}
    wanted = np.zeros(len(blocks.items), bool)
    for name in with_stats:
        wanted[blocks.spans[name]] = True
    with inference.phase("score/all"):
        arrays = score_items(
            model, tokenizer, blocks.items, fmt, stats=wanted.tolist(), packed=packed, **common
        )
    out = {}
    for name in blocks.spans:
        block = blocks.take(arrays, name, per_item.get(name, 1))
        if name not in with_stats:  # as a per-split call without statistics returned it
            block = block._replace(entropy_mean=None, entropy_std=None, argmax_match=None)
        out[name] = block
    return out


def _qa_entries(prefix: str, ids: list[str], scored: dict[str, TokenArrays]) -> dict[str, Any]:
    """open-unlearning's probability / truth-ratio entries of one split."""
    answer = _loss(scored[f"{prefix}/answer"])
    pert = _loss(scored[f"{prefix}/perturbed"])
    correct = _loss(scored[f"{prefix}/correct"]) if f"{prefix}/correct" in scored else answer
    logs = {
        f"{prefix}_Q_A_Prob": report.probability_result(answer, ids=ids),
        f"{prefix}_Q_A_PERT_Prob": report.probability_result(pert, ids=ids),
    }
    if prefix in ("forget", "retain"):
        logs[f"{prefix}_Q_A_PARA_Prob"] = report.probability_result(correct, ids=ids)
    aggregator = "closer_to_1_better" if prefix == "forget" else "true_better"
    ratios = M.truth_ratio(correct, pert)
    logs[_TR_NAME[prefix]] = report.truth_ratio_result(ratios, aggregator, ids=ids)
    if prefix in ("ra", "wf"):
        normalised = M.option_normalised_prob(np.exp(-answer), np.exp(-pert))
        logs[f"{prefix}_Q_A_Prob_normalised"] = report.metric_result(
            normalised, ids=ids, key="prob"
        )
    return logs


def _generation_metrics(
    model, tokenizer, fmt, data, ids, needed, common, *, max_new_tokens, eos_token_id, one_length
) -> dict[str, Any]:
    """ROUGE-L recall of greedy answers on every split whose ROUGE metric is needed."""
    prefixes = [p for p in ("forget", *_QA_SETS) if f"{p}_Q_A_ROUGE" in needed]
    if not prefixes:
        return {}
    questions = [r["question"] for p in prefixes for r in data[p]]
    answers = [r["answer"] for p in prefixes for r in data[p]]
    generations = generate_answers(
        model,
        tokenizer,
        questions,
        fmt,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        one_length=one_length,
        **common,
    )
    with inference.phase("metrics"):
        return _rouge_entries(prefixes, data, ids, questions, answers, generations)


def _rouge_entries(prefixes, data, ids, questions, answers, generations) -> dict[str, Any]:
    logs, start = {}, 0
    for prefix in prefixes:
        stop = start + len(data[prefix])
        gens, gts, qs = generations[start:stop], answers[start:stop], questions[start:stop]
        logs[f"{prefix}_Q_A_ROUGE"] = report.rouge_result(
            M.rouge_scores(gens, gts),
            "rougeL_recall",
            ids=ids[prefix],
            inputs=qs,
            ground_truths=gts,
            generations=gens,
        )
        start = stop
    return logs


def _memorisation_entries(scored, ids, needed) -> dict[str, Any]:
    """Extraction strength and exact memorisation of the forget answers.

    open-unlearning `memorization.py::extraction_strength`, `exact_memorization`.
    """
    logs = {}
    forget = scored.get("forget/answer")
    if "extraction_strength" in needed:
        es = M.extraction_strength(forget.argmax_match, forget.mask)
        logs["extraction_strength"] = report.metric_result(es, ids=ids["forget"])
    if "exact_memorization" in needed:
        em = M.exact_memorisation(forget.argmax_match, forget.mask)
        logs["exact_memorization"] = report.metric_result(em, ids=ids["forget"])
    return logs


def _mia_entries(
    model, tokenizer, fmt, data, ids, needed, common, scored, oracle, reference_model
) -> tuple[dict[str, Any], float]:
    """MIA AUCs on forget vs holdout answers and PrivLeak (open-unlearning `privacy.py::privleak`).

    Returns:
      (logs, the retain-model AUC PrivLeak was computed against).
    """
    f, h = scored["forget/answer"], scored["holdout/answer"]
    f_loss, h_loss = mia.loss_score(f.logprob, f.mask), mia.loss_score(h.logprob, h.mask)
    scores = {}
    if "mia_loss" in needed:
        scores["mia_loss"] = (f_loss, h_loss)
    if "mia_zlib" in needed:
        scores["mia_zlib"] = (
            mia.zlib_score(f_loss, target_texts(tokenizer, f)),
            mia.zlib_score(h_loss, target_texts(tokenizer, h)),
        )
    if "mia_min_k" in needed:
        scores["mia_min_k"] = tuple(mia.min_k_score(a.logprob, a.mask, MIN_K) for a in (f, h))
    if "mia_min_k_plus_plus" in needed:
        scores["mia_min_k_plus_plus"] = tuple(
            mia.min_k_plus_plus_score(a.logprob, a.entropy_mean, a.entropy_std, a.mask, MIN_K)
            for a in (f, h)
        )
    items = _qa(data["forget"]) + _qa(data["holdout"])
    n_forget = len(data["forget"])
    if "mia_reference" in needed:
        ref = score_items(reference_model, tokenizer, items, fmt, **common)
        ref_loss = np.asarray(mia.loss_score(ref.logprob, ref.mask))
        scores["mia_reference"] = (
            mia.reference_score(f_loss, ref_loss[:n_forget]),
            mia.reference_score(h_loss, ref_loss[n_forget:]),
        )
    if "mia_gradnorm" in needed:
        examples = tokenize_items(tokenizer, items, fmt, max_length=max(common["buckets"]))
        norms = _gradnorm(model, examples, common["buckets"], pad_token_id(tokenizer))
        scores["mia_gradnorm"] = (norms[:n_forget], norms[n_forget:])
    logs = {
        name: report.mia_result(fs, hs, forget_ids=ids["forget"], holdout_ids=ids["holdout"])
        for name, (fs, hs) in scores.items()
    }
    reference = None if oracle is None else oracle.get("mia_min_k", {}).get("agg_value")
    if reference is None:
        reference = mia.PRIVLEAK_DEFAULT_RETAIN_AUC  # open-unlearning privleak.yaml ref_value
    if "privleak" in needed:
        logs["privleak"] = {"agg_value": mia.privleak(logs["mia_min_k"]["agg_value"], reference)}
    return logs, float(reference)


def _gradnorm(model, examples: list[dict], buckets: Sequence[int], pad_id: int) -> np.ndarray:
    """GradNorm scores at batch size 1 (open-unlearning `gradnorm.py`), one compile per bucket."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, example):
        out = nnx.merge(graphdef, p, rest)(
            example["input_ids"], example["attention_mask"], return_logits=False
        )
        ts = token_scores(out.head, example["labels"])
        return mia.loss_score(ts.logprob, ts.mask, drop_last=True)[0]

    padded = [
        pad_to_bucket([e], (bucket_length(len(e["input_ids"]), buckets),), pad_id=pad_id)
        for e in examples
    ]
    return mia.gradnorm_scores(loss_fn, params, padded, p=2)


__all__ = [
    "DEFAULT_TOFU_METRICS",
    "TOFU_METRICS",
    "check_chat_template",
    "check_retain_logs",
    "evaluate_tofu",
]
