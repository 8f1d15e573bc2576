"""Hyperparameter sweeps of one unlearning method on the TOFU benchmark.

`jaxunlearn sweep --method npo --grid beta=0.05,0.1,0.5 --grid lr=1e-5,5e-5` runs the method
once per point of the grid's Cartesian product, from the same cached target and against the
same oracle, and writes one leaderboard row per setting (target and oracle rows included).

Grid keys are the method's recipe hyperparameters (`jaxunlearn.recipes.recipe(name, **kw)`),
plus the run-level keys `lr` / `learning_rate`, `epochs` and `batch_size` (see
`RUN_KEYS`), and `lr_scale` (a factor on the method's own learning rate in the preset, so one
grid fits methods whose rates differ).

Selection on a validation split (`validated_sweep`, ``jaxunlearn sweep --select
validation``): choosing each method's setting by its numbers on the reported forget split
would tune on the test set. Instead the grid runs on a *validation* deletion request — authors
the target learned, disjoint from the forget split and from the retain items that measure
utility, removed from a validation oracle trained without them — each method's setting is
chosen there by a fixed rule (`select_setting`: the highest forget quality among settings
keeping model utility >= 0.95x the target's), and only the chosen settings run once on the
real forget split.

References:
  Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024, arXiv:2401.06121.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

# Grid keys that set the run (the unlearning budget), not the recipe.
RUN_KEYS: dict[str, str] = {
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "epochs": "epochs",
    "batch_size": "batch_size",
}


def parse_value(text: str) -> Any:
    """A grid value: int, float, bool, null, or else the string itself."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """Parses `key=v1,v2,...` strings into {key: [values]}.

    Raises:
      ValueError: a spec without "=", an empty key or value list, or a repeated key.
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(
                f"--grid {spec!r}: expected key=value1,value2,... (e.g. beta=0.05,0.1)"
            )
        if key in grid:
            raise ValueError(f"--grid key '{key}' given twice; list all its values in one --grid")
        grid[key] = [parse_value(v) for v in values.split(",") if v.strip()]
        if not grid[key]:
            raise ValueError(f"--grid {spec!r}: no values")
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of a grid, in the order the keys and values were given."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def setting_label(point: Mapping[str, Any]) -> str:
    """A short, stable label of one grid point: "beta=0.1,lr=1e-05"."""
    return ",".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in point.items())


