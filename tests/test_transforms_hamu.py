"""Tests for HAMU's hardness-aware step (jaxunlearn/transforms/_hamu.py).

The reference is the case table of methods.md §6.2 written plainly in numpy float64
(`numpy_block`), applied per tensor with the documented constraint allocation, radius,
clipping and stopping rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from flax import nnx

from jaxunlearn.transforms import HardnessAwareState, hardness_aware

EPS = 1e-12


def numpy_block(g_r, g_f, bound, radius):
    """(Delta, case, infeasible) of the HAMU-Q closed form for one block, float64."""
    g_r, g_f = np.asarray(g_r, np.float64), np.asarray(g_f, np.float64)
    s = g_f @ g_f
    kappa = g_r @ g_f
    r_norm = np.linalg.norm(g_r)
    if s < EPS:
        if bound <= EPS:
            return -radius * g_r / max(r_norm, EPS), 1, False
        return np.zeros_like(g_r), 1, True
    if radius**2 < bound**2 / s:
        return bound * g_f / s, 2, True
    if kappa <= -bound * max(r_norm, EPS) / max(radius, EPS):
        return -radius * g_r / max(r_norm, EPS), 3, False
    perp = g_r - kappa / s * g_f
    if np.linalg.norm(perp) < EPS:
        return bound * g_f / s, 4, False
    side = radius if bound <= EPS else np.sqrt(radius**2 - bound**2 / s)
    return bound * g_f / s - side * perp / np.linalg.norm(perp), 5, False


def numpy_rhs(g_r, g_f, radius):
    g_r, g_f = np.asarray(g_r, np.float64).ravel(), np.asarray(g_f, np.float64).ravel()
    r_norm = np.linalg.norm(g_r)
    return radius * np.sqrt(max(r_norm**2 * (g_f @ g_f) - (g_r @ g_f) ** 2, 0.0)) / r_norm


def numpy_clip(tree, max_norm):
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree.values()))
    return {k: np.asarray(x, np.float64) * min(1.0, max_norm / norm) for k, x in tree.items()}


def run(tx, g_f, g_r, params=None):
    params = g_f if params is None else params
    return jax.jit(tx.update)(g_f, tx.init(params), params, retain_grads=g_r)


CASES = {
    "1_direct": ([1.0, 2.0, 2.0], [0.0, 0.0, 0.0], 0.0, 0.5, 1, False),
    "1_infeasible": ([1.0, 2.0, 2.0], [0.0, 0.0, 0.0], 0.1, 0.5, 1, True),
    "2_infeasible": ([0.0, 1.0, 0.0], [1.0, 0.0, 0.0], 1.0, 0.5, 2, True),
    "3_direct": ([-2.0, 0.0, 1.0], [1.0, 0.0, 0.0], 0.1, 1.0, 3, False),
    "4_colinear": ([2.0, 0.0, 0.0], [1.0, 0.0, 0.0], 0.1, 1.0, 4, False),
    "5_rectified": ([0.3, 1.2, 0.8], [0.5, 0.4, -0.2], 0.05, 0.3, 5, False),
    "5_rectified_B0": ([0.3, 1.2, 0.8], [0.5, 0.4, -0.2], 0.0, 0.3, 5, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_case_matches_numpy_table(name):
    g_r, g_f, bound, radius, case, infeasible = CASES[name]
    tx = hardness_aware(
        1.0, bound, radius=radius, clip_norm=None, forget_sign=1.0, stop_on_infeasible=False
    )
    delta, state = run(tx, {"w": jnp.asarray(g_f)}, {"w": jnp.asarray(g_r)})
    expected, expected_case, expected_infeasible = numpy_block(g_r, g_f, bound, radius)
    assert (expected_case, expected_infeasible) == (case, infeasible)  # the vectors hit the case
    np.testing.assert_allclose(delta["w"], expected, rtol=1e-6, atol=1e-7)
    assert int(state.block_case["w"]) == case
    assert bool(state.infeasible) == infeasible
    assert not bool(state.stop)
    if not infeasible:  # feasible solutions satisfy both constraints
        d = np.asarray(delta["w"], np.float64)
        assert d @ np.asarray(g_f) >= bound * (1 - 1e-5) - 1e-7
        assert np.linalg.norm(d) <= radius * (1 + 1e-5)


def test_case5_is_optimal_against_random_feasible_points_and_scipy():
    rng = np.random.default_rng(0)
    dim, radius = 5, 1.0
    g_f = rng.normal(size=dim)
    g_r = rng.normal(size=dim) + 0.5 * g_f  # kappa > 0: forgetting costs retention
    bound = 0.4 * np.linalg.norm(g_f) * radius
    tx = hardness_aware(1.0, bound, radius=radius, clip_norm=None, forget_sign=1.0)
    delta, state = run(
        tx, {"w": jnp.asarray(g_f, jnp.float32)}, {"w": jnp.asarray(g_r, jnp.float32)}
    )
    assert int(state.block_case["w"]) == 5
    d = np.asarray(delta["w"], np.float64)
    # Both constraints are active at the optimum.
    np.testing.assert_allclose(d @ g_f, bound, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(d), radius, rtol=1e-5)
    # Random feasible points (uniform in the ball, then the half-space) never do better.
    x = rng.normal(size=(200_000, dim))
    x *= (
        (rng.uniform(size=(len(x), 1)) ** (1 / dim))
        * radius
        / np.linalg.norm(x, axis=1, keepdims=True)
    )
    feasible = x[x @ g_f >= bound]
    assert len(feasible) > 1000
    assert g_r @ d <= (feasible @ g_r).min() + 1e-6
    # An independent solver agrees on the optimal value.
    res = scipy.optimize.minimize(
        lambda v: g_r @ v,
        x0=np.zeros(dim),
        jac=lambda v: g_r,
        constraints=[
            {"type": "ineq", "fun": lambda v: v @ g_f - bound, "jac": lambda v: g_f},
            {"type": "ineq", "fun": lambda v: radius**2 - v @ v, "jac": lambda v: -2 * v},
        ],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert res.success
    np.testing.assert_allclose(g_r @ d, res.fun, rtol=1e-4)


def multi_leaf(rng, scale):
    shapes = {"a": (3, 2), "b": (4,), "c": (2, 2)}
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("allocation", ["uniform", "grad_norm"])
def test_per_tensor_allocation_lr_radius_clipping_and_stopping_match_numpy(allocation):
    rng = np.random.default_rng(1)
    g_f, g_r = multi_leaf(rng, 1.5), multi_leaf(rng, 1.0)  # global norms > 1: clipping acts
    lr, bound = 0.5, 0.05
    tx = hardness_aware(lr, bound, allocation=allocation, clip_norm=1.0, stop_on_infeasible=False)
    # Default forget_sign = -1: the step passes grad of the minimised forget loss = -grad CE_f.
    updates = {k: jnp.asarray(-v) for k, v in g_f.items()}
    delta, state = run(tx, updates, {k: jnp.asarray(v) for k, v in g_r.items()})

    cf, cr = numpy_clip(g_f, 1.0), numpy_clip(g_r, 1.0)
    weights = {k: np.linalg.norm(cr[k]) * np.linalg.norm(cf[k]) for k in cf}
    total_rhs = 0.0
    for k in cf:
        b_l = bound / 3 if allocation == "uniform" else bound * weights[k] / sum(weights.values())
        r_l = lr * np.linalg.norm(cr[k])
        expected, case, _ = numpy_block(cr[k].ravel(), cf[k].ravel(), b_l, r_l)
        np.testing.assert_allclose(np.ravel(delta[k]), expected, rtol=1e-5, atol=1e-7)
        assert int(state.block_case[k]) == case
        rhs = numpy_rhs(cr[k], cf[k], r_l)
        np.testing.assert_allclose(state.block_rhs[k], rhs, rtol=1e-5)
        np.testing.assert_allclose(
            state.block_kappa[k], np.sum(cr[k] * cf[k]), rtol=1e-5, atol=1e-7
        )
        total_rhs += rhs
    np.testing.assert_allclose(state.rhs, total_rhs, rtol=1e-5)
    assert bool(state.criterion_met) == (bound > total_rhs)
    np.testing.assert_allclose(state.kappa, sum(np.sum(cr[k] * cf[k]) for k in cf), rtol=1e-5)


def test_global_allocation_solves_one_problem_on_the_whole_pytree():
    rng = np.random.default_rng(2)
    g_f, g_r = multi_leaf(rng, 0.2), multi_leaf(rng, 0.2)
    lr, bound = 0.3, 0.01
    tx = hardness_aware(lr, bound, allocation="global", clip_norm=None, forget_sign=1.0)
    delta, state = run(tx, jax.tree.map(jnp.asarray, g_f), jax.tree.map(jnp.asarray, g_r))
    f = np.concatenate([g_f[k].ravel() for k in sorted(g_f)]).astype(np.float64)
    r = np.concatenate([g_r[k].ravel() for k in sorted(g_r)]).astype(np.float64)
    radius = lr * np.linalg.norm(r)
    expected, case, _ = numpy_block(r, f, bound, radius)
    got = np.concatenate([np.ravel(delta[k]) for k in sorted(delta)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert all(int(c) == case for c in jax.tree.leaves(state.block_case))
    np.testing.assert_allclose(state.rhs, numpy_rhs(r, f, radius), rtol=1e-5)
    assert got @ f >= bound * (1 - 1e-5)
    assert np.linalg.norm(got) <= radius * (1 + 1e-5)


def test_variant_u_swaps_roles():
    rng = np.random.default_rng(3)
    g_f, g_r = rng.normal(size=4), rng.normal(size=4)
    bound, radius = 0.05, 0.4
    tx = hardness_aware(1.0, bound, radius=radius, variant="U", clip_norm=None, forget_sign=1.0)
    delta, _ = run(tx, {"w": jnp.asarray(g_f, jnp.float32)}, {"w": jnp.asarray(g_r, jnp.float32)})
    expected, _, _ = numpy_block(-g_f, -g_r, bound, radius)
    np.testing.assert_allclose(delta["w"], expected, rtol=1e-5, atol=1e-7)
    # HAMU-U: the retain loss drops by at least B to first order.
    assert -(np.asarray(delta["w"], np.float64) @ g_r) >= bound * (1 - 1e-5)


def test_stop_on_infeasible_emits_zero_and_stays_stopped():
    tx = hardness_aware(1.0, 2.0, radius=0.5, clip_norm=None, forget_sign=1.0)  # B_w = 1: case 2
    params = {"w": jnp.zeros(3), "v": jnp.zeros(2)}
    g_f = {"w": jnp.array([1.0, 0.0, 0.0]), "v": jnp.array([3.0, 0.0])}
    g_r = {"w": jnp.array([0.0, 1.0, 0.0]), "v": jnp.array([0.0, 1.0])}
    update = jax.jit(tx.update)
    delta, state = update(g_f, tx.init(params), params, retain_grads=g_r)
    assert bool(state.infeasible) and bool(state.stop)
    assert int(state.block_case["w"]) == 2 and int(state.block_case["v"]) != 2
    for leaf in jax.tree.leaves(delta):  # the feasible tensor is not updated either
        np.testing.assert_array_equal(leaf, 0.0)
    easy = {"w": jnp.array([10.0, 0.0, 0.0]), "v": jnp.array([10.0, 0.0])}
    delta, state = update(easy, state, params, retain_grads=g_r)
    assert not bool(state.infeasible) and bool(state.stop)  # sticky
    for leaf in jax.tree.leaves(delta):
        np.testing.assert_array_equal(leaf, 0.0)


def test_stop_on_criterion():
    g_f, g_r = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.9, 0.1])}  # nearly aligned
    # rhs = R sqrt(|g_r|^2 |g_f|^2 - kappa^2) / |g_r| = 1 · 0.1 / |g_r|
    rhs = 0.1 / np.sqrt(0.82)
    for bound, met in ((0.2, True), (0.05, False)):
        tx = hardness_aware(
            1.0, bound, radius=1.0, clip_norm=None, forget_sign=1.0, stop_on_criterion=True
        )
        delta, state = run(tx, g_f, g_r)
        np.testing.assert_allclose(state.rhs, rhs, rtol=1e-5)
        assert bool(state.criterion_met) == met and bool(state.stop) == met
        assert np.any(np.asarray(delta["w"]) != 0) != met
    tx = hardness_aware(1.0, 0.2, radius=1.0, clip_norm=None, forget_sign=1.0)
    delta, state = run(tx, g_f, g_r)
    assert bool(state.criterion_met) and not bool(state.stop)  # only reported by default
    assert np.any(np.asarray(delta["w"]) != 0)


def test_as_gradient_with_sgd_and_a_schedule_reproduces_delta():
    rng = np.random.default_rng(4)
    schedule = optax.linear_schedule(0.2, 0.05, 3)
    params = jax.tree.map(jnp.asarray, multi_leaf(rng, 1.0))
    direct = hardness_aware(schedule, 0.01)
    chained = optax.chain(hardness_aware(schedule, 0.01, as_gradient=True), optax.sgd(schedule))
    s_direct, s_chain = direct.init(params), chained.init(params)
    p_direct = p_chain = params
    up_direct, up_chain = jax.jit(direct.update), jax.jit(chained.update)
    for _ in range(3):
        g_f, g_r = (
            jax.tree.map(jnp.asarray, multi_leaf(rng, 0.3)),
            jax.tree.map(jnp.asarray, multi_leaf(rng, 0.3)),
        )
        d, s_direct = up_direct(g_f, s_direct, p_direct, retain_grads=g_r)
        u, s_chain = up_chain(g_f, s_chain, p_chain, retain_grads=g_r)
        p_direct, p_chain = optax.apply_updates(p_direct, d), optax.apply_updates(p_chain, u)
        for a, b in zip(jax.tree.leaves(p_direct), jax.tree.leaves(p_chain)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(s_direct.count) == 3


def test_works_on_nnx_state_under_jit():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 3)), jnp.float32)

    def forget_loss(p):  # GA-style: the minimised forget loss is a negated fit
        return -jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    def retain_loss(p):
        return jnp.mean((nnx.merge(graphdef, p)(x) - 1.0) ** 2)

    g_f, g_r = jax.grad(forget_loss)(params), jax.grad(retain_loss)(params)
    tx = hardness_aware(0.1, 1e-3, stop_on_infeasible=False)
    delta, state = run(tx, g_f, g_r, params)
    assert isinstance(delta, nnx.State) and isinstance(state, HardnessAwareState)
    raw_f = [-np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(g_f)]
    raw_r = [np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(g_r)]
    f_scale = min(1.0, 1.0 / np.sqrt(sum(v @ v for v in raw_f)))
    r_scale = min(1.0, 1.0 / np.sqrt(sum(v @ v for v in raw_r)))
    n = len(raw_f)
    for got, f, r in zip(jax.tree.leaves(delta), raw_f, raw_r):
        f, r = f * f_scale, r * r_scale
        expected, _, _ = numpy_block(r, f, 1e-3 / n, 0.1 * np.linalg.norm(r))
        np.testing.assert_allclose(np.ravel(got), expected, rtol=1e-4, atol=1e-7)


def test_missing_retain_grads_is_a_clear_error():
    tx = hardness_aware(0.1, 0.01)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="retain_grads"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((0.0, 0.01), {}),
        ((0.1, -0.01), {}),
        ((0.1, 0.01), {"radius": -1.0}),
        ((0.1, 0.01), {"radius": "sqrt"}),
        ((0.1, 0.01), {"allocation": "softmax"}),
        ((0.1, 0.01), {"variant": "hamu-q"}),
        ((0.1, 0.01), {"clip_norm": 0.0}),
        ((0.1, 0.01), {"forget_sign": 0.5}),
        ((0.1, 0.01), {"eps": 0.0}),
    ],
)
def test_bad_hyperparameters_raise_at_construction(args, kwargs):
    with pytest.raises(ValueError, match="hardness_aware"):
        hardness_aware(*args, **kwargs)
