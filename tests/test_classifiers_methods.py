"""Classifier scenarios, loss terms, training and every unlearning method on a tiny CNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn import train
from jaxunlearn.classifiers import (
    METHODS,
    ForgetRetainImages,
    TrainRecipe,
    acu,
    full_class,
    predict,
    random_samples,
    sub_class,
    train_classifier,
)
from jaxunlearn.classifiers import objectives as cob
from jaxunlearn.classifiers.methods import ssd as ssd_method
from jaxunlearn.data.images import ImageSplits, load_digits
from jaxunlearn.models.vision import CNNConfig

torch = pytest.importorskip("torch")
TINY = CNNConfig(num_labels=10, widths=(4, 8), hidden_size=16)


@pytest.fixture(scope="module")
def splits():
    full = load_digits()
    rng = np.random.default_rng(0)
    train = full.train.subset(np.sort(rng.choice(len(full.train), 240, replace=False)))
    test = full.test.subset(np.sort(rng.choice(len(full.test), 120, replace=False)))
    return ImageSplits("digits-tiny", train, test)


@pytest.fixture(scope="module")
def target(splits):
    model, log = train_classifier(TINY, splits.train, TrainRecipe(epochs=4, batch_size=32))
    assert log["loss"][-1] < log["loss"][0]
    return model


def test_scenarios(splits):
    task = full_class(splits, "3")
    np.testing.assert_array_equal(task.forget, splits.train.labels == 3)
    assert task.forget_eval_set().labels.tolist() == [3] * int((splits.test.labels == 3).sum())
    sub = sub_class(splits, 5)  # super-class "4-5"
    assert sub.num_labels == 5 and sub.forget_label == 2
    assert set(sub.train.labels.tolist()) == set(range(5))
    np.testing.assert_array_equal(sub.forget, splits.train.labels == 5)
    rnd = random_samples(splits, 0.1, seed=3)
    assert rnd.forget.sum() == 24 and rnd.forget_eval_set().images.shape[0] == 24
    assert random_samples(splits, 0.1, seed=3).forget.tolist() == rnd.forget.tolist()
    with pytest.raises(ValueError, match="forget class 10 does not exist"):
        full_class(splits, 10)
    with pytest.raises(ValueError, match="selects 0 of 240"):
        random_samples(splits, 0.001)


def test_loss_terms_match_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    batch = {"images": jnp.zeros((6, 1)), "labels": jnp.asarray([0, 1, 2, 3, 0, 1]),
             "random_labels": jnp.asarray([3, 3, 0, 1, 2, 2])}  # fmt: skip

    class Out:
        def __init__(self, x):
            self.logits = x

    def forward(images):
        return Out(jnp.asarray(logits))

    ce = torch.nn.functional.cross_entropy
    t = torch.tensor(logits)
    assert float(cob.cross_entropy()(forward, batch)[0]) == pytest.approx(
        float(ce(t, torch.tensor([0, 1, 2, 3, 0, 1]))), rel=1e-6
    )
    assert float(cob.gradient_ascent()(forward, batch)[0]) == pytest.approx(
        -float(ce(t, torch.tensor([0, 1, 2, 3, 0, 1]))), rel=1e-6
    )
    assert float(cob.random_labels()(forward, batch)[0]) == pytest.approx(
        float(ce(t, torch.tensor([3, 3, 0, 1, 2, 2]))), rel=1e-6
    )
    with pytest.raises(ValueError, match="random_labels"):
        cob.random_labels()(forward, {"images": 0, "labels": 0})


def test_sampler_is_a_function_of_step(splits):
    task = full_class(splits, 3)
    a = ForgetRetainImages(task.forget_set(), task.retain_set(), 10, 16, seed=1)
    b = ForgetRetainImages(task.forget_set(), task.retain_set(), 10, 16, seed=1)
    np.testing.assert_array_equal(
        a.batch_at(5)["retain"]["images"], b.batch_at(5)["retain"]["images"]
    )
    assert a.batch_at(0)["forget"]["images"].shape == (16, 8, 8, 1)
    assert set(np.asarray(a.batch_at(0)["forget"]["labels"]).tolist()) == {3}


def _plain_batch_mean_fisher(model, data, batch_size):
    """(1/N_b) sum_B (grad mean-CE(B))^2, batch by batch, written out plainly."""
    graphdef, params, rest = train.split_model(model)

    def loss(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x).logits
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    grad = jax.jit(jax.grad(loss))
    sq = []
    for s in range(0, len(data), batch_size):
        g = grad(params, data.images[s : s + batch_size], data.labels[s : s + batch_size])
        sq.append(jax.tree.map(lambda v: np.asarray(v, np.float64) ** 2, g))
    return params, jax.tree.map(lambda *xs: np.mean(xs, axis=0), *sq)


def test_ssd_method_equals_plain_rule(splits, target):
    task = full_class(splits, 4)  # 24 forget images; the last full-data batch is short
    order = np.r_[np.flatnonzero(task.retain), np.flatnonzero(task.forget)]
    params, i_full = _plain_batch_mean_fisher(target, task.train.subset(order), 32)
    _, i_forget = _plain_batch_mean_fisher(target, task.forget_set(), 32)
    out = ssd_method(target, task, alpha=2.0, lam=1.0, batch_size=32)
    new = nnx.state(out, nnx.Param)
    selected_any = False
    for (path, theta), f_d, f_f, got in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(i_full),
        jax.tree.leaves(i_forget), jax.tree.leaves(new),
    ):  # fmt: skip
        theta = np.asarray(theta, np.float64)
        sel = f_f > 2.0 * f_d
        beta = np.minimum(f_d / np.where(sel, f_f, 1.0), 1.0)
        expected = np.where(sel, beta * theta, theta)
        np.testing.assert_allclose(
            np.asarray(got), expected, rtol=2e-3, atol=1e-7, err_msg=str(path)
        )
        selected_any |= bool(sel.any())
    assert selected_any


def test_acu_method_head_equals_ridge_on_retain_features(splits, target):
    task = full_class(splits, 7)
    out = METHODS["acu"](target, task, gamma=0.1)
    _, feats = predict(target, task.train.images)
    keep = task.retain
    xb = np.c_[feats[keep], np.ones(keep.sum())].astype(np.float64)
    w = np.linalg.solve(
        xb.T @ xb + 0.1 * np.eye(xb.shape[1]), xb.T @ np.eye(10)[task.train.labels[keep]]
    )
    _, test_feats = predict(target, task.test.images)
    logits, out_feats = predict(out, task.test.images)
    np.testing.assert_allclose(out_feats, test_feats, atol=1e-6)  # backbone frozen
    np.testing.assert_allclose(logits, np.c_[test_feats, np.ones(len(test_feats))] @ w, atol=2e-4)
    assert acu.RidgeHead is not None


def test_lf_ssd_method_equals_plain_rule(splits, target):
    """Omega = mean over batches of |grad mean_x ||f(x)||^2|, unpadded, written plainly;
    the method pads the short last batch with zero-weight rows and must match exactly."""
    task = full_class(splits, 4)
    graphdef, params, rest = train.split_model(target)

    def lf_loss(p, x):
        logits = nnx.merge(graphdef, p, rest)(x).logits
        return jnp.mean(jnp.sum(logits**2, axis=1))

    grad = jax.jit(jax.grad(lf_loss))

    def omega(data):
        parts = [grad(params, data.images[s : s + 32]) for s in range(0, len(data), 32)]
        return jax.tree.map(lambda *g: np.mean([np.abs(np.asarray(x, np.float64)) for x in g], 0),
                            *parts)  # fmt: skip

    order = np.r_[np.flatnonzero(task.retain), np.flatnonzero(task.forget)]
    o_full, o_forget = omega(task.train.subset(order)), omega(task.forget_set())
    out = nnx.state(METHODS["lf_ssd"](target, task, alpha=1.0, lam=1.0, batch_size=32), nnx.Param)
    changed = False
    for theta, a, b, got in zip(jax.tree.leaves(params), jax.tree.leaves(o_full),
                                jax.tree.leaves(o_forget), jax.tree.leaves(out)):  # fmt: skip
        theta = np.asarray(theta, np.float64)
        sel = b > a
        expected = np.where(sel, np.minimum(a / np.where(sel, b, 1.0), 1.0) * theta, theta)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-3, atol=1e-7)
        changed |= bool(sel.any())
    assert changed


_SLOW = pytest.mark.slow  # same step machinery as salun/hamu; kept out of the default suite


@pytest.mark.parametrize(
    "name",
    [
        "salun",  # RL on masked params: forget_retain + make_step + an optax mask
        "hamu",  # split forget/retain gradients into transforms.hardness_aware
        pytest.param("ofmu", marks=_SLOW),  # bilevel.ofmu's own step (~15 s to compile)
        pytest.param("finetune", marks=_SLOW),
        pytest.param("gradascent", marks=_SLOW),
        pytest.param("random_labels", marks=_SLOW),
        pytest.param("gu", marks=_SLOW),
    ],
)
def test_method_runs_and_changes_the_model(splits, target, name):
    task = full_class(splits, 3)
    out = METHODS[name](target, task, steps=2, batch_size=16)
    before = jax.tree.leaves(nnx.state(target, nnx.Param))
    after = jax.tree.leaves(nnx.state(out, nnx.Param))
    assert all(np.isfinite(np.asarray(a)).all() for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    logits, _ = predict(out, task.test.images)
    assert logits.shape == (len(task.test), 10)
