"""Hyperparameter sweeps of one unlearning method on the TOFU benchmark.

`jaxunlearn sweep --method npo --grid beta=0.05,0.1,0.5 --grid lr=1e-5,5e-5` runs the method
once per point of the grid's Cartesian product, from the same cached target and against the
same oracle, and writes one leaderboard row per setting (target and oracle rows included).

Grid keys are the method's recipe hyperparameters (`jaxunlearn.recipes.recipe(name, **kw)`),
plus the run-level keys `lr` / `learning_rate`, `epochs` and `batch_size` (see
`RUN_KEYS`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

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


__all__ = ["RUN_KEYS", "grid_points", "parse_grid", "parse_value", "setting_label", "split_point"]
