"""ACU's closed form equals the ridge solution retrained without the forget set; SalUn's mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.classifiers import acu, saliency


def _ridge_by_solve(x, y, k, gamma):
    """Plain ridge regression with a bias column: (X^T X + gamma I) W = X^T Y."""
    xb = np.c_[x, np.ones(len(x))]
    yb = np.eye(k)[y]
    return np.linalg.solve(xb.T @ xb + gamma * np.eye(xb.shape[1]), xb.T @ yb)


def test_acu_forget_equals_ridge_retrained_without_forget_set():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 6)), rng.integers(0, 4, 80)
    forget = rng.choice(80, 15, replace=False)
    keep = np.setdiff1d(np.arange(80), forget)
    head = acu.ridge_head(x, y, 4, gamma=0.1)
    np.testing.assert_allclose(head.weights, _ridge_by_solve(x, y, 4, 0.1), atol=1e-10)
    after = acu.acu_forget(head, x[forget], y[forget])
    np.testing.assert_allclose(after.weights, _ridge_by_solve(x[keep], y[keep], 4, 0.1), atol=1e-9)
    xb = np.c_[x[keep], np.ones(len(keep))]
    np.testing.assert_allclose(
        after.inverse_gram, np.linalg.inv(xb.T @ xb + 0.1 * np.eye(7)), atol=1e-9
    )


def test_acu_sequential_requests_and_lstsq():
    """Two requests in a row = one ridge fit on what is left (checked with lstsq on the
    augmented system [X; sqrt(gamma) I] W = [Y; 0])."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 3)), rng.integers(0, 3, 50)
    head = acu.ridge_head(x, y, 3, gamma=0.5)
    head = acu.acu_forget(head, x[:5], y[:5])
    head = acu.acu_forget(head, x[5:12], y[5:12])
    xb = np.c_[x[12:], np.ones(38)]
    aug_x = np.r_[xb, np.sqrt(0.5) * np.eye(4)]
    aug_y = np.r_[np.eye(3)[y[12:]], np.zeros((4, 3))]
    expected = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
    np.testing.assert_allclose(head.weights, expected, atol=1e-9)


def test_acu_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        acu.ridge_head(np.zeros((3, 2)), np.zeros(3, int), 2, gamma=0.0)


def test_saliency_mask_keeps_the_largest_gradients():
    rng = np.random.default_rng(2)
    grads = {"a": jnp.asarray(rng.normal(size=(5, 4))), "b": jnp.asarray(rng.normal(size=7))}
    mask = saliency.saliency_mask(grads, keep=0.5)
    flat_g = np.abs(np.r_[np.ravel(grads["a"]), np.ravel(grads["b"])])
    flat_m = np.r_[np.ravel(mask["a"]), np.ravel(mask["b"])]
    assert flat_m.sum() == round(0.5 * 27)
    assert flat_g[flat_m == 1].min() >= flat_g[flat_m == 0].max()
    tx = saliency.masked_updates(mask)
    out, _ = tx.update(grads, tx.init(None))
    np.testing.assert_array_equal(
        np.asarray(out["b"]), np.asarray(grads["b"]) * np.asarray(mask["b"])
    )
    with pytest.raises(ValueError, match="keep"):
        saliency.saliency_mask(grads, keep=0.0)
    assert jax.tree.structure(mask) == jax.tree.structure(grads)
