"""Parity of the NNX ResNet / ViT ports with transformers on tiny random configs, and export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxunlearn.checkpoints.vision import (  # noqa: E402
    check_num_labels,
    load_classifier,
    save_classifier,
)
from jaxunlearn.models.vision import CNNConfig, ResNetConfig, build_classifier  # noqa: E402


def _randomise_batch_norm(model):
    """Non-trivial running statistics so inference-mode batch norm is really tested."""
    gen = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


def _images(channels, size, n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, channels, size, size)).astype(np.float32)


def _jax_logits(model, x_nchw):
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(
        state, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    )
    return np.asarray(out.logits), np.asarray(out.features)


def _torch_logits(model, x_nchw):
    with torch.no_grad():
        return model(torch.from_numpy(x_nchw)).logits.numpy()


RESNETS = [
    dict(layer_type="basic", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2]),
    dict(
        layer_type="bottleneck",
        embedding_size=8,
        hidden_sizes=[16, 32],
        depths=[2, 1],
        downsample_in_first_stage=True,
        downsample_in_bottleneck=True,
    ),
]


@pytest.mark.parametrize("kw", RESNETS, ids=["basic", "bottleneck"])
def test_resnet_logits_match_transformers(tmp_path, kw):
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, num_labels=4, **kw)
    ref = transformers.ResNetForImageClassification(cfg).eval()
    _randomise_batch_norm(ref)
    ref.save_pretrained(tmp_path)
    model, hf = load_classifier(tmp_path)
    x = _images(3, 16)
    logits, features = _jax_logits(model, x)
    np.testing.assert_allclose(logits, _torch_logits(ref, x), atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        pooled = ref.resnet(torch.from_numpy(x)).pooler_output.flatten(1).numpy()
    np.testing.assert_allclose(features, pooled, atol=2e-5, rtol=1e-5)


def _tiny_vit(**kw):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        image_size=8, patch_size=4, num_channels=3, num_labels=5, **kw,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg).eval()


def test_vit_logits_match_transformers(tmp_path):
    ref = _tiny_vit()
    ref.save_pretrained(tmp_path)
    model, _ = load_classifier(tmp_path)
    x = _images(3, 8)
    logits, features = _jax_logits(model, x)
    np.testing.assert_allclose(logits, _torch_logits(ref, x), atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        cls = ref.vit(torch.from_numpy(x)).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(features, cls, atol=2e-5, rtol=1e-5)


def test_vit_legacy_tensor_names_load(tmp_path):
    """Hub checkpoints saved by transformers < 5 use encoder.layer.N.attention.attention.*."""
    from safetensors.torch import load_file, save_file

    ref = _tiny_vit()
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    legacy = {}
    for k, v in tensors.items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        for a, b in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            k = k.replace(f"attention.{a}", f"attention.attention.{b}")
        k = k.replace("attention.o_proj", "attention.output.dense")
        k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        legacy[k] = v
    assert any("attention.attention.query" in k for k in legacy)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_classifier(tmp_path)
    x = _images(3, 8)
    np.testing.assert_allclose(_jax_logits(model, x)[0], _torch_logits(ref, x), atol=2e-5)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, arch):
    if arch == "resnet":
        torch.manual_seed(0)
        cfg = transformers.ResNetConfig(num_channels=3, num_labels=3, **RESNETS[0])
        ref = transformers.ResNetForImageClassification(cfg).eval()
        _randomise_batch_norm(ref)
        size = 16
    else:
        ref, size = _tiny_vit(), 8
    ref.save_pretrained(tmp_path / "in")
    model, hf = load_classifier(tmp_path / "in")
    names = {i: f"class{i}" for i in range(model.config.num_labels)}
    save_classifier(model, tmp_path / "out", id2label=names)
    back, info = transformers.AutoModelForImageClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back).__name__ == type(ref).__name__
    assert back.config.id2label[1] == "class1"
    x = _images(3, size, seed=2)
    np.testing.assert_allclose(_torch_logits(back, x), _jax_logits(model, x)[0], atol=2e-5)
    np.testing.assert_allclose(_torch_logits(back, x), _torch_logits(ref, x), atol=1e-6)


def test_resnet18_config_and_train_mode_batch_norm():
    """ResNet-18 preset has HF's resnet-18 shape; train=True uses batch statistics."""
    cfg = ResNetConfig.resnet18(num_labels=10, num_channels=1, width=8)
    assert cfg.depths == (2, 2, 2, 2) and cfg.hidden_sizes == (8, 16, 32, 64)
    tiny = ResNetConfig(10, 1, 4, (4, 8), (1, 1), "basic")
    model = build_classifier(tiny)
    x = jnp.asarray(_images(1, 8, n=4).transpose(0, 2, 3, 1))
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state, x):
        m = nnx.merge(graphdef, state)
        eval_logits = m(x).logits
        train_logits = m(x, train=True).logits  # also updates the running averages
        return eval_logits, train_logits, nnx.state(m, nnx.BatchStat)

    eval_logits, train_logits, stats = both(state, x)
    assert eval_logits.shape == (4, 10)
    assert not np.allclose(eval_logits, train_logits)
    mean = stats["resnet"]["embedder"]["embedder"]["normalization"]["mean"][...]
    assert np.abs(np.asarray(mean)).max() > 0  # running mean moved from its initial 0


def test_cnn_shapes():
    model = build_classifier(CNNConfig(num_labels=7, num_channels=3, image_size=32))
    out = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, 32, 32, 3)))
    assert out.logits.shape == (2, 7) and out.features.shape == (2, 64)


def test_bad_checkpoints_are_named(tmp_path):
    ref = _tiny_vit()
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 32
    cfg["num_attention_heads"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.safetensors.*shape"):
        load_classifier(tmp_path)
    cfg["model_type"] = "swin"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="swin"):
        load_classifier(tmp_path)
    with pytest.raises(ValueError, match="5 output labels but the data has 10"):
        check_num_labels(5, 10, where="classifier")
    with pytest.raises(ValueError, match="no Hugging Face counterpart"):
        save_classifier(build_classifier(CNNConfig()), tmp_path / "cnn")
