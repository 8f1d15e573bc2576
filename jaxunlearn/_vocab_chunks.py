"""Folds over the vocabulary axis of next-token logits, one chunk of columns at a time.

Every loss and metric in `jaxunlearn.scores` is a reduction over the vocabulary
(logsumexp, the label's logit, an expectation under a softmax). `fold_vocab` runs such a
reduction as a `lax.scan` over vocabulary chunks. When the logits come as a `Head`
(final hidden states and the unembedding), each chunk's logits are computed inside the
scan body, so the [batch, seq, vocab] array is never materialised; the body is wrapped in
`jax.checkpoint`, so the backward pass recomputes a chunk instead of storing it.

The vocabulary need not be a multiple of the chunk: the last chunk is clamped to end at
`vocab`, and its columns already covered by the previous chunk are marked stale
(`fresh == False`) so bodies treat them as -inf logits. That is the same as padding the
vocabulary with -inf logits, without copying the kernel or the logits.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# 4096 columns keep one f32 chunk of a [8, 2048] batch at 256 MiB while a 150k vocab
# needs only ~37 scan steps.
DEFAULT_CHUNK_SIZE = 4096


def is_head(source: Any) -> bool:
    """Whether `source` is a `Head` (hidden states + unembedding) rather than logits."""
    return hasattr(source, "hidden") and hasattr(source, "kernel")


def vocab_size(source: Any) -> int:
    """Vocabulary size of logits [..., V] or of a Head's kernel [D, V]."""
    return int(source.kernel.shape[-1] if is_head(source) else source.shape[-1])


def position_shape(source: Any) -> tuple[int, ...]:
    """Leading (batch, seq) shape of logits [B, T, V] or of a Head's hidden [B, T, D]."""
    return tuple((source.hidden if is_head(source) else source).shape[:-1])


def check_source(source: Any, name: str) -> None:
    """Raise a ValueError naming `name` unless `source` is logits [B,T,V] or a valid Head."""
    if is_head(source):
        hidden, kernel = source.hidden, source.kernel
        if hidden.ndim != 3 or kernel.ndim != 2 or hidden.shape[-1] != kernel.shape[0]:
            raise ValueError(
                f"{name}: expected Head(hidden [B, T, D], kernel [D, V]); got hidden "
                f"{tuple(hidden.shape)} and kernel {tuple(kernel.shape)}. Pass the model "
                "output's `.head` (or its `.logits`)."
            )
    elif getattr(source, "ndim", None) != 3:
        raise ValueError(
            f"{name}: expected logits [B, T, V] or a Head(hidden, kernel); got "
            f"{type(source).__name__} with shape {getattr(source, 'shape', None)}."
        )


def _chunk_logits(source: Any, start: jax.Array, size: int, positions: int) -> jax.Array:
    """float32 logits of vocabulary columns [start, start + size) for the first `positions`.

    `source` is ("head", hidden [B, P, D], kernel [D, V]) or ("logits", logits [B, T, V]).
    """
    if source[0] == "head":
        _, hidden, kernel = source
        kernel = lax.dynamic_slice_in_dim(kernel, start, size, axis=1)
        # bf16 weights keep bf16 inputs but accumulate and return float32.
        return jnp.einsum("btd,dc->btc", hidden, kernel, preferred_element_type=jnp.float32)
    logits = source[1]
    # One dynamic slice trims positions and columns at once, so no shifted copy of the
    # full logits is ever made.
    chunk = lax.dynamic_slice(logits, (0, 0, start), (logits.shape[0], positions, size))
    return chunk.astype(jnp.float32)


def fold_vocab(
    sources: Sequence[Any],
    body: Callable[..., Any],
    init: Any,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    positions: int | None = None,
) -> Any:
    """Fold `body` over vocabulary chunks of one or more logits sources.

    Args:
      sources: logits [B, T, V] or `Head`s, all with the same B, T and V.
      body: `body(carry, chunks, cols, fresh) -> carry`, where `chunks` is a tuple of
        float32 [B, P, C] logits (one per source), `cols` the int32 [C] vocabulary ids of
        the chunk's columns and `fresh` a bool [C] that is False for columns already seen
        in the previous chunk (treat those as -inf logits).
      init: initial carry (a pytree of float32/int32 arrays).
      chunk_size: columns per chunk; clipped to V.
      positions: fold only the first P positions (P = T when None).

    Returns:
      The final carry.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (columns), got {chunk_size!r}.")
    vocab = vocab_size(sources[0])
    shape = position_shape(sources[0])
    for i, src in enumerate(sources[1:], start=1):
        if vocab_size(src) != vocab or position_shape(src) != shape:
            raise ValueError(
                f"logits source {i} has (batch, seq) {position_shape(src)} and vocab "
                f"{vocab_size(src)}, but source 0 has {shape} and {vocab}; both models must "
                "score the same batch with the same tokenizer."
            )
    size = min(chunk_size, vocab)
    num_chunks = -(-vocab // size)
    positions = shape[1] if positions is None else positions
    prepared = tuple(
        ("head", s.hidden[:, :positions], s.kernel) if is_head(s) else ("logits", s)
        for s in sources
    )

    def step(carry, index):
        nominal = index * size
        start = jnp.minimum(nominal, vocab - size)
        cols = start + jnp.arange(size, dtype=jnp.int32)
        fresh = cols >= nominal
        chunks = tuple(_chunk_logits(s, start, size, positions) for s in prepared)
        return body(carry, chunks, cols, fresh), None

    # prevent_cse=False is safe (and faster) inside scan, per the jax.checkpoint docs.
    step = jax.checkpoint(step, prevent_cse=False)
    carry, _ = lax.scan(step, init, jnp.arange(num_chunks, dtype=jnp.int32))
    return carry
