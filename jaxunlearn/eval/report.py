"""Evaluation logs in open-unlearning's JSON layout: per-item values, summaries, oracle lookups.

Files written by `write_eval_logs(logs, out_dir, name)` (name e.g. "TOFU" or "MUSE"):

- `{name}_EVAL.json`: `{metric: {"agg_value": float | None, "value_by_index": {"<id>": {...}}}}`,
  the layout of open-unlearning's `Evaluator.save_logs` (keys sorted, indent 4), so either
  side can read the other's logs as an oracle. What each metric keeps per item, as in
  open-unlearning (commit d3d7cf9):

  | metric kind | per-item dict |
  |---|---|
  | truth ratio, extraction strength, exact memorisation | `{"score": R}` |
  | probability | `{"prob": Pbar, "avg_loss": Lbar}`; lists over answers for perturbed sets |
  | normalised probability | `{"prob": p}` |
  | ROUGE | `{"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}` |
  | MIA (`mia_*`) | top level `{"forget": {agg_value, value_by_index: {"score"}}, "holdout": {...}, "auc", "agg_value"}` |
  | forget_quality, model_utility, privleak | `{"agg_value"}` only |

  Ids are the dataset row indices as strings (open-unlearning's int keys after `json.dump`).
  Non-finite values (an item with no answer tokens) are written as null, open-unlearning's None.
- `{name}_SUMMARY.json`: `{metric: agg_value}` for every metric with a non-null aggregate.
- `{name}_SUMMARY.md`: the same as a Markdown table, under a provenance header.

Provenance (prompt format, model path, split, item count, jaxunlearn version, ...) is stored
in `{name}_EVAL.json` under the top-level key `"_jaxunlearn"` (`METADATA_KEY`). It has no
`agg_value`: open-unlearning reads only the metric names its config lists (`summarize` and
`reference_logs.include`), so the extra key is ignored there. The SUMMARY JSON holds metrics
only, so scripts that read every value as a number keep working.

All files are written atomically: a temporary file in the same folder, fsync, `os.replace`.
"""

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from jaxunlearn._io import atomic_write_text, jsonable
from jaxunlearn.eval.metrics import (
    forget_quality,
    truth_ratio_closer_to_1,
    truth_ratio_true_better,
)
from jaxunlearn.eval.mia import mia_auc, privleak

METADATA_KEY = "_jaxunlearn"

_TRUTH_RATIO_AGGREGATORS = {
    "closer_to_1_better": truth_ratio_closer_to_1,
    "true_better": truth_ratio_true_better,
}

Logs = dict[str, Any]


# ----------------------------------------------------------------------------- JSON values


def _ids(n: int, ids: Sequence[Any] | None) -> list[str]:
    if ids is None:
        return [str(i) for i in range(n)]
    out = [str(i) for i in ids]
    if len(out) != n:
        raise ValueError(f"got {len(out)} ids for {n} values.")
    if len(set(out)) != n:
        raise ValueError("ids must be unique.")
    return out


def _finite_mean(values: Any) -> float | None:
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)] if x.ndim == 1 else x[np.isfinite(x).all(axis=tuple(range(1, x.ndim)))]
    return float(np.mean(x)) if x.size else None


# ----------------------------------------------------------------------------- metric entries


def metric_result(
    values: Any,
    agg_value: float | None = None,
    *,
    ids: Sequence[Any] | None = None,
    key: str = "score",
    extra: Mapping[str, Sequence[Any]] | None = None,
) -> Logs:
    """One metric in open-unlearning's layout: `{"agg_value", "value_by_index"}`.

    Args:
      values: [N] per-item values, or [N, K] (stored as a list per item, as open-unlearning
        does for multi-answer sets).
      agg_value: the aggregate; by default the mean over items with finite values
        (open-unlearning's mean over non-None items).
      ids: item ids (dataset row indices); 0..N-1 by default.
      key: name of the value in each per-item dict ("score" for TR / ES / EM / MIA).
      extra: more per-item fields, name -> N values (e.g. "generation").

    Returns:
      A JSON-ready dict.
    """
    arr = np.asarray(values, dtype=np.float64)
    names = _ids(arr.shape[0], ids)
    extra = dict(extra or {})
    for field, column in extra.items():
        if len(column) != len(names):
            raise ValueError(
                f"extra field {field!r} has {len(column)} values for {len(names)} ids."
            )
    by_index = {}
    for i, name in enumerate(names):
        by_index[name] = {key: arr[i], **{field: column[i] for field, column in extra.items()}}
    agg = _finite_mean(arr) if agg_value is None else agg_value
    return jsonable({"agg_value": agg, "value_by_index": by_index})


