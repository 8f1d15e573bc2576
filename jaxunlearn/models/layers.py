"""Building blocks shared by the model ports: norms, RoPE, activations, matmuls, attention.

Each block reproduces the numerics of its Hugging Face `transformers` counterpart
(norm statistics and softmax in float32 whatever the compute dtype), so ports match
torch logit for logit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Bool, Float, Int

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # ACT2FN["gelu"]: exact erf
    # ACT2FN["gelu_new"] / ["gelu_pytorch_tanh"]: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation `transformers.activations.ACT2FN[name]` computes."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation {name!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
        ) from None


class RMSNorm(nnx.Module):
    """Root-mean-square norm as `LlamaRMSNorm`: statistics in float32, cast, then scale.

    References:
      Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019, arXiv:1910.07467.
    """

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        # HF casts back to the input dtype *before* multiplying by the weight.
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with two-pass float32 statistics (torch `nn.LayerNorm`), output in dtype."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(variance + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


@functools.lru_cache(maxsize=64)
def rope_inv_freq(head_dim: int, theta: float, scaling: FrozenDict | None) -> np.ndarray:
    """RoPE inverse frequencies [head_dim / 2], float32, as transformers 5 computes them.

    Follows `compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`
    and `_compute_llama3_parameters` in `transformers/modeling_rope_utils.py`.

    References:
      Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021,
      arXiv:2104.09864. Llama 3 scaling: Grattafiori et al., "The Llama 3 Herd of Models",
      2024, arXiv:2407.21783.
    """
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    rope_type, factor = scaling["rope_type"], np.float32(scaling["factor"])
    if rope_type == "linear":
        return (inv_freq / factor).astype(np.float32)
    if rope_type != "llama3":
        raise ValueError(f"RoPE type {rope_type!r} is not supported.")
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    # Long wavelengths (low frequencies) are divided by `factor`, short ones kept, and the
    # band in between interpolated smoothly.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_context / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(
    position_ids: Int[Array, "b t"], inv_freq: np.ndarray, dtype
) -> tuple[Float[Array, "b t d"], Float[Array, "b t d"]]:
    """cos/sin tables [B, T, head_dim] in the `rotate_half` layout (frequencies repeated)."""
    freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(
    x: Float[Array, "b t h d"], cos: Float[Array, "b t d"], sin: Float[Array, "b t d"]
) -> Float[Array, "b t h d"]:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] (HF layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---------------------------------------------------------------------------------------
# Matmuls whose gradients XLA:CPU runs fast.
#
# Why the two custom JVPs below exist: XLA:CPU (jaxlib 0.10) hands a dot to its fast
# YNNPACK kernels only when both operands are row-major with the contraction on the
# LHS's minor and the RHS's major dimension. The weight gradient of `x @ w`, x^T @ g,
# contracts over tokens, the *major* dimension of both x [N, d] and g [N, f]; left to
# itself XLA then copies a large operand into a transposed layout, often recomputing the
# elementwise ops that produced it (e.g. the SiLU gate) inside that strided copy; the
# attention probabilities [queries, keys] get the same treatment. Writing the tangent
# rules so that their transposes (what reverse mode runs) contract a small,
# explicitly transposed operand keeps every large [tokens, features] and
# [queries, keys] tensor in its natural layout. The primal computations are the plain
# formulas (`matmul` is exactly `x @ w`), and gradients agree with plain autodiff to
# float rounding. `jax.custom_jvp` (not `custom_vjp`) keeps forward mode (`jax.jvp`,
# `jax.linearize`, Hessian-vector products) working. On the issue-2 benchmark model
# (benchmarks/README.md) this made the float32 train step 1.4x faster on 2 CPU cores.
# ---------------------------------------------------------------------------------------


def _materialised(x: jax.Array) -> jax.Array:
    # On CPU the barrier stops XLA from folding the transpose back into the dot (which
    # would re-create the strided layout avoided here); XLA then materialises it once.
    # GPU/TPU matmul libraries take transposed operands natively, so there the transpose
    # is left for XLA to fold, as in plain autodiff.
    if jax.default_backend() == "cpu":
        return jax.lax.optimization_barrier(x)
    return x


def _matmul_dims(ndim: int):
    return (((ndim - 1,), (0,)), ((), ()))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, precision) -> jax.Array:
    return jax.lax.dot_general(x, w, _matmul_dims(x.ndim), precision=precision)


@functools.partial(_matmul.defjvp, symbolic_zeros=True)
def _matmul_jvp(precision, primals, tangents):
    x, w = primals
    x_dot, w_dot = tangents
    y = _matmul(x, w, precision)
    y_dot = None
    if not isinstance(x_dot, SymbolicZero):
        # Transposes to g @ w.T, which YNNPACK runs without a copy of g.
        y_dot = jax.lax.dot_general(x_dot, w, _matmul_dims(x.ndim), precision=precision)
    if not isinstance(w_dot, SymbolicZero):
        # Written as (x^T)^T @ w_dot with x^T [d, N] materialised, so that its transpose,
        # the weight gradient, is x^T @ g: a plain row-major matmul. x^T is shared by
        # every projection of the same input (q/k/v, gate/up): XLA's CSE keeps one copy.
        d = w.shape[0]
        x_t = _materialised(x.reshape(-1, d).T)
        term = jax.lax.dot_general(x_t, w_dot, (((0,), (0,)), ((), ())), precision=precision)
        term = term.reshape(y.shape)
        y_dot = term if y_dot is None else y_dot + term
    return y, jnp.zeros_like(y) if y_dot is None else y_dot


def matmul(
    x: Float[Array, "... d"], w: Float[Array, "d f"], precision=None
) -> Float[Array, "... f"]:
    """`x @ w` (contracting x's last axis with w's first), with a CPU-friendly gradient.

    Same value as `jax.lax.dot_general(x, w, ...)`; only the layout of the gradient
    computation differs (see the comment above `_materialised`).

    Args:
      x: [..., d] activations.
      w: [d, f] weight.
      precision: `jax.lax.Precision` passed to every dot, or None for the default.

    Returns:
      [..., f] product in the operands' dtype.
    """
    return _named(_matmul(x, w, precision))


# Remat policies cannot see dots inside a custom_jvp (the primitive they inspect is the
# custom_jvp call), so weight-matmul outputs are tagged by name for the "matmuls" policy.
WEIGHT_MATMUL = "weight_matmul"


def _named(y: jax.Array) -> jax.Array:
    return checkpoint_name(y, WEIGHT_MATMUL)


def linear_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
) -> jax.Array:
    """Drop-in `dot_general` for `nnx.Linear(..., dot_general=linear_dot_general)`.

    Routes the plain `inputs @ kernel` that `nnx.Linear` asks for through `matmul`;
    anything else (a preferred element type, an explicit output sharding, other
    dimension numbers) goes to `jax.lax.dot_general` unchanged.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (
        preferred_element_type is None
        and out_sharding is None
        and rhs.ndim == 2
        and tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and not tuple(lhs_batch)
        and not tuple(rhs_batch)
    ):
        return _named(_matmul(lhs, rhs, precision))
    kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )


