"""Vocabulary-parallel token log-probs: the chunked log-softmax on a vocab-sharded head.

With tensor parallelism the unembedding ``kernel [D, V]`` is split along V over the mesh's
``"model"`` axis (`jaxunlearn.parallel_rules`). `jaxunlearn.scores.token_scores` folds over
vocabulary chunks with a dynamic slice of the kernel, and on a V-sharded kernel the
compiler gathers the whole head onto every device for that. `token_logprob` instead runs
the same chunked online log-sum-exp on each device's own columns (`jax.shard_map` over
``"model"``) and combines the per-shard results with one max and two sums over the axis:

    lse = M + log sum_s S_s exp(m_s - M),  M = max_s m_s,   label logit = sum_s l_s

where shard s has running max m_s, sum S_s = sum_v exp(z_v - m_s) over its columns, and
l_s = the label's logit if the label is one of its columns (else 0). The [B, T, V] logits
and the full head are never materialised on one device.

References:
  Shoeybi et al., "Megatron-LM", arXiv:1909.08053 (parallel cross-entropy over a
  vocab-split output layer); Milakov & Gimelshein, "Online normalizer calculation for
  softmax", arXiv:1805.02867.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxunlearn._vocab_chunks import DEFAULT_CHUNK_SIZE, fold_vocab
from jaxunlearn.parallel import BATCH_AXES

IGNORE_INDEX = -100


class _Head(NamedTuple):
    hidden: jax.Array
    kernel: jax.Array


def _local_fold(hidden, kernel, targets, offset, chunk_size, axes):
    """(running max, running sum, label logit) over this shard's columns."""
    shape = targets.shape
    init = {
        "max": jnp.full(shape, -jnp.inf, jnp.float32),
        "sum": jnp.zeros(shape, jnp.float32),
        "label": jnp.zeros(shape, jnp.float32),
    }
    # Inside shard_map the carry varies over every mesh axis, as the chunks do.
    init = jax.tree.map(lambda x: lax.pcast(x, axes, to="varying"), init)

    def body(carry, chunks, cols, fresh):
        (z,) = chunks
        masked = jnp.where(fresh, z, -jnp.inf)
        chunk_max = lax.stop_gradient(masked.max(-1))
        new_max = jnp.maximum(carry["max"], chunk_max)
        total = carry["sum"] * jnp.exp(carry["max"] - new_max) + jnp.exp(
            masked - new_max[..., None]
        ).sum(-1)
        hit = (cols + offset == targets[..., None]) & fresh
        label = carry["label"] + jnp.where(hit, z, 0.0).sum(-1)
        return {"max": new_max, "sum": total, "label": label}

    source = _Head(hidden, kernel)
    return fold_vocab((source,), body, init, chunk_size=chunk_size, positions=shape[1])


def token_logprob(
    head: Any,
    labels: jax.Array,
    mesh: Mesh,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    axis: str = "model",
) -> jax.Array:
    """log p(labels[:, t+1] | tokens <= t) with the head split over the vocabulary.

    The value (and gradient) of ``scores.token_scores(head, labels).logprob``, computed
    vocabulary-parallel over `axis`.

    Args:
      head: `Head(hidden [B, T, D], kernel [D, V])` (the model's ``out.head``).
      labels: int [B, T] in Hugging Face alignment, -100 where not scored.
      mesh: the mesh; B must divide over ``("data", "fsdp")`` and V over `axis`.
      chunk_size: vocabulary columns per chunk within a shard.
      axis: the mesh axis the vocabulary is split over.

    Returns:
      float32 [B, T-1], 0 where not scored.

    Raises:
      ValueError: V not divisible by the axis size (the message names both).
    """
    hidden, kernel = head.hidden, head.kernel
    vocab, ways = kernel.shape[-1], mesh.shape[axis]
    if vocab % ways:
        raise ValueError(
            f"vocabulary parallelism: mesh axis {axis!r} of size {ways} does not divide the "
            f"vocabulary ({vocab}); choose an axis size that divides {vocab}."
        )
    targets = labels[:, 1:].astype(jnp.int32)
    hidden = hidden[:, : targets.shape[1]]
    batch = P(BATCH_AXES)

    def local(h, k, t):
        offset = lax.axis_index(axis) * k.shape[-1]
        c = _local_fold(h, k, t, offset, min(chunk_size, k.shape[-1]), tuple(mesh.axis_names))
        top = lax.pmax(lax.stop_gradient(c["max"]), axis)
        total = lax.psum(c["sum"] * jnp.exp(c["max"] - top), axis)
        label = lax.psum(c["label"], axis)
        return label - (top + jnp.log(total))

    fn = jax.shard_map(local, mesh=mesh, in_specs=(batch, P(None, axis), batch), out_specs=batch)
    logprob = fn(hidden, kernel, targets)
    return jnp.where(targets != IGNORE_INDEX, logprob, 0.0)


__all__ = ["token_logprob"]
