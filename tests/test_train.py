"""Tests for jaxunlearn.train: the jitted step, accumulation, compile count, the run driver.

The step is checked against a hand-written step (plain `jax.grad` + optax on a pure function
of the same parameters), so the NNX split/merge, donation and guard plumbing cannot change
the math unnoticed.
"""

import json
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxunlearn import objectives, train
from jaxunlearn.checkpoints import TrainCheckpointer
from jaxunlearn.train import CPU_MEMORY_SCHEDULING

# ----------------------------------------------------------------------------- a toy problem


class Toy(nnx.Module):
    def __init__(self, seed=0):
        self.lin = nnx.Linear(4, 3, rngs=nnx.Rngs(seed))

    def __call__(self, x):
        return self.lin(x)


def mse(forward, batch, *, ref_forward=None):
    del ref_forward
    err = ((forward(x=batch["x"]) - batch["y"]) ** 2).mean(-1)  # per item
    return err.mean(), {"mse": err.mean()}


def ascent(forward, batch, *, ref_forward=None):
    loss, aux = mse(forward, batch)
    return -loss, aux


def toy_batch(seed, step, rows=8):
    rng = np.random.default_rng([seed, step])

    def part():
        return {
            "x": rng.normal(size=(rows, 4)).astype(np.float32),
            "y": rng.normal(size=(rows, 3)).astype(np.float32),
        }

    return {"forget": part(), "retain": part()}


class ToyData:
    """batch_at(step) from (seed, step); `poison` steps get NaN inputs."""

    def __init__(self, seed=0, poison=(), rows=8):
        self.seed, self.poison, self.rows = seed, set(poison), rows

    def batch_at(self, step):
        batch = toy_batch(self.seed, step, self.rows)
        if step in self.poison:
            batch["forget"]["x"][:] = np.nan
        return batch


GAMMA, ALPHA = 0.7, 1.3


def toy_objective():
    return objectives.forget_retain(ascent, mse, gamma=GAMMA, alpha=ALPHA)


def plain_params(model):
    return {"kernel": np.asarray(model.lin.kernel[...]), "bias": np.asarray(model.lin.bias[...])}


def plain_loss(p, batch, gamma=GAMMA, alpha=ALPHA):
    def part_mse(b):
        pred = b["x"] @ p["kernel"] + p["bias"]
        return ((pred - b["y"]) ** 2).mean(-1).mean()

    return -gamma * part_mse(batch["forget"]) + alpha * part_mse(batch["retain"])


def run_step(model, objective, tx, batches, **kwargs):
    graphdef, params, rest = train.split_model(model)
    params = jax.tree.map(jnp.copy, params)
    step = train.make_step(graphdef, rest, objective, tx, **kwargs)
    opt_state = step.init(params)
    state = train.init_objective_state(objective)
    for batch in batches:
        params, opt_state, state, metrics = step(params, opt_state, batch, state)
    return nnx.merge(graphdef, params, rest), metrics, step


# ----------------------------------------------------------------------------- the step