def _to_kv_major(x: Float[Array, "b t h d"], kv: int) -> Float[Array, "b kv tg d"]:
    # [B, T, H, D] -> [B, KV, T*G, D]: query head h = kv * G + g reads key/value head kv,
    # as transformers' `repeat_kv` pairs them, and its (t, g) rows share one matmul.
    b, t, h, d = x.shape
    g = h // kv
    return x.reshape(b, t, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, d)


def _from_kv_major(x: Float[Array, "b kv tg d"], t: int) -> Float[Array, "b t h d"]:
    b, kv, tg, d = x.shape
    g = tg // t
    return x.reshape(b, kv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, kv * g, d)


def _attention_probs(q, k, mask, scale):
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    # Replace (not add to) disallowed scores, so a fully masked row is uniform, not NaN.
    scores = jnp.where(mask, scores * scale, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
    probs = _attention_probs(q, k, mask, scale)
    return jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v)


@functools.partial(_attention.defjvp, symbolic_zeros=True)
def _attention_jvp(scale, primals, tangents):
    # Tangents of softmax(mask(q k^T * scale)) v, written so that their transposes keep
    # the [q, s] probabilities and score cotangents in their natural layout: the key and
    # value gradients contract a small transposed [d, q] operand instead.
    q, k, v, mask = primals
    q_dot, k_dot, v_dot, _ = tangents
    probs = _attention_probs(q, k, mask, scale)
    probs_v = probs.astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs_v, v)
    f32 = dict(preferred_element_type=jnp.float32)
    s_dot = None
    if not isinstance(q_dot, SymbolicZero):
        s_dot = jnp.einsum("bkqd,bksd->bkqs", q_dot, k, **f32)
    if not isinstance(k_dot, SymbolicZero):
        q_t = _materialised(q.swapaxes(-1, -2))  # [b, kv, d, q]
        term = jnp.einsum("bkdq,bksd->bkqs", q_t, k_dot, **f32)
        s_dot = term if s_dot is None else s_dot + term
    out_dot = None
    if s_dot is not None:
        s_dot = jnp.where(mask, s_dot * scale, 0.0)
        p_dot = probs * (s_dot - jnp.sum(probs * s_dot, axis=-1, keepdims=True))
        out_dot = jnp.einsum("bkqs,bksd->bkqd", p_dot.astype(v.dtype), v)
    if not isinstance(v_dot, SymbolicZero):
        # (v_dot^T p^T)^T: its transpose is the value gradient (g^T p)^T with g^T small.
        term = _materialised(jnp.einsum("bksd,bkqs->bkdq", v_dot, probs_v)).swapaxes(-1, -2)
        out_dot = term if out_dot is None else out_dot + term
    return out, jnp.zeros_like(out) if out_dot is None else out_dot


