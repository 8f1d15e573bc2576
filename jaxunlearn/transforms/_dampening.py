"""Importance-based dampening: one-shot SSD / LF-SSD and the `fisher_dampening` transform.

Selective Synaptic Dampening shrinks, in one shot and without training, the parameters
that matter much more to the forget set than to the full data. Per scalar parameter i,
with importances I_D (full data) and I_f (forget set):

    selected_i = I_f,i > alpha · I_D,i                  (strict: ties are not selected)
    beta_i     = min(lambda · I_D,i / I_f,i, 1)
    theta_i   <- beta_i · theta_i if selected_i, else theta_i

I_f = 0 is never selected (I_D >= 0), so the division only runs where I_f > 0. LF-SSD
applies the same rule to absolute-gradient importances of a label-free loss.

`fisher_dampening` is the training-time counterpart: an optax transform that shrinks each
update coordinate by its retain importance so that steps avoid weights the retain data
relies on.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxunlearn.transforms._tree import check_same_structure


def ssd(
    params: Any,
    importance_full: Any,
    importance_forget: Any,
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
) -> Any:
    """Selective Synaptic Dampening: one-shot parameter dampening (pure tree_map).

    Args:
      params: the parameter pytree.
      importance_full: I_D, importance on the full training data (retain + forget), a
        pytree like `params` (e.g. `fisher_diagonal(..., convention="batch_mean")`).
      importance_forget: I_f, importance on the forget set, same convention and batch size.
      alpha: selection weighting; a parameter is selected when I_f > alpha · I_D.
      lam: dampening constant lambda; selected parameters are scaled by
        min(lam · I_D / I_f, 1).

    Returns:
      The dampened params, same structure and dtypes.

    Raises:
      ValueError: negative alpha or lam, or importances not shaped like `params`.

    References:
      Foster, Schoepf, Brintrup, "Fast Machine Unlearning Without Retraining Through
      Selective Synaptic Dampening", arXiv 2308.07707 (2023).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxunlearn.transforms import ssd
      >>> ssd({"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([1.0, 1.0])},
      ...     {"w": jnp.array([20.0, 5.0])}, alpha=10.0, lam=1.0)["w"]
      Array([0.05, 1.  ], dtype=float32)
    """
    return _dampen(params, importance_full, importance_forget, alpha, lam, "ssd")


def lf_ssd(
    params: Any,
    importance_full: Any,
    importance_forget: Any,
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
) -> Any:
    """Loss-Free SSD: SSD's selection and dampening on absolute-gradient importances.

    Use `importance_abs(loss_free_loss(logits_fn), params, batches)` for both
    importances (Omega_D on the full data, Omega_f on the unlabelled forget set). The
    LF-SSD release gives no separate alpha/lambda; SSD's defaults are used.

    Args:
      params: the parameter pytree.
      importance_full: Omega_D, a pytree like `params`.
      importance_forget: Omega_f, a pytree like `params`.
      alpha: selection weighting.
      lam: dampening constant.

    Returns:
      The dampened params.

    Raises:
      ValueError: as `ssd`.

    References:
      Foster, Schoepf, Brintrup, "Loss-Free Machine Unlearning", arXiv 2402.19308 (2024).
    """
    return _dampen(params, importance_full, importance_forget, alpha, lam, "lf_ssd")


def _dampen(params, importance_full, importance_forget, alpha, lam, where):
    if not alpha >= 0:
        raise ValueError(f"{where}: alpha must be >= 0, got {alpha!r}.")
    if not lam >= 0:
        raise ValueError(f"{where}: lam must be >= 0, got {lam!r}.")
    check_same_structure(params, importance_full, what="importance_full", where=where)
    check_same_structure(params, importance_forget, what="importance_forget", where=where)

    def leaf(theta, i_full, i_forget):
        i_full = jnp.asarray(i_full, jnp.float32)
        i_forget = jnp.asarray(i_forget, jnp.float32)
        selected = i_forget > alpha * i_full
        # Unselected entries may have I_f = 0; divide by 1 there (the value is discarded).
        beta = jnp.minimum(lam * i_full / jnp.where(selected, i_forget, 1.0), 1.0)
        theta = jnp.asarray(theta)
        return jnp.where(selected, theta * beta, theta).astype(theta.dtype)

    return jax.tree.map(leaf, params, importance_full, importance_forget)


def fisher_dampening(
    importance: Any = None, *, strength: float = 1.0
) -> optax.GradientTransformationExtraArgs:
    """Shrinks each update coordinate in proportion to its retain importance.

    ``u_i <- u_i / (1 + strength · I_i / mean(I))``, where mean(I) is the mean of the
    importance over every scalar of the pytree.

    Why this form: it is the exact minimiser of a unit-step linear model with an
    EWC-style Fisher-weighted proximal term,
    argmin_d <u, d> + 1/2 ||d||^2 + 1/2 · strength · sum_i (I_i / mean(I)) d_i^2, i.e.
    the diagonal quadratic penalty that protects retain-important weights, solved in
    closed form. Coordinates of average importance are divided by (1 + strength), the
    unimportant ones pass almost unchanged, and no coordinate changes sign. Dividing by
    mean(I) makes `strength` dimensionless: the same value works whatever the Fisher's
    overall scale (which differs between the "per_example" and "batch_mean" conventions
    and with the loss scale). An all-zero importance leaves updates unchanged.

    The importance is fixed at construction or passed per call as the extra argument
    ``retain_importance=`` (which takes precedence), a non-negative pytree like the
    params (e.g. `fisher_diagonal` on retain data).

    Args:
      importance: the retain importance pytree, or None to require ``retain_importance=``.
      strength: dampening strength (>= 0; 0 is the identity).

    Returns:
      A stateless `optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: negative strength; at update time, no importance given.

    References:
      Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
      arXiv 1612.00796 (2017), for the Fisher-weighted penalty; Foster, Schoepf, Brintrup,
      arXiv 2308.07707 (2023), for Fisher importance in unlearning.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxunlearn.transforms import fisher_dampening
      >>> tx = fisher_dampening({"w": jnp.array([3.0, 1.0, 0.0])}, strength=1.0)
      >>> u, _ = tx.update({"w": jnp.ones(3)}, tx.init(None))
      >>> u["w"]  # mean(I) = 4/3: 1 / (1 + I · 3/4)
      Array([0.30769232, 0.5714286 , 1.        ], dtype=float32)
    """
    if not strength >= 0:
        raise ValueError(f"fisher_dampening: strength must be >= 0, got {strength!r}.")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, retain_importance=None, **extra_args):
        del params, extra_args
        imp = importance if retain_importance is None else retain_importance
        if imp is None:
            raise ValueError(
                "fisher_dampening has no importance: build it with fisher_dampening(importance) "
                "or pass tx.update(..., retain_importance=fisher_diagonal(...))."
            )
        leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(imp)]
        total = sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))
        mean = total / max(sum(x.size for x in leaves), 1)
        scale = jnp.where(mean > 0, strength / jnp.where(mean > 0, mean, 1.0), 0.0)
        out = jax.tree.map(
            lambda u, i: (u / (1.0 + scale * jnp.asarray(i, jnp.float32))).astype(
                jnp.asarray(u).dtype
            ),
            updates,
            imp,
        )
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
