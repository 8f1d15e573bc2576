"""ResNet image classifiers (Flax NNX) with the layout of Hugging Face `ResNetForImageClassification`.

Module names mirror transformers' `modeling_resnet.py` (``resnet.embedder.embedder``,
``resnet.encoder.stages[i].layers[j].layer[k]``, ``shortcut``, ``classifier``), so a
checkpoint maps onto it by renaming leaves only (`jaxunlearn.checkpoints.vision`). The
same module is the ResNet-18-style network of the classifier benchmark
(`ResNetConfig.resnet18`: basic blocks, depths 2-2-2-2, widths 64-128-256-512).

Batch norm: ``model(images, train=True)`` normalises with batch statistics and updates
the running averages (torch momentum 0.1 = flax momentum 0.9); ``train=False`` (the
default) uses the running averages, the inference mode in which SSD computes its Fisher
importances. Images are NHWC float32.

References:
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", arXiv 1512.03385.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models.vision.outputs import ClassifierOutput

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Hugging Face `ResNetConfig` fields the architecture depends on.

    Attributes:
      num_labels: output classes.
      num_channels: input channels.
      embedding_size: channels of the 7x7 stem convolution.
      hidden_sizes: output channels of each stage.
      depths: layers (blocks) per stage.
      layer_type: "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1; reduction 4).
      hidden_act: "relu", "gelu" or "silu".
      downsample_in_first_stage: stride 2 in the first stage's first block.
      downsample_in_bottleneck: stride on the bottleneck's first 1x1 rather than its 3x3.
    """

    num_labels: int = 10
    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False

    model_type: str = "resnet"

    def __post_init__(self):
        if self.layer_type not in ("basic", "bottleneck"):
            raise ValueError(
                f"ResNetConfig.layer_type must be basic/bottleneck, got {self.layer_type!r}."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"ResNetConfig.hidden_act {self.hidden_act!r} is not supported; use one of "
                f"{sorted(_ACTIVATIONS)}."
            )
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(
                f"ResNetConfig: hidden_sizes {self.hidden_sizes} and depths {self.depths} must "
                "have one entry per stage."
            )

    @classmethod
    def resnet18(cls, num_labels: int = 10, num_channels: int = 3, width: int = 64) -> ResNetConfig:
        """ResNet-18: basic blocks, depths (2, 2, 2, 2), widths width·(1, 2, 4, 8)."""
        sizes = tuple(width * m for m in (1, 2, 4, 8))
        return cls(num_labels, num_channels, width, sizes, (2, 2, 2, 2), "basic")

    @classmethod
    def from_hf(cls, hf: dict) -> ResNetConfig:
        """From a Hugging Face `config.json` dict (`num_labels` from `id2label`)."""
        labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_labels", "model_type"}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hf.items() if k in fields}
        return cls(num_labels=int(labels), **kw)


