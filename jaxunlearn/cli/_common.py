"""What every subcommand shares: the error type, the exit codes, mesh and bucket parsing."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

PROG = "jaxunlearn"

EXIT_OK = 0  # done; the outputs are complete
EXIT_FAILED = 1  # the run itself failed (non-finite loss, a run that changed nothing)
EXIT_USAGE = 2  # bad input: a flag, a file, a model directory; nothing was written


class UsageError(ValueError):
    """Bad input on the command line: reported as ``jaxunlearn <cmd>: error: ...``, exit 2."""


@contextlib.contextmanager
def bad_input(prefix: str = "") -> Iterator[None]:
    """Turns the library's input errors (ValueError, FileNotFoundError, KeyError) into a
    `UsageError`, optionally prefixed with the flag they concern."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise UsageError(f"{prefix}{message}") from None


def parse_mesh(text: str | None) -> Any:
    """``data=4,fsdp=2`` -> a `parallel.mesh`; None or "" -> None (one device)."""
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
    with bad_input(f"--mesh {text!r}: "):
        return parallel.mesh(**sizes)


def parse_buckets(text: str | None) -> tuple[int, ...] | None:
    """``64,128,256`` -> (64, 128, 256); None -> None (the default ladder)."""
    if not text:
        return None
    try:
        return tuple(sorted(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise UsageError(f"--buckets {text!r}: expected comma-separated ints.") from None


def precision_dtype(name: str) -> Any:
    """The parameter dtype of ``--dtype float32|bfloat16``."""
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def add_model_arguments(parser: Any) -> None:
    """How the model is built: precision policy, rematerialisation, stacked layers, attention."""
    parser.add_argument(
        "--precision",
        choices=("float32", "bf16", "bf16-params"),
        help="float32; bf16 (bfloat16 compute, float32 master weights and optimizer state); "
        "bf16-params (bfloat16 parameters, float32 optimizer moments). Losses, log-softmax "
        "and metrics are float32 always. Default: --dtype",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="parameter dtype when --precision is not given (bfloat16: compute and store)",
    )
    parser.add_argument(
        "--remat",
        default="none",
        choices=("none", "matmuls", "full"),
        help="per-block rematerialisation (saves activation memory for recomputation)",
    )
    parser.add_argument(
        "--scan-layers",
        action="store_true",
        help="stack the decoder layers and scan over them (compile time flat in depth)",
    )
    parser.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "einsum", "dot_product_attention"),
        help="auto: jax.nn.dot_product_attention (fused kernels) on GPU/TPU, einsum on CPU",
    )


def model_options(args: Any) -> tuple[dict[str, Any], Any]:
    """(`load_pretrained` keyword arguments, the precision policy or None) of the flags of
    `add_model_arguments`."""
    options = {"remat": args.remat, "scan_layers": args.scan_layers, "attention": args.attention}
    if args.precision is None:
        return {"dtype": precision_dtype(args.dtype), **options}, None
    from jaxunlearn import parallel

    policy = parallel.precision_policy(args.precision)
    return {**policy.model_kwargs(), **options}, policy


def add_lora_arguments(parser: Any) -> None:
    """LoRA unlearning: train low-rank adapters only, export merged and/or as a PEFT adapter."""
    parser.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help="train only LoRA adapters of rank R on the --lora-targets kernels (base frozen)",
    )
    parser.add_argument(
        "--lora-alpha", type=float, help="LoRA alpha; updates are scaled by alpha/R (default 2R)"
    )
    parser.add_argument(
        "--lora-targets",
        default="q,k,v,o,gate,up,down",
        help="comma-separated kernels to adapt: q,k,v,o,gate,up,down or module names "
        "(default: all seven)",
    )
    parser.add_argument(
        "--save-adapter", metavar="DIR", help="also write the adapter in PEFT's format to DIR"
    )
    parser.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the merged model (base + adapters) to --out as a Hugging Face directory "
        "(default); --no-merge writes only the PEFT adapter (to --save-adapter, else --out)",
    )


def lora_options(args: Any) -> dict[str, Any] | None:
    """`jaxunlearn.models.lora.apply_lora` keyword arguments of the LoRA flags (None: no LoRA).

    Raises:
      UsageError: LoRA-only flags without --lora-rank, a rank below 1, empty targets, or
        adapter export from stacked layers (PEFT names per-layer modules).
    """
    if args.lora_rank is None:
        used = [flag for flag, on in (("--lora-alpha", args.lora_alpha is not None),
                                      ("--save-adapter", args.save_adapter),
                                      ("--no-merge", not args.merge)) if on]  # fmt: skip
        if used:
            raise UsageError(f"{', '.join(used)} needs --lora-rank R (LoRA unlearning).")
        return None
    if args.lora_rank < 1:
        raise UsageError(f"--lora-rank must be a positive int, got {args.lora_rank}.")
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if not targets:
        raise UsageError("--lora-targets is empty; pass e.g. q,v or q,k,v,o,gate,up,down.")
    if getattr(args, "scan_layers", False) and (args.save_adapter or not args.merge):
        raise UsageError(
            "--save-adapter/--no-merge with --scan-layers: PEFT adapters name per-layer modules, "
            "which stacked layers do not have; drop --scan-layers to export an adapter."
        )
    alpha = float(2 * args.lora_rank if args.lora_alpha is None else args.lora_alpha)
    return {"rank": args.lora_rank, "alpha": alpha, "targets": targets}


def add_compilation_cache_argument(parser: Any) -> None:
    """Adds ``--compilation-cache DIR|auto|off`` (JAX's persistent compilation cache)."""
    parser.add_argument(
        "--compilation-cache",
        default="auto",
        metavar="DIR|auto|off",
        help="keep compiled XLA programs in DIR so later runs skip compilation (auto: "
        "$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/jaxunlearn/"
        "jax-compilation-cache, else ~/.cache/...; off: disabled)",
    )


def apply_compilation_cache(args: Any) -> None:
    """Turns on the cache ``--compilation-cache`` names; call before anything compiles."""
    if args.compilation_cache == "off":
        return
    import jax

    from jaxunlearn.eval.inference import enable_compilation_cache

    # auto keeps a directory the user already gave JAX (JAX_COMPILATION_CACHE_DIR).
    given = jax.config.jax_compilation_cache_dir
    auto = args.compilation_cache == "auto"
    enable_compilation_cache(
        given if auto and given else (None if auto else args.compilation_cache)
    )
