"""LoRA adapters in Hugging Face PEFT's format: export and import.

`save_peft_adapter` writes ``adapter_config.json`` and ``adapter_model.safetensors`` so that
``peft.PeftModel.from_pretrained(transformers_model, path)`` puts the same adapters on the
transformers model (same logits). `load_peft_adapter` reads such a directory onto a model
port, first checking, from the config and the safetensors header alone, that the adapter
was made for a model of this shape. For the merged model as a Hugging Face directory use
``save_pretrained(merge_lora(model), path)``.

Format (PEFT's LoRA): tensor ``base_model.model.<HF module>.lora_A.weight`` is ``[r, in]`` and
``...lora_B.weight`` is ``[out, r]``; the effective weight is
``W[out, in] + (lora_alpha / r) * B @ A`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
Our adapters are ``A [in, r]`` and ``B [r, out]``, the transposes.

References:
  huggingface/peft, src/peft/tuners/lora/config.py and src/peft/utils/save_and_load.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxunlearn.checkpoints import _safetensors
from jaxunlearn.checkpoints._model import atomic_directory, model_config
from jaxunlearn.checkpoints.hf import _to_host
from jaxunlearn.models import hf_param_map
from jaxunlearn.models.lora import apply_lora, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _hf_modules(model: nnx.Module) -> dict[str, str]:
    """{our dotted Linear path: HF module name} for every transposed 2-D kernel of the model."""
    out = {}
    for name, hf in hf_param_map(model_config(model)).items():
        if name.endswith(".kernel") and hf.key.endswith(".weight") and hf.transpose:
            out[name[: -len(".kernel")]] = hf.key[: -len(".weight")]
    return out


def _adapter_shapes(model: nnx.Module) -> dict[str, tuple[int, int]]:
    """{our dotted Linear path: (in, out)} of the model's 2-D ``nnx.Linear`` kernels."""
    return {
        ".".join(map(str, path)): tuple(m.kernel.get_value().shape)
        for path, m in nnx.iter_modules(model)
        if isinstance(m, nnx.Linear) and m.kernel.get_value().ndim == 2
    }