class ResNetConvLayer(nnx.Module):
    """Conv (no bias, padding k//2) -> batch norm -> activation (or none)."""

    def __init__(self, c_in, c_out, *, kernel_size=3, stride=1, act="relu", rngs):
        pad = kernel_size // 2
        self.convolution = nnx.Conv(
            c_in, c_out, kernel_size=(kernel_size, kernel_size), strides=(stride, stride),
            padding=((pad, pad), (pad, pad)), use_bias=False, rngs=rngs,
        )  # fmt: skip
        self.normalization = nnx.BatchNorm(c_out, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.act = act

    def __call__(self, x, train: bool):
        x = self.normalization(self.convolution(x), use_running_average=not train)
        return x if self.act is None else _ACTIVATIONS[self.act](x)


class ResNetShortCut(nnx.Module):
    """1x1 strided conv + batch norm projecting the residual to the block's shape."""

    def __init__(self, c_in, c_out, *, stride, rngs):
        self.convolution = nnx.Conv(
            c_in, c_out, kernel_size=(1, 1), strides=(stride, stride), use_bias=False, rngs=rngs
        )
        self.normalization = nnx.BatchNorm(c_out, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, x, train: bool):
        return self.normalization(self.convolution(x), use_running_average=not train)


class ResNetBlock(nnx.Module):
    """A basic or bottleneck residual block: act(layer(x) + shortcut(x))."""

    def __init__(self, cfg: ResNetConfig, c_in, c_out, *, stride, rngs):
        act = cfg.hidden_act
        self.shortcut = (
            ResNetShortCut(c_in, c_out, stride=stride, rngs=rngs)
            if c_in != c_out or stride != 1
            else None
        )
        if cfg.layer_type == "basic":
            convs = [
                ResNetConvLayer(c_in, c_out, stride=stride, act=act, rngs=rngs),
                ResNetConvLayer(c_out, c_out, act=None, rngs=rngs),
            ]
        else:
            mid, first = c_out // 4, cfg.downsample_in_bottleneck
            convs = [
                ResNetConvLayer(c_in, mid, kernel_size=1, stride=stride if first else 1, act=act,
                                rngs=rngs),
                ResNetConvLayer(mid, mid, stride=1 if first else stride, act=act, rngs=rngs),
                ResNetConvLayer(mid, c_out, kernel_size=1, act=None, rngs=rngs),
            ]  # fmt: skip
        self.layer = nnx.List(convs)
        self.act = act

    def __call__(self, x, train: bool):
        residual = x if self.shortcut is None else self.shortcut(x, train)
        for conv in self.layer:
            x = conv(x, train)
        return _ACTIVATIONS[self.act](x + residual)


class ResNetStage(nnx.Module):
    def __init__(self, cfg, c_in, c_out, *, stride, depth, rngs):
        self.layers = nnx.List(
            [ResNetBlock(cfg, c_in, c_out, stride=stride, rngs=rngs)]
            + [ResNetBlock(cfg, c_out, c_out, stride=1, rngs=rngs) for _ in range(depth - 1)]
        )

    def __call__(self, x, train: bool):
        for block in self.layers:
            x = block(x, train)
        return x


class ResNetEmbeddings(nnx.Module):
    """The stem: 7x7 stride-2 conv layer, then 3x3 stride-2 max-pool (padding 1)."""

    def __init__(self, cfg: ResNetConfig, *, rngs):
        self.embedder = ResNetConvLayer(
            cfg.num_channels, cfg.embedding_size, kernel_size=7, stride=2, act=cfg.hidden_act,
            rngs=rngs,
        )  # fmt: skip

    def __call__(self, x, train: bool):
        x = self.embedder(x, train)
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNetEncoder(nnx.Module):
    def __init__(self, cfg: ResNetConfig, *, rngs):
        ins = (cfg.embedding_size, *cfg.hidden_sizes[:-1])
        strides = (2 if cfg.downsample_in_first_stage else 1,) + (2,) * (len(cfg.depths) - 1)
        self.stages = nnx.List(
            [
                ResNetStage(cfg, c_in, c_out, stride=s, depth=d, rngs=rngs)
                for c_in, c_out, s, d in zip(ins, cfg.hidden_sizes, strides, cfg.depths)
            ]
        )

    def __call__(self, x, train: bool):
        for stage in self.stages:
            x = stage(x, train)
        return x


class ResNetModel(nnx.Module):
    def __init__(self, cfg: ResNetConfig, *, rngs):
        self.embedder = ResNetEmbeddings(cfg, rngs=rngs)
        self.encoder = ResNetEncoder(cfg, rngs=rngs)

    def __call__(self, x, train: bool):
        x = self.encoder(self.embedder(x, train), train)
        return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten


class ResNetForImageClassification(nnx.Module):
    """ResNet backbone, global average pool (the features) and a linear classifier."""

    def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.resnet = ResNetModel(config, rngs=rngs)
        self.classifier = nnx.Linear(config.hidden_sizes[-1], config.num_labels, rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool = False) -> ClassifierOutput:
        """Logits and pooled features of NHWC images (batch norm per `train`, see module doc)."""
        features = self.resnet(jnp.asarray(images, jnp.float32), train)
        return ClassifierOutput(logits=self.classifier(features), features=features)
