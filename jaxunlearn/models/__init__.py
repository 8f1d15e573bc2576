"""Flax NNX ports of Hugging Face causal LMs (Llama family, Mistral, Qwen2/3, GPT-2).

Architecture only: `build_model(cfg)` makes a randomly initialised model and
`hf_param_map(cfg)` says which Hugging Face tensor fills each parameter; loading and
exporting checkpoints lives in `jaxunlearn.checkpoints`.

Every model is called as
`model(input_ids, attention_mask=None, *, position_ids=None, hidden_layers=(),
return_logits=True, cache=None) -> CausalLMOutput`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models import gpt2, llama
from jaxunlearn.models.cache import KVCache, init_cache
from jaxunlearn.models.config import SUPPORTED_MODEL_TYPES, HFParam, ModelConfig
from jaxunlearn.models.generate import filter_logits, generate
from jaxunlearn.models.gpt2 import GPT2LMHeadModel
from jaxunlearn.models.llama import LlamaForCausalLM
from jaxunlearn.models.outputs import CausalLMOutput, Head

CausalLM = LlamaForCausalLM | GPT2LMHeadModel


def _family(cfg: ModelConfig):
    if cfg.model_type in llama.LLAMA_FAMILY:
        return llama, LlamaForCausalLM
    if cfg.model_type == "gpt2":
        return gpt2, GPT2LMHeadModel
    raise ValueError(
        f"Unsupported model_type {cfg.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def build_model(
    cfg: ModelConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    scan_layers: bool = False,
    remat: str = "none",
    attention: str = "auto",
    scan_bits: bool = False,
) -> CausalLM:
    """Builds the NNX model for `cfg` with randomly initialised parameters.

    Works under `nnx.eval_shape` (for sharded loading without materialising weights).

    Args:
      cfg: the architecture.
      dtype: compute dtype (float32 or bfloat16); norms and softmax stay float32.
      param_dtype: parameter storage dtype.
      rngs: initialisation randomness (default `nnx.Rngs(0)`).
      scan_layers: stack the decoder layers and scan over them (Llama family only).
      remat: per-layer rematerialisation: "none", "matmuls" or "full".
      attention: "auto", "einsum" or "dot_product_attention".
      scan_bits: carry bfloat16 stacked weights through the layer scan as uint16 bits
        (Llama family, scanned, remat "full"; saves memory on XLA:CPU only; see
        `LlamaForCausalLM`).

    Returns:
      A `LlamaForCausalLM` or `GPT2LMHeadModel`.
    """
    _, cls = _family(cfg)
    if scan_bits and cls is not LlamaForCausalLM:
        raise ValueError(
            f"scan_bits=True is for the Llama family's stacked layers; {cfg.model_type!r} "
            "never stacks its layers. Build it with scan_bits=False."
        )
    extra = {"scan_bits": True} if scan_bits else {}
    return cls(
        cfg,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs or nnx.Rngs(0),
        scan_layers=scan_layers,
        remat=remat,
        attention=attention,
        **extra,
    )


def hf_param_map(cfg: ModelConfig, *, scan_layers: bool = False) -> dict[str, HFParam]:
    """NNX parameter path ("layers.0.attn.q_proj.kernel") -> `HFParam(key, transpose)`.

    With `scan_layers`, layer parameters are stacked ("layers.attn.q_proj.kernel") and map
    to a per-layer key template (`HFParam.layers`).
    """
    module, _ = _family(cfg)
    return module.hf_param_map(cfg, scan_layers=scan_layers)


def model_param_map(model: CausalLM) -> dict[str, HFParam]:
    """`hf_param_map` for a built model, stacked or not as the model is."""
    return hf_param_map(model.config, scan_layers=getattr(model, "scan_layers", False))


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "CausalLMOutput",
    "GPT2LMHeadModel",
    "HFParam",
    "Head",
    "KVCache",
    "LlamaForCausalLM",
    "ModelConfig",
    "build_model",
    "filter_logits",
    "generate",
    "hf_param_map",
    "init_cache",
    "model_param_map",
]
