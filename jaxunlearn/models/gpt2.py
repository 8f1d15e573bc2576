"""Flax NNX port of GPT-2 (`transformers` `GPT2LMHeadModel`).

Learned absolute position embeddings, fused q/k/v projection (`c_attn`), pre-LayerNorm
blocks with a gelu_new MLP, and an lm_head tied to the token embedding. HF stores GPT-2's
projections as `Conv1D` weights of shape [in, out], so they load without a transpose.

Layer parameters live under `layers.{i}` (as in the Llama port), so code that selects
"layer 7's MLP" works for both families; `hf_param_map` gives the HF keys.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxunlearn.models import cache as kv_cache
from jaxunlearn.models.config import HFParam, ModelConfig
from jaxunlearn.models.layers import (
    LayerNorm,
    activation,
    attention,
    cached_attention,
    check_hidden_layers,
    linear_dot_general,
    matmul,
    normal_init,
    remat_policy,
    rematerialised,
    resolve_attention,
)
from jaxunlearn.models.outputs import CausalLMOutput, Head


def _conv1d(d_in, d_out, dtype, param_dtype, rngs):
    # HF Conv1D is y = x @ W + b with W [in, out]: exactly nnx.Linear's kernel layout.
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=normal_init(),
        dot_general=linear_dot_general,
        rngs=rngs,
    )


class GPT2Attention(nnx.Module):
    """Multi-head causal self-attention with a fused q/k/v projection."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        implementation: str = "auto",
    ):
        self.implementation = implementation
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.c_attn = _conv1d(d, 3 * d, dtype, param_dtype, rngs)
        self.c_proj = _conv1d(d, d, dtype, param_dtype, rngs)
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        self.scale = scale

    def __call__(self, x, allowed, layer_cache, cache_index):
        b, t, d = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if layer_cache is None:
            out = attention(q, k, v, allowed, self.scale, self.implementation, True)
        else:
            layer_cache = kv_cache.update_layer(*layer_cache, k, v, cache_index)
            out = cached_attention(q, *layer_cache, allowed, self.scale, self.implementation)
        return self.c_proj(out.reshape(b, t, d)), layer_cache


