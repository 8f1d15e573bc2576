"""``jaxunlearn unlearn``: unlearn a forget set from a Hugging Face model with a named method.

    jaxunlearn unlearn --model DIR --method npo --forget forget.jsonl --retain retain.jsonl \\
        --steps 100 --out out/npo [--set beta=0.2 ...] [--batch-size 8] [--seed 0] \\
        [--mesh data=4,fsdp=2] [--checkpoint-dir out/ckpt --checkpoint-every 25] \\
        [--lora-rank 8 [--lora-alpha 16] [--lora-targets q,v] [--save-adapter DIR] [--no-merge]]

writes a Hugging Face model directory (loadable by ``transformers``, tokenizer included) and
``metrics.jsonl`` (one line per step) to ``--out``. Data files are JSON Lines of
``{"question", "answer"}`` (TOFU style) or ``{"text"}`` records.

With ``--lora-rank R`` only LoRA adapters are trained (the base stays frozen); ``--out`` gets
the merged model, ``--save-adapter DIR`` the adapter in PEFT's format (``peft`` loads it
onto the transformers base model), and ``--no-merge`` skips the merged model.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from jaxunlearn.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    PROG,
    UsageError,
    add_lora_arguments,
    add_model_arguments,
    bad_input,
    lora_options,
    model_options,
    parse_buckets,
    parse_mesh,
)

RUN_RECORD = ".jaxunlearn-run.json"  # in --out: which run writes this directory


def _check_paths(args: argparse.Namespace, out: Path) -> None:
    """--out must not be an input, and must be new, empty, this run's own, or --overwrite."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory.")
    for flag, value in (("--model", args.model), ("--reference", args.reference)):
        if value and Path(value).resolve() == out.resolve():
            raise UsageError(
                f"--out {out} is the {flag} directory: the unlearned model would replace its own "
                "input (also the reference for NPO-style methods and for any resume). Choose "
                "another --out."
            )
    if not out.is_dir() or not any(out.iterdir()) or args.overwrite:
        return
    if not (out / RUN_RECORD).is_file():
        raise UsageError(
            f"--out {out} is not empty and was not written by `jaxunlearn unlearn`; choose a new "
            "directory or pass --overwrite (the model files and metrics.jsonl there are "
            "replaced, other files kept)."
        )


def _check_adapter_dir(adapter: Path, out: Path, overwrite: bool) -> None:
    """--save-adapter must be a new, empty or adapter directory (checked before training)."""
    if adapter.resolve() == out.resolve():
        raise UsageError("--save-adapter is --out; drop --save-adapter and pass --no-merge.")
    if adapter.exists() and not adapter.is_dir():
        raise UsageError(f"--save-adapter {adapter} is a file; give a directory.")
    from jaxunlearn.checkpoints.peft import ADAPTER_CONFIG

    if adapter.is_dir() and any(adapter.iterdir()) and not overwrite:
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise UsageError(
                f"--save-adapter {adapter} is not empty and holds no PEFT adapter; choose a new "
                "directory or pass --overwrite."
            )


def _run_config(args: argparse.Namespace, recipe: Any) -> dict:
    """What defines this run, recorded in --out and in every checkpoint."""
    from jaxunlearn._io import file_digest, jsonable, model_dir_fingerprint

    config = {
        "method": recipe.name,
        "hyperparameters": dict(recipe.hyperparameters),
        "model": model_dir_fingerprint(args.model),
        "reference": model_dir_fingerprint(args.reference) if args.reference else None,
        "forget_file": file_digest(args.forget),
        "retain_file": file_digest(args.retain) if args.retain else None,
        "template": args.template,
        "max_length": args.max_length,
        "micro_batches": args.micro_batches,
        "precision": args.precision or args.dtype,
        "remat": args.remat,
        "scan_layers": args.scan_layers,
        "lora": lora_options(args),
    }
    return jsonable(config)