def dot_product_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s kv d"],
    v: Float[Array, "b s kv d"],
    allowed: Bool[Array, "b t s"],
    scale: float,
    causal: bool = False,
) -> Float[Array, "b t h d"]:
    """Grouped-query attention; scores and softmax in float32.

    Query head h reads key/value head h // (H / KV), as transformers' `repeat_kv` does,
    without materialising repeated keys/values: the G query heads of a key/value head
    are stacked with the query positions into one [T*G, S] score matrix.
    Disallowed scores are *replaced* (not added to) by float32's most negative value, so a
    query row with no allowed key (a padding row) gets a uniform softmax, never NaN.

    Args:
      q: [B, T, H, D] queries (after RoPE).
      k: [B, S, KV, D] keys.
      v: [B, S, KV, D] values.
      allowed: [B, T, S] True where query t may attend to key s.
      scale: score multiplier (usually D ** -0.5).
      causal: `allowed` is known to be causal (key s > query t never allowed, S == T):
        queries then run in blocks of `CAUSAL_BLOCK`, each against the keys up to its
        last position only, which skips the upper-triangle blocks of the score matrix
        (for T = 512, 10 of 16 blocks are computed). Same result.

    Returns:
      [B, T, H, D] attention outputs in the dtype of `v`.

    References:
      Vaswani et al., "Attention Is All You Need", 2017, arXiv:1706.03762. Grouped-query
      attention: Ainslie et al., "GQA", 2023, arXiv:2305.13245. Skipping the blocks above
      the diagonal as FlashAttention does: Dao et al., 2022, arXiv:2205.14135.
    """
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    t = q.shape[1]
    if not causal or t != k.shape[2] or t < 2 * CAUSAL_BLOCK:
        return _grouped_attention(q, k, v, allowed, scale)
    blocks = []
    for start in range(0, t, CAUSAL_BLOCK):
        stop = min(t, start + CAUSAL_BLOCK)
        blocks.append(
            _grouped_attention(
                q[:, start:stop],
                k[:, :, :stop],
                v[:, :, :stop],
                allowed[:, start:stop, :stop],
                scale,
            )
        )
    return jnp.concatenate(blocks, axis=1)


# Query rows per block of causal attention on the einsum path (`dot_product_attention`).
# Measured on the TOFU evaluation benchmark's packed 512-token rows (2-core CPU): 128 beat
# 64 and 256.
CAUSAL_BLOCK = 128


