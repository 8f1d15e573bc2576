"""The TOFU benchmark pipeline: tokenizer, target/oracle training, every method, leaderboard.

- `run_tofu(preset)`: the whole benchmark (`jaxunlearn demo`); presets "tiny", "small",
  "full" (`presets`).
- `prepare_models(preset)`: only the cached tokenizer, target and oracles.
- `TofuBenchmark(preset)`: one forget split ready for your own objective / optax chain:
  `target()`, `sampler()`, `steps()`, `evaluate(model, name)`, `write_leaderboard()`.
- `sweep(method, grid)`: one method over a hyperparameter grid (`jaxunlearn sweep`).
- `sequential.run_sequential(preset, methods, k)`: the forget split as k deletion requests
  unlearned one after another (`jaxunlearn demo --sequential K`).
- `validated_sweep(methods)`: each method's setting selected on a validation split of
  authors, then reported once on the forget split (`jaxunlearn sweep --select validation`).
- Building blocks: `train_bpe_tokenizer`, `finetune` / `FinetuneRecipe`, `write_leaderboard`,
  `plot_tradeoff`.

The command-line entry points are `jaxunlearn.cli.demo` and `jaxunlearn.cli.sweep`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from jaxunlearn.pipeline.finetune import FinetuneRecipe, finetune
from jaxunlearn.pipeline.leaderboard import (
    LeaderboardRow,
    leaderboard_markdown,
    load_leaderboard,
    plot_tradeoff,
    write_leaderboard,
)
from jaxunlearn.pipeline.presets import (
    ALL_METHODS,
    PRESETS,
    EvalSettings,
    ModelShape,
    TofuPreset,
    UnlearnSettings,
    get_preset,
)
from jaxunlearn.pipeline.sweep import (
    grid_points,
    method_runs,
    parse_grid,
    setting_label,
    split_point,
    validated_sweep,
)
from jaxunlearn.pipeline.tofu import (
    MethodRun,
    TofuBenchmark,
    TofuModels,
    TofuRun,
    default_cache_dir,
    load_tofu_data,
    prepare_models,
    run_tofu,
)
from jaxunlearn.pipeline.tokenizer import train_bpe_tokenizer

# Presets are picked by name from the environment in notebooks and CI (JAXUNLEARN_PRESET=tiny).
PRESET_ENV = "JAXUNLEARN_PRESET"


def sweep(
    method: str,
    grid: Mapping[str, Sequence[Any]],
    preset: str | TofuPreset = "small",
    **run_kwargs: Any,
) -> TofuRun:
    """Runs one method over every point of a hyperparameter grid (one leaderboard row each).

    Args:
      method: a `jaxunlearn.recipes` method name.
      grid: {hyperparameter: [values]}; recipe hyperparameters, plus `lr` /
        `learning_rate`, `lr_scale`, `epochs` and `batch_size` (`sweep.RUN_KEYS`).
      preset: the preset whose target, oracle and budget are used.
      **run_kwargs: passed to `run_tofu` (out_dir, cache_dir, progress, log).

    Returns:
      The `TofuRun`: target, oracle and one row per grid point.

    Raises:
      ValueError: an empty grid, or a key the method does not have.
    """
    runs = method_runs(method, grid, get_preset(preset))
    title = f"TOFU sweep: {method} ({get_preset(preset).name})"
    return run_tofu(preset, runs=runs, title=title, **run_kwargs)


__all__ = [
    "ALL_METHODS",
    "PRESETS",
    "PRESET_ENV",
    "EvalSettings",
    "FinetuneRecipe",
    "LeaderboardRow",
    "MethodRun",
    "ModelShape",
    "TofuBenchmark",
    "TofuModels",
    "TofuPreset",
    "TofuRun",
    "UnlearnSettings",
    "default_cache_dir",
    "finetune",
    "get_preset",
    "leaderboard_markdown",
    "load_leaderboard",
    "load_tofu_data",
    "plot_tradeoff",
    "prepare_models",
    "run_tofu",
    "sweep",
    "train_bpe_tokenizer",
    "validated_sweep",
    "write_leaderboard",
]
