"""Flax NNX port of the Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3.

One implementation covers the four Hugging Face architectures; they differ only in
config switches: grouped-query attention (`num_key_value_heads`), RoPE scaling (llama3,
linear), q/k/v bias (Qwen2), q/k RMSNorm over head_dim before RoPE and an explicit
head_dim (Qwen3), sliding-window layers (Mistral, Qwen2 with `use_sliding_window`), and
tied or untied embeddings. Logits match `transformers` 5 `*ForCausalLM` to float32 rounding.

Parameter paths (`'.'.join(path)` of `nnx.state(model, nnx.Param)`) and their HF keys are
given by `hf_param_map`; the checkpoint loader relies on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxunlearn.models import cache as kv_cache
from jaxunlearn.models.config import HFParam, ModelConfig
from jaxunlearn.models.layers import (
    RMSNorm,
    activation,
    apply_rope,
    attention,
    cached_attention,
    check_hidden_layers,
    linear_dot_general,
    matmul,
    normal_init,
    remat_policy,
    rematerialised,
    resolve_attention,
    rope_cos_sin,
    rope_inv_freq,
)
from jaxunlearn.models.outputs import CausalLMOutput, Head
from jaxunlearn.models.scan_bits import bits_scan, bits_take

LLAMA_FAMILY: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")


def _linear(d_in, d_out, bias, dtype, param_dtype, rngs):
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=normal_init(),
        dot_general=linear_dot_general,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (and Qwen3's q/k norm)."""

    def __init__(
        self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation: str = "auto"
    ):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.implementation = implementation
        d, h, kv, hd = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _linear(d, h * hd, cfg.attention_bias, **kw)
        self.k_proj = _linear(d, kv * hd, cfg.attention_bias, **kw)
        self.v_proj = _linear(d, kv * hd, cfg.attention_bias, **kw)
        self.o_proj = _linear(h * hd, d, cfg.attention_out_bias, **kw)
        if cfg.qk_norm:
            norm_kw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.q_norm = RMSNorm(hd, **norm_kw)
            self.k_norm = RMSNorm(hd, **norm_kw)
        else:
            self.q_norm = self.k_norm = None

    def __call__(
        self,
        x: Float[Array, "b t d"],
        cos: Float[Array, "b t hd"],
        sin: Float[Array, "b t hd"],
        allowed: jax.Array,
        layer_cache: tuple[jax.Array, jax.Array] | None,
        cache_index: jax.Array | None,
    ) -> tuple[Float[Array, "b t d"], tuple[jax.Array, jax.Array] | None]:
        b, t, _ = x.shape
        q_bthd = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k_btkd = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v_btkd = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalises each head before RoPE
            q_bthd, k_btkd = self.q_norm(q_bthd), self.k_norm(k_btkd)
        q_bthd, k_btkd = apply_rope(q_bthd, cos, sin), apply_rope(k_btkd, cos, sin)
        scale = self.head_dim**-0.5
        if layer_cache is None:
            out = attention(q_bthd, k_btkd, v_btkd, allowed, scale, self.implementation, True)
        else:
            layer_cache = kv_cache.update_layer(*layer_cache, k_btkd, v_btkd, cache_index)
            out = cached_attention(q_bthd, *layer_cache, allowed, scale, self.implementation)
        return self.o_proj(out.reshape(b, t, -1)), layer_cache


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, cfg.mlp_bias, **kw)
        self.up_proj = _linear(d, f, cfg.mlp_bias, **kw)
        self.down_proj = _linear(f, d, cfg.mlp_bias, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention: str = "auto"
    ):
        norm_kw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.attn = Attention(
            cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, implementation=attention
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, allowed, layer_cache, cache_index):
        h, layer_cache = self.attn(
            self.input_layernorm(x), cos, sin, allowed, layer_cache, cache_index
        )
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, layer_cache


