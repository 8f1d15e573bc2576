"""Hugging Face checkpoint directories <-> jaxunlearn NNX models.

`load_pretrained` reads ``config.json`` + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), memory-mapped, and copies each tensor straight onto its
target sharding, so host memory never holds a second copy of the whole model.
`save_pretrained` writes a directory that ``transformers.AutoModelForCausalLM
.from_pretrained`` loads with the same logits. Which HF tensor feeds which NNX parameter is
the model port's business (`jaxunlearn.models.hf_param_map`); this module only moves bytes.

Example:
  >>> import jaxunlearn as ju
  >>> mesh = ju.parallel.mesh(data=1, fsdp=-1)  # parameters split over every device
  >>> model = ju.load_pretrained("path/to/hf-dir", mesh=mesh)
  >>> path = ju.save_pretrained(model, "out/unlearned")
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.checkpoints import _safetensors
from jaxunlearn.checkpoints._model import (
    CONFIG,
    abstract_model,
    atomic_directory,
    flat_params,
    model_config,
    read_config,
    to_dtype,
)

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_MAX_LISTED = 8  # problems listed in one error message


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, not yet read.

    Attributes:
      file: the file that holds it (named in error messages).
      shape: stored shape (Hugging Face layout).
      dtype: stored numpy dtype.
      read: returns the values, a memory-mapped view where the format allows.
    """

    file: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]


# ----------------------------------------------------------------------------- reading


def open_weights(
    directory: str | os.PathLike, *, allow_pickle: bool = False
) -> dict[str, StoredTensor]:
    """Indexes the weights of a Hugging Face directory without reading any values.

    Args:
      directory: the checkpoint directory.
      allow_pickle: accept ``pytorch_model.bin`` (pickle) weights when no safetensors exist.

    Returns:
      {Hugging Face tensor name: `StoredTensor`}.

    Raises:
      FileNotFoundError: no weights, or a shard named by the index is missing.
      ValueError: a corrupt file or index, or pickle weights without `allow_pickle`.
    """
    d = Path(directory)
    if (d / WEIGHTS_INDEX).is_file():
        return _open_sharded(d / WEIGHTS_INDEX)
    if (d / WEIGHTS).is_file():
        return _tensors_of(_safetensors.SafetensorsFile(d / WEIGHTS))
    pickles = [d / n for n in (PICKLE_INDEX, PICKLE_WEIGHTS) if (d / n).is_file()]
    if pickles:
        if not allow_pickle:
            raise ValueError(
                f"{pickles[0]} is a pickle checkpoint; unpickling can run arbitrary code, so it "
                "is refused. Convert it to safetensors with transformers "
                "(AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)), or pass "
                "allow_pickle=True if you trust its source (needs torch)."
            )
        return _open_pickle(d, pickles[0])
    present = ", ".join(sorted(p.name for p in d.iterdir())) or "nothing"
    raise FileNotFoundError(
        f"no weights in {d}: expected {WEIGHTS} or {WEIGHTS_INDEX} (found {present}). Save the "
        "model with save_pretrained, or copy its safetensors files here."
    )


def _tensors_of(f: _safetensors.SafetensorsFile) -> dict[str, StoredTensor]:
    return {
        name: StoredTensor(f.path, info.shape, info.dtype, lambda f=f, name=name: f.get(name))
        for name, info in f.tensors.items()
    }


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{index} is not a valid weight index ({type(e).__name__}: {e}); it needs a "
            '"weight_map" object {tensor name: shard file}. Re-save the checkpoint.'
        ) from None
    for shard in set(weight_map.values()):
        if not (index.parent / shard).is_file():
            raise FileNotFoundError(
                f"{index.parent / shard} is missing: {index.name} maps tensors to it. Copy "
                "every shard of the checkpoint into the directory."
            )
    return weight_map


def _open_sharded(index: Path) -> dict[str, StoredTensor]:
    weight_map = _read_index(index)
    files = {
        s: _tensors_of(_safetensors.SafetensorsFile(index.parent / s))
        for s in set(weight_map.values())
    }
    stored = {}
    for name, shard in weight_map.items():
        if name not in files[shard]:
            raise ValueError(
                f"tensor {name!r} is missing from {index.parent / shard}, although {index.name} "
                "maps it there; the index and shards come from different saves. Re-save the "
                "checkpoint."
            )
        stored[name] = files[shard][name]
    return stored


