"""Quantization-recovery attack: round-to-nearest weight quantization of an unlearned model.

Zhang et al. (ICLR 2025) found that 4-bit quantization of an unlearned LLM brings back much of
what gradient-ascent / NPO-style unlearning removed: the unlearning update is often smaller than
half a quantization step, so the unlearned and the target weights round to the same grid
point. This module fake-quantizes a jaxunlearn model (quantize, then dequantize back to the
parameter dtype, so every evaluation function runs on it unchanged):

- every linear kernel (a parameter named ``kernel`` with >= 2 dimensions, outside ``lm_head``)
  is quantized group-wise: groups of ``group_size`` consecutive input rows of one output
  column share a symmetric scale s = max|W_G| / (2^(b-1) - 1), and
  W_hat = s * clip(round(W / s), -2^(b-1), 2^(b-1) - 1);
- embeddings, the LM head, norms and biases stay in full precision (bitsandbytes' defaults).

We write the RTN ourselves rather than use `qwix.quantize`: qwix 0.1.8's symmetric scale is
absmax / (qmax + 0.5), not the absmax / qmax of the paper's RTN, and its PTQ model wraps
kernels in new module types, whereas a fake-quantized copy keeps the model a plain jaxunlearn
model that the jitted, mesh-sharded scoring code accepts as is.

References:
  Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025,
  arXiv:2410.16454.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_GROUP_SIZE = 128
_SKIP = re.compile(r"(^|\.)(lm_head|embed|wte|wpe)")


def _check(bits: int, group_size: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def _grouped(w: jax.Array, group_size: int) -> tuple[jax.Array, int]:
    """[..., IN, OUT] -> [..., G, group_size, OUT] (zero rows appended), and IN."""
    n_in = w.shape[-2]
    pad = -n_in % group_size
    if pad:
        w = jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, pad), (0, 0)])
    shape = (*w.shape[:-2], w.shape[-2] // group_size, group_size, w.shape[-1])
    return w.reshape(shape), n_in


def quantize_codes(w: jax.Array, bits: int, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Integer codes and scales of group-wise symmetric RTN over the input axis (-2).

    Args:
      w: [..., IN, OUT] kernel (leading axes, e.g. stacked layers, are independent).
      bits: bits per weight.
      group_size: consecutive input rows sharing one scale per output column.

    Returns:
      (codes [..., G, group_size, OUT] int32 in [-2^(b-1), 2^(b-1) - 1], scales
      [..., G, 1, OUT] float32), G = ceil(IN / group_size); padded rows have code 0.
    """
    _check(bits, group_size)
    g, _ = _grouped(w.astype(jnp.float32), group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = jnp.max(jnp.abs(g), axis=-2, keepdims=True) / qmax
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(g / safe), -qmax - 1, qmax).astype(jnp.int32)
    return codes, scale


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def rtn_fake_quantize(w: jax.Array, *, bits: int, group_size: int) -> jax.Array:
    """W_hat = s * clip(round(W / s)) group-wise over the input axis, in `w`'s dtype and shape.

    A group whose weights are all zero stays zero.
    """
    codes, scale = quantize_codes(w, bits, group_size)
    out = (codes.astype(jnp.float32) * scale).reshape(*codes.shape[:-3], -1, codes.shape[-1])
    return out[..., : w.shape[-2], :].astype(w.dtype)


def is_linear_kernel(path: str, value: Any) -> bool:
    """Whether parameter `path` is a linear kernel the attack quantizes (not embeddings/head)."""
    return path.split(".")[-1] == "kernel" and value.ndim >= 2 and not _SKIP.search(path)


def _kernels(model: nnx.Module, select: Callable[[str, Any], bool]) -> dict[str, Any]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, p)): v for p, v in flat if select(".".join(map(str, p)), v[...])}


def quantize_model(
    model: nnx.Module,
    bits: int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    select: Callable[[str, Any], bool] = is_linear_kernel,
) -> nnx.Module:
    """A fake-quantized copy of `model` (RTN, see the module docstring); `model` is unchanged.

    Each kernel keeps its sharding, so a model loaded onto a mesh stays FSDP-sharded.

    Args:
      model: a jaxunlearn model.
      bits: 8 or 4 (any 2..16 works).
      group_size: input rows per scale group (128 as the paper's RTN; a kernel with fewer
        input rows is one group).
      select: ``(path, value) -> bool`` choosing the parameters to quantize.

    Returns:
      A new model with quantized-then-dequantized kernels.

    Raises:
      ValueError: bad `bits` / `group_size`, or no parameter selected.
    """
    _check(bits, group_size)
    out = nnx.clone(model)
    kernels = _kernels(out, select)
    if not kernels:
        raise ValueError("quantize_model: no linear kernel selected; check `select`")
    for var in kernels.values():
        value = var[...]
        new = rtn_fake_quantize(value, bits=bits, group_size=min(group_size, value.shape[-2]))
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            new = jax.device_put(new, sharding)
        var[...] = new
    return out


def changed_code_fraction(
    target: nnx.Module,
    unlearned: nnx.Module,
    bits: int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    select: Callable[[str, Any], bool] = is_linear_kernel,
) -> float:
    """Fraction of quantized kernel weights whose integer code differs between two models.

    Zhang et al.'s mechanism: when unlearning moves a weight by less than half a quantization
    step it rounds to the target's grid point; a small fraction here predicts recovery.
    (Codes are compared with each model's own scales, as each would be quantized alone.)
    """
    a, b = _kernels(target, select), _kernels(unlearned, select)
    if a.keys() != b.keys():
        raise ValueError("changed_code_fraction: the models have different kernels")
    _check(bits, group_size)
    counts, total = [], 0
    for name, var in a.items():
        value = var[...]
        g = min(group_size, value.shape[-2])
        counts.append(_changed_codes(value, b[name][...], bits=bits, group_size=g))
        total += int(value.size)
    return int(sum(int(c) for c in counts)) / total


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _changed_codes(a: jax.Array, b: jax.Array, *, bits: int, group_size: int) -> jax.Array:
    return jnp.sum(quantize_codes(a, bits, group_size)[0] != quantize_codes(b, bits, group_size)[0])


__all__ = [
    "DEFAULT_GROUP_SIZE",
    "changed_code_fraction",
    "is_linear_kernel",
    "quantize_codes",
    "quantize_model",
    "rtn_fake_quantize",
]
