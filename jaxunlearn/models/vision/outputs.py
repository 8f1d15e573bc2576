"""The output of every image classifier port: logits and the penultimate features."""

from typing import NamedTuple

import jax


class ClassifierOutput(NamedTuple):
    """What an image classifier returns.

    Attributes:
      logits: float32 [B, num_labels].
      features: float32 [B, D], the penultimate representation the linear head reads (the
        input of a linear probe, ACU's frozen features).
    """

    logits: jax.Array
    features: jax.Array
