"""Tensor-parallel sharding rules: which parameter dimension goes on the ``"model"`` mesh axis.

Megatron-style tensor parallelism for the Llama-family ports, combined with FSDP:

- column-parallel (output features split over ``"model"``): ``q_proj``, ``k_proj``,
  ``v_proj`` (so each device holds whole attention heads and whole KV heads) and the MLP's
  ``gate_proj`` / ``up_proj`` (its hidden features);
- row-parallel (input features split): ``o_proj`` and ``down_proj``, so attention and the MLP
  each need one reduction over ``"model"``;
- vocabulary-parallel: ``embed_tokens.embedding [V, D]`` and ``lm_head.kernel [D, V]`` split
  along V (parameters and optimizer state stored split). `jaxunlearn.scores`' chunked
  log-softmax slices the head per chunk, for which the compiler gathers the head's V
  columns; `jaxunlearn.vocab_parallel.token_logprob` computes the same log-probs from each
  device's own columns;
- everything else (norms), and the other dimension of every split tensor, follows the FSDP
  rule of `jaxunlearn.parallel.fsdp_spec` on the ``"fsdp"`` axis.

LoRA adapters (`jaxunlearn.models.lora`) follow their kernel: a column-parallel kernel's
``lora_b [r, out]`` is split along ``out``, a row-parallel kernel's ``lora_a [in, r]`` along
``in``; the rank dimension is never split over ``"model"``. Leading stacked-layer axes stay unsplit. The rules
match a tensor by the names in its pytree path, so they apply unchanged to optimizer states
(Adam's ``mu``/``nu`` mirror the parameters).

The mesh's axes are `Auto`, so the compiler inserts the collectives; the rules only decide
where parameters (and, through them, activations) live.

Example:
  >>> from jaxunlearn import parallel, parallel_rules                      # doctest: +SKIP
  >>> mesh = parallel.mesh(data=1, fsdp=2, model=4)  # doctest: +SKIP
  >>> parallel_rules.check_model_axis(model.config, mesh)  # doctest: +SKIP
  >>> shardings = parallel_rules.param_sharding(nnx.state(model, nnx.Param), mesh)  # doctest: +SKIP

References:
  Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
  Parallelism", arXiv:1909.08053 (column/row-parallel MLP and attention, parallel vocab).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxunlearn.parallel import fsdp_spec

MODEL_AXIS = "model"
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})
VOCAB_PARALLEL = {"embed_tokens": ("embedding", -2), "lm_head": ("kernel", -1)}


def _names(path: Sequence[Any]) -> list[str]:
    """The string keys of a pytree path (dict keys, attribute names, indices as str)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return out


def model_dim(names: Sequence[str], ndim: int) -> int | None:
    """Which dimension (negative index) of the tensor at `names` goes on ``"model"``, if any.

    Args:
      names: the tensor's path, e.g. ``["layers", "0", "attn", "q_proj", "kernel"]``
        (optimizer-state prefixes and a trailing ``"value"`` are allowed).
      ndim: the tensor's rank.

    Returns:
      A negative dimension index, or None for tensors that are not split over ``"model"``.
    """
    names = [n for n in names if n != "value"]
    if not names or ndim < 1:
        return None
    leaf = names[-1]
    modules = names[:-1]
    for owner, (leaf_name, dim) in VOCAB_PARALLEL.items():
        if modules and modules[-1] == owner and leaf == leaf_name and ndim >= 2:
            return dim
    module = next((m for m in reversed(modules) if m in COLUMN_PARALLEL | ROW_PARALLEL), None)
    if module is None:
        return None
    column = module in COLUMN_PARALLEL
    if leaf == "kernel" and ndim >= 2:
        return -1 if column else -2
    if leaf == "bias":
        return -1 if column else None
    if leaf == "lora_b" and column and ndim >= 2:
        return -1
    if leaf == "lora_a" and not column and ndim >= 2:
        return -2
    return None


