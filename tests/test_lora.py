"""LoRA adapters (jaxunlearn.models.lora) and PEFT export/import (jaxunlearn.checkpoints.peft).

PEFT parity: a tiny random transformers Llama; our adapters exported in PEFT's format and
loaded with `peft.PeftModel.from_pretrained` give our logits; the merged model saved as a
Hugging Face directory gives them too. Training: only adapters move, through the library's
unchanged `make_step` (plain, GU's retain projection and HAMU with split gradients), and
GS-LoRA's penalty gradient matches torch autograd.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxunlearn import objectives, train, transforms
from jaxunlearn.checkpoints import peft as peft_io
from jaxunlearn.checkpoints import save_pretrained
from jaxunlearn.models import lora
from jaxunlearn.transforms import _group_sparse as gs

LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def hf_and_ours():
    import transformers
    from conftest import _nnx_twin, _tiny_hf_model

    hf = _tiny_hf_model(transformers.LlamaConfig(**LLAMA), seed=0)
    return hf, _nnx_twin(hf)


def _trained_like(model, seed=1, scale=0.3):
    """Random non-zero adapters (as after training), so that B @ A changes the logits."""
    rng = np.random.default_rng(seed)
    for m in lora.lora_modules(model).values():
        for var in (m.lora_a, m.lora_b):
            var.set_value(
                jnp.asarray(scale * rng.standard_normal(var.get_value().shape), jnp.float32)
            )
    return model


IDS = np.array([[1, 5, 9, 33, 2, 60, 7, 11], [4, 4, 17, 3, 50, 22, 8, 1]], np.int32)


def test_wrapped_model_starts_equal_and_only_adapters_are_params(hf_and_ours):
    _, model = hf_and_ours
    lm = lora.apply_lora(model, rank=4, alpha=8.0, targets=("q", "v", "down"))
    np.testing.assert_array_equal(lm(jnp.asarray(IDS)).logits, model(jnp.asarray(IDS)).logits)
    _, params, rest = train.split_model(lm)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert names == {
        f"layers.{i}.{m}.{w}"
        for i in range(2)
        for m in ("attn.q_proj", "attn.v_proj", "mlp.down_proj")
        for w in ("lora_a", "lora_b")
    }
    assert {type(v) for _, v in nnx.to_flat_state(rest)} == {lora.Frozen}
    # The original model is untouched (still all Params, no wrappers).
    assert not lora.is_lora(model)


def test_bad_target_lists_the_kernel_names(hf_and_ours):
    _, model = hf_and_ours
    with pytest.raises(ValueError, match=r"\['qkv'\] match no kernel.*'down_proj'.*'q_proj'"):
        lora.apply_lora(model, targets=("q", "qkv"))


def test_peft_loads_our_adapter_with_our_logits(hf_and_ours, tmp_path):
    import torch
    from peft import PeftModel

    hf, model = hf_and_ours
    lm = _trained_like(lora.apply_lora(model, rank=4, alpha=16.0))
    ours = np.asarray(lm(jnp.asarray(IDS)).logits)
    out = peft_io.save_peft_adapter(lm, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16.0
    assert set(config["target_modules"]) == {f"{n}_proj" for n in "qkvo"} | {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    import copy

    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()
        base = hf(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()
    assert np.abs(base - ours).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-5)

    # Independent merge: W[out, in] + (alpha / r) * B @ A with PEFT's tensors, in torch.
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        np.testing.assert_allclose(
            merged(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy(), ours, atol=2e-5
        )

    # Import: our reader puts the same adapters back on the base model.
    back = peft_io.load_peft_adapter(model, out, base_model_name_or_path="tiny")
    np.testing.assert_allclose(np.asarray(back(jnp.asarray(IDS)).logits), ours, atol=1e-6)

    # Keys with the adapter name (".default.weight") read the same; other keys are refused.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(out / "adapter_model.safetensors")
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, out / "adapter_model.safetensors", metadata={"format": "pt"})
    back = peft_io.load_peft_adapter(model, out)
    np.testing.assert_allclose(np.asarray(back(jnp.asarray(IDS)).logits), ours, atol=1e-6)
    save_file({"model.layers.0.q_proj.lora_A.weight": tensors[next(iter(tensors))]},
              out / "adapter_model.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match="'model.layers.0.q_proj.lora_A.weight' is not a PEFT"):
        peft_io.load_peft_adapter(model, out)


def test_merged_model_exports_as_hf_directory(hf_and_ours, tmp_path):
    import torch
    import transformers

    _, model = hf_and_ours
    lm = _trained_like(lora.apply_lora(model, rank=2, alpha=4.0, use_rslora=True), seed=3)
    ours = np.asarray(lm(jnp.asarray(IDS)).logits)
    merged = lora.merge_lora(lm)
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(IDS)).logits), ours, atol=2e-5)
    save_pretrained(merged, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-5)
    # rsLoRA: scaling alpha / sqrt(r), checked against the kernels directly.
    m = lora.lora_modules(lm)["layers.1.mlp.up_proj"]
    a, b = np.asarray(m.lora_a.get_value()), np.asarray(m.lora_b.get_value())
    np.testing.assert_allclose(
        np.asarray(merged.layers[1].mlp.up_proj.kernel.get_value()),
        np.asarray(model.layers[1].mlp.up_proj.kernel.get_value()) + 4.0 / np.sqrt(2) * a @ b,
        atol=1e-6,
    )


def test_adapter_for_another_base_model_is_refused(hf_and_ours, tmp_path):
    from jaxunlearn.models import ModelConfig, build_model

    _, model = hf_and_ours
    other = build_model(
        ModelConfig.from_hf_dict({"model_type": "llama", **LLAMA, "hidden_size": 16})
    )
    out = peft_io.save_peft_adapter(lora.apply_lora(other, rank=2), tmp_path / "other")
    with pytest.raises(
        ValueError, match="made for another base model: .*down_proj has lora_A .*maps 48 -> 32"
    ):
        peft_io.load_peft_adapter(model, out)
    deeper = build_model(
        ModelConfig.from_hf_dict({"model_type": "llama", **LLAMA, "num_hidden_layers": 3})
    )
    out = peft_io.save_peft_adapter(lora.apply_lora(deeper, rank=2), tmp_path / "deeper")
    with pytest.raises(ValueError, match="another base model.*layers.2.*2 layers"):
        peft_io.load_peft_adapter(model, out)
    same = peft_io.save_peft_adapter(
        lora.apply_lora(model, rank=2), tmp_path / "named", base_model_name_or_path="org/a"
    )
    with pytest.raises(ValueError, match="another base model, not 'org/b'"):
        peft_io.load_peft_adapter(model, same, base_model_name_or_path="org/b")


# ----------------------------------------------------------------------------- training


def _batch(seed=0, rows=4, t=12):
    rng = np.random.default_rng(seed)

    def part(offset):
        ids = rng.integers(3, 64, size=(rows, t)).astype(np.int32)
        labels = ids.copy()
        labels[:, : t // 2] = -100
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}

    return {"forget": part(0), "retain": part(1)}


@pytest.fixture(scope="module")
def one_layer_lora():
    from jaxunlearn.models import ModelConfig, build_model

    cfg = ModelConfig.from_hf_dict({"model_type": "llama", **LLAMA, "num_hidden_layers": 1})
    lm = lora.apply_lora(build_model(cfg), rank=4, alpha=8.0)
    # Non-zero B so that every adapter has a gradient from the first step.
    return _trained_like(lm, seed=5, scale=0.05)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("plain", marks=pytest.mark.slow),  # GS-LoRA penalty + Adam
        pytest.param("gu", marks=pytest.mark.slow),  # also in the unlearn test below
        pytest.param("hamu", marks=pytest.mark.slow),
    ],
)
def test_make_step_trains_only_adapters(one_layer_lora, kind):
    graphdef, params, rest = train.split_model(one_layer_lora)
    params = jax.tree.map(jnp.copy, params)  # the step donates them; the fixture is shared
    frozen_before = jax.tree.map(np.asarray, rest)
    objective = objectives.forget_retain(objectives.grad_ascent(), objectives.nll(), alpha=1.0)
    if kind == "gu":
        tx = optax.chain(transforms.retain_projection(rank=2), optax.sgd(1e-2))
    elif kind == "hamu":
        tx = transforms.hardness_aware(1e-2, 5e-3, stop_on_infeasible=False)
    else:
        tx = optax.chain(gs.group_sparse(1e-3), optax.adam(1e-2))
    step = train.make_step(graphdef, rest, objective, tx)  # GU / HAMU ask for retain_grads
    # The frozen base is an argument of the compiled step, not constants inside it.
    lowered = jax.jit(step.update_fn).lower(
        params, step.init(params), jax.device_put(_batch()), None, step.frozen
    )
    # (train.make_step embeds each base kernel as a dense<"0x..."> constant.)
    assert 'dense<"0x' not in lowered.as_text()
    start = jax.tree.map(jnp.copy, params)
    opt_state = step.init(params)
    new, opt_state, _, metrics = step(params, opt_state, jax.device_put(_batch()), None)
    assert float(metrics["finite"]) == 1.0
    moved = [
        float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(start))
    ]
    # HAMU may leave a tensor whose constrained problem has no room at zero (its case 1).
    assert (any if kind == "hamu" else all)(v > 0 for v in moved), moved
    assert all(np.isfinite(v) for v in moved)
    # The optimizer state holds adapter-sized tensors only, and the base never moved.
    n_adapter = sum(x.size for x in jax.tree.leaves(start))
    assert sum(x.size for x in jax.tree.leaves(opt_state)) < sum(
        x.size for x in jax.tree.leaves(rest)
    )
    assert 5 * n_adapter < sum(x.size for x in jax.tree.leaves(rest))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, rest), frozen_before)


def test_group_sparse_gradient_matches_torch():
    import torch

    rng = np.random.default_rng(0)
    params = {
        "layers": {
            0: {
                "q": {"lora_a": rng.standard_normal((3, 2)), "lora_b": rng.standard_normal((2, 3))}
            },
            1: {"q": {"lora_a": rng.standard_normal((3, 2)), "lora_b": np.zeros((2, 3))}},
        }
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    zero = {"layers": {1: {"q": {"lora_a": jnp.zeros((3, 2)), "lora_b": jnp.zeros((2, 3))}}}}
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), params)
    tx = gs.group_sparse(0.3)
    out, _ = tx.update(grads, tx.init(params), params)

    # torch: d/dtheta of 0.3 * sum over layers of the L2 norm of that layer's adapters.
    leaves = {
        (i, w): torch.tensor(np.asarray(params["layers"][i]["q"][w]), requires_grad=True)
        for i in (0, 1)
        for w in ("lora_a", "lora_b")
    }
    penalty = sum(
        0.3 * torch.sqrt(sum((leaves[(i, w)] ** 2).sum() for w in ("lora_a", "lora_b")))
        for i in (0, 1)
    )
    penalty.backward()
    for (i, w), t in leaves.items():
        np.testing.assert_allclose(
            np.asarray(out["layers"][i]["q"][w]), 0.5 + t.grad.numpy(), rtol=1e-5
        )
    np.testing.assert_allclose(
        float(gs.group_sparse_penalty(params, 0.3)), float(penalty.detach()), rtol=1e-6
    )
    # An all-zero group gets the zero subgradient (no NaN).
    out0, _ = tx.update(jax.tree.map(jnp.zeros_like, zero), tx.init(zero), zero)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(out0))


def test_unlearn_trains_adapters_only(one_layer_lora):
    from jaxunlearn.data import ForgetRetainSampler

    rng = np.random.default_rng(0)

    def examples(n):
        out = []
        for _ in range(n):
            ids = rng.integers(3, 64, size=12).astype(np.int32)
            labels = ids.copy()
            labels[:6] = -100
            out.append({"input_ids": ids, "labels": labels})
        return out

    data = ForgetRetainSampler(examples(8), examples(8), batch_size=4, seed=0, buckets=(16,))
    # GradDiff with GU's projection of the forget gradient, on adapter gradients.
    objective = objectives.forget_retain(objectives.grad_ascent(), objectives.nll())
    tx = optax.chain(transforms.retain_projection(rank=2), optax.adamw(1e-2))
    graphdef, params, rest = train.split_model(one_layer_lora)
    step = train.make_step(graphdef, rest, objective, tx)
    probe = jax.device_put(_batch())
    lowered = jax.jit(step.update_fn).lower(params, step.init(params), probe, None, step.frozen)
    assert 'dense<"0x' not in lowered.as_text()  # the base is an argument, not constants
    result = train.unlearn(one_layer_lora, objective, tx, data, steps=2, progress=False)
    before = nnx.state(one_layer_lora, lora.Frozen)
    after = nnx.state(result.model, lora.Frozen)
    jax.tree.map(np.testing.assert_array_equal, after, before)
    moved = jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max()),
        nnx.state(result.model, nnx.Param),
        nnx.state(one_layer_lora, nnx.Param),
    )
    assert min(jax.tree.leaves(moved)) > 0
    assert all(m["forget_grad_norm"] > 0 for m in result.metrics)  # split gradients ran