def probability_result(avg_loss: Any, *, ids: Sequence[Any] | None = None) -> Logs:
    """open-unlearning `probability` entry from Lbar values: per item `{"prob", "avg_loss"}`.

    Args:
      avg_loss: [N] Lbar per item, or [N, K] for K answers per item (perturbed sets).
      ids: item ids.

    Returns:
      The entry; agg_value is the mean Pbar (over answers too for [N, K], as open-unlearning's
      `aggregate_to_1D` on "prob").
    """
    loss = np.asarray(avg_loss, dtype=np.float64)
    prob = np.exp(-loss)
    names = _ids(loss.shape[0], ids)
    by_index = {n: {"prob": prob[i], "avg_loss": loss[i]} for i, n in enumerate(names)}
    return jsonable({"agg_value": _finite_mean(prob), "value_by_index": by_index})


def truth_ratio_result(
    ratios: Any,
    aggregator: str = "closer_to_1_better",
    *,
    ids: Sequence[Any] | None = None,
) -> Logs:
    """open-unlearning `truth_ratio` entry: per item `{"score": R}`.

    As open-unlearning `memorization.py::truth_ratio`.

    Args:
      ratios: [N] truth ratios (`metrics.truth_ratio`).
      aggregator: "closer_to_1_better" (forget) or "true_better" (retain, real authors,
        world facts).
      ids: item ids.
    """
    fn = _TRUTH_RATIO_AGGREGATORS.get(aggregator)
    if fn is None:
        raise ValueError(
            f"aggregator must be one of {list(_TRUTH_RATIO_AGGREGATORS)}, got {aggregator!r}."
        )
    r = np.asarray(ratios, dtype=np.float64)
    finite = r[np.isfinite(r)]
    return metric_result(r, fn(finite) if finite.size else None, ids=ids)


def rouge_result(
    scores: Sequence[Mapping[str, float]],
    rouge_type: str = "rougeL_recall",
    *,
    ids: Sequence[Any] | None = None,
    inputs: Sequence[str] | None = None,
    ground_truths: Sequence[str] | None = None,
    generations: Sequence[str] | None = None,
) -> Logs:
    """open-unlearning `rouge` entry from `metrics.rouge_scores` output.

    Args:
      scores: per-item dicts with `rouge1_recall`, `rougeL_f1`, `rougeL_recall`.
      rouge_type: which one is aggregated ("rougeL_recall" TOFU, "rougeL_f1" MUSE).
      ids: item ids.
      inputs, ground_truths, generations: texts stored beside the scores, as open-unlearning
        does.
    """
    names = _ids(len(scores), ids)
    texts = {"input": inputs, "ground_truth": ground_truths, "generation": generations}
    by_index = {}
    for i, name in enumerate(names):
        entry = dict(scores[i])
        if rouge_type not in entry:
            raise ValueError(f"rouge score of item {name} has no {rouge_type!r}: {sorted(entry)}.")
        for field, column in texts.items():
            if column is not None:
                entry[field] = column[i]
        by_index[name] = entry
    agg = _finite_mean([s[rouge_type] for s in scores])
    return jsonable({"agg_value": agg, "value_by_index": by_index})


def mia_result(
    forget_scores: Any,
    holdout_scores: Any,
    *,
    forget_ids: Sequence[Any] | None = None,
    holdout_ids: Sequence[Any] | None = None,
) -> Logs:
    """open-unlearning `mia_*` entry: both sides' scores plus `auc` = `agg_value` (s.4).

    Args:
      forget_scores: [N_f] loss-oriented MIA scores on the forget set.
      holdout_scores: [N_h] scores on the holdout set.
      forget_ids, holdout_ids: item ids of each side.
    """
    auc = mia_auc(forget_scores, holdout_scores)
    return jsonable(
        {
            "forget": metric_result(forget_scores, ids=forget_ids),
            "holdout": metric_result(holdout_scores, ids=holdout_ids),
            "auc": auc,
            "agg_value": auc,
        }
    )


# ----------------------------------------------------------------------------- summaries


