"""Geometric-disentanglement Unlearning (GU): remove the forget update's retain-entangled part.

To first order a step d changes the retain loss by <g_r, d>. GU keeps an orthonormal
basis U of a retain-gradient subspace S_r and executes only the part of the forget
gradient normal to it, so the forget step leaves the retain loss unchanged to first order
along every stored retain direction:

    g_f_perp = g_f - U U^T g_f            (P_perp g_f; global inner products over the pytree)
    output   = g_f_perp + g_r             (the retain descent already lies in S_r)

The training step passes ``updates = gamma · grad L_forget``, the *unweighted*
``retain_grads = grad L_retain`` and ``retain_weight = alpha``; the output is
``P_perp(updates) + alpha · retain_grads``, as GU's code writes it back. The subspace is built
from the unweighted retain directions, so alpha = 0 (UNDIAL's default, or PDU's multiplier at
0) still projects. An optimizer later in the chain turns the output into an update (descent:
d = -lr · output for SGD).

The subspace (how U is built). S_r is the span of a rolling window of the last `rank`
retain-gradient directions captured on refresh steps (steps with count % refresh_every
== 0; the first step always refreshes). The raw window is not stored: the state holds U
(k copies of the parameter pytree, leaves [k, ...], float32) and the k x k matrix
`window` of the window's coordinates in U (rows = unit-norm stored directions, oldest
first). A refresh:

1. normalises the new retain gradient g to w = g/||g|| and orthogonalises it against U
   by classical Gram-Schmidt run twice ("twice is enough": orthogonal to float32
   rounding), giving a unit vector u_new and coordinates [c, rho] of w in [U; u_new];
2. drops the oldest window row, appends [c, rho], and re-orthonormalises with small
   k x (k+1) float32 linear algebra: a symmetric (Loewdin) correction of [U; u_new]
   from its Gram matrix, then an SVD of the window coordinates, whose right singular
   vectors (those with singular value > 1e-5 · the largest) give the new basis as one
   linear combination of [U; u_new]. Directions left by the dropped gradient, and
   numerically dependent ones, get exactly zero rows.

So the projection removes exactly the span of the last `rank` stored retain directions,
with one pass over the basis per step (two for the projection) and a few per refresh.

Adam-whitened variant (``whiten="adam"``, the latest GU ``training_step``). With the Adam
metric h = sqrt(sqrt(v_hat) + eps), the forget and retain gradients are whitened,
f~ = f/h and r~ = r/h, the basis is built from r~, the projection runs on f~, and the
output is h ⊙ P_perp(f~) + r. Adam (b1 = 0) divides by roughly h^2, so the executed forget
step is Euclidean-orthogonal to the retain directions. Rather than reach into another
transform's state, this transform keeps its own EMA nu of its squared outputs with Adam's
b2: when it sits directly before ``optax.scale_by_adam(b1=0, b2=b2)`` with float32 params
and no weight decay, its nu equals Adam's second moment, and v_hat at step t is Adam's
bias-corrected nu after t-1 steps, as in the GU code (identity metric on the first step).
`whitened_retain_projection` builds that chain.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxunlearn.transforms._tree import (
    f32,
    stack_apply,
    stack_combine,
    stack_dot,
    stack_gram,
    vdot,
)

_HIGHEST = lax.Precision.HIGHEST
# Relative tolerance for "numerically in the span": a new direction whose residual after
# two Gram-Schmidt passes is below this fraction of its norm, and window singular values
# below this fraction of the largest, are treated as zero. Well above float32 rounding
# (~1e-7 · sqrt(k)), far below any direction worth protecting.
_RTOL = 1e-5
_MODES = ("gu", "pcgrad")


class RetainProjectionState(NamedTuple):
    """State of `retain_projection`.

    Attributes:
      count: int32 scalar, updates processed so far. The update with count % refresh_every
        == 0 inserts its retain gradient before projecting.
      basis: pytree like the params with float32 leaves [rank, ...]: an orthonormal basis U
        of the span of the stored retain directions; rows beyond that span's dimension are
        zero.
      window: float32 [rank, rank]; window[i, j] = <w_i, u_j> where w_i is the i-th stored
        unit retain direction, oldest first. Rows of empty slots are zero.
      nu: with ``whiten="adam"``, a pytree like the params (float32): the EMA (decay b2) of
        this transform's squared outputs, i.e. a downstream Adam's second moment. None
        without whitening.
    """

    count: jax.Array
    basis: Any
    window: jax.Array
    nu: Any


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _insert(basis: Any, window: jax.Array, g: Any, eps: float) -> tuple[Any, jax.Array]:
    """Adds retain direction g to the rolling window, dropping the oldest; see module doc."""
    k = window.shape[0]
    norm2 = vdot(g, g)
    inv_norm = jnp.where(norm2 > eps, lax.rsqrt(jnp.maximum(norm2, 1e-38)), 0.0)
    w = jax.tree.map(lambda x: x * inv_norm, g)
    # Classical Gram-Schmidt twice: one pass leaves O(eps · cond) components along U.
    c1 = stack_dot(basis, w)
    r = jax.tree.map(jnp.subtract, w, stack_apply(basis, c1))
    c2 = stack_dot(basis, r)
    r = jax.tree.map(jnp.subtract, r, stack_apply(basis, c2))
    rho = jnp.sqrt(vdot(r, r))
    is_new = rho > _RTOL
    u_new = jax.tree.map(lambda x: x * jnp.where(is_new, 1.0 / jnp.maximum(rho, 1e-38), 0.0), r)
    row = jnp.concatenate([c1 + c2, jnp.where(is_new, rho, 0.0)[None]])
    older = jnp.concatenate([window[1:], jnp.zeros((k - 1, 1), jnp.float32)], axis=1)
    coords = jnp.concatenate([older, row[None]], axis=0)  # [k, k+1] in the frame [U; u_new]

    # Loewdin correction: [U; u_new] is orthonormal only to rounding, and the error would
    # otherwise accumulate over many refreshes. Zero (unused) rows are kept out of it.
    cross = stack_dot(basis, u_new)
    gram = jnp.block([[stack_gram(basis), cross[:, None]], [cross[None, :], vdot(u_new, u_new)]])
    live = jnp.diag(gram) > 0.5
    gram = jnp.where(live[:, None] & live[None, :], gram, jnp.eye(k + 1, dtype=jnp.float32))
    evals, evecs = jnp.linalg.eigh(gram)
    evals = jnp.maximum(evals, 1e-6)
    half = _matmul(evecs * jnp.sqrt(evals), evecs.T)
    inv_half = _matmul(evecs / jnp.sqrt(evals), evecs.T)

    left, sing, right = jnp.linalg.svd(_matmul(coords, half), full_matrices=False)
    keep = sing > _RTOL * sing[0]
    transform = _matmul(jnp.where(keep[:, None], right, 0.0), inv_half)  # [k, k+1]
    new_basis = jax.tree.map(
        lambda s, u: s + transform[:, k].reshape((k,) + (1,) * u.ndim) * u[None],
        stack_combine(transform[:, :k], basis),
        u_new,
    )
    return new_basis, left * jnp.where(keep, sing, 0.0)[None, :]


def _check_hyperparameters(rank, refresh_every, mode, whiten, eps, b2, adam_eps) -> None:
    """Rejects out-of-range `retain_projection` hyperparameters with a ValueError."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"retain_projection: rank must be an int >= 1, got {rank!r}.")
    if not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(
            f"retain_projection: refresh_every must be an int >= 1, got {refresh_every!r}."
        )
    if mode not in _MODES:
        raise ValueError(f"retain_projection: mode must be one of {_MODES}, got {mode!r}.")
    if whiten not in (None, "adam"):
        raise ValueError(f"retain_projection: whiten must be None or 'adam', got {whiten!r}.")
    if not eps >= 0:
        raise ValueError(f"retain_projection: eps must be >= 0, got {eps!r}.")
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"retain_projection: b2 must be in [0, 1), got {b2!r}.")
    if not adam_eps >= 0:
        raise ValueError(f"retain_projection: adam_eps must be >= 0, got {adam_eps!r}.")


