"""A small convolutional image classifier (Flax NNX), the fast default of the classifier benchmark.

Two 3x3 convolution blocks (ReLU, 2x2 max-pool when the image is still large enough), a
hidden dense layer whose ReLU output is the penultimate *feature* vector, and a linear
head. It has no batch norm, so training and inference behave the same and importances
(SSD's Fisher diagonal) need no mode switch. Images are NHWC float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models.vision.outputs import ClassifierOutput


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """Shape of a `SmallCNN`.

    Attributes:
      num_labels: output classes.
      num_channels: input channels (1 for digits, 3 for CIFAR).
      image_size: input height = width.
      widths: output channels of each 3x3 convolution block.
      hidden_size: width of the penultimate (feature) layer.
    """

    num_labels: int = 10
    num_channels: int = 1
    image_size: int = 8
    widths: tuple[int, ...] = (16, 32)
    hidden_size: int = 64

    model_type: str = "small_cnn"

    def pooled_size(self) -> int:
        """Spatial size after the blocks (each halves the size while it is >= 2)."""
        size = self.image_size
        for _ in self.widths:
            size = size // 2 if size >= 2 else size
        return size


class SmallCNN(nnx.Module):
    """conv-relu-pool blocks, a dense feature layer and a linear classifier."""

    def __init__(self, config: CNNConfig, *, rngs: nnx.Rngs):
        self.config = config
        channels = (config.num_channels, *config.widths)
        self.convs = nnx.List(
            [
                nnx.Conv(c_in, c_out, kernel_size=(3, 3), padding="SAME", rngs=rngs)
                for c_in, c_out in zip(channels[:-1], channels[1:])
            ]
        )
        flat = config.pooled_size() ** 2 * channels[-1]
        self.dense = nnx.Linear(flat, config.hidden_size, rngs=rngs)
        self.classifier = nnx.Linear(config.hidden_size, config.num_labels, rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool = False) -> ClassifierOutput:
        """Logits [B, num_labels] and penultimate features [B, hidden_size] of NHWC images."""
        del train  # no batch norm or dropout: both modes are the same function
        x = jnp.asarray(images, jnp.float32)
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
            if x.shape[1] >= 2:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        features = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
        return ClassifierOutput(logits=self.classifier(features), features=features)
