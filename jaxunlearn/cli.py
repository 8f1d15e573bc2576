"""The ``jaxunlearn`` command line: subcommands over the library (unlearn, eval, convert, ...).

    jaxunlearn unlearn --model DIR --method npo --forget forget.jsonl --retain retain.jsonl \\
        --steps 100 --out out/npo [--set beta=0.2 ...] [--batch-size 8] [--seed 0] \\
        [--mesh data=4,fsdp=2] [--checkpoint-dir out/ckpt --checkpoint-every 25]

writes a Hugging Face model directory (loadable by ``transformers``, tokenizer included) and
``metrics.jsonl`` (one line per step) to ``--out``. Data files are JSON Lines of
``{"question", "answer"}`` (TOFU style) or ``{"text"}`` records.

Adding a subcommand: write ``register_<name>(subparsers)`` that adds a parser whose
defaults carry ``run=callable(args) -> int`` and append it to `SUBCOMMANDS`; a command that
already has its own argparse ``main(argv)`` is added to `DELEGATES` instead (``eval`` and
``convert`` are). `main` dispatches both.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROG = "jaxunlearn"


class UsageError(ValueError):
    """Bad input on the command line: reported as ``jaxunlearn <cmd>: error: ...``, exit 2."""


# ----------------------------------------------------------------------------- unlearn


def _parse_mesh(text: str | None) -> Any:
    if not text:
        return None
    from jaxunlearn import parallel

    sizes = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in parallel.AXES:
            raise UsageError(
                f"--mesh {text!r}: expected axis=size pairs over {parallel.AXES}, e.g. "
                "--mesh data=4,fsdp=2 (-1 takes the remaining devices)."
            )
        try:
            sizes[key] = int(value)
        except ValueError:
            raise UsageError(f"--mesh {text!r}: size of {key!r} must be an int.") from None
    try:
        return parallel.mesh(**sizes)
    except ValueError as e:
        raise UsageError(f"--mesh {text!r}: {e}") from None


def _buckets(text: str | None, max_length: int) -> tuple[int, ...]:
    if text:
        try:
            return tuple(int(x) for x in text.split(","))
        except ValueError:
            raise UsageError(f"--buckets {text!r}: expected comma-separated ints.") from None
    buckets, size = [], 16
    while size < max_length:
        buckets.append(size)
        size *= 2
    return (*buckets, max_length)


def _tokenize(tokenizer, records, fmt, max_length, name) -> tuple[list, list[int]]:
    """Tokenised examples and the indices of the records they came from (skips unscored)."""
    from jaxunlearn.data import tokenize_records

    examples, kept, messages = [], [], {}
    for index, record in enumerate(records):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = tokenize_records(tokenizer, [record], fmt, max_length)
        for w in caught:
            text = str(w.message).split(" (indices")[0]
            messages[text.replace("1 of 1 items", "some items")] = True
        if out:
            examples.append(out[0])
            kept.append(index)
    for text in messages:
        warnings.warn(f"{name}: {text}", stacklevel=2)
    if len(kept) < len(records):
        print(
            f"warning: {name}: {len(records) - len(kept)} of {len(records)} records have no "
            f"answer token left to score at --max-length {max_length} and were skipped.",
            file=sys.stderr,
        )
    return examples, kept


def _read(path: str, what: str) -> list[dict]:
    from jaxunlearn.data import read_jsonl_records

    try:
        return read_jsonl_records(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{what} file: {e}") from None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(
            f"--out {out} is not empty; choose a new directory or pass --overwrite (the model "
            "files and metrics.jsonl there are replaced, other files kept)."
        )


def prepare_data(args: argparse.Namespace, recipe: Any, tokenizer: Any) -> tuple[Any, dict]:
    """Reads, checks and tokenises the forget/retain files into a `ForgetRetainSampler`.

    Returns:
      (sampler, info) where info has the prompt format, the tokenised examples and the
      number of forget/retain overlaps.

    Raises:
      UsageError: empty forget set, missing retain set or refusals, non-QA records for a
        method that needs questions, an unreadable file.
    """
    from jaxunlearn.data import ForgetRetainSampler, check_overlap, idk_alternates, load_idk

    forget_records = _read(args.forget, "--forget")
    retain_records = None
    if recipe.needs_retain:
        if not args.retain:
            raise UsageError(
                f"method {recipe.name!r} needs a retain set: pass --retain FILE (JSON Lines of "
                "question/answer or text records the model must keep)."
            )
        retain_records = _read(args.retain, "--retain")
        overlap = check_overlap(forget_records, retain_records)
        if overlap:
            print(
                f"warning: {overlap} of {len(forget_records)} forget items also appear in the "
                "retain set; each is pushed down by the forget loss and up by the retain loss.",
                file=sys.stderr,
            )
    elif args.retain:
        print(
            f"note: method {recipe.name!r} uses no retain set; --retain ignored.", file=sys.stderr
        )

    fmt = args.template
    if fmt == "auto":
        fmt = "chat" if getattr(tokenizer, "chat_template", None) else "qa"
    forget, kept = _tokenize(tokenizer, forget_records, fmt, args.max_length, "--forget")
    if not forget:
        raise UsageError(
            f"--forget {args.forget}: no item has an answer token to score at --max-length "
            f"{args.max_length}; the forget set is empty. Raise --max-length or check the file."
        )
    retain = None
    if retain_records is not None:
        retain, _ = _tokenize(tokenizer, retain_records, fmt, args.max_length, "--retain")
        if not retain:
            raise UsageError(f"--retain {args.retain}: no item has an answer token to score.")

    alternates = None
    if recipe.needs_alternate:
        if not all("question" in forget_records[i] for i in kept):
            raise UsageError(
                f"method {recipe.name!r} pairs each forget question with a refusal answer: "
                f"--forget {args.forget} must hold question/answer records, not text."
            )
        try:
            refusals = load_idk(args.refusals)  # default: TOFU's packaged idontknow lines
        except (OSError, ValueError) as e:
            raise UsageError(f"--refusals: {e}") from None
        questions = [forget_records[i]["question"] for i in kept]
        alternates = idk_alternates(tokenizer, questions, fmt, args.max_length, refusals=refusals)

    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    sampler = ForgetRetainSampler(
        forget,
        retain,
        batch_size=args.batch_size,
        seed=args.seed,
        alternates=alternates,
        pad_id=0 if pad_id is None else int(pad_id),
        buckets=_buckets(args.buckets, args.max_length),
        drop_last=args.mesh is not None and args.batch_size <= len(forget),
    )
    info = {"format": fmt, "forget": forget, "retain": retain, "pad_id": pad_id}
    return sampler, info


def _sequence_batches(examples, batch_size, buckets, pad_id):
    from jaxunlearn.data import pad_to_bucket

    for start in range(0, len(examples), batch_size):
        yield pad_to_bucket(examples[start : start + batch_size], buckets, pad_id=pad_id)


def run_unlearn(args: argparse.Namespace) -> int:
    """Runs ``jaxunlearn unlearn``; returns the exit status."""
    import jax.numpy as jnp

    from jaxunlearn import recipes, train
    from jaxunlearn.checkpoints import load_pretrained, load_tokenizer, save_pretrained

    if getattr(args, "distributed", False):
        # Must run before any other JAX call so every host sees the global device set.
        from jaxunlearn import parallel

        parallel.initialize_distributed()
    try:
        overrides = recipes.parse_overrides(args.method, args.set or [])
        recipe = recipes.recipe(args.method, **overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.steps < 0 or args.batch_size < 1 or args.micro_batches < 1:
        raise UsageError("--steps must be >= 0 and --batch-size, --micro-batches >= 1.")
    out = Path(args.out)
    _check_out(out, args.overwrite)
    mesh = _parse_mesh(args.mesh)
    source = args.tokenizer or args.model
    try:
        tokenizer = load_tokenizer(source)
    except (FileNotFoundError, ValueError) as e:
        flag = "--tokenizer" if args.tokenizer else "--model"
        raise UsageError(f"{flag} {source}: {e}") from None
    sampler, info = prepare_data(args, recipe, tokenizer)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    try:
        model = load_pretrained(args.model, dtype=dtype, mesh=mesh)
        ref_model = (
            load_pretrained(args.reference, dtype=dtype, mesh=mesh) if args.reference else None
        )
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    print(
        f"{PROG} unlearn: {recipe.name} ({recipe.description}); {len(info['forget'])} forget / "
        f"{len(info['retain'] or [])} retain items, format {info['format']!r}, "
        f"{args.steps} steps.",
        file=sys.stderr,
    )
    try:
        if recipe.kind == "one_shot":
            h = recipe.hyperparameters
            buckets = _buckets(args.buckets, args.max_length)
            forget = list(
                _sequence_batches(info["forget"], args.batch_size, buckets, info["pad_id"] or 0)
            )
            full = info["retain"] + info["forget"]
            full = list(_sequence_batches(full, args.batch_size, buckets, info["pad_id"] or 0))
            result = train.ssd_unlearn(
                model, forget, full, alpha=h["alpha"], lam=h["lam"],
                convention=h["convention"], mesh=mesh,
            )  # fmt: skip
            log = train.MetricsLog(log_path, None, 0)
            log.write(result.metrics[0])
            log.close()
        else:
            result = train.unlearn(
                model, recipe.objective, recipe.tx, sampler, steps=args.steps, mesh=mesh,
                seed=args.seed, split_grads=recipe.split_grads,
                micro_batches=args.micro_batches, checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every, resume=not args.no_resume,
                log_path=log_path, tensorboard_dir=args.tensorboard,
                progress=not args.no_progress, ref_model=ref_model,
                precompute_reference=not args.no_precompute_reference,
            )  # fmt: skip
    except train.NonFiniteLossError as e:
        print(f"{PROG} unlearn: error: {e} No model was written to {out}.", file=sys.stderr)
        return 1
    except ImportError as e:
        raise UsageError(str(e)) from None
    if result.stopped:
        print(f"{PROG} unlearn: stopped early: {result.stopped}", file=sys.stderr)
    save_pretrained(result.model, out, tokenizer=tokenizer, overwrite=True)
    last = result.metrics[-1] if result.metrics else {}
    loss = f", final loss {last['loss']:.4g}" if "loss" in last else ""
    print(f"wrote the unlearned model to {out} ({result.step} steps{loss}); metrics in {log_path}")
    return 0


def register_unlearn(subparsers: Any) -> None:
    """Adds ``unlearn`` to the subcommands."""
    from jaxunlearn.recipes import METHODS

    p = subparsers.add_parser(
        "unlearn",
        help="unlearn a forget set from a Hugging Face model",
        description="Unlearn a forget set from a Hugging Face causal LM with a named method; "
        "writes an HF model directory and metrics.jsonl to --out.",
    )
    p.add_argument(
        "--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)"
    )
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--forget", required=True, help="JSON Lines of {question, answer} or {text}")
    p.add_argument("--retain", help="JSON Lines retain set (methods with a retain term)")
    p.add_argument("--steps", type=int, required=True, help="training steps (batches)")
    p.add_argument("--out", required=True, help="output directory (HF model + metrics.jsonl)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a hyperparameter (repeatable)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="forget items per step (default 8)")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", help="device mesh, e.g. data=4,fsdp=2 (default: one device)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host GPU/TPU; run on every host)",
    )
    p.add_argument(
        "--template",
        default="auto",
        choices=("auto", "chat", "llama2", "qa", "raw"),
        help="prompt format (auto: the tokenizer's chat template if it has one, else qa)",
    )
    p.add_argument("--max-length", type=int, default=512, help="most tokens per item")
    p.add_argument("--buckets", help="padded lengths, e.g. 64,128,256 (default: powers of 2)")
    p.add_argument("--refusals", help="refusal lines for idkdpo/flat (default: TOFU's)")
    p.add_argument("--reference", help="reference model directory (default: --model)")
    p.add_argument("--checkpoint-dir", help="orbax checkpoints for resuming")
    p.add_argument("--checkpoint-every", type=int, help="save every N steps")
    p.add_argument("--no-resume", action="store_true", help="do not resume from --checkpoint-dir")
    p.add_argument("--tensorboard", help="also write TensorBoard scalars here")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-precompute-reference",
        action="store_true",
        help="run the reference model in every step instead of precomputing log-probs",
    )
    p.set_defaults(run=run_unlearn)


# ----------------------------------------------------------------------------- dispatch

# Subcommands built here: each adds its parser (with run=...) to the subparsers.
SUBCOMMANDS: list[Callable[[Any], None]] = [register_unlearn]

# Subcommands with their own argparse `main(argv) -> int`: name -> ("module:function", help).
DELEGATES: dict[str, tuple[str, str]] = {
    "eval": ("jaxunlearn.eval.command:main", "evaluate a model on TOFU, MUSE or WMDP/MMLU"),
    "convert": ("jaxunlearn.checkpoints.convert:main", "convert between HF and orbax formats"),
    "demo": ("jaxunlearn.pipeline:demo_main", "run the TOFU benchmark end to end (small preset)"),
    "sweep": ("jaxunlearn.pipeline:sweep_main", "sweep one method's hyperparameters on TOFU"),
}


def _delegate(target: str) -> Callable[[Sequence[str]], int]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="JAX-native machine unlearning.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    for name, (_, text) in DELEGATES.items():
        subparsers.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxunlearn``; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATES:
        return int(_delegate(DELEGATES[argv[0]][0])(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
