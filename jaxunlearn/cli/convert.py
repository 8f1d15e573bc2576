"""``jaxunlearn convert SRC DST --to orbax|hf``: a model between a Hugging Face directory and
an orbax checkpoint (`jaxunlearn.checkpoints.convert.convert`)."""

from __future__ import annotations

import argparse
from typing import Any

from jaxunlearn.cli._common import EXIT_OK, bad_input


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxunlearn convert``; returns the exit status."""
    from jaxunlearn.checkpoints.convert import convert

    with bad_input():
        out = convert(
            args.src,
            args.dst,
            to=args.to,
            dtype=args.dtype,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
        )
    print(f"wrote {args.to} checkpoint to {out}")
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Adds ``convert`` to the subcommands."""
    p = subparsers.add_parser(
        "convert",
        help="convert between HF and orbax formats",
        description="Convert a model between a Hugging Face directory and an orbax checkpoint.",
    )
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="destination directory (written atomically)")
    p.add_argument("--to", choices=("orbax", "hf"), required=True, help="destination format")
    p.add_argument(
        "--dtype", default=None, help="store weights as e.g. float32 or bfloat16 (default: keep)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace DST even if it holds other files"
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pytorch_model.bin weights (unpickling can run arbitrary code)",
    )
    p.set_defaults(run=run)
