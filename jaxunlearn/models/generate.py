"""Jit-compiled autoregressive generation with a fixed-size KV cache.

`generate` prefills the (left-padded) prompts into a `KVCache`, then decodes one token
per `jax.lax.while_loop` step, greedy or sampled (temperature, top-k, top-p), until every
row has produced an EOS token or `max_new_tokens` are out. The cache grows between a few
segments of steps (`segment_ends`), so attention reads little more than the slots written.
It follows `transformers`' `generate`: positions are `cumsum(attention_mask) - 1`, rows
that finished get `pad_token_id`, and logits warpers apply in the order temperature,
top-k, top-p. One compilation per (batch, prompt length, max_new_tokens, top_k, mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxunlearn.models.cache import KVCache, init_cache


def filter_logits(
    logits: Float[Array, "b v"],
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> Float[Array, "b v"]:
    """Temperature-scales logits and sets tokens outside top-k / top-p to -inf.

    Same rules as transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` (ties with
    the k-th value are kept) and `TopPLogitsWarper` (drop the low-probability tokens whose
    cumulative mass is <= 1 - top_p; the most likely token always stays), in that order.

    Args:
      logits: [B, V] next-token logits.
      temperature: > 0 divisor.
      top_k: keep the k largest logits (None: no top-k filter). Static.
      top_p: nucleus mass in (0, 1] (None: no top-p filter).

    Returns:
      [B, V] float32 filtered logits, for `jax.random.categorical`.

    References:
      Fan et al., "Hierarchical Neural Story Generation", 2018, arXiv:1805.04833 (top-k);
      Holtzman et al., "The Curious Case of Neural Text Degeneration", 2019,
      arXiv:1904.09751 (top-p).
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(logits, axis=-1)  # ascending, as TopPLogitsWarper sorts
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
        rows = jnp.arange(logits.shape[0])[:, None]
        remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def _next_logits(out) -> jax.Array:
    # Only the last position is needed: project it alone instead of all [B, T, V] logits.
    hidden, kernel = out.head
    return (hidden[:, -1] @ kernel).astype(jnp.float32)


def segment_ends(max_new_tokens: int, segments: int = 4, multiple: int = 16) -> tuple[int, ...]:
    """Decode steps at which the KV cache grows: (e_1, ..., max_new_tokens).

    Steps [e_{i-1}, e_i) run with a cache of prompt + e_i slots, so attention reads the
    slots written so far plus at most one segment, not the whole final length: about
    a third fewer cache reads than one prompt + max_new_tokens cache for 200 new tokens
    on a 60-token prompt. Each segment is its own compiled loop, so short generations
    (and `segments=1`) keep one, and a tail shorter than half a segment joins the one
    before it (a compiled loop for a few steps costs more than it saves).
    """
    size = -(-max_new_tokens // max(1, segments))
    size = max(multiple, -(-size // multiple) * multiple)
    ends = list(range(size, max_new_tokens, size))
    if ends and 2 * (max_new_tokens - ends[-1]) < size:
        ends.pop()
    return (*ends, max_new_tokens)


def _grow(cache: KVCache, length: int) -> KVCache:
    extra = length - cache.max_length
    if extra <= 0:
        return cache

    def more_slots(x, axis):
        return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])

    return cache._replace(
        keys=tuple(more_slots(k, 3) for k in cache.keys),  # [B, KV, D, S]
        values=tuple(more_slots(v, 2) for v in cache.values),  # [B, KV, S, D]
        mask=jnp.pad(cache.mask, ((0, 0), (0, extra))),
    )


def _generate_impl(
    state,
    input_ids,
    attention_mask,
    eos_ids,
    pad_id,
    temperature,
    top_p,
    rng,
    *,
    graphdef,
    max_new_tokens: int,
    top_k: int | None,
    sample: bool,
    use_top_p: bool,
):
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    ends = segment_ends(max_new_tokens)
    cache = init_cache(model.config, b, t + ends[0], model.dtype)
    mask = attention_mask.astype(jnp.int32)
    # transformers `_prepare_position_ids_for_generation`: cumsum - 1, 0 on padding.
    positions = jnp.where(mask == 1, jnp.cumsum(mask, axis=-1) - 1, 0)

    def choose(logits, step):
        if not sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = filter_logits(logits, temperature, top_k, top_p if use_top_p else None)
        key = jax.random.fold_in(rng, step)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    out = model(input_ids, mask, position_ids=positions, return_logits=False, cache=cache)
    token = choose(_next_logits(out), 0)
    done = jnp.isin(token, eos_ids)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

    def body(carry):
        step, tokens, token, pos, done, cache = carry
        out = model(
            token[:, None],
            jnp.ones((b, 1), jnp.int32),
            position_ids=pos[:, None],
            return_logits=False,
            cache=cache,
        )
        token = jnp.where(done, pad_id, choose(_next_logits(out), step))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        done = done | jnp.isin(token, eos_ids)
        return step + 1, tokens, token, pos + 1, done, out.cache

    carry = (jnp.int32(1), tokens, token, positions[:, -1] + 1, done, out.cache)
    for end in ends:  # step s writes slot t + s - 1, so steps < end fit t + end slots
        carry = carry[:5] + (_grow(carry[5], t + end),)
        carry = jax.lax.while_loop(lambda c, end=end: (c[0] < end) & ~jnp.all(c[4]), body, carry)
    return carry[1]


_generate_jit = jax.jit(
    _generate_impl, static_argnames=("graphdef", "max_new_tokens", "top_k", "sample", "use_top_p")
)


def generate(
    model: nnx.Module,
    input_ids: Int[Array, "b t"],
    attention_mask: Int[Array, "b t"],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
) -> Int[Array, "b n"]:
    """Generates up to `max_new_tokens` tokens after each left-padded prompt.

    Args:
      model: a jaxunlearn causal LM (`build_model` / the checkpoint loader).
      input_ids: [B, T] prompts, left-padded (`tokenizer.padding_side = "left"`).
      attention_mask: [B, T] 1 for prompt tokens, 0 for left padding.
      max_new_tokens: N >= 1, the number of columns returned.
      eos_token_id: id or ids that end a row (None: always generate N tokens).
      pad_token_id: written after a row's EOS (None: the first EOS id, as transformers).
      temperature: 0 for greedy decoding (argmax); > 0 to sample from softmax(logits / T).
      top_k: sample only among the k most likely tokens (None: no limit; note transformers'
        default generation config uses 50).
      top_p: nucleus sampling mass in (0, 1] (None: no limit).
      rng: PRNG key, required when sampling; step s uses `fold_in(rng, s)`.

    Returns:
      [B, N] int32 new tokens; after a row's EOS (and once all rows stop) `pad_token_id`.

    Raises:
      ValueError: right-padded prompts, bad shapes or bad sampling settings.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both "
            "be [batch, prompt_length]."
        )
    try:
        host_mask = np.asarray(attention_mask)
    except jax.errors.TracerArrayConversionError:  # called under a trace: cannot check
        host_mask = None
    if host_mask is not None and not bool(np.all(host_mask[:, -1] == 1)):
        raise ValueError(
            "generate needs left-padded prompts: attention_mask[:, -1] must be 1 for every "
            "row. Set tokenizer.padding_side = 'left'."
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    eos = [] if eos_token_id is None else np.atleast_1d(np.asarray(eos_token_id)).tolist()
    if pad_token_id is None:
        if not eos:
            raise ValueError("pad_token_id is None and there is no eos_token_id to pad with.")
        pad_token_id = eos[0]
    sample = temperature > 0
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}.")
    if sample and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key.")
    graphdef, state = nnx.split(model)
    return _generate_jit(
        state,
        input_ids,
        attention_mask,
        jnp.asarray(eos or [-1], jnp.int32),
        jnp.int32(pad_token_id),
        jnp.float32(temperature if sample else 1.0),
        jnp.float32(1.0 if top_p is None else top_p),
        rng if rng is not None else jax.random.key(0),
        graphdef=graphdef,
        max_new_tokens=int(max_new_tokens),
        top_k=int(top_k) if sample and top_k is not None else None,
        sample=bool(sample),
        use_top_p=sample and top_p is not None,
    )
