"""The ``jaxunlearn audit`` command: is the forgetting of an unlearned model real?

    jaxunlearn audit --model UNLEARNED_DIR --target TARGET_DIR [--oracle RETAIN_DIR] \\
        --forget forget.jsonl --holdout holdout.jsonl [--retain retain.jsonl] --out DIR

Runs `suite.run_audit` (quantization, relearning, REMIND, probe and trace checks, each on the
target, the unlearned model and the oracle) and writes ``AUDIT.md``, ``AUDIT.json``,
``plots/`` and per-item logs under ``items/`` (see `audit.report`).

Every input problem is reported before any model is loaded: unreadable files, a holdout set
that shares questions with the forget set, models of different architectures or vocabularies,
too few items for the cross-validated probes, a non-empty output folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxunlearn.audit.suite import CHECKS

PROG = "jaxunlearn audit"
# Fields that must agree for two checkpoints to be versions of one model.
ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


class AuditInputError(ValueError):
    """Bad input to the audit, found before any model work."""


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated ints") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments (shared by `build_parser` and `register`)."""
    p.add_argument("--model", required=True, help="unlearned model directory (HF format)")
    p.add_argument("--target", required=True, help="the model before unlearning")
    p.add_argument("--oracle", help="a model never trained on the forget set (retain model)")
    p.add_argument("--forget", required=True, help="forget items, JSON Lines {question, answer}")
    p.add_argument("--holdout", required=True, help="items none of the models saw")
    p.add_argument("--retain", help="items the models should still know (utility)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --target)")
    p.add_argument("--template", default="chat", choices=("chat", "llama2", "qa", "raw"))
    p.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)}")
    p.add_argument("--trace-prompts", help="forget-irrelevant questions (default: TOFU "
                   "real-author and world-fact questions)")  # fmt: skip
    p.add_argument(
        "--bits", default="8,4", type=lambda s: _ints(s, "--bits"), help="RTN bit widths"
    )
    p.add_argument("--group-size", type=int, default=128, help="RTN input rows per scale")
    p.add_argument("--relearn-fraction", type=float, default=0.1, help="forget items relearned")
    p.add_argument(
        "--relearn-steps",
        default="0,10,25,50,100",
        type=lambda s: _ints(s, "--relearn-steps"),
        help="relearning steps after which the held-out forget items are measured",
    )
    p.add_argument("--relearn-lr", type=float, default=1e-5, help="relearning AdamW lr")
    p.add_argument("--relearn-batch-size", type=int, default=4, help="relearn items per step")
    p.add_argument(
        "--folds", type=int, default=5, help="cross-validation folds (probe, REMIND, trace)"
    )
    p.add_argument(
        "--layers", type=lambda s: _ints(s, "--layers"), help="probe layers (default all)"
    )
    p.add_argument("--rouge", action="store_true", help="also ROUGE-L of greedy answers")
    p.add_argument("--max-new-tokens", type=int, default=32, help="ROUGE generation budget")
    p.add_argument("--max-length", type=int, default=512, help="most tokens per item")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="relearn split, neighbours and folds")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--shard", action="store_true", help="shard over all devices")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")


def _read_items(path: str, what: str) -> list[dict]:
    from jaxunlearn.data import read_jsonl_records

    try:
        return read_jsonl_records(path, required_fields=("question", "answer"))
    except (FileNotFoundError, ValueError) as e:
        raise AuditInputError(f"{what} file: {e}") from None


def check_disjoint(forget: list[dict], holdout: list[dict], names: tuple[str, str]) -> None:
    """Raises AuditInputError when a holdout item shares its question with a forget item."""
    seen = {" ".join(r["question"].split()).lower(): i for i, r in enumerate(forget)}
    shared = [
        (seen[k], j)
        for j, r in enumerate(holdout)
        if (k := " ".join(r["question"].split()).lower()) in seen
    ]
    if shared:
        i, j = shared[0]
        raise AuditInputError(
            f"{names[1]} overlaps {names[0]}: {len(shared)} holdout item(s) share a question with "
            f"a forget item (first: holdout line {j + 1} = forget line {i + 1}, "
            f"{holdout[j]['question'][:80]!r}); the holdout set must hold items no model saw"
        )


def check_same_architecture(dirs: dict[str, str]) -> None:
    """Raises AuditInputError unless every model directory has the same architecture fields."""
    from jaxunlearn.checkpoints._model import read_config

    configs = {}
    for flag, d in dirs.items():
        try:
            configs[flag] = read_config(d)
        except (FileNotFoundError, ValueError) as e:
            raise AuditInputError(f"{flag}: {e}") from None
    first, base = next(iter(configs.items()))
    for flag, cfg in configs.items():
        for field in ARCH_FIELDS:
            a, b = getattr(base, field, None), getattr(cfg, field, None)
            if a != b:
                raise AuditInputError(
                    f"{flag} {dirs[flag]} and {first} {dirs[first]} differ in {field} ({b} vs "
                    f"{a}): the audit compares versions of one model; pass checkpoints of the "
                    "same architecture and vocabulary"
                )


def check_same_vocabulary(tokenizer: Any, dirs: dict[str, str]) -> None:
    """Raises AuditInputError when a model directory carries a tokenizer with another vocabulary."""
    from jaxunlearn.checkpoints import load_tokenizer

    vocab = tokenizer.get_vocab()
    for flag, d in dirs.items():
        if not any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            continue
        other = load_tokenizer(d).get_vocab()
        if other != vocab:
            diff = sorted(set(other.items()) ^ set(vocab.items()))[:3]
            raise AuditInputError(
                f"{flag} {d}: its tokenizer's vocabulary differs from the audit tokenizer's "
                f"({len(other)} vs {len(vocab)} tokens; e.g. {diff}); the models must share one "
                "vocabulary"
            )