def eval_metadata(
    *,
    benchmark: str,
    model_path: str,
    split: str,
    n_items: int | Mapping[str, int],
    prompt_format: str,
    **extra: Any,
) -> dict[str, Any]:
    """Provenance record stored under `METADATA_KEY` in `*_EVAL.json`.

    Args:
      benchmark: "TOFU", "MUSE-News", ...
      model_path: checkpoint directory or hub id that was evaluated.
      split: forget split name (e.g. "forget10").
      n_items: item count, or a dict of counts per evaluated split.
      prompt_format: template name or the template itself (e.g. "llama2-chat").
      **extra: anything else worth keeping (seed, dtype, retain_logs_path, ...).
    """
    from jaxunlearn import __version__

    return jsonable(
        {
            "benchmark": benchmark,
            "model_path": str(model_path),
            "split": split,
            "n_items": n_items,
            "prompt_format": prompt_format,
            "jaxunlearn_version": __version__,
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            **extra,
        }
    )


def summarize(logs: Mapping[str, Any], metrics: Iterable[str] | None = None) -> dict[str, float]:
    """`{metric: agg_value}` for metrics with a non-null aggregate (open-unlearning SUMMARY).

    Args:
      logs: EVAL logs.
      metrics: restrict to these names (open-unlearning lists only its suite's top-level
        metrics); by default every entry except `METADATA_KEY`.
    """
    names = sorted(logs) if metrics is None else list(metrics)
    out = {}
    for name in names:
        entry = logs.get(name)
        if name == METADATA_KEY or not isinstance(entry, Mapping):
            continue
        agg = entry.get("agg_value")
        if agg is not None:
            out[name] = agg
    return jsonable(out)


def summary_markdown(
    summary: Mapping[str, float],
    metadata: Mapping[str, Any] | None = None,
    title: str = "Evaluation summary",
) -> str:
    """A short Markdown report: provenance bullet list and a metric | value table."""
    lines = [f"# {title}", ""]
    for k, v in (metadata or {}).items():
        lines.append(f"- {k}: `{v}`")
    if metadata:
        lines.append("")
    lines += ["| metric | value |", "|---|---|"]
    for name in sorted(summary):
        v = summary[name]
        lines.append(
            f"| {name} | {v:.4g} |" if isinstance(v, (int, float)) else f"| {name} | {v} |"
        )
    return "\n".join(lines) + "\n"


def write_eval_logs(
    logs: Mapping[str, Any],
    out_dir: str | os.PathLike,
    name: str = "TOFU",
    *,
    metadata: Mapping[str, Any] | None = None,
    summary_metrics: Iterable[str] | None = None,
) -> dict[str, Path]:
    """Writes `{name}_EVAL.json`, `{name}_SUMMARY.json` and `{name}_SUMMARY.md` atomically.

    Args:
      logs: metric name -> entry (see the module docstring for the layout).
      out_dir: folder, created if needed.
      name: file prefix; open-unlearning uses the evaluator name ("TOFU", "MUSE").
      metadata: provenance (`eval_metadata`), stored under `METADATA_KEY`; replaces any
        metadata already in `logs`.
      summary_metrics: metrics for the summaries (default: all with an aggregate).

    Returns:
      {"eval": path, "summary": path, "markdown": path}.
    """
    if not isinstance(logs, Mapping):
        raise TypeError(
            f"logs must be a mapping of metric name -> entry, got {type(logs).__name__}."
        )
    full = jsonable(dict(logs))
    if metadata is not None:
        full[METADATA_KEY] = jsonable(dict(metadata))
    full = dict(sorted(full.items()))
    summary = summarize(full, summary_metrics)
    out = Path(out_dir)
    paths = {
        "eval": out / f"{name}_EVAL.json",
        "summary": out / f"{name}_SUMMARY.json",
        "markdown": out / f"{name}_SUMMARY.md",
    }
    # allow_nan=False: a NaN that slipped past jsonable would make non-standard JSON.
    atomic_write_text(paths["eval"], json.dumps(full, indent=4, allow_nan=False))
    atomic_write_text(paths["summary"], json.dumps(summary, indent=4, allow_nan=False))
    atomic_write_text(
        paths["markdown"], summary_markdown(summary, full.get(METADATA_KEY), f"{name} evaluation")
    )
    return paths


# ----------------------------------------------------------------------------- reading logs


def load_eval_logs(path: str | os.PathLike | Mapping[str, Any]) -> Logs:
    """Reads open-unlearning or jaxunlearn EVAL logs.

    Args:
      path: a `*_EVAL.json` file, a folder holding exactly one, or an already-loaded dict
        (returned as is).

    Returns:
      The logs dict (metric name -> entry; `METADATA_KEY` when written by jaxunlearn).
    """
    if isinstance(path, Mapping):
        return dict(path)
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*_EVAL.json"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{p} holds {len(found)} *_EVAL.json files ({[f.name for f in found]}); "
                "pass the file itself."
            )
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"eval logs {p} do not exist.")
    with open(p, encoding="utf-8") as f:
        try:
            logs = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(logs, dict):
        raise ValueError(
            f"{p} must hold a JSON object of metric -> entry, got {type(logs).__name__}."
        )
    return logs


