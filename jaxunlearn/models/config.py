"""One frozen config for every supported causal-LM architecture, parsed from HF config.json.

`ModelConfig.from_hf_dict` reads both spellings found in the wild: transformers 4
(`rope_theta` + `rope_scaling`, `torch_dtype`) as most published checkpoints have it, and
transformers 5 (`rope_parameters` holding `rope_theta` and `rope_type`, `dtype`).
`ModelConfig.to_hf_dict` writes the transformers-5 spelling back, so an exported
checkpoint loads with `transformers.AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from flax.core import FrozenDict

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS: tuple[str, ...] = (
    "silu",
    "swish",
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "relu",
)


class HFParam(NamedTuple):
    """Where one NNX parameter lives in a Hugging Face safetensors checkpoint.

    Attributes:
      key: the safetensors key, e.g. "model.layers.0.self_attn.q_proj.weight".
      transpose: the HF tensor is the transpose of the NNX one (torch `nn.Linear` stores
        [out, in]; `nnx.Linear.kernel` is [in, out]). For stacked layers, each layer's
        tensor is transposed.
      layers: None for a plain tensor. For a parameter of stacked layers (leading [L]
        axis), L: `key` is then a template with one ``{}`` for the layer index, and the
        NNX array is the stack of the L per-layer tensors along a new axis 0.
    """

    key: str
    transpose: bool
    layers: int | None = None

    def keys(self) -> list[str]:
        """The Hugging Face key(s) this parameter is stored under, in layer order."""
        if self.layers is None:
            return [self.key]
        return [self.key.format(i) for i in range(self.layers)]


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}

# Class defaults of transformers 5.24 (`models/<type>/configuration_<type>.py`); used when a
# config.json omits a key, exactly as `AutoConfig` would fill it in.
_LLAMA_LIKE = dict(
    hidden_act="silu",
    rms_norm_eps=1e-6,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    pad_token_id=None,
)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        _LLAMA_LIKE,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "mistral": dict(
        _LLAMA_LIKE,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=4096,
    ),
    "qwen2": dict(
        _LLAMA_LIKE,
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=None,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
    ),
    "qwen3": dict(
        _LLAMA_LIKE,
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=None,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
    ),
    "gpt2": dict(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=None,
        tie_word_embeddings=True,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        add_cross_attention=False,
    ),
}
_DEFAULT_ROPE_THETA = 10_000.0  # `RotaryEmbeddingConfigMixin.default_theta`


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters of a decoder-only causal LM.

    Hashable (all fields are immutable), so it can sit on an NNX module as static data and
    in `jax.jit` static arguments.

    Attributes:
      model_type: one of `SUPPORTED_MODEL_TYPES`.
      vocab_size: rows of the token embedding.
      hidden_size: residual stream width D (GPT-2 `n_embd`).
      intermediate_size: MLP width (GPT-2 `n_inner`, default 4 D).
      num_hidden_layers: decoder layers L (GPT-2 `n_layer`).
      num_attention_heads: query heads H (GPT-2 `n_head`).
      num_key_value_heads: key/value heads (grouped-query attention; H for GPT-2).
      head_dim: per-head width; explicit in Qwen3 / Mistral-Nemo / Llama 3.2 configs.
      hidden_act: MLP activation name as in `transformers.activations.ACT2FN`.
      max_position_embeddings: context length (GPT-2 `n_positions`: size of `wpe`).
      rms_norm_eps: RMSNorm epsilon (Llama family).
      layer_norm_epsilon: LayerNorm epsilon (GPT-2).
      rope_theta: RoPE base.
      rope_scaling: None for plain RoPE, else a normalised frozen dict with `rope_type`
        in {"linear", "llama3"} and that type's keys (`factor`, and for llama3
        `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
      tie_word_embeddings: lm_head shares the token embedding (no separate parameter).
      attention_bias: bias on the q/k/v projections (Qwen2 always; Llama if configured).
      attention_out_bias: bias on the output projection (Llama `attention_bias`; not Qwen2).
      qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
      mlp_bias: bias on the MLP projections (Llama `mlp_bias`).
      sliding_window: attention window W for the layers marked "sliding_attention": a query
        at cache slot i sees keys at slots j with i - W < j <= i (as transformers masks it).
      layer_types: per-layer "full_attention" / "sliding_attention".
      max_window_layers: Qwen2/3 field kept only to round-trip config.json.
      scale_attn_weights: GPT-2 divides scores by sqrt(head_dim).
      scale_attn_by_inverse_layer_idx: GPT-2 also divides layer l's scores by l + 1.
      bos_token_id / eos_token_id / pad_token_id: special tokens (eos may be a tuple).
      dtype: parameter dtype the checkpoint was saved in ("bfloat16", ...), if recorded.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = _DEFAULT_ROPE_THETA
    rope_scaling: FrozenDict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    max_window_layers: int | None = None
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None

    def __post_init__(self):
        where = f"ModelConfig(model_type={self.model_type!r})"
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(_unsupported_message(self.model_type, None))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{where}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"{where}: hidden_act {self.hidden_act!r} is not supported; use one of "
                f"{SUPPORTED_ACTIVATIONS}."
            )
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] not in (
            "linear",
            "llama3",
        ):
            raise ValueError(f"{where}: bad rope_scaling {dict(self.rope_scaling)!r}.")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"{where}: layer_types has {len(self.layer_types)} entries for "
                    f"{self.num_hidden_layers} layers."
                )
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise ValueError(f"{where}: unsupported layer_types {sorted(bad)}.")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError(f"{where}: sliding layers need sliding_window.")

    @property
    def n_positions(self) -> int:
        """GPT-2's name for `max_position_embeddings`."""
        return self.max_position_embeddings

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer `layer` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return True  # Mistral: every layer slides
        return self.layer_types[layer] == "sliding_attention"

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str | None = None) -> ModelConfig:
        """Parses a Hugging Face `config.json` dict (transformers 4 or 5 spelling).

        Args:
          d: the parsed config.json.
          source: the file it came from, named in error messages.

        Returns:
          The `ModelConfig`.

        Raises:
          ValueError: unsupported `model_type`, RoPE type or architecture feature.
        """
        where = source or "config dict"
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(_unsupported_message(model_type, source))
        defaults = _HF_DEFAULTS[model_type]

        def get(key):
            return d[key] if key in d else defaults.get(key)

        common = dict(
            model_type=model_type,
            vocab_size=int(get("vocab_size")),
            bos_token_id=get("bos_token_id"),
            eos_token_id=_as_eos(get("eos_token_id")),
            pad_token_id=get("pad_token_id"),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            dtype=_dtype_name(d.get("dtype", d.get("torch_dtype"))),
        )
        if model_type == "gpt2":
            return cls(**common, **_gpt2_fields(d, get, where))
        return cls(**common, **_llama_fields(d, get, model_type, where))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads `config.json` at `path` (see `from_hf_dict`)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f), source=os.fspath(path))

    # ------------------------------------------------------------------ export
    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """Returns a transformers-5 `config.json` dict that rebuilds this architecture.

        Args:
          dtype: parameter dtype to record ("float32", "bfloat16"); defaults to `self.dtype`.

        Returns:
          A JSON-serialisable dict accepted by `transformers.AutoConfig.from_pretrained`.
        """
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "dtype": dtype or self.dtype or "float32",
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.model_type == "gpt2":
            out.update(
                n_embd=self.hidden_size,
                n_layer=self.num_hidden_layers,
                n_head=self.num_attention_heads,
                n_inner=self.intermediate_size,
                n_positions=self.max_position_embeddings,
                activation_function=self.hidden_act,
                layer_norm_epsilon=self.layer_norm_epsilon,
                scale_attn_weights=self.scale_attn_weights,
                scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
            )
            return out
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(dict(self.rope_scaling))
        out.update(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
        )
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            out.update(sliding_window=self.sliding_window)
        else:  # qwen2 / qwen3
            if self.model_type == "qwen3":
                out.update(attention_bias=self.attention_bias)
            sliding = self.layer_types is not None and "sliding_attention" in self.layer_types
            out.update(
                use_sliding_window=sliding,
                sliding_window=self.sliding_window,
                max_window_layers=self.max_window_layers,
                layer_types=list(self.layer_types) if self.layer_types else None,
            )
        return out


