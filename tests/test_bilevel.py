"""Tests for jaxunlearn.bilevel (OFMU) on quadratic toys whose answers are known.

- The similarity penalty's gradient (second-order autodiff) and the stationarity penalty's
  gradient (third order) are compared with central finite differences of functions written
  in numpy with hand-derived gradients of the quadratics.
- With beta = 0 and SGD both loops are affine maps, so the two-loop iteration's fixed point
  is computed in closed form with numpy; as rho grows it approaches the bi-level solution
  (the retain minimiser over the forget maximisers), which is also known in closed form.
- With beta > 0 and no inner steps the scheme is gradient descent on the penalty objective;
  its limit is compared with scipy's minimiser of the same objective written in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from flax import nnx

from jaxunlearn import bilevel, objectives, train

P = np.diag([1.0, 1.0, 0.0])  # the forget loss ignores the third coordinate
A = np.array([1.0, -2.0, 0.5])
Q = np.array([[2.0, 0.5, 0.3], [0.5, 1.5, 0.4], [0.3, 0.4, 1.0]])
R = np.array([-1.0, 1.0, 2.0])
S = np.array([[1.5, 0.2, -0.1], [0.2, 1.0, 0.3], [-0.1, 0.3, 0.8]])  # full-rank forget curvature


def jax_losses(curvature):
    c, q = jnp.asarray(curvature), jnp.asarray(Q)

    def forget(p, batch):
        del batch
        d = p["w"] - jnp.asarray(A)
        return -0.5 * d @ c @ d

    def retain(p, batch):
        del batch
        d = p["w"] - jnp.asarray(R)
        return 0.5 * d @ q @ d

    return forget, retain


# Hand-derived numpy versions: g_f = -C (w - a), g_r = Q (w - r), both affine in w.
def np_similarity(w, curvature, kind, eps=1e-8):
    u, v = -curvature @ (w - A), Q @ (w - R)
    if kind == "dot":
        return u @ v
    cos = u @ v / (np.sqrt(u @ u + eps**2) * np.sqrt(v @ v + eps**2))
    return cos**2 if kind == "cosine_sq" else cos


def np_h(w, curvature, beta, kind):
    d = w - A
    return -0.5 * d @ curvature @ d - beta * np_similarity(w, curvature, kind)


def np_grad_h(w, curvature, beta, kind, eps=1e-8):
    u, v = -curvature @ (w - A), Q @ (w - R)
    if kind == "dot":
        grad_sim = -curvature.T @ v + Q.T @ u
    else:
        nu, nv = np.sqrt(u @ u + eps**2), np.sqrt(v @ v + eps**2)
        cos = u @ v / (nu * nv)
        d_u = v / (nu * nv) - cos * u / nu**2
        d_v = u / (nu * nv) - cos * v / nv**2
        grad_sim = -curvature.T @ d_u + Q.T @ d_v
        if kind == "cosine_sq":
            grad_sim = 2 * cos * grad_sim
    return u - beta * grad_sim


def central_difference(f, w, step=1e-5):
    out = np.zeros_like(w)
    for i in range(w.size):
        e = np.zeros_like(w)
        e[i] = step
        out[i] = (f(w + e) - f(w - e)) / (2 * step)
    return out


@pytest.mark.parametrize("kind", bilevel.SIMILARITIES)
def test_penalty_gradients_match_finite_differences(kind):
    beta, w0 = 0.7, np.array([0.3, 0.4, -0.2])
    with jax.enable_x64(True):
        forget, retain = jax_losses(S)
        h = bilevel.inner_objective(forget, retain, beta=beta, similarity=kind)
        params = {"w": jnp.asarray(w0, jnp.float64)}
        value, aux = h(params, None)
        np.testing.assert_allclose(float(value), np_h(w0, S, beta, kind), rtol=1e-12)
        np.testing.assert_allclose(float(aux["similarity"]), np_similarity(w0, S, kind), rtol=1e-12)
        grad_h = jax.grad(lambda p: h(p, None)[0])(params)["w"]
        fd = central_difference(lambda w: np_h(w, S, beta, kind), w0)
        np.testing.assert_allclose(np.asarray(grad_h), fd, rtol=1e-7, atol=1e-8)
        np.testing.assert_allclose(np.asarray(grad_h), np_grad_h(w0, S, beta, kind), rtol=1e-10)

        # The stationarity penalty ½||∇h||² differentiates through ∇h (third order).
        def penalty(p):
            g = jax.grad(lambda q: h(q, None)[0])(p)
            return 0.5 * optax.tree.vdot(g, g)

        grad_p = jax.grad(penalty)(params)["w"]
        fd_p = central_difference(
            lambda w: 0.5 * np.sum(np_grad_h(w, S, beta, kind) ** 2), w0, step=1e-6
        )
        np.testing.assert_allclose(np.asarray(grad_p), fd_p, rtol=1e-6, atol=1e-8)


def run_iterations(method, forget, retain, w0, iterations, dtype=jnp.float32):
    params = {"w": jnp.asarray(w0, dtype)}
    state = method.init(params)
    iteration = method.update_fn(forget, retain)

    @jax.jit
    def run(params, state):
        def body(_, carry):
            p, s = carry
            p, s, _ = iteration(p, s, None)
            return p, s

        return jax.lax.fori_loop(0, iterations, body, (params, state))

    params, state = run(params, state)
    return np.asarray(params["w"]), state


def closed_form_fixed_point(rho, eta_in, eta_out, steps):
    """Fixed point of outer ∘ inner^T when every map is affine (beta = 0, SGD)."""
    eye = np.eye(3)
    inner_a, inner_c = eye - eta_in * P, eta_in * P @ A  # w + eta_in · ∇L_f
    a_t, c_t = eye, np.zeros(3)
    for _ in range(steps):
        a_t, c_t = inner_a @ a_t, inner_a @ c_t + inner_c
    outer_b = eye - eta_out * (Q + rho * P)  # w - eta_out · (∇L_r + rho · ∇½||∇L_f||²)
    outer_d = eta_out * (Q @ R + rho * P @ A)
    return np.linalg.solve(eye - outer_b @ a_t, outer_b @ c_t + outer_d)


BILEVEL_SOLUTION = np.array(
    [A[0], A[1], R[2] - (Q[2, 0] * (A[0] - R[0]) + Q[2, 1] * (A[1] - R[1])) / Q[2, 2]]
)


def test_two_loop_converges_to_its_closed_form_fixed_point():
    forget, retain = jax_losses(P)
    method = bilevel.ofmu(optax.sgd(0.5), optax.sgd(0.1), inner_steps=3, beta=0.0, rho=1.0)
    w, state = run_iterations(method, forget, retain, np.zeros(3), 400)
    np.testing.assert_allclose(w, closed_form_fixed_point(1.0, 0.5, 0.1, 3), rtol=1e-5, atol=1e-6)
    assert int(state.count) == 400


@pytest.mark.parametrize("rho", [100.0, 1000.0])
def test_approaches_the_bilevel_solution_as_rho_grows(rho):
    eta_out = 0.9 / rho  # stable: eta_out · (rho + λmax(Q)) < 2
    method = bilevel.ofmu(optax.sgd(0.5), optax.sgd(eta_out), inner_steps=3, beta=0.0, rho=rho)
    # float64: near the limit a float32 step (~1e-7) falls below half an ulp of the iterate.
    with jax.enable_x64(True):
        forget, retain = jax_losses(P)
        w, _ = run_iterations(method, forget, retain, np.zeros(3), 40_000, jnp.float64)
    np.testing.assert_allclose(w, closed_form_fixed_point(rho, 0.5, eta_out, 3), atol=1e-8)
    # The penalty's bias is O(1/rho): within 5/rho of the bi-level solution.
    assert np.abs(w - BILEVEL_SOLUTION).max() < 5.0 / rho


def test_with_similarity_penalty_it_minimises_the_penalty_objective():
    beta, rho = 0.3, 2.0
    forget, retain = jax_losses(S)
    method = bilevel.ofmu(
        optax.sgd(0.1), optax.sgd(0.05), inner_steps=0, beta=beta, rho=rho, similarity="cosine"
    )
    w0 = np.array([0.5, -1.0, 1.0])
    w, _ = run_iterations(method, forget, retain, w0, 4000)

    def penalised(w):
        d = w - R
        return 0.5 * d @ Q @ d + rho * 0.5 * np.sum(np_grad_h(w, S, beta, "cosine") ** 2)

    best = scipy.optimize.minimize(penalised, w0, method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(w, best, atol=2e-4)


def test_inner_loop_raises_the_inner_objective():
    forget, retain = jax_losses(S)
    h = bilevel.inner_objective(forget, retain, beta=0.5)
    method = bilevel.ofmu(optax.sgd(0.2), optax.sgd(0.0), inner_steps=4, beta=0.5, rho=0.0)
    params = {"w": jnp.asarray([2.0, 1.0, -1.0])}
    new, _, metrics = jax.jit(method.update_fn(forget, retain))(params, method.init(params), None)
    assert float(metrics["inner_objective"]) > float(h(params, None)[0]) + 0.1
    np.testing.assert_allclose(float(metrics["inner_objective"]), float(h(new, None)[0]), rtol=1e-6)


def test_value_penalty_outer_gradient_is_retain_minus_rho_grad_h():
    forget, retain = jax_losses(S)
    beta, rho, lr = 0.4, 0.5, 0.1
    method = bilevel.ofmu(
        optax.sgd(0.1), optax.sgd(lr), inner_steps=0, beta=beta, rho=rho, penalty="value"
    )
    w0 = np.array([0.1, 0.2, 0.3])
    new, _, _ = method.update_fn(forget, retain)(
        {"w": jnp.asarray(w0)}, method.init({"w": w0}), None
    )
    expected = w0 - lr * (Q @ (w0 - R) - rho * np_grad_h(w0, S, beta, "cosine"))
    np.testing.assert_allclose(np.asarray(new["w"]), expected, rtol=1e-5)


def test_value_penalty_is_logged_as_the_inner_rise_of_h():
    forget, retain = jax_losses(S)
    beta = 0.4
    method = bilevel.ofmu(
        optax.sgd(0.1), optax.sgd(0.1), inner_steps=2, beta=beta, rho=0.5, penalty="value"
    )
    w0 = np.array([0.1, 0.2, 0.3])
    _, _, metrics = method.update_fn(forget, retain)(
        {"w": jnp.asarray(w0)}, method.init({"w": w0}), None
    )
    # Two plain gradient-ascent steps on h (SGD, lr 0.1), written out with numpy.
    w = w0.copy()
    for _ in range(2):
        w = w + 0.1 * np_grad_h(w, S, beta, "cosine")
    expected = np_h(w, S, beta, "cosine") - np_h(w0, S, beta, "cosine")
    assert "penalty" in metrics
    np.testing.assert_allclose(float(metrics["penalty"]), expected, rtol=1e-4, atol=1e-7)
    assert expected > 0


def test_bad_hyperparameters_are_rejected():
    for kwargs, match in [
        ({"inner_steps": -1}, "inner_steps"),
        ({"similarity": "angle"}, "similarity"),
        ({"penalty": "gap"}, "penalty"),
        ({"rho": -1.0}, "rho"),
        ({"beta": -0.5}, "beta"),
        ({"eps": 0.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            bilevel.ofmu(optax.sgd(0.1), optax.sgd(0.1), **kwargs)


# ----------------------------------------------------------------------------- in the driver


class Toy(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(4, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.lin(x)


def mse(forward, batch, *, ref_forward=None):
    del ref_forward
    return ((forward(x=batch["x"]) - batch["y"]) ** 2).mean(), {}


class ToyData:
    def batch_at(self, step):
        rng = np.random.default_rng([7, step])
        part = lambda: {  # noqa: E731
            "x": rng.normal(size=(6, 4)).astype(np.float32),
            "y": rng.normal(size=(6, 2)).astype(np.float32),
        }
        return {"forget": part(), "retain": part()}


def test_ofmu_runs_in_unlearn_like_the_plain_iteration():
    method = bilevel.ofmu(optax.sgd(0.05), optax.adam(0.01), inner_steps=2, beta=0.5, rho=0.2)
    objective = objectives.forget_retain(mse, mse)
    result = train.unlearn(Toy(), objective, method, ToyData(), steps=3, progress=False)
    assert result.step == 3 and set(result.metrics[0]) >= {"loss", "similarity", "penalty"}

    model = Toy()
    params = {"kernel": model.lin.kernel[...], "bias": model.lin.bias[...]}

    def plain(part):
        def loss(p, batch):
            pred = batch[part]["x"] @ p["kernel"] + p["bias"]
            return ((pred - batch[part]["y"]) ** 2).mean()

        return loss

    iteration = jax.jit(method.update_fn(plain("forget"), plain("retain")))
    state = method.init(params)
    for step in range(3):
        params, state, metrics = iteration(params, state, ToyData().batch_at(step))
    np.testing.assert_allclose(result.model.lin.kernel[...], params["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.metrics[-1]["loss"], float(metrics["loss"]), rtol=1e-5)
