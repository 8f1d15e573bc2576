"""The classifier-unlearning leaderboard: JSON, Markdown (both conventions) and a plot.

One row per model (target, oracle, each method). The Markdown has three tables: the SSD /
Bad-Teacher numbers (Df, Dr, test accuracy, entropy MIA, ZRF, time), the SalUn numbers (UA,
RA, TA, MIA-Efficacy, Avg. Gap to the oracle, run time in minutes), and the representation
check (linear-probe accuracy on the forgotten data from penultimate features) with the
speed-up over retraining. The plot puts forget accuracy against retain accuracy (oracle
and target marked) next to the average gap against wall time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxunlearn.eval.report import atomic_write_text


@dataclasses.dataclass
class ClassifierRow:
    """One evaluated classifier.

    Attributes:
      method: "target", "oracle" or the method's name.
      kind: "target", "oracle" or "unlearned".
      scenario: the task's name ("full_class:3").
      metrics: metric -> value (see `jaxunlearn.classifiers.evaluate`), plus "avg_gap".
      seconds: wall time of the unlearning run (training time for target and oracle).
      hyperparameters: what produced the model.
    """

    method: str
    kind: str
    scenario: str
    metrics: dict[str, float]
    seconds: float | None = None
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["metrics"] = {k: (None if _bad(v) else v) for k, v in self.metrics.items()}
        return d


def _bad(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if _bad(v) else f"{v:.{digits}f}"


_TABLES = (
    ("SSD / Bad-Teacher convention (accuracies in %, Df on the forget-test set)",
     [("Df", "Df", 2), ("Dr", "Dr", 2), ("TestAcc", "Test", 2), ("MIA", "MIA", 3),
      ("ZRF", "ZRF", 3), ("seconds", "time (s)", 2)]),
    ("SalUn convention (%, UA/MIA-Efficacy on the forget-train set)",
     [("UA", "UA", 2), ("RA", "RA", 2), ("TA", "TA", 2), ("MIA_efficacy", "MIA-Efficacy", 2),
      ("avg_gap", "Avg. Gap", 2), ("minutes", "RTE (min)", 3)]),
    ("Representation: linear probe on penultimate features (% of forgotten data recognised)",
     [("probe_forget", "probe acc", 2), ("speedup", "speed-up vs retrain", 1)]),
)  # fmt: skip


def _value(row: ClassifierRow, key: str, oracle_seconds: float | None) -> Any:
    if key == "seconds":
        return row.seconds
    if key == "minutes":
        return None if row.seconds is None else row.seconds / 60.0
    if key == "speedup":
        if row.kind == "target" or not row.seconds or not oracle_seconds:
            return None
        return oracle_seconds / row.seconds
    return row.metrics.get(key)


def leaderboard_markdown(
    rows: Sequence[ClassifierRow], *, title: str, notes: Sequence[str] = ()
) -> str:
    """The three Markdown tables (see the module docstring)."""
    oracle = next((r.seconds for r in rows if r.kind == "oracle"), None)
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    for caption, columns in _TABLES:
        lines += [f"## {caption}", ""]
        lines.append("| method | " + " | ".join(h for _, h, _ in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for r in rows:
            cells = [_fmt(_value(r, k, oracle), d) for k, _, d in columns]
            lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_leaderboard(
    rows: Sequence[ClassifierRow],
    out_dir: str | os.PathLike,
    *,
    title: str,
    notes: Sequence[str] = (),
    metadata: dict[str, Any] | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """Writes `leaderboard.json`, `leaderboard.md` and (with `plot`) `tradeoff.png`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "leaderboard.json", "markdown": out / "leaderboard.md"}
    record = {"metadata": metadata or {}, "rows": [r.to_dict() for r in rows]}
    text = json.dumps(record, indent=2, allow_nan=False, default=str) + "\n"
    atomic_write_text(paths["json"], text)
    atomic_write_text(paths["markdown"], leaderboard_markdown(rows, title=title, notes=notes))
    if plot:
        paths["plot"] = plot_tradeoff(rows, out / "tradeoff.png", title=title)
    return paths


def load_leaderboard(path: str | os.PathLike) -> list[ClassifierRow]:
    """The rows of a `leaderboard.json`."""
    record = json.loads(Path(path).read_text())
    return [ClassifierRow(**row) for row in record["rows"]]


def plot_tradeoff(rows: Sequence[ClassifierRow], path: str | os.PathLike, *, title: str) -> Path:
    """Forget vs retain accuracy (left) and Avg. Gap vs wall time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "target": dict(marker="X", s=140, color="tab:red", zorder=4),
        "oracle": dict(marker="*", s=220, color="tab:green", zorder=4),
        "unlearned": dict(marker="o", s=45, color="tab:blue", zorder=3),
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.8, 4.8), constrained_layout=True)
    for r in rows:
        style = styles.get(r.kind, styles["unlearned"])
        label = r.kind if r.kind != "unlearned" else None
        df, dr = r.metrics.get("Df"), r.metrics.get("Dr")
        if not (_bad(df) or _bad(dr)):
            left.scatter([dr], [df], label=label, **style)
            left.annotate(r.method, (dr, df), textcoords="offset points", xytext=(5, 4), fontsize=8)
        gap = r.metrics.get("avg_gap")
        if r.kind != "target" and r.seconds and not _bad(gap):
            right.scatter([r.seconds], [gap], label=label, **style)
            right.annotate(r.method, (r.seconds, gap), textcoords="offset points", xytext=(5, 4),
                           fontsize=8)  # fmt: skip
    left.set_xlabel("Dr: retain-test accuracy (%)")
    left.set_ylabel("Df: forget accuracy (%)")
    left.set_title(f"{title}: forgetting vs retention")
    right.set_xscale("log")
    right.set_xlabel("wall time (s, log)")
    right.set_ylabel("Avg. Gap to the oracle (SalUn, lower is better)")
    right.set_title("closeness to retraining vs cost")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        if ax.collections:
            ax.legend(loc="best", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