class LlamaForCausalLM(nnx.Module):
    """Decoder-only LM of the Llama family (see the module docstring for what it covers).

    Args:
      cfg: a `ModelConfig` with `model_type` in `LLAMA_FAMILY`.
      dtype: compute dtype of activations and matmuls (norms and softmax stay float32).
        Parameters are cast to it where they are used, so ``dtype=bfloat16,
        param_dtype=float32`` is bfloat16 compute with float32 master weights.
      param_dtype: storage dtype of the parameters.
      rngs: initialisation randomness (weights are normally overwritten by the loader).
      scan_layers: store the decoder layers stacked (each parameter gets a leading [L] axis,
        e.g. ``layers.attn.q_proj.kernel`` is [L, D, H*Dh]) and run them with one
        `jax.lax.scan`, so compile time does not grow with depth. Decoding with a KV cache
        runs the same stacked weights layer by layer. Off by default: unstacked layers
        keep per-layer parameter names (``layers.3.mlp.down_proj.kernel``), which methods
        that pick layers by name (RMU's trained layers) rely on.
      remat: rematerialisation of each decoder layer in the backward pass: "none",
        "matmuls" (keep the weight-matmul outputs) or "full" (keep only layer inputs); see
        `jaxunlearn.models.layers.remat_policy`.
      attention: "auto", "einsum" or "dot_product_attention" (see
        `jaxunlearn.models.layers.resolve_attention`).
      scan_bits: run the stacked layers with `jaxunlearn.models.scan_bits.bits_scan`:
        bfloat16 weights pass through the scan as uint16 bits and the backward pass is a
        reverse scan that recomputes each layer, so XLA:CPU never makes float32 copies of
        the whole weight stack or its gradient. For training with bfloat16 parameters on
        CPU only (elsewhere it saves nothing); needs ``scan_layers=True, remat="full"``;
        reverse-mode differentiation only (no `jax.jvp`). Calls that capture
        `hidden_layers` use the plain scan.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
        scan_layers: bool = False,
        remat: str = "none",
        attention: str = "auto",
        scan_bits: bool = False,
    ):
        if cfg.model_type not in LLAMA_FAMILY:
            raise ValueError(f"LlamaForCausalLM cannot build model_type {cfg.model_type!r}.")
        remat_policy(remat)  # validate the names now, not at the first call
        resolve_attention(attention)
        if scan_bits and not (scan_layers and remat == "full"):
            raise ValueError(
                "scan_bits=True needs scan_layers=True and remat='full' (it replaces the "
                f"scanned, fully rematerialised layer stack); got scan_layers={scan_layers}, "
                f"remat={remat!r}."
            )
        self.config = cfg
        self.dtype = dtype
        self.scan_layers = bool(scan_layers)
        self.remat = remat
        self.scan_bits = bool(scan_bits)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=normal_init(),
            rngs=rngs,
        )
        layer_kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention)
        if self.scan_layers:

            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return DecoderLayer(cfg, rngs=rngs, **layer_kw)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List(
                [DecoderLayer(cfg, rngs=rngs, **layer_kw) for _ in range(cfg.num_hidden_layers)]
            )
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, param_dtype, rngs)

    def unembedding(self) -> Float[Array, "d v"]:
        """The [D, V] matrix that maps final hidden states to logits (in compute dtype)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T.astype(self.dtype)
        return self.lm_head.kernel[...].astype(self.dtype)

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer `i` (for stacked layers, a module holding slice i of the stack)."""
        if not self.scan_layers:
            return self.layers[i]
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

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
        """Runs the LM.

        Args:
          input_ids: [B, T] token ids.
          attention_mask: [B, T], 1 for real tokens, 0 for padding (default all ones); or,
            without a cache, a [B, T, T] boolean allowed matrix (`cache.attention_mask_bts`).
          position_ids: [B, T] RoPE positions. Default as transformers' forward: 0..T-1 for
            every row (also for left-padded rows), offset by `cache.index` with a cache.
          hidden_layers: decoder layers whose outputs to return (0-based; layer l is HF
            `hidden_states[l + 1]`, except that HF replaces the last entry with the normed
            output).
          return_logits: compute [B, T, V] logits; False leaves only `out.head`.
          cache: a `KVCache` to extend with these T tokens (generation), or None.

        Returns:
          `CausalLMOutput(logits, head, hidden_states, cache)`.
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
        allowed_sliding = None
        if any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)):
            allowed_sliding, _ = kv_cache.attention_mask_bts(
                attention_mask, cache, cfg.sliding_window
            )
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = rope_cos_sin(position_ids, inv_freq, self.dtype)
        masks = (allowed, allowed_sliding)

        if self.scan_bits:
            x = bits_take(self.embed_tokens.embedding[...], input_ids).astype(self.dtype)
        else:
            x = self.embed_tokens(input_ids)
        if self.scan_layers and cache is None:
            x, captured = self._scanned(x, cos, sin, masks, hidden_layers)
            new_keys = new_values = ()
        else:
            x, captured, new_keys, new_values = self._unrolled(
                x, cos, sin, masks, hidden_layers, cache
            )
        hidden = self.norm(x)
        kernel = self.unembedding()
        logits = matmul(hidden, kernel) if return_logits else None
        new_cache = kv_cache.advance(cache, new_keys, new_values, key_mask, t)
        return CausalLMOutput(logits, Head(hidden, kernel), captured, new_cache)

    def _unrolled(self, x, cos, sin, masks, hidden_layers, cache):
        """Runs the layers one by one (unstacked layers, or decoding with a cache)."""
        cfg = self.config
        policy = remat_policy(self.remat)
        captured, new_keys, new_values = {}, [], []
        cache_index = None if cache is None else cache.index
        for i in range(cfg.num_hidden_layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            mask = masks[1] if cfg.is_sliding(i) else masks[0]
            block = self.layer(i)
            if policy is not None and cache is None:
                x = rematerialised(block, policy, x, cos, sin, mask, None, None)[0]
            else:
                x, layer_cache = block(x, cos, sin, mask, layer_cache, cache_index)
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])
            if i in hidden_layers:
                captured[i] = x
        return x, captured, new_keys, new_values

    def _scanned(self, x, cos, sin, masks, hidden_layers):
        """Runs the stacked layers with one `lax.scan` (remat applied to the scan body)."""
        cfg = self.config
        graphdef, state = nnx.split(self.layers)
        sliding = jnp.asarray([cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)])
        if self.scan_bits and not hidden_layers:

            def apply(layer_state, h, rope, masks, slides):
                mask = masks[0] if masks[1] is None else jnp.where(slides, masks[1], masks[0])
                return nnx.merge(graphdef, layer_state)(h, *rope, mask, None, None)[0]

            return bits_scan(apply, state, x, (cos, sin), masks, sliding), {}

        def body(carry, xs):
            h, captured = carry
            layer_state, index, slides = xs
            if masks[1] is None:
                mask = masks[0]
            else:
                mask = jnp.where(slides, masks[1], masks[0])
            h, _ = nnx.merge(graphdef, layer_state)(h, cos, sin, mask, None, None)
            # Keep the requested layers' outputs in the carry (not one per layer).
            captured = tuple(jnp.where(index == i, h, c) for i, c in zip(hidden_layers, captured))
            return (h, captured), None

        policy = remat_policy(self.remat)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        init = (x, tuple(jnp.zeros_like(x) for _ in hidden_layers))
        layer_ids = jnp.arange(cfg.num_hidden_layers)
        (x, captured), _ = jax.lax.scan(body, init, (state, layer_ids, sliding))
        return x, dict(zip(hidden_layers, captured))


