"""Parameter importances: diagonal Fisher information and absolute-gradient sensitivity.

These are the importance estimates of Selective Synaptic Dampening (squared gradients)
and its loss-free variant LF-SSD (absolute gradients of the squared logit norm), and the
retain importance consumed by `fisher_dampening`. Each takes
``loss_fn(params, batch) -> scalar`` (the mean loss over the batch) and an iterable of
batches (pytrees of arrays with a common leading batch axis), and returns a float32
pytree shaped like `params`.

Two Fisher conventions, which differ in scale:

- "per_example": the empirical Fisher diagonal, the mean over all N examples of the
  squared per-example gradient, (1/N) sum_i (grad l_i)^2, with l_i = loss_fn on a batch
  of that one example. Independent of how the data is batched.
- "batch_mean": SSD's code convention (if-loops/selective-synaptic-dampening
  `src/ssd.py::calc_importance`; arXiv 2308.07707), the mean over the N_b batches of
  the squared gradient of the batch-mean loss, (1/N_b) sum_B (grad Lbar(B))^2. For
  independent per-example gradients this is about (1/b) of the per-example Fisher plus
  the squared mean gradient, so it depends on the batch size b: the full-data and forget
  importances compared by SSD must use the same b.
"""

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Batch = Any
LossFn = Callable[[Any, Batch], jax.Array]
_CONVENTIONS = ("per_example", "batch_mean")


