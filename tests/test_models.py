"""Logit parity of the NNX model ports with torch `transformers` on tiny random models.

Matmuls run at "highest" precision so float32 results are comparable to torch on any
backend (on CPU this is already the default; on GPU it turns off TF32).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxunlearn.models import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    build_model,
    hf_param_map,
)
from jaxunlearn.models.layers import rope_inv_freq

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB, T = 128, 12
_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,  # larger than HF's 0.02 so logits are O(1) and errors show
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # tiny context so all three llama3 frequency bands occur with head_dim 16
    "original_max_position_embeddings": 64,
}


def hf_config(arch: str):
    """Tiny transformers-5 configs covering every architecture switch."""
    if arch == "llama":
        return transformers.LlamaConfig(**_SMALL)
    if arch == "llama_tied_llama3":
        return transformers.LlamaConfig(
            **_SMALL, tie_word_embeddings=True, rope_theta=5000.0, rope_scaling=_LLAMA3_ROPE
        )
    if arch == "llama_linear_bias":
        return transformers.LlamaConfig(
            **_SMALL,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            attention_bias=True,
            mlp_bias=True,
        )
    if arch == "mistral_sliding":
        return transformers.MistralConfig(**_SMALL, sliding_window=5)  # window < T: it bites
    if arch == "qwen2":
        return transformers.Qwen2Config(**_SMALL, rope_theta=1e6)
    if arch == "qwen3":
        # explicit head_dim (24) != hidden / heads (16), as in real Qwen3 checkpoints
        return transformers.Qwen3Config(**_SMALL, head_dim=24, tie_word_embeddings=True)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(arch)


ARCHS = [
    "llama",
    "llama_tied_llama3",
    "llama_linear_bias",
    "mistral_sliding",
    "qwen2",
    "qwen3",
    "gpt2",
]


def padded_batch(side: str, seed: int = 0):
    """3 rows of length T with 0, 3 and 7 padding tokens on `side`."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, size=(3, T))
    mask = np.ones((3, T), np.int64)
    for row, n_pad in enumerate((0, 3, 7)):
        if n_pad:
            mask[row, :n_pad] = 0 if side == "left" else 1
            if side == "right":
                mask[row, T - n_pad :] = 0
    ids = np.where(mask == 1, ids, 0)  # pad token 0
    return ids, mask


def torch_forward(torch_model, ids, mask, **kw):
    with torch.no_grad():
        return torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_float32(arch, side, tiny_hf_model, nnx_twin):
    torch_model = tiny_hf_model(hf_config(arch))
    model = nnx_twin(torch_model)
    ids, mask = padded_batch(side)
    ref = torch_forward(torch_model, ids, mask).logits.numpy()
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    logits = np.asarray(out.logits)
    assert logits.shape == ref.shape == (3, T, VOCAB)
    real = mask == 1  # padded positions are garbage on both sides
    assert np.abs(ref[real]).max() > 0.5  # logits are not vanishingly small
    np.testing.assert_allclose(logits[real], ref[real], atol=1e-4, rtol=0)
    # the padding rows themselves must be finite (fully masked queries give no NaN)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_explicit_position_ids_match_hf(arch, tiny_hf_model, nnx_twin):
    """generate's positions (cumsum(mask) - 1 on left-padded rows) match HF too."""
    torch_model = tiny_hf_model(hf_config(arch))
    model = nnx_twin(torch_model)
    ids, mask = padded_batch("left")
    pos = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0)
    ref = torch_forward(torch_model, ids, mask, position_ids=torch.tensor(pos)).logits.numpy()
    out = model(jnp.asarray(ids), jnp.asarray(mask), position_ids=jnp.asarray(pos))
    real = mask == 1
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref[real], atol=1e-4, rtol=0)
    if arch == "gpt2":
        # Learned absolute positions: the default 0..T-1 gives other logits on padded rows.
        # (RoPE is shift invariant, so for the Llama family both choices agree.)
        default = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
        assert np.abs(default[1:][real[1:]] - ref[1:][real[1:]]).max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hidden_layers_and_head_match_hf_hidden_states(arch, tiny_hf_model, nnx_twin):
    torch_model = tiny_hf_model(hf_config(arch))
    model = nnx_twin(torch_model)
    ids, mask = padded_batch("right")
    ref = torch_forward(torch_model, ids, mask, output_hidden_states=True)
    out = model(jnp.asarray(ids), jnp.asarray(mask), hidden_layers=(0, 1), return_logits=False)
    real = mask == 1
    assert out.logits is None and set(out.hidden_states) == {0, 1}
    # Layer 0's output is HF hidden_states[1]; HF's *last* entry is the final-normed state,
    # which is what out.head.hidden holds.
    np.testing.assert_allclose(
        np.asarray(out.hidden_states[0])[real], ref.hidden_states[1].numpy()[real], atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(out.head.hidden)[real], ref.hidden_states[-1].numpy()[real], atol=1e-4
    )
    final_norm = model.norm if arch == "llama" else model.ln_f
    np.testing.assert_allclose(
        np.asarray(final_norm(out.hidden_states[1]))[real],
        ref.hidden_states[-1].numpy()[real],
        atol=1e-4,
    )
    logits = np.asarray(out.head.hidden @ out.head.kernel)
    assert out.head.kernel.shape == (64, VOCAB)
    np.testing.assert_allclose(logits[real], ref.logits.numpy()[real], atol=1e-4)


