"""Tests for importances, SSD / LF-SSD and fisher_dampening.

Each formula is checked against a plain computation in the test: numpy with analytic
gradients of a linear model, a Python loop of jax.grad on one-example batches, or an
element-by-element numpy loop for the dampening rules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxunlearn.transforms import (
    fisher_dampening,
    fisher_diagonal,
    importance_abs,
    lf_ssd,
    loss_free_loss,
    ssd,
)

# ----------------------------------------------------------------------------- Fisher


def linear_loss(params, batch):
    """Mean squared error of a linear model: mean_i (x_i . w + b - y_i)^2."""
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2)


def linear_batches(rng, sizes, dim=3):
    return [
        {
            "x": rng.normal(size=(b, dim)).astype(np.float32),
            "y": rng.normal(size=b).astype(np.float32),
        }
        for b in sizes
    ]


def linear_example_grads(params, batch):
    """Analytic per-example gradients: d/dw = 2 r x, d/db = 2 r, r = x.w + b - y."""
    x = batch["x"].astype(np.float64)
    r = x @ np.asarray(params["w"], np.float64) + float(params["b"]) - batch["y"]
    return 2 * r[:, None] * x, 2 * r


@pytest.mark.parametrize("chunk_size", [1, 2, 100])
def test_per_example_fisher_matches_numpy_analytic_gradients(chunk_size):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.asarray(0.3, jnp.float32)}
    batches = linear_batches(rng, [5, 3, 4])
    got = fisher_diagonal(
        linear_loss, params, batches, convention="per_example", chunk_size=chunk_size
    )
    gw = np.concatenate([linear_example_grads(params, b)[0] for b in batches])
    gb = np.concatenate([linear_example_grads(params, b)[1] for b in batches])
    np.testing.assert_allclose(got["w"], np.mean(gw**2, axis=0), rtol=1e-5)
    np.testing.assert_allclose(got["b"], np.mean(gb**2), rtol=1e-5)


@pytest.mark.parametrize("convention", ["per_example", "batch_mean"])
def test_fisher_traces_the_loss_once_per_batch_shape_across_calls(convention):
    # SSD calls fisher_diagonal twice with one loss (forget, then full data): the second
    # call, and every batch of the same shape, must reuse the first compilation.
    traces = []

    def loss(params, batch):
        traces.append(1)  # runs only while JAX traces the loss
        return linear_loss(params, batch)

    rng = np.random.default_rng(3)
    params = {"w": jnp.ones(3, jnp.float32), "b": jnp.asarray(0.0, jnp.float32)}
    first = fisher_diagonal(loss, params, linear_batches(rng, [4, 4]), convention=convention)
    n_first = len(traces)
    assert n_first > 0
    second = fisher_diagonal(loss, params, linear_batches(rng, [4, 4, 4]), convention=convention)
    assert len(traces) == n_first
    fisher_diagonal(loss, params, linear_batches(rng, [2]), convention=convention)
    assert len(traces) > n_first  # a new batch shape does compile (the counter is live)
    assert not np.allclose(first["w"], second["w"])  # different data, a real recomputation


def test_batch_mean_fisher_matches_numpy_analytic_gradients():
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.normal(size=3), jnp.float32),
        "b": jnp.asarray(-0.2, jnp.float32),
    }
    batches = linear_batches(rng, [4, 4, 4])
    got = fisher_diagonal(linear_loss, params, batches, convention="batch_mean")
    sq_w, sq_b = [], []
    for batch in batches:
        gw, gb = linear_example_grads(params, batch)
        sq_w.append(gw.mean(axis=0) ** 2)  # gradient of the batch-mean loss, squared
        sq_b.append(gb.mean() ** 2)
    np.testing.assert_allclose(got["w"], np.mean(sq_w, axis=0), rtol=1e-5)
    np.testing.assert_allclose(got["b"], np.mean(sq_b), rtol=1e-5)


class TinyClassifier(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 6, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.hidden(x)))


def test_per_example_fisher_on_nnx_state_matches_loop_of_single_example_grads():
    graphdef, params = nnx.split(TinyClassifier(nnx.Rngs(0)), nnx.Param)

    def loss_fn(p, batch):
        logits = nnx.merge(graphdef, p)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    rng = np.random.default_rng(2)
    batches = [
        {"x": rng.normal(size=(b, 4)).astype(np.float32), "y": rng.integers(0, 3, size=b)}
        for b in (3, 2)
    ]
    got = fisher_diagonal(loss_fn, params, batches, chunk_size=2)
    assert isinstance(got, nnx.State)
    grad_fn = jax.jit(jax.grad(loss_fn))
    squares = []
    for batch in batches:
        for i in range(batch["x"].shape[0]):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            squares.append(
                jax.tree.map(lambda g: np.asarray(g, np.float64) ** 2, grad_fn(params, one))
            )
    expected = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *squares)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def test_loss_free_loss_and_abs_importance_match_numpy():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 5)).astype(np.float32)
    batches = [{"x": rng.normal(size=(b, 2, 4)).astype(np.float32)} for b in (3, 5)]

    def logits_fn(params, batch):  # [B, T, V] logits of a per-position linear head
        return batch["x"] @ params["w"]

    loss = loss_free_loss(logits_fn)
    x = batches[0]["x"].astype(np.float64)
    expected_loss = np.mean(np.sum((x @ w) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(loss({"w": jnp.asarray(w)}, batches[0]), expected_loss, rtol=1e-5)

    got = importance_abs(loss, {"w": jnp.asarray(w)}, batches)
    grads = []
    for batch in batches:
        xb = batch["x"].astype(np.float64).reshape(-1, 4)  # positions as rows
        b = batch["x"].shape[0]
        grads.append(np.abs(2.0 / b * xb.T @ xb @ w))  # d/dW mean_b sum_t ||x_bt W||^2
    np.testing.assert_allclose(got["w"], np.mean(grads, axis=0), rtol=1e-5)


def test_fisher_errors_name_the_problem():
    params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    with pytest.raises(ValueError, match="empty"):
        fisher_diagonal(linear_loss, params, [])
    with pytest.raises(ValueError, match="empty"):
        importance_abs(linear_loss, params, iter(()))
    with pytest.raises(ValueError, match="convention"):
        fisher_diagonal(linear_loss, params, [], convention="true")
    with pytest.raises(ValueError, match="chunk_size"):
        fisher_diagonal(linear_loss, params, [], chunk_size=0)
    bad = {"x": np.ones((4, 3), np.float32), "y": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"\['y'\].*leading dimension 3"):
        fisher_diagonal(linear_loss, params, [bad])


# ----------------------------------------------------------------------------- SSD


def numpy_ssd(theta, i_full, i_forget, alpha, lam):
    """SSD rule, element by element (methods.md §7.1)."""
    out = np.array(theta, dtype=np.float64).copy()
    for idx in np.ndindex(out.shape):
        if i_forget[idx] > alpha * i_full[idx]:
            out[idx] = min(lam * i_full[idx] / i_forget[idx], 1.0) * theta[idx]
    return out


def ssd_case(rng, alpha):
    theta = rng.normal(size=(6, 5)).astype(np.float32)
    i_full = rng.uniform(0.0, 1.0, size=(6, 5)).astype(np.float32)
    i_forget = (i_full * rng.uniform(0.0, 30.0, size=(6, 5))).astype(np.float32)
    i_forget[0, :] = 0.0  # never selected
    i_full[1, :2] = 0.0  # selected with beta = 0 (I_D = 0 < I_f)
    i_forget[1, 2:4] = 0.0
    i_full[1, 2:4] = 0.0  # both zero: 0 > 0 is false, unchanged
    i_full[2, :] = 0.25  # exact ties I_f == alpha · I_D (binary-exact): not selected
    i_forget[2, :] = alpha * 0.25
    return theta, i_full, i_forget


@pytest.mark.parametrize("alpha,lam", [(10.0, 1.0), (2.0, 0.5), (10.0, 5.0)])
def test_ssd_matches_numpy_rule_including_edge_cases(alpha, lam):
    rng = np.random.default_rng(4)
    theta, i_full, i_forget = ssd_case(rng, alpha)
    bias = rng.normal(size=3).astype(np.float32)
    params = {"w": jnp.asarray(theta), "b": jnp.asarray(bias)}
    imp_full = {"w": jnp.asarray(i_full), "b": jnp.asarray([0.1, 0.0, 1.0], jnp.float32)}
    imp_forget = {"w": jnp.asarray(i_forget), "b": jnp.asarray([5.0, 0.0, 0.5], jnp.float32)}
    got = ssd(params, imp_full, imp_forget, alpha=alpha, lam=lam)
    np.testing.assert_allclose(got["w"], numpy_ssd(theta, i_full, i_forget, alpha, lam), rtol=1e-6)
    np.testing.assert_allclose(
        got["b"],
        numpy_ssd(bias, np.array([0.1, 0.0, 1.0]), np.array([5.0, 0.0, 0.5]), alpha, lam),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(got["w"][0], theta[0])  # I_forget = 0 rows untouched
    np.testing.assert_array_equal(got["w"][2], theta[2])  # ties untouched
    np.testing.assert_array_equal(got["w"][1, :2], 0.0)  # I_D = 0, I_f > 0: fully dampened


def test_lf_ssd_applies_the_same_rule_and_keeps_dtypes():
    rng = np.random.default_rng(5)
    theta, i_full, i_forget = ssd_case(rng, 3.0)
    params = {"w": jnp.asarray(theta, jnp.bfloat16)}
    got = lf_ssd(
        params, {"w": jnp.asarray(i_full)}, {"w": jnp.asarray(i_forget)}, alpha=3.0, lam=0.7
    )
    assert got["w"].dtype == jnp.bfloat16
    theta_bf16 = np.asarray(params["w"], np.float64)
    expected = numpy_ssd(theta_bf16, i_full, i_forget, 3.0, 0.7)
    np.testing.assert_allclose(np.asarray(got["w"], np.float64), expected, rtol=1e-2)


def test_ssd_validates_inputs():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    ok = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="alpha"):
        ssd(params, ok, ok, alpha=-1.0)
    with pytest.raises(ValueError, match="lam"):
        ssd(params, ok, ok, lam=-0.1)
    with pytest.raises(ValueError, match=r"importance_forget.*\['b'\]"):
        ssd(params, ok, {"w": jnp.ones((2, 2)), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match="importance_full.*missing leaves"):
        ssd(params, {"w": jnp.ones((2, 2))}, ok)


# ----------------------------------------------------------------------------- dampening


def test_fisher_dampening_formula_matches_numpy():
    rng = np.random.default_rng(6)
    imp = {"a": rng.uniform(0, 3, size=(3, 4)), "b": rng.uniform(0, 1, size=5)}
    upd = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    strength = 2.5
    tx = fisher_dampening(jax.tree.map(jnp.asarray, imp), strength=strength)
    got, _ = jax.jit(tx.update)(jax.tree.map(jnp.asarray, upd), tx.init(None))
    mean = (imp["a"].sum() + imp["b"].sum()) / (imp["a"].size + imp["b"].size)
    for k in imp:
        np.testing.assert_allclose(got[k], upd[k] / (1.0 + strength * imp[k] / mean), rtol=1e-6)


def test_fisher_dampening_extra_arg_overrides_and_edge_cases():
    upd = {"w": jnp.array([1.0, -2.0, 3.0])}
    tx = fisher_dampening({"w": jnp.array([1.0, 1.0, 1.0])}, strength=1.0)
    got, _ = tx.update(upd, tx.init(None), retain_importance={"w": jnp.array([2.0, 0.0, 1.0])})
    # mean(I) = 1: divide by 1 + I
    np.testing.assert_allclose(got["w"], [1.0 / 3.0, -2.0, 1.5], rtol=1e-6)
    got, _ = tx.update(upd, tx.init(None), retain_importance={"w": jnp.zeros(3)})
    np.testing.assert_array_equal(got["w"], upd["w"])  # no importance anywhere: identity
    with pytest.raises(ValueError, match="retain_importance"):
        fisher_dampening().update(upd, optax.EmptyState())
    with pytest.raises(ValueError, match="strength"):
        fisher_dampening(strength=-1.0)


def test_fisher_dampening_in_chain_under_jit():
    params = {"w": jnp.zeros(3)}
    tx = optax.chain(fisher_dampening(strength=3.0), optax.sgd(0.1))
    state = tx.init(params)
    imp = {"w": jnp.array([0.0, 1.0, 2.0])}  # mean 1

    @jax.jit
    def step(params, state):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params, retain_importance=imp)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state)
    np.testing.assert_allclose(
        params["w"], -0.1 / (1.0 + 3.0 * np.array([0.0, 1.0, 2.0])), rtol=1e-6
    )
