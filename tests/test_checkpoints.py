"""Tests for jaxunlearn.checkpoints: HF import/export parity, orbax, conversion, bad input.

Reference values come from tiny random `transformers` models run in torch, built here; no
hub access is needed.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxunlearn import checkpoints
from jaxunlearn.checkpoints import _safetensors, convert, hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128
IDS = np.random.RandomState(0).randint(0, VOCAB, (2, 9))
ATOL = 1e-4


def _config(kind: str):
    llama = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**llama)
    if kind == "llama_tied":
        return transformers.LlamaConfig(**llama, tie_word_embeddings=True)
    if kind == "qwen3":
        return transformers.Qwen3Config(**llama, head_dim=16)
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64
        )
    raise ValueError(kind)


def _torch_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind)).eval()
    with torch.no_grad():  # move every weight (norm scales and biases too) off its init value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def _logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS)).logits, dtype=np.float32)


def _tokenizer(size: int):
    vocab = {f"w{i}": i for i in range(size - 1)} | {"[UNK]": size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (hf dir, torch float32 logits)} for the four tiny architectures."""
    out = {}
    for kind in ("llama", "llama_tied", "qwen3", "gpt2"):
        model = _torch_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (path, _torch_logits(model))
    _tokenizer(VOCAB).save_pretrained(out["llama"][0])
    return out


@pytest.fixture
def llama_dir(saved, tmp_path):
    """A private copy of the llama checkpoint that a test may damage."""
    dst = tmp_path / "llama"
    shutil.copytree(saved["llama"][0], dst)
    return dst


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen3", "gpt2"])
def test_load_matches_torch_logits(saved, kind):
    path, ref = saved[kind]
    model = checkpoints.load_pretrained(path)
    np.testing.assert_allclose(_logits(model), ref, atol=ATOL, rtol=0)


def test_load_sharded_index(tmp_path):
    tm = _torch_model("llama", seed=1)
    tm.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(shards) > 1
    model = checkpoints.load_pretrained(tmp_path)
    np.testing.assert_allclose(_logits(model), _torch_logits(tm), atol=ATOL, rtol=0)


def test_load_bfloat16_checkpoint(tmp_path):
    tm = _torch_model("llama", seed=2).to(torch.bfloat16)
    tm.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["model.norm.weight"].dtype == torch.bfloat16
    # Expected parameter bits, read with torch and reinterpreted independently of our reader.
    want = stored["model.layers.0.self_attn.q_proj.weight"].view(torch.int16).numpy()
    want = want.view(ml_dtypes.bfloat16).T

    as_f32 = checkpoints.load_pretrained(tmp_path, dtype=jnp.float32)
    got = as_f32.layers[0].attn.q_proj.kernel[...]
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
    # float32 compute on the bf16-rounded weights equals torch's float32 model on them. (Not
    # tm.float(): .to(bfloat16) also rounded torch's RoPE inv_freq buffer, which is no weight.)
    ref_model = transformers.AutoModelForCausalLM.from_config(_config("llama")).eval()
    ref_model.load_state_dict({k: v.float() for k, v in stored.items()})
    ref32 = _torch_logits(ref_model)
    np.testing.assert_allclose(_logits(as_f32), ref32, atol=ATOL, rtol=0)

    as_bf16 = checkpoints.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    got = as_bf16.layers[0].attn.q_proj.kernel[...]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got).view(np.int16), want.view(np.int16))
    # bfloat16 compute: 8 mantissa bits, so only agreement to bf16 resolution is expected.
    np.testing.assert_allclose(_logits(as_bf16), ref32, atol=0.1, rtol=0.05)


def test_load_pickle_only_when_allowed(llama_dir, saved):
    state = load_file(llama_dir / "model.safetensors")
    (llama_dir / "model.safetensors").unlink()
    torch.save(state, llama_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin") as e:
        checkpoints.load_pretrained(llama_dir)
    assert "arbitrary code" in str(e.value) and "allow_pickle=True" in str(e.value)
    model = checkpoints.load_pretrained(llama_dir, allow_pickle=True)
    np.testing.assert_allclose(_logits(model), saved["llama"][1], atol=ATOL, rtol=0)


def test_library_does_not_import_torch():
    code = (
        "import sys, jaxunlearn.checkpoints, jaxunlearn.checkpoints.convert, jaxunlearn.parallel\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen3", "gpt2"])