def retain_projection(
    rank: int = 8,
    refresh_every: int = 10,
    *,
    mode: str = "gu",
    whiten: str | None = None,
    eps: float = 1e-12,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Projects the forget update off a rank-k retain-gradient subspace (GU).

    Called as ``tx.update(forget_updates, state, params, retain_grads=g_r, retain_weight=alpha)``
    with ``forget_updates = gamma · grad L_forget`` and ``retain_grads = grad L_retain``
    unweighted (the training step's split-gradient convention; `retain_weight` defaults to
    1). Returns the combined direction ``P_perp(forget_updates) + alpha · retain_grads``, to
    be fed to an optimizer later in the chain. The subspace is spanned by the unweighted
    retain directions, so the projection does not vanish when alpha is 0.
    All inner products are global over the pytree; the basis and the arithmetic are
    float32, and the output has the dtype of `forget_updates`.

    Args:
      rank: k, the number of stored retain directions (the subspace dimension).
      refresh_every: the basis takes in the current retain gradient on updates whose count
        is a multiple of this (the first update always does). 1 inserts every step.
      mode: "gu" always projects; "pcgrad" projects only when <g_f, g_r> < 0, i.e. when the
        forget descent would raise the retain loss to first order.
      whiten: None (Euclidean metric) or "adam" (GU's Adam-whitened metric; see module
        docstring and `whitened_retain_projection`).
      eps: a retain gradient with squared norm <= eps (in the whitened metric if whitening)
        is treated as zero and adds no direction (GU's ``projection_eps``).
      b2: with ``whiten="adam"``, the downstream Adam's second-moment decay.
      adam_eps: with ``whiten="adam"``, the downstream Adam's eps, used in
        h = sqrt(sqrt(v_hat) + adam_eps).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose update takes ``retain_grads=`` (and
      optionally ``retain_weight=``).

    Raises:
      ValueError: a hyperparameter is out of range.

    References:
      Zhou et al., "Geometric-disentanglement Unlearning", arXiv 2511.17100 (2025); code:
      github.com/Lemutisme/geo-unlearning, ``src/trainer/unlearn/geometric.py``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxunlearn.transforms import retain_projection
      >>> params = {"w": jnp.zeros(3)}
      >>> tx = optax.chain(retain_projection(rank=1, refresh_every=1), optax.sgd(1.0))
      >>> state = tx.init(params)
      >>> g_f, g_r = {"w": jnp.array([1.0, 1.0, 0.0])}, {"w": jnp.array([1.0, 0.0, 0.0])}
      >>> updates, state = tx.update(g_f, state, params, retain_grads=g_r)
      >>> updates["w"]  # -(P_perp g_f + g_r) = -([0, 1, 0] + [1, 0, 0])
      Array([-1., -1., -0.], dtype=float32)
    """
    _check_hyperparameters(rank, refresh_every, mode, whiten, eps, b2, adam_eps)

    def init_fn(params):
        basis = jax.tree.map(lambda p: jnp.zeros((rank, *jnp.shape(p)), jnp.float32), params)
        nu = None
        if whiten == "adam":
            nu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return RetainProjectionState(
            count=jnp.zeros((), jnp.int32),
            basis=basis,
            window=jnp.zeros((rank, rank), jnp.float32),
            nu=nu,
        )

    def metric(state):
        # h = sqrt(sqrt(v_hat) + eps) from Adam's second moment after `count` steps; the
        # identity before any step, as GU does before the Adam state exists.
        t = state.count.astype(jnp.float32)
        correction = jnp.where(state.count > 0, 1.0 - b2**t, 1.0)
        return jax.tree.map(
            lambda v: jnp.where(
                state.count > 0, jnp.sqrt(jnp.sqrt(v / correction) + adam_eps), 1.0
            ),
            state.nu,
        )

    def update_fn(
        updates, state, params=None, *, retain_grads=None, retain_weight=1.0, **extra_args
    ):
        del params, extra_args
        if retain_grads is None:
            raise ValueError(
                "retain_projection needs the retain gradients: call tx.update(forget_updates, "
                "state, params, retain_grads=grad L_retain, retain_weight=alpha) "
                "(jaxunlearn.unlearn and jaxunlearn.train.make_step do this by themselves)."
            )
        g_f, g_r = f32(updates), f32(retain_grads)
        if whiten == "adam":
            h = metric(state)
            g_f = jax.tree.map(jnp.divide, g_f, h)
            g_r_white = jax.tree.map(jnp.divide, g_r, h)
        else:
            g_r_white = g_r

        refresh = state.count % refresh_every == 0
        basis, window = lax.cond(
            refresh,
            lambda b, w, g: _insert(b, w, g, eps),
            lambda b, w, g: (b, w),
            state.basis,
            state.window,
            g_r_white,
        )
        perp = jax.tree.map(jnp.subtract, g_f, stack_apply(basis, stack_dot(basis, g_f)))
        if mode == "pcgrad":
            conflict = vdot(g_f, g_r_white) < 0
            perp = jax.tree.map(lambda p, f: jnp.where(conflict, p, f), perp, g_f)
        if whiten == "adam":
            perp = jax.tree.map(jnp.multiply, perp, h)
        alpha = jnp.asarray(retain_weight, jnp.float32)
        out = jax.tree.map(
            lambda p, r, u: (p + alpha * r).astype(jnp.asarray(u).dtype), perp, g_r, updates
        )

        nu = state.nu
        if whiten == "adam":
            # Same formula and order as optax.scale_by_adam, so the two moments agree.
            nu = optax.tree.update_moment_per_elem_norm(f32(out), nu, b2, 2)
        new_state = RetainProjectionState(
            count=optax.safe_increment(state.count), basis=basis, window=window, nu=nu
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def whitened_retain_projection(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 1,
    refresh_every: int = 1,
    mode: str = "gu",
    b2: float = 0.999,
    eps: float = 1e-8,
    projection_eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """GU in Adam-whitened coordinates, chained with the Adam whose metric it uses.

    ``optax.chain(retain_projection(..., whiten="adam"), optax.scale_by_adam(b1=0, b2, eps),
    optax.scale_by_learning_rate(learning_rate))``: b1 = 0 and no weight decay are the
    conditions under which GU's whitening makes the executed forget step orthogonal to the
    retain directions (GU, arXiv 2511.17100), and sharing b2/eps makes the projection's own
    second-moment EMA equal Adam's. The defaults (rank 1, refresh every step) reproduce
    the latest GU ``training_step``. Extra args: ``retain_grads=``.

    Args:
      learning_rate: Adam's learning rate (float or schedule).
      rank: number of stored (whitened) retain directions.
      refresh_every: basis refresh period in steps.
      mode: "gu" or "pcgrad" (project only on conflict, <f~, r~> < 0).
      b2: Adam's second-moment decay.
      eps: Adam's eps (also in h = sqrt(sqrt(v_hat) + eps)).
      projection_eps: squared-norm threshold below which a retain gradient adds no
        direction.

    Returns:
      An `optax.GradientTransformationExtraArgs` emitting parameter updates.

    References:
      Zhou et al., "Geometric-disentanglement Unlearning", arXiv 2511.17100 (2025).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxunlearn.transforms import whitened_retain_projection
      >>> params = {"w": jnp.zeros(2)}
      >>> tx = whitened_retain_projection(1e-2)
      >>> state = tx.init(params)
      >>> g = {"w": jnp.array([1.0, -1.0])}
      >>> updates, state = tx.update(g, state, params, retain_grads={"w": jnp.array([0.0, 1.0])})
    """
    return optax.chain(
        retain_projection(
            rank,
            refresh_every,
            mode=mode,
            whiten="adam",
            eps=projection_eps,
            b2=b2,
            adam_eps=eps,
        ),
        optax.scale_by_adam(b1=0.0, b2=b2, eps=eps),
        optax.scale_by_learning_rate(learning_rate),
    )
