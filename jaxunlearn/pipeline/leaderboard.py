"""The TOFU leaderboard: one row per model (target, oracle, each unlearning method / setting).

A row holds TOFU's headline numbers as open-unlearning reports them (forget quality, model
utility, forget truth ratio, forget Prob / ROUGE, PrivLeak, MIA AUCs), the wall time of the
unlearning run and of its evaluation, and the hyperparameters that produced it. Rows are
written as JSON (machine-readable) and Markdown (for READMEs), and drawn as forget quality
(log scale) against model utility, the trade-off plot of the TOFU paper (Maini et al., 2024,
arXiv:2401.06121, Fig. 4): the oracle sits at forget quality 1, the target far below it, and a
good method moves up without moving left.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxunlearn._io import atomic_write_text, jsonable

# Summary metric -> leaderboard column (open-unlearning's TOFU metric names).
ROW_METRICS: dict[str, str] = {
    "forget_quality": "forget_quality",
    "model_utility": "model_utility",
    "forget_truth_ratio": "forget_truth_ratio",
    "forget_Q_A_Prob": "forget_prob",
    "forget_Q_A_ROUGE": "forget_rouge",
    "privleak": "privleak",
    "mia_min_k": "mia_min_k_auc",
    "mia_loss": "mia_loss_auc",
    "extraction_strength": "extraction_strength",
}


# Robustness columns (`audit.robustness_summary`, with `jaxunlearn demo --robustness`).
ROBUSTNESS_COLUMNS: dict[str, str] = {
    "fq_relearn50": "FQ relearn 50",
    "fq_quant4": "FQ 4-bit",
    "probe_best_accuracy": "probe acc",
    "trace_accuracy": "trace acc",
}


@dataclasses.dataclass
class LeaderboardRow:
    """One evaluated model.

    Attributes:
      method: "target", "oracle", or the unlearning method's name.
      split: the forget split ("forget10").
      kind: "target", "oracle" or "unlearned".
      metrics: leaderboard column -> value (see `ROW_METRICS`; None when not computed).
      unlearn_seconds: wall time of the unlearning run (training time for target / oracle).
      eval_seconds: wall time of the TOFU evaluation.
      steps: optimizer steps of the run (None for one-shot methods).
      hyperparameters: what produced the model (method overrides, learning rate, ...).
      eval_path: the model's `TOFU_EVAL.json`.
      setting: a sweep setting's label ("beta=0.1,lr=1e-05"), empty otherwise.
    """

    method: str
    split: str
    kind: str
    metrics: dict[str, float | None]
    unlearn_seconds: float | None = None
    eval_seconds: float | None = None
    steps: int | None = None
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_path: str | None = None
    setting: str = ""

    @property
    def label(self) -> str:
        """The row's name in tables and plots."""
        return f"{self.method} [{self.setting}]" if self.setting else self.method

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record."""
        return jsonable(dataclasses.asdict(self))


def row_from_summary(
    method: str, split: str, kind: str, summary: Mapping[str, Any], **fields: Any
) -> LeaderboardRow:
    """Builds a row from an evaluation summary ({metric: agg_value}, open-unlearning names)."""
    metrics = {column: _number(summary.get(name)) for name, column in ROW_METRICS.items()}
    metrics |= {c: _number(summary[c]) for c in ROBUSTNESS_COLUMNS if c in summary}
    return LeaderboardRow(method=method, split=split, kind=kind, metrics=metrics, **fields)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def format_value(value: float | None, column: str) -> str:
    """How a number is shown: p-values in scientific notation when small, others to 3 places."""
    if value is None:
        return "-"
    if column == "forget_quality":
        return f"{value:.3g}" if value >= 0.01 else f"{value:.2e}"
    if column == "privleak":
        return f"{value:.1f}"
    return f"{value:.3f}"


_MD_COLUMNS = [
    ("forget_quality", "FQ"),
    ("model_utility", "MU"),
    ("forget_truth_ratio", "forget TR"),
    ("forget_prob", "forget Prob"),
    ("forget_rouge", "forget ROUGE"),
    ("privleak", "PrivLeak"),
    ("mia_min_k_auc", "MIA Min-K AUC"),
    ("mia_loss_auc", "MIA LOSS AUC"),
]


def _hparams_text(row: LeaderboardRow) -> str:
    if not row.hyperparameters:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(row.hyperparameters.items()))


def leaderboard_markdown(
    rows: Sequence[LeaderboardRow], *, title: str = "TOFU leaderboard", notes: Sequence[str] = ()
) -> str:
    """The leaderboard as Markdown: one table per forget split, target and oracle first."""
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    robust = [(c, n) for c, n in ROBUSTNESS_COLUMNS.items() if any(c in r.metrics for r in rows)]
    columns = _MD_COLUMNS + robust
    for split in dict.fromkeys(r.split for r in rows):
        lines += [f"## {split}", ""]
        header = ["method", *(name for _, name in columns), "time (s)", "hyperparameters"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in sorted((r for r in rows if r.split == split), key=_order):
            name = f"**{row.label}**" if row.kind != "unlearned" else row.label
            cells = [format_value(row.metrics.get(c), c) for c, _ in columns]
            seconds = "-" if row.unlearn_seconds is None else f"{row.unlearn_seconds:.1f}"
            lines.append("| " + " | ".join([name, *cells, seconds, _hparams_text(row)]) + " |")
        lines.append("")
    lines += [
        "FQ: forget quality, the KS-test p-value of the forget-set truth ratios against the "
        "oracle's (1.0 = indistinguishable; the oracle is 1.0 by construction). MU: model "
        "utility, the harmonic mean of Prob, ROUGE-L recall and truth ratio on retain, real "
        "authors and world facts. PrivLeak: Min-K% (k = 0.4) AUC on forget vs holdout, "
        "relative to the oracle's (0 = like the oracle, negative = still looks memorised). "
        "Time: wall seconds of the unlearning run (training for target and oracle), "
        "compilation included.",
        "",
    ]
    if robust:
        lines += [
            "Robustness (`--robustness`): FQ relearn 50 / FQ 4-bit: forget quality of the "
            "unlearned model after 50 fine-tuning steps on 10% of the forget items (measured on "
            "the rest) and after 4-bit round-to-nearest weight quantization, each against the "
            "oracle attacked alike. probe acc: best-layer linear-probe accuracy telling forget "
            "from holdout items on hidden states (0.5 = nothing left). trace acc: accuracy of "
            "telling the unlearned model from the target on unrelated prompts (0.5 = "
            "undetectable).",
            "",
        ]
    return "\n".join(lines)


def _order(row: LeaderboardRow) -> int:
    # A stable sort on this keeps the methods in run order after target and oracle.
    return {"target": 0, "oracle": 1}.get(row.kind, 2)


def write_leaderboard(
    rows: Sequence[LeaderboardRow],
    out_dir: str | os.PathLike,
    *,
    title: str = "TOFU leaderboard",
    notes: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """Writes `leaderboard.json`, `leaderboard.md` and (with `plot`) `fq_vs_mu.png`.

    Args:
      rows: the leaderboard rows.
      out_dir: the folder (created if needed).
      title: the Markdown title.
      notes: bullet lines under the title (preset, command, machine, ...).
      metadata: stored in the JSON next to the rows.
      plot: also draw the forget-quality vs model-utility plot.

    Returns:
      {"json": path, "markdown": path[, "plot": path]}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "leaderboard.json", "markdown": out / "leaderboard.md"}
    record = {"metadata": jsonable(dict(metadata or {})), "rows": [r.to_dict() for r in rows]}
    atomic_write_text(paths["json"], json.dumps(record, indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], leaderboard_markdown(rows, title=title, notes=notes))
    if plot:
        paths["plot"] = plot_tradeoff(rows, out / "fq_vs_mu.png", title=title)
    return paths


