"""Tensor parallelism over the mesh's "model" axis (jaxunlearn.parallel_rules).

The rules are checked tensor by tensor against the Megatron layout written out here; then,
on 8 simulated CPU devices in a subprocess, the same NPO + AdamW run (5 steps) on meshes
(fsdp 2, model 4) and (data 2, fsdp 2, model 2) must give the one-device parameters to 1e-5
relative, with the parameters really split over "model".
"""

import _multidevice
import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxunlearn import parallel_rules
from jaxunlearn.models import ModelConfig


def spec(path, shape, model=4, fsdp=2, strict=True):
    return parallel_rules.tensor_spec(path.split("."), shape, model, fsdp, strict=strict)


def test_megatron_layout():
    # Column-parallel: output features (whole heads, MLP hidden) on "model".
    assert spec("layers.0.attn.q_proj.kernel", (32, 64)) == P("fsdp", "model")
    assert spec("layers.0.attn.k_proj.bias", (16,)) == P("model")
    assert spec("layers.0.mlp.up_proj.kernel", (32, 128)) == P("fsdp", "model")
    # Row-parallel: input features on "model".
    assert spec("layers.0.attn.o_proj.kernel", (64, 32)) == P("model", "fsdp")
    assert spec("layers.0.mlp.down_proj.kernel", (128, 32)) == P("model", "fsdp")
    assert spec("layers.0.attn.o_proj.bias", (32,)) == P("fsdp")
    # Vocabulary-parallel embedding and head.
    assert spec("embed_tokens.embedding", (64, 32)) == P("model", "fsdp")
    assert spec("lm_head.kernel", (32, 64)) == P("fsdp", "model")
    # Norms: FSDP only. Stacked layers: the leading axis stays whole.
    assert spec("layers.0.input_layernorm.scale", (32,)) == P("fsdp")
    assert spec("layers.attn.q_proj.kernel", (3, 32, 64)) == P(None, "fsdp", "model")
    # LoRA follows its kernel; optimizer-state prefixes and nnx's "value" are ignored.
    assert spec("0.mu.layers.0.attn.q_proj.lora_b.value", (4, 64), fsdp=1) == P(None, "model")
    assert spec("layers.0.mlp.down_proj.lora_a", (128, 4), fsdp=1) == P("model", None)
    assert spec("layers.0.mlp.down_proj.base.kernel", (128, 32)) == P("model", "fsdp")
    # model = 1: plain FSDP.
    assert spec("layers.0.attn.q_proj.kernel", (32, 64), model=1) == P(None, "fsdp")


def test_bad_model_axis_names_the_axis_and_sizes():
    with pytest.raises(ValueError, match=r"'model' of size 3 .* layers.0.attn.q_proj.kernel"):
        spec("layers.0.attn.q_proj.kernel", (32, 64), model=3)
    # Not strict (a transform's state shaped unlike the parameter): FSDP only.
    assert spec("layers.0.attn.q_proj.kernel", (32, 64), model=3, strict=False) == P(None, "fsdp")
    cfg = ModelConfig.from_hf_dict({
        "model_type": "llama", "vocab_size": 62, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2,
    })  # fmt: skip
    mesh = jax.sharding.AbstractMesh((1, 2, 4), ("data", "fsdp", "model"))
    with pytest.raises(
        ValueError, match=r"'model' has size 4.*num_key_value_heads=2, vocab_size=62"
    ):
        parallel_rules.check_model_axis(cfg, mesh)


BODY = """
    import optax
    from jax.sharding import PartitionSpec as P
    from jaxunlearn import objectives, parallel, parallel_rules, train
    from jaxunlearn.data import ForgetRetainSampler

    assert jax.device_count() == 8
    model = tiny_model(heads=4, kv_heads=4)
    forget, retain = examples(16, 1), examples(24, 2)

    # What the driver will do once param_sharding knows the "model" axis (optimizer states
    # go through the same function, non-strict).

    def run(mesh):
        data = ForgetRetainSampler(forget, retain, batch_size=8, seed=3, buckets=(16,))
        pair = objectives.forget_retain(objectives.npo(beta=0.1), objectives.nll())
        tx = optax.adamw(1e-3, weight_decay=0.01)
        return train.unlearn(model, pair, tx, data, steps=5, mesh=mesh, progress=False)

    base = run(None)
    expected = flat_params(base.model)
    for data_size, fsdp, tp in MESHES:
        mesh = parallel.mesh(data=data_size, fsdp=fsdp, model=tp)
        parallel_rules.check_model_axis(model.config, mesh)
        parallel_rules.param_sharding(nnx.state(model, nnx.Param), mesh)  # strict: no error
        result = run(mesh)
        got = flat_params(result.model)
        err = rel_err(got, expected)
        assert err <= 1e-5, (data_size, fsdp, tp, err)
        np.testing.assert_allclose(
            [m["loss"] for m in result.metrics], [m["loss"] for m in base.metrics], rtol=1e-5
        )
        layer = result.model.layers[0]
        specs = {
            "q": layer.attn.q_proj.kernel.get_value().sharding.spec,
            "o": layer.attn.o_proj.kernel.get_value().sharding.spec,
            "head": result.model.lm_head.kernel.get_value().sharding.spec,
        }
        assert specs == {"q": P("fsdp", "model"), "o": P("model", "fsdp"),
                         "head": P("fsdp", "model")}, specs
        print("ok", data_size, fsdp, tp, err)
"""


@pytest.mark.parametrize(
    "meshes",
    [
        [(1, 2, 4)],
        pytest.param([(1, 2, 4), (2, 2, 2)], marks=pytest.mark.slow),
    ],
)
def test_tensor_parallel_matches_one_device(meshes):
    code = _multidevice.script(8, f"    MESHES = {meshes!r}\n" + BODY)
    proc = _multidevice.run(code, timeout=600)
    assert proc.returncode == 0, _multidevice.failure(proc)
    assert proc.stdout.count("ok ") == len(meshes), proc.stdout


LORA_BODY = """
    import optax
    from jaxunlearn import objectives, parallel, parallel_rules, train
    from jaxunlearn.data import ForgetRetainSampler
    from jaxunlearn.models import lora

    model = lora.apply_lora(tiny_model(heads=4, kv_heads=4), rank=4, alpha=8.0)
    forget, retain = examples(16, 1), examples(24, 2)

    def run(mesh):
        data = ForgetRetainSampler(forget, retain, batch_size=8, seed=3, buckets=(16,))
        pair = objectives.forget_retain(objectives.grad_ascent(), objectives.nll())
        tx = optax.adamw(1e-2)
        return train.unlearn(model, pair, tx, data, steps=5, mesh=mesh, progress=False)

    expected = flat_params(run(None).model)
    result = run(parallel.mesh(data=1, fsdp=2, model=4))
    err = rel_err(flat_params(result.model), expected)
    assert err <= 1e-5, err
    q = result.model.layers[0].attn.q_proj
    assert "model" in tuple(q.lora_b.get_value().sharding.spec)
    print("ok lora", err)
"""


@pytest.mark.slow
def test_lora_under_tensor_parallelism_matches_one_device():
    proc = _multidevice.run(_multidevice.script(8, LORA_BODY), timeout=600)
    assert proc.returncode == 0, _multidevice.failure(proc)
    assert "ok lora" in proc.stdout