def _scores_by_id(logs: Logs, key: str, field: str, source: str) -> dict[str, float]:
    entry = logs.get(key)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("value_by_index"), Mapping):
        raise KeyError(
            f"{source} has no {key!r} entry with value_by_index (has: {sorted(logs)[:20]}). "
            f"Evaluate {key} on that model first."
        )
    out, missing = {}, []
    for item_id, item in entry["value_by_index"].items():
        value = item.get(field) if isinstance(item, Mapping) else None
        if value is None or not math.isfinite(float(value)):
            missing.append(str(item_id))
        else:
            out[str(item_id)] = float(value)
    if missing:
        raise ValueError(
            f"{source} {key}: items {missing[:20]} have no finite {field!r} "
            f"({len(missing)} in all); fix their tokenisation or drop them from both models."
        )
    return out


def _id_order(ids: Iterable[str]) -> list[str]:
    ids = list(ids)
    return sorted(ids, key=int) if all(i.lstrip("-").isdigit() for i in ids) else sorted(ids)


def forget_quality_from_logs(
    ours: str | os.PathLike | Mapping[str, Any],
    retain_logs: str | os.PathLike | Mapping[str, Any],
    *,
    key: str = "forget_truth_ratio",
    field: str = "score",
) -> float:
    """Forget quality of our logs against a retain model's logs.

    As open-unlearning `privacy.py::ks_test`.

    Reads `key.value_by_index[*][field]` from both (open-unlearning's `forget_quality` reads
    the retain model's `forget_truth_ratio`), requires the same item ids on both sides, and
    returns the KS p-value (`metrics.forget_quality`).

    Args:
      ours: logs of the evaluated model (dict, file or folder).
      retain_logs: logs of the retain model on the same forget split, e.g. open-unlearning's
        `TOFU_EVAL.json` from HF `open-unlearning/eval`.
      key: the per-item truth-ratio entry.
      field: the per-item value name.

    Raises:
      ValueError: the id sets differ (names the ids missing from and extra in our logs), or
        an item has no finite value.
    """
    a = _scores_by_id(load_eval_logs(ours), key, field, "our logs")
    b = _scores_by_id(load_eval_logs(retain_logs), key, field, "retain logs")
    if a.keys() != b.keys():
        missing = _id_order(b.keys() - a.keys())
        extra = _id_order(a.keys() - b.keys())
        raise ValueError(
            f"{key}: item ids differ from the retain logs ({len(a)} ours vs {len(b)} retain). "
            f"Missing from ours: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"extra in ours: {extra[:20]}{' ...' if len(extra) > 20 else ''}. Evaluate the same "
            "forget split (all items) as the retain model."
        )
    order = _id_order(a)
    return forget_quality([a[i] for i in order], [b[i] for i in order])


def privleak_from_logs(
    ours: str | os.PathLike | Mapping[str, Any],
    retain_logs: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    key: str = "mia_min_k",
) -> float:
    """PrivLeak from our `mia_min_k` AUC and the retain model's.

    As open-unlearning `privacy.py::privleak`.

    Without retain logs (or without `key` in them) open-unlearning's fallback retain AUC 0.5
    is used, as its `privleak` metric does.
    """
    auc = load_eval_logs(ours).get(key, {}).get("agg_value")
    if auc is None:
        raise KeyError(f"our logs have no {key!r} agg_value; evaluate {key} first.")
    ref = None
    if retain_logs is not None:
        ref = load_eval_logs(retain_logs).get(key, {}).get("agg_value")
    if ref is None:
        warnings.warn(
            f"no retain {key!r} AUC; PrivLeak uses the fallback retain AUC 0.5 "
            "(open-unlearning's ref_value). Pass the retain model's logs for a real reference.",
            stacklevel=2,
        )
    return privleak(auc, ref)


__all__ = [
    "METADATA_KEY",
    "atomic_write_text",
    "eval_metadata",
    "forget_quality_from_logs",
    "load_eval_logs",
    "metric_result",
    "mia_result",
    "privleak_from_logs",
    "probability_result",
    "rouge_result",
    "summarize",
    "summary_markdown",
    "truth_ratio_result",
    "write_eval_logs",
]
