"""A layer scan that carries bfloat16 weights as uint16 bits, for training on XLA:CPU.

XLA:CPU has no bfloat16 dot, slice or update-slice kernels: its float-normalisation pass
rewrites those ops on bfloat16 operands into float32 ones with converts around them. In a
`jax.lax.scan` over stacked [L, ...] bfloat16 weights that converts the whole stack to
float32 (the convert is loop-invariant and is hoisted out of the loop), and the per-layer
gradients are accumulated into a float32 [L, ...] stack. For a 1B-parameter model that is
~8 GiB of float32 copies that never exist on a GPU or TPU.

`bits_scan` avoids both: the stacked weights travel through the scan as their raw uint16
bits (`jax.lax.bitcast_convert_type` is not arithmetic, and integer slices are not
normalised); each scan step bitcasts its own layer's slice back to bfloat16, so only one
layer is ever converted. The backward pass is a `jax.custom_vjp`: a reverse scan that
recomputes each layer from its saved input (as remat "full" does), takes that layer's
parameter gradients, rounds them to the parameter dtype and writes their bits into a
stacked uint16 gradient. The values are those of plain `jax.grad` through `jax.lax.scan`
with `jax.checkpoint` on the body, up to the order of float rounding inside one layer.

It only helps on XLA:CPU with bfloat16 parameters (GPUs and TPUs handle bfloat16 slices
natively), supports reverse mode only (no `jax.jvp`), and always recomputes each layer in
the backward pass.

References:
  Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016, arXiv:1604.06174
  (recomputing each layer from its input in the backward pass).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["bits_scan", "bits_take", "from_bits", "to_bits"]


def _is_bf16(x: Any) -> bool:
    return jnp.dtype(x.dtype) == jnp.dtype(jnp.bfloat16)


def to_bits(tree: Any) -> Any:
    """Every bfloat16 leaf of `tree` as its uint16 bit pattern (other leaves unchanged)."""
    return jax.tree.map(
        lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_bf16(x) else x, tree
    )


def from_bits(tree: Any) -> Any:
    """Inverse of `to_bits`: every uint16 leaf read back as bfloat16.

    (Differentiable parameters and activations are never uint16, so the bits are
    unambiguous.)
    """
    return jax.tree.map(
        lambda x: jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x,
        tree,
    )


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def bits_scan(
    apply: Callable[..., jax.Array],
    params: Any,
    h: jax.Array,
    consts: Any,
    statics: Any = (),
    per_layer: Any = (),
) -> jax.Array:
    """``h`` through L layers, ``h = apply(params[l], h, consts, statics, per_layer[l])``.

    Equal to ``jax.lax.scan`` over the stacked `params` with the body under
    ``jax.checkpoint`` (remat "full"), but bfloat16 leaves of `params` (and the saved layer
    inputs) pass through the scans as uint16 bits, so XLA:CPU never converts the whole stack
    to float32 (see the module docstring).

    Args:
      apply: one layer, ``apply(layer_params, h, consts, statics, layer_per_layer) -> h``
        with the output of h's shape and dtype. Must be a pure function of its arguments.
      params: pytree of stacked parameters, every leaf [L, ...]; differentiated.
      h: the first layer's input; differentiated.
      consts: pytree of floating arrays every layer reads (e.g. RoPE tables); differentiated
        (their cotangents are summed over the layers).
      statics: pytree of arrays every layer reads that are not differentiated (masks).
      per_layer: pytree of [L, ...] arrays, not differentiated (per-layer flags).

    Returns:
      The last layer's output.
    """
    return _bits_scan(apply, params, h, consts, statics, per_layer)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bits_scan(apply, params, h, consts, statics, per_layer):
    return _forward(apply, params, h, consts, statics, per_layer)[0]


def _forward(apply, params, h, consts, statics, per_layer):
    bits = to_bits(params)

    def body(h, xs):
        layer_bits, flags = xs
        out = apply(from_bits(layer_bits), h, consts, statics, flags)
        return out, to_bits(h)

    out, inputs = jax.lax.scan(body, h, (bits, per_layer))
    return out, (bits, inputs, consts, statics, per_layer)


def _backward(apply, residuals, g):
    bits, inputs, consts, statics, per_layer = residuals

    def body(carry, xs):
        g_h, g_consts = carry
        layer_bits, h_bits, flags = xs
        layer, h_in = from_bits(layer_bits), from_bits(h_bits)
        _, vjp = jax.vjp(lambda p, x, c: apply(p, x, c, statics, flags), layer, h_in, consts)
        g_layer, g_h, g_c = vjp(g_h)
        g_layer = jax.tree.map(lambda d, p: d.astype(p.dtype), g_layer, layer)
        g_consts = jax.tree.map(jnp.add, g_consts, g_c)
        return (g_h, g_consts), to_bits(g_layer)

    init = (g, jax.tree.map(jnp.zeros_like, consts))
    (g_h, g_consts), g_bits = jax.lax.scan(body, init, (bits, inputs, per_layer), reverse=True)
    g_params = from_bits(g_bits)
    return (
        g_params,
        g_h,
        g_consts,
        jax.tree.map(_zero_cotangent, statics),
        jax.tree.map(_zero_cotangent, per_layer),
    )


_bits_scan.defvjp(_forward, _backward)


@jax.custom_vjp
def bits_take(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows `ids` of `table` (``table[ids]``, an embedding lookup) with a lean gradient.

    The gradient of a gather is a scatter-add into a zero [V, D] table; XLA:CPU does a
    bfloat16 scatter-add in float32, so every lookup's gradient holds a float32 [V, D]
    buffer (1 GiB for a 128K x 2048 vocabulary). Here the backward pass sums the rows of
    repeated ids first (a segment sum over at most N rows) and then *sets* each distinct
    row once, as uint16 bits into a zero table, which no pass converts to float32. The
    values equal the scatter-add's up to the order of the float32 additions.

    Args:
      table: [V, D] embedding table (any float dtype; the memory saving is for bfloat16).
      ids: integer ids of any shape, in [0, V).

    Returns:
      ``table[ids]``, shape ``ids.shape + (D,)``.
    """
    return jnp.take(table, ids, axis=0)


def _take_fwd(table, ids):
    # Residuals must be arrays: an empty [V, 0] slice keeps the table's length and dtype.
    return jnp.take(table, ids, axis=0), (ids, table[:, :0])


def _take_bwd(residuals, g):
    ids, empty = residuals
    vocab = empty.shape[0]
    flat = ids.reshape(-1)
    n = flat.shape[0]
    rows = g.reshape(n, -1).astype(jnp.float32)
    distinct, inverse = jnp.unique(flat, size=n, fill_value=vocab, return_inverse=True)
    summed = jax.ops.segment_sum(rows, inverse.reshape(-1), num_segments=n).astype(empty.dtype)
    # A zero that depends on the cotangent: a constant table would be allocated (and, with
    # two lookups, copied) at the start of the program, long before the backward pass
    # reaches it. `x - x` is not folded for floats (NaN); non-finite rows give 0 here.
    probe = rows[0, 0]
    zero = jnp.where(jnp.isfinite(probe), probe - probe, 0.0).astype(empty.dtype)
    zeros = jnp.full((vocab, rows.shape[1]), zero, empty.dtype)
    if _is_bf16(empty):
        out = to_bits(zeros).at[distinct].set(to_bits(summed), mode="drop")
        grad = from_bits(out)
    else:
        grad = zeros.at[distinct].set(summed, mode="drop")
    return grad, _zero_cotangent(ids)


bits_take.defvjp(_take_fwd, _take_bwd)
