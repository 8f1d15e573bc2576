"""Building blocks shared by the model ports: norms, RoPE, activations, attention.

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


def dot_product_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s kv d"],
    v: Float[Array, "b s kv d"],
    allowed: Bool[Array, "b t s"],
    scale: float,
) -> Float[Array, "b t h d"]:
    """Grouped-query attention; scores and softmax in float32.

    Query head h reads key/value head h // (H / KV), as transformers' `repeat_kv` does.
    Disallowed scores are *replaced* (not added to) by float32's most negative value, so a
    query row with no allowed key (a padding row) gets a uniform softmax, never NaN.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None, None], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


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
