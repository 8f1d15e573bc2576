"""``jaxunlearn demo``: the TOFU benchmark end to end (the `small` preset by default).

Trains a tokenizer, a target and a retain oracle on TOFU from scratch (cached), unlearns the
forget authors with every method, evaluates, and writes a leaderboard and a forget-quality vs
model-utility plot (`jaxunlearn.pipeline.run_tofu`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jaxunlearn.cli._common import EXIT_OK, bad_input


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset / --out / --cache-dir / --no-progress, shared with ``sweep``."""
    from jaxunlearn.pipeline.presets import PRESETS

    parser.add_argument(
        "--preset",
        default=os.environ.get("JAXUNLEARN_PRESET") or "small",
        choices=sorted(PRESETS),
        help="benchmark size: tiny (CI, seconds), small (default, minutes on a laptop CPU), "
        "full (all 200 authors, forget01/05/10); default from $JAXUNLEARN_PRESET",
    )
    parser.add_argument("--out", default=None, help="output folder (default ./tofu-<preset>)")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where the tokenizer, target and oracle are cached (default: $JAXUNLEARN_CACHE "
        "or ~/.cache/jaxunlearn)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def print_leaderboard(result: Any) -> None:
    """The leaderboard's Markdown and where its files are."""
    print()
    print(result.paths["markdown"].read_text(encoding="utf-8"))
    print(f"Leaderboard: {result.paths['markdown']}  (JSON: {result.paths['json']})")
    print(f"Plot:        {result.paths['plot']}")


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxunlearn demo``; returns the exit status."""
    from jaxunlearn.pipeline import run_tofu

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    with bad_input():
        result = run_tofu(
            args.preset,
            out_dir=args.out,
            cache_dir=args.cache_dir,
            methods=methods,
            progress=not args.no_progress,
        )
    print_leaderboard(result)
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Adds ``demo`` to the subcommands."""
    from jaxunlearn.pipeline.presets import ALL_METHODS

    p = subparsers.add_parser(
        "demo",
        help="run the TOFU benchmark end to end (small preset)",
        description="Train a target and a retain oracle on TOFU from scratch, unlearn the "
        "forget authors with every method, evaluate, and write a leaderboard and a forget-"
        "quality vs model-utility plot.",
    )
    add_preset_arguments(p)
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods (default: all of {','.join(ALL_METHODS)})",
    )
    p.set_defaults(run=run)
