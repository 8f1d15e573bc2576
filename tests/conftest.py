"""Shared pytest fixtures: tiny random Hugging Face models (torch, CPU) and their NNX twins."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

# Commands run in-process default to a persistent JAX compilation cache under
# $XDG_CACHE_HOME (`--compilation-cache auto`); keep the suite's out of the user's home.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="jaxunlearn-tests-xdg-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


def _tiny_hf_model(hf_config, *, seed: int = 0, noise: float = 0.05):
    """A random `transformers` causal LM for `hf_config`, in eval mode, on CPU.

    HF's init sets every norm weight to 1 and every bias to 0; `noise` perturbs all
    parameters so a mis-mapped norm, bias or tied weight changes the logits.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():  # tied weights appear once, so they stay tied
            p.add_(noise * torch.randn_like(p))
    return model


def _nnx_twin(torch_model, *, dtype=None, param_dtype=None):
    """The jaxunlearn model for `torch_model.config`, holding the same weights."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxunlearn.models import ModelConfig, build_model, hf_param_map

    dtype = dtype or jnp.float32
    param_dtype = param_dtype or jnp.float32
    cfg = ModelConfig.from_hf_dict(torch_model.config.to_dict())
    model = build_model(cfg, dtype=dtype, param_dtype=param_dtype)
    state_dict = {k: v.detach().float().numpy() for k, v in torch_model.state_dict().items()}
    param_map = hf_param_map(cfg)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = param_map[".".join(map(str, path))]
        value = state_dict[spec.key].T if spec.transpose else state_dict[spec.key]
        assert value.shape == var.shape, (path, value.shape, var.shape)
        var[...] = jnp.asarray(np.ascontiguousarray(value), param_dtype)
    return model


@pytest.fixture
def tiny_hf_model():
    """Factory fixture: `tiny_hf_model(hf_config, seed=0)` -> torch model."""
    return _tiny_hf_model


@pytest.fixture
def nnx_twin():
    """Factory fixture: `nnx_twin(torch_model, dtype=, param_dtype=)` -> NNX model."""
    return _nnx_twin
