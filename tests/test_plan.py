"""The planner: built-in configs, per-device bytes and FLOPs of the compiled step, bad input."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxunlearn import plan
from jaxunlearn.models import build_model

# Parameter counts of the published checkpoints (total elements of their safetensors
# weights; tied embeddings counted once).
PUBLISHED_PARAMETERS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "llama-2-7b": 6_738_415_616,
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
}

TINY = dict(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.mark.parametrize("name", list(plan.BUILTIN_MODELS))
def test_builtin_configs_have_the_published_parameter_counts(name):
    cfg = plan.builtin_config(name)
    abstract = nnx.eval_shape(lambda: build_model(cfg, scan_layers=True))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == PUBLISHED_PARAMETERS[name]


def test_builtin_config_details():
    one, eight = plan.builtin_config("llama-3.2-1b"), plan.builtin_config("llama-3.1-8b")
    assert one.tie_word_embeddings and not eight.tie_word_embeddings
    assert one.rope_scaling["factor"] == 32.0 and eight.rope_scaling["factor"] == 8.0
    assert one.rope_theta == eight.rope_theta == 500000.0
    qwen = plan.builtin_config("qwen2.5-7b")
    assert qwen.attention_bias and not qwen.attention_out_bias and qwen.sliding_window is None
    assert plan.builtin_config("mistral-7b-v0.3").head_dim == 128


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama-3.2-1b, llama-3.2-3b, llama-3.1-8b"):
        plan.resolve_config("llama-9000")


def test_bad_mesh_entries_and_model_axis_sizes_are_named():
    assert plan.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "model": 1}
    with pytest.raises(ValueError, match="'fsdb=8'"):
        plan.parse_mesh("fsdb=8")
    # Llama-3.2-1B: 32 heads, 8 KV heads, MLP 8192, vocab 128256 (= 2^8 * 501).
    with pytest.raises(ValueError, match=r"'model' has size 3.*num_attention_heads=32.*"
                       r"num_key_value_heads=8.*intermediate_size=8192"):  # fmt: skip
        plan.plan("llama-3.2-1b", mesh="model=3")
    with pytest.raises(ValueError, match=r"'model' has size 512.*vocab_size=128256"):
        plan.plan("llama-3.2-1b", mesh="fsdp=1,model=512")  # checked before devices are needed


def test_fsdp_size_that_divides_nothing_names_axis_and_shapes():
    shapes = {"w": jax.ShapeDtypeStruct((10, 30), np.float32)}
    with pytest.raises(ValueError, match=r"'fsdp' of size 4 divides no dimension.*\[10, 30\]"):
        plan._check_mesh({"data": 1, "fsdp": 4, "model": 1}, shapes)
    plan._check_mesh({"data": 1, "fsdp": 5, "model": 1}, shapes)  # 10 % 5 == 0: fine


def test_plan_bytes_match_the_model_and_optimizer(tiny_config):
    p32 = plan.plan(tiny_config, mesh="fsdp=1", batch=2, seq=16, precision="float32",
                    exact_flops=False)  # fmt: skip
    n = 256 * 64 * 2 + 3 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    assert p32.parameters == n
    assert p32.param_bytes == 4 * n
    # AdamW mu + nu in float32, plus small counters (clip + inject_hyperparams state)
    assert 8 * n <= p32.optimizer_bytes < 8 * n + 1024
    # NPO: forget + retain parts of 3 int32 [2, 16] arrays, reference log-probs precomputed
    assert p32.batch_bytes == 2 * 3 * 2 * 16 * 4 + 2 * 4
    assert p32.reference_bytes == 0 and p32.reference_parts == ()
    assert p32.peak_bytes >= p32.param_bytes + p32.optimizer_bytes + p32.temp_bytes
    assert all(p32.fits(a) for a in plan.ACCELERATORS) and plan.advice(p32, "t4-16gb") == []
    huge = dataclasses.replace(p32, peak_bytes=30 * 2**30)
    assert not huge.fits("t4-16gb") and huge.fits("h100-80gb")
    text = "\n".join(plan.advice(huge, "t4-16gb"))
    assert "short by 16.6 GiB" in text and "--mesh fsdp=2" in text and "--batch 1" in text


def _gradascent_setup(tiny_config, scan_layers, layers=None):
    from jaxunlearn import parallel, recipes

    cfg = plan.resolve_config(tiny_config)
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    m = parallel.mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    policy = parallel.precision_policy("bf16-params")
    kw = dict(rows=2, seq=16, remat="none", scan_layers=scan_layers, micro_batches=1)
    return cfg, recipes.recipe("gradascent"), m, policy, kw


@pytest.mark.slow  # three compiles (~20 s on a quiet 2-core machine)
def test_flops_count_every_layer_and_bf16_params_halve_bytes(tiny_config):
    """XLA counts a scanned body once; the plan extrapolates from 1- and 2-layer compiles
    to what the unrolled 3-layer step counts."""
    cfg, recipe, m, policy, kw = _gradascent_setup(tiny_config, scan_layers=False)
    s = plan._setup(cfg, recipe, m, policy, **kw)
    unrolled = plan._flops(plan._compile(s, m)[0])
    np.testing.assert_allclose(plan._layer_flops(cfg, recipe, m, policy, **kw), unrolled, rtol=0.01)
    n = plan.resolve_config(tiny_config)
    assert plan._per_device_bytes(s.params) == 2 * s.parameters  # bfloat16 parameters
    floats = [x for x in jax.tree.leaves(s.opt_state) if x.dtype.kind == "f" and x.ndim]
    assert {x.dtype for x in floats} == {np.dtype(np.float32)} and n.num_hidden_layers == 3


def test_command_simulates_the_mesh_devices(tiny_config, capfd):
    """`main` re-runs itself with 2 CPU devices; fsdp=2 halves the per-device state."""
    rc = plan.main(["--model", tiny_config, "--method", "gradascent", "--mesh", "fsdp=2",
                    "--batch", "1", "--seq", "16", "--precision", "float32", "--fast-flops",
                    "--json"])  # fmt: skip
    assert rc == 0
    p = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert p["mesh"] == {"data": 1, "fsdp": 2, "model": 1}
    assert p["param_bytes"] == 4 * p["parameters"] // 2
    assert p["fits"]["t4-16gb"]
    rc = plan.main(["--model", "gpt-5", "--fast-flops"])
    assert rc == 2 and "known" in capfd.readouterr().err


@pytest.mark.slow  # one more compile; the command test below covers LoRA + TP by default
def test_lora_plan_trains_adapters_only(tiny_config):
    """Adapters of rank r on q, k, v, o, gate, up, down: r * (in + out) per kernel."""
    r = 4
    p = plan.plan(tiny_config, method="gradascent", batch=1, seq=16, precision="bf16-params",
                  exact_flops=False, lora=r)  # fmt: skip
    per_layer = r * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert p.lora_rank == r and p.parameters == 3 * per_layer
    assert p.param_bytes == 2 * 3 * per_layer  # bfloat16 adapters
    assert 8 * 3 * per_layer <= p.optimizer_bytes < 8 * 3 * per_layer + 1024  # float32 moments
    base = 256 * 64 * 2 + 3 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    assert p.frozen_bytes == 2 * base  # the bfloat16 base is an argument, not trained
    assert "LoRA rank 4, base frozen" in plan.format_plan(p)


def test_command_plans_lora_with_tensor_parallelism(tiny_config, capfd):
    """`--mesh model=2 --lora 4` on 2 simulated devices: column-parallel kernels (q, k, v,
    gate, up) split lora_b along out, row-parallel ones (o, down) lora_a along in."""
    rc = plan.main(["--model", tiny_config, "--method", "gradascent", "--mesh", "model=2",
                    "--batch", "1", "--seq", "16", "--precision", "float32", "--fast-flops",
                    "--lora", "4", "--json"])  # fmt: skip
    assert rc == 0
    p = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    r = 4
    column = (64 + 64 // 2) + 2 * (64 + 32 // 2) + 2 * (64 + 128 // 2)  # q, k, v, gate, up
    row = (64 // 2 + 64) + (128 // 2 + 64)  # o, down
    assert p["mesh"] == {"data": 1, "fsdp": 1, "model": 2} and p["lora_rank"] == r
    assert p["param_bytes"] == 4 * 3 * r * (column + row)
    full_base = 4 * (256 * 64 * 2 + 3 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64)
    assert full_base // 2 < p["frozen_bytes"] < full_base  # split but for the norms