def hf_param_map(cfg: ModelConfig, *, scan_layers: bool = False) -> dict[str, HFParam]:
    """NNX parameter path -> HF safetensors key for a Llama-family model.

    Keys are `'.'.join(map(str, path))` of `nnx.to_flat_state(nnx.state(model, nnx.Param))`.
    With tied embeddings there is no `lm_head.kernel` (HF checkpoints then carry no
    `lm_head.weight`, or one equal to the embedding, which the loader can ignore).

    Args:
      cfg: the architecture.
      scan_layers: the model stacks its layers (`LlamaForCausalLM(scan_layers=True)`): a
        layer parameter ``layers.attn.q_proj.kernel`` then maps to the per-layer keys
        ``model.layers.{i}.self_attn.q_proj.weight``, i = 0..L-1 (`HFParam.layers` = L),
        stacked along a new leading axis; the files keep the Hugging Face layout.
    """
    out = {"embed_tokens.embedding": HFParam("model.embed_tokens.weight", False)}
    layer_ids = [None] if scan_layers else range(cfg.num_hidden_layers)
    stacked = cfg.num_hidden_layers if scan_layers else None
    for i in layer_ids:
        ours = "layers" if i is None else f"layers.{i}"
        hf = "model.layers.{}" if i is None else f"model.layers.{i}"
        linears = {
            "attn.q_proj": ("self_attn.q_proj", cfg.attention_bias),
            "attn.k_proj": ("self_attn.k_proj", cfg.attention_bias),
            "attn.v_proj": ("self_attn.v_proj", cfg.attention_bias),
            "attn.o_proj": ("self_attn.o_proj", cfg.attention_out_bias),
            "mlp.gate_proj": ("mlp.gate_proj", cfg.mlp_bias),
            "mlp.up_proj": ("mlp.up_proj", cfg.mlp_bias),
            "mlp.down_proj": ("mlp.down_proj", cfg.mlp_bias),
        }
        for name, (hf_name, bias) in linears.items():
            out[f"{ours}.{name}.kernel"] = HFParam(f"{hf}.{hf_name}.weight", True, stacked)
            if bias:
                out[f"{ours}.{name}.bias"] = HFParam(f"{hf}.{hf_name}.bias", False, stacked)
        norms = ["input_layernorm", "post_attention_layernorm"]
        for name in norms:
            out[f"{ours}.{name}.scale"] = HFParam(f"{hf}.{name}.weight", False, stacked)
        if cfg.qk_norm:
            for name in ("q_norm", "k_norm"):
                out[f"{ours}.attn.{name}.scale"] = HFParam(
                    f"{hf}.self_attn.{name}.weight", False, stacked
                )
    out["norm.scale"] = HFParam("model.norm.weight", False)
    if not cfg.tie_word_embeddings:
        out["lm_head.kernel"] = HFParam("lm_head.weight", True)
    return out