def _claim_out(out: Path, config: dict, overwrite: bool) -> None:
    """Writes the run record into --out; a different record there (a crashed run of other
    settings) is refused unless --overwrite."""
    import json

    from jaxunlearn._io import atomic_write_text

    path = out / RUN_RECORD
    if path.is_file() and not overwrite:
        previous = json.loads(path.read_text(encoding="utf-8"))
        differ = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
        if differ:
            raise UsageError(
                f"--out {out} holds the output of another `jaxunlearn unlearn` run (it differs in "
                f"{', '.join(differ)}); choose a new --out, or pass --overwrite to replace it."
            )
        print(f"{PROG} unlearn: --out {out} is this run's own; continuing it.", file=sys.stderr)
    atomic_write_text(path, json.dumps(config, indent=1, sort_keys=True) + "\n")


def _check_layers(recipe: Any, model_dir: str) -> None:
    """Methods that name layers (RMU) must name layers the model has: checked from
    config.json, before any weight is loaded."""
    from jaxunlearn.checkpoints._model import read_config

    h = recipe.hyperparameters
    chosen = [h["layer"]] if "layer" in h else []
    chosen += list(h.get("layers", ()))
    if not chosen:
        return
    n = read_config(model_dir).num_hidden_layers
    bad = sorted({layer for layer in chosen if not 0 <= int(layer) < n})
    if bad:
        raise UsageError(
            f"method {recipe.name!r}: layer(s) {bad} do not exist in this {n}-layer model (layers "
            f"0..{n - 1}); the defaults are open-unlearning's for a 32-layer 7B model. Pass e.g. "
            f"--set layer={max(n * 7 // 32, 0)} --set layers={','.join(map(str, _around(n)))}."
        )