@pytest.mark.parametrize("arch", ["llama_tied_llama3", "qwen2", "gpt2"])
def test_bfloat16_params_as_accurate_as_torch_bfloat16(arch, tiny_hf_model, nnx_twin):
    """bf16 params and compute: our error vs the f32 reference is no worse than torch's.

    Two bf16 implementations round at different places (matmul accumulation, where casts
    happen), so they cannot agree bit for bit; the fair test is that our bf16 port is as
    close to the exact (f32) model as torch's own bf16 model is.
    """
    torch_model = tiny_hf_model(hf_config(arch))
    ids, mask = padded_batch("left")
    real = mask == 1
    exact = torch_forward(torch_model, ids, mask).logits.numpy()[real]
    torch_bf16 = torch_model.to(torch.bfloat16)
    torch_err = np.abs(torch_forward(torch_bf16, ids, mask).logits.float().numpy()[real] - exact)
    model = nnx_twin(torch_bf16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = nnx.state(model, nnx.Param)
    assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    assert out.logits.dtype == jnp.bfloat16
    our_err = np.abs(np.asarray(out.logits, np.float32)[real] - exact)
    assert torch_err.max() > 0  # bf16 really is lossy here, so the comparison means something
    assert our_err.max() <= 2 * torch_err.max()
    assert our_err.mean() <= 2 * torch_err.mean()


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_param_map_covers_state_and_checkpoint(arch, tiny_hf_model):
    torch_model = tiny_hf_model(hf_config(arch))
    cfg = ModelConfig.from_hf_dict(torch_model.config.to_dict())
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    flat = dict(
        (".".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    )
    param_map = hf_param_map(cfg)
    assert set(flat) == set(param_map)
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    for name, spec in param_map.items():
        hf_shape = shapes[spec.key]
        assert (hf_shape[::-1] if spec.transpose else hf_shape) == flat[name].shape, name
    # every HF tensor is used, except the tied lm_head (a view of the embedding)
    unused = set(shapes) - {s.key for s in param_map.values()}
    assert unused == ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert ("lm_head.kernel" in param_map) == (not cfg.tie_word_embeddings)


def test_split_merge_under_jax_jit_matches_eager(tiny_hf_model, nnx_twin):
    model = nnx_twin(tiny_hf_model(hf_config("qwen3")))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, mask = padded_batch("left")

    @jax.jit
    def forward(params, ids, mask):
        return nnx.merge(graphdef, params, rest)(ids, mask).logits

    np.testing.assert_allclose(
        np.asarray(forward(params, ids, mask)),
        np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits),
        atol=1e-5,
    )


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", **{k: v for k, v in _LLAMA3_ROPE.items() if k != "rope_type"}},
        {"rope_type": "linear", "factor": 2.5},
    ],
)
def test_rope_inv_freq_matches_transformers(rope):
    hf = transformers.LlamaConfig(**_SMALL, rope_theta=5e5, rope_scaling=dict(rope))
    ref, scaling = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    assert scaling == 1.0
    np.testing.assert_allclose(
        rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), ref.numpy(), rtol=1e-6
    )