def test_step_matches_hand_written_step():
    model = Toy()
    tx = optax.adamw(1e-2, weight_decay=0.01)
    batches = [toy_batch(0, s) for s in range(3)]
    out, metrics, _ = run_step(model, toy_objective(), tx, batches)

    p = {k: jnp.asarray(v) for k, v in plain_params(model).items()}
    state = tx.init(p)
    for batch in batches:
        loss, grads = jax.value_and_grad(plain_loss)(p, batch)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    got = plain_params(out)
    np.testing.assert_allclose(got["kernel"], p["kernel"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["bias"], p["bias"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-6
    )
    assert float(metrics["finite"]) == 1.0


def recording_transform():
    """updates = -(g_f + 2 · retain_weight · retain_grads): distinguishes the inputs."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, retain_grads, retain_weight=1.0, **extra):
        del params, extra
        out = jax.tree.map(lambda f, r: -(f + 2.0 * retain_weight * r), updates, retain_grads)
        return out, state

    return optax.GradientTransformationExtraArgs(init, update)


def test_split_grads_pass_weighted_forget_and_unweighted_retain_gradients():
    # No flag: the step finds out from the transformation that it reads retain_grads.
    model = Toy()
    batch = toy_batch(1, 0)
    out, metrics, _ = run_step(model, toy_objective(), recording_transform(), [batch])
    p = {k: jnp.asarray(v) for k, v in plain_params(model).items()}
    g_f = jax.grad(lambda q: plain_loss(q, batch, alpha=0.0))(p)  # gamma · L_forget
    g_r = jax.grad(lambda q: plain_loss(q, batch, gamma=0.0, alpha=1.0))(p)  # L_retain
    for name in ("kernel", "bias"):
        expected = p[name] - (g_f[name] + 2.0 * ALPHA * g_r[name])
        np.testing.assert_allclose(plain_params(out)[name], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        float(metrics["forget_grad_norm"]), float(optax.global_norm(g_f)), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(metrics["retain_grad_norm"]), float(optax.global_norm(g_r)), rtol=1e-6
    )
    assert float(metrics["retain_weight"]) == np.float32(ALPHA)


def test_wants_retain_grads_finds_the_transform_inside_any_chain():
    from jaxunlearn import transforms

    params = plain_params(Toy())
    projection = transforms.retain_projection(rank=2, refresh_every=3)
    assert train.wants_retain_grads(optax.chain(projection, optax.adamw(1e-3)), params)
    nested = optax.chain(optax.clip_by_global_norm(1.0), optax.chain(optax.scale(1.0), projection))
    assert train.wants_retain_grads(nested, params)
    assert train.wants_retain_grads(transforms.hardness_aware(1e-3, 1e-4), params)
    assert not train.wants_retain_grads(optax.adamw(1e-3), params)
    assert not train.wants_retain_grads(optax.chain(optax.clip(1.0), optax.sgd(0.1)), params)


def test_a_retain_transform_needs_a_split_objective():
    graphdef, params, rest = train.split_model(Toy())
    step = train.make_step(graphdef, rest, mse, recording_transform())
    with pytest.raises(ValueError, match="forget_loss"):
        step(jax.tree.map(jnp.copy, params), step.init(params), toy_batch(0, 0))
    no_retain = objectives.forget_retain(ascent, None)
    with pytest.raises(ValueError, match="no retain term"):
        train.unlearn(Toy(), no_retain, recording_transform(), ToyData(), steps=1, progress=False)


def test_gu_projection_still_projects_when_alpha_is_zero():
    # With alpha = 0 the executed step must be orthogonal to the retain gradient (to first
    # order the retain loss does not move); projecting off alpha · g_r = 0 would not do that.
    from jaxunlearn import transforms

    model = Toy()
    batch = toy_batch(2, 0)
    objective = objectives.forget_retain(ascent, mse, gamma=1.0, alpha=0.0)
    tx = optax.chain(transforms.retain_projection(rank=1, refresh_every=1), optax.sgd(0.1))
    out, metrics, _ = run_step(model, objective, tx, [batch])
    p = {k: jnp.asarray(v) for k, v in plain_params(model).items()}
    g_r = jax.grad(lambda q: plain_loss(q, batch, gamma=0.0, alpha=1.0))(p)
    g_f = jax.grad(lambda q: plain_loss(q, batch, gamma=1.0, alpha=0.0))(p)
    step = {k: plain_params(out)[k] - p[k] for k in p}
    dot = sum(float(jnp.vdot(step[k], g_r[k])) for k in p)
    norms = float(optax.global_norm(step)) * float(optax.global_norm(g_r))
    assert abs(dot) <= 1e-5 * norms
    # and it is the projected forget step: -lr · (g_f - <g_f, u> u), u = g_r / |g_r|
    u = {k: g_r[k] / optax.global_norm(g_r) for k in p}
    coef = sum(float(jnp.vdot(g_f[k], u[k])) for k in p)
    for k in p:
        np.testing.assert_allclose(step[k], -0.1 * (g_f[k] - coef * u[k]), rtol=1e-5, atol=1e-6)
    assert float(metrics["retain_weight"]) == 0.0


def test_accumulation_equals_full_batch_step():
    model = Toy()
    batches = [toy_batch(2, s, rows=12) for s in range(2)]
    full, m_full, _ = run_step(model, toy_objective(), optax.sgd(0.05), batches)
    acc, m_acc, _ = run_step(model, toy_objective(), optax.sgd(0.05), batches, micro_batches=4)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            plain_params(acc)[name], plain_params(full)[name], rtol=1e-5, atol=1e-7
        )
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of micro_batches"):
        run_step(
            model, toy_objective(), optax.sgd(0.05), [toy_batch(2, 0, rows=10)], micro_batches=4
        )


def test_compiles_once_per_bucket():
    model = Toy()
    # Two batch shapes (8 and 16 rows) stand for two length buckets.
    batches = [toy_batch(3, s, rows=8 if s % 3 else 16) for s in range(6)]
    _, _, step = run_step(model, toy_objective(), optax.sgd(0.01), batches)
    assert step.cache_size() == 2


def test_guard_keeps_parameters_on_nonfinite_loss():
    model = Toy()
    bad = toy_batch(0, 0)
    bad["forget"]["x"][:] = np.nan
    out, metrics, _ = run_step(model, toy_objective(), optax.adam(0.1), [bad])
    assert float(metrics["finite"]) == 0.0
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(plain_params(out)[name], plain_params(model)[name])


def stopping_sgd(after):
    """SGD whose state raises a `stop` flag once `after` updates were made (like HAMU)."""
    from typing import NamedTuple

    class State(NamedTuple):
        count: jax.Array
        stop: jax.Array

    def init(params):
        del params
        return State(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_))

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        return jax.tree.map(lambda g: -0.1 * g, updates), State(count, count >= after)

    return optax.GradientTransformation(init, update)


def test_a_transform_can_stop_the_run(tmp_path):
    result = train.unlearn(
        Toy(), toy_objective(), stopping_sgd(2), ToyData(), steps=5,
        checkpoint_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert result.step == 2 and "asked to stop after step 1" in result.stopped
    assert [m["step"] for m in result.metrics] == [0, 1]
    with TrainCheckpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2  # the state at the stop is saved


def test_learning_rate_is_reported_from_inject_hyperparams():
    schedule = optax.linear_schedule(0.0, 1e-2, 4)
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)
    model = Toy()
    lrs = []
    graphdef, params, rest = train.split_model(model)
    params = jax.tree.map(jnp.copy, params)
    step = train.make_step(graphdef, rest, toy_objective(), tx)
    opt_state = step.init(params)
    for s in range(3):
        params, opt_state, _, metrics = step(params, opt_state, toy_batch(0, s))
        lrs.append(float(metrics["lr"]))
    np.testing.assert_allclose(lrs, [0.0, 2.5e-3, 5e-3], rtol=1e-6)


# ----------------------------------------------------------------------------- the driver


@pytest.mark.parametrize("options", [None, CPU_MEMORY_SCHEDULING])
def test_unlearn_leaves_the_input_model_intact_and_logs(tmp_path, options):
    model = Toy()
    before = plain_params(model)
    log = tmp_path / "metrics.jsonl"
    result = train.unlearn(
        model, toy_objective(), optax.sgd(0.05), ToyData(), steps=4, log_path=log,
        progress=False, compiler_options=options,
    )  # fmt: skip
    assert result.step == 4 and result.start_step == 0
    np.testing.assert_array_equal(plain_params(model)["kernel"], before["kernel"])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    for key in ("loss", "forget_loss", "retain_loss", "grad_norm", "wall_time", "step_time"):
        assert all(isinstance(r[key], float) for r in lines), key
    # The logged loss is the loss at the parameters before each update (hand computation).
    p = {k: jnp.asarray(v) for k, v in before.items()}
    for s, record in enumerate(lines):
        batch = toy_batch(0, s)
        loss, grads = jax.value_and_grad(plain_loss)(p, batch)
        np.testing.assert_allclose(record["loss"], float(loss), rtol=1e-5)
        p = jax.tree.map(lambda a, g: a - 0.05 * g, p, grads)
    np.testing.assert_allclose(plain_params(result.model)["kernel"], p["kernel"], rtol=1e-5)


def test_tensorboard_scalars_are_written_when_a_writer_is_available(tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class SummaryWriter:
        def __init__(self, logdir):
            written.append(("open", logdir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append(("close",))

    monkeypatch.setitem(
        sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )
    result = train.unlearn(
        Toy(), toy_objective(), optax.sgd(0.05), ToyData(), steps=2, progress=False,
        tensorboard_dir=tmp_path / "tb",
    )  # fmt: skip
    losses = [(v, s) for tag, *rest in written if tag == "unlearn/loss" for v, s in [rest]]
    assert losses == [(m["loss"], m["step"]) for m in result.metrics]
    assert written[-1] == ("close",)


def read_tensorboard_scalars(logdir):
    """(tag, value, step) of every scalar in the event files under `logdir`, read plainly.

    An event file is TFRecord: per record an 8-byte little-endian length, a 4-byte CRC, the
    serialized `Event` proto and a 4-byte CRC.
    """
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    scalars = []
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.append((value.tag, value.simple_value, event.step))
    return scalars


def test_tensorboard_event_files_hold_the_logged_metrics(tmp_path):
    pytest.importorskip("tensorboardX")
    result = train.unlearn(
        Toy(), toy_objective(), optax.sgd(0.05), ToyData(), steps=3, progress=False,
        tensorboard_dir=tmp_path / "tb",
    )  # fmt: skip
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    losses = [(step, value) for tag, value, step in scalars if tag == "unlearn/loss"]
    assert [s for s, _ in losses] == [m["step"] for m in result.metrics]
    np.testing.assert_allclose([v for _, v in losses], [m["loss"] for m in result.metrics],
                               rtol=1e-6)  # fmt: skip


def pdu_toy():
    return objectives.PrimalDual(
        objectives.forget_retain(ascent, mse, gamma=1.0, alpha=0.5),
        retain_loss_eps=0.5,
        dual_step_size=0.3,
    )


def test_pdu_dual_variable_moves_once_per_micro_batch_as_open_unlearning():
    # open-unlearning updates lambda inside compute_loss, i.e. after every micro-batch, and
    # each micro-batch's loss uses the lambda left by the one before. Written out plainly:
    model, batch, eps, eta, lam0 = Toy(), toy_batch(4, 0, rows=8), 0.5, 0.3, 0.5
    p = {k: jnp.asarray(v) for k, v in plain_params(model).items()}

    def part_mse(q, b):
        return ((b["x"] @ q["kernel"] + q["bias"] - b["y"]) ** 2).mean(-1).mean()

    lam, grads = lam0, []
    for k in range(4):  # micro-batch k holds rows k, k + 4 (see train.micro_batches)
        b = {name: {key: v[k::4] for key, v in part.items()} for name, part in batch.items()}

        def loss(q, b=b, lam=lam):
            return -part_mse(q, b["forget"]) + lam * (part_mse(q, b["retain"]) - eps)

        grads.append(jax.grad(loss)(p))
        lam = max(0.0, lam + eta * (float(part_mse(p, b["retain"])) - eps))
    mean_grad = jax.tree.map(lambda *g: sum(g) / 4, *grads)

    objective = objectives.PrimalDual(
        objectives.forget_retain(ascent, mse, gamma=1.0, alpha=lam0),
        retain_loss_eps=eps, dual_step_size=eta,
    )  # fmt: skip

    def one_step(objective):
        graphdef, params, rest = train.split_model(model)
        step = train.make_step(graphdef, rest, objective, optax.sgd(1.0), micro_batches=4)
        params = jax.tree.map(jnp.copy, params)
        state = train.init_objective_state(objective)
        params, _, state, _ = step(params, step.init(params), batch, state)
        return nnx.merge(graphdef, params, rest), state

    out, state = one_step(objective)
    np.testing.assert_allclose(float(state.multiplier), lam, rtol=1e-5)
    assert int(state.count) == 4
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            plain_params(out)[name], p[name] - mean_grad[name], rtol=1e-5, atol=1e-6
        )
    per_step = objectives.PrimalDual(
        objectives.forget_retain(ascent, mse, gamma=1.0, alpha=lam0),
        retain_loss_eps=eps, dual_step_size=eta, dual_update="step",
    )  # fmt: skip
    assert int(one_step(per_step)[1].count) == 1


def test_resume_after_interruption_reproduces_an_uninterrupted_run(tmp_path):
    def run(directory, steps, callback=None):
        return train.unlearn(
            Toy(), pdu_toy(), optax.adam(0.05), ToyData(seed=5), steps=steps, seed=5,
            checkpoint_dir=directory, checkpoint_every=2, log_path=directory / "m.jsonl",
            progress=False, callback=callback,
        )  # fmt: skip

    full = run(tmp_path / "a", 6)

    def interrupt(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 6, interrupt)
    ckpt = TrainCheckpointer(tmp_path / "b")
    assert ckpt.latest_step() == 2 and ckpt.metadata()["step"] == 2
    ckpt.close()
    resumed = run(tmp_path / "b", 6)
    assert resumed.start_step == 2 and resumed.step == 6
    assert [m["step"] for m in resumed.metrics] == [2, 3, 4, 5]
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(
            plain_params(resumed.model)[name], plain_params(full.model)[name]
        )
    np.testing.assert_array_equal(
        resumed.objective_state.multiplier, full.objective_state.multiplier
    )
    assert float(full.objective_state.multiplier) != 0.5  # the dual variable did move
    lines = [json.loads(x) for x in (tmp_path / "b" / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4, 5]
    ref = [json.loads(x) for x in (tmp_path / "a" / "m.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [r["loss"] for r in ref]


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    clean = train.unlearn(
        Toy(), toy_objective(), optax.adam(0.05), ToyData(), steps=3, progress=False
    )
    with pytest.raises(train.NonFiniteLossError, match=r"at step 3\b") as err:
        train.unlearn(
            Toy(), toy_objective(), optax.adam(0.05), ToyData(poison={3}), steps=6,
            checkpoint_dir=tmp_path, checkpoint_every=1, progress=False,
        )  # fmt: skip
    assert err.value.step == 3 and np.isnan(err.value.loss)
    assert err.value.checkpoint_step == 3
    assert "last good checkpoint" in str(err.value)
    with TrainCheckpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3  # nothing saved for the bad step
        graphdef, params, rest = train.split_model(Toy())
        opt_state = optax.adam(0.05).init(params)
        state = {"params": params, "opt_state": opt_state, "rng": jax.random.PRNGKey(0)}
        from jaxunlearn.checkpoints import abstract_target

        saved = ckpt.restore(abstract_state=abstract_target(state))
    saved_model = nnx.merge(graphdef, saved["params"], rest)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(
            plain_params(saved_model)[name], plain_params(clean.model)[name]
        )
        np.testing.assert_array_equal(
            plain_params(err.value.result.model)[name], plain_params(clean.model)[name]
        )
    stopped = train.unlearn(
        Toy(), toy_objective(), optax.adam(0.05), ToyData(poison={1}), steps=4,
        progress=False, on_nonfinite="stop",
    )  # fmt: skip
    assert stopped.step == 1 and "step 1" in stopped.stopped


def test_unlearn_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train.unlearn(Toy(), mse, optax.sgd(0.1), ToyData(), steps=1, checkpoint_every=2)
    with pytest.raises(TypeError, match="batch_at"):
        train.unlearn(Toy(), mse, optax.sgd(0.1), [1, 2], steps=1)
    with pytest.MonkeyPatch.context() as mp:  # as if neither writer were installed
        mp.setitem(sys.modules, "tensorboardX", None)
        mp.setitem(sys.modules, "tensorflow", None)
        with pytest.raises(ImportError, match="pip install tensorboardX"):
            train.unlearn(
                Toy(), mse, optax.sgd(0.1), ToyData(), steps=1, tensorboard_dir=tmp_path / "tb"
            )
    assert not (tmp_path / "tb").exists()  # refused before any work
    train.unlearn(Toy(), toy_objective(), optax.sgd(0.1), ToyData(), steps=2,
                  checkpoint_dir=tmp_path / "c", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="resume=False"):
        train.unlearn(Toy(), toy_objective(), optax.sgd(0.1), ToyData(), steps=2,
                      checkpoint_dir=tmp_path / "c", resume=False, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="seed"):
        train.unlearn(Toy(), toy_objective(), optax.sgd(0.1), ToyData(), steps=3, seed=1,
                      checkpoint_dir=tmp_path / "c", progress=False)  # fmt: skip


# ----------------------------------------------------------------------------- a tiny llama

TINY = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


_MODELS = {}


def tiny_llama(seed=0):
    """A tiny random llama, built once per seed (the driver never mutates its input model)."""
    from jaxunlearn.models import ModelConfig, build_model

    if seed not in _MODELS:
        _MODELS[seed] = build_model(ModelConfig.from_hf_dict(TINY), rngs=nnx.Rngs(seed))
    return _MODELS[seed]


def qa_examples(n, seed, max_len=14):
    """Random token 'QA' items: the first half is the prompt (-100 labels)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, max_len + 1))
        ids = rng.integers(3, 64, size=length).astype(np.int32)
        labels = ids.copy()
        labels[: length // 2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def sampler(batch_size=4, seed=0, alternates=None, max_len=14):
    from jaxunlearn.data import ForgetRetainSampler

    return ForgetRetainSampler(
        qa_examples(8, 1, max_len), qa_examples(12, 2, max_len), batch_size=batch_size, seed=seed,
        alternates=alternates, buckets=(8, 16),
    )  # fmt: skip


def npo_objective():
    return objectives.forget_retain(objectives.npo(beta=0.1), objectives.nll())


def test_reference_parts_found_by_tracing():
    model = tiny_llama()
    graphdef, params, rest = train.split_model(model)
    batch = sampler().batch_at(0)
    assert train.reference_parts(npo_objective(), graphdef, params, rest, batch) == {"forget"}
    batch["forget"]["ref_logprob"] = np.zeros(4, np.float32)
    assert train.reference_parts(npo_objective(), graphdef, params, rest, batch) == set()
    kl = objectives.grad_diff(retain_loss="kl")
    assert train.reference_parts(kl, graphdef, params, rest, batch) == {"retain"}
    ga = objectives.forget_retain(objectives.grad_ascent())
    assert train.reference_parts(ga, graphdef, params, rest, batch) == set()


def test_reference_logprobs_are_computed_once_per_item():
    model = tiny_llama()
    graphdef, params, rest = train.split_model(model)
    alternates = [qa_examples(2, 100 + i, 8) for i in range(8)]
    data = train.ReferenceLogprobs(
        sampler(alternates=alternates, max_len=8), ["forget", "alternate"], params, graphdef, rest
    )
    assert len(data._cache["forget"]) == 8  # the whole forget set, up front
    calls = []
    score = data._score
    data._score = lambda *a: calls.append(1) or score(*a)
    direct_fn = jax.jit(
        lambda p, b: objectives.reference_logprob(train.model_forward(graphdef, p, rest), b)
    )
    for step in range(4):  # two epochs of the forget set
        batch = data.batch_at(step)
        for part in ("forget", "alternate"):
            plain = {k: jnp.asarray(v) for k, v in batch[part].items() if k != "ref_logprob"}
            direct = direct_fn(params, plain)
            np.testing.assert_allclose(batch[part]["ref_logprob"], direct, rtol=2e-5, atol=2e-5)
    # Forget items were never rescored; alternates only when a new (item, candidate) showed up.
    assert len(calls) <= len(data._cache["alternate"])
    before = len(calls)
    for step in range(4):
        data.batch_at(step)
    assert len(calls) == before
    # Canonical scoring: the values do not depend on the order items were first needed in
    # (what makes a resumed run reproduce an uninterrupted one bit for bit).
    other = train.ReferenceLogprobs(
        sampler(alternates=alternates, max_len=8), ["forget", "alternate"], params, graphdef, rest
    )
    for step in (3, 1, 2, 0):
        got, want = other.batch_at(step), data.batch_at(step)
        for part in ("forget", "alternate"):
            np.testing.assert_array_equal(got[part]["ref_logprob"], want[part]["ref_logprob"])


@pytest.mark.slow  # the default suite checks the precomputed values themselves (above)
def test_unlearn_with_precomputed_reference_matches_in_step_reference():
    kwargs = dict(steps=3, progress=False)
    data = sampler(max_len=8)  # one bucket: one compile per run
    pre = train.unlearn(tiny_llama(), npo_objective(), optax.adam(1e-3), data, **kwargs)
    inline = train.unlearn(
        tiny_llama(), npo_objective(), optax.adam(1e-3), data,
        precompute_reference=False, **kwargs,
    )  # fmt: skip
    a = nnx.state(pre.model, nnx.Param)
    b = nnx.state(inline.model, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        [m["loss"] for m in pre.metrics], [m["loss"] for m in inline.metrics], rtol=1e-5
    )


def test_llama_step_compiles_once_per_bucket_combination():
    from jaxunlearn.data import ForgetRetainSampler

    short = qa_examples(4, 1, max_len=8)
    long = [e for e in qa_examples(40, 3) if len(e["input_ids"]) > 8][:4]
    data = ForgetRetainSampler(short + long, None, batch_size=2, seed=0, buckets=(8, 16))
    model = tiny_llama()
    graphdef, params, rest = train.split_model(model)
    params = jax.tree.map(jnp.copy, params)
    objective = objectives.forget_retain(objectives.grad_ascent())  # forget only: one part
    step = train.make_step(graphdef, rest, objective, optax.sgd(1e-3))
    opt_state = step.init(params)
    shapes = set()
    for s in range(8):
        batch = data.batch_at(s)
        shapes.add(batch["forget"]["input_ids"].shape)
        params, opt_state, _, _ = step(params, opt_state, batch)
    assert len(shapes) >= 2  # the test exercises more than one bucket
    assert step.cache_size() == len(shapes)


def test_ssd_unlearn_matches_a_hand_computed_dampening():
    model = Toy(seed=3)
    forget = [toy_batch(11, s, rows=4)["forget"] for s in range(2)]
    full = forget + [toy_batch(12, s, rows=4)["retain"] for s in range(3)]
    alpha, lam = 1.5, 0.8
    result = train.ssd_unlearn(model, forget, full, alpha=alpha, lam=lam, loss=mse)

    p = {k: jnp.asarray(v) for k, v in plain_params(model).items()}

    def batch_loss(q, b):
        pred = b["x"] @ q["kernel"] + q["bias"]
        return ((pred - b["y"]) ** 2).mean(-1).mean()

    def importance(batches):  # SSD's code: mean over batches of squared batch-mean gradients
        grads = [jax.grad(batch_loss)(p, b) for b in batches]
        return {k: np.mean([np.asarray(g[k]) ** 2 for g in grads], axis=0) for k in p}

    i_f, i_d = importance(forget), importance(full)
    selected_total = 0
    for name in ("kernel", "bias"):
        theta = np.asarray(p[name])
        selected = i_f[name] > alpha * i_d[name]
        selected_total += int(selected.sum())
        factor = np.where(
            selected, np.minimum(lam * i_d[name] / np.where(selected, i_f[name], 1), 1), 1
        )
        np.testing.assert_allclose(plain_params(result.model)[name], theta * factor, rtol=1e-5)
    assert 0 < selected_total < 15  # the toy selects some parameters, not all
    assert result.metrics[0]["selected"] == selected_total