def _around(n: int) -> list[int]:
    layer = max(n * 7 // 32, 0)
    return list(range(max(layer - 2, 0), layer + 1))


def prepare_data(args: argparse.Namespace, recipe: Any, tokenizer: Any) -> Any:
    """The run's `ForgetRetainSampler`, built by `jaxunlearn.data.forget_retain`.

    Raises:
      UsageError: a missing retain set for a method that needs one, an unreadable or empty
        file, text records for a method that pairs questions with refusals.
    """
    from jaxunlearn import data

    retain = None
    if recipe.needs_retain:
        if not args.retain:
            raise UsageError(
                f"method {recipe.name!r} needs a retain set: pass --retain FILE (JSON Lines of "
                "question/answer or text records the model must keep)."
            )
        retain = args.retain
    elif args.retain:
        print(
            f"note: method {recipe.name!r} uses no retain set; --retain ignored.", file=sys.stderr
        )
    refusals = (args.refusals or True) if recipe.needs_alternate else None
    with bad_input():
        return data.forget_retain(
            tokenizer,
            args.forget,
            retain,
            fmt=args.template,
            max_length=args.max_length,
            batch_size=args.batch_size,
            seed=args.seed,
            refusals=refusals,
            buckets=parse_buckets(args.buckets),
            drop_last=args.mesh is not None,
        )


def _ssd(model, recipe, sampler, mesh, log_path) -> Any:
    from jaxunlearn import train

    result = train.ssd_unlearn_sampler(model, sampler, recipe.hyperparameters, mesh=mesh)
    log = train.MetricsLog(log_path, None, 0)
    log.write(result.metrics[0])
    log.close()
    return result


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxunlearn unlearn``; returns the exit status."""
    from jaxunlearn import recipes

    if args.distributed:
        # Must run before any other JAX call so every host sees the global device set.
        from jaxunlearn import parallel

        parallel.initialize_distributed()
    with bad_input():
        recipe = recipes.recipe(args.method, **recipes.parse_overrides(args.method, args.set or []))
    if args.steps < 0 or args.batch_size < 1 or args.micro_batches < 1:
        raise UsageError("--steps must be >= 0 and --batch-size, --micro-batches >= 1.")
    lora = lora_options(args)
    if lora is not None and recipe.kind == "one_shot":
        raise UsageError(f"method {recipe.name!r} edits weights in one shot; drop --lora-rank.")
    out = Path(args.out)
    _check_paths(args, out)
    if args.save_adapter:
        _check_adapter_dir(Path(args.save_adapter), out, args.overwrite)
    with bad_input():
        _check_layers(recipe, args.model)
    if args.scan_layers and "layer" in recipe.hyperparameters:
        raise UsageError(
            f"method {recipe.name!r} reads and trains chosen layers by name; drop --scan-layers "
            "(stacked layers have no per-layer parameters)."
        )
    import jax

    from jaxunlearn._io import BusyError, exclusive_lock, recover_interrupted_save

    try:
        with contextlib.ExitStack() as locks:
            if jax.process_index() == 0:  # one writer: process 0 writes the outputs
                locks.enter_context(exclusive_lock(out, "--out directory"))
                if args.checkpoint_dir:
                    locks.enter_context(exclusive_lock(args.checkpoint_dir, "--checkpoint-dir"))
                repaired = recover_interrupted_save(out)
                if repaired:
                    print(f"{PROG} unlearn: {repaired}.", file=sys.stderr)
            return _locked_run(args, recipe, out)
    except BusyError as e:
        raise UsageError(str(e)) from None


def _locked_run(args: argparse.Namespace, recipe: Any, out: Path) -> int:
    """The run, with --out (and --checkpoint-dir) locked against other writers."""
    import jax

    from jaxunlearn import train
    from jaxunlearn.checkpoints import load_pretrained, load_tokenizer

    mesh = parse_mesh(args.mesh)
    lora = lora_options(args)
    source = args.tokenizer or args.model
    with bad_input(f"{'--tokenizer' if args.tokenizer else '--model'} {source}: "):
        tokenizer = load_tokenizer(source)
    sampler = prepare_data(args, recipe, tokenizer)
    data = sampler
    if args.distributed and mesh is not None and jax.process_count() > 1:
        from jaxunlearn.distributed import ProcessLocalSampler

        data = ProcessLocalSampler(sampler, mesh)  # each host reads only its rows
    options, policy = model_options(args)
    with bad_input():
        options |= {"mesh": mesh, "allow_pickle": args.allow_pickle}
        model = load_pretrained(args.model, **options)
        ref_model = load_pretrained(args.reference, **options) if args.reference else None
        config = _run_config(args, recipe)
    if lora is not None:
        from jaxunlearn.models.lora import apply_lora

        with bad_input("--lora-targets: "):
            model = apply_lora(model, **lora)  # only the adapters are nnx.Params
    tx = recipe.tx
    if policy is not None and not isinstance(tx, train.StepBuilder):
        tx = policy.optimizer(tx)  # e.g. float32 moments for bfloat16 parameters

    out.mkdir(parents=True, exist_ok=True)
    _claim_out(out, config, args.overwrite)
    _say_resume(args)
    log_path = out / "metrics.jsonl"
    print(
        f"{PROG} unlearn: {recipe.name} ({recipe.description}); {len(sampler.forget)} forget / "
        f"{len(sampler.retain or [])} retain items, format {sampler.prompt_format!r}, "
        f"{args.steps} steps.",
        file=sys.stderr,
    )
    try:
        if recipe.kind == "one_shot":
            result = _ssd(model, recipe, sampler, mesh, log_path)
        else:
            result = train.unlearn(
                model, recipe.objective, tx, data, steps=args.steps, mesh=mesh,
                seed=args.seed, micro_batches=args.micro_batches,
                checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                resume=not args.no_resume, log_path=log_path, tensorboard_dir=args.tensorboard,
                progress=not args.no_progress, ref_model=ref_model,
                precompute_reference=not args.no_precompute_reference, run_config=config,
            )  # fmt: skip
    except train.NonFiniteLossError as e:
        print(f"{PROG} unlearn: error: {e} No model was written to {out}.", file=sys.stderr)
        return EXIT_FAILED
    except (ImportError, ValueError) as e:
        raise UsageError(str(e)) from None
    if result.stopped:
        print(f"{PROG} unlearn: stopped early: {result.stopped}", file=sys.stderr)
    if _unchanged(model, result.model):
        if args.steps > 0:
            print(f"{PROG} unlearn: error: {_nothing_done(recipe, result)}", file=sys.stderr)
            return EXIT_FAILED
        print(f"warning: --steps 0: the model is written unchanged to {out}.", file=sys.stderr)
    wrote = _write_outputs(args, result.model, out, tokenizer, lora is not None)
    last = result.metrics[-1] if result.metrics else {}
    loss = f", final loss {last['loss']:.4g}" if "loss" in last else ""
    print(f"wrote {wrote} ({result.step} steps{loss}); metrics in {log_path}")
    return EXIT_OK


def _write_outputs(args: argparse.Namespace, model: Any, out: Path, tokenizer: Any, lora: bool):
    """Saves the unlearned model: an HF directory in --out (a LoRA model merged first, unless
    --no-merge) and, for LoRA, the PEFT adapter (--save-adapter, or --out with --no-merge)."""
    from jaxunlearn.checkpoints import save_pretrained

    if not lora:
        save_pretrained(model, out, tokenizer=tokenizer, overwrite=True)
        return f"the unlearned model to {out}"
    from jaxunlearn.checkpoints.peft import save_peft_adapter
    from jaxunlearn.models.lora import merge_lora

    wrote = []
    if args.merge:
        save_pretrained(merge_lora(model), out, tokenizer=tokenizer, overwrite=True)
        wrote.append(f"the merged unlearned model to {out}")
    adapter = args.save_adapter or (None if args.merge else out)
    if adapter is not None:
        # Both directories were checked before training (_check_paths, _check_adapter_dir).
        save_peft_adapter(model, adapter, base_model_name_or_path=args.model, overwrite=True)
        wrote.append(f"the PEFT LoRA adapter to {adapter}")
    return " and ".join(wrote)


def _say_resume(args: argparse.Namespace) -> None:
    if not args.checkpoint_dir or args.no_resume:
        return
    from jaxunlearn.checkpoints import TrainCheckpointer

    ckpt = TrainCheckpointer(args.checkpoint_dir)
    try:
        step = ckpt.latest_step()
    finally:
        ckpt.close()
    if step is not None:
        print(
            f"{PROG} unlearn: resuming from step {step} of {args.checkpoint_dir} (its recorded "
            "settings are checked against this run's).",
            file=sys.stderr,
        )


def _unchanged(before: Any, after: Any) -> bool:
    """True when every parameter of `after` equals the one of `before`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    pairs = zip(
        jax.tree.leaves(nnx.state(before, nnx.Param)), jax.tree.leaves(nnx.state(after, nnx.Param))
    )
    return all(bool(jnp.array_equal(a, b)) for a, b in pairs)


def _nothing_done(recipe: Any, result: Any) -> str:
    """Why a run that changed no parameter failed, and the hyperparameter to change."""
    advice = {
        "ssd": "SSD selected no parameter: its threshold is too strict for this model; lower "
        "--set alpha (e.g. alpha=1) so that more parameters count as forget-specific",
        "hamu": "HAMU stopped before its first update (its constraint is infeasible for these "
        "gradients); lower --set constraint or raise --set radius",
    }.get(recipe.name, "no update changed the model; raise --set learning_rate or --steps")
    stopped = f" ({result.stopped})" if result.stopped else ""
    return f"the run changed no parameter{stopped}: {advice}. No model was written."


def register(subparsers: Any) -> None:
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
    add_model_arguments(p)
    add_lora_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pytorch_model.bin weights (unpickling can run arbitrary code)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-precompute-reference",
        action="store_true",
        help="run the reference model in every step instead of precomputing log-probs",
    )
    p.set_defaults(run=run)