# A Llama 3.2 style config.json as published (transformers 4 spelling).
_V4_LLAMA32 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "vocab_size": 128256,
}


def test_transformers4_and_5_spellings_parse_to_the_same_config():
    v4 = ModelConfig.from_hf_dict(_V4_LLAMA32)
    v5 = ModelConfig.from_hf_dict(transformers.LlamaConfig.from_dict(_V4_LLAMA32).to_dict())
    assert v4 == v5
    assert v4.rope_theta == 500000.0 and v4.rope_scaling["rope_type"] == "llama3"
    assert v4.rope_scaling["factor"] == 32.0 and v4.head_dim == 64
    assert v4.eos_token_id == (128001, 128008, 128009) and v4.dtype == "bfloat16"
    assert v4.tie_word_embeddings and v4.num_key_value_heads == 8
    # legacy {"type": ...} key and a v5 rope_parameters dict
    legacy = dict(
        _SMALL, model_type="llama", rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}
    )
    v5_dict = dict(
        _SMALL,
        model_type="llama",
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    )
    assert ModelConfig.from_hf_dict(legacy) == ModelConfig.from_hf_dict(v5_dict)
    assert ModelConfig.from_hf_dict(legacy).rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_qwen2_sliding_window_layer_types_follow_transformers():
    d = dict(
        _SMALL, model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    cfg = ModelConfig.from_hf_dict(d)
    hf = transformers.Qwen2Config.from_dict(d)
    assert cfg.layer_types == tuple(hf.layer_types) == ("full_attention", "sliding_attention")
    assert [cfg.is_sliding(i) for i in range(2)] == [False, True]
    assert ModelConfig.from_hf_dict(dict(d, use_sliding_window=False)).sliding_window is None


@pytest.mark.parametrize("arch", ARCHS)
def test_to_hf_dict_round_trips_through_autoconfig(arch, tmp_path):
    original = hf_config(arch)
    cfg = ModelConfig.from_hf_dict(original.to_dict())
    exported = cfg.to_hf_dict(dtype="bfloat16")
    assert exported["model_type"] == cfg.model_type and exported["dtype"] == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(exported))
    rebuilt = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(rebuilt) is type(original)
    assert rebuilt.architectures == exported["architectures"]
    assert ModelConfig.from_hf_dict(rebuilt.to_dict()) == dataclasses.replace(cfg, dtype="bfloat16")
    # the rebuilt config gives a torch model with identical parameter names and shapes
    with torch.device("meta"):
        a = transformers.AutoModelForCausalLM.from_config(original)
        b = transformers.AutoModelForCausalLM.from_config(rebuilt)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_unsupported_inputs_raise_clear_errors():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_dict({"model_type": "gemma3"}, source="ckpt/config.json")
    msg = str(e.value)
    assert "gemma3" in msg and "ckpt/config.json" in msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES)
    yarn = dict(_SMALL, model_type="qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf_dict(yarn)
    dynamic = dict(_SMALL, model_type="llama", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        ModelConfig.from_hf_dict(dynamic)
    cfg = ModelConfig.from_hf_dict(dict(_SMALL, model_type="llama"))
    with pytest.raises(ValueError, match="hidden_layers"):
        build_model(cfg)(jnp.zeros((1, 2), jnp.int32), hidden_layers=(2,))


def _both_gradients(torch_model, model, ids, mask, labels):
    """Parameter gradients of the mean next-token NLL: torch autograd (by HF name) and ours
    (flat NNX state), the loss written out plainly on each side."""
    out = torch_model(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)
    )
    out.loss.backward()
    torch_grads = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lab = jnp.asarray(labels)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest)(jnp.asarray(ids), jnp.asarray(mask)).logits
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        tgt = lab[:, 1:]
        valid = tgt != -100
        nll = -jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], -1)[..., 0]
        return jnp.sum(nll * valid) / jnp.sum(valid)

    return torch_grads, nnx.to_flat_state(jax.jit(jax.grad(loss_fn))(params))


