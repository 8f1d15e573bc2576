"""What every subcommand shares: the error type, the exit codes, mesh and bucket parsing."""

from __future__ import annotations

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
