"""GS-LoRA's group-sparse penalty on LoRA adapters, as an optax transformation.

GS-LoRA adds ``strength * sum_g ||theta_g||_2`` (a group lasso) to the unlearning loss, where a
group g is a set of adapters (by default all adapters of one decoder layer). Its gradient
drives whole groups towards zero, so the forgetting concentrates in a few layers and the
others keep the base weights. `group_sparse` adds that gradient to the incoming gradients;
`group_sparse_penalty` is the value (for logging).

References:
  Zhao et al., "Continual Forgetting for Pre-trained Vision Models" (GS-LoRA),
  arXiv:2403.16685; "Practical Continual Forgetting for Pre-trained Vision Models"
  (GS-LoRA++), arXiv:2501.09705.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def layer_group(path: tuple[Any, ...]) -> str:
    """GS-LoRA's default group of an adapter: the decoder layer holding it.

    The path up to the first integer key (``("layers", 3, "mlp", "up_proj", "lora_a")`` ->
    ``"layers.3"``); adapters outside a layer list form one group per module.
    """
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    for i, key in enumerate(keys):
        if isinstance(key, int):
            return ".".join(map(str, keys[: i + 1]))
    return ".".join(map(str, keys[:-1]))


def _groups(tree: Any, group_fn: Callable[[tuple], str]) -> tuple[list[str], Any]:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    labels = [group_fn(tuple(p)) for p, _ in paths_leaves]
    return labels, treedef


def group_norms(params: Any, group_fn: Callable[[tuple], str] = layer_group) -> dict[str, Any]:
    """{group: ``||theta_g||_2``} over the adapter groups of a parameter pytree."""
    labels, _ = _groups(params, group_fn)
    squares: dict[str, Any] = {}
    for label, x in zip(labels, jax.tree.leaves(params)):
        squares[label] = squares.get(label, 0.0) + jnp.sum(jnp.square(x.astype(jnp.float32)))
    return {label: jnp.sqrt(s) for label, s in squares.items()}


def group_sparse_penalty(
    params: Any, strength: float, group_fn: Callable[[tuple], str] = layer_group
) -> jax.Array:
    """GS-LoRA's structure loss ``strength * sum_g ||theta_g||_2`` (a group lasso)."""
    return strength * sum(group_norms(params, group_fn).values())


def group_sparse(
    strength: float, group_fn: Callable[[tuple], str] = layer_group
) -> optax.GradientTransformation:
    """Adds the gradient of GS-LoRA's group-sparse penalty to the incoming gradients.

    ``g += strength * theta_g / ||theta_g||_2`` for each group g (zero for a group that is
    exactly zero, the subgradient closest to 0). Put it before the optimizer, e.g.
    ``optax.chain(group_sparse(1e-3), optax.adamw(1e-4))``; chained after GU's projection it
    penalises the projected forget gradient.

    Args:
      strength: the penalty weight (GS-LoRA's alpha).
      group_fn: maps a parameter's pytree path to its group label (default: `layer_group`).

    Returns:
      An optax transformation with an empty state; `update` needs ``params``.

    References:
      Zhao et al., arXiv:2403.16685 and arXiv:2501.09705 (GS-LoRA, GS-LoRA++).
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("group_sparse needs params: call tx.update(grads, state, params).")
        norms = group_norms(params, group_fn)
        labels, treedef = _groups(params, group_fn)
        leaves = []
        for label, g, p in zip(labels, jax.tree.leaves(updates), jax.tree.leaves(params)):
            norm = norms[label]
            scale = jnp.where(norm > 0, strength / jnp.where(norm > 0, norm, 1.0), 0.0)
            leaves.append(g + (scale * p.astype(jnp.float32)).astype(g.dtype))
        return jax.tree.unflatten(treedef, leaves), state

    return optax.GradientTransformation(init, update)


__all__ = ["group_norms", "group_sparse", "group_sparse_penalty", "layer_group"]
