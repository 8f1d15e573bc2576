"""``jaxunlearn demo``: a benchmark end to end (TOFU, `small` preset, by default).

``--benchmark tofu``: trains a tokenizer, a target and a retain oracle on TOFU from scratch
(cached), unlearns the forget authors with every method, evaluates, and writes a leaderboard
and a forget-quality vs model-utility plot (`jaxunlearn.pipeline.run_tofu`).
``--benchmark classifiers``: the same for image classifiers (forget a class, a sub-class or
random samples; `jaxunlearn.pipeline.classifiers.run_classifiers`).
``--sequential [K]``: the TOFU forget split as K deletion requests unlearned one after another
(`jaxunlearn.pipeline.sequential.run_sequential`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jaxunlearn.cli._common import (
    EXIT_OK,
    UsageError,
    add_compilation_cache_argument,
    apply_compilation_cache,
    bad_input,
)


def add_preset_arguments(parser: argparse.ArgumentParser, *, tofu_only: bool = True) -> None:
    """--preset / --out / --cache-dir / --no-progress, shared with ``sweep``."""
    from jaxunlearn.pipeline.presets import PRESETS

    parser.add_argument(
        "--preset",
        default=os.environ.get("JAXUNLEARN_PRESET") or "small",
        choices=sorted(PRESETS) if tofu_only else None,
        help="benchmark size: tiny (CI, seconds), small (default, minutes on a laptop CPU), "
        "full (all 200 authors, forget01/05/10); classifiers also resnet18-digits, cifar10, "
        "cifar100; default from $JAXUNLEARN_PRESET",
    )
    parser.add_argument("--out", default=None, help="output folder (default ./tofu-<preset>)")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where the tokenizer, target and oracle are cached (default: $JAXUNLEARN_CACHE "
        "or ~/.cache/jaxunlearn)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_compilation_cache_argument(parser)


def print_leaderboard(result: Any) -> None:
    """The leaderboard's Markdown and where its files are."""
    print()
    print(result.paths["markdown"].read_text(encoding="utf-8"))
    print(f"Leaderboard: {result.paths['markdown']}  (JSON: {result.paths['json']})")
    print(f"Plot:        {result.paths['plot']}")


def _run_sequential(args: argparse.Namespace, methods: list[str] | None) -> int:
    from jaxunlearn.pipeline.sequential import run_sequential

    if args.robustness:
        raise UsageError("--sequential and --robustness: run them separately")
    with bad_input("--sequential: "):
        results = run_sequential(
            args.preset,
            methods,
            args.sequential or None,
            out_dir=args.out,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    for seq in results:
        print(f"{seq.method}: {seq.paths['markdown']}  (JSON: {seq.paths['json']}, plot: "
              f"{seq.paths['plot']})")  # fmt: skip
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxunlearn demo``; returns the exit status."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    apply_compilation_cache(args)  # before anything compiles
    if args.benchmark == "classifiers":
        if args.sequential is not None:
            raise UsageError("--sequential is a TOFU option (--benchmark tofu)")
        from jaxunlearn.pipeline.classifiers import run_classifiers

        with bad_input():
            result = run_classifiers(
                args.preset, args.scenario, args.out, forget=args.forget, data_path=args.data,
                methods=methods, cache_dir=args.cache_dir, checkpoint=args.checkpoint,
            )  # fmt: skip
        print_leaderboard(result)
        return EXIT_OK
    from jaxunlearn.pipeline import run_tofu

    if args.preset not in ("tiny", "small", "full"):
        raise UsageError(f"--preset {args.preset!r}: TOFU presets are tiny, small and full.")
    if args.sequential is not None:
        return _run_sequential(args, methods)
    with bad_input():
        result = run_tofu(
            args.preset,
            out_dir=args.out,
            cache_dir=args.cache_dir,
            methods=methods,
            progress=not args.no_progress,
            robustness=args.robustness,
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
    p.add_argument("--benchmark", default="tofu", choices=("tofu", "classifiers"))
    add_preset_arguments(p, tofu_only=False)
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods (default: all; TOFU: {','.join(ALL_METHODS)})",
    )
    p.add_argument(
        "--robustness",
        action="store_true",
        help="TOFU: audit every method too (forget quality after 50 relearning steps and "
        "4-bit quantization, probe and trace-detection accuracy); ~2 min per method on small",
    )
    p.add_argument(
        "--sequential",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="K",
        help="TOFU: deletion requests one after another: the forget split in K requests "
        "(default: one per forget author), each unlearned from the previous result; forget "
        "quality of every request and model utility after each (table, JSON, plot)",
    )
    c = p.add_argument_group("classifiers")
    c.add_argument(
        "--scenario", default="full_class", choices=("full_class", "sub_class", "random")
    )
    c.add_argument("--forget", default=None, help="class / fine class / amount to forget")
    c.add_argument("--data", default=None, help="CIFAR binary archive or image folder")
    c.add_argument("--checkpoint", default=None, help="HF ResNet/ViT classifier as the target")
    p.set_defaults(run=run)
