"""``jaxunlearn eval``: evaluate a Hugging Face model directory on TOFU, MUSE or a
multiple-choice set and write open-unlearning-style logs.

    jaxunlearn eval --model DIR --benchmark tofu --forget-split forget10 [--data DIR]
        [--template chat|llama2|qa] [--retain-logs FILE] [--limit N] --out out/TOFU_EVAL.json
    jaxunlearn eval --model DIR --benchmark muse --data DIR --out out/MUSE_EVAL.json
    jaxunlearn eval --model DIR --benchmark mc --data wmdp_bio.jsonl --subject wmdp-bio \\
        --out out/WMDP_EVAL.json

Compiled XLA programs are kept on disk between runs (`--compilation-cache`, default
``~/.cache/jaxunlearn/jax-compilation-cache`` or under ``$XDG_CACHE_HOME``): evaluating the
next checkpoint of the same architecture with the same buckets skips compilation. JAX keys
each entry by program, shapes, compiler options and version, so a stale one is never used;
``--compilation-cache off`` disables it.

Writes FILE (`{metric: {"agg_value", "value_by_index"}}`, plus provenance under
`"_jaxunlearn"`), `<prefix>_SUMMARY.json` (`{metric: agg_value}`) and `<prefix>_SUMMARY.md`
next to it, where `<prefix>` is FILE's name without `_EVAL.json` (or without `.json`), and
prints the Markdown summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from jaxunlearn.cli._common import (
    EXIT_OK,
    UsageError,
    add_compilation_cache_argument,
    add_model_arguments,
    apply_compilation_cache,
    bad_input,
    model_options,
    parse_buckets,
)

_BENCHMARKS = ("tofu", "muse", "mc")


def register(subparsers: Any) -> None:
    """Adds ``eval`` to the subcommands."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on TOFU, MUSE or WMDP/MMLU",
        description="Evaluate a Hugging Face causal-LM directory on TOFU, MUSE or a "
        "multiple-choice set (WMDP / MMLU) and write open-unlearning-style logs.",
    )
    p.add_argument("--model", required=True, help="model directory (config.json + safetensors)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--benchmark", required=True, choices=_BENCHMARKS)
    p.add_argument("--out", required=True, help="EVAL JSON file to write, e.g. out/TOFU_EVAL.json")
    p.add_argument("--data", help="TOFU folder (default: packaged), MUSE folder, or MC file")
    p.add_argument("--forget-split", default="forget10", help="TOFU forget split")
    p.add_argument(
        "--template",
        default="auto",
        choices=("auto", "chat", "llama2", "qa", "raw"),
        help="TOFU prompt format the model was trained with (auto, as in `unlearn`: the "
        "tokenizer's chat template if it has one, else qa)",
    )
    p.add_argument(
        "--ou-eos-masking",
        action="store_true",
        help="open-unlearning's attention mask (input_ids != pad): with pad = EOS it also "
        "hides EOS-valued prompt tokens such as Llama-3's <|eot_id|>; for parity with its logs",
    )
    p.add_argument(
        "--retain-logs", help="retain/retrain model's EVAL JSON (oracle for FQ, PrivLeak)"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each split")
    p.add_argument("--metrics", help="comma-separated metric names (default: the suite)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, help="TOFU generation budget (default 200)")
    p.add_argument("--no-holdout", action="store_true", help="TOFU: skip MIA and PrivLeak")
    p.add_argument("--reference-model", help="model directory for the Reference MIA")
    p.add_argument("--corpus", default="news", choices=("news", "books"), help="MUSE corpus")
    p.add_argument("--hub", action="store_true", help="MUSE: read the splits from the HF hub")
    p.add_argument("--subject", help="MC: description subject (e.g. wmdp-bio, biology)")
    p.add_argument("--name", help="MC: metric-name prefix (default: the data file's stem)")
    p.add_argument("--bos", action="store_true", help="MC: prepend BOS (lm-eval add_bos_token)")
    p.add_argument(
        "--buckets",
        help="comma-separated padded sequence lengths, e.g. 256,512,1024 (default: "
        "32..4096); each bucket used compiles once",
    )
    add_compilation_cache_argument(p)
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="PEFT LoRA adapter to apply to --model (e.g. from unlearn --save-adapter)",
    )
    add_model_arguments(p)
    p.add_argument(
        "--shard",
        action="store_true",
        help="shard batches (and FSDP parameters) over all devices",
    )
    p.set_defaults(run=run)


def output_paths(out: str | os.PathLike) -> tuple[Path, str]:
    """(folder, prefix) such that the files are `{folder}/{prefix}_EVAL.json` etc."""
    out = Path(out)
    name = out.name
    for suffix in ("_EVAL.json", ".json"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return out.parent, name[: -len(suffix)]
    raise UsageError(f"--out {out}: expected a .json file name, e.g. out/TOFU_EVAL.json")


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxunlearn eval``; returns the exit status.

    Bad input (a missing file, retain logs for other items, an unknown metric, ...) raises
    `UsageError` (one line naming the problem, exit 2) before anything is written.
    """
    if args.benchmark in ("muse", "mc") and not args.data and not args.hub:
        raise UsageError(f"--benchmark {args.benchmark} needs --data")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    with bad_input():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    folder, prefix = output_paths(args.out)

    from jaxunlearn import checkpoints, parallel
    from jaxunlearn.eval import inference, multiple_choice, muse, report, tofu

    apply_compilation_cache(args)  # before anything compiles
    mesh = parallel.mesh(data=-1) if args.shard else None
    options, _ = model_options(args)
    options["mesh"] = mesh
    tokenizer = checkpoints.load_tokenizer(args.tokenizer or args.model)
    template = args.template
    if template == "auto":
        from jaxunlearn.data import default_format

        template = default_format(tokenizer)
    if args.benchmark == "tofu" and args.retain_logs:  # before any weight is loaded
        metrics = (
            [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        )
        tofu.check_retain_logs(
            args.retain_logs, forget_split=args.forget_split, fmt=template, data_dir=args.data,
            limit=args.limit, metrics=metrics, holdout=not args.no_holdout,
            reference_model=args.reference_model,
        )  # fmt: skip
    if args.adapter:
        model = checkpoints.load_pretrained_with_adapter(args.model, args.adapter, **options)
    else:
        model = checkpoints.load_pretrained(args.model, **options)
    reference = None
    if args.reference_model:
        reference = checkpoints.load_pretrained(args.reference_model, **options)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    common = dict(batch_size=args.batch_size, limit=args.limit, mesh=mesh, model_path=args.model)
    if args.buckets:
        common["buckets"] = parse_buckets(args.buckets)
    if args.benchmark == "tofu":
        result = tofu.evaluate_tofu(
            model,
            tokenizer,
            forget_split=args.forget_split,
            data_dir=args.data,
            fmt=template,
            ou_eos_masking=args.ou_eos_masking,
            retain_logs=args.retain_logs,
            max_new_tokens=args.max_new_tokens or 200,
            holdout=not args.no_holdout,
            metrics=metrics,
            eos_token_id=inference.eos_token_ids(tokenizer, args.model),
            reference_model=reference,
            **common,
        )
    elif args.benchmark == "muse":
        result = muse.evaluate_muse(
            model,
            tokenizer,
            args.data,
            corpus=args.corpus,
            hub=args.hub,
            metrics=metrics,
            retain_logs=args.retain_logs,
            eos_token_id=inference.eos_token_ids(tokenizer, args.model),
            reference_model=reference,
            **common,
        )
    else:
        result = multiple_choice.evaluate_multiple_choice(
            model,
            tokenizer,
            args.data,
            name=args.name or Path(args.data).stem.replace("-", "_"),
            subject=args.subject,
            add_special_tokens=args.bos,
            **common,
        )
    paths = result.write(folder, prefix)
    produced = folder / f"{prefix}_EVAL.json"
    if Path(args.out) != produced:  # "--out x.json": the EVAL file takes the requested name
        os.replace(produced, args.out)
        paths["eval"] = Path(args.out)
    sys.stdout.write(report.summary_markdown(result.summary, result.metadata, prefix))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return EXIT_OK
