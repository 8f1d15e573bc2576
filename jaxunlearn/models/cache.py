"""Fixed-size key/value cache shared by the model ports and `generate`.

The cache is a plain pytree (a NamedTuple of arrays) so it passes through `jax.jit`,
`jax.lax.while_loop` and donation like any other state. Its size is fixed at creation, so
every decode step of a loop has the same shapes and compiles once (`generate` pads it to a
larger size between a few segments of steps).

Keys are stored [batch, kv_heads, head_dim, slots] and values [batch, kv_heads, slots,
head_dim]: a decode step reads the cache in place, once, with the slots as the contiguous
axis of its key reduction and of its value sum, instead of transposing all of it every
step (on XLA:CPU that transpose and the batched matrix-vector products it fed cost more
than the model's matmuls at a few hundred slots; see
`jaxunlearn.models.layers.cached_attention` and benchmarks/bench_decode.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxunlearn.models.config import ModelConfig


class KVCache(NamedTuple):
    """Keys and values of every decoder layer, preallocated to `max_length` slots.

    A model call with `cache=` writes its T new keys/values at slots
    `[index, index + T)`, marks those slots valid where its `attention_mask` is 1, and
    attends over all valid slots at or before each query's slot.

    Attributes:
      keys: per layer, [batch, kv_heads, head_dim, max_length] keys (after RoPE).
      values: per layer, [batch, kv_heads, max_length, head_dim] values.
      mask: [batch, max_length] int32, 1 where a slot holds a real (non-padding) token.
      index: [] int32, the number of slots written so far (the next write position).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


def init_cache(
    cfg: ModelConfig, batch_size: int, max_length: int, dtype: jnp.dtype = jnp.float32
) -> KVCache:
    """Returns an empty cache for `batch_size` rows of up to `max_length` tokens.

    Args:
      cfg: the model's config (layers, key/value heads, head_dim).
      batch_size: rows B.
      max_length: slots S (prompt length + tokens to generate).
      dtype: storage dtype of keys and values; use the model's compute dtype.

    Returns:
      A `KVCache` of zeros with `index == 0`.
    """
    kv, dh, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    return KVCache(
        keys=tuple(jnp.zeros((batch_size, kv, dh, max_length), dtype) for _ in range(layers)),
        values=tuple(jnp.zeros((batch_size, kv, max_length, dh), dtype) for _ in range(layers)),
        mask=jnp.zeros((batch_size, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def update_layer(
    cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Writes [B, T, Hkv, Dh] keys/values at slots [index, index + T) of one layer's cache.

    Returns the layer's updated ([B, Hkv, Dh, S] keys, [B, Hkv, S, Dh] values).
    """
    k = k.transpose(0, 2, 3, 1).astype(cache_k.dtype)
    v = v.transpose(0, 2, 1, 3).astype(cache_v.dtype)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k, (0, 0, 0, index))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v, (0, 0, index, 0))
    return cache_k, cache_v


def attention_mask_bts(
    attention_mask: jax.Array,
    cache: KVCache | None,
    sliding_window: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Builds the boolean [B, T, S] "query may attend to key" mask and the new slot mask.

    Causal by slot index and restricted to real keys, as transformers' `create_causal_mask`
    builds it (`kv_idx <= q_idx` and the padding mask); with `sliding_window` W also
    `kv_idx > q_idx - W` (`sliding_window_overlay`).

    A [B, T, T] `attention_mask` is an allowed matrix (no cache): several sequences packed
    into one row as a prefix tree, each token attending to its ancestors only
    (`jaxunlearn.eval.inference.score_packed`). The models are causal, so it is combined
    with the causal mask (it can only take keys away), which lets attention skip the
    blocks above the diagonal.

    Args:
      attention_mask: [B, T] 1 for real tokens among the T new ones, or a [B, T, T] boolean
        "query t may attend to key s" matrix.
      cache: the cache being extended, or None for a plain forward pass (S == T).
      sliding_window: W, or None for full causal attention.

    Returns:
      (allowed [B, T, S] bool, key_mask [B, S] int32 after writing the new tokens).

    Raises:
      ValueError: a [B, T, T] mask with a cache or a sliding window (slots then need not be
        positions, so neither is defined).
    """
    if attention_mask.ndim == 3:
        if cache is not None or sliding_window is not None:
            raise ValueError(
                "a [B, T, T] attention mask works only without a KV cache and without "
                "sliding-window layers; pass a [B, T] padding mask instead"
            )
        t = attention_mask.shape[1]
        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
        allowed = attention_mask.astype(bool) & causal
        return allowed, jnp.any(allowed, axis=1).astype(jnp.int32)
    t = attention_mask.shape[1]
    mask = attention_mask.astype(jnp.int32)
    if cache is None:
        start = jnp.zeros((), jnp.int32)
        key_mask = mask
    else:
        start = cache.index
        key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, start))
    q_idx = start + jnp.arange(t)[:, None]  # [T, 1]
    kv_idx = jnp.arange(key_mask.shape[1])[None, :]  # [1, S]
    allowed = kv_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (kv_idx > q_idx - sliding_window)
    return allowed[None] & (key_mask[:, None, :] == 1), key_mask


def advance(
    cache: KVCache | None,
    keys: list[jax.Array],
    values: list[jax.Array],
    key_mask: jax.Array,
    new_tokens: int,
) -> KVCache | None:
    """The cache after a forward pass wrote `new_tokens` positions (None without a cache)."""
    if cache is None:
        return None
    return KVCache(tuple(keys), tuple(values), key_mask, cache.index + new_tokens)