def _open_pickle(d: Path, first: Path) -> dict[str, StoredTensor]:
    try:
        import torch  # only here: the library never imports torch otherwise
    except ImportError:
        raise ImportError(
            f"reading {first} needs torch, which is not installed. Convert it to safetensors "
            "with transformers instead: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(new_dir)."
        ) from None
    files = sorted(set(_read_index(first).values())) if first.name == PICKLE_INDEX else [first.name]
    stored = {}
    for name in files:
        # weights_only=True restricts unpickling to tensors; still only for trusted files.
        state = torch.load(d / name, map_location="cpu", weights_only=True, mmap=True)
        for key, t in state.items():
            stored[key] = StoredTensor(
                str(d / name), tuple(t.shape), _torch_dtype(torch, t), lambda t=t: _torch_numpy(t)
            )
    return stored


def _torch_dtype(torch, t) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy().dtype


def _torch_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _stored_shape(abstract: jax.ShapeDtypeStruct, hf: Any) -> tuple[int, ...]:
    """The shape of each stored tensor of a parameter (one layer's, for stacked layers)."""
    shape = tuple(abstract.shape) if hf.layers is None else tuple(abstract.shape[1:])
    return tuple(reversed(shape)) if hf.transpose else shape


def _match(
    params: dict[str, jax.ShapeDtypeStruct], param_map: dict, stored: dict[str, StoredTensor]
) -> None:
    """Checks that every parameter has a stored tensor of the right shape; lists all misses."""
    problems = []
    for name, abstract in params.items():
        hf = param_map.get(name)
        if hf is None:
            problems.append(f"model parameter {name!r} has no Hugging Face key in hf_param_map")
            continue
        want = _stored_shape(abstract, hf)
        for key in hf.keys():
            t = stored.get(key)
            if t is None:
                problems.append(f"tensor {key!r} (for {name}) is missing")
            elif t.shape != want:
                problems.append(
                    f"tensor {key!r} in {t.file} has shape {list(t.shape)}, expected {list(want)}"
                )
    if problems:
        files = sorted({t.file for t in stored.values()})
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        example = ", ".join(sorted(stored)[:3])
        raise ValueError(
            "checkpoint does not match config.json: "
            + "; ".join(problems[:_MAX_LISTED])
            + f"{more}. Files read: {', '.join(files)} (they hold e.g. {example}). Check that "
            "config.json belongs to these weights."
        )


def _place(x: np.ndarray, sharding: jax.sharding.Sharding | None, dtype: np.dtype) -> jax.Array:
    # Copy (and cast) on the host, one slice at a time: each device gets only its slice of
    # the memory map, and jax's CPU backend would otherwise alias the mapped file itself.
    if sharding is None:
        return jax.device_put(np.array(x, dtype=dtype))
    return jax.make_array_from_callback(
        x.shape, sharding, lambda idx: np.array(x[idx], dtype=dtype)
    )


