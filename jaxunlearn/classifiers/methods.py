"""Unlearning methods for image classifiers, each ``method(model, task, **hparams) -> model``.

The same pieces as for language models: loss terms (`classifiers.objectives`) combined by
`jaxunlearn.objectives.forget_retain`, differentiated by `jaxunlearn.train.make_step`,
transformed by optax chains (`jaxunlearn.transforms.retain_projection` for GU,
`hardness_aware` for HAMU), the OFMU bi-level step (`jaxunlearn.bilevel.ofmu`), and the
one-shot SSD / LF-SSD (`jaxunlearn.transforms.ssd`, `lf_ssd`, with `fisher_diagonal` /
`importance_abs`). Every gradient method runs batch norm in inference mode (running
statistics frozen, as HAMU's CIFAR runs and SSD's importance pass do).

The terms and `ForgetRetainImages` work unchanged with `jaxunlearn.train.unlearn`
(checkpoints, logs, resume); the methods below call `make_step` directly because a
benchmark run needs none of that.

`METHODS` maps the leaderboard names to the functions; `DEFAULTS` gives each one's
hyperparameters (scaled for the small digits/CIFAR presets, not tuned per scenario).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxunlearn import bilevel, train, transforms
from jaxunlearn.classifiers import acu, saliency
from jaxunlearn.classifiers import objectives as cob
from jaxunlearn.classifiers.scenarios import Task
from jaxunlearn.classifiers.training import predict
from jaxunlearn.data.images import ImageDataset
from jaxunlearn.objectives import forget_retain


class ForgetRetainImages:
    """Unlearning batches ``{"forget": {...}, "retain": {...}}`` as a pure function of step.

    Forget examples carry fixed ``random_labels`` (uniform over all classes, as SalUn's RL
    baseline draws them), chosen once from the seed.

    Args:
      forget: the forget set.
      retain: the retain set.
      num_labels: K, the range of the random labels.
      batch_size: examples per part (capped at each set's size).
      seed: sampling seed.
    """

    def __init__(
        self, forget: ImageDataset, retain: ImageDataset, num_labels: int, batch_size: int,
        seed: int = 0,
    ):  # fmt: skip
        if len(forget) == 0 or len(retain) == 0:
            raise ValueError(
                f"ForgetRetainImages: the forget set has {len(forget)} and the retain set "
                f"{len(retain)} images; both must be non-empty."
            )
        self.forget, self.retain, self.seed = forget, retain, seed
        self.bf, self.br = min(batch_size, len(forget)), min(batch_size, len(retain))
        self.random_labels = (
            np.random.default_rng([seed, 1]).integers(0, num_labels, len(forget)).astype(np.int32)
        )

    def batch_at(self, step: int) -> dict[str, dict[str, jax.Array]]:
        rng = np.random.default_rng([self.seed, 2, step])
        f = rng.choice(len(self.forget), self.bf, replace=False)
        r = rng.choice(len(self.retain), self.br, replace=False)
        return {
            "forget": {
                "images": jnp.asarray(self.forget.images[f]),
                "labels": jnp.asarray(self.forget.labels[f]),
                "random_labels": jnp.asarray(self.random_labels[f]),
            },
            "retain": {
                "images": jnp.asarray(self.retain.images[r]),
                "labels": jnp.asarray(self.retain.labels[r]),
            },
        }


def _copy_split(model: nnx.Module):
    graphdef, params, rest = train.split_model(model)
    return graphdef, jax.tree.map(jnp.copy, params), rest  # the step donates params


def _run(model, task, objective, tx, *, steps, batch_size, seed, ofmu=None):
    """`steps` jitted unlearning steps on a copy of `model`'s parameters."""
    graphdef, params, rest = _copy_split(model)
    data = ForgetRetainImages(
        task.forget_set(), task.retain_set(), task.num_labels, batch_size, seed
    )
    if ofmu is not None:
        step = ofmu.make_step(graphdef, rest, objective)
    else:
        step = train.make_step(graphdef, rest, objective, tx)  # GU/HAMU get retain_grads
    opt_state, state = step.init(params), None
    for s in range(steps):
        params, opt_state, state, metrics = step(params, opt_state, data.batch_at(s), state)
        if float(metrics.get("stop", 0.0)):
            break
    return nnx.merge(graphdef, params, rest)


def finetune(model, task: Task, *, lr=0.02, steps=60, batch_size=64, seed=0):
    """Fine-tune on the retain set only (catastrophic forgetting of D_f)."""
    return _run(model, task, _RetainOnly(cob.cross_entropy()), optax.sgd(lr, momentum=0.9), steps=steps,
                batch_size=batch_size, seed=seed)  # fmt: skip


class _RetainOnly:
    """A plain term reading batch["retain"] (fine-tuning needs no forget forward pass)."""

    def __init__(self, term):
        self.term = term

    def __call__(self, forward, batch, *, ref_forward=None):
        return self.term(forward, batch["retain"], ref_forward=ref_forward)


def gradient_ascent(model, task: Task, *, lr=5e-3, steps=30, batch_size=64, seed=0):
    """GradAscent: raise the forget cross-entropy (no retain term)."""
    objective = forget_retain(cob.gradient_ascent(), None)
    return _run(model, task, objective, optax.sgd(lr), steps=steps, batch_size=batch_size,
                seed=seed)  # fmt: skip


def random_labels(model, task: Task, *, lr=0.01, steps=40, batch_size=64, seed=0, mask=None):
    """RL: relabel D_f randomly and train on it together with D_r (true labels)."""
    objective = forget_retain(cob.random_labels(), cob.cross_entropy())
    tx = optax.sgd(lr, momentum=0.9)
    if mask is not None:
        tx = optax.chain(saliency.masked_updates(mask), tx)
    return _run(model, task, objective, tx, steps=steps, batch_size=batch_size, seed=seed)


def forget_gradient(model: nnx.Module, forget: ImageDataset, *, batch_size: int = 64) -> Any:
    """Sum over forget batches of grad(-CE): the gradient SalUn ranks for its saliency mask."""
    graphdef, params, rest = train.split_model(model)

    @jax.jit
    def grad(params, images, labels):
        def loss(p):
            logits = train.model_forward(graphdef, p, rest)(images=images).logits
            return -cob.mean_cross_entropy(logits, labels)

        return jax.grad(loss)(params)

    total = None
    for start in range(0, len(forget), batch_size):
        g = grad(params, jnp.asarray(forget.images[start : start + batch_size]),
                 jnp.asarray(forget.labels[start : start + batch_size]))  # fmt: skip
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def salun(model, task: Task, *, keep=0.5, lr=0.01, steps=40, batch_size=64, seed=0):
    """SalUn: random labelling restricted to the `keep` most forget-salient weights."""
    mask = saliency.saliency_mask(forget_gradient(model, task.forget_set()), keep)
    return random_labels(model, task, lr=lr, steps=steps, batch_size=batch_size, seed=seed,
                         mask=mask)  # fmt: skip


def gu(model, task: Task, *, lr=5e-3, rank=4, steps=30, batch_size=64, seed=0, alpha=1.0):
    """GU: gradient ascent with its retain-entangled part projected out, plus retain descent."""
    objective = forget_retain(cob.gradient_ascent(), cob.cross_entropy(), alpha=alpha)
    tx = optax.chain(transforms.retain_projection(rank=rank), optax.sgd(lr))
    return _run(model, task, objective, tx, steps=steps, batch_size=batch_size, seed=seed)


def hamu(model, task: Task, *, lr=0.05, constraint=None, steps=20, batch_size=64, seed=0):
    """HAMU-Q: raise the forget loss by B per step at minimum first-order retain cost."""
    objective = forget_retain(cob.gradient_ascent(), cob.cross_entropy())
    bound = 0.5 * lr if constraint is None else constraint  # HAMU's B = 0.5 · lr
    tx = transforms.hardness_aware(lr, bound, stop_on_infeasible=False)
    return _run(model, task, objective, tx, steps=steps, batch_size=batch_size, seed=seed)


def ofmu(model, task: Task, *, lr_inner=2e-3, lr_outer=0.01, inner_steps=2, beta=1.0, rho=0.1,
         steps=20, batch_size=64, seed=0):  # fmt: skip
    """OFMU: inner ascent on the forget CE with a gradient-similarity penalty, outer retain
    descent with the value-gap penalty (`jaxunlearn.bilevel.ofmu`)."""
    method = bilevel.ofmu(
        optax.sgd(lr_inner), optax.sgd(lr_outer, momentum=0.9), inner_steps=inner_steps,
        beta=beta, rho=rho, penalty="value",
    )  # fmt: skip
    objective = forget_retain(cob.cross_entropy(), cob.cross_entropy())
    return _run(model, task, objective, None, steps=steps, batch_size=batch_size, seed=seed,
                ofmu=method)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _compiled_rule(one_shot: Callable, alpha: float, lam: float) -> Callable:
    # One compiled function, reused across requests: eager tree_maps would compile every
    # elementwise op per leaf shape.
    return jax.jit(lambda p, a, b: one_shot(p, a, b, alpha=alpha, lam=lam))


def weighted_batches(data: ImageDataset, batch_size: int) -> Iterator[dict[str, jax.Array]]:
    """Consecutive batches, the last one padded to `batch_size` with zero-weight rows.

    Every batch then has one shape, so the importance pass compiles once for both D and
    D_f; the losses below average over the weighted (real) rows only, so each batch's
    gradient is exactly that of its real examples (SSD's DataLoader keeps the short last
    batch).
    """
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size]
        labels = data.labels[start : start + batch_size]
        pad = batch_size - len(labels)
        weights = np.r_[np.ones(len(labels)), np.zeros(pad)].astype(np.float32)
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
            labels = np.concatenate([labels, np.repeat(labels[-1:], pad, 0)])
        yield {"images": jnp.asarray(images), "labels": jnp.asarray(labels),
               "weights": jnp.asarray(weights)}  # fmt: skip


