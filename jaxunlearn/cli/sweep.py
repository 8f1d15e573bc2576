"""``jaxunlearn sweep --method npo --grid beta=0.05,0.1 --grid lr=1e-5,5e-5``: one method over
a hyperparameter grid on the TOFU benchmark, one leaderboard row per setting."""

from __future__ import annotations

import argparse
from typing import Any

from jaxunlearn.cli._common import EXIT_OK, bad_input
from jaxunlearn.cli.demo import add_preset_arguments, print_leaderboard


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxunlearn sweep``; returns the exit status."""
    from jaxunlearn.pipeline import parse_grid, sweep

    with bad_input():
        grid = parse_grid(args.grid)
        result = sweep(
            args.method,
            grid,
            args.preset,
            out_dir=args.out or f"tofu-{args.preset}-sweep-{args.method}",
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    print_leaderboard(result)
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Adds ``sweep`` to the subcommands."""
    p = subparsers.add_parser(
        "sweep",
        help="sweep one method's hyperparameters on TOFU",
        description="Run one unlearning method over a hyperparameter grid on the TOFU "
        "benchmark; one leaderboard row per setting.",
    )
    p.add_argument("--method", required=True, help="method name (jaxunlearn.recipes)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="hyperparameter values to try; repeat for a Cartesian product (lr, epochs and "
        "batch_size set the run budget)",
    )
    add_preset_arguments(p)
    p.set_defaults(run=run)
