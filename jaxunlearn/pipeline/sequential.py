"""TOFU with sequential deletion requests: the forget split unlearned in k requests, in turn.

`run_sequential(preset, methods, k)` splits the forget split's items into k contiguous
requests in author order (k = the number of forget authors: one author per request), and for
each method unlearns request 1 from the target, request 2 from that result, and so on
(`audit.sequential_unlearning`; each request gets the one-shot run's budget per item:
epochs x ceil(n_request / batch) steps, and its reference model is the model it starts from).
After every request it runs the TOFU suite once and reports

- forget quality of *every* request (its items' truth ratios against the oracle's on the same
  items: did this request's forgetting happen, did earlier ones survive, did later ones
  happen early), and of the union of the requests so far;
- model utility.

The one oracle is the preset's: retrained without the whole forget split. Against it, a request
not yet made is expected to fail (the target knows it), and after the last request the union's
FQ is the leaderboard's FQ of the sequential run. An oracle per prefix (retrained without
requests 1..j) would be the exact reference for the union after j requests; it costs k
retrainings and is not done here.

Outputs per method under `out_dir/sequential/<method>/`: `sequential.{md,json}` and
`sequential.png` (FQ of each request and of the union, and MU, against requests done).

References:
  "FIT: Defying Catastrophic Forgetting in Continual LLM Unlearning", arXiv:2601.21682.
  Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024, arXiv:2401.06121.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def request_slices(n_items: int, k: int) -> list[range]:
    """k contiguous, near-equal index ranges covering `n_items` forget items in order.

    Raises:
      ValueError: k < 1 or k > n_items.
    """
    if not 1 <= k <= n_items:
        raise ValueError(f"--sequential {k}: need 1 <= k <= {n_items} (the forget items)")
    bounds = np.linspace(0, n_items, k + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def truth_ratios(logs: Mapping[str, Any], n_items: int) -> np.ndarray:
    """[n_items] per-item forget truth ratios (`forget_truth_ratio.value_by_index`), in order.

    Raises:
      KeyError: no per-item truth ratios; ValueError: an item missing.
    """
    entry = logs.get("forget_truth_ratio", {}).get("value_by_index")
    if not isinstance(entry, Mapping):
        raise KeyError("evaluation logs have no forget_truth_ratio.value_by_index")
    missing = [i for i in range(n_items) if str(i) not in entry]
    if missing:
        raise ValueError(f"forget_truth_ratio has no items {missing[:10]} of {n_items}")
    return np.asarray([float(entry[str(i)]["score"]) for i in range(n_items)], np.float64)


def request_forget_quality(ours: np.ndarray, oracle: np.ndarray, items: Sequence[int]) -> float:
    """Forget quality of a set of items: the KS p-value of our truth ratios on them against
    the oracle's on the same items (`eval.metrics.forget_quality`)."""
    from jaxunlearn.eval.metrics import forget_quality

    idx = np.asarray(list(items), np.int64)
    return float(forget_quality(ours[idx], oracle[idx]))