def _dampen(model, task, importance, one_shot, *, alpha, lam, batch_size):
    graphdef, params, rest = train.split_model(model)
    # Full data D = retain then forget, unshuffled (SSD's ConcatDataset(retain, forget)).
    order = np.concatenate([np.flatnonzero(task.retain), np.flatnonzero(task.forget)])
    full = task.train.subset(order)
    i_full = importance(params, weighted_batches(full, batch_size))
    i_forget = importance(params, weighted_batches(task.forget_set(), batch_size))
    params = _compiled_rule(one_shot, float(alpha), float(lam))(params, i_full, i_forget)
    return nnx.merge(graphdef, params, rest)


def ssd(model, task: Task, *, alpha=10.0, lam=1.0, batch_size=None, loss=None):
    """SSD: dampen weights far more important (batch-mean Fisher) to D_f than to D.

    Pass ``loss=ssd_loss(graphdef, rest)`` of this model to reuse the compiled importance
    pass across requests (a fresh loss object compiles again).
    """
    graphdef, _, rest = train.split_model(model)
    loss = ssd_loss(graphdef, rest) if loss is None else loss
    batch_size = batch_size or (128 if task.kind == "random" else 64)  # SSD's scripts

    def importance(params, batches):
        return transforms.fisher_diagonal(loss, params, batches, convention="batch_mean")

    return _dampen(model, task, importance, transforms.ssd, alpha=alpha, lam=lam,
                   batch_size=batch_size)  # fmt: skip


