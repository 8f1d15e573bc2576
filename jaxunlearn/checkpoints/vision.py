"""Hugging Face image classifiers (ResNet, ViT) <-> the Flax NNX ports, via safetensors.

`load_classifier(dir)` reads ``config.json`` and ``model.safetensors`` (or a sharded index)
of a `ResNetForImageClassification` / `ViTForImageClassification` directory and returns the
NNX model with every parameter and batch-norm running statistic filled; `save_classifier`
writes a directory `transformers` loads with the same logits. Pickle weights are refused.
The label names (``id2label``) travel in both directions so a checkpoint can be checked
against a dataset's classes (`check_num_labels`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxunlearn.checkpoints import _safetensors
from jaxunlearn.checkpoints._model import atomic_directory, path_name
from jaxunlearn.checkpoints.hf import open_weights
from jaxunlearn.models.vision import (
    ResNetConfig,
    ViTConfig,
    build_classifier,
    hf_keys,
)

_ARCHITECTURES = {
    "resnet": ("ResNetForImageClassification", ResNetConfig),
    "vit": ("ViTForImageClassification", ViTConfig),
}


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a Hugging Face image classifier directory needs config.json "
            "(save the model with transformers' save_pretrained)."
        )
    hf = json.loads(path.read_text())
    kind = hf.get("model_type")
    if kind not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: model_type {kind!r} is not a supported image classifier; supported: "
            f"{sorted(_ARCHITECTURES)}."
        )
    return hf


def _variables(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
    """{dotted name: (path, variable)} for every parameter and batch statistic."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {path_name(p): (p, v) for p, v in nnx.to_flat_state(state)}


