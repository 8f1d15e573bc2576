"""SalUn's weight saliency: a mask of the parameters the forget loss is most sensitive to.

The mask keeps the fraction `keep` of scalar parameters with the largest |grad L_f|,
ranked globally over the whole pytree (SalUn's ``generate_mask.py``: gradients of the
forget loss accumulated over the forget set, absolute values, one global threshold), and
`masked_updates` multiplies every gradient by it so unlearning only moves salient weights.

References:
  Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in
  Both Image Classification and Generation", arXiv 2310.12508 (2023).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def saliency_mask(grads: Any, keep: float = 0.5) -> Any:
    """A 0/1 float32 pytree like `grads` marking the top `keep` share of |grads|.

    Args:
      grads: the (accumulated) forget-loss gradient pytree.
      keep: share of scalar parameters kept (SalUn's threshold 0.5), in (0, 1].

    Returns:
      The mask; exactly round(keep · n) entries are 1 (ties broken by position).
    """
    if not 0 < keep <= 1:
        raise ValueError(f"saliency_mask: keep must be in (0, 1], got {keep!r}.")
    leaves, treedef = jax.tree.flatten(grads)
    flat = np.concatenate([np.abs(np.asarray(g, np.float64)).ravel() for g in leaves])
    k = int(round(keep * flat.size))
    chosen = np.zeros(flat.size, np.float32)
    chosen[np.argsort(-flat, kind="stable")[:k]] = 1.0
    out, start = [], 0
    for g in leaves:
        out.append(jnp.asarray(chosen[start : start + np.size(g)].reshape(np.shape(g))))
        start += np.size(g)
    return jax.tree.unflatten(treedef, out)


def masked_updates(mask: Any) -> optax.GradientTransformation:
    """An optax transform multiplying updates by a fixed 0/1 `mask` (chain it first)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask), state

    return optax.GradientTransformation(init_fn, update_fn)