def save_peft_adapter(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a LoRA model's adapters as a PEFT adapter directory.

    Args:
      model: a model from `jaxunlearn.models.lora.apply_lora` (after training).
      path: destination directory (appears atomically).
      base_model_name_or_path: recorded in the config, as PEFT does (the base checkpoint).
      overwrite: write into `path` even if it holds other files.

    Returns:
      The directory written.

    Raises:
      ValueError: the model has no adapters, adapters of different ranks or alphas, or a
        kernel with no Hugging Face name (e.g. stacked layers).
    """
    wrapped = lora_modules(model)
    if not wrapped:
        raise ValueError("the model has no LoRA adapters (see jaxunlearn.models.lora.apply_lora).")
    settings = {(m.rank, m.alpha, m.use_rslora) for m in wrapped.values()}
    if len(settings) != 1:
        raise ValueError(f"PEFT stores one rank/alpha per adapter; the model has {settings}.")
    rank, alpha, use_rslora = settings.pop()
    hf_names = _hf_modules(model)
    tensors, targets = [], set()
    for name, m in wrapped.items():
        if name not in hf_names or m.lora_a.get_value().ndim != 2:
            raise ValueError(
                f"LoRA module {name} has no 2-D Hugging Face kernel to export to PEFT; "
                "export the merged model with save_pretrained(merge_lora(model), ...) instead."
            )
        hf = hf_names[name]
        targets.add(hf.rsplit(".", 1)[-1])
        for which, var in (("lora_A", m.lora_a), ("lora_B", m.lora_b)):
            x = var.get_value()

            def fetch(x=x):
                return np.ascontiguousarray(_to_host(x).T)

            key = f"{_PREFIX}{hf}.{which}.weight"
            tensors.append(_safetensors.TensorToWrite(key, x.shape[::-1], np.dtype(x.dtype), fetch))
    tensors.sort(key=lambda t: t.name)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": sorted(targets),
        "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with atomic_directory(path, overwrite=overwrite) as tmp:
        if jax.process_index() != 0:  # other hosts join the gathers; process 0 writes
            for t in tensors:
                t.fetch()
        else:
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
            _safetensors.write_file(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    return Path(path)


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``adapter_config.json`` of a PEFT LoRA adapter directory."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a PEFT adapter directory.")
    config = json.loads(file.read_text("utf-8"))
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {config.get('peft_type')!r}; only LORA is read.")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise ValueError(f"{file}: {key}=true is not supported; only plain LoRA is read.")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{file}: a per-module {key} is not supported (one r and alpha).")
    if config.get("modules_to_save"):
        raise ValueError(f"{file}: modules_to_save is not supported; only LoRA weights are read.")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float):
            raise ValueError(f"{file}: field {key!r} is missing or not a number.")
    return config


# base_model.model.<module>.lora_A.weight (PEFT also accepts .lora_A.default.weight)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(\.default)?\.weight$")


def _adapter_tensors(path: Path, file: _safetensors.SafetensorsFile) -> dict[str, dict[str, str]]:
    """{HF module name: {"A": key, "B": key}} from the safetensors keys."""
    out: dict[str, dict[str, str]] = {}
    for key in file.tensors:
        m = _KEY.match(key)
        if m is None:
            raise ValueError(
                f"{path / ADAPTER_WEIGHTS}: tensor {key!r} is not a PEFT LoRA weight "
                f"({_PREFIX}<module>.lora_A.weight / .lora_B.weight)."
            )
        out.setdefault(m["module"], {})[m["which"]] = key
    return out


def load_peft_adapter(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> nnx.Module:
    """A LoRA copy of `model` carrying the adapters of a PEFT directory.

    Everything is checked before any tensor is read: every adapted module must exist in
    `model` with matching in/out sizes and rank, so an adapter made for another base model
    is refused with a message saying so.

    Args:
      model: the base model port (not LoRA-wrapped).
      path: a PEFT LoRA adapter directory.
      base_model_name_or_path: when given, must equal the adapter config's field of that
        name (refuses an adapter trained on another checkpoint of the same shape).

    Returns:
      The wrapped model (see `apply_lora`) with the adapter's values.

    Raises:
      FileNotFoundError: missing files.
      ValueError: an unsupported config, or an adapter for another base model.
    """
    path = Path(path)
    config = read_adapter_config(path)
    where = f"adapter {path} (base_model_name_or_path={config.get('base_model_name_or_path')!r})"
    if base_model_name_or_path is not None and config.get("base_model_name_or_path") not in (
        None,
        base_model_name_or_path,
    ):
        raise ValueError(
            f"{where} was made for another base model, not {base_model_name_or_path!r}."
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path / ADAPTER_WEIGHTS} not found.")
    file = _safetensors.SafetensorsFile(path / ADAPTER_WEIGHTS)
    modules = _adapter_tensors(path, file)
    ours = {hf: name for name, hf in _hf_modules(model).items()}
    shapes = _adapter_shapes(model)
    rank = int(config["r"])
    for hf, keys in sorted(modules.items()):
        if set(keys) != {"A", "B"}:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: module {hf} lacks lora_A or lora_B.")
        if hf not in ours:
            raise ValueError(
                f"{where} was made for another base model: it adapts {hf}, which this "
                f"{model_config(model).model_type} model with "
                f"{model_config(model).num_hidden_layers} layers does not have."
            )
        d_in, d_out = shapes[ours[hf]]
        a, b = file.tensors[keys["A"]].shape, file.tensors[keys["B"]].shape
        if a != (rank, d_in) or b != (d_out, rank):
            raise ValueError(
                f"{where} was made for another base model: {hf} has lora_A {list(a)} and lora_B "
                f"{list(b)}, but this model's {hf} maps {d_in} -> {d_out} features (expected "
                f"lora_A [{rank}, {d_in}], lora_B [{d_out}, {rank}] with r={rank})."
            )
    names = {ours[hf].rsplit(".", 1)[-1] for hf in modules}
    wrapped = apply_lora(
        model,
        rank=rank,
        alpha=float(config["lora_alpha"]),
        targets=names,
        use_rslora=bool(config.get("use_rslora", False)),
        modules={ours[hf] for hf in modules},
    )
    by_name = lora_modules(wrapped)
    for hf, keys in modules.items():
        m = by_name[ours[hf]]
        dtype = m.lora_a.get_value().dtype
        m.lora_a.set_value(jax.numpy.asarray(np.array(file.get(keys["A"])).T, dtype))
        m.lora_b.set_value(jax.numpy.asarray(np.array(file.get(keys["B"])).T, dtype))
    return wrapped


def load_pretrained_with_adapter(
    path: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    merge: bool = True,
    **load_options: Any,
) -> nnx.Module:
    """A Hugging Face base model with a PEFT LoRA adapter on it (e.g. for evaluation).

    The adapter's config is read and checked before the base weights are loaded, and its
    module shapes before any adapter tensor is read (see `load_peft_adapter`), so an
    adapter for another base model is refused early.

    Args:
      path: the base model's Hugging Face directory (as for `load_pretrained`).
      adapter: a PEFT LoRA adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors``), e.g. from ``jaxunlearn unlearn --save-adapter``.
      merge: fold the adapters into the kernels (`merge_lora`): a plain model, as fast as
        the base; False keeps the `LoRALinear` wrappers.
      **load_options: passed to `load_pretrained` (dtype, mesh, remat, attention, ...).

    Returns:
      The model with the adapter applied.

    Raises:
      FileNotFoundError, ValueError: as `load_pretrained` and `load_peft_adapter`.
    """
    from jaxunlearn.checkpoints.hf import load_pretrained
    from jaxunlearn.models.lora import merge_lora

    read_adapter_config(adapter)  # a bad adapter fails before the base weights load
    if load_options.get("scan_layers"):
        raise ValueError(
            f"adapter {adapter}: PEFT adapters name per-layer modules; load the base without "
            "scan_layers."
        )
    model = load_peft_adapter(load_pretrained(path, **load_options), adapter)
    return merge_lora(model) if merge else model


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "load_peft_adapter",
    "load_pretrained_with_adapter",
    "read_adapter_config",
    "save_peft_adapter",
]
