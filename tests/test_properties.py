"""Property tests (hypothesis): scores, objectives, transforms and data files on edge inputs.

Where a value is defined it must be finite (no NaN from fully masked rows, length-1 answers,
extreme or bfloat16 logits, empty batches, zero gradients) and equal to a plain numpy
computation; where it is not defined the error must be a ValueError that names the problem.
Five bugs they found (NaN entropy moments and KL at -inf / huge logits, unclear errors for
deeply nested JSON and 4300+ digit numbers) are fixed; their tests stay as regressions.
"""

import json

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxunlearn import objectives as O
from jaxunlearn import scores as S
from jaxunlearn import transforms as T
from jaxunlearn.data import read_jsonl_records
from jaxunlearn.models.outputs import CausalLMOutput, Head

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@st.composite
def logits_and_labels(draw, max_abs=1e4):
    b, t, v = draw(st.sampled_from([(1, 2, 3), (2, 3, 5), (0, 3, 4)]))
    scale = draw(st.sampled_from([1.0, 30.0, max_abs]))
    z = draw(hnp.arrays(np.float32, (b, t, v), elements=st.floats(-1, 1, width=32))) * scale
    labels = draw(hnp.arrays(np.int32, (b, t), elements=st.integers(-1, v - 1)))
    labels = np.where(labels < 0, -100, labels)  # about 1 in (v + 1) masked, rows can be all masked
    if draw(st.booleans()) and b:
        labels[0] = -100  # a fully masked row
    return z, labels


# ----------------------------------------------------------------------------- scores


@FAST
@given(data=logits_and_labels(), chunk=st.sampled_from([2, 8]), bf16=st.booleans())
def test_token_scores_finite_and_match_numpy(data, chunk, bf16):
    z, labels = data
    source = jnp.asarray(z, jnp.bfloat16 if bf16 else jnp.float32)
    ts = S.token_scores(source, jnp.asarray(labels), chunk_size=chunk, stats=True)
    z64 = np.asarray(source.astype(jnp.float32), np.float64)  # what the model actually gave
    for name in ("logprob", "mask", "entropy_mean", "entropy_std", "argmax_match"):
        x = np.asarray(getattr(ts, name))
        assert x.dtype == np.float32 and np.isfinite(x).all(), name
    target = labels[:, 1:]
    mask = target != -100
    want = np.take_along_axis(np_log_softmax(z64[:, :-1]), np.maximum(target, 0)[..., None], -1)[
        ..., 0
    ]
    tol = 1e-5 * (1 + np.abs(z64).max(initial=0))
    np.testing.assert_allclose(np.asarray(ts.logprob), np.where(mask, want, 0), atol=tol)
    np.testing.assert_array_equal(np.asarray(ts.mask), mask)
    assert (np.asarray(ts.entropy_std) >= 0).all()
    assert set(np.unique(np.asarray(ts.argmax_match))) <= {0.0, 1.0}


@FAST
@given(
    lp=hnp.arrays(np.float32, (3, 4), elements=st.floats(-50, 0, width=32)),
    m=hnp.arrays(np.float32, (3, 4), elements=st.sampled_from([0.0, 1.0])),
)
def test_sequence_reductions_no_nan_on_masked_rows(lp, m):
    ts = S.TokenScores(jnp.asarray(lp * m), jnp.asarray(m))
    count = m.sum(-1)
    want = np.where(count > 0, -(lp * m).sum(-1) / np.maximum(count, 1), 0.0)
    np.testing.assert_allclose(np.asarray(S.sequence_mean_nll(ts)), want, rtol=1e-6, atol=1e-6)
    total = -(lp * m).sum() / max(m.sum(), 1.0)
    assert float(S.batch_mean_nll(ts)) == pytest.approx(total, rel=1e-5, abs=1e-6)


def test_empty_batch_reductions_are_zero_not_nan():
    ts = S.token_scores(jnp.zeros((0, 3, 4)), jnp.zeros((0, 3), jnp.int32))
    assert ts.logprob.shape == (0, 2)
    assert float(S.batch_mean_nll(ts)) == 0.0


def test_single_position_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 positions"):
        S.token_scores(jnp.zeros((1, 1, 4)), jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(ValueError, match="labels must be an integer array"):
        S.token_scores(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.float32))