def assert_gradients_match_torch(torch_model, model, ids, mask, labels, *, scan_layers=None):
    """`_both_gradients`, compared per HF tensor (stacked layers split) to 1e-4 of its scale."""
    torch_grads, grads = _both_gradients(torch_model, model, ids, mask, labels)
    scan_layers = model.scan_layers if scan_layers is None else scan_layers
    mapping = hf_param_map(model.config, scan_layers=scan_layers)
    for path, g in grads:
        spec = mapping[".".join(map(str, path))]
        got = np.asarray(g[...])
        layers = [got] if spec.layers is None else list(got)
        for key, value in zip(spec.keys(), layers):
            ref = torch_grads[key].T if spec.transpose else torch_grads[key]
            scale = max(np.abs(ref).max(), 1e-8)
            np.testing.assert_allclose(value, ref, atol=1e-4 * scale, rtol=0, err_msg=key)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_gradients_match_torch(arch, tiny_hf_model, nnx_twin):
    """The backward pass (custom JVPs in models/layers.py) equals torch autograd."""
    torch_model = tiny_hf_model(hf_config(arch))
    model = nnx_twin(torch_model)
    ids, mask = padded_batch("right")
    # score a token only where it and the token before it are real, so padding rows
    # (computed differently by the two libraries) never reach the loss
    scored = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    labels = np.where(np.concatenate([np.zeros((3, 1), bool), scored], 1), ids, -100)

    torch_grads, grads = _both_gradients(torch_model, model, ids, mask, labels)
    mapping = hf_param_map(model.config)
    checked = 0
    for path, g in grads:
        spec = mapping[".".join(map(str, path))]
        ref = torch_grads[spec.key]
        ref = ref.T if spec.transpose else ref
        got = np.asarray(g[...] if hasattr(g, "__getitem__") else g)
        scale = max(np.abs(ref).max(), 1e-8)
        np.testing.assert_allclose(got, ref, atol=1e-4 * scale, rtol=0, err_msg=spec.key)
        checked += 1
    assert checked == len(mapping)


def test_forward_mode_jvp_matches_finite_difference(tiny_hf_model, nnx_twin):
    """Forward-mode autodiff (jax.jvp, used by Hessian-vector products) stays correct."""
    model = nnx_twin(tiny_hf_model(hf_config("llama")))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, mask = padded_batch("left")

    def f(p):
        return nnx.merge(graphdef, p, rest)(jnp.asarray(ids), jnp.asarray(mask)).logits.sum()

    tangent = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
    _, jvp = jax.jvp(f, (params,), (tangent,))
    eps = 1e-3
    plus = f(jax.tree.map(lambda x, t: x + eps * t, params, tangent))
    minus = f(jax.tree.map(lambda x, t: x - eps * t, params, tangent))
    fd = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(float(jvp), float(fd), rtol=2e-2)


# ---------------------------------------------------------------------------- scale options
# Stacked + scanned layers, rematerialisation and the jax.nn attention path must give the
# same logits and gradients as transformers; they change memory and compile time only.


def _load_twin(torch_model, tmp_path, **options):
    from jaxunlearn.checkpoints.hf import load_pretrained

    torch_model.save_pretrained(tmp_path)
    return load_pretrained(tmp_path, **options)