def _place_stacked(
    layers: list[StoredTensor],
    transpose: bool,
    shape: tuple[int, ...],
    sharding: jax.sharding.Sharding | None,
    dtype: np.dtype,
) -> jax.Array:
    """Stacks per-layer tensors into one [L, ...] array, reading only each device's slice."""

    def read(idx):
        idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
        rows = range(*idx[0].indices(len(layers)))
        parts = []
        for i in rows:
            x = layers[i].read()
            parts.append(np.array((x.T if transpose else x)[idx[1:]], dtype=dtype))
        return np.stack(parts) if parts else np.zeros((0, *shape[1:]), dtype)

    if sharding is None:
        return jax.device_put(read((slice(None),)))
    return jax.make_array_from_callback(shape, sharding, read)


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    allow_pickle: bool = False,
    scan_layers: bool = False,
    remat: str = "none",
    attention: str = "auto",
) -> nnx.Module:
    """Loads a Hugging Face causal-LM directory as a jaxunlearn NNX model.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or
        ``model.safetensors.index.json`` + shards), e.g. from ``save_pretrained``.
      dtype: computation dtype of the model.
      param_dtype: parameter dtype (default: `dtype`); stored values are cast to it.
      mesh: place parameters FSDP-sharded on this mesh (`jaxunlearn.parallel.mesh`);
        default: the default device.
      allow_pickle: also accept ``pytorch_model.bin`` when there are no safetensors.
        Unpickling can execute arbitrary code: only for files you trust.
      scan_layers: stack the per-layer tensors of the file into [L, ...] parameters and
        scan over the layers (Llama family; see `jaxunlearn.models.LlamaForCausalLM`).
        `save_pretrained` writes them back per layer.
      remat: per-layer rematerialisation in the backward pass ("none", "matmuls", "full").
      attention: attention implementation ("auto", "einsum", "dot_product_attention").

    Returns:
      The model (`jaxunlearn.models.build_model` for the config), parameters filled.

    Raises:
      FileNotFoundError: missing config.json, weights or a shard.
      ValueError: unsupported model_type, a missing tensor, a shape mismatch, a corrupt
        file, or pickle weights without `allow_pickle`. Each message names the file or tensor.
    """
    from jaxunlearn.models import hf_param_map

    cfg = read_config(path)
    stored = open_weights(path, allow_pickle=allow_pickle)
    options = dict(scan_layers=scan_layers, remat=remat, attention=attention)
    model = abstract_model(cfg, dtype=dtype, param_dtype=to_dtype(param_dtype or dtype), **options)
    param_map = hf_param_map(cfg, scan_layers=scan_layers)
    _match(model.params, param_map, stored)
    shardings = parallel.param_sharding(model.params, mesh) if mesh is not None else {}
    values = {}
    for name, abstract in model.params.items():
        hf = param_map[name]
        if hf.layers is not None:
            layers = [stored[k] for k in hf.keys()]
            values[name] = _place_stacked(
                layers, hf.transpose, abstract.shape, shardings.get(name), abstract.dtype
            )
            continue
        x = stored[hf.key].read()
        values[name] = _place(x.T if hf.transpose else x, shardings.get(name), abstract.dtype)
    return model.merge(values)


def stored_dtype(path: str | os.PathLike, *, allow_pickle: bool = False) -> jnp.dtype:
    """The floating dtype a Hugging Face checkpoint's weights are stored in."""
    for t in open_weights(path, allow_pickle=allow_pickle).values():
        if jnp.issubdtype(t.dtype, jnp.floating):
            return jnp.dtype(t.dtype)
    return jnp.dtype(jnp.float32)


# ----------------------------------------------------------------------------- writing

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in a size like ``"5GB"`` (10^9, as transformers), ``"20KB"`` or ``"1GiB"``."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"max_shard_size {size!r} is not a size; use e.g. 5GB, 500MB or 20KB.")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # several hosts: gather, process 0 writes

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(model: nnx.Module, dtype: Any) -> list[_safetensors.TensorToWrite]:
    from jaxunlearn.models import model_param_map

    params = flat_params(model)
    param_map = model_param_map(model)
    unmapped = sorted(set(params) - set(param_map))
    if unmapped:
        raise ValueError(f"model parameters {unmapped} have no Hugging Face key in hf_param_map.")
    tensors = []
    for name, x in params.items():
        hf = param_map[name]
        target = np.dtype(to_dtype(dtype) or x.dtype)
        # Stacked layers are written back as one tensor per layer (the Hugging Face layout).
        keys = [(None, hf.key)] if hf.layers is None else list(enumerate(hf.keys()))
        for layer, key in keys:

            def fetch(x=x, layer=layer, transpose=hf.transpose, target=target):
                host = _to_host(x if layer is None else x[layer])
                return (host.T if transpose else host).astype(target, copy=False)

            shape = tuple(x.shape) if layer is None else tuple(x.shape[1:])
            shape = tuple(reversed(shape)) if hf.transpose else shape
            tensors.append(_safetensors.TensorToWrite(key, shape, target, fetch))
    return sorted(tensors, key=lambda t: t.name)


