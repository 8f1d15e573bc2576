"""The ``jaxunlearn eval`` command: evaluate a Hugging Face model directory on TOFU, MUSE or a
multiple-choice set and write open-unlearning-style logs.

    jaxunlearn eval --model DIR --benchmark tofu --forget-split forget10 [--data DIR]
        [--template chat|llama2|qa] [--retain-logs FILE] [--limit N] --out out/TOFU_EVAL.json
    jaxunlearn eval --model DIR --benchmark muse --data DIR --out out/MUSE_EVAL.json
    jaxunlearn eval --model DIR --benchmark mc --data wmdp_bio.jsonl --subject wmdp-bio \\
        --out out/WMDP_EVAL.json

Writes FILE (`{metric: {"agg_value", "value_by_index"}}`, plus provenance under
`"_jaxunlearn"`), `<prefix>_SUMMARY.json` (`{metric: agg_value}`) and `<prefix>_SUMMARY.md`
next to it, where `<prefix>` is FILE's name without `_EVAL.json` (or without `.json`), and
prints the Markdown summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

_BENCHMARKS = ("tofu", "muse", "mc")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jaxunlearn eval``."""
    p = argparse.ArgumentParser(
        prog="jaxunlearn eval",
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
        default="chat",
        choices=("chat", "llama2", "qa", "raw"),
        help="TOFU prompt format the model was trained with",
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
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--shard",
        action="store_true",
        help="shard batches (and FSDP parameters) over all devices",
    )
    return p


def output_paths(out: str | os.PathLike) -> tuple[Path, str]:
    """(folder, prefix) such that the files are `{folder}/{prefix}_EVAL.json` etc."""
    out = Path(out)
    name = out.name
    for suffix in ("_EVAL.json", ".json"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return out.parent, name[: -len(suffix)]
    raise ValueError(f"--out {out}: expected a .json file name, e.g. out/TOFU_EVAL.json")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jaxunlearn eval``; returns the exit status (0 on success, 2 on bad input).

    Bad input (a missing file, retain logs for other items, an unknown metric, ...) prints
    one line naming the problem to stderr instead of a traceback; nothing is written.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmark in ("muse", "mc") and not args.data and not args.hub:
        parser.error(f"--benchmark {args.benchmark} needs --data")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"jaxunlearn eval: error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    folder, prefix = output_paths(args.out)

    import jax.numpy as jnp

    from jaxunlearn import checkpoints, parallel
    from jaxunlearn.eval import multiple_choice, muse, report, runner, tofu

    mesh = parallel.mesh(data=-1) if args.shard else None
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model = checkpoints.load_pretrained(args.model, dtype=dtype, mesh=mesh)
    tokenizer = checkpoints.load_tokenizer(args.tokenizer or args.model)
    reference = None
    if args.reference_model:
        reference = checkpoints.load_pretrained(args.reference_model, dtype=dtype, mesh=mesh)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    common = dict(batch_size=args.batch_size, limit=args.limit, mesh=mesh, model_path=args.model)
    if args.buckets:
        common["buckets"] = tuple(sorted(int(b) for b in args.buckets.split(",") if b.strip()))
    if args.benchmark == "tofu":
        result = tofu.evaluate_tofu(
            model,
            tokenizer,
            forget_split=args.forget_split,
            data_dir=args.data,
            fmt=args.template,
            retain_logs=args.retain_logs,
            max_new_tokens=args.max_new_tokens or 200,
            holdout=not args.no_holdout,
            metrics=metrics,
            eos_token_id=runner.eos_token_ids(tokenizer, args.model),
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
            eos_token_id=runner.eos_token_ids(tokenizer, args.model),
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
