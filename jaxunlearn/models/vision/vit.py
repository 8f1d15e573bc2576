"""Vision Transformer classifier (Flax NNX) with the layout of Hugging Face `ViTForImageClassification`.

Module names mirror transformers' `modeling_vit.py` (v5 names: ``vit.embeddings``,
``vit.layers[i].attention.{q,k,v,o}_proj``, ``layernorm_before/after``, ``mlp.fc1/fc2``,
``vit.layernorm``, ``classifier``), so a checkpoint maps onto it by renaming leaves
(`jaxunlearn.checkpoints.vision` also accepts the older ``encoder.layer.N.attention.
attention.query`` names). Pre-norm blocks, exact GELU, the classifier reads the final
layer-normed [CLS] token, which is also the returned feature vector. No dropout (the
ports are for unlearning and evaluation; inference semantics). Images are NHWC float32.

References:
  Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv 2010.11929.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models.vision.outputs import ClassifierOutput

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hugging Face `ViTConfig` fields the architecture depends on.

    Attributes:
      num_labels: output classes.
      num_channels: input channels.
      image_size: input height = width.
      patch_size: square patch side (image_size must be a multiple).
      hidden_size: model width.
      num_hidden_layers: transformer blocks.
      num_attention_heads: heads per block.
      intermediate_size: MLP width.
      hidden_act: "gelu" (exact), "gelu_new" (tanh) or "relu".
      layer_norm_eps: LayerNorm epsilon.
      qkv_bias: bias on the query/key/value projections.
    """

    num_labels: int = 10
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True

    model_type: str = "vit"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig: image_size {self.image_size} is not a multiple of patch_size "
                f"{self.patch_size}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ViTConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"ViTConfig.hidden_act {self.hidden_act!r} not in {sorted(_ACTIVATIONS)}."
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict) -> ViTConfig:
        """From a Hugging Face `config.json` dict (`num_labels` from `id2label`)."""
        labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_labels", "model_type"}
        kw = {k: v for k, v in hf.items() if k in fields}
        for key in ("image_size", "patch_size"):
            if isinstance(kw.get(key), list | tuple):
                a, b = kw[key]
                if a != b:
                    raise ValueError(f"ViTConfig: only square {key} is supported, got {kw[key]}.")
                kw[key] = a
        return cls(num_labels=int(labels), **kw)


class ViTPatchEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs):
        p = cfg.patch_size
        self.projection = nnx.Conv(
            cfg.num_channels, cfg.hidden_size, kernel_size=(p, p), strides=(p, p),
            padding="VALID", rngs=rngs,
        )  # fmt: skip

    def __call__(self, x):
        x = self.projection(x)  # [B, H/p, W/p, D], row-major patches as torch's flatten(2)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class ViTEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs):
        key = rngs.params()
        self.cls_token = nnx.Param(0.02 * jax.random.normal(key, (1, 1, cfg.hidden_size)))
        self.position_embeddings = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, cfg.num_patches + 1, cfg.hidden_size))
        )
        self.patch_embeddings = ViTPatchEmbeddings(cfg, rngs=rngs)

    def __call__(self, x):
        patches = self.patch_embeddings(x)
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embeddings[...]


class ViTAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs):
        d, bias = cfg.hidden_size, cfg.qkv_bias
        self.heads = cfg.num_attention_heads
        self.q_proj = nnx.Linear(d, d, use_bias=bias, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, use_bias=bias, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, use_bias=bias, rngs=rngs)
        self.o_proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape

        def heads(y):
            return y.reshape(b, t, self.heads, d // self.heads)

        out = jax.nn.dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return self.o_proj(out.reshape(b, t, d))


class ViTMLP(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs):
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class ViTLayer(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs):
        eps, d = cfg.layer_norm_eps, cfg.hidden_size
        self.attention = ViTAttention(cfg, rngs=rngs)
        self.layernorm_before = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
        self.layernorm_after = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
        self.mlp = ViTMLP(cfg, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.mlp(self.layernorm_after(x))


class ViTModel(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs):
        self.embeddings = ViTEmbeddings(cfg, rngs=rngs)
        self.layers = nnx.List([ViTLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.layernorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x):
        x = self.embeddings(x)
        for layer in self.layers:
            x = layer(x)
        return self.layernorm(x)


class ViTForImageClassification(nnx.Module):
    """ViT encoder and a linear classifier on the final [CLS] token."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vit = ViTModel(config, rngs=rngs)
        self.classifier = nnx.Linear(config.hidden_size, config.num_labels, rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool = False) -> ClassifierOutput:
        """Logits and [CLS] features of NHWC images (`train` is accepted and unused)."""
        del train
        features = self.vit(jnp.asarray(images, jnp.float32))[:, 0]
        return ClassifierOutput(logits=self.classifier(features), features=features)
