"""Tests for GU's retain projection (jaxunlearn/transforms/_projection.py).

References are written plainly with numpy in float64: the subspace is the span of the
last `rank` retain gradients inserted on refresh steps, orthonormalised with
np.linalg.qr; the projection is g - Q Q^T g.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxunlearn.transforms import (
    RetainProjectionState,
    retain_projection,
    whitened_retain_projection,
)

SHAPES = {"dense": {"kernel": (4, 3), "bias": (3,)}, "scale": (2,)}


def rand_tree(rng, scale=1.0):
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def basis_rows(state):
    leaves = jax.tree.leaves(state.basis)
    k = leaves[0].shape[0]
    return np.stack(
        [np.concatenate([np.asarray(x[j], np.float64).ravel() for x in leaves]) for j in range(k)]
    )


def window_projector(vectors):
    """Orthogonal projector onto span(vectors), by numpy QR with rank detection."""
    w = np.stack(vectors).T
    q, r = np.linalg.qr(w)
    q = q[:, np.abs(np.diag(r)) > 1e-10 * np.abs(r).max()]
    return q @ q.T


def run_sequence(tx, steps, seed):
    rng = np.random.default_rng(seed)
    params = rand_tree(rng)
    state = tx.init(params)
    update = jax.jit(tx.update)
    records = []
    for _ in range(steps):
        g_f, g_r = rand_tree(rng), rand_tree(rng)
        out, state = update(g_f, state, params, retain_grads=g_r)
        records.append((g_f, g_r, out, state))
    return records


@pytest.fixture(scope="module")
def rank3_every_step():
    return run_sequence(retain_projection(rank=3, refresh_every=1), steps=7, seed=0)


def test_output_matches_numpy_rolling_window_projection(rank3_every_step):
    inserted = []
    for g_f, g_r, out, _ in rank3_every_step:
        inserted.append(flat(g_r))
        proj = window_projector(inserted[-3:])
        expected = flat(g_f) - proj @ flat(g_f) + flat(g_r)
        np.testing.assert_allclose(flat(out), expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def test_projected_forget_update_is_orthogonal_to_every_basis_vector(rank3_every_step):
    for g_f, g_r, out, state in rank3_every_step:
        forget_part = flat(out) - flat(g_r)
        rows = basis_rows(state)
        dots = rows @ forget_part
        assert np.abs(dots).max() <= 1e-5 * np.linalg.norm(flat(g_f))


def test_basis_is_orthonormal_and_spans_the_window(rank3_every_step):
    inserted = []
    for step, (_, g_r, _, state) in enumerate(rank3_every_step):
        inserted.append(flat(g_r))
        rows = basis_rows(state)
        live = np.linalg.norm(rows, axis=1) > 0.5
        assert live.sum() == min(step + 1, 3)
        u = rows[live]
        np.testing.assert_allclose(u @ u.T, np.eye(len(u)), atol=1e-5)
        np.testing.assert_array_equal(rows[~live], 0.0)
        # Same subspace as the last 3 inserted gradients (projectors agree).
        np.testing.assert_allclose(u.T @ u, window_projector(inserted[-3:]), atol=1e-5)


def test_basis_stays_orthonormal_over_many_refreshes_of_correlated_gradients():
    rng = np.random.default_rng(1)
    tx = retain_projection(rank=4, refresh_every=1)
    params = rand_tree(rng)
    state = tx.init(params)
    update = jax.jit(tx.update)
    base = rand_tree(rng)
    inserted = []
    for _ in range(60):
        # Strongly correlated retain gradients: a common direction plus small noise.
        g_r = jax.tree.map(lambda b, n: b + 0.05 * n, base, rand_tree(rng))
        inserted.append(flat(g_r))
        _, state = update(rand_tree(rng), state, params, retain_grads=g_r)
    u = basis_rows(state)
    np.testing.assert_allclose(u @ u.T, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(u.T @ u, window_projector(inserted[-4:]), atol=1e-4)


def test_refresh_cadence_basis_changes_only_on_refresh_steps():
    records = run_sequence(retain_projection(rank=2, refresh_every=3), steps=8, seed=2)
    previous = np.zeros_like(basis_rows(records[0][3]))
    inserted = []
    for step, (g_f, g_r, out, state) in enumerate(records):
        rows = basis_rows(state)
        if step % 3 == 0:
            inserted.append(flat(g_r))
            assert not np.array_equal(rows, previous)
        else:
            np.testing.assert_array_equal(rows, previous)
        # The projector is always the one of the last 2 gradients from refresh steps.
        proj = window_projector(inserted[-2:])
        expected = flat(g_f) - proj @ flat(g_f) + flat(g_r)
        np.testing.assert_allclose(flat(out), expected, atol=2e-6 * np.abs(expected).max())
        assert int(state.count) == step + 1
        previous = rows


def test_pcgrad_leaves_non_conflicting_forget_gradients_untouched():
    rng = np.random.default_rng(3)
    g_r = rand_tree(rng)
    g_f = jax.tree.map(lambda r, n: r + 0.3 * n, g_r, rand_tree(rng))  # <g_f, g_r> > 0
    assert flat(g_f) @ flat(g_r) > 0
    tx = retain_projection(rank=2, refresh_every=1, mode="pcgrad")
    out, _ = jax.jit(tx.update)(g_f, tx.init(g_f), retain_grads=g_r)
    expected = jax.tree.map(jnp.add, g_f, g_r)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pcgrad_projects_conflicting_forget_gradients():
    rng = np.random.default_rng(4)
    g_r = rand_tree(rng)
    g_f = jax.tree.map(lambda r, n: -r + 0.3 * n, g_r, rand_tree(rng))  # <g_f, g_r> < 0
    assert flat(g_f) @ flat(g_r) < 0
    tx = retain_projection(rank=2, refresh_every=1, mode="pcgrad")
    out, _ = jax.jit(tx.update)(g_f, tx.init(g_f), retain_grads=g_r)
    r = flat(g_r)
    expected = flat(g_f) - (flat(g_f) @ r) / (r @ r) * r + r
    np.testing.assert_allclose(flat(out), expected, atol=1e-5)


def test_quadratic_retain_loss_is_first_order_invariant_to_projected_forget_step():
    rng = np.random.default_rng(5)
    n = 17  # SHAPES has 12 + 3 + 2 scalars
    m = rng.normal(size=(n, n))
    a_mat = m @ m.T / n + np.eye(n)
    a_vec = rng.normal(size=n)
    d_mat = np.diag(rng.uniform(0.5, 2.0, size=n))
    c_vec = rng.normal(size=n)
    treedef = jax.tree.structure(rand_tree(rng))
    sizes = [
        int(np.prod(s)) for s in jax.tree.leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    ]
    shapes = jax.tree.leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple))

    def to_tree(vec):
        parts = np.split(np.asarray(vec), np.cumsum(sizes)[:-1])
        return treedef.unflatten(
            [jnp.asarray(p.reshape(s), jnp.float32) for p, s in zip(parts, shapes)]
        )

    def retain_loss(theta):  # float64 numpy: 1/2 (theta - a)^T A (theta - a)
        return 0.5 * (theta - a_vec) @ a_mat @ (theta - a_vec)

    theta = rng.normal(size=n)
    g_r = a_mat @ (theta - a_vec)  # grad L_r
    g_f = c_vec + d_mat @ theta  # grad of L_f = c^T theta + 1/2 theta^T D theta
    tx = retain_projection(rank=1, refresh_every=1)
    out, _ = jax.jit(tx.update)(to_tree(g_f), tx.init(to_tree(theta)), retain_grads=to_tree(g_r))
    direction = -(flat(out) - g_r)  # the executed forget step per unit lr
    assert abs(g_r @ direction) <= 1e-5 * np.linalg.norm(g_r) * np.linalg.norm(direction)

    def change(step, d):
        return retain_loss(theta + step * d) - retain_loss(theta)

    for step in (1e-2, 5e-3):
        curvature = 0.5 * step**2 * direction @ a_mat @ direction
        np.testing.assert_allclose(change(step, direction), curvature, rtol=1e-2)
    # O(step^2) for the projected step, O(step) for the raw forget step.
    assert change(1e-2, direction) / change(5e-3, direction) == pytest.approx(4.0, rel=1e-2)
    assert change(1e-2, -g_f) / change(5e-3, -g_f) == pytest.approx(2.0, rel=5e-2)


def test_inside_chain_with_adamw_under_jit_compiles_once():
    rng = np.random.default_rng(6)
    params = rand_tree(rng)
    proj = retain_projection(rank=2, refresh_every=3)
    adam = optax.adamw(1e-2, weight_decay=0.01)
    tx = optax.chain(proj, adam)

    @jax.jit
    def step(params, state, g_f, g_r):
        updates, state = tx.update(g_f, state, params, retain_grads=g_r)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    ref_params, proj_state, adam_state = params, proj.init(params), adam.init(params)
    proj_update, adam_update = jax.jit(proj.update), jax.jit(adam.update)
    for _ in range(7):
        g_f, g_r = rand_tree(rng), rand_tree(rng)
        params, state = step(params, state, g_f, g_r)
        direction, proj_state = proj_update(g_f, proj_state, ref_params, retain_grads=g_r)
        updates, adam_state = adam_update(direction, adam_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        np.testing.assert_allclose(flat(params), flat(ref_params), rtol=1e-6, atol=1e-7)
    assert step._cache_size() == 1  # refresh is a traced branch, not a recompile
    assert isinstance(state[0], RetainProjectionState)
    assert int(state[0].count) == 7


class TinyMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.tanh(self.hidden(x)))


def test_works_on_nnx_state_with_real_gradients():
    model = TinyMLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(7)
    x_f, x_r = rng.normal(size=(5, 4)), rng.normal(size=(6, 4))
    y_r = rng.integers(0, 3, size=6)

    def forget_loss(p):  # GA on the forget inputs' top logit
        return -jnp.mean(jnp.max(nnx.merge(graphdef, p)(x_f), axis=-1))

    def retain_loss(p):
        logits = nnx.merge(graphdef, p)(x_r)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_r).mean()

    g_f, g_r = jax.jit(jax.grad(forget_loss))(params), jax.jit(jax.grad(retain_loss))(params)
    tx = optax.chain(retain_projection(rank=2, refresh_every=1), optax.sgd(1e-3))
    updates, state = jax.jit(tx.update)(g_f, tx.init(params), params, retain_grads=g_r)
    assert isinstance(updates, nnx.State)
    forget_step = -(flat(updates) / 1e-3) - flat(g_r)  # sgd: updates = -lr · output
    r = flat(g_r)
    assert abs(r @ forget_step) <= 1e-5 * np.linalg.norm(r) * np.linalg.norm(forget_step)
    np.testing.assert_allclose(
        forget_step, flat(g_f) - (flat(g_f) @ r) / (r @ r) * r, atol=2e-5 * np.abs(flat(g_f)).max()
    )
    new_params = optax.apply_updates(params, updates)
    nnx.update(model, new_params)
    np.testing.assert_allclose(flat(nnx.state(model, nnx.Param)), flat(new_params))


def test_masked_leaves_via_optax_partition():
    rng = np.random.default_rng(8)
    params = rand_tree(rng)
    labels = {"dense": {"kernel": "gu", "bias": "frozen"}, "scale": "gu"}
    tx = optax.partition(
        {"gu": retain_projection(rank=1, refresh_every=1), "frozen": optax.set_to_zero()},
        labels,
        mask_compatible_extra_args=True,
    )
    g_f, g_r = rand_tree(rng), rand_tree(rng)
    out, _ = jax.jit(tx.update)(g_f, tx.init(params), params, retain_grads=g_r)
    np.testing.assert_array_equal(np.asarray(out["dense"]["bias"]), 0.0)
    f = np.concatenate([np.ravel(g_f["dense"]["kernel"]), np.ravel(g_f["scale"])]).astype(
        np.float64
    )
    r = np.concatenate([np.ravel(g_r["dense"]["kernel"]), np.ravel(g_r["scale"])]).astype(
        np.float64
    )
    got = np.concatenate([np.ravel(out["dense"]["kernel"]), np.ravel(out["scale"])])
    np.testing.assert_allclose(got, f - (f @ r) / (r @ r) * r + r, atol=1e-5)


def test_output_dtype_follows_updates_and_zero_retain_gradient_adds_no_direction():
    rng = np.random.default_rng(9)
    g_f = jax.tree.map(lambda x: x.astype(jnp.bfloat16), rand_tree(rng))
    zeros = jax.tree.map(jnp.zeros_like, rand_tree(rng))
    tx = retain_projection(rank=2, refresh_every=1)
    out, state = jax.jit(tx.update)(g_f, tx.init(g_f), retain_grads=zeros)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    np.testing.assert_array_equal(basis_rows(state), 0.0)
    np.testing.assert_array_equal(flat(out), flat(g_f))


def np_adam_metric(nu, t, b2, eps):
    return np.sqrt(np.sqrt(nu / (1.0 - b2**t)) + eps)


def test_whitened_rank1_matches_gu_formula_and_adam_second_moment():
    rng = np.random.default_rng(10)
    params = rand_tree(rng)
    b2, eps = 0.9, 1e-8
    tx = whitened_retain_projection(1e-2, b2=b2, eps=eps)
    state = tx.init(params)
    update = jax.jit(tx.update)
    proj = retain_projection(rank=1, refresh_every=1)
    # The chain's first member alone, to read the direction Adam receives.
    proj_w = retain_projection(rank=1, refresh_every=1, whiten="adam", b2=b2, adam_eps=eps)
    proj_w_update = jax.jit(proj_w.update)
    nu = np.zeros_like(flat(params))
    for t in range(4):
        g_f, g_r = rand_tree(rng), rand_tree(rng)
        f, r = flat(g_f), flat(g_r)
        out, new_proj_state = proj_w_update(g_f, state[0], params, retain_grads=g_r)
        h = np.ones_like(f) if t == 0 else np_adam_metric(nu, t, b2, eps)
        f_w, r_w = f / h, r / h
        expected = h * (f_w - (f_w @ r_w) / (r_w @ r_w) * r_w) + r
        np.testing.assert_allclose(flat(out), expected, rtol=1e-5, atol=1e-6)
        # Adam divides by ~h^2: the forget part is then Euclidean-orthogonal to g_r.
        forget_part = (flat(out) - r) / h**2
        assert abs(forget_part @ r) <= 1e-5 * np.linalg.norm(forget_part) * np.linalg.norm(r)
        if t == 0:  # identity metric before any Adam state: plain GU projection
            plain, _ = jax.jit(proj.update)(g_f, proj.init(params), retain_grads=g_r)
            np.testing.assert_allclose(flat(out), flat(plain), rtol=1e-6, atol=1e-7)
        nu = b2 * nu + (1 - b2) * flat(out) ** 2
        _, state = update(g_f, state, params, retain_grads=g_r)
        np.testing.assert_allclose(flat(state[0].nu), flat(new_proj_state.nu), rtol=1e-6)
        # The projection's own EMA equals the chained Adam's second moment.
        np.testing.assert_allclose(flat(state[0].nu), flat(state[1].nu), rtol=1e-6, atol=0)
        np.testing.assert_allclose(flat(state[0].nu), nu, rtol=1e-5)


def test_missing_retain_grads_is_a_clear_error():
    tx = retain_projection()
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="retain_grads"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 0},
        {"rank": 2.5},
        {"refresh_every": 0},
        {"mode": "orthogonal"},
        {"whiten": "rmsprop"},
        {"eps": -1.0},
        {"b2": 1.0},
        {"adam_eps": -1e-8},
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs):
    with pytest.raises(ValueError, match="retain_projection"):
        retain_projection(**kwargs)
