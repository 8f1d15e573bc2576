"""Flax NNX image classifiers: a small CNN, and ports of Hugging Face ResNet and ViT.

Every classifier is called as ``model(images, *, train=False) -> ClassifierOutput`` with
NHWC float32 images, and returns logits and the penultimate features. ``train=True`` only
changes batch norm (ResNet: batch statistics and running-average updates).
`build_classifier(config)` makes a randomly initialised model of any of the three;
`jaxunlearn.checkpoints.vision` loads and saves the Hugging Face ones.
"""

from __future__ import annotations

from flax import nnx

from jaxunlearn.models.vision.cnn import CNNConfig, SmallCNN
from jaxunlearn.models.vision.hf_keys import hf_name, nnx_name
from jaxunlearn.models.vision.outputs import ClassifierOutput
from jaxunlearn.models.vision.resnet import ResNetConfig, ResNetForImageClassification
from jaxunlearn.models.vision.vit import ViTConfig, ViTForImageClassification

ClassifierConfig = CNNConfig | ResNetConfig | ViTConfig
Classifier = SmallCNN | ResNetForImageClassification | ViTForImageClassification


def build_classifier(config: ClassifierConfig, *, seed: int = 0) -> Classifier:
    """A randomly initialised classifier for `config` (CNN, ResNet or ViT)."""
    rngs = nnx.Rngs(seed)
    if isinstance(config, CNNConfig):
        return SmallCNN(config, rngs=rngs)
    if isinstance(config, ResNetConfig):
        return ResNetForImageClassification(config, rngs=rngs)
    if isinstance(config, ViTConfig):
        return ViTForImageClassification(config, rngs=rngs)
    raise TypeError(f"build_classifier: unknown config type {type(config).__name__}.")


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
