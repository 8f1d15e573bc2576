"""HAMU: hardness-aware unlearning as a closed-form, per-tensor constrained step.

Each step solves, per parameter tensor l (or once globally), the trust-region problem

    min_Delta <g_r, Delta>   s.t.   <g_f, Delta> >= B_l,   ||Delta|| <= R_l

raise the forget loss by at least B at minimum first-order retain cost (HAMU-Q; HAMU-U
swaps the roles). With s = ||g_f||^2, kappa = <g_r, g_f>, g_r_perp = g_r - (kappa/s) g_f,
the solution is (aoi3142/HAMU `hamu/methods/core.py::compute_hamu_update`; "How Hard Can It
Be?", arXiv 2606.02119; checked in this order):

    1  s < eps                      Delta = -R g_r/||g_r|| if B ~ 0, else infeasible (0)
    2  R^2 < B^2/s                  infeasible: Delta = (B/s) g_f
    3  kappa <= -B ||g_r|| / R      Delta = -R g_r/||g_r||   (retain descent already forgets)
    4  ||g_r_perp|| ~ 0             Delta = (B/s) g_f
    5  otherwise                    Delta = (B/s) g_f - sqrt(R^2 - B^2/s) g_r_perp/||g_r_perp||
                                    (R instead of the square root when B ~ 0)

Every case is a combination a_f g_f + a_r g_r + a_p g_r_perp with scalar coefficients,
so the branch is chosen with `jnp.where` on per-tensor scalars and the whole transform
jits with no Python control flow on values.

Kappa is the hardness: a large positive kappa means forgetting necessarily costs
retention. The stopping rule compares B with sum_l R_l sqrt(||g_r,l||^2 ||g_f,l||^2 -
kappa_l^2) / ||g_r,l||: once B exceeds it no step can meet the constraint at any useful
retain cost, and HAMU ends the run.

Sign convention. HAMU's g_f is the gradient of the forget cross-entropy, *not* negated
(the constraint raises it). The training step passes ``updates = gamma · grad L_forget``
of a forget loss that is *minimised* (GA's L_forget = -CE), so by default
(``forget_sign=-1``) g_f = -updates: "decrease L_forget by at least B" is
<-grad L_forget, Delta> >= B for any forget loss. Pass ``forget_sign=+1`` when `updates`
is already grad CE_forget. ``retain_grads`` is grad L_retain (minimised, unweighted), used
as g_r; a ``retain_weight`` extra argument (the objective's alpha) is ignored: HAMU's
problem has no retain weight.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxunlearn.transforms._tree import f32, leaf_vdot

_ALLOCATIONS = ("uniform", "grad_norm", "global")
_VARIANTS = ("Q", "U")


class HardnessAwareState(NamedTuple):
    """State and stopping signal of `hardness_aware`.

    All quantities are computed on the effective gradients (after clipping, the forget
    sign and the HAMU-U swap) of the most recent update.

    Attributes:
      count: int32 scalar, updates processed (indexes a learning-rate schedule).
      kappa: float32 scalar, the global hardness <g_r, g_f>.
      block_kappa: pytree like the params of float32 scalars, kappa_l = <g_r,l, g_f,l>.
      block_rhs: pytree of float32 scalars, rhs_l = R_l sqrt(||g_r,l||^2 ||g_f,l||^2 -
        kappa_l^2) / ||g_r,l|| with each tensor's own radius.
      block_case: pytree of int32 scalars, the case (1-5 of the table) each tensor's step
        took; with ``allocation="global"`` every leaf holds the global case.
      rhs: float32 scalar, the stopping right-hand side: sum of `block_rhs`, or for
        ``allocation="global"`` the same expression on the whole gradients.
      criterion_met: bool scalar, B > rhs (HAMU's stopping criterion).
      infeasible: bool scalar, some tensor (or the global problem) was infeasible (case 2,
        or case 1 with B > 0).
      stop: bool scalar, sticky: set when the run should end (infeasible with
        `stop_on_infeasible`, or criterion met with `stop_on_criterion`). From then on the
        transform emits zero updates; the driver reads it to stop early.
    """

    count: jax.Array
    kappa: jax.Array
    block_kappa: Any
    block_rhs: Any
    block_case: Any
    rhs: jax.Array
    criterion_met: jax.Array
    infeasible: jax.Array
    stop: jax.Array


def _coefficients(s, kappa, r_norm, perp_norm, bound, radius, eps):
    """Elementwise over tensors: (a_f, a_r, a_p, case, infeasible) of the closed form."""
    safe_s = jnp.maximum(s, eps)
    disc = radius**2 - bound**2 / safe_s
    threshold = -bound * jnp.maximum(r_norm, eps) / jnp.maximum(radius, eps)
    bound_zero = bound <= eps
    c1 = s < eps
    c2 = ~c1 & (disc < 0)
    c3 = ~c1 & ~c2 & (kappa <= threshold)
    c4 = ~c1 & ~c2 & ~c3 & (perp_norm < eps)
    c5 = ~c1 & ~c2 & ~c3 & ~c4
    direct = -radius / jnp.maximum(r_norm, eps)
    a_r = jnp.where((c1 & bound_zero) | c3, direct, 0.0)
    a_f = jnp.where(c2 | c4 | c5, bound / safe_s, 0.0)
    side = jnp.where(bound_zero, radius, jnp.sqrt(jnp.maximum(disc, 0.0)))
    a_p = jnp.where(c5, -side / jnp.maximum(perp_norm, eps), 0.0)
    case = jnp.select([c1, c2, c3, c4], [1, 2, 3, 4], 5).astype(jnp.int32)
    infeasible = (c1 & ~bound_zero) | c2
    return a_f, a_r, a_p, case, infeasible


def _rhs(s, kappa, r_norm, radius, eps):
    return radius * jnp.sqrt(jnp.maximum(r_norm**2 * s - kappa**2, 0.0)) / jnp.maximum(r_norm, eps)


def _clip(tree, max_norm):
    norm = optax.global_norm(tree)
    factor = max_norm / jnp.maximum(norm, max_norm)
    return jax.tree.map(lambda x: x * factor, tree)


class _Solution(NamedTuple):
    """Closed-form step of every tensor: Delta_l = a_f[l] g_f,l + a_r[l] g_r,l + a_p[l] perp[l]."""

    a_f: jax.Array
    a_r: jax.Array
    a_p: jax.Array
    perp: list
    case: jax.Array
    infeasible: jax.Array
    block_kappa: jax.Array
    block_rhs: jax.Array
    rhs: jax.Array


def _solve(f_leaves, r_leaves, lr, constraint, radius, allocation, eps) -> _Solution:
    """Solves HAMU's problem per tensor or globally; radius None means lr · ||g_r||."""
    n = len(f_leaves)
    s = jnp.stack([leaf_vdot(f, f) for f in f_leaves])
    kappa = jnp.stack([leaf_vdot(r, f) for r, f in zip(r_leaves, f_leaves)])
    r_norm = jnp.sqrt(jnp.stack([leaf_vdot(r, r) for r in r_leaves]))
    block_radius = lr * r_norm if radius is None else jnp.full_like(r_norm, radius)
    block_rhs = _rhs(s, kappa, r_norm, block_radius, eps)

    if allocation == "global":
        s_all, kappa_all = jnp.sum(s), jnp.sum(kappa)
        r_norm_all = jnp.sqrt(jnp.sum(r_norm**2))
        radius_all = lr * r_norm_all if radius is None else jnp.asarray(radius, jnp.float32)
        ratio = kappa_all / jnp.maximum(s_all, eps)
        perp = [r - ratio * f for r, f in zip(r_leaves, f_leaves)]
        perp_norm = jnp.sqrt(sum(leaf_vdot(p, p) for p in perp))
        a_f, a_r, a_p, case, infeasible = _coefficients(
            s_all, kappa_all, r_norm_all, perp_norm, constraint, radius_all, eps
        )
        a_f, a_r, a_p, case = (jnp.broadcast_to(x, (n,)) for x in (a_f, a_r, a_p, case))
        rhs = _rhs(s_all, kappa_all, r_norm_all, radius_all, eps)
    else:
        if allocation == "uniform":
            bound = jnp.full_like(s, constraint / n)
        else:  # "grad_norm", normalised so the bounds sum to B
            weight = r_norm * jnp.sqrt(s)
            bound = constraint * weight / jnp.maximum(jnp.sum(weight), 1e-12)
        ratio = kappa / jnp.maximum(s, eps)
        perp = [r - ratio[i] * f for i, (r, f) in enumerate(zip(r_leaves, f_leaves))]
        perp_norm = jnp.sqrt(jnp.stack([leaf_vdot(p, p) for p in perp]))
        a_f, a_r, a_p, case, infeasible = _coefficients(
            s, kappa, r_norm, perp_norm, bound, block_radius, eps
        )
        infeasible = jnp.any(infeasible)
        rhs = jnp.sum(block_rhs)
    return _Solution(a_f, a_r, a_p, perp, case, infeasible, kappa, block_rhs, rhs)


def _check_hyperparameters(
    learning_rate, constraint, radius, allocation, variant, clip_norm, forget_sign, eps
) -> None:
    """Rejects out-of-range `hardness_aware` hyperparameters with a ValueError."""
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"hardness_aware: learning_rate must be > 0, got {learning_rate!r}.")
    if not constraint >= 0:
        raise ValueError(f"hardness_aware: constraint B must be >= 0, got {constraint!r}.")
    lr_radius = radius is None or radius == "lr"
    if not lr_radius and (isinstance(radius, str) or not radius > 0):
        raise ValueError(
            f"hardness_aware: radius must be None/'lr' or a positive float, got {radius!r}."
        )
    if allocation not in _ALLOCATIONS:
        raise ValueError(
            f"hardness_aware: allocation must be one of {_ALLOCATIONS}, got {allocation!r}."
        )
    if variant not in _VARIANTS:
        raise ValueError(f"hardness_aware: variant must be one of {_VARIANTS}, got {variant!r}.")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"hardness_aware: clip_norm must be > 0 or None, got {clip_norm!r}.")
    if forget_sign not in (-1, 1):
        raise ValueError(f"hardness_aware: forget_sign must be -1 or +1, got {forget_sign!r}.")
    if not eps > 0:
        raise ValueError(f"hardness_aware: eps must be > 0, got {eps!r}.")