def split_point(point: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separates a grid point into (run-level settings, recipe overrides)."""
    run = {RUN_KEYS[k]: v for k, v in point.items() if k in RUN_KEYS}
    recipe = {k: v for k, v in point.items() if k not in RUN_KEYS}
    return run, recipe


# A factor on the method's preset learning rate (resolved per method by `method_runs`).
LR_SCALE = "lr_scale"
# The default grid of a validation sweep: the preset's rate, halved and doubled.
DEFAULT_VALIDATION_GRID: dict[str, list[Any]] = {LR_SCALE: [0.5, 1.0, 2.0]}
# Selection rule: a setting qualifies when its model utility is >= this fraction of the
# target's (the utility bar), and the qualifying setting of highest forget quality wins.
MU_FRACTION = 0.95


def method_runs(method: str, grid: Mapping[str, Sequence[Any]], preset: Any) -> list[Any]:
    """One `tofu.MethodRun` per grid point of `method` (labels from `setting_label`).

    Raises:
      ValueError: an empty grid, a key the method does not have, or `lr_scale` for a method
        without a learning rate.
    """
    from jaxunlearn import recipes
    from jaxunlearn.pipeline.tofu import MethodRun, method_hyperparameters

    if not grid:
        raise ValueError("sweep needs at least one --grid key=values")
    known = set(recipes.defaults(method))
    runs = []
    for point in grid_points(grid):
        scale = point.get(LR_SCALE)
        run_settings, overrides = split_point({k: v for k, v in point.items() if k != LR_SCALE})
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"method '{method}' has no hyperparameter {unknown}; valid: {sorted(known)} "
                f"(plus lr, {LR_SCALE}, epochs, batch_size)"
            )
        if "learning_rate" in run_settings:
            overrides["learning_rate"] = run_settings.pop("learning_rate")
        if scale is not None:
            if "learning_rate" not in known:
                raise ValueError(f"method '{method}' has no learning rate to scale ({LR_SCALE})")
            base = method_hyperparameters(preset, MethodRun(method, overrides))["learning_rate"]
            overrides["learning_rate"] = float(scale) * float(base)
        runs.append(MethodRun(method, overrides, setting=setting_label(point), **run_settings))
    return runs


# ----------------------------------------------------------------------------- validation split


def validation_author_ids(preset: Any, split: str) -> list[int]:
    """The validation deletion request: as many authors as the forget split unlearns, taken
    from the *end* of the retain authors that have TOFU perturbed answers (authors 0-19,
    `retain_perturbed`), skipping the leading authors whose items measure model utility.

    The target learned them; the validation oracle is trained without them.

    Raises:
      ValueError: too few such authors (e.g. the `full` preset, which evaluates all 20).
    """
    from jaxunlearn.pipeline import presets as P

    count = len(P.forget_author_ids(preset, split))
    evaluated = math.ceil(P.eval_counts(preset, split)["retain"] / P.QUESTIONS_PER_AUTHOR)
    pool = [
        a for a in P.retain_author_ids(preset, split) if evaluated <= a < P.RETAIN_PERTURBED_AUTHORS
    ]
    if len(pool) < count:
        raise ValueError(
            f"preset '{preset.name}' {split}: a validation split needs {count} trained retain "
            f"author(s) among authors {evaluated}-{P.RETAIN_PERTURBED_AUTHORS - 1} (those with "
            f"TOFU perturbed answers that are not evaluated for model utility), found {pool}; "
            "lower eval.retain_items"
        )
    return pool[-count:]


def validation_data(preset: Any, split: str, data: Any) -> Any:
    """The preset's `TofuData` with the forget split replaced by the validation request.

    forget = the validation authors' items; the oracle's (and unlearning's retain) rows =
    the target's training rows without them (the real forget authors included: the target
    and the validation oracle both learned those); evaluation = the validation authors'
    `retain_perturbed` rows in the forget slot, the same retain / holdout / real-world rows.
    """
    from jaxunlearn.data import load_tofu, tofu_perturbed_split
    from jaxunlearn.pipeline.presets import QUESTIONS_PER_AUTHOR
    from jaxunlearn.pipeline.tofu import TofuData, _author_rows

    authors = validation_author_ids(preset, split)
    forget = _author_rows(load_tofu("full").to_list(), authors)
    keys = {(r["question"], r["answer"]) for r in forget}
    retain = [r for r in data.target_train if (r["question"], r["answer"]) not in keys]
    perturbed = load_tofu("retain_perturbed").to_list()
    n = QUESTIONS_PER_AUTHOR
    eval_rows = dict(data.eval_rows[split])
    eval_rows[tofu_perturbed_split(split)] = [
        r for a in authors for r in perturbed[a * n : (a + 1) * n]
    ]
    return TofuData(
        target_train=data.target_train,
        oracle_train={split: retain},
        forget={split: forget},
        retain={split: retain},
        eval_rows={split: eval_rows},
        tokenizer_texts=data.tokenizer_texts,
    )


def prepare_validation_oracle(
    preset: Any,
    split: str,
    models: Any,
    data: Any,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Trains (or reuses) the validation oracle: the target's recipe on `data.oracle_train`
    (a `validation_data`), cached next to the target under a hash of its rows."""
    from jaxunlearn.pipeline.tofu import _digest, _is_complete, _train_and_save

    rows = data.oracle_train[split]
    folder = models.cache_dir / f"oracle-validation-{split}-{_digest(rows)[:12]}"
    if _is_complete(folder):
        log(f"[sweep] validation oracle: reusing {folder}")
        return folder
    log(f"[sweep] validation oracle: training on {len(rows)} items")
    _train_and_save("oracle-validation", preset, models.tokenizer, rows, folder, progress)
    return folder


class Selection(NamedTuple):
    """The setting `select_setting` chose for one method on the validation split.

    Attributes:
      method: the method.
      setting: the chosen grid point's label.
      run: the chosen `tofu.MethodRun`.
      forget_quality: its validation forget quality.
      model_utility: its validation model utility.
      qualified: whether it met the utility bar (False: no setting did, and the one of
        highest utility was taken).
    """

    method: str
    setting: str
    run: Any
    forget_quality: float
    model_utility: float
    qualified: bool


def select_setting(
    runs: Sequence[Any], rows: Sequence[Any], target_mu: float, mu_fraction: float = MU_FRACTION
) -> Selection:
    """The rule: among settings with MU >= `mu_fraction` x the target's MU, the highest FQ
    (ties: higher MU, then grid order); if none qualifies, the highest MU.

    Args:
      runs: one method's `MethodRun`s, in grid order.
      rows: their validation leaderboard rows (same order).
      target_mu: the target's validation model utility.
      mu_fraction: the utility bar.
    """
    if not runs or len(runs) != len(rows):
        raise ValueError(f"select_setting: {len(runs)} runs vs {len(rows)} rows")

    def value(row: Any, key: str) -> float:
        v = row.metrics.get(key)
        return -math.inf if v is None or not math.isfinite(v) else float(v)

    bar = mu_fraction * target_mu
    order = range(len(runs))
    ok = [i for i in order if value(rows[i], "model_utility") >= bar]
    if ok:
        best = max(ok, key=lambda i: (value(rows[i], "forget_quality"),
                                      value(rows[i], "model_utility"), -i))  # fmt: skip
    else:
        best = max(order, key=lambda i: (value(rows[i], "model_utility"), -i))
    row = rows[best]
    return Selection(
        runs[best].method, runs[best].setting, runs[best],
        value(row, "forget_quality"), value(row, "model_utility"), bool(ok),
    )  # fmt: skip


@dataclasses.dataclass
class ValidatedSweep:
    """What `validated_sweep` produced.

    Attributes:
      validation_rows: every grid point's row on the validation split (target and validation
        oracle first).
      selections: method -> its `Selection`.
      test: the `tofu.TofuRun` of the selected settings on the real forget split.
      paths: {"selection_json", "selection_md", "validation_markdown"} besides `test.paths`.
      validation_authors: the validation request's author ids.
    """

    validation_rows: list[Any]
    selections: dict[str, Selection]
    test: Any
    paths: dict[str, Path]
    validation_authors: list[int]


def validated_sweep(
    methods: Sequence[str],
    grid: Mapping[str, Sequence[Any]] | None = None,
    preset: Any = "small",
    *,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    mu_fraction: float = MU_FRACTION,
    robustness: bool = False,
) -> ValidatedSweep:
    """Selects each method's setting on a validation split of authors, then reports the
    selected settings once on the real forget split (see the module docstring).

    Args:
      methods: method names.
      grid: the grid every method sweeps (default `DEFAULT_VALIDATION_GRID`: the preset's
        learning rate x 0.5, 1, 2; methods without a learning rate run their preset setting).
      preset: a preset name or value (one forget split: the first is used).
      out_dir: output folder (default `./tofu-<preset>-validated`): `validation/` (the
        grid's leaderboard), the test leaderboard, `selection.{json,md}`.
      cache_dir: the model cache root.
      progress: show progress bars.
      log: where progress lines go.
      mu_fraction: the selection rule's utility bar.
      robustness: add the audit's columns to the test leaderboard (`TofuBenchmark`); the
        validation runs never carry them (selection uses FQ and MU only).

    Returns:
      `ValidatedSweep`.
    """
    from jaxunlearn import recipes
    from jaxunlearn.pipeline.presets import get_preset
    from jaxunlearn.pipeline.tofu import (
        MethodRun,
        TofuBenchmark,
        load_tofu_data,
        prepare_models,
        run_tofu,
    )

    preset = get_preset(preset)
    split = preset.forget_splits[0]
    grid = dict(DEFAULT_VALIDATION_GRID if grid is None else grid)
    out = Path(out_dir) if out_dir is not None else Path(f"tofu-{preset.name}-validated")
    plans = {}
    for method in methods:  # every grid is checked before any model work
        lr_only = set(grid) <= {LR_SCALE, *RUN_KEYS}
        if lr_only and "learning_rate" not in recipes.defaults(method):
            plans[method] = [MethodRun(method, setting="preset")]
        else:
            plans[method] = method_runs(method, grid, preset)
    authors = validation_author_ids(preset, split)
    data = load_tofu_data(preset)
    models = prepare_models(preset, cache_dir=cache_dir, data=data, progress=progress, log=log)
    val_data = validation_data(preset, split, data)
    oracle_dir = prepare_validation_oracle(
        preset, split, models, val_data, progress=progress, log=log
    )
    val_models = dataclasses.replace(models, oracle_dirs={split: oracle_dir})
    bench = TofuBenchmark(
        preset, split=split, out_dir=out / "validation", progress=progress, log=log,
        data=val_data, models=val_models,
    )  # fmt: skip
    target_mu = bench.rows[0].metrics["model_utility"]
    selections = {}
    for method, runs in plans.items():
        rows = [bench.run(run) for run in runs]
        selections[method] = select_setting(runs, rows, target_mu, mu_fraction)
    val_paths = bench.write_leaderboard(
        f"TOFU validation sweep ({preset.name}, validation authors {authors})"
    )
    chosen = [
        dataclasses.replace(s.run, setting=f"validated:{s.setting}") for s in selections.values()
    ]
    test = run_tofu(
        preset, runs=chosen, out_dir=out, cache_dir=cache_dir, progress=progress, log=log,
        title=f"TOFU leaderboard ({preset.name}), settings selected on validation authors",
        robustness=robustness,
    )  # fmt: skip
    paths = _write_selection(out, preset, authors, target_mu, mu_fraction, selections, test)
    paths["validation_markdown"] = val_paths["markdown"]
    return ValidatedSweep(bench.rows, selections, test, paths, authors)


def _write_selection(out, preset, authors, target_mu, mu_fraction, selections, test):
    from jaxunlearn._io import atomic_write_text, jsonable

    record = {
        "preset": preset.name,
        "validation_authors": authors,
        "rule": f"max forget quality s.t. model utility >= {mu_fraction} x target's "
        f"({mu_fraction * target_mu:.4g}); else max model utility",
        "validation_target_model_utility": target_mu,
        "selected": {},
    }
    lines = [
        f"Validation authors {authors}; rule: {record['rule']}.",
        "",
        "| method | selected | val FQ | val MU | met MU bar | test FQ | test MU | test PrivLeak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, sel in selections.items():
        row = test.row(method)
        m = row.metrics
        record["selected"][method] = {
            "setting": sel.setting,
            "hyperparameters": row.hyperparameters,
            "validation": {
                "forget_quality": sel.forget_quality,
                "model_utility": sel.model_utility,
            },
            "qualified": sel.qualified,
            "test": {k: m.get(k) for k in ("forget_quality", "model_utility", "privleak")},
        }
        lines.append(
            f"| {method} | {sel.setting} | {sel.forget_quality:.3g} | {sel.model_utility:.3f} "
            f"| {'yes' if sel.qualified else 'no'} | {_fmt(m.get('forget_quality'))} "
            f"| {_fmt(m.get('model_utility'))} | {_fmt(m.get('privleak'))} |"
        )
    paths = {"selection_json": out / "selection.json", "selection_md": out / "selection.md"}
    atomic_write_text(paths["selection_json"], json.dumps(jsonable(record), indent=2) + "\n")
    atomic_write_text(paths["selection_md"], "\n".join(lines) + "\n")
    return paths


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


__all__ = [
    "DEFAULT_VALIDATION_GRID",
    "LR_SCALE",
    "MU_FRACTION",
    "RUN_KEYS",
    "Selection",
    "ValidatedSweep",
    "grid_points",
    "method_runs",
    "parse_grid",
    "parse_value",
    "prepare_validation_oracle",
    "select_setting",
    "setting_label",
    "split_point",
    "validated_sweep",
    "validation_author_ids",
    "validation_data",
]
