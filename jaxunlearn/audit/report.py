"""The audit report: one-line verdicts, Markdown, JSON, plots and per-item logs.

`write_report(results, out_dir, metadata)` turns `suite.run_audit`'s dict into

- ``AUDIT.json``: everything, including per-item values and the verdicts;
- ``AUDIT.md``: a report for a reader who is not an ML engineer: one verdict line per check,
  then the tables behind it (target, unlearned model and oracle side by side);
- ``plots/relearning.png`` (recovery vs relearning steps) and ``plots/probe_layers.png``
  (probe accuracy by layer);
- ``items/AUDIT_<model>_EVAL.json``: open-unlearning-style per-item logs
  (``{metric: {"agg_value", "value_by_index": {item: {"score": value}}}}``) per model.

Verdict rules (thresholds are stated in each line, so a reader can disagree with them):

- forgetting: forget quality >= 0.05 (KS p-value against the oracle: indistinguishable) when
  an oracle and perturbed answers are given, else the forget-answer probability at most half
  the target's;
- quantization and relearning: recovery of the answer probability at most the oracle's
  (what the attack gives a model that never learned the items) + 0.1, or at most 0.25 without
  an oracle; no verdict when unlearning moved the forget probability by less than 5% (the
  recovery ratio is then noise over a near-zero denominator);
- REMIND and probe: the unlearned model's AUC / best-layer accuracy at most 0.1 further from
  0.5 than the oracle's (or than 0.5 without an oracle);
- trace: held-out accuracy at most 0.6 means the unlearning is hard to detect from outputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxunlearn.audit.suite import ATTACKED_FQ
from jaxunlearn.eval import report as eval_report

MARGIN = 0.1
MIN_CHANGE = 0.05  # relative change of the forget probability below which recovery is noise


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _forgetting_verdict(res: Mapping[str, Any]) -> str:
    base = res["baseline"]
    u, t = base["unlearned"]["aggregate"], base["target"]["aggregate"]
    if "forget_quality" in u:
        fq = u["forget_quality"]
        return (
            f"{_ok(fq >= 0.05)} forgetting: forget quality {_fmt(fq)} (KS p-value of truth "
            f"ratios vs the oracle; >= 0.05 = indistinguishable from a model never trained on them)"
        )
    ratio = u["prob"] / t["prob"] if t["prob"] else float("nan")
    return (
        f"{_ok(ratio <= 0.5)} forgetting: forget-answer probability {_fmt(u['prob'])} vs the "
        f"target's {_fmt(t['prob'])} ({_fmt(100 * ratio, 3)}% of it; pass at <= 50%)"
    )


def _prob_change(res: Mapping[str, Any]) -> float:
    """|prob_target - prob_unlearned| / prob_target on the forget items, before any attack."""
    t = res["baseline"]["target"]["aggregate"]["prob"]
    u = res["baseline"]["unlearned"]["aggregate"]["prob"]
    return abs(t - u) / abs(t) if t else float("nan")


def _recovery_verdict(
    name: str, r_u: float | None, r_o: float | None, what: str, change: float
) -> str:
    if r_u is None or math.isnan(r_u) or not change >= MIN_CHANGE:
        return (
            f"N/A {name}: unlearning changed the forget-answer probability by "
            f"{_fmt(100 * change, 2)}% (< {100 * MIN_CHANGE:g}%), so recovery is not meaningful"
        )
    limit = 0.25 if r_o is None or math.isnan(r_o) else r_o + MARGIN
    ref = "" if r_o is None else f"; the oracle gains {_fmt(r_o)} under the same attack"
    return (
        f"{_ok(r_u <= limit)} {name}: {what} recovers {_fmt(100 * r_u, 3)}% of the forgotten "
        f"answer probability (recovery {_fmt(r_u)}{ref}; pass at <= {_fmt(limit)})"
    )


def _distance_verdict(name: str, value: float, oracle: float | None, what: str) -> str:
    limit = abs(oracle - 0.5) + MARGIN if oracle is not None else MARGIN
    ref = "" if oracle is None else f", oracle {_fmt(oracle)}"
    return (
        f"{_ok(abs(value - 0.5) <= limit)} {name}: {what} {_fmt(value)}{ref} (0.5 = nothing "
        f"left; pass within {_fmt(limit)} of 0.5)"
    )


def verdicts(res: Mapping[str, Any]) -> dict[str, str]:
    """One line per check, starting PASS, FAIL or N/A (rules in the module docstring)."""
    out = {"forgetting": _forgetting_verdict(res)}
    if "quantization" in res:
        bits = min(res["quantization"], key=int)
        q = res["quantization"][bits]
        r_o = q.get("oracle", {}).get("recovery", {}).get("prob")
        out["quantization"] = _recovery_verdict(
            "quantization", q["unlearned"]["recovery"].get("prob"), r_o, f"{bits}-bit RTN",
            _prob_change(res),
        )  # fmt: skip
    if "relearning" in res:
        rl = res["relearning"]
        r_o = rl["models"].get("oracle", {}).get("recovery", {}).get("prob", [None])[-1]
        out["relearning"] = _recovery_verdict(
            "relearning", rl["models"]["unlearned"]["recovery"]["prob"][-1], r_o,
            f"{rl['steps'][-1]} fine-tuning steps on {len(rl['relearn_items'])} forget items",
            _prob_change(res),
        )  # fmt: skip
    if "remind" in res:
        o = res["remind"].get("oracle", {}).get("auc", {}).get("classifier")
        u = res["remind"]["unlearned"]["auc"]["classifier"]
        out["remind"] = _distance_verdict(
            "REMIND", u, o, "neighbourhood-loss AUC forget vs holdout"
        )
    if "probe" in res:
        o = res["probe"].get("oracle", {}).get("best_accuracy")
        p = res["probe"]["unlearned"]
        what = f"best-layer (layer {p['best_layer']}) probe accuracy forget vs holdout"
        out["probe"] = _distance_verdict("probe", p["best_accuracy"], o, what)
    if "trace" in res:
        acc = res["trace"]["target_vs_unlearned"]["accuracy"]
        out["trace"] = (
            f"{_ok(acc <= 0.6)} trace: a classifier tells the unlearned model from the target "
            f"with held-out accuracy {_fmt(acc)} on {res['trace']['n_prompts']} unrelated "
            "prompts (0.5 = undetectable; pass at <= 0.6)"
        )
    return out


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _sections(res: Mapping[str, Any]) -> list[str]:
    roles = list(res["baseline"])
    out = []
    metrics = list(res["baseline"]["target"]["aggregate"])
    out.append("## Forget metrics before any attack\n\n" + _table(
        ["model", *metrics], [[r, *(res["baseline"][r]["aggregate"].get(m) for m in metrics)] for r in roles]
    ))  # fmt: skip
    if "utility" in res:
        out.append("## Utility (mean answer probability on retain items)\n\n" + _table(
            ["model", "retain_prob"], [[r, res["utility"][r]["retain_prob"]] for r in roles]
        ))  # fmt: skip
    if "quantization" in res:
        rows = []
        for bits, q in res["quantization"].items():
            for r in roles:
                a = q[r]["aggregate"]
                rows.append([f"{bits}-bit", r, a["prob"], a.get("forget_quality"),
                             a.get(ATTACKED_FQ), q[r]["recovery"].get("prob")])  # fmt: skip
        changed = ", ".join(
            f"{b}-bit {_fmt(q['changed_code_fraction'])}" for b, q in res["quantization"].items()
        )
        out.append(
            "## Quantization (round-to-nearest)\n\n"
            + _table(
                [
                    "bits",
                    "model",
                    "prob",
                    "forget_quality",
                    "FQ vs quantized oracle",
                    "recovery(prob)",
                ],
                rows,
            )  # fmt: skip
            + "\nFraction of kernel weights whose quantized code differs, target vs unlearned: "
            + changed
            + "\n"
        )
    if "relearning" in res:
        rl = res["relearning"]
        none = [None] * len(rl["steps"])
        rows = []
        for i, step in enumerate(rl["steps"]):
            for r in roles:
                a = rl["models"][r]["aggregate"]
                rows.append([step, r, a["prob"][i], (a.get("forget_quality") or none)[i],
                             (a.get(ATTACKED_FQ) or none)[i],
                             rl["models"][r]["recovery"]["prob"][i]])  # fmt: skip
        out.append(
            f"## Relearning ({len(rl['relearn_items'])} items relearned, "
            f"{len(rl['measured_items'])} measured)\n\n"
            + _table(
                [
                    "steps",
                    "model",
                    "prob",
                    "forget_quality",
                    "FQ vs relearned oracle",
                    "recovery(prob)",
                ],
                rows,
            )  # fmt: skip
        )
    if "remind" in res:
        names = list(res["remind"]["target"]["auc"])
        out.append("## REMIND neighbourhood losses (AUC forget vs holdout)\n\n" + _table(
            ["model", *names], [[r, *(res["remind"][r]["auc"][n] for n in names)] for r in roles]
        ))  # fmt: skip
        out += _remind_extra(res["remind"], roles, names)
    if "probe" in res:
        layers = res["probe"]["target"]["layers"]
        out.append("## Representation probe (held-out balanced accuracy by layer)\n\n" + _table(
            ["layer", *roles], [[n, *(res["probe"][r]["accuracy"][i] for r in roles)] for i, n in enumerate(layers)]
        ))  # fmt: skip
    if "trace" in res:
        pairs = [k for k in res["trace"] if k.startswith("target_vs_")]
        out.append("## Unlearning-trace detection\n\n" + _table(
            ["pair", "accuracy", "auc"], [[p, res["trace"][p]["accuracy"], res["trace"][p]["auc"]] for p in pairs]
        ))  # fmt: skip
    return out


def markdown(res: Mapping[str, Any], metadata: Mapping[str, Any]) -> str:
    """The Markdown report: verdicts first, then one table per check."""
    lines = ["# Unlearning audit\n"]
    for key, value in metadata.items():
        lines.append(f"- {key}: {value}")
    lines.append("\n## Verdicts\n")
    lines += [f"- {v}" for v in res["verdicts"].values()]
    lines.append("")
    lines += _sections(res)
    seconds = res.get("seconds", {})
    lines.append("## Cost\n\n" + _table(["check", "seconds"], [[k, v] for k, v in seconds.items()]))
    return "\n".join(lines)


def plot(res: Mapping[str, Any], folder: Path) -> dict[str, Path]:
    """Recovery vs relearning steps and probe accuracy by layer, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    if "relearning" in res:
        rl = res["relearning"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for role, m in rl["models"].items():
            ax.plot(
                rl["steps"],
                [float("nan") if v is None else v for v in m["recovery"]["prob"]],
                marker="o",
                label=role,
            )
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.axhline(1.0, color="grey", lw=0.5, ls="--")
        ax.set(
            xlabel="relearning steps",
            ylabel="recovery of answer probability",
            title="Relearning attack",
        )
        ax.legend()
        fig.tight_layout()
        out["relearning"] = folder / "relearning.png"
        fig.savefig(out["relearning"], dpi=120)
        plt.close(fig)
    if "probe" in res:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for role, p in res["probe"].items():
            ax.plot(p["layers"], p["accuracy"], marker="o", label=role)
        ax.axhline(0.5, color="grey", lw=0.5, ls="--")
        ax.set(
            xlabel="decoder layer",
            ylabel="held-out accuracy",
            ylim=(0, 1),
            title="Probe: forget vs holdout",
        )
        ax.legend()
        fig.tight_layout()
        out["probe"] = folder / "probe_layers.png"
        fig.savefig(out["probe"], dpi=120)
        plt.close(fig)
    return out


def item_logs(res: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{model: open-unlearning-style logs} of every per-item value the audit measured."""
    logs: dict[str, dict[str, Any]] = {role: {} for role in res["baseline"]}
    for role, entry in res["baseline"].items():
        for name, values in entry["per_item"].items():
            logs[role][f"baseline/{name}"] = eval_report.metric_result(values)
    for bits, q in res.get("quantization", {}).items():
        for role in logs:
            for name, values in q[role]["per_item"].items():
                logs[role][f"quant{bits}/{name}"] = eval_report.metric_result(values)
    rl = res.get("relearning")
    if rl:
        for role, m in rl["models"].items():
            for name, curve in m["per_item"].items():
                for step, values in zip(rl["steps"], curve):
                    logs[role][f"relearn{step}/{name}"] = eval_report.metric_result(
                        values, ids=rl["measured_items"]
                    )
    for role, r in res.get("remind", {}).items():
        rows = r["forget"] + r["holdout"]
        for i, name in enumerate(r["features"]):
            logs[role][f"remind/{name}"] = eval_report.metric_result(
                [row[i] for row in rows], ids=_split_ids(len(r["forget"]), len(r["holdout"]))
            )
    for role, p in res.get("probe", {}).items():
        for layer, proba in zip(p["layers"], p["proba"]):
            logs[role][f"probe/layer{layer}_p_forget"] = eval_report.metric_result(proba)
    return logs


def _remind_extra(remind: Mapping[str, Any], roles: Sequence[str], names: list) -> list[str]:
    """TPR at 1% FPR, the 3-class AUC and the paraphrase check, where they were computed."""
    out = []
    if all(remind[r].get("tpr_at_1fpr") for r in roles):
        out.append("## REMIND: TPR at 1% FPR (forget flagged, holdout at most 1% flagged)\n\n"
                   + _table(["model", *names],
                            [[r, *(remind[r]["tpr_at_1fpr"][n] for n in names)] for r in roles]))  # fmt: skip
    if all(remind[r].get("auc3_forget_retain_holdout") is not None for r in roles):
        out.append(
            "## REMIND: forget / retain / holdout "
            "(macro one-vs-rest AUC; 0.5 = nothing separates them)\n\n"
            + _table(
                ["model", "AUC"], [[r, remind[r]["auc3_forget_retain_holdout"]] for r in roles]
            )
        )
    if all("paraphrase_forget_vs_retain" in remind[r] for r in roles):
        para = {r: remind[r]["paraphrase_forget_vs_retain"] for r in roles}
        keys = list(para[roles[0]]["auc"])
        out.append(
            "## Paraphrase neighbourhoods: forget vs retain (AUC; TPR at 1% FPR of the "
            "classifier). A model that never saw the forget set separates them; one that "
            "learned both does not.\n\n"
            + _table(
                ["model", *keys, "TPR@1%FPR"],
                [
                    [r, *(para[r]["auc"][k] for k in keys), para[r]["tpr_at_1fpr"]["classifier"]]
                    for r in roles
                ],
            )  # fmt: skip
        )
    return out


def _split_ids(n_forget: int, n_holdout: int) -> list[str]:
    return [f"forget_{i}" for i in range(n_forget)] + [f"holdout_{i}" for i in range(n_holdout)]


def _finite_json(x: Any) -> Any:
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _finite_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_json(v) for v in x]
    return x


def write_report(
    res: dict[str, Any], out_dir: str | Path, metadata: Mapping[str, Any]
) -> dict[str, Path]:
    """Writes AUDIT.json, AUDIT.md, plots/ and items/ into `out_dir` (see the module docstring)."""
    out_dir = Path(out_dir)
    res["verdicts"] = verdicts(res)
    paths = {"json": out_dir / "AUDIT.json", "markdown": out_dir / "AUDIT.md"}
    payload = _finite_json({"metadata": dict(metadata), **res})
    eval_report.atomic_write_text(paths["json"], json.dumps(payload, indent=1, allow_nan=False))
    eval_report.atomic_write_text(paths["markdown"], markdown(res, metadata))
    paths.update(plot(res, out_dir / "plots"))
    for role, logs in item_logs(res).items():
        path = out_dir / "items" / f"AUDIT_{role}_EVAL.json"
        eval_report.atomic_write_text(path, json.dumps(logs, indent=1))
        paths[f"items_{role}"] = path
    return paths


__all__ = ["item_logs", "markdown", "plot", "verdicts", "write_report"]