def _unsupported_message(model_type: Any, source: str | None) -> str:
    return (
        f"Unsupported model_type {model_type!r} in {source or 'config dict'}: jaxunlearn ports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}. Convert the checkpoint to one of these or add a "
        "port under jaxunlearn/models/."
    )


def _as_eos(eos: Any) -> int | tuple[int, ...] | None:
    if isinstance(eos, (list, tuple)):
        return tuple(int(e) for e in eos)
    return eos


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def _gpt2_fields(d: Mapping[str, Any], get, where: str) -> dict[str, Any]:
    if get("add_cross_attention"):
        raise ValueError(f"{where}: GPT-2 with add_cross_attention=True is not supported.")
    hidden = int(get("n_embd"))
    heads = int(get("n_head"))
    inner = get("n_inner")
    return dict(
        hidden_size=hidden,
        intermediate_size=int(inner) if inner is not None else 4 * hidden,
        num_hidden_layers=int(get("n_layer")),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        hidden_act=get("activation_function"),
        max_position_embeddings=int(get("n_positions")),
        layer_norm_epsilon=float(get("layer_norm_epsilon")),
        scale_attn_weights=bool(get("scale_attn_weights")),
        scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx")),
    )


def _llama_fields(d: Mapping[str, Any], get, model_type: str, where: str) -> dict[str, Any]:
    hidden = int(get("hidden_size"))
    heads = int(get("num_attention_heads"))
    layers = int(get("num_hidden_layers"))
    kv_heads = get("num_key_value_heads")
    head_dim = get("head_dim")
    rope_theta, rope_scaling = _parse_rope(d, int(get("max_position_embeddings")), where)
    fields = dict(
        hidden_size=hidden,
        intermediate_size=int(get("intermediate_size")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads) if kv_heads is not None else heads,
        head_dim=int(head_dim) if head_dim is not None else hidden // heads,
        hidden_act=get("hidden_act"),
        max_position_embeddings=int(get("max_position_embeddings")),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
    )
    if model_type == "llama":
        bias = bool(get("attention_bias"))
        fields.update(attention_bias=bias, attention_out_bias=bias, mlp_bias=bool(get("mlp_bias")))
    elif model_type == "mistral":
        fields.update(sliding_window=get("sliding_window"))
    else:
        # Qwen2: q/k/v always carry a bias, o_proj never (modeling_qwen2.py). Qwen3: none,
        # unless attention_bias, which then covers o_proj too; plus q/k RMSNorm.
        if model_type == "qwen2":
            fields.update(attention_bias=True)
        else:
            bias = bool(get("attention_bias"))
            fields.update(attention_bias=bias, attention_out_bias=bias, qk_norm=True)
        window = get("sliding_window") if get("use_sliding_window") else None
        max_window_layers = get("max_window_layers")
        layer_types = d.get("layer_types")
        if layer_types is None:  # transformers' Qwen2Config.__post_init__ rule
            layer_types = [
                "sliding_attention"
                if window is not None and i >= max_window_layers
                else "full_attention"
                for i in range(layers)
            ]
        fields.update(
            sliding_window=window,
            layer_types=tuple(layer_types),
            max_window_layers=max_window_layers,
        )
    return fields