def test_export_loads_in_transformers(saved, tmp_path, kind):
    path, ref = saved[kind]
    out = checkpoints.save_pretrained(checkpoints.load_pretrained(path), tmp_path / "out")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(back), ref, atol=ATOL, rtol=0)
    assert _siblings(out) == []


def test_export_sharded_and_bfloat16(saved, tmp_path):
    path, ref = saved["llama"]
    model = checkpoints.load_pretrained(path)
    out = checkpoints.save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).stat().st_size < 40_000 for f in files)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(back), ref, atol=ATOL, rtol=0)

    out16 = checkpoints.save_pretrained(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    stored = load_file(out16 / "model.safetensors")
    want = torch.from_numpy(np.array(model.norm.scale[...])).to(torch.bfloat16)
    assert torch.equal(stored["model.norm.weight"], want)


def test_stacked_layers_load_and_save_in_the_hugging_face_layout(saved, tmp_path):
    """scan_layers stacks per-layer tensors in memory; files stay per layer, bf16 included."""
    path, ref = saved["qwen3"]
    model = checkpoints.load_pretrained(path, scan_layers=True, remat="full")
    assert model.layers.attn.q_proj.kernel.shape == (2, 64, 4 * 16)
    np.testing.assert_allclose(_logits(model), ref, atol=ATOL, rtol=0)
    # sharded over 2 files: a stacked parameter's layers may come from different shards
    out = checkpoints.save_pretrained(model, tmp_path / "out", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    want = set(load_file(path / "model.safetensors")) - {"lm_head.weight"}
    assert set(index["weight_map"]) - {"lm_head.weight"} == want
    assert len(set(index["weight_map"].values())) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(back), ref, atol=ATOL, rtol=0)
    again = checkpoints.load_pretrained(out, scan_layers=True)
    np.testing.assert_allclose(_logits(again), ref, atol=ATOL, rtol=0)
    bf16 = checkpoints.save_pretrained(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    stored = load_file(bf16 / "model.safetensors")
    layer1 = np.array(model.layers.mlp.down_proj.kernel[...])[1].T
    want16 = torch.from_numpy(np.ascontiguousarray(layer1)).to(torch.bfloat16)
    assert torch.equal(stored["model.layers.1.mlp.down_proj.weight"], want16)


def test_stacked_layers_name_the_missing_layer_tensor(llama_dir):
    state = load_file(llama_dir / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, llama_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        checkpoints.load_pretrained(llama_dir, scan_layers=True)


def test_safetensors_writer_reader_agree_with_reference_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    f = _safetensors.SafetensorsFile(tmp_path / "ref.safetensors")
    for name, t in tensors.items():
        want = (
            t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            if t.dtype == torch.bfloat16
            else t.numpy()
        )
        assert f.get(name).dtype == want.dtype and np.array_equal(f.get(name), want), name
    entries = [
        _safetensors.TensorToWrite(n, f.tensors[n].shape, f.tensors[n].dtype, lambda n=n: f.get(n))
        for n in tensors
    ]
    _safetensors.write_file(tmp_path / "ours.safetensors", entries, {"format": "pt"})
    back = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


def test_parse_size():
    assert hf.parse_size("20KB") == 20_000
    assert hf.parse_size("5GB") == 5 * 10**9
    assert hf.parse_size("1GiB") == 2**30
    assert hf.parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        hf.parse_size("lots")


def test_save_is_atomic_and_refuses_foreign_directories(saved, tmp_path, monkeypatch):
    model = checkpoints.load_pretrained(saved["llama"][0])
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="thesis.tex"):
        checkpoints.save_pretrained(model, foreign)
    assert os.listdir(foreign) == ["thesis.tex"]
    checkpoints.save_pretrained(model, foreign, overwrite=True)
    assert sorted(os.listdir(foreign)) == ["config.json", "model.safetensors", "thesis.tex"]
    assert (foreign / "thesis.tex").read_text() == "precious"

    # A save that dies half way leaves the previous checkpoint intact and no debris.
    dst = tmp_path / "ckpt"
    checkpoints.save_pretrained(model, dst)
    before = (dst / "model.safetensors").read_bytes()
    calls = []

    def dying_write(path, tensors, metadata):
        calls.append(path)
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(_safetensors, "write_file", dying_write)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_pretrained(model, dst, max_shard_size="20KB")
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_pretrained(model, tmp_path / "fresh")
    assert len(calls) == 2
    assert (dst / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "fresh").exists()
    assert _siblings(dst) == [] and _siblings(tmp_path / "fresh") == []


def test_resave_keeps_tokenizer_and_drops_stale_shards(saved, tmp_path):
    model = checkpoints.load_pretrained(saved["llama"][0])
    dst = tmp_path / "ckpt"
    checkpoints.save_pretrained(model, dst, tokenizer=_tokenizer(VOCAB), max_shard_size="20KB")
    assert len(list(dst.glob("model-*.safetensors"))) > 1
    checkpoints.save_pretrained(model, dst)  # as transformers: the tokenizer stays
    files = set(os.listdir(dst))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.startswith("model-") or f.endswith("index.json") for f in files)
    assert len(checkpoints.load_tokenizer(dst)) == VOCAB
    back = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    np.testing.assert_allclose(_torch_logits(back), saved["llama"][1], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_saved_alongside_and_checked(saved, tmp_path):
    model = checkpoints.load_pretrained(saved["llama"][0])
    out = checkpoints.save_pretrained(model, tmp_path / "with_tok", tokenizer=_tokenizer(VOCAB))
    tok = checkpoints.load_tokenizer(out)
    assert len(tok) == VOCAB and tok("w1 w5").input_ids == [1, 5]

    with pytest.raises(ValueError, match="200 tokens") as e:
        checkpoints.save_pretrained(model, tmp_path / "big", tokenizer=_tokenizer(200))
    assert "128 rows" in str(e.value) and "resize" in str(e.value).lower()
    assert not (tmp_path / "big").exists()

    _tokenizer(200).save_pretrained(out)  # a mismatched tokenizer dropped into the directory
    with pytest.raises(ValueError, match="200 tokens") as e:
        checkpoints.load_tokenizer(out)
    assert "128 rows" in str(e.value) and str(out) in str(e.value)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        checkpoints.load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- bad input


def test_missing_config(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        checkpoints.load_pretrained(llama_dir)


def test_missing_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
        checkpoints.load_pretrained(llama_dir)


def test_unsupported_model_type(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(cfg | {"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'") as e:
        checkpoints.load_pretrained(llama_dir)
    assert "config.json" in str(e.value)
    assert all(t in str(e.value) for t in ("llama", "qwen3", "gpt2"))


def test_shape_mismatch_names_tensor(llama_dir):
    state = load_file(llama_dir / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(state, llama_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as e:
        checkpoints.load_pretrained(llama_dir)
    assert "[95, 64]" in str(e.value) and "[96, 64]" in str(e.value)
    assert "model.safetensors" in str(e.value)


def test_missing_tensor_names_tensor(llama_dir):
    state = load_file(llama_dir / "model.safetensors")
    del state["model.layers.0.input_layernorm.weight"]
    save_file(state, llama_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.input_layernorm\.weight.*missing"):
        checkpoints.load_pretrained(llama_dir)


@pytest.mark.parametrize("cut", [3, 20, 4000])
def test_truncated_file_names_file(llama_dir, cut):
    data = (llama_dir / "model.safetensors").read_bytes()
    (llama_dir / "model.safetensors").write_bytes(
        data[: len(data) - cut] if cut > 100 else data[:cut]
    )
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        checkpoints.load_pretrained(llama_dir)


def test_corrupt_header_names_file(llama_dir):
    data = bytearray((llama_dir / "model.safetensors").read_bytes())
    data[8:12] = b"}}}}"
    (llama_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors .*header is not JSON"):
        checkpoints.load_pretrained(llama_dir)


def test_index_with_missing_shard(tmp_path):
    _torch_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    last = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(FileNotFoundError, match=last.name):
        checkpoints.load_pretrained(tmp_path)


# ----------------------------------------------------------------------------- orbax


def _trained_state(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-2, weight_decay=0.1)

    @jax.jit
    def step(params):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(jnp.asarray(IDS[:, :4])).logits
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        opt_state = tx.init(params)
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = step(params)
    return {
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.key(7),
        "step": jnp.int32(1),
    }


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)

    def bits(x):
        return np.asarray(
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(bits(x), bits(y))


def test_train_checkpointer_round_trip(saved, tmp_path):
    state = _trained_state(checkpoints.load_pretrained(saved["llama"][0]))
    assert float(optax.tree.norm(state["opt_state"][0].mu)) > 0  # a real step happened
    with checkpoints.TrainCheckpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(abstract_state=checkpoints.abstract_target(state))
        for step in (1, 2, 3):
            assert ckpt.save(step, state, metadata={"cursor": 10 * step})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        restored = ckpt.restore(abstract_state=checkpoints.abstract_target(state))
        _assert_trees_equal(restored, state)
        assert ckpt.metadata() == {"cursor": 30} and ckpt.metadata(2) == {"cursor": 20}
        with pytest.raises(FileNotFoundError, match="step 1 "):
            ckpt.restore(1, abstract_state=checkpoints.abstract_target(state))
    # A fresh manager (a resumed run) sees the same checkpoints.
    with checkpoints.TrainCheckpointer(tmp_path / "ckpt", save_interval_steps=5) as ckpt:
        assert ckpt.latest_step() == 3
        _assert_trees_equal(
            ckpt.restore(3, abstract_state=checkpoints.abstract_target(state)), state
        )
        assert not ckpt.save(7, state)
        assert ckpt.save(7, state, force=True)
    with pytest.raises(ValueError, match="max_to_keep"):
        checkpoints.TrainCheckpointer(tmp_path / "x", max_to_keep=0)


def test_model_orbax_round_trip(saved, tmp_path):
    model = checkpoints.load_pretrained(saved["qwen3"][0])
    out = checkpoints.save_model_orbax(model, tmp_path / "m")
    assert sorted(os.listdir(out)) == ["config.json", "params"]
    back = checkpoints.load_model_orbax(out)
    _assert_trees_equal(nnx.state(back, nnx.Param), nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(_logits(back), _logits(model))
    with pytest.raises(FileNotFoundError, match="params"):
        checkpoints.load_model_orbax(saved["qwen3"][0])


# ----------------------------------------------------------------------------- convert


def test_convert_both_ways(saved, tmp_path):
    src, ref = saved["llama"]
    orb = convert.convert(src, tmp_path / "orbax", to="orbax")
    assert {"config.json", "params", "tokenizer.json"} <= set(os.listdir(orb))
    np.testing.assert_array_equal(
        _logits(checkpoints.load_model_orbax(orb)), _logits(checkpoints.load_pretrained(src))
    )
    from jaxunlearn import cli

    assert cli.main(["convert", str(orb), str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(_torch_logits(back), ref, atol=ATOL, rtol=0)
    assert len(checkpoints.load_tokenizer(tmp_path / "hf")) == VOCAB
    with pytest.raises(ValueError, match="to='onnx'"):
        convert.convert(src, tmp_path / "x", to="onnx")


def test_convert_keeps_bfloat16(tmp_path):
    tm = _torch_model("gpt2", seed=3).to(torch.bfloat16)
    tm.save_pretrained(tmp_path / "src")
    orb = convert.convert(tmp_path / "src", tmp_path / "orbax", to="orbax")
    model = checkpoints.load_model_orbax(orb)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        jnp.dtype(jnp.bfloat16)
    }
    convert.convert(orb, tmp_path / "hf", to="hf")
    a, b = (
        load_file(tmp_path / "src" / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    for k, v in b.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, a[k]), k
