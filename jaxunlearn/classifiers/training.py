"""Training image classifiers from scratch (target and retrain oracle) and batched inference.

One recipe (`TrainRecipe`) trains both the target (all training data) and the oracle (the
retain data only), so their difference is the forget data alone, as the SSD and SalUn
retrain baselines require. SGD with momentum and weight decay under a cosine
schedule; batch norm in training mode (batch statistics, running averages
updated); the example order is a pure function of (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxunlearn.classifiers.objectives import mean_cross_entropy
from jaxunlearn.data.images import ImageDataset
from jaxunlearn.models.vision import ClassifierConfig, build_classifier


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """How a classifier is trained from scratch.

    Attributes:
      epochs: passes over the training data.
      batch_size: examples per step (the last partial batch is filled by wrapping around).
      learning_rate: peak SGD learning rate (cosine decay to 0 over the run).
      momentum: SGD momentum.
      weight_decay: decoupled L2 weight decay (added to the gradient, as torch SGD).
      seed: initialisation and example-order seed.
    """

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0


@functools.lru_cache(maxsize=16)
def sgd(momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """torch-style SGD (weight decay added to the gradient, then momentum) whose learning
    rate is a state entry set each step, so one object (and one compiled step) serves every
    run with the same momentum and decay, whatever its schedule."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=momentum or None),
    )


def cosine_lr(recipe: TrainRecipe, step: int, total: int) -> float:
    """Cosine decay from the recipe's learning rate to 0 over `total` steps."""
    return 0.5 * recipe.learning_rate * (1.0 + np.cos(np.pi * min(step, total) / max(total, 1)))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """[n_batches, batch_size] example indices of one epoch: a permutation, wrapped at the end."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    n_batches = -(-n // batch_size)
    return np.resize(order, n_batches * batch_size).reshape(n_batches, batch_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(1, 2, 3))
def _train_step(graphdef, params, rest, opt_state, images, labels, *, tx):
    def loss_fn(p, rest):
        # Fresh Variables at this trace level, so batch norm may update its statistics.
        model = nnx.merge(graphdef, p, jax.tree.map(jnp.asarray, rest))
        logits = model(images, train=True).logits
        return mean_cross_entropy(logits, labels), nnx.state(model, nnx.Not(nnx.Param))

    (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_rest, opt_state, loss


def train_classifier(
    config: ClassifierConfig, data: ImageDataset, recipe: TrainRecipe
) -> tuple[nnx.Module, dict[str, Any]]:
    """Trains a freshly initialised classifier on `data` with `recipe`.

    Args:
      config: the architecture (its `num_labels` must cover the data's classes).
      data: the training images and labels.
      recipe: the training recipe.

    Returns:
      (model, log) with the per-epoch mean training loss in ``log["loss"]``.

    Raises:
      ValueError: empty data, or labels beyond the model's outputs.
    """
    if len(data) == 0:
        raise ValueError("train_classifier: the training set is empty.")
    if int(data.labels.max()) >= config.num_labels:
        raise ValueError(
            f"train_classifier: label {int(data.labels.max())} but the model has "
            f"{config.num_labels} outputs; set num_labels to the data's class count."
        )
    model = build_classifier(config, seed=recipe.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    steps_per_epoch = -(-len(data) // recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    tx = sgd(recipe.momentum, recipe.weight_decay)
    opt_state = tx.init(params)
    images, labels = jnp.asarray(data.images), jnp.asarray(data.labels)
    losses = []
    step = 0
    for epoch in range(recipe.epochs):
        epoch_loss = 0.0
        for idx in epoch_batches(len(data), recipe.batch_size, recipe.seed, epoch):
            lr = cosine_lr(recipe, step, total)
            opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
            params, rest, opt_state, loss = _train_step(
                graphdef, params, rest, opt_state, images[idx], labels[idx], tx=tx
            )
            epoch_loss += float(loss)
            step += 1
        losses.append(epoch_loss / steps_per_epoch)
    return nnx.merge(graphdef, params, rest), {"loss": losses}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _infer(graphdef, state, images):
    out = nnx.merge(graphdef, state)(images)
    return out.logits.astype(jnp.float32), out.features.astype(jnp.float32)


def predict(
    model: nnx.Module, images: np.ndarray, *, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode logits [N, K] and penultimate features [N, D] as numpy arrays.

    The last batch is padded to `batch_size` so every call compiles one shape.
    """
    graphdef, state = nnx.split(model)
    n = len(images)
    if n == 0:
        return np.zeros((0, model.config.num_labels), np.float32), np.zeros((0, 0), np.float32)
    logits, features = [], []
    for start in range(0, n, batch_size):
        chunk = np.asarray(images[start : start + batch_size])
        pad = batch_size - len(chunk) if n > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        lg, ft = _infer(graphdef, state, jnp.asarray(chunk))
        keep = len(chunk) - pad
        logits.append(np.asarray(lg)[:keep])
        features.append(np.asarray(ft)[:keep])
    return np.concatenate(logits), np.concatenate(features)