def _parse_rope(
    d: Mapping[str, Any], max_position_embeddings: int, where: str
) -> tuple[float, FrozenDict | None]:
    # transformers 5 (`convert_rope_params_to_dict`): a legacy `rope_scaling` wins over
    # `rope_parameters`; `rope_theta` inside the dict wins over a top-level `rope_theta`.
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if set(params) & {"full_attention", "sliding_attention"}:
        raise ValueError(f"{where}: per-layer-type rope_parameters are not supported.")
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta", _DEFAULT_ROPE_THETA)
    legacy_type = params.pop("type", None)
    rope_type = params.pop("rope_type", None) or legacy_type or "default"
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported.")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{where}: RoPE type {rope_type!r} is not supported; supported types are "
            f"{SUPPORTED_ROPE_TYPES}. (dynamic/yarn/longrope change frequencies with sequence "
            "length and are not ported.)"
        )
    if rope_type == "default":
        return float(theta), None

    def need(key):
        if params.get(key) is None:
            raise ValueError(f"{where}: rope type {rope_type!r} needs {key!r} in rope_parameters.")
        return float(params[key])

    scaling = {"rope_type": rope_type, "factor": need("factor")}
    if rope_type == "llama3":
        # transformers fills original_max_position_embeddings from max_position_embeddings.
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
        scaling.update(
            low_freq_factor=need("low_freq_factor"),
            high_freq_factor=need("high_freq_factor"),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return float(theta), FrozenDict(scaling)