@settings(max_examples=10, deadline=None)
@given(data=logits_and_labels(), shift=st.sampled_from([-np.inf, -5.0, 0.0, 3.0]))
def test_full_distribution_scores_finite_and_match_numpy(data, shift):
    z, labels = data
    other = np.roll(z, 1, axis=-1) * 0.5
    kl = np.asarray(S.kl_divergence(jnp.asarray(z), jnp.asarray(other), chunk_size=2))
    p_log, q_log = np_log_softmax(z), np_log_softmax(other)
    want = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    tol = 1e-5 * (1 + np.abs(z).max(initial=0))
    assert np.isfinite(kl).all() and (kl >= -tol).all()
    np.testing.assert_allclose(kl, want, atol=tol, rtol=1e-4)
    self_kl = np.asarray(S.kl_divergence(jnp.asarray(z), jnp.asarray(z)))
    np.testing.assert_allclose(self_kl, 0.0, atol=tol)
    if z.size:
        margin = np.asarray(S.logit_margin(jnp.asarray(z), chunk_size=2))
        np.testing.assert_allclose(margin, z.max(-1) - z.mean(-1), rtol=1e-5, atol=tol)
    ce = np.asarray(
        S.cross_entropy_to_target(jnp.asarray(z), jnp.asarray(labels), label_shift=shift)
    )
    assert np.isfinite(ce).all() and (ce >= -tol).all()
    q = z[:, :-1].astype(np.float64).copy()
    onehot = np.arange(z.shape[-1]) == labels[:, 1:, None]
    q = np.where(onehot, -np.inf if shift == -np.inf else q + shift, q)
    want = -(np.exp(np_log_softmax(q)) * np_log_softmax(z[:, :-1])).sum(-1)
    np.testing.assert_allclose(ce, want, atol=tol, rtol=1e-4)


# ----------------------------------------------------------------------------- objectives

V, D = 6, 4
_TERMS = {
    "nll": O.nll, "grad_ascent": O.grad_ascent, "npo": O.npo, "simnpo": O.simnpo,
    "wga": O.wga, "satimp": O.satimp, "undial": O.undial, "ceu": O.ceu,
    "kl_retain": O.kl_retain, "pdu_margin": O.pdu_margin,
}  # fmt: skip


def _forward(params):
    def forward(input_ids, attention_mask=None, return_logits=False, hidden_layers=(), **_):
        h = params["emb"][input_ids] * params["scale"]
        return CausalLMOutput(None, Head(h, params["k"]), {i: h for i in hidden_layers})

    return forward


@st.composite
def sequence_batches(draw):
    ids = draw(hnp.arrays(np.int32, (2, 4), elements=st.integers(0, V - 1)))
    kind = draw(st.sampled_from(["all_masked", "length_1", "random"]))
    labels = np.full((2, 4), -100, np.int32)
    if kind == "length_1":
        labels[:, -1] = ids[:, -1]
    elif kind == "random":
        keep = draw(hnp.arrays(np.bool_, (2, 4)))
        labels = np.where(keep, ids, -100)
    scale = draw(st.sampled_from([1.0, 1e3]))  # extreme logits
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}, scale


@jax.jit
def _all_terms(params, ref, batch):
    """(loss, grads) of every term on one batch: one compile for all of them."""
    out = {}
    for name, make in _TERMS.items():
        term = make()

        def loss(p, term=term):
            return term(_forward(p), batch, ref_forward=_forward(ref))[0]

        out[name] = jax.value_and_grad(loss)(params)
    return out


@settings(max_examples=12, deadline=None)
@given(data=sequence_batches(), seed=st.integers(0, 2**16))
def test_objective_terms_finite_loss_and_grads(data, seed):
    batch, scale = data
    rng = np.random.default_rng(seed)
    params = {
        "emb": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
        "k": jnp.asarray(rng.normal(size=(D, V)), jnp.float32),
        "scale": jnp.float32(scale),
    }
    ref = jax.tree.map(lambda x: x * 0.9, params)
    results = _all_terms(params, ref, jax.tree.map(jnp.asarray, batch))
    nothing_scored = (batch["labels"] == -100).all()
    for name, (loss, grads) in results.items():
        assert np.isfinite(float(loss)), (name, batch["labels"])
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads)), name
        if nothing_scored and name in ("nll", "grad_ascent", "wga", "satimp", "ceu", "undial"):
            assert float(loss) == 0.0, name  # nothing to score: no loss, no gradient
            assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads)), name


# ----------------------------------------------------------------------------- transforms


@st.composite
def grad_pairs(draw):
    shape = (3,)
    g_f = draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
    g_r = draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
    zero = draw(st.sampled_from(["none", "forget", "retain", "both"]))
    if zero in ("forget", "both"):
        g_f = np.zeros_like(g_f)
    if zero in ("retain", "both"):
        g_r = np.zeros_like(g_r)
    return {"w": jnp.asarray(g_f)}, {"w": jnp.asarray(g_r)}