def hardness_aware(
    learning_rate: optax.ScalarOrSchedule,
    constraint: float,
    *,
    radius: float | str | None = None,
    allocation: str = "uniform",
    variant: str = "Q",
    stop_on_infeasible: bool = True,
    stop_on_criterion: bool = False,
    clip_norm: float | None = 1.0,
    forget_sign: float = -1.0,
    as_gradient: bool = False,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """HAMU's hardness-aware constrained step, emitting the parameter update Delta.

    Called as ``tx.update(forget_updates, state, params, retain_grads=g_r)``. The forget
    and retain gradients are each clipped to global norm <= `clip_norm`, signed (see the
    module docstring: by default g_f = -forget_updates), swapped for HAMU-U, and the
    closed-form step is solved per tensor (or globally). The output is Delta itself
    (``optax.apply_updates`` adds it: theta <- theta + Delta), so chain nothing after it;
    with ``as_gradient=True`` it is the pseudo-gradient -Delta/lr for ``optax.sgd(lr)``
    (or any optimizer, as HAMU's ``--use_optimizer``).

    Infeasible steps never write NaN into the parameters: with `stop_on_infeasible` the
    whole update is zero and ``state.stop`` is set (HAMU's reference sets NaN and stops),
    otherwise infeasible tensors take (B/s) g_f (case 2) or zero (case 1).

    Args:
      learning_rate: lr (float or schedule of the update count); sets the radius when
        `radius` is None and the scale of ``as_gradient`` outputs.
      constraint: B >= 0, the required first-order rise of the forget loss (HAMU-Q) or
        drop of the retain loss (HAMU-U). HAMU's defaults: B = 0.5 · lr.
      radius: None or "lr" for R_l = lr · ||g_r,l|| (HAMU's ``--use_lr_radius``; global
        norm with ``allocation="global"``), or a positive float: a fixed radius per tensor.
      allocation: how B is split over tensors: "uniform" (B / n_tensors), "grad_norm"
        (B · ||g_r,l|| ||g_f,l|| / sum_k ||g_r,k|| ||g_f,k||) or "global" (one problem on
        the whole pytree, HAMU's ``--full_grad``; unlike the reference code, g_r_perp is
        normalised globally, so this is the exact global solution).
      variant: "Q" (forget at minimum retain cost) or "U" ((g_r, g_f) <- (-g_f, -g_r):
        lower the retain loss by B while raising the forget loss as much as possible).
      stop_on_infeasible: on infeasibility emit zero and set ``state.stop``.
      stop_on_criterion: when B > rhs emit zero and set ``state.stop`` (HAMU's
        ``--stop_on_stopping_criterion``); otherwise the criterion is only reported.
      clip_norm: separate global-norm clipping of g_r and g_f (HAMU's max_grad_norm), or
        None for no clipping.
      forget_sign: -1 (default) when `forget_updates` is the gradient of a minimised forget
        loss such as GA's -CE; +1 when it is already grad CE_forget.
      as_gradient: emit -Delta/lr instead of Delta.
      eps: the "~ 0" threshold of the case table.

    Returns:
      An `optax.GradientTransformationExtraArgs` taking ``retain_grads=``; its state is a
      `HardnessAwareState`.

    Raises:
      ValueError: a hyperparameter is out of range.

    References:
      Chen, Niu et al., "How Hard Can It Be? Hardness-Aware Machine Unlearning",
      ICML 2026, arXiv 2606.02119.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxunlearn.transforms import hardness_aware
      >>> tx = hardness_aware(0.1, 0.01, forget_sign=1.0, clip_norm=None)
      >>> params = {"w": jnp.zeros(2)}
      >>> g_f, g_r = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
      >>> delta, state = tx.update(g_f, tx.init(params), params, retain_grads=g_r)
      >>> jnp.round(delta["w"], 4)  # case 5: (B/s) g_f - sqrt(R^2 - B^2/s) g_r_perp/||g_r_perp||
      Array([ 0.01  , -0.0995], dtype=float32)
    """
    _check_hyperparameters(
        learning_rate, constraint, radius, allocation, variant, clip_norm, forget_sign, eps
    )
    lr_radius = radius is None or radius == "lr"

    def scalars(params, dtype, fill=0):
        return jax.tree.map(lambda _: jnp.full((), fill, dtype), params)

    def init_fn(params):
        false = jnp.zeros((), jnp.bool_)
        return HardnessAwareState(
            count=jnp.zeros((), jnp.int32),
            kappa=jnp.zeros((), jnp.float32),
            block_kappa=scalars(params, jnp.float32),
            block_rhs=scalars(params, jnp.float32),
            block_case=scalars(params, jnp.int32),
            rhs=jnp.zeros((), jnp.float32),
            criterion_met=false,
            infeasible=false,
            stop=false,
        )

    def update_fn(updates, state, params=None, *, retain_grads=None, **extra_args):
        del params, extra_args
        if retain_grads is None:
            raise ValueError(
                "hardness_aware needs the retain gradients: call "
                "tx.update(forget_updates, state, params, retain_grads=grad L_retain) "
                "(jaxunlearn.unlearn and jaxunlearn.train.make_step do this by themselves)."
            )
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        g_f = jax.tree.map(lambda x: forget_sign * x, f32(updates))
        g_r = f32(retain_grads)
        if clip_norm is not None:
            g_f, g_r = _clip(g_f, clip_norm), _clip(g_r, clip_norm)
        if variant == "U":
            g_r, g_f = jax.tree.map(jnp.negative, g_f), jax.tree.map(jnp.negative, g_r)

        treedef = jax.tree.structure(g_f)
        f_leaves, r_leaves = treedef.flatten_up_to(g_f), treedef.flatten_up_to(g_r)
        sol = _solve(
            f_leaves, r_leaves, lr, constraint, None if lr_radius else radius, allocation, eps
        )
        criterion_met = constraint > sol.rhs
        stop = (
            state.stop | (stop_on_infeasible & sol.infeasible) | (stop_on_criterion & criterion_met)
        )
        keep = jnp.where(stop, 0.0, 1.0)
        scale = -1.0 / jnp.where(lr > 0, lr, 1.0) if as_gradient else 1.0
        out_leaves = [
            (keep * scale * (sol.a_f[i] * f + sol.a_r[i] * r + sol.a_p[i] * p)).astype(
                jnp.asarray(u).dtype
            )
            for i, (f, r, p, u) in enumerate(
                zip(f_leaves, r_leaves, sol.perp, treedef.flatten_up_to(updates))
            )
        ]
        new_state = HardnessAwareState(
            count=optax.safe_increment(state.count),
            kappa=jnp.sum(sol.block_kappa),
            block_kappa=treedef.unflatten(list(sol.block_kappa)),
            block_rhs=treedef.unflatten(list(sol.block_rhs)),
            block_case=treedef.unflatten(list(sol.case)),
            rhs=sol.rhs,
            criterion_met=criterion_met,
            infeasible=sol.infeasible,
            stop=stop,
        )
        return treedef.unflatten(out_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