def lf_ssd(model, task: Task, *, alpha=10.0, lam=1.0, batch_size=None):
    """LF-SSD: SSD on absolute gradients of the label-free squared logit norm."""
    graphdef, _, rest = train.split_model(model)
    loss = _lf_loss(graphdef, rest)
    batch_size = batch_size or (128 if task.kind == "random" else 64)

    def importance(params, batches):
        return transforms.importance_abs(loss, params, batches)

    return _dampen(model, task, importance, transforms.lf_ssd, alpha=alpha, lam=lam,
                   batch_size=batch_size)  # fmt: skip


def ssd_loss(graphdef: nnx.GraphDef, rest: Any) -> Callable:
    """Mean cross-entropy ``loss(params, batch)`` of a split classifier (inference mode).

    Build it once per model and pass the same object to both importance passes, so the
    compiled gradient pass is reused (`fisher_diagonal` keys its cache on the loss).
    """

    def loss(params, batch):
        logits = train.model_forward(graphdef, params, rest)(images=batch["images"]).logits
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["labels"]
        )
        w = batch.get("weights", jnp.ones_like(ce))
        return jnp.sum(w * ce) / jnp.sum(w)

    return loss


def _lf_loss(graphdef, rest) -> Callable:
    def logits_fn(params, batch):
        logits = train.model_forward(graphdef, params, rest)(images=batch["images"]).logits
        # loss_free_loss averages ||f||^2 over all B rows; scaling row i by
        # sqrt(w_i · B / sum w) turns that into the mean over the real rows.
        w = batch.get("weights", jnp.ones(logits.shape[0]))
        return logits * jnp.sqrt(w * w.shape[0] / jnp.sum(w))[:, None]

    return transforms.loss_free_loss(logits_fn)


def acu_head(model, task: Task, *, gamma=0.1, batch_size=512):
    """ACU: refit the head as a ridge regression on frozen features, then forget D_f in
    closed form; the model's `classifier` takes the resulting weights."""
    _, features = predict(model, task.train.images, batch_size=batch_size)
    head = acu.ridge_head(features, task.train.labels, task.num_labels, gamma=gamma)
    head = acu.acu_forget(head, features[task.forget], task.train.labels[task.forget])
    return with_linear_head(model, head.weights)


def with_linear_head(model: nnx.Module, weights: np.ndarray) -> nnx.Module:
    """A copy of `model` whose `classifier` (kernel, bias) is [D + 1, K] `weights`."""
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    new.classifier.kernel.set_value(jnp.asarray(weights[:-1], jnp.float32))
    new.classifier.bias.set_value(jnp.asarray(weights[-1], jnp.float32))
    return new


METHODS: dict[str, Callable[..., nnx.Module]] = {
    "finetune": finetune,
    "gradascent": gradient_ascent,
    "random_labels": random_labels,
    "salun": salun,
    "ssd": ssd,
    "lf_ssd": lf_ssd,
    "gu": gu,
    "hamu": hamu,
    "ofmu": ofmu,
    "acu": acu_head,
}