def _grouped_attention(q, k, v, allowed, scale):
    # q [B, T, H, D]; k, v key/value-head-major [B, KV, S, D].
    b, t, h, _ = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    # [B, T, S] -> [B, 1, T*G, S], rows ordered like _to_kv_major's.
    mask = jnp.broadcast_to(allowed[:, None, :, None, :], (b, 1, t, g, s)).reshape(b, 1, t * g, s)
    return _from_kv_major(_attention(_to_kv_major(q, kv), k, v, mask, scale), t)


def _decode_attention(q, k, v, allowed, scale):
    # One query per row: q [B, 1, H, D] over keys [B, KV, D, S] and values [B, KV, S, D].
    # Written as broadcast products summed over head_dim (scores) and over slots
    # (outputs), each with the slots contiguous: XLA fuses each into one pass over the
    # cache, where [G, D] x [D, S] matrix products per (row, head) measured 2-5x slower on
    # XLA:CPU (S = 256-512, 32 rows; benchmarks/bench_decode.py). Same float32 scores and
    # softmax as `_attention_probs`, probabilities rounded to the values' dtype as there.
    b, _, h, d = q.shape
    kv = k.shape[1]
    if h == kv:
        # One query per key/value head (multi-head attention: GPT-2, Llama 2): XLA:CPU turns
        # the sums below into batched [1, D] x [D, S] products, which its YNNPACK fusion ran
        # 5-8x slower than [2, D] x [D, S] (the `small` demo model's generation: 3.2 s vs
        # 0.52 s). Each query is scored twice and one copy kept; same numbers.
        q2 = jnp.broadcast_to(q.reshape(b, 1, h, 1, d), (b, 1, h, 2, d)).reshape(b, 1, 2 * h, d)
        return _decode_attention(q2, k, v, allowed, scale).reshape(b, 1, h, 2, d)[:, :, :, 0]
    f32 = jnp.float32
    q = q.reshape(b, kv, h // kv, d, 1).astype(f32)
    scores = jnp.sum(q * k[:, :, None].astype(f32), axis=3)  # [B, KV, G, S]
    mask = allowed[:, :, None, :]  # [B, 1, 1, S]
    scores = jnp.where(mask, scores * scale, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).astype(f32)
    out = jnp.sum(probs[..., None] * v[:, :, None].astype(f32), axis=3)  # [B, KV, G, D]
    return out.reshape(b, 1, h, d).astype(v.dtype)


def cached_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b kv d s"],
    v: Float[Array, "b kv s d"],
    allowed: Bool[Array, "b t s"],
    scale: float,
    implementation: str = "auto",
) -> Float[Array, "b t h d"]:
    """`attention` over a KV cache: keys [B, KV, D, S], values [B, KV, S, D].

    A decode step (T == 1) sums broadcast products over the cache in place on every
    backend (`_decode_attention`: one pass over the cache, no per-step transpose of it).
    A prefill (T > 1) transposes the keys once and runs the grouped attention of
    `dot_product_attention` (einsum path) or `jax.nn.dot_product_attention` on the
    [B, S, KV, D] layout it expects.

    Args:
      q: [B, T, H, D] queries (after RoPE).
      k: [B, KV, D, S] cached keys, including the T new ones.
      v: [B, KV, S, D] cached values.
      allowed: [B, T, S] True where query t may attend to slot s.
      scale: score multiplier.
      implementation: one of `ATTENTION_IMPLEMENTATIONS`.

    Returns:
      [B, T, H, D] attention outputs in the dtype of `v`.
    """
    if q.shape[1] == 1:
        return _decode_attention(q, k, v, allowed, scale)
    if resolve_attention(implementation) != "einsum":
        k, v = k.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3)
        return attention(q, k, v, allowed, scale, implementation)
    return _grouped_attention(q, k.swapaxes(2, 3), v, allowed, scale)


ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "einsum", "dot_product_attention")