def tensor_spec(
    names: Sequence[str], shape: Sequence[int], model_size: int, fsdp_size: int, *, strict=True
) -> P:
    """The `PartitionSpec` of one tensor on a ``(data, fsdp, model)`` mesh.

    The ``"model"`` dimension comes from `model_dim`; ``"fsdp"`` then takes the largest
    other dimension it divides (`jaxunlearn.parallel.fsdp_spec`).

    Args:
      names: the tensor's path names.
      shape: its shape.
      model_size: size of the ``"model"`` axis.
      fsdp_size: size of the ``"fsdp"`` axis.
      strict: raise when ``"model"`` does not divide the dimension it should split; when
        False (for tensors shaped unlike the parameters, e.g. a transform's bases) fall back
        to FSDP only.

    Raises:
      ValueError: with `strict`, a dimension that ``"model"`` does not divide (the message
        names the tensor, the axis and both sizes).
    """
    shape = tuple(shape)
    dim = model_dim(names, len(shape)) if model_size > 1 else None
    if dim is not None and shape[dim] % model_size:
        if strict:
            raise ValueError(
                f"mesh axis {MODEL_AXIS!r} of size {model_size} does not divide dimension "
                f"{len(shape) + dim} (size {shape[dim]}) of {'.'.join(names)} {list(shape)}; "
                f"choose a model axis size that divides {shape[dim]}."
            )
        dim = None
    if dim is None:
        return fsdp_spec(shape, fsdp_size)
    axis = len(shape) + dim
    others = [d for i, d in enumerate(shape) if i != axis]
    rest = list(fsdp_spec(others, fsdp_size))
    rest += [None] * (len(others) - len(rest))
    rest.insert(axis, MODEL_AXIS)
    spec = rest
    return P(*spec)


def param_sharding(abstract_state: Any, mesh: Mesh, *, strict: bool = True) -> Any:
    """Tensor-parallel + FSDP shardings for a pytree of parameters (or optimizer state).

    A drop-in for `jaxunlearn.parallel.param_sharding` that also uses the ``"model"`` axis.

    Args:
      abstract_state: a pytree whose leaves have ``.shape`` (arrays, `ShapeDtypeStruct`s,
        an ``nnx.State``), with the model's parameter names in the paths.
      mesh: a ``(data, fsdp, model)`` mesh from `jaxunlearn.parallel.mesh`.
      strict: see `tensor_spec` (use False for optimizer states of shape-changing
        transforms).

    Returns:
      The same structure with a `NamedSharding` per leaf.

    Raises:
      ValueError: with `strict`, a tensor whose model-parallel dimension the axis does not
        divide.
    """
    model_size = mesh.shape.get(MODEL_AXIS, 1)
    fsdp_size = mesh.shape.get("fsdp", 1)

    def one(path, x):
        spec = tensor_spec(_names(path), x.shape, model_size, fsdp_size, strict=strict)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def check_model_axis(cfg: Any, mesh: Mesh) -> None:
    """Checks that the ``"model"`` axis divides what tensor parallelism splits.

    Args:
      cfg: a `jaxunlearn.models.ModelConfig` (Llama family).
      mesh: the mesh.

    Raises:
      ValueError: naming the axis, its size and each of attention heads, KV heads, MLP hidden
        size and vocabulary that it does not divide.
    """
    size = mesh.shape.get(MODEL_AXIS, 1)
    if size == 1:
        return
    sizes = {
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
    }
    bad = {name: n for name, n in sizes.items() if n % size}
    if bad:
        listed = ", ".join(f"{name}={n}" for name, n in bad.items())
        raise ValueError(
            f"mesh axis {MODEL_AXIS!r} has size {size}, which does not divide {listed}; tensor "
            f"parallelism splits heads, KV heads, the MLP hidden size and the vocabulary over "
            f"it. Choose a model axis size dividing all of {sizes}."
        )


__all__ = [
    "COLUMN_PARALLEL",
    "MODEL_AXIS",
    "ROW_PARALLEL",
    "VOCAB_PARALLEL",
    "check_model_axis",
    "model_dim",
    "param_sharding",
    "tensor_spec",
]