def _trace_prompts(args: argparse.Namespace) -> list[str]:
    if args.trace_prompts:
        from jaxunlearn.data import read_jsonl_records

        for field in ("question", "text"):
            try:
                records = read_jsonl_records(args.trace_prompts, required_fields=(field,))
                return [r[field] for r in records]
            except FileNotFoundError as e:
                raise AuditInputError(f"--trace-prompts file: {e}") from None
            except ValueError as e:
                problem = e
        raise AuditInputError(
            f"--trace-prompts file: records need a 'question' (or 'text') field: {problem}"
        )
    from jaxunlearn.data import load_tofu

    return [r["question"] for s in ("real_authors", "world_facts") for r in load_tofu(s).to_list()]


def check_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs no model; returns the items, prompts and tokenizer.

    Raises:
      AuditInputError: naming the flag, file or field and what to do.
    """
    from jaxunlearn.audit.classify import check_cv_counts
    from jaxunlearn.audit.probe import probe_rows
    from jaxunlearn.checkpoints import load_tokenizer
    from jaxunlearn.data import prompt_format
    from jaxunlearn.eval.tofu import check_chat_template

    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    bad = sorted(set(checks) - set(CHECKS))
    if bad:
        raise AuditInputError(f"--checks: unknown check(s) {bad}; choose from {list(CHECKS)}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise AuditInputError(
            f"--out {out} exists and is not an empty folder; pass --overwrite or a new folder"
        )
    forget = _read_items(args.forget, "--forget")
    holdout = _read_items(args.holdout, "--holdout")
    retain = _read_items(args.retain, "--retain") if args.retain else []
    check_disjoint(forget, holdout, ("--forget", "--holdout"))
    dirs = {"--target": args.target, "--model": args.model}
    if args.oracle:
        dirs["--oracle"] = args.oracle
    check_same_architecture(dirs)
    tokenizer = load_tokenizer(args.tokenizer or args.target)
    check_same_vocabulary(tokenizer, dirs)
    try:
        check_chat_template(tokenizer, prompt_format(args.template))
        if {"probe", "remind"} & set(checks):
            _, labels, groups = probe_rows(forget, holdout)
            check_cv_counts(labels, groups, args.folds, "probe/REMIND (--forget vs --holdout)")
        prompts = _trace_prompts(args) if "trace" in checks else []
        if prompts:
            n = len(prompts)
            labels, groups = np.repeat([0, 1], n), np.tile(np.arange(n), 2)
            check_cv_counts(labels, groups, args.folds, "trace (--trace-prompts)")
        if "relearning" in checks:
            from jaxunlearn.audit.relearn import relearn_split

            relearn_split(len(forget), args.relearn_fraction)
    except ValueError as e:
        raise AuditInputError(str(e)) from None
    return {"forget": forget, "holdout": holdout, "retain": retain, "prompts": prompts,
            "tokenizer": tokenizer, "checks": checks}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Runs the audit for parsed arguments; 0 on success, 2 on bad input (one line on stderr)."""
    try:
        inputs = check_inputs(args)
    except AuditInputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    import jax.numpy as jnp

    from jaxunlearn import checkpoints, parallel
    from jaxunlearn.audit import report
    from jaxunlearn.audit.measures import ScoringOptions
    from jaxunlearn.audit.suite import AuditConfig, run_audit

    start = time.perf_counter()
    mesh = parallel.mesh(data=-1) if args.shard else None
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    dirs = {"target": args.target, "unlearned": args.model, "oracle": args.oracle}
    models = {
        r: checkpoints.load_pretrained(d, dtype=dtype, mesh=mesh) for r, d in dirs.items() if d
    }
    options = ScoringOptions(
        args.template, args.batch_size, mesh=mesh, max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
    )  # fmt: skip
    config = AuditConfig(
        checks=inputs["checks"], bits=args.bits, group_size=args.group_size,
        relearn_fraction=args.relearn_fraction, relearn_steps=args.relearn_steps,
        relearn_lr=args.relearn_lr, relearn_batch_size=args.relearn_batch_size, folds=args.folds,
        layers=args.layers, rouge=args.rouge, max_length=args.max_length, seed=args.seed,
    )  # fmt: skip
    res = run_audit(
        models, inputs["tokenizer"], inputs["forget"], inputs["holdout"],
        trace_prompts=inputs["prompts"], retain=inputs["retain"], options=options, config=config,
        log=lambda m: print(m, file=sys.stderr),
    )  # fmt: skip
    metadata = {
        "unlearned model": args.model, "target": args.target, "oracle": args.oracle or "none",
        "forget items": f"{len(inputs['forget'])} ({args.forget})",
        "holdout items": f"{len(inputs['holdout'])} ({args.holdout})",
        "prompt format": args.template, "seed": args.seed,
        "total seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    paths = report.write_report(res, args.out, metadata)
    for line in res["verdicts"].values():
        print(line)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def register(subparsers: Any) -> None:
    """Adds ``audit`` to a `jaxunlearn` subcommand parser (``args.run(args)`` runs it)."""
    p = subparsers.add_parser(
        "audit", help="audit an unlearned model: relearning, quantization, probes, traces",
        description=__doc__.splitlines()[0],
    )  # fmt: skip
    add_arguments(p)
    p.set_defaults(run=run)
