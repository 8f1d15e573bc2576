"""The ``jaxunlearn`` command line: one module per subcommand.

    jaxunlearn unlearn --model DIR --method npo --forget f.jsonl --retain r.jsonl --steps 100 --out OUT
    jaxunlearn eval --model DIR --benchmark tofu --forget-split forget10 --out out/TOFU_EVAL.json
    jaxunlearn convert SRC DST --to orbax|hf
    jaxunlearn plan --model llama-3.1-8b --method npo --mesh fsdp=8 --batch 4 --seq 512
    jaxunlearn audit --model DIR --target DIR [--oracle DIR] --forget F --holdout H --out DIR
    jaxunlearn demo [--preset tiny|small|full]
    jaxunlearn sweep --method npo --grid beta=0.05,0.1

Each module in `SUBCOMMANDS` has ``register(subparsers)``, which adds its parser with
``run=callable(args) -> int`` as a default. Bad input raises `UsageError` (one line on stderr,
exit 2); a run that fails returns 1; success returns 0 (`_common`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from jaxunlearn.cli._common import EXIT_USAGE, PROG, UsageError

# Subcommand -> module of this package (imported when the parser is built; each module
# imports JAX and the rest of the library only inside its `run`).
SUBCOMMANDS = {
    "unlearn": "unlearn",
    "eval": "eval",
    "convert": "convert",
    "plan": "plan",
    "audit": "audit",
    "demo": "demo",
    "sweep": "sweep",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="JAX-native machine unlearning.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(f"jaxunlearn.cli.{module}").register(subparsers)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # User-facing: one line on stderr, no source location.
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxunlearn``; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    with warnings.catch_warnings():
        warnings.simplefilter("default", UserWarning)
        warnings.showwarning = _show_warning
        try:
            return int(args.run(args) or 0)
        except UsageError as e:
            print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE


__all__ = ["SUBCOMMANDS", "UsageError", "build_parser", "main"]
