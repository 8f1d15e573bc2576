"""The TOFU benchmark pipeline: tokenizer, target/oracle training, every method, leaderboard.

- `run_tofu(preset)`: the whole benchmark (`jaxunlearn demo`); presets "tiny", "small",
  "full" (`presets`).
- `prepare_models(preset)`: only the cached tokenizer, target and oracles.
- `TofuBenchmark(preset)`: one forget split ready for your own objective / optax chain:
  `target()`, `sampler()`, `steps()`, `evaluate(model, name)`, `write_leaderboard()`.
- `sweep(method, grid)`: one method over a hyperparameter grid (`jaxunlearn sweep`).
- Building blocks: `train_bpe_tokenizer`, `finetune` / `FinetuneRecipe`, `write_leaderboard`,
  `plot_tradeoff`.

`demo_main(argv)` and `sweep_main(argv)` are the command-line entry points.
"""

from __future__ import annotations

import argparse
import os
import sys
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
from jaxunlearn.pipeline.sweep import grid_points, parse_grid, setting_label, split_point
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


def preset_from_env(default: str = "small") -> TofuPreset:
    """The preset named by `$JAXUNLEARN_PRESET`, else `default`."""
    return get_preset(os.environ.get(PRESET_ENV) or default)


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
        `learning_rate`, `epochs` and `batch_size` (`sweep.RUN_KEYS`).
      preset: the preset whose target, oracle and budget are used.
      **run_kwargs: passed to `run_tofu` (out_dir, cache_dir, progress, log).

    Returns:
      The `TofuRun`: target, oracle and one row per grid point.

    Raises:
      ValueError: an empty grid, or a key the method does not have.
    """
    from jaxunlearn import recipes

    if not grid:
        raise ValueError("sweep needs at least one --grid key=values")
    known = set(recipes.defaults(method))
    runs = []
    for point in grid_points(grid):
        run_settings, overrides = split_point(point)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"method '{method}' has no hyperparameter {unknown}; valid: {sorted(known)} "
                "(plus lr, epochs, batch_size)"
            )
        if "learning_rate" in run_settings:
            overrides["learning_rate"] = run_settings.pop("learning_rate")
        runs.append(MethodRun(method, overrides, setting=setting_label(point), **run_settings))
    title = f"TOFU sweep: {method} ({get_preset(preset).name})"
    return run_tofu(preset, runs=runs, title=title, **run_kwargs)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default=os.environ.get(PRESET_ENV) or "small",
        choices=sorted(PRESETS),
        help="benchmark size: tiny (CI, seconds), small (default, minutes on a laptop CPU), "
        "full (all 200 authors, forget01/05/10)",
    )
    parser.add_argument("--out", default=None, help="output folder (default ./tofu-<preset>)")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"where the tokenizer, target and oracle are cached (default {default_cache_dir()})",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def demo_main(argv: Sequence[str] | None = None) -> int:
    """`jaxunlearn demo`: the TOFU benchmark end to end (the `small` preset by default)."""
    parser = argparse.ArgumentParser(
        prog="jaxunlearn demo",
        description="Train a target and a retain oracle on TOFU from scratch, unlearn the "
        "forget authors with every method, evaluate, and write a leaderboard and a forget-"
        "quality vs model-utility plot.",
    )
    _common_arguments(parser)
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods (default: all of {','.join(ALL_METHODS)})",
    )
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    result = run_tofu(
        args.preset,
        out_dir=args.out,
        cache_dir=args.cache_dir,
        methods=methods,
        progress=not args.no_progress,
    )
    print()
    print(result.paths["markdown"].read_text(encoding="utf-8"))
    print(f"Leaderboard: {result.paths['markdown']}  (JSON: {result.paths['json']})")
    print(f"Plot:        {result.paths['plot']}")
    return 0


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """`jaxunlearn sweep --method npo --grid beta=0.05,0.1 --grid lr=1e-5,5e-5`."""
    parser = argparse.ArgumentParser(
        prog="jaxunlearn sweep",
        description="Run one unlearning method over a hyperparameter grid on the TOFU "
        "benchmark; one leaderboard row per setting.",
    )
    parser.add_argument("--method", required=True, help="method name (jaxunlearn.recipes)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="hyperparameter values to try; repeat for a Cartesian product (lr, epochs and "
        "batch_size set the run budget)",
    )
    _common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        grid = parse_grid(args.grid)
        out = args.out or f"tofu-{args.preset}-sweep-{args.method}"
        result = sweep(
            args.method,
            grid,
            args.preset,
            out_dir=out,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"jaxunlearn sweep: error: {e}", file=sys.stderr)
        return 2
    print()
    print(result.paths["markdown"].read_text(encoding="utf-8"))
    print(f"Leaderboard: {result.paths['markdown']}  (JSON: {result.paths['json']})")
    print(f"Plot:        {result.paths['plot']}")
    return 0


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
    "demo_main",
    "finetune",
    "get_preset",
    "leaderboard_markdown",
    "load_leaderboard",
    "load_tofu_data",
    "plot_tradeoff",
    "prepare_models",
    "preset_from_env",
    "run_tofu",
    "sweep",
    "sweep_main",
    "train_bpe_tokenizer",
    "write_leaderboard",
]