def _shards(tensors: list, max_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    return shards + [current] if current else shards


def write_hf_files(
    model: nnx.Module, directory: Path, *, dtype: Any = None, max_shard_size: int | str = "5GB"
) -> None:
    """Writes config.json and safetensors weights into an existing (temporary) directory."""
    tensors = _hf_tensors(model, dtype)
    dtypes = {np.dtype(t.dtype) for t in tensors}
    dtype_name = str(dtypes.pop()) if len(dtypes) == 1 else None
    shards = _shards(tensors, parse_size(max_shard_size))
    if jax.process_index() != 0:  # other hosts take part in the gathers, process 0 writes
        for t in tensors:
            t.fetch()
        return
    config = model_config(model).to_hf_dict(dtype=dtype_name)
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if len(shards) == 1:
        _safetensors.write_file(directory / WEIGHTS, shards[0], {"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _safetensors.write_file(directory / name, shard, {"format": "pt"})
        weight_map |= {t.name: name for t in shard}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def save_pretrained(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Saves a model as a Hugging Face directory that `transformers` loads.

    Writes ``config.json`` and ``model.safetensors`` (or, above `max_shard_size`, numbered
    shards plus ``model.safetensors.index.json``), and the tokenizer if given. The directory
    appears atomically: everything is written into a hidden sibling that is renamed into
    place at the end, so an interrupted save leaves `path` as it was. One tensor at a time
    is copied to host memory.

    Args:
      model: a model from `load_pretrained` or `jaxunlearn.models.build_model`.
      path: destination directory. In an existing checkpoint directory the config and weights
        are replaced (stale shards removed) and other files, e.g. a tokenizer, are kept.
      dtype: dtype to store the weights in (default: the parameters' dtype).
      tokenizer: a `transformers` tokenizer to save alongside.
      max_shard_size: largest weights file, in bytes or as ``"5GB"``, ``"20KB"``.
      overwrite: write into `path` even if it holds files that are not checkpoint files
        (they are kept).

    Returns:
      The directory written.

    Raises:
      FileExistsError: `path` holds other files and `overwrite` is False.
      ValueError: the tokenizer has more tokens than the model's embedding has rows.
    """
    cfg = model_config(model)
    if tokenizer is not None:
        check_vocab(len(tokenizer), cfg.vocab_size, where="the tokenizer passed to save_pretrained")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_hf_files(model, tmp, dtype=dtype, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


# ----------------------------------------------------------------------------- tokenizer


def check_vocab(tokens: int, rows: int, *, where: str) -> None:
    """Raises if a tokenizer can emit token ids past the embedding's last row."""
    if tokens > rows:
        raise ValueError(
            f"{where} has {tokens} tokens but the model's embedding has only {rows} rows "
            f"(config.json vocab_size); ids >= {rows} would index past the embedding. Resize "
            "the embeddings to the tokenizer (transformers: model.resize_token_embeddings("
            "len(tokenizer)), then save again) or use the tokenizer the model was trained with."
        )


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Loads the `transformers` tokenizer saved in a model directory, checked against it.

    Args:
      path: a directory with tokenizer files, normally the model's own.

    Returns:
      The tokenizer (`transformers.AutoTokenizer.from_pretrained(path)`).

    Raises:
      FileNotFoundError: no tokenizer in `path`.
      ValueError: the tokenizer has more tokens (``len(tokenizer)``) than the embedding in
        ``path/config.json`` has rows.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no usable tokenizer in {path} ({e}); save one there with "
            "tokenizer.save_pretrained(path) or save_pretrained(model, path, tokenizer=...)."
        ) from e
    if (Path(path) / CONFIG).is_file():
        rows = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8")).get("vocab_size")
        if rows is not None:
            check_vocab(len(tokenizer), int(rows), where=f"the tokenizer in {path}")
    return tokenizer


__all__ = [
    "StoredTensor",
    "check_vocab",
    "load_pretrained",
    "load_tokenizer",
    "open_weights",
    "parse_size",
    "save_pretrained",
    "stored_dtype",
    "write_hf_files",
]