def _batch_size(batch: Batch, where: str) -> int:
    """The common leading dimension of every leaf of `batch`, or a ValueError naming a leaf."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(f"{where}: a batch has no arrays; pass pytrees of [batch, ...] arrays.")
    sizes = {jax.tree_util.keystr(p): (np.shape(x)[0] if np.ndim(x) else None) for p, x in leaves}
    first_key, first = next(iter(sizes.items()))
    for key, size in sizes.items():
        if size is None:
            raise ValueError(
                f"{where}: batch field {key} is a scalar; every field needs a leading batch axis."
            )
        if size != first:
            raise ValueError(
                f"{where}: batch field {key} has leading dimension {size} but {first_key} has "
                f"{first}; all fields of a batch must share the batch axis."
            )
    return first


def _zeros_f32(params: Any) -> Any:
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


# The compiled functions below are module-level jits with `loss_fn` static, so repeated
# calls with the same loss (SSD's forget and full-data importances, every batch of a
# dataset) reuse one compilation instead of re-tracing a fresh closure per call. The
# running total is an argument and is donated, so accumulation happens inside the
# compiled function with no extra copy of the parameters.


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"), donate_argnums=0)
def _add_per_example_sum_sq(total, params, batch, *, loss_fn: LossFn, chunk_size: int):
    """total + the sum over `batch`'s examples of their squared per-example gradients."""
    grad_fn = jax.grad(loss_fn)

    def example_grad(example):
        return grad_fn(params, jax.tree.map(lambda x: x[None], example))

    b = jax.tree.leaves(batch)[0].shape[0]
    chunk = min(chunk_size, b)
    n_chunks = -(-b // chunk)
    # Pad to whole chunks by repeating real examples (valid inputs, so no NaN from the
    # loss) and give the padding zero weight.
    index = jnp.arange(n_chunks * chunk)
    weight = (index < b).astype(jnp.float32).reshape(n_chunks, chunk)
    chunks = jax.tree.map(
        lambda x: jnp.take(x, index % b, axis=0).reshape(n_chunks, chunk, *x.shape[1:]),
        batch,
    )

    def body(acc, xs):
        part, w = xs
        grads = jax.vmap(example_grad)(part)
        # A weighted sum over the chunk axis written as a contraction: XLA:CPU fuses
        # `sum(w[:, None, ...] * g**2, 0)` badly on vocabulary-sized matrices (about 19x
        # slower per example at chunk 8 in benchmarks/bench_unlearn.py), a dot does not.
        acc = jax.tree.map(
            lambda a, g: a + jnp.tensordot(w, jnp.square(g.astype(jnp.float32)), axes=1),
            acc,
            grads,
        )
        return acc, None

    total, _ = jax.lax.scan(body, total, (chunks, weight))
    return total


@functools.partial(jax.jit, static_argnames=("loss_fn", "fn"), donate_argnums=0)
def _add_transformed_grad(total, params, batch, *, loss_fn: LossFn, fn: Callable):
    """total + fn(grad loss_fn(params, batch)) leaf by leaf, in float32."""
    grads = jax.grad(loss_fn)(params, batch)
    return jax.tree.map(lambda t, g: t + fn(g.astype(jnp.float32)), total, grads)


def fisher_diagonal(
    loss_fn: LossFn,
    params: Any,
    batches: Iterable[Batch],
    *,
    convention: str = "per_example",
    chunk_size: int = 8,
) -> Any:
    """Diagonal Fisher information (squared-gradient importance) of `params`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch (for a
        sequence batch, whatever reduction the loss uses; on a one-example batch it is that
        example's loss).
      params: the parameter pytree (a dict, an ``nnx.State``, ...).
      batches: an iterable of batches; each is a pytree of arrays with a common leading
        batch axis.
      convention: "per_example" (exact empirical Fisher, mean over examples of squared
        per-example gradients, computed with ``jax.vmap`` of ``jax.grad`` on one-example
        batches) or "batch_mean" (SSD's mean over batches of squared batch-mean
        gradients; depends on the batch size, see the module docstring).
      chunk_size: "per_example" only: examples whose gradients are held at once (memory is
        about chunk_size copies of the parameters).

    The gradient pass compiles once per (`loss_fn`, batch shape): pass the same `loss_fn`
    object to later calls (SSD's forget and full-data passes) to reuse the compilation.

    Returns:
      A float32 pytree like `params`.

    Raises:
      ValueError: unknown convention, chunk_size < 1, no batches, or a batch whose fields
        disagree on the batch size.

    References:
      Foster, Schoepf, Brintrup, "Fast Machine Unlearning Without Retraining Through
      Selective Synaptic Dampening", arXiv 2308.07707 (2023).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxunlearn.transforms import fisher_diagonal
      >>> loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
      >>> batch = {"x": jnp.eye(2), "y": jnp.zeros(2)}
      >>> fisher_diagonal(loss, {"w": jnp.ones(2)}, [batch])["w"]  # (1/2)·[(2·1)^2, (2·1)^2]
      Array([2., 2.], dtype=float32)
    """
    where = "fisher_diagonal"
    if convention not in _CONVENTIONS:
        raise ValueError(f"{where}: convention must be one of {_CONVENTIONS}, got {convention!r}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be an int >= 1, got {chunk_size!r}.")
    if convention == "batch_mean":
        return _mean_over_batches(loss_fn, params, batches, jnp.square, where)

    total, n = _zeros_f32(params), 0
    for batch in batches:
        n += _batch_size(batch, where)
        total = _add_per_example_sum_sq(
            total, params, batch, loss_fn=loss_fn, chunk_size=chunk_size
        )
    if n == 0:
        raise ValueError(f"{where}: `batches` is empty; pass at least one non-empty batch.")
    return jax.tree.map(lambda t: t / n, total)


def importance_abs(loss_fn: LossFn, params: Any, batches: Iterable[Batch]) -> Any:
    """LF-SSD sensitivity: the mean over batches of |grad loss_fn(params, B)|.

    With ``loss_fn = loss_free_loss(logits_fn)`` this is LF-SSD's Omega (an MAS-style
    sensitivity that needs no labels); like SSD's "batch_mean" Fisher it depends on the
    batch size, so compare importances computed with the same one.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the parameter pytree.
      batches: an iterable of batches.

    Returns:
      A float32 pytree like `params`.

    References:
      Foster, Schoepf, Brintrup, "Loss-Free Machine Unlearning", arXiv 2402.19308 (2024).
    """
    return _mean_over_batches(loss_fn, params, batches, jnp.abs, "importance_abs")


def _mean_over_batches(loss_fn, params, batches, fn, where):
    total, n_batches = _zeros_f32(params), 0
    for batch in batches:
        _batch_size(batch, where)
        total = _add_transformed_grad(total, params, batch, loss_fn=loss_fn, fn=fn)
        n_batches += 1
    if n_batches == 0:
        raise ValueError(f"{where}: `batches` is empty; pass at least one batch.")
    return jax.tree.map(lambda t: t / n_batches, total)


def loss_free_loss(logits_fn: Callable[[Any, Batch], jax.Array]) -> LossFn:
    """LF-SSD's label-free loss L_LF(B) = mean over examples of ||f(x)||_2^2.

    Args:
      logits_fn: ``logits_fn(params, batch) -> [B, ...]`` model outputs; the squared norm
        is summed over every axis after the first (for a language model's [B, T, V]
        logits, over positions and vocabulary: multiply by a [B, T, 1] mask inside
        `logits_fn` to leave out padding).

    Returns:
      ``loss(params, batch) -> scalar`` for `importance_abs` (or `fisher_diagonal`).

    References:
      Foster, Schoepf, Brintrup, "Loss-Free Machine Unlearning", arXiv 2402.19308 (2024).
    """

    def loss(params, batch):
        logits = jnp.asarray(logits_fn(params, batch), jnp.float32)
        return jnp.mean(jnp.sum(jnp.square(logits).reshape(logits.shape[0], -1), axis=1))

    return loss