_OPTIONS = {
    "scan": dict(scan_layers=True),
    "scan_remat_full": dict(scan_layers=True, remat="full"),
    "remat_matmuls": dict(remat="matmuls"),
    "jax_attention": dict(attention="dot_product_attention"),
    "scan_jax_attention": dict(scan_layers=True, attention="dot_product_attention"),
}


@pytest.mark.parametrize(
    "arch,option",
    [("llama_tied_llama3", "scan"), ("mistral_sliding", "scan_remat_full"),
     ("qwen3", "scan_jax_attention"), ("mistral_sliding", "jax_attention"),
     ("llama_linear_bias", "remat_matmuls")],
)  # fmt: skip
def test_scale_options_keep_logits_and_hidden_states(arch, option, tiny_hf_model, tmp_path):
    torch_model = tiny_hf_model(hf_config(arch))
    model = _load_twin(torch_model, tmp_path, **_OPTIONS[option])
    ids, mask = padded_batch("left")
    ref = torch_forward(torch_model, ids, mask, output_hidden_states=True)
    out = model(jnp.asarray(ids), jnp.asarray(mask), hidden_layers=(0,))
    real = mask == 1
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref.logits.numpy()[real], atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(out.hidden_states[0])[real], ref.hidden_states[1].numpy()[real], atol=1e-4
    )


@pytest.mark.parametrize(
    "arch,option",
    [("mistral_sliding", "scan_remat_full"), ("qwen2", "scan_jax_attention"),
     ("gpt2", "remat_matmuls"), ("gpt2", "jax_attention")],
)  # fmt: skip
def test_scale_options_keep_parameter_gradients(arch, option, tiny_hf_model, tmp_path):
    """Gradients through scan + remat and jax.nn attention equal torch autograd."""
    torch_model = tiny_hf_model(hf_config(arch))
    model = _load_twin(torch_model, tmp_path, **_OPTIONS[option])
    ids, mask = padded_batch("right")
    labels = np.where(mask == 1, ids, -100)
    labels[:, 0] = -100
    assert_gradients_match_torch(torch_model, model, ids, mask, labels)


def test_scanned_model_generates_like_the_unrolled_one(tiny_hf_model, tmp_path):
    """KV-cache decoding runs the stacked weights layer by layer: same greedy tokens."""
    from jaxunlearn.models import generate

    torch_model = tiny_hf_model(hf_config("mistral_sliding"))
    scanned = _load_twin(torch_model, tmp_path / "a", scan_layers=True)
    unrolled = _load_twin(torch_model, tmp_path / "b")
    ids, mask = padded_batch("left")
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(
        np.asarray(generate(scanned, ids, mask, **kw)),
        np.asarray(generate(unrolled, ids, mask, **kw)),
    )


def _grad_lowering(num_layers: int, remat: str):
    cfg = ModelConfig.from_hf_dict(hf_config("llama").to_dict() | {"num_hidden_layers": num_layers})
    abstract = nnx.eval_shape(lambda: build_model(cfg, scan_layers=True, remat=remat))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    ids = jax.ShapeDtypeStruct((4, 64), jnp.int32)

    def loss(p, x):
        return nnx.merge(graphdef, p, rest)(x).logits.astype(jnp.float32).mean()

    return jax.jit(jax.grad(loss)).lower(params, ids)


def test_scanned_program_size_does_not_grow_with_depth():
    """One layer body in the program whatever the depth (compile time flat in depth)."""
    small = _grad_lowering(2, "none").as_text()
    deep = _grad_lowering(12, "none").as_text()
    assert abs(len(deep) - len(small)) < 0.02 * len(small)


