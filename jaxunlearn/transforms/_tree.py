"""Whole-pytree linear algebra shared by the transforms: global inner products and stacks.

A "stack" is a pytree whose leaves carry an extra leading axis of length k (k vectors in
parameter space, e.g. a retain-gradient basis). Inner products are global: a sum over
every leaf, never per tensor. All products run in float32 at HIGHEST matmul precision,
because TPU/GPU default float32 matmuls round through bfloat16/TF32 and would break the
orthogonality the projections rely on.
"""

from typing import Any

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def f32(tree: Any) -> Any:
    """`tree` with every leaf cast to float32."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def leaf_vdot(x: jax.Array, y: jax.Array) -> jax.Array:
    """<x, y> of two arrays (flattened), float32 at HIGHEST precision."""
    return jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32), precision=_HIGHEST)


def vdot(a: Any, b: Any) -> jax.Array:
    """Global <a, b>: float32 sum over all leaves."""
    parts = jax.tree.leaves(jax.tree.map(leaf_vdot, a, b))
    return sum(parts, jnp.zeros((), jnp.float32))


def stack_dot(stack: Any, tree: Any) -> jax.Array:
    """[k] inner products <stack_j, tree> for a stack with leaves [k, ...]."""

    def leaf(s, x):
        return jnp.dot(
            s.reshape(s.shape[0], -1), x.reshape(-1).astype(jnp.float32), precision=_HIGHEST
        )

    parts = jax.tree.leaves(jax.tree.map(leaf, stack, tree))
    return sum(parts[1:], parts[0]) if parts else jnp.zeros((0,), jnp.float32)


def stack_gram(stack: Any) -> jax.Array:
    """[k, k] Gram matrix <stack_i, stack_j>, one matmul per leaf."""

    def leaf(s):
        m = s.reshape(s.shape[0], -1)
        return jnp.dot(m, m.T, precision=_HIGHEST)

    parts = jax.tree.leaves(jax.tree.map(leaf, stack))
    return sum(parts[1:], parts[0])


def stack_combine(coeffs: jax.Array, stack: Any) -> Any:
    """Stack with leaves [m, ...]: row i is sum_j coeffs[i, j] stack_j."""
    return jax.tree.map(lambda s: jnp.tensordot(coeffs, s, axes=(1, 0), precision=_HIGHEST), stack)


def stack_apply(stack: Any, c: jax.Array) -> Any:
    """Tree sum_j c[j] stack_j (the transpose of `stack_dot`)."""
    return jax.tree.map(lambda s: jnp.tensordot(c, s, axes=(0, 0), precision=_HIGHEST), stack)


def check_same_structure(reference: Any, other: Any, *, what: str, where: str) -> None:
    """Raises ValueError naming the first leaf where `other` differs from `reference`."""
    ref_paths = jax.tree_util.tree_leaves_with_path(reference)
    other_paths = jax.tree_util.tree_leaves_with_path(other)
    if jax.tree.structure(reference) != jax.tree.structure(other):
        ref_keys = {jax.tree_util.keystr(p) for p, _ in ref_paths}
        other_keys = {jax.tree_util.keystr(p) for p, _ in other_paths}
        missing = sorted(ref_keys - other_keys)[:3]
        extra = sorted(other_keys - ref_keys)[:3]
        raise ValueError(
            f"{where}: {what} must have the same pytree structure as the parameters; "
            f"missing leaves {missing}, unexpected leaves {extra}. Build it from the same "
            "params pytree (e.g. jax.tree.map over the params)."
        )
    for (path, ref), (_, leaf) in zip(ref_paths, other_paths):
        if jnp.shape(ref) != jnp.shape(leaf):
            raise ValueError(
                f"{where}: {what} leaf {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(leaf)}, but the parameter has shape {jnp.shape(ref)}."
            )
