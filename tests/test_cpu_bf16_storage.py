"""The uint16-bits layer scan and embedding gradient (`jaxunlearn.models.scan_bits`).

They change where XLA:CPU keeps bfloat16 values, never the numbers: outputs and gradients
equal the plain `jax.lax.scan` + `jax.checkpoint` path and `jnp.take`'s scatter-add (float32
to rounding; bfloat16 to 2 ulps of the gradient's scale, as two programs that round their
float32 sums at different places agree), and the Llama port with ``scan_bits=True`` has
transformers' parameter gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import assert_gradients_match_torch, hf_config, padded_batch

from jaxunlearn import train
from jaxunlearn.models import ModelConfig, build_model
from jaxunlearn.models.scan_bits import bits_scan, bits_take

jax.config.update("jax_default_matmul_precision", "highest")

L, D, F, N = 3, 16, 24, 6
BF16_ULPS = 2 * 2.0**-8  # two bfloat16 ulps (8 significand bits), relative to the scale


def _layer(p, h, consts, statics, flag):
    """A residual MLP block reading a constant, a mask and a per-layer flag."""
    (scale,) = consts
    w1, w2 = p["w1"], p["w2"]
    a = jax.nn.gelu((h * scale).astype(w1.dtype) @ w1)
    out = (a @ w2).astype(h.dtype)
    out = jnp.where(statics, out, 0.0) * jnp.where(flag, 0.5, 1.0)
    return h + out


def _toy(dtype):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": (jax.random.normal(k[0], (L, D, F)) * 0.3).astype(dtype),
        "w2": (jax.random.normal(k[1], (L, F, D)) * 0.3).astype(dtype),
    }
    h = jax.random.normal(k[2], (N, D))
    scale = 1.0 + 0.1 * jax.random.normal(k[3], (D,))
    mask = jnp.arange(N)[:, None] % 4 != 1
    flags = jnp.array([False, True, False])
    return params, h, (scale,), mask, flags


def _plain(params, h, consts, statics, flags):
    def body(h, xs):
        p, flag = xs
        return _layer(p, h, consts, statics, flag), None

    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(body, h, (params, flags))[0]


def _bits(params, h, consts, statics, flags):
    return bits_scan(_layer, params, h, consts, statics, flags)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bits_scan_equals_checkpointed_scan(dtype):
    params, h, consts, mask, flags = _toy(dtype)

    def loss(fn):
        def f(p, x, c):
            return jnp.sum(jnp.sin(fn(p, x, c, mask, flags).astype(jnp.float32)))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    (v_ref, g_ref), (v_got, g_got) = loss(_plain)(params, h, consts), loss(_bits)(params, h, consts)
    np.testing.assert_allclose(float(v_got), float(v_ref), rtol=1e-6)
    for (path, ref), got in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_got)):
        assert got.dtype == ref.dtype and got.shape == ref.shape, path
        ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
        tol = 1e-5 if dtype == jnp.float32 else BF16_ULPS
        np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max(), rtol=0, err_msg=path)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bits_take_gradient_sums_repeated_ids(dtype):
    rng = np.random.RandomState(0)
    table = jnp.asarray(rng.randn(11, 5), dtype)
    ids = np.array([[3, 7, 3, 0], [10, 3, 7, 7]])  # repeats, first and last row
    weights = rng.randn(2, 4, 5).astype(np.float32)

    def f(t):
        return jnp.sum(bits_take(t, jnp.asarray(ids)).astype(jnp.float32) * weights)

    np.testing.assert_array_equal(np.asarray(bits_take(table, ids)), np.asarray(table)[ids])
    got = jax.jit(jax.grad(f))(table)
    assert got.dtype == table.dtype
    # the cotangent reaching the lookup is in the table's dtype (the output's)
    rows = np.asarray(jnp.asarray(weights).astype(dtype).astype(jnp.float32), np.float64)
    ref = np.zeros((11, 5))
    np.add.at(ref, ids.reshape(-1), rows.reshape(-1, 5))  # gradient of a gather
    ref = np.asarray(jnp.asarray(ref, jnp.float32).astype(dtype).astype(jnp.float32))
    tol = 1e-6 if dtype == jnp.float32 else 2.0**-8
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=tol, atol=1e-6)


def _bits_twin(torch_model, dtype=jnp.float32):
    """`nnx_twin` of `torch_model` with stacked layers run by `bits_scan`."""
    from conftest import _nnx_twin

    cfg = ModelConfig.from_hf_dict(torch_model.config.to_dict())
    unrolled = _nnx_twin(torch_model, dtype=dtype, param_dtype=dtype)
    kw = dict(dtype=dtype, param_dtype=dtype, scan_layers=True, remat="full")
    plain = build_model(cfg, **kw)
    bits = build_model(cfg, scan_bits=True, **kw)
    flat = dict(nnx.to_flat_state(nnx.state(unrolled, nnx.Param)))
    for model in (plain, bits):
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            name = ".".join(map(str, path))
            if name.startswith("layers."):  # stack the per-layer values
                rest = name[len("layers.") :]
                per_layer = [
                    flat[("layers", i, *rest.split("."))] for i in range(cfg.num_hidden_layers)
                ]
                var[...] = jnp.stack([v[...] for v in per_layer])
            else:
                var[...] = flat[path][...]
    return plain, bits


@pytest.mark.parametrize(
    "arch", [pytest.param("mistral_sliding", marks=pytest.mark.slow), "llama_tied_llama3"]
)
def test_scan_bits_model_gradients_match_torch(arch, tiny_hf_model):
    """Sliding-window masks per layer and the tied embedding (bits_take + head) included."""
    torch_model = tiny_hf_model(hf_config(arch))
    _, model = _bits_twin(torch_model)
    ids, mask = padded_batch("right")
    labels = np.where(mask == 1, ids, -100)
    labels[:, 0] = -100
    assert_gradients_match_torch(torch_model, model, ids, mask, labels, scan_layers=True)


@pytest.mark.slow  # ~20 s on the shared CPU; the toy bf16 case above stays in the default suite
def test_scan_bits_bf16_gradients_equal_the_plain_scan(tiny_hf_model):
    plain, bits = _bits_twin(tiny_hf_model(hf_config("llama_tied_llama3")), jnp.bfloat16)
    ids, mask = (jnp.asarray(a) for a in padded_batch("left"))

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p):
            out = nnx.merge(graphdef, p, rest)(ids, mask)
            return jnp.sum(jax.nn.log_softmax(out.logits.astype(jnp.float32))[..., 5] * mask)

        return nnx.to_flat_state(jax.jit(jax.grad(f))(params))

    for (path, ref), (_, got) in zip(grads(plain), grads(bits)):
        ref, got = np.asarray(ref[...], np.float32), np.asarray(got[...], np.float32)
        tol = BF16_ULPS * np.abs(ref).max()
        np.testing.assert_allclose(got, ref, atol=tol, rtol=0, err_msg=str(path))


def test_scan_bits_removes_float32_weight_copies_on_cpu():
    """Compiled temporaries of the bf16 toy stack: the plain scan holds a float32 copy of
    both weight stacks (XLA:CPU float normalisation); the bits scan holds their uint16 bits
    (XLA:CPU materialises the bitcast), half as many bytes."""
    if jax.default_backend() != "cpu":
        pytest.skip("the float32 copies are an XLA:CPU artefact")
    depth, d, f = 4, 256, 1024
    params = {
        "w1": jax.ShapeDtypeStruct((depth, d, f), jnp.bfloat16),
        "w2": jax.ShapeDtypeStruct((depth, f, d), jnp.bfloat16),
    }
    h = jax.ShapeDtypeStruct((32, d), jnp.float32)
    consts = (jax.ShapeDtypeStruct((d,), jnp.float32),)
    mask = jax.ShapeDtypeStruct((32, 1), jnp.bool_)
    flags = jax.ShapeDtypeStruct((depth,), jnp.bool_)

    def temp(fn):
        def f(p, x, c, m, fl):
            return jnp.sum(fn(p, x, c, m, fl) ** 2)

        lowered = jax.jit(jax.grad(f)).lower(params, h, consts, mask, flags)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    float32_stack = 2 * depth * d * f * 4
    plain, bits = temp(_plain), temp(_bits)
    assert plain - bits >= float32_stack // 2, (plain, bits)


def test_scan_bits_needs_scanned_fully_rematerialised_layers():
    cfg = ModelConfig.from_hf_dict(hf_config("llama").to_dict())
    with pytest.raises(ValueError, match="scan_bits=True needs scan_layers=True and remat='full'"):
        build_model(cfg, scan_bits=True, scan_layers=True, remat="matmuls")
    with pytest.raises(ValueError, match="scan_bits"):
        build_model(cfg, scan_bits=True)
    with pytest.raises(ValueError, match="'gpt2' never stacks its layers"):
        build_model(ModelConfig.from_hf_dict(hf_config("gpt2").to_dict()), scan_bits=True)


def test_step_guard_skips_a_non_finite_update_in_place():
    """The step's guard is a conditional: a non-finite loss leaves parameters and moments
    exactly as they were, a finite one applies optax's update."""
    import optax

    from jaxunlearn import objectives

    cfg = ModelConfig.from_hf_dict(hf_config("llama").to_dict())
    model = build_model(cfg, scan_layers=True, remat="full", scan_bits=True)
    graphdef, params, rest = train.split_model(model)
    objective = objectives.forget_retain(objectives.grad_ascent(), objectives.nll())
    step = train.make_step(graphdef, rest, objective, optax.adam(1e-2))

    def part(side, seed):
        ids, mask = padded_batch(side, seed)
        return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
                "labels": jnp.asarray(np.where(mask == 1, ids, -100))}  # fmt: skip

    batch = {"forget": part("right", 0), "retain": part("left", 1)}
    opt_state, state = step.init(params), train.init_objective_state(objective)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 (the step donates)
    new_params, _, _, metrics = step(copy(params), copy(opt_state), batch, state)
    assert float(metrics["finite"]) == 1.0
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_params, params)
    assert all(jax.tree.leaves(changed))
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params)
    out_params, out_opt, _, metrics = step(copy(bad), copy(opt_state), batch, state)
    assert float(metrics["finite"]) == 0.0
    for a, b in zip(jax.tree.leaves((out_params, out_opt)), jax.tree.leaves((bad, opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_plan_with_scan_bits_has_smaller_temporaries(tmp_path):
    """`jaxunlearn plan --scan-bits`: same parameter and moment bytes, fewer temporaries
    (bf16 params, remat full, XLA:CPU)."""
    import json

    from jaxunlearn import plan

    if jax.default_backend() != "cpu":
        pytest.skip("the float32 copies are an XLA:CPU artefact")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(
        model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=1024,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True,
    )))  # fmt: skip
    kw = dict(batch=2, seq=32, precision="bf16-params", remat="full", exact_flops=False)
    plain = plan.plan(str(path), **kw)
    bits = plan.plan(str(path), scan_bits=True, **kw)
    assert bits.scan_bits and not plain.scan_bits
    assert (bits.param_bytes, bits.optimizer_bytes) == (plain.param_bytes, plain.optimizer_bytes)
    assert bits.temp_bytes < plain.temp_bytes, (bits.temp_bytes, plain.temp_bytes)
    with pytest.raises(ValueError, match="remat='full'"):
        plan.plan(str(path), scan_bits=True, **{**kw, "remat": "matmuls"})


def test_memory_scheduling_keeps_one_clipped_gradient_alive():
    """XLA:CPU's default scheduler computes every leaf's clipped float32 gradient before any
    moment is written (all alive at once); `CPU_MEMORY_SCHEDULING` finishes one leaf first."""
    import optax

    from jaxunlearn.parallel import float32_moments
    from jaxunlearn.train.step import CPU_MEMORY_SCHEDULING

    if jax.default_backend() != "cpu":
        pytest.skip("an XLA:CPU scheduler option")
    leaves, shape = 3, (4, 128, 512)
    params = {f"w{i}": jax.ShapeDtypeStruct(shape, jnp.bfloat16) for i in range(leaves)}
    tx = float32_moments(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))
    state = jax.eval_shape(tx.init, params)

    def update(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def temp(options):
        jitted = jax.jit(update, donate_argnums=(0, 1), compiler_options=options)
        return jitted.lower(params, state, params).compile().memory_analysis().temp_size_in_bytes

    one_leaf = int(np.prod(shape)) * 4
    assert temp(None) >= leaves * one_leaf  # the default: every clipped gradient at once
    assert temp(CPU_MEMORY_SCHEDULING) < 2 * one_leaf


def test_step_compiler_options_reach_xla_and_keep_the_numbers():
    import optax

    from jaxunlearn import objectives
    from jaxunlearn.train.step import CPU_MEMORY_SCHEDULING

    cfg = ModelConfig.from_hf_dict(hf_config("llama").to_dict())
    model = build_model(cfg, scan_layers=True, remat="full", scan_bits=True)
    graphdef, params, rest = train.split_model(model)
    objective = objectives.forget_retain(objectives.grad_ascent(), objectives.nll())
    ids, mask = padded_batch("right", 0)
    part = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(np.where(mask == 1, ids, -100))}  # fmt: skip
    batch = {"forget": part, "retain": {**part, "labels": part["labels"][:, ::-1]}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 (the step donates)
    results = []
    for options in (None, CPU_MEMORY_SCHEDULING):
        step = train.make_step(graphdef, rest, objective, tx, compiler_options=options)
        assert step.compiler_options == (None if options is None else dict(options))
        out = step(copy(params), step.init(params), batch)
        results.append(jax.tree.map(np.asarray, out[:2]))
        assert float(out[3]["finite"]) == 1.0
    for a, b in zip(*map(jax.tree.leaves, results), strict=True):
        np.testing.assert_array_equal(a, b)  # a schedule changes no number
    bad = train.make_step(graphdef, rest, objective, tx,
                          compiler_options={"xla_cpu_scheduler_type": "NO_SUCH_SCHEDULER"})  # fmt: skip
    if jax.default_backend() == "cpu":
        with pytest.raises(Exception, match="xla_cpu_scheduler_type"):
            bad(copy(params), bad.init(params), batch)
