"""The full audit: every check on the target, the unlearned model and the oracle, side by side.

`run_audit` runs the checks an auditor of an unlearning claim asks for and returns one
JSON-ready dict (per-item values included); `robustness_summary` reduces it to the few
numbers a leaderboard row shows. Checks (`CHECKS`):

- ``baseline``: forget metrics of each model (always run; the reference for the rest);
- ``quantization``: 8- and 4-bit RTN (`quantize`), forget metrics and recovery;
- ``relearning``: forget metrics on the held-out forget items after {0, 10, 25, 50, 100}
  NLL steps on the others (`relearn`), for each model;
- ``remind``: neighbourhood-loss features and their forget-vs-holdout AUC and TPR at 1% FPR
  (`remind`), on neighbourhoods built once from the target's embeddings; with retain items
  also the forget / retain / holdout 3-class AUC, and paraphrase neighbourhoods (forget vs
  retain) when the items carry TOFU's paraphrases;
- ``probe``: per-layer representation probes (`probe`);
- ``trace``: telling the unlearned model (and the oracle) from the target by outputs on
  forget-irrelevant prompts (`trace`).

Recovery is always (M_model - M_unlearned) / (M_target - M_unlearned) with the
unlearned and target values measured on the same items before any attack. Forget quality
after an attack is given twice: against the oracle as it is (``forget_quality``), and against
the oracle attacked in the same way (``forget_quality_vs_attacked_oracle``; relearning moves
even a model that never saw the items, so this is the like-for-like comparison).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from flax import nnx

from jaxunlearn.audit import probe, quantize, relearn, remind, trace
from jaxunlearn.audit.measures import (
    DEFAULT_OPTIONS,
    ScoringOptions,
    answer_losses,
    forget_measures,
    recovery,
)
from jaxunlearn.eval import metrics as M

CHECKS: tuple[str, ...] = ("quantization", "relearning", "remind", "probe", "trace")
# Forget quality against the oracle attacked the same way (quantized / relearned alike).
ATTACKED_FQ = "forget_quality_vs_attacked_oracle"
MODEL_ROLES: tuple[str, ...] = ("target", "unlearned", "oracle")


class AuditConfig(NamedTuple):
    """Settings of the audit's checks.

    Attributes:
      checks: which of `CHECKS` to run.
      bits: quantization bit widths.
      group_size: RTN group size (input rows per scale).
      relearn_fraction: fraction of forget items the relearning attacker trains on.
      relearn_steps: step counts at which the held-out forget items are measured.
      relearn_lr: AdamW learning rate of the relearning attack.
      relearn_batch_size: relearn items per step.
      folds: cross-validation folds of the probe, REMIND and trace classifiers.
      layers: decoder layers to probe (None: all).
      remind_radii: REMIND substitution radii.
      remind_neighbours: neighbours per radius.
      trace_k: top-k log-probs in the trace features.
      rouge: also measure ROUGE-L of greedy answers (slower).
      max_length: most tokens per item.
      seed: seed of every random choice (relearn split, neighbours, folds).
    """

    checks: tuple[str, ...] = CHECKS
    bits: tuple[int, ...] = (8, 4)
    group_size: int = quantize.DEFAULT_GROUP_SIZE
    relearn_fraction: float = 0.1
    relearn_steps: tuple[int, ...] = relearn.DEFAULT_STEPS
    relearn_lr: float = 1e-5
    relearn_batch_size: int = 4
    folds: int = 5
    layers: tuple[int, ...] | None = None
    remind_radii: tuple[float, ...] = remind.DEFAULT_RADII
    remind_neighbours: int = 4
    trace_k: int = 10
    rouge: bool = False
    max_length: int = 512
    seed: int = 0


def _attacked_fq(truth_ratios: Mapping[str, Any]) -> dict[str, float]:
    """Forget quality of each model's truth ratios against the oracle's under the same attack.

    Relearning or quantizing the oracle moves its truth ratios too (a model that never saw
    the items changes under relearning as well), so the like-for-like reference for an
    attacked model is the retain model attacked with the same budget.
    """
    oracle = truth_ratios.get("oracle")
    if oracle is None:
        return {}
    return {
        role: M.forget_quality(np.asarray(tr), np.asarray(oracle))
        for role, tr in truth_ratios.items()
        if tr is not None
    }


def _json_measures(m) -> dict[str, Any]:
    return {
        "aggregate": dict(m.aggregate),
        "per_item": {k: np.asarray(v).tolist() for k, v in m.per_item.items()},
    }


class _Measurer:
    """Forget metrics of any model on any subset of the forget items, FQ against the oracle."""

    def __init__(self, tokenizer, forget, holdout, options, config, oracle_tr=None):
        self.tokenizer, self.forget, self.holdout = tokenizer, list(forget), list(holdout)
        self.options, self.config, self.oracle_tr = options, config, oracle_tr

    def __call__(self, model: nnx.Module, rows: Sequence[int] | None = None):
        items = self.forget if rows is None else [self.forget[i] for i in rows]
        oracle = None
        if self.oracle_tr is not None:
            oracle = self.oracle_tr if rows is None else self.oracle_tr[np.asarray(rows)]
        return forget_measures(
            model, self.tokenizer, items, self.options, holdout=self.holdout,
            oracle_truth_ratio=oracle, rouge=self.config.rouge,
        )  # fmt: skip


def _baseline(models, measure: _Measurer) -> dict[str, Any]:
    out = {}
    if "oracle" in models and "perturbed_answer" in measure.forget[0]:
        oracle = measure(models["oracle"])
        measure.oracle_tr = tr = oracle.per_item["truth_ratio"]
        oracle.aggregate["forget_quality"] = M.forget_quality(tr, tr)
        out["oracle"] = oracle
    for role in ("target", "unlearned", "oracle"):
        if role in models and role not in out:
            out[role] = measure(models[role])
    return out


def _quantization(models, measure, base, config) -> dict[str, Any]:
    out = {}
    for bits in config.bits:
        entry = {}
        for role, model in models.items():
            q = quantize.quantize_model(model, bits, group_size=config.group_size)
            m = measure(q)
            del q
            entry[role] = _json_measures(m)
            entry[role]["recovery"] = recovery(
                m.aggregate, base["unlearned"].aggregate, base["target"].aggregate
            )
        trs = {role: entry[role]["per_item"].get("truth_ratio") for role in models}
        for role, fq in _attacked_fq(trs).items():
            entry[role]["aggregate"][ATTACKED_FQ] = fq
        entry["changed_code_fraction"] = quantize.changed_code_fraction(
            models["target"], models["unlearned"], bits, group_size=config.group_size
        )
        out[str(bits)] = entry
    return out


def _relearning(models, tokenizer, measure, options, config) -> dict[str, Any]:
    split = relearn.relearn_split(len(measure.forget), config.relearn_fraction, seed=config.seed)
    curves = {}
    for role, model in models.items():
        curves[role] = relearn.relearn_curve(
            model, tokenizer, measure.forget, lambda m, _: measure(m, split.measured),
            fmt=options.fmt, split=split, steps=config.relearn_steps,
            learning_rate=config.relearn_lr, batch_size=config.relearn_batch_size,
            max_length=config.max_length, seed=config.seed, mesh=options.mesh,
        )  # fmt: skip
    target0, unlearned0 = curves["target"].measures[0], curves["unlearned"].measures[0]
    out = {
        "relearn_items": split.relearn.tolist(),
        "measured_items": split.measured.tolist(),
        "steps": list(curves["target"].steps),
        "models": {},
    }
    for role, curve in curves.items():
        names = list(curve.measures[0].aggregate)
        out["models"][role] = {
            "aggregate": {n: [m.aggregate.get(n) for m in curve.measures] for n in names},
            "recovery": {
                n: [
                    recovery(m.aggregate, unlearned0.aggregate, target0.aggregate).get(n)
                    for m in curve.measures
                ]
                for n in names
            },
            "per_item": {
                n: [np.asarray(m.per_item[n]).tolist() for m in curve.measures]
                for n in curve.measures[0].per_item
            },
            "losses": list(curve.losses),
        }
    for i in range(len(out["steps"])):
        trs = {r: c.measures[i].per_item.get("truth_ratio") for r, c in curves.items()}
        for role, fq in _attacked_fq(trs).items():
            out["models"][role]["aggregate"].setdefault(ATTACKED_FQ, []).append(fq)
    return out


def _has_paraphrases(items: Sequence[Mapping[str, Any]]) -> bool:
    keys = ("paraphrased_question", "paraphrased_answer")
    return bool(items) and all(
        isinstance(i.get(k), str) and i[k].strip() for i in items for k in keys
    )


def _remind(models, tokenizer, forget, holdout, options, config, retain=None) -> dict[str, Any]:
    """REMIND per model; with >= `folds` retain items also the 3-class AUC, and paraphrase
    neighbourhoods (forget vs retain) when both sets carry TOFU paraphrases."""
    embedding = remind.input_embedding(models["target"])
    retain = list(retain or [])
    three = retain if len(retain) >= config.folds else None
    paraphrase = len(retain) >= config.folds and _has_paraphrases([*forget, *retain])
    out = {}
    for role, model in models.items():
        r = remind.remind_auc(
            model, tokenizer, forget, holdout, options, embedding=embedding,
            radii=config.remind_radii, n_neighbours=config.remind_neighbours,
            folds=config.folds, seed=config.seed, max_length=config.max_length, retain=three,
        )  # fmt: skip
        out[role] = {
            "auc": r.auc,
            "tpr_at_1fpr": r.tpr_at_1fpr,
            "auc3_forget_retain_holdout": r.auc3,
            "features": list(remind.FEATURES),
            "forget": r.forget.tolist(),
            "holdout": r.holdout.tolist(),
        }
        if paraphrase:
            p = remind.paraphrase_auc(
                model, tokenizer, forget, retain, options, folds=config.folds,
                seed=config.seed, max_length=config.max_length,
            )  # fmt: skip
            out[role]["paraphrase_forget_vs_retain"] = {
                "auc": p.auc,
                "tpr_at_1fpr": p.tpr_at_1fpr,
                "features": list(remind.PARAPHRASE_FEATURES),
                "forget": p.positive.tolist(),
                "retain": p.negative.tolist(),
            }
    return out


def _probe(models, tokenizer, forget, holdout, options, config) -> dict[str, Any]:
    out = {}
    for role, model in models.items():
        r = probe.representation_probe(
            model, tokenizer, forget, holdout, options, layers=config.layers,
            folds=config.folds, seed=config.seed, max_length=config.max_length,
        )  # fmt: skip
        best = int(np.argmax(r.accuracy))
        out[role] = {
            "layers": list(r.layers),
            "accuracy": r.accuracy.tolist(),
            "auc": r.auc.tolist(),
            "best_layer": r.layers[best],
            "best_accuracy": float(r.accuracy[best]),
            "proba": r.proba.tolist(),
            "groups": r.groups.tolist(),
        }
    return out


def _trace(models, tokenizer, prompts, options, config) -> dict[str, Any]:
    out = {}
    for role in ("unlearned", "oracle"):
        if role in models:
            r = trace.trace_detection(
                models["target"], models[role], tokenizer, prompts, options, k=config.trace_k,
                folds=config.folds, seed=config.seed,
            )  # fmt: skip
            out[f"target_vs_{role}"] = {
                "accuracy": r.accuracy,
                "auc": r.auc,
                "proba": r.proba.tolist(),
            }
    out["n_prompts"] = len(prompts)
    return out


def run_audit(
    models: Mapping[str, nnx.Module],
    tokenizer: Any,
    forget: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]],
    *,
    trace_prompts: Sequence[str] = (),
    retain: Sequence[Mapping[str, Any]] = (),
    options: ScoringOptions = DEFAULT_OPTIONS,
    config: AuditConfig = AuditConfig(),  # noqa: B008 (an immutable NamedTuple)
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Runs the audit's checks and returns the results as a JSON-ready dict.

    Args:
      models: {"target", "unlearned"[, "oracle"]} jaxunlearn models sharing a tokenizer.
      tokenizer: the tokenizer.
      forget: forget QA items (with "perturbed_answer" / "paraphrased_answer" for the truth
        ratio and, with an oracle, forget quality).
      holdout: QA items none of the models was trained on.
      trace_prompts: forget-irrelevant questions for trace detection.
      retain: QA items the models should still know; their mean answer probability is
        reported per model as ``utility`` (what the unlearning cost).
      options: prompt format, batching, mesh.
      config: the checks and their settings.
      log: progress messages (e.g. `print`).

    Returns:
      {"baseline", ["utility"], <check>..., "seconds": {check: wall seconds}}; `report`
      writes the Markdown / JSON / plots from it.

    Raises:
      ValueError: a missing target / unlearned model, or an unknown check.
    """
    missing = {"target", "unlearned"} - set(models)
    unknown = set(models) - set(MODEL_ROLES)
    if missing or unknown:
        raise ValueError(
            f"run_audit needs models 'target' and 'unlearned' (optionally 'oracle'); "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    bad = sorted(set(config.checks) - set(CHECKS))
    if bad:
        raise ValueError(f"unknown audit check(s) {bad}; choose from {list(CHECKS)}")
    models = {r: models[r] for r in MODEL_ROLES if r in models}
    measure = _Measurer(tokenizer, forget, holdout, options, config)
    seconds, results = {}, {}

    def timed(name, fn):
        log(f"audit: {name} ...")
        start = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - start
        log(f"audit: {name} done in {seconds[name]:.1f} s")
        return out

    base = timed("baseline", lambda: _baseline(models, measure))
    results["baseline"] = {role: _json_measures(m) for role, m in base.items()}
    if retain:
        results["utility"] = {
            role: {
                "retain_prob": float(np.mean(np.exp(-answer_losses(m, tokenizer, retain, options))))
            }
            for role, m in models.items()
        }
    steps = {
        "quantization": lambda: _quantization(models, measure, base, config),
        "relearning": lambda: _relearning(models, tokenizer, measure, options, config),
        "remind": lambda: _remind(models, tokenizer, forget, holdout, options, config, retain),
        "probe": lambda: _probe(models, tokenizer, forget, holdout, options, config),
        "trace": lambda: _trace(models, tokenizer, trace_prompts, options, config),
    }
    for name in CHECKS:
        if name in config.checks:
            results[name] = timed(name, steps[name])
    results["seconds"] = seconds
    return results


# What the leaderboard shows: FQ after 50 relearning steps and after 4-bit RTN, the best
# probe layer and trace detection (REMIND is left to the full audit).
SUMMARY_CONFIG = AuditConfig(
    checks=("quantization", "relearning", "probe", "trace"), relearn_steps=(0, 50), bits=(4,)
)


def robustness_summary(
    target: nnx.Module,
    unlearned: nnx.Module,
    oracle: nnx.Module | None,
    tokenizer: Any,
    forget: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]],
    *,
    trace_prompts: Sequence[str],
    options: ScoringOptions = DEFAULT_OPTIONS,
    config: AuditConfig = SUMMARY_CONFIG,
) -> dict[str, float | None]:
    """The leaderboard's robustness columns for one unlearned model.

    Returns:
      {"fq_relearn50": forget quality of the held-out forget items after 50 relearning
      steps, against the oracle relearned alike (None without an oracle or perturbed
      answers), "fq_relearn50_static_oracle": the same against the oracle as it is,
      "recovery_relearn50": prob recovery after them, "fq_quant4" /
      "fq_quant4_static_oracle": forget quality after 4-bit RTN, "recovery_quant4",
      "probe_best_accuracy": the unlearned model's best-layer probe accuracy,
      "probe_best_accuracy_oracle", "trace_accuracy": target-vs-unlearned detection
      accuracy, "audit_seconds"}. The last relearning step count and the smallest bit width
      of `config` are the ones reported.
    """
    models = {"target": target, "unlearned": unlearned}
    if oracle is not None:
        models["oracle"] = oracle
    res = run_audit(
        models, tokenizer, forget, holdout, trace_prompts=trace_prompts, options=options,
        config=config,
    )  # fmt: skip
    out: dict[str, float | None] = {}
    if "relearning" in res:
        u = res["relearning"]["models"]["unlearned"]
        out["fq_relearn50"] = (u["aggregate"].get(ATTACKED_FQ) or [None])[-1]
        out["fq_relearn50_static_oracle"] = (u["aggregate"].get("forget_quality") or [None])[-1]
        out["recovery_relearn50"] = u["recovery"]["prob"][-1]
    if "quantization" in res:
        q = res["quantization"][str(min(config.bits))]["unlearned"]
        out["fq_quant4"] = q["aggregate"].get(ATTACKED_FQ)
        out["fq_quant4_static_oracle"] = q["aggregate"].get("forget_quality")
        out["recovery_quant4"] = q["recovery"].get("prob")
    if "probe" in res:
        out["probe_best_accuracy"] = res["probe"]["unlearned"]["best_accuracy"]
        out["probe_best_accuracy_oracle"] = res["probe"].get("oracle", {}).get("best_accuracy")
    if "trace" in res:
        out["trace_accuracy"] = res["trace"]["target_vs_unlearned"]["accuracy"]
    out["audit_seconds"] = float(sum(res["seconds"].values()))
    return out


__all__ = [
    "ATTACKED_FQ",
    "CHECKS",
    "MODEL_ROLES",
    "SUMMARY_CONFIG",
    "AuditConfig",
    "robustness_summary",
    "run_audit",
]
