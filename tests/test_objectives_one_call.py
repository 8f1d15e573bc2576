"""Combined objectives run the model once on the forget and retain rows stacked.

Checked against the same objectives with ``one_call=False`` (one model call per part, the
path the torch-parity tests of test_objectives.py cover): equal losses, metrics and gradients
of every parameter to float32 rounding, and the number of model calls actually made.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn import objectives as ob
from jaxunlearn import train
from jaxunlearn.models import ModelConfig, build_model
from jaxunlearn.models.outputs import CausalLMOutput, Head
from jaxunlearn.objectives._rows import stacked_rows

TINY = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
CHUNK = 24  # does not divide the vocabulary


def sequence_batch(seed, rows, seq=10, prompt=3):
    """Right-padded random rows (different lengths), labels -100 on prompt and padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY["vocab_size"], size=(rows, seq)).astype(np.int32)
    lengths = rng.integers(prompt + 2, seq + 1, size=rows)
    pos = np.arange(seq)[None]
    real = pos < lengths[:, None]
    ids = np.where(real, ids, 0)
    labels = np.where(real & (pos >= prompt), ids, -100).astype(np.int32)
    return {"input_ids": ids, "attention_mask": real.astype(np.int32), "labels": labels}


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama port: (make_forward(params) -> forward, params)."""
    graphdef, params, rest = train.split_model(
        build_model(ModelConfig.from_hf_dict(TINY), rngs=nnx.Rngs(0))
    )
    return (lambda p: train.model_forward(graphdef, p, rest)), params


@pytest.fixture(scope="module")
def toy():
    """A cheap causal LM that treats rows independently: embedding, a masked causal mean
    mixed through tanh, the tied head. Hidden state 0 is the embedding, 1 the final one."""
    rng = np.random.default_rng(0)
    vocab, dim = TINY["vocab_size"], 16
    params = {
        "embed": jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32),
        "mix": jnp.asarray(rng.normal(size=(dim, dim)) / 4, jnp.float32),
    }

    def make_forward(p):
        def forward(input_ids, attention_mask=None, *, hidden_layers=(), return_logits=True):
            h0 = p["embed"][input_ids]
            m = jnp.ones(input_ids.shape) if attention_mask is None else attention_mask
            total = jnp.cumsum(h0 * m[..., None], axis=1)
            h1 = jnp.tanh(total / jnp.maximum(jnp.cumsum(m, 1), 1)[..., None] @ p["mix"]) + h0
            states = {i: h for i, h in ((0, h0), (1, h1)) if i in hidden_layers}
            logits = h1 @ p["embed"].T if return_logits else None
            return CausalLMOutput(logits, Head(h1, p["embed"].T), states)

        return ob.rowwise(forward)

    return make_forward, params


def counted(forward, calls):
    def wrapped(**kwargs):
        calls.append(tuple(np.shape(kwargs["input_ids"])))
        return forward(**kwargs)

    wrapped.rowwise = ob._rows.is_rowwise(forward)  # the wrapper keeps the forward's mark
    return wrapped


def loss_and_grad(objective, model, batch, state=None):
    """(loss, aux, grads, model calls) of `objective`, traced and run under jax.jit."""
    make_forward, params = model
    calls = []
    ref_params = jax.tree.map(lambda x: x * 0.9, params)

    def fn(p, b):
        forward = counted(make_forward(p), calls)
        return train.call_objective(objective, forward, b, make_forward(ref_params), state)

    (loss, aux), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)
    return loss, aux, grads, calls


def without_one_call(objective):
    if isinstance(objective, ob.PrimalDual):
        return dataclasses.replace(objective, objective=without_one_call(objective.objective))
    return dataclasses.replace(objective, one_call=False)


def assert_same(model, objective, batch, calls_one, calls_apart, state=None):
    assert objective.objective.one_call if isinstance(objective, ob.PrimalDual) else True
    loss, aux, grads, calls = loss_and_grad(objective, model, batch, state)
    loss2, aux2, grads2, calls2 = loss_and_grad(without_one_call(objective), model, batch, state)
    assert len(calls) == calls_one and len(calls2) == calls_apart, (calls, calls2)
    assert np.isfinite(float(loss)) and float(loss) != 0.0
    np.testing.assert_allclose(float(loss), float(loss2), rtol=2e-6)
    assert aux.keys() == aux2.keys()
    for key in aux:
        np.testing.assert_allclose(aux[key], aux2[key], rtol=2e-5, atol=1e-6, err_msg=key)
    flat, flat2 = jax.tree.leaves_with_path(grads), jax.tree.leaves(grads2)
    assert sum(float(jnp.abs(g).sum()) for _, g in flat) > 0
    for (path, g), g2 in zip(flat, flat2, strict=True):
        scale = float(jnp.abs(g2).max()) or 1.0
        np.testing.assert_allclose(
            g / scale, g2 / scale, rtol=1e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path)
        )


def npo_batch(forget_rows=2, retain_rows=3, retain_seq=10):
    forget = sequence_batch(1, forget_rows)
    retain = sequence_batch(2, retain_rows, seq=retain_seq)
    # stored reference log-probs near the model's (~ -4 per scored token)
    forget["ref_logprob"] = np.linspace(-30.0, -20.0, forget_rows).astype(np.float32)
    return {"forget": forget, "retain": retain}


def test_npo_with_nll_retain_one_call(llama):
    objective = ob.forget_retain(ob.npo(0.1, chunk_size=CHUNK), ob.nll(chunk_size=CHUNK),
                                 gamma=0.7, alpha=1.3)  # fmt: skip
    assert_same(llama, objective, npo_batch(), calls_one=1, calls_apart=2)


def test_grad_diff_with_kl_retain_one_call(toy):
    # KL retain also runs the reference on the retain rows: that call stays its own.
    objective = ob.grad_diff(retain_loss="kl", chunk_size=CHUNK)
    batch = {"forget": sequence_batch(3, 2), "retain": sequence_batch(4, 2)}
    assert_same(toy, objective, batch, calls_one=1, calls_apart=2)


def test_paired_dpo_forget_alternate_and_retain_in_one_call(toy):
    objective = ob.forget_retain(ob.dpo(0.1, chunk_size=CHUNK), ob.nll(chunk_size=CHUNK))
    batch = {"forget": sequence_batch(5, 2), "alternate": sequence_batch(6, 2),
             "retain": sequence_batch(7, 3)}  # fmt: skip
    assert_same(toy, objective, batch, calls_one=1, calls_apart=3)


def test_rmu_hidden_states_one_call(toy):
    objective = ob.rmu(layer=0, steering_coeff=3.0, alpha=2.0)
    batch = {"forget": sequence_batch(8, 2), "retain": sequence_batch(9, 2)}
    assert_same(toy, objective, batch, calls_one=1, calls_apart=2)


def test_pdu_one_call(toy):
    objective = ob.pdu(retain_loss_eps=0.5, alpha=2.0, chunk_size=CHUNK)
    batch = {"forget": sequence_batch(10, 2), "retain": sequence_batch(11, 2)}
    assert_same(toy, objective, batch, 1, 2, state=objective.init_state())


def test_parts_of_different_lengths_run_apart(toy):
    objective = ob.forget_retain(ob.npo(0.1, chunk_size=CHUNK), ob.nll(chunk_size=CHUNK))
    assert_same(toy, objective, npo_batch(retain_seq=12), calls_one=2, calls_apart=2)


def test_no_retain_term_runs_only_the_forget_rows(toy):
    objective = ob.forget_retain(ob.grad_ascent(chunk_size=CHUNK))
    batch = {"forget": sequence_batch(12, 2), "retain": sequence_batch(13, 3)}
    *_, calls = loss_and_grad(objective, toy, batch)
    assert calls == [(2, 10)]


def test_other_calls_go_to_the_model_unchanged(toy):
    make_forward, params = toy
    forget, retain, other = sequence_batch(14, 2), sequence_batch(15, 3), sequence_batch(16, 2)
    calls = []

    @jax.jit
    def run(p, forget, retain, other):
        forward = stacked_rows(counted(make_forward(p), calls), [forget, retain])
        alone = make_forward(p)
        mask = retain["attention_mask"]
        return (
            forward(input_ids=other["input_ids"], attention_mask=other["attention_mask"]).logits,
            alone(input_ids=other["input_ids"], attention_mask=other["attention_mask"]).logits,
            # the part's ids with another mask are not the part: a call of their own
            forward(input_ids=retain["input_ids"], attention_mask=jnp.ones_like(mask)).logits,
            forward(input_ids=retain["input_ids"], attention_mask=mask).logits,  # stacked call
            alone(input_ids=retain["input_ids"], attention_mask=mask).logits,
        )

    got, want, _, rows, rows_alone = run(params, forget, retain, other)
    assert calls == [(2, 10), (3, 10), (5, 10)]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(rows, rows_alone, rtol=1e-5, atol=1e-6)


def test_a_forward_not_marked_rowwise_is_called_once_per_part(toy):
    make_forward, params = toy
    objective = ob.forget_retain(ob.npo(0.1, chunk_size=CHUNK), ob.nll(chunk_size=CHUNK))
    unmarked = (lambda p: lambda **kw: make_forward(p)(**kw), params)
    assert not ob._rows.is_rowwise(unmarked[0](params))
    assert ob._rows.is_rowwise(make_forward(params))
    *_, calls = loss_and_grad(objective, unmarked, npo_batch())
    assert calls == [(2, 10), (3, 10)]


def test_a_forward_that_does_not_map_rows_to_rows_is_an_error(toy):
    make_forward, params = toy

    def first_rows(p):  # a forward that drops the stacked rows after the first two
        return ob.rowwise(lambda **kw: make_forward(p)(**{**kw, "input_ids": kw["input_ids"][:2],
                                                          "attention_mask": kw["attention_mask"][:2]}))  # fmt: skip

    objective = ob.forget_retain(ob.npo(0.1, chunk_size=CHUNK), ob.nll(chunk_size=CHUNK))
    with pytest.raises(ValueError, match="2.* rows for the 5 stacked rows.*one_call=False"):
        loss_and_grad(objective, (first_rows, params), npo_batch())