class GPT2MLP(nnx.Module):
    """c_proj(act(c_fc(x)))."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.c_fc = _conv1d(cfg.hidden_size, cfg.intermediate_size, dtype, param_dtype, rngs)
        self.c_proj = _conv1d(cfg.intermediate_size, cfg.hidden_size, dtype, param_dtype, rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        attention: str = "auto",
    ):
        norm_kw = dict(eps=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(cfg.hidden_size, **norm_kw)
        self.attn = GPT2Attention(
            cfg, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs, implementation=attention
        )
        self.ln_2 = LayerNorm(cfg.hidden_size, **norm_kw)
        self.mlp = GPT2MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, allowed, layer_cache, cache_index):
        h, layer_cache = self.attn(self.ln_1(x), allowed, layer_cache, cache_index)
        x = x + h
        x = x + self.mlp(self.ln_2(x))
        return x, layer_cache


class GPT2LMHeadModel(nnx.Module):
    """GPT-2 causal LM with tied input/output embeddings.

    References:
      Radford et al., "Language Models are Unsupervised Multitask Learners", 2019.

    Args:
      cfg: a `ModelConfig` with `model_type == "gpt2"`.
      dtype: compute dtype (LayerNorm statistics and softmax stay float32).
      param_dtype: storage dtype of the parameters.
      rngs: initialisation randomness.
      scan_layers: must be False: GPT-2's layers differ (the score scale may depend on the
        layer index), so they are not stacked.
      remat: rematerialisation policy of each block ("none", "matmuls", "full").
      attention: "auto", "einsum" or "dot_product_attention".
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs,
        scan_layers: bool = False,
        remat: str = "none",
        attention: str = "auto",
    ):
        if scan_layers:
            raise ValueError(
                "GPT-2 does not support scan_layers=True (its small size never needs it); "
                "build it with scan_layers=False."
            )
        remat_policy(remat)
        resolve_attention(attention)
        self.scan_layers = False
        self.remat = remat
        if cfg.model_type != "gpt2":
            raise ValueError(f"GPT2LMHeadModel cannot build model_type {cfg.model_type!r}.")
        if not cfg.tie_word_embeddings:
            raise ValueError("GPT-2 with tie_word_embeddings=False is not supported.")
        self.config = cfg
        self.dtype = dtype
        emb_kw = dict(dtype=dtype, param_dtype=param_dtype, embedding_init=normal_init(), rngs=rngs)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **emb_kw)
        self.wpe = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **emb_kw)
        self.layers = nnx.List(
            [
                GPT2Block(
                    cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention
                )
                for i in range(cfg.num_hidden_layers)
            ]
        )
        self.ln_f = LayerNorm(
            cfg.hidden_size, eps=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype
        )

    def unembedding(self) -> Float[Array, "d v"]:
        """The [D, V] tied unembedding (`wte` transposed) in compute dtype."""
        return self.wte.embedding[...].T.astype(self.dtype)

    def __call__(
        self,
        input_ids: Int[Array, "b t"],
        attention_mask: Int[Array, "b t"] | None = None,
        *,
        position_ids: Int[Array, "b t"] | None = None,
        hidden_layers: tuple[int, ...] = (),
        return_logits: bool = True,
        cache: kv_cache.KVCache | None = None,
    ) -> CausalLMOutput:
        """Runs GPT-2; arguments and outputs as `LlamaForCausalLM.__call__`.

        Positions index the learned `wpe` table, which has `n_positions` rows; larger ids
        are clamped by the gather (HF would raise), so keep sequences within n_positions.
        """
        cfg = self.config
        b, t = input_ids.shape
        hidden_layers = check_hidden_layers(hidden_layers, cfg.num_hidden_layers)
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            start = 0 if cache is None else cache.index
            position_ids = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        allowed, key_mask = kv_cache.attention_mask_bts(attention_mask, cache)

        x = self.wte(input_ids) + self.wpe(position_ids)
        captured, new_keys, new_values = {}, [], []
        cache_index = None if cache is None else cache.index
        policy = remat_policy(self.remat)
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            if policy is not None and cache is None:
                x = rematerialised(block, policy, x, allowed, None, None)[0]
            else:
                x, layer_cache = block(x, allowed, layer_cache, cache_index)
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])
            if i in hidden_layers:
                captured[i] = x
        hidden = self.ln_f(x)
        kernel = self.unembedding()
        logits = matmul(hidden, kernel) if return_logits else None
        new_cache = kv_cache.advance(cache, new_keys, new_values, key_mask, t)
        return CausalLMOutput(logits, Head(hidden, kernel), captured, new_cache)


def hf_param_map(cfg: ModelConfig, *, scan_layers: bool = False) -> dict[str, HFParam]:
    """NNX parameter path -> HF key, as `GPT2LMHeadModel.state_dict()` names them.

    HF keys carry the "transformer." prefix of `GPT2LMHeadModel`; the original OpenAI-GPT-2
    safetensors files store the same names without it ("h.0.attn.c_attn.weight"), and also
    hold non-parameter `attn.bias` mask buffers, which a loader should ignore. No key is
    transposed (Conv1D stores [in, out]); there is no lm_head (tied to `wte`).
    `scan_layers` must be False (GPT-2 layers are never stacked).
    """
    if scan_layers:
        raise ValueError("GPT-2 layers are never stacked; call with scan_layers=False.")
    out = {
        "wte.embedding": HFParam("transformer.wte.weight", False),
        "wpe.embedding": HFParam("transformer.wpe.weight", False),
    }
    for i in range(cfg.num_hidden_layers):
        hf = f"transformer.h.{i}"
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[f"layers.{i}.{name}.kernel"] = HFParam(f"{hf}.{name}.weight", False)
            out[f"layers.{i}.{name}.bias"] = HFParam(f"{hf}.{name}.bias", False)
        for name in ("ln_1", "ln_2"):
            out[f"layers.{i}.{name}.scale"] = HFParam(f"{hf}.{name}.weight", False)
            out[f"layers.{i}.{name}.bias"] = HFParam(f"{hf}.{name}.bias", False)
    out["ln_f.scale"] = HFParam("transformer.ln_f.weight", False)
    out["ln_f.bias"] = HFParam("transformer.ln_f.bias", False)
    return out