def resolve_attention(implementation: str) -> str:
    """The attention path to run: "auto" picks by backend, the others are taken as given.

    "einsum" is `dot_product_attention` above (scores and gradients laid out for XLA:CPU's
    fast kernels); "dot_product_attention" is `jax.nn.dot_product_attention` (cuDNN flash
    attention on GPU when the inputs allow it, XLA elsewhere). "auto" takes the einsum
    path on CPU, where it measured faster (gradient of the issue-2 benchmark model,
    8 x 256 tokens, 2-core CPU: 3.15 s vs 3.52 s; see BENCHMARKS.md), and
    `jax.nn.dot_product_attention` on GPU and TPU.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is unknown; use one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}."
        )
    if implementation == "auto":
        return "einsum" if jax.default_backend() == "cpu" else "dot_product_attention"
    return implementation


def attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s kv d"],
    v: Float[Array, "b s kv d"],
    allowed: Bool[Array, "b t s"],
    scale: float,
    implementation: str = "auto",
    causal: bool = False,
) -> Float[Array, "b t h d"]:
    """Grouped-query attention through the path `implementation` names.

    Both paths compute scores and softmax in float32, handle grouped-query attention
    without repeating keys/values, and give a query row with no allowed key the mean of
    the values (a uniform softmax), so they agree on padding rows too.

    Args:
      q: [B, T, H, D] queries (after RoPE).
      k: [B, S, KV, D] keys.
      v: [B, S, KV, D] values.
      allowed: [B, T, S] True where query t may attend to key s (causal, sliding window
        and padding all folded in).
      scale: score multiplier.
      implementation: one of `ATTENTION_IMPLEMENTATIONS` (see `resolve_attention`).
      causal: `allowed` never lets a query see a later key (keys are the queries' own
        positions): the einsum path then skips the score blocks above the diagonal.

    Returns:
      [B, T, H, D] attention outputs in the dtype of `v`.
    """
    if resolve_attention(implementation) == "einsum":
        return dot_product_attention(q, k, v, allowed, scale, causal)
    # jax.nn's mask broadcasts over query heads: [B, 1, T, S].
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale)
    return out.astype(v.dtype)


REMAT_POLICIES: tuple[str, ...] = ("none", "matmuls", "full")


def remat_policy(name: str):
    """The `jax.checkpoint` policy for a named rematerialisation level.

    "none": no rematerialisation (every activation of the backward pass is kept);
    "matmuls": keep the outputs of the weight matmuls (dots without batch dimensions:
    projections and MLP) and recompute the rest (norms, RoPE, activations, attention);
    "full": keep only each block's input and recompute the whole block.

    Returns:
      None for "none", else a `jax.checkpoint_policies` policy.

    References:
      Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016, arXiv:1604.06174.
    """
    policies = {
        "none": None,
        "matmuls": jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names(WEIGHT_MATMUL),
        ),
        "full": jax.checkpoint_policies.nothing_saveable,
    }
    if name not in policies:
        raise ValueError(f"remat policy {name!r} is unknown; use one of {', '.join(policies)}.")
    return policies[name]


def rematerialised(block: nnx.Module, policy, *args):
    """``block(*args)`` under `jax.checkpoint` with `policy` (from `remat_policy`).

    The block's state goes in as an explicit argument (plain `jax.checkpoint` over
    split/merge rather than `nnx.remat`), so it works whatever trace the parameters come
    from, e.g. a frozen reference model closed over by a differentiated loss.
    """
    graphdef, state = nnx.split(block)

    def run(state, *args):
        return nnx.merge(graphdef, state)(*args)

    return jax.checkpoint(run, policy=policy)(state, *args)


def check_hidden_layers(hidden_layers, num_layers: int) -> tuple[int, ...]:
    """Validates the `hidden_layers` argument of a model call (0-based decoder layers)."""
    hidden_layers = tuple(int(i) for i in hidden_layers)
    bad = [i for i in hidden_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"hidden_layers {bad} out of range: the model has {num_layers} decoder layers "
            f"(valid indices 0..{num_layers - 1})."
        )
    return hidden_layers


def normal_init(stddev: float = 0.02):
    """HF's `initializer_range` normal init (the weights are overwritten on load anyway)."""
    return nnx.initializers.normal(stddev)