def test_remat_policies_cut_saved_activations():
    """Compiled temporary memory falls none > matmuls > full (XLA:CPU, scanned layers)."""
    temp = {
        policy: _grad_lowering(4, policy).compile().memory_analysis().temp_size_in_bytes
        for policy in ("none", "matmuls", "full")
    }
    assert temp["none"] > temp["matmuls"] > temp["full"], temp
    cfg = ModelConfig.from_hf_dict(hf_config("llama").to_dict())
    with pytest.raises(ValueError, match="none, matmuls, full"):
        build_model(cfg, remat="some")
    with pytest.raises(ValueError, match="auto, einsum, dot_product_attention"):
        build_model(cfg, attention="flash")
    with pytest.raises(ValueError, match="GPT-2 does not support scan_layers"):
        build_model(ModelConfig.from_hf_dict(hf_config("gpt2").to_dict()), scan_layers=True)
    from jaxunlearn.models.layers import resolve_attention

    if jax.default_backend() == "cpu":
        assert resolve_attention("auto") == "einsum"


def test_gradient_accumulation_with_scanned_rematerialised_layers():
    """micro_batches=2 averages to the same update as one batch (scan + remat "full")."""
    import optax

    from jaxunlearn import objectives, train

    cfg = ModelConfig.from_hf_dict(hf_config("mistral_sliding").to_dict())
    model = build_model(cfg, scan_layers=True, remat="full")
    graphdef, params, rest = train.split_model(model)
    ids, mask = padded_batch("right")
    order = [0, 1, 1, 0]  # both micro-batches score the same number of tokens
    ids, mask = ids[order], mask[order]
    part = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
            "labels": np.where(mask == 1, ids, -100).astype(np.int32)}  # fmt: skip
    objective = objectives.forget_retain(objectives.grad_ascent())
    out = []
    for micro in (1, 2):
        step = train.make_step(graphdef, rest, objective, optax.sgd(0.1), micro_batches=micro)
        p = jax.tree.map(jnp.copy, params)
        p, _, _, metrics = step(p, step.init(p), {"forget": part})
        out.append((p, float(metrics["loss"])))
    # a token-mean loss: equal token counts per half make the mean of means the full mean
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)


def test_causal_query_blocks_equal_full_attention_and_its_gradient():
    """`causal=True` runs queries in blocks against the keys up to each block's end; the
    outputs and gradients equal plain softmax attention written out in numpy / unblocked."""
    from jaxunlearn.models.layers import CAUSAL_BLOCK, dot_product_attention

    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 2 * CAUSAL_BLOCK + 44, 4, 2, 8  # the last block is partial
    q, k, v = (rng.normal(size=(b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    real = np.arange(t)[None, :] < np.array([[t], [t - 61]])  # row 1 right-padded
    allowed = np.tril(np.ones((t, t), bool))[None] & real[:, None, :]
    scale = d**-0.5
    ref = np.zeros_like(q)
    for i in range(b):
        for head in range(h):
            scores = q[i, :, head] @ k[i, :, head // (h // kv)].T * scale
            scores = np.where(allowed[i], scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            ref[i, :, head] = (p / p.sum(-1, keepdims=True)) @ v[i, :, head // (h // kv)]
    out = dot_product_attention(q, k, v, allowed, scale, causal=True)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)

    weights = rng.normal(size=q.shape).astype(np.float32)

    def loss(q, k, v, causal):
        return (dot_product_attention(q, k, v, allowed, scale, causal) * weights).sum()

    grads = jax.grad(loss, argnums=(0, 1, 2))
    for got, want in zip(grads(q, k, v, True), grads(q, k, v, False)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_long_sequences_match_transformers(tiny_hf_model, nnx_twin):
    """A sequence long enough for causal query blocks, right-padded, against transformers."""
    torch_model = tiny_hf_model(hf_config("llama"))
    model = nnx_twin(torch_model)
    rng = np.random.RandomState(1)
    length = 300
    ids = rng.randint(3, VOCAB, size=(2, length))
    mask = np.ones_like(ids)
    mask[1, 250:] = 0
    ids = np.where(mask == 1, ids, 0)
    ref = torch_forward(torch_model, ids, mask).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
    real = mask == 1
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4)
