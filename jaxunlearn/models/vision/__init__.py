"""Flax NNX image classifiers: a small CNN, and ports of Hugging Face ResNet and ViT.

Every classifier is called as ``model(images, *, train=False) -> ClassifierOutput`` with
NHWC float32 images, and returns logits and the penultimate features. ``train=True`` only
changes batch norm (ResNet: batch statistics and running-average updates).
`build_classifier(config)` makes a randomly initialised model of any of the three;
`jaxunlearn.checkpoints.vision` loads and saves the Hugging Face ones.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn.models.vision.cnn import CNNConfig, SmallCNN
from jaxunlearn.models.vision.hf_keys import hf_name, nnx_name
from jaxunlearn.models.vision.outputs import ClassifierOutput
from jaxunlearn.models.vision.resnet import ResNetConfig, ResNetForImageClassification
from jaxunlearn.models.vision.vit import ViTConfig, ViTForImageClassification

ClassifierConfig = CNNConfig | ResNetConfig | ViTConfig
Classifier = SmallCNN | ResNetForImageClassification | ViTForImageClassification


def build_classifier(config: ClassifierConfig, *, seed: int = 0) -> Classifier:
    """A randomly initialised classifier for `config` (CNN, ResNet or ViT).

    The model is built abstractly and its values drawn with numpy: kernels LeCun-normal
    (N(0, 1/fan_in), flax's default), biases 0, norm scales 1, batch-norm statistics
    (0, 1), ViT's [CLS] token and position embeddings N(0, 0.02^2). XLA's compilation of
    the equivalent JAX initialisers (one threefry per tensor) takes tens of seconds on
    CPU even for tiny nets; numpy takes milliseconds.

    Args:
      config: a `CNNConfig`, `ResNetConfig` or `ViTConfig`.
      seed: the numpy seed of the initial values.

    Returns:
      The model.
    """
    kinds = {CNNConfig: SmallCNN, ResNetConfig: ResNetForImageClassification,
             ViTConfig: ViTForImageClassification}  # fmt: skip
    cls = kinds.get(type(config))
    if cls is None:
        raise TypeError(f"build_classifier: unknown config type {type(config).__name__}.")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)

    def value(path, var):
        leaf, shape = str(path[-1]), var.get_value().shape
        if leaf == "kernel":
            x = rng.normal(size=shape) / np.sqrt(max(int(np.prod(shape[:-1])), 1))
        elif leaf in ("cls_token", "position_embeddings"):
            x = 0.02 * rng.normal(size=shape)
        elif leaf in ("scale", "var"):
            x = np.ones(shape)
        else:
            x = np.zeros(shape)
        return path, var.replace(jnp.asarray(x, var.get_value().dtype))

    flat = [value(p, v) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


__all__ = [
    "CNNConfig",
    "Classifier",
    "ClassifierConfig",
    "ClassifierOutput",
    "ResNetConfig",
    "ResNetForImageClassification",
    "SmallCNN",
    "ViTConfig",
    "ViTForImageClassification",
    "build_classifier",
    "hf_name",
    "nnx_name",
]
