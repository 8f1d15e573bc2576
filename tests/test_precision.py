"""Precision policies: bfloat16 logits of every port against transformers, float32 moments.

Tolerance for bfloat16 logits (stated once, used for every port): two bfloat16
implementations round at different places, so they agree only to a few bfloat16 ulps. At
the logit scale of these tiny models (|logit| <= ~4, where one ulp is 2^-6 = 0.016) we
require max |ours - torch| <= 0.03 * max |logit| (about 6 ulps) and a mean difference
<= 0.005 * max |logit|; and our error against the exact float32 model must be no more than
twice torch's own bfloat16 error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from test_models import ARCHS, hf_config, padded_batch, torch_forward

from jaxunlearn import objectives, parallel, train
from jaxunlearn.models import ModelConfig, build_model

MAX_REL, MEAN_REL = 0.03, 0.005


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_of_every_port_match_transformers_bf16(arch, tiny_hf_model, nnx_twin):
    torch_model = tiny_hf_model(hf_config(arch))
    ids, mask = padded_batch("left")
    real = mask == 1
    exact = torch_forward(torch_model, ids, mask).logits.numpy()[real]
    torch_bf16 = torch_model.to(torch.bfloat16)
    ref = torch_forward(torch_bf16, ids, mask).logits.float().numpy()[real]
    policy = parallel.precision_policy("bf16-params")
    model = nnx_twin(torch_bf16, **policy.model_kwargs())
    logits = model(jnp.asarray(ids), jnp.asarray(mask)).logits
    assert logits.dtype == jnp.bfloat16
    ours = np.asarray(logits, np.float32)[real]
    scale = np.abs(exact).max()
    assert scale > 1.0  # logits big enough for bf16 rounding to show
    diff = np.abs(ours - ref)
    assert diff.max() <= MAX_REL * scale, (diff.max(), scale)
    assert diff.mean() <= MEAN_REL * scale, (diff.mean(), scale)
    assert np.abs(ours - exact).max() <= 2 * np.abs(ref - exact).max()


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding", "gpt2"])
def test_bf16_compute_with_float32_master_weights(arch, tiny_hf_model, nnx_twin):
    """Policy "bf16": float32 parameters cast to bfloat16 where used; bf16 logits."""
    torch_model = tiny_hf_model(hf_config(arch))
    ids, mask = padded_batch("right")
    real = mask == 1
    exact = torch_forward(torch_model, ids, mask).logits.numpy()[real]
    policy = parallel.precision_policy("bf16")
    model = nnx_twin(torch_model, **policy.model_kwargs())
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    logits = model(jnp.asarray(ids), jnp.asarray(mask)).logits
    assert logits.dtype == jnp.bfloat16
    torch_err = np.abs(
        torch_forward(torch_model.to(torch.bfloat16), ids, mask).logits.float().numpy()[real]
        - exact
    )
    our_err = np.abs(np.asarray(logits, np.float32)[real] - exact)
    assert 0 < our_err.max() <= 2 * torch_err.max()


def test_policy_names_and_unknown_name():
    assert parallel.precision_policy("fp32") is parallel.PRECISIONS["float32"]
    assert parallel.precision_policy("BF16").param_dtype == jnp.float32
    p = parallel.precision_policy("bf16_params")
    assert (p.compute_dtype, p.param_dtype, p.moment_dtype) == (
        jnp.bfloat16,
        jnp.bfloat16,
        jnp.float32,
    )
    with pytest.raises(ValueError, match="float32, bf16, bf16-params"):
        parallel.precision_policy("fp8")


def _bf16(x):
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


def test_float32_moments_adam_matches_plain_numpy_adam():
    """bf16 params: moments float32, update added in float32 and rounded once to bf16."""
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    rng = np.random.RandomState(0)
    w0 = _bf16(rng.randn(5))
    grads = [_bf16(rng.randn(5)) for _ in range(3)]
    tx = parallel.float32_moments(optax.adam(lr, b1=b1, b2=b2, eps=eps))
    params = {"w": jnp.asarray(w0, jnp.bfloat16)}
    state = tx.init(params)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.float32)}
    w, mu, nu = w0.astype(np.float64), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads, 1):
        updates, state = tx.update({"w": jnp.asarray(g, jnp.bfloat16)}, state, params)
        params = optax.apply_updates(params, updates)
        assert params["w"].dtype == jnp.bfloat16
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        step = lr * (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
        w = _bf16(w - step)  # one rounding per update, from the exact float sum
        np.testing.assert_allclose(np.asarray(state[0].nu["w"]), nu, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(params["w"], np.float32), w)
    # optax's own mu_dtype leaves nu in the parameters' dtype: why the wrapper exists
    plain = optax.adam(lr, mu_dtype=jnp.float32).init({"w": jnp.zeros(5, jnp.bfloat16)})
    assert plain[0].nu["w"].dtype == jnp.bfloat16


def _tiny_llama_split(policy):
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )

    def build():
        return build_model(cfg, rngs=nnx.Rngs(0), **policy.model_kwargs())

    graphdef, _, rest = train.split_model(nnx.eval_shape(build))
    params = jax.jit(lambda: train.split_model(build())[1])()  # one compile, not op by op
    return graphdef, params, rest


def test_npo_step_with_bf16_params_and_float32_moments():
    """The real step: float32 loss, params stay bf16, moments float32, finite update.

    Uses optax.inject_hyperparams(adamw) as the recipes do: on bf16 parameters it would
    cast b2 = 0.999 to 1.0 (a NaN first update) were its state not kept in float32.
    ("bf16", float32 master weights, needs no optimizer change: checked below.)
    """
    inner = optax.adamw(1e-3)
    assert parallel.precision_policy("bf16").optimizer(inner) is inner
    policy = parallel.precision_policy("bf16-params")
    graphdef, params, rest = _tiny_llama_split(policy)
    objective = objectives.forget_retain(objectives.npo(beta=0.1), objectives.nll())
    tx = policy.optimizer(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2))
    step = train.make_step(graphdef, rest, objective, tx)
    opt_state = step.init(params)
    floating = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floating} == {jnp.dtype(jnp.float32)}
    rng = np.random.RandomState(0)

    def part():
        ids = rng.randint(0, 64, (2, 12)).astype(np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}

    batch = {"forget": {**part(), "ref_logprob": np.full(2, -40.0, np.float32)}, "retain": part()}
    before = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
    params, opt_state, _, metrics = step(params, opt_state, batch)
    assert float(metrics["finite"]) == 1.0 and metrics["loss"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(policy.param_dtype)}
    moved = [
        np.any(np.asarray(a, np.float32) != b) for a, b in zip(jax.tree.leaves(params), before)
    ]
    assert all(moved)