_TRANSFORMS = {
    "gu": lambda: T.retain_projection(2, 1),
    "gu_adam": lambda: T.retain_projection(2, 1, whiten="adam"),
    "pcgrad": lambda: T.retain_projection(2, 1, mode="pcgrad"),
    "hamu": lambda: T.hardness_aware(0.1, 0.05),
    "hamu_fixed_radius": lambda: T.hardness_aware(0.1, 0.05, radius=1.0),
    "hamu_global": lambda: T.hardness_aware(0.1, 0.05, allocation="global"),
}


@jax.jit
def _two_steps(g_f, g_r):
    """Two updates of every transform (the second uses the state built by the first)."""
    params, out = {"w": jnp.ones(3)}, {}
    for name, make in _TRANSFORMS.items():
        tx = make()
        state = tx.init(params)
        first, state = tx.update(g_f, state, params, retain_grads=g_r)
        second, state = tx.update(g_f, state, params, retain_grads=g_r)
        out[name] = (first["w"], second["w"])
    return out


@settings(max_examples=12, deadline=None)
@given(pair=grad_pairs())
def test_transforms_finite_with_zero_gradients(pair):
    g_f, g_r = pair
    for name, updates in _two_steps(g_f, g_r).items():
        for u in updates:
            assert np.isfinite(np.asarray(u)).all(), (name, g_f, g_r)
            if not np.asarray(g_f["w"]).any() and not np.asarray(g_r["w"]).any():
                assert not np.asarray(u).any(), name  # nothing to do: no update


@settings(max_examples=10, deadline=None)
@given(
    i_d=hnp.arrays(np.float32, (4,), elements=st.sampled_from([0.0, 1e-30, 1.0, 1e30])),
    i_f=hnp.arrays(np.float32, (4,), elements=st.sampled_from([0.0, 1e-30, 1.0, 1e30])),
)
def test_dampening_finite_with_zero_importances(i_d, i_f):
    params = {"w": jnp.ones(4)}
    for fn in (T.ssd, T.lf_ssd):
        out = np.asarray(fn(params, {"w": jnp.asarray(i_d)}, {"w": jnp.asarray(i_f)})["w"])
        assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    tx = T.fisher_dampening()
    updates, _ = tx.update(
        {"w": jnp.ones(4)}, tx.init(params), params, retain_importance={"w": jnp.asarray(i_d)}
    )
    assert np.isfinite(np.asarray(updates["w"])).all()


# ----------------------------------------------------------------------------- data files

_GOOD = '{"question": "q", "answer": "a"}'
_LINES = st.one_of(
    st.just(_GOOD),
    st.just('{"question": "q"}'),
    st.just('{"question": 3, "answer": "a"}'),
    st.just('{"question": null, "answer": "a"}'),
    st.just('{"text": "t"}'),
    st.just("[1, 2]"),
    st.just('{"question": "q", "ans'),
    st.just(""),
    st.text(max_size=20),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(_LINES, max_size=5), prefix=st.sampled_from([b"", b"\xff", "\ufeff".encode()])
)
def test_malformed_data_files_give_records_or_a_clear_error(tmp_path, lines, prefix):
    path = tmp_path / "data.jsonl"
    path.write_bytes(prefix + "\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        records = read_jsonl_records(path)
    except ValueError as e:
        assert str(path) in str(e)  # names the file
        return
    assert records and all(isinstance(r, dict) for r in records)
    kind = {"question", "answer"} if "question" in records[0] else {"text"}
    assert all(kind <= set(r) and all(isinstance(r[k], str) for k in kind) for r in records)


# ----------------------------------------------------------------------------- bugs these found (fixed)


def test_token_scores_stats_with_masked_vocabulary_column():
    ts = S.token_scores(jnp.array([[[-jnp.inf, 0.0, 0.0]] * 2]), jnp.array([[0, 1]]), stats=True)
    assert np.isfinite(np.asarray(ts.entropy_mean)).all()
    assert float(ts.entropy_mean[0, 0]) == pytest.approx(np.log(0.5))


def test_kl_divergence_with_masked_reference_column():
    kl = S.kl_divergence(jnp.array([[[-jnp.inf, 0.0, 0.0]]]), jnp.zeros((1, 1, 3)))
    assert float(kl[0, 0]) == pytest.approx(np.log(1.5), rel=1e-5)


def test_token_scores_stats_with_huge_logits():
    ts = S.token_scores(jnp.array([[[1e20, -1e20, 0.0, 1.0]] * 2]), jnp.array([[0, 1]]), stats=True)
    assert np.isfinite(np.asarray(ts.entropy_std)).all()


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="deep.jsonl"):
        read_jsonl_records(path)


def test_huge_integer_is_a_clear_error(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text(
        json.dumps({"question": "q", "answer": "a"})[:-1] + ', "n": 1' + "0" * 5000 + "}\n"
    )
    with pytest.raises(ValueError, match="huge.jsonl"):
        read_jsonl_records(path)
