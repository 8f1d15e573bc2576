"""``jaxunlearn sweep``: one method over a hyperparameter grid on the TOFU benchmark, one
leaderboard row per setting; with ``--select validation``, each method's setting selected on a
validation split of authors and then reported once on the forget split.

    jaxunlearn sweep --method npo --grid beta=0.05,0.1 --grid lr=1e-5,5e-5
    jaxunlearn sweep --select validation --method npo,graddiff,rmu --grid lr_scale=0.5,1,2
"""

from __future__ import annotations

import argparse
from typing import Any

from jaxunlearn.cli._common import EXIT_OK, UsageError, apply_compilation_cache, bad_input
from jaxunlearn.cli.demo import add_preset_arguments, print_leaderboard


def _run_validated(args: argparse.Namespace, methods: list[str]) -> int:
    from jaxunlearn.pipeline import parse_grid, validated_sweep

    with bad_input():
        grid = parse_grid(args.grid) if args.grid else None
        result = validated_sweep(
            methods,
            grid,
            args.preset,
            out_dir=args.out or f"tofu-{args.preset}-validated",
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            mu_fraction=args.mu_fraction,
            robustness=args.robustness,
        )
    print_leaderboard(result.test)
    print(result.paths["selection_md"].read_text(encoding="utf-8"))
    print(f"Selection:   {result.paths['selection_json']}")
    print(f"Validation:  {result.paths['validation_markdown']}")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxunlearn sweep``; returns the exit status."""
    from jaxunlearn.pipeline import parse_grid, sweep

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise UsageError("--method: give a method name (comma-separated with --select validation)")
    apply_compilation_cache(args)  # before anything compiles
    if args.select == "validation":
        return _run_validated(args, methods)
    if len(methods) != 1:
        raise UsageError("--method: one method per grid sweep; several need --select validation")
    if not args.grid:
        raise UsageError("--grid: give at least one KEY=V1,V2,... (e.g. --grid lr=1e-3,3e-3)")
    with bad_input():
        grid = parse_grid(args.grid)
        result = sweep(
            methods[0],
            grid,
            args.preset,
            out_dir=args.out or f"tofu-{args.preset}-sweep-{methods[0]}",
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
        "benchmark; one leaderboard row per setting. --select validation: choose each "
        "method's setting on a validation split of authors (the target learned them, a "
        "validation oracle did not) by max forget quality subject to model utility >= "
        "0.95x the target's, then report the chosen settings once on the forget split.",
    )
    p.add_argument(
        "--method",
        required=True,
        help="method name (jaxunlearn.recipes); comma-separated list with --select validation",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="hyperparameter values to try; repeat for a Cartesian product (lr, epochs and "
        "batch_size set the run budget; lr_scale multiplies the method's preset learning "
        "rate); default with --select validation: lr_scale=0.5,1,2",
    )
    p.add_argument(
        "--select",
        choices=("none", "validation"),
        default="none",
        help="validation: select each method's setting on a validation split of authors, "
        "then evaluate it once on the forget split",
    )
    p.add_argument(
        "--mu-fraction",
        type=float,
        default=0.95,
        help="selection rule's utility bar: model utility >= this x the target's (default 0.95)",
    )
    p.add_argument(
        "--robustness",
        action="store_true",
        help="with --select validation: audit the selected settings on the forget split "
        "(FQ after 50 relearning steps and 4-bit quantization, probe and trace accuracy)",
    )
    add_preset_arguments(p)
    p.set_defaults(run=run)