def load_leaderboard(path: str | os.PathLike) -> list[LeaderboardRow]:
    """Reads the rows of a `leaderboard.json` back."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(record, Mapping) or not isinstance(record.get("rows"), list):
        raise ValueError(f"{path}: expected a leaderboard JSON with a 'rows' list")
    return [LeaderboardRow(**row) for row in record["rows"]]


_LABEL_OFFSETS = ((5, 4), (5, -10), (-12, 8), (-12, -14))
# Floor for plotting p-values of 0 (KS p-values underflow for very different samples).
_FQ_FLOOR = 1e-300


def _mark_fallback(ax: Any, row: LeaderboardRow, mu: float, fq: float, *, first: bool) -> None:
    """How far an unlearned model falls back under attack: a line down to its forget quality
    after relearning, a triangle at it after 4-bit quantization."""
    relearned, quantized = row.metrics.get("fq_relearn50"), row.metrics.get("fq_quant4")
    if row.kind != "unlearned":
        return
    if relearned is not None:
        ax.plot([mu, mu], [fq, max(relearned, _FQ_FLOOR)], color="tab:orange", lw=1.2,
                label="after 50 relearning steps" if first else None)  # fmt: skip
    if quantized is not None:
        ax.scatter([mu], [max(quantized, _FQ_FLOOR)], marker="v", s=30, color="tab:purple",
                   label="after 4-bit quantization" if first else None, zorder=3)  # fmt: skip


def plot_tradeoff(
    rows: Sequence[LeaderboardRow], path: str | os.PathLike, *, title: str = "TOFU"
) -> Path:
    """Draws forget quality (log scale) against model utility, target and oracle marked.

    One panel per forget split. Rows without both numbers are left out.

    Returns:
      The PNG's path.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, servers, notebooks all work)
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(r.split for r in rows))
    fig, axes = plt.subplots(
        1, len(splits), figsize=(6.4 * len(splits), 4.8), squeeze=False, constrained_layout=True
    )
    styles = {
        "target": dict(marker="X", s=140, color="tab:red", zorder=4),
        "oracle": dict(marker="*", s=220, color="tab:green", zorder=4),
        "unlearned": dict(marker="o", s=45, color="tab:blue", zorder=3),
    }
    for ax, split in zip(axes[0], splits):
        points = [
            r
            for r in rows
            if r.split == split
            and r.metrics.get("forget_quality") is not None
            and r.metrics.get("model_utility") is not None
        ]
        lowest = min((max(r.metrics["forget_quality"], _FQ_FLOOR) for r in points), default=1.0)
        first = next((r for r in points if r.kind == "unlearned"), None)  # carries the legend
        for index, row in enumerate(points):
            fq = max(row.metrics["forget_quality"], _FQ_FLOOR)
            mu = row.metrics["model_utility"]
            label = row.kind if row.kind != "unlearned" else None
            ax.scatter([mu], [fq], label=label, **styles.get(row.kind, styles["unlearned"]))
            _mark_fallback(ax, row, mu, fq, first=row is first)
            # Alternate label offsets so methods at the same point stay readable.
            offset = _LABEL_OFFSETS[index % len(_LABEL_OFFSETS)]
            ax.annotate(row.label, (mu, fq), textcoords="offset points", xytext=offset, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(max(_FQ_FLOOR, lowest * 1e-1), 3.0)
        ax.axhline(1.0, color="tab:green", lw=0.6, ls="--")
        ax.set_xlabel("model utility")
        ax.set_ylabel("forget quality (KS p-value, log)")
        ax.set_title(f"{title}: {split}")
        ax.grid(True, which="major", alpha=0.3)
        if points:
            ax.legend(loc="lower left", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "ROW_METRICS",
    "LeaderboardRow",
    "format_value",
    "leaderboard_markdown",
    "load_leaderboard",
    "plot_tradeoff",
    "row_from_summary",
    "write_leaderboard",
]