def load_classifier(directory: str | os.PathLike) -> tuple[nnx.Module, dict[str, Any]]:
    """Loads a Hugging Face ResNet / ViT image classifier into its NNX port.

    Args:
      directory: a directory with config.json and model.safetensors (or an index).

    Returns:
      (model, config_dict): the NNX model and the Hugging Face config as read (its
      ``id2label`` names the classes).

    Raises:
      FileNotFoundError: missing config or weights.
      ValueError: unsupported model_type, pickle weights, a missing or unexpected tensor, or
        a tensor whose shape differs from the config's.
    """
    d = Path(directory)
    hf = _read_config(d)
    kind = hf["model_type"]
    cfg = _ARCHITECTURES[kind][1].from_hf(hf)
    model = build_classifier(cfg)
    variables = _variables(model)
    table = {hf_keys.hf_name(n, kind): n for n in variables}
    stored = open_weights(d)
    values: dict[str, np.ndarray] = {}
    unexpected = []
    for key, tensor in stored.items():
        name = table.get(hf_keys.modern_vit_name(key) if kind == "vit" else key)
        if name is None:
            if not hf_keys.is_ignored(key):
                unexpected.append(key)
            continue
        array = hf_keys.to_nnx(name, np.asarray(tensor.read(), np.float32))
        want = variables[name][1].get_value().shape
        if array.shape != tuple(want):
            raise ValueError(
                f"{tensor.file}: tensor {key!r} has shape {tuple(tensor.shape)}, but config.json "
                f"implies {tuple(hf_keys.to_hf(name, np.zeros(want)).shape)}; the config and "
                "weights do not belong together."
            )
        values[name] = array
    missing = [hf_keys.hf_name(n, kind) for n in variables if n not in values]
    if missing or unexpected:
        raise ValueError(
            f"{d}: weights do not match a {_ARCHITECTURES[kind][0]} of this config: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
    nnx.update(
        model,
        nnx.from_flat_state(
            [
                (path, var.replace(jax.numpy.asarray(values[n])))
                for n, (path, var) in variables.items()
            ]
        ),
    )
    return model, hf


def _hf_config(model: nnx.Module, id2label: dict[int, str] | None) -> dict[str, Any]:
    cfg = model.config
    if cfg.model_type not in _ARCHITECTURES:
        raise ValueError(
            f"save_classifier: {type(model).__name__} has no Hugging Face counterpart; only "
            f"{sorted(_ARCHITECTURES)} ports can be exported."
        )
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
    labels = id2label or {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
    if len(labels) != cfg.num_labels:
        raise ValueError(
            f"save_classifier: id2label has {len(labels)} names but the model has "
            f"{cfg.num_labels} outputs."
        )
    out.pop("num_labels")
    out["id2label"] = {str(k): v for k, v in labels.items()}
    out["label2id"] = {v: int(k) for k, v in labels.items()}
    out["architectures"] = [_ARCHITECTURES[cfg.model_type][0]]
    return out


def save_classifier(
    model: nnx.Module,
    directory: str | os.PathLike,
    *,
    id2label: dict[int, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes an NNX ResNet / ViT port as a Hugging Face directory (float32 safetensors).

    Args:
      model: a `ResNetForImageClassification` or `ViTForImageClassification` port.
      directory: the output directory (written atomically).
      id2label: class names by index (default ``LABEL_i``).
      overwrite: write into an existing non-checkpoint directory.

    Returns:
      The directory.

    Raises:
      ValueError: a model with no Hugging Face counterpart (the small CNN), or label names
        that do not match the model's outputs.
    """
    from safetensors.numpy import save_file  # handles the 0-d batch counters

    config = _hf_config(model, id2label)
    kind = model.config.model_type
    tensors = {}
    for name, (_, var) in _variables(model).items():
        key = hf_keys.hf_name(name, kind)
        tensors[key] = np.ascontiguousarray(
            hf_keys.to_hf(name, np.asarray(var.get_value(), np.float32))
        )
        if name.endswith(".mean"):  # torch's BatchNorm2d also stores a batch counter
            tensors[key.replace("running_mean", "num_batches_tracked")] = np.zeros((), np.int64)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(directory)


def check_num_labels(num_labels: int, classes: int, *, where: str) -> None:
    """Raises a ValueError when a checkpoint's label count differs from the data's classes."""
    if num_labels != classes:
        raise ValueError(
            f"{where}: the checkpoint has {num_labels} output labels but the data has "
            f"{classes} classes; pass data with the checkpoint's classes, or replace the head "
            "(fine-tune a new classifier) before unlearning."
        )


def save_model_state(model: nnx.Module, directory: str | os.PathLike, metadata: dict) -> Path:
    """Writes every parameter and batch statistic of any vision port (the small CNN too).

    The tensors keep their NNX dotted names (``model.safetensors``) and `metadata` goes to
    ``meta.json``; `load_model_state` rebuilds the model from its config. This is the
    pipeline's cache format; `save_classifier` is the Hugging Face export.
    """
    tensors = [
        _safetensors.TensorToWrite(
            name, tuple(np.shape(var.get_value())), np.dtype(np.float32),
            lambda v=var: np.asarray(v.get_value(), np.float32),
        )
        for name, (_, var) in _variables(model).items()
    ]  # fmt: skip
    with atomic_directory(directory, overwrite=True) as tmp:
        _safetensors.write_file(tmp / "model.safetensors", tensors, {"format": "jaxunlearn"})
        (tmp / "meta.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    return Path(directory)


def load_model_state(directory: str | os.PathLike, config: Any) -> nnx.Module:
    """Rebuilds a model of `config` from a `save_model_state` directory.

    Raises:
      ValueError: a tensor is missing or shaped differently from `config`'s model.
    """
    f = _safetensors.SafetensorsFile(Path(directory) / "model.safetensors")
    model = build_classifier(config)
    flat = []
    for name, (path, var) in _variables(model).items():
        if name not in f:
            raise ValueError(f"{f.path}: no tensor {name!r}; the cache does not match the config.")
        value = f.get(name)
        if value.shape != var.get_value().shape:
            raise ValueError(
                f"{f.path}: {name!r} has shape {value.shape}, the config implies "
                f"{var.get_value().shape}."
            )
        flat.append((path, var.replace(jax.numpy.asarray(value))))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