@dataclasses.dataclass
class SequentialTofu:
    """One method's sequential run.

    Attributes:
      method: the method.
      requests: the item index range of each request.
      result: the `audit.SequentialResult` (rows: 0 = the target, j = after request j;
        `forget[i]["forget_quality"]` is request i's FQ, `utility["model_utility"]` MU).
      union_fq: [k + 1] FQ of the union of requests 1..j after j requests (None for j = 0).
      steps: optimizer steps per request.
      seconds: wall seconds (unlearning and evaluation).
      paths: {"markdown", "json", "plot"} once written.
    """

    method: str
    requests: list[range]
    result: Any
    union_fq: list[float | None]
    steps: list[int]
    seconds: float
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One dict per row: requests_done, model_utility, union_fq, fq_request_<i>."""
        out = []
        for row, union in zip(self.result.rows, self.union_fq):
            record = {"requests_done": row.requests_done, **row.utility, "union_fq": union}
            for i, values in sorted(row.forget.items()):
                record[f"fq_request_{i + 1}"] = values["forget_quality"]
            out.append(record)
        return out


def _evaluator(bench: Any, n_items: int, history: list[np.ndarray]) -> Callable[[Any], dict]:
    """`model -> {"tr", "summary"}`, evaluating each model once and appending its truth
    ratios to `history` (so history[j] belongs to the model after j requests)."""
    from jaxunlearn.eval.report import summarize

    last: list[Any] = [None, None]

    def evaluate(model: Any) -> dict[str, Any]:
        if last[0] is not model:
            logs, _, _ = bench._evaluate(model, bench.oracle_logs, "sequential")
            last[:] = [model, {"tr": truth_ratios(logs, n_items), "summary": summarize(logs)}]
            history.append(last[1]["tr"])
        return last[1]

    return evaluate


def _request_samplers(bench: Any, recipe: Any, run: Any, requests: Sequence[range]):
    from jaxunlearn.pipeline.tofu import method_budget, tofu_sampler

    epochs, batch_size = method_budget(bench.preset, run)
    forget = bench.data.forget[bench.split]
    samplers, steps = [], []
    for items in requests:
        data = dataclasses.replace(bench.data, forget={bench.split: [forget[i] for i in items]})
        samplers.append(
            tofu_sampler(
                bench.tokenizer,
                data,
                bench.split,
                bench.preset,
                batch_size=batch_size,
                retain=recipe.needs_retain,
                refusals=recipe.needs_alternate,
            )  # fmt: skip
        )
        steps.append(epochs * math.ceil(len(items) / batch_size))
    return samplers, steps


def sequential_method(
    bench: Any, run: Any, k: int, *, log: Callable[[str], None] = print
) -> SequentialTofu:
    """Unlearns `bench`'s forget split (a `tofu.TofuBenchmark`) in k requests with one
    method (a `tofu.MethodRun`), evaluating the TOFU suite after each request.

    Raises:
      ValueError: a one-shot method (SSD), or k outside 1..number of forget items.
    """
    from jaxunlearn import recipes
    from jaxunlearn.audit import sequential_unlearning
    from jaxunlearn.pipeline.tofu import method_hyperparameters

    recipe = recipes.recipe(run.method, **method_hyperparameters(bench.preset, run))
    if recipe.kind == "one_shot":
        raise ValueError(f"--sequential: '{run.method}' is one-shot (no steps to chain)")
    n_items = len(bench.data.forget[bench.split])
    requests = request_slices(n_items, k)
    oracle_tr = truth_ratios(bench.oracle_logs, n_items)
    history: list[np.ndarray] = []
    evaluate = _evaluator(bench, n_items, history)
    samplers, steps = _request_samplers(bench, recipe, run, requests)

    def measure_forget(model: Any, i: int) -> dict[str, float]:
        tr = evaluate(model)["tr"]
        return {"forget_quality": request_forget_quality(tr, oracle_tr, requests[i])}

    def measure_utility(model: Any) -> dict[str, float]:
        return {"model_utility": float(evaluate(model)["summary"]["model_utility"])}

    start = time.perf_counter()
    result = sequential_unlearning(
        bench.target(), samplers, recipe.objective, recipe.tx, steps=steps,
        measure_forget=measure_forget, measure_utility=measure_utility, measure_all=True,
        seed=bench.preset.unlearn.seed,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    union: list[float | None] = [None]
    for j in range(1, k + 1):
        items = [i for r in requests[:j] for i in r]
        union.append(request_forget_quality(history[j], oracle_tr, items))
    log(f"[sequential] {run.method}: {k} requests in {seconds:.1f} s")
    return SequentialTofu(run.method, requests, result, union, steps, seconds)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def sequential_markdown(seq: SequentialTofu, preset_name: str) -> str:
    """The table: one line per number of requests done, FQ of each request, union, MU."""
    k = len(seq.requests)
    head = [f"FQ req {i + 1}" for i in range(k)]
    lines = [
        f"### Sequential deletion requests: {seq.method} ({preset_name}, {k} requests)",
        "",
        "Request i = forget items "
        + ", ".join(f"{r.start}-{r.stop - 1}" for r in seq.requests)
        + f"; steps per request {seq.steps}. FQ: KS p-value of the request's truth ratios "
        "against the oracle (retrained without the whole forget split) on the same items; "
        "'union' = requests 1..j. Row 0 is the target.",
        "",
        "| requests done | " + " | ".join(head) + " | FQ union so far | MU |",
        "|" + "---|" * (k + 3),
    ]
    for record in seq.table():
        fqs = [_fmt(record.get(f"fq_request_{i + 1}")) for i in range(k)]
        lines.append(
            f"| {record['requests_done']} | "
            + " | ".join(fqs)
            + f" | {_fmt(record['union_fq'])} | {_fmt(record['model_utility'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_sequential(seq: SequentialTofu, path: str | os.PathLike) -> Path:
    """FQ of each request and of the union (log scale) and MU against requests done."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = seq.table()
    done = [r["requests_done"] for r in table]
    fig, (ax, mu) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for i in range(len(seq.requests)):
        ax.plot(done, [r[f"fq_request_{i + 1}"] for r in table], marker="o",
                label=f"request {i + 1}")  # fmt: skip
    ax.plot(done[1:], [r["union_fq"] for r in table[1:]], "k--", marker="s", label="union")
    ax.set(yscale="log", xlabel="requests unlearned", ylabel="forget quality (KS p)")
    ax.axhline(0.05, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    mu.plot(done, [r["model_utility"] for r in table], marker="o", color="tab:purple")
    mu.set(xlabel="requests unlearned", ylabel="model utility")
    for axis in (ax, mu):
        axis.set_xticks(done)
    fig.suptitle(f"Sequential deletion requests: {seq.method}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sequential(seq: SequentialTofu, folder: Path, preset_name: str) -> dict[str, Path]:
    """Writes `sequential.{md,json,png}` into `folder`."""
    from jaxunlearn._io import atomic_write_text, jsonable

    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "method": seq.method,
        "preset": preset_name,
        "requests": [[r.start, r.stop] for r in seq.requests],
        "steps_per_request": seq.steps,
        "seconds": seq.seconds,
        "reference": "oracle retrained without the whole forget split",
        "rows": seq.table(),
    }
    paths = {
        "markdown": folder / "sequential.md",
        "json": folder / "sequential.json",
        "plot": folder / "sequential.png",
    }
    atomic_write_text(paths["markdown"], sequential_markdown(seq, preset_name))
    atomic_write_text(paths["json"], json.dumps(jsonable(record), indent=2) + "\n")
    plot_sequential(seq, paths["plot"])
    seq.paths = paths
    return paths


def run_sequential(
    preset: Any = "small",
    methods: Sequence[str] | None = None,
    k: int | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[SequentialTofu]:
    """Sequential deletion requests on TOFU for each method (see the module docstring).

    Args:
      preset: a preset name or value (its first forget split).
      methods: method names (default: the preset's, one-shot methods skipped).
      k: number of requests (default: one per forget author).
      out_dir: output folder (default `./tofu-<preset>`); files go to `sequential/<method>/`.
      cache_dir: the model cache root.
      progress: show progress bars.
      log: where progress lines go.

    Returns:
      One `SequentialTofu` per method.
    """
    from jaxunlearn import recipes
    from jaxunlearn.pipeline.presets import QUESTIONS_PER_AUTHOR, forget_author_ids, get_preset
    from jaxunlearn.pipeline.tofu import MethodRun, TofuBenchmark, method_hyperparameters

    preset = get_preset(preset)
    split = preset.forget_splits[0]
    n_items = len(forget_author_ids(preset, split)) * QUESTIONS_PER_AUTHOR
    k = k or len(forget_author_ids(preset, split))
    request_slices(n_items, k)  # bad input fails before any model work

    def one_shot(method: str) -> bool:
        hyper = method_hyperparameters(preset, MethodRun(method))
        return recipes.recipe(method, **hyper).kind == "one_shot"

    if methods is None:
        methods = [m for m in preset.unlearn.methods if not one_shot(m)]
    bad = [m for m in methods if one_shot(m)]
    if bad:
        raise ValueError(f"--sequential: {bad} are one-shot methods (no steps to chain); drop them")
    out = Path(out_dir) if out_dir is not None else Path(f"tofu-{preset.name}")
    bench = TofuBenchmark(
        preset, split=split, out_dir=out, cache_dir=cache_dir, progress=progress, log=log
    )
    results = []
    for method in methods:
        seq = sequential_method(bench, MethodRun(method), k, log=log)
        write_sequential(seq, out / "sequential" / method, preset.name)
        log(sequential_markdown(seq, preset.name))
        results.append(seq)
    return results


__all__ = [
    "SequentialTofu",
    "plot_sequential",
    "request_forget_quality",
    "request_slices",
    "run_sequential",
    "sequential_markdown",
    "sequential_method",
    "truth_ratios",
    "write_sequential",
]
