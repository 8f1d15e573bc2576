"""LoRA adapters as a wrapper of kernels: unlearn by training low-rank updates only.

`apply_lora(model, rank=8, alpha=16)` returns a copy of a model in which each chosen
``nnx.Linear`` (by default the attention projections q, k, v, o and the MLP's gate, up and
down) is wrapped by a `LoRALinear` computing ``base(x) + (alpha / r) * x @ A @ B``. Every
base weight of the copy (kernels, embeddings, norms) becomes a `Frozen` variable, which is
*not* an ``nnx.Param``; the adapters ``A [in, r]`` and ``B [r, out]`` are `nnx.LoRAParam`, a
subclass of ``nnx.Param``. So the library's functional split ``nnx.split(model, nnx.Param,
...)`` (`jaxunlearn.train.split_model`) yields exactly the adapters as the trainable state
and the frozen base as the rest (passed to the jitted step as an argument, FSDP-sharded on a
mesh): every objective and optax transformation of the
library (GU's retain projection, HAMU, ...) runs unchanged on adapter gradients, the
optimizer state has the adapters' size, and checkpoints hold the adapters only.

`merge_lora` folds the adapters into the kernels (``W + (alpha / r) A B``) and returns a plain
model that `jaxunlearn.checkpoints.save_pretrained` exports; `jaxunlearn.checkpoints.peft`
reads and writes adapters in PEFT's format; a LoRA model trains with the ordinary
``jaxunlearn.unlearn`` (only its adapters are ``nnx.Param``). GS-LoRA's group-sparse penalty
is in `jaxunlearn.transforms` (`group_sparse`).

Why not qwix's ``apply_lora_to_model``: it intercepts the model's matmuls at call time and
recognises a weight only while it is an ``nnx.Param``, so the base kernels would have to stay
trainable Params (the library's ``nnx.Param`` split would train and store optimizer state for
the whole base) and the model's class is replaced by a generated subclass. A wrapper of
``nnx.Linear`` keeps the model an ordinary NNX module whose Params are the adapters.

The initialisation follows LoRA (B = 0, so the wrapped model starts equal to the base) and
PEFT's default for A (uniform in ``[-1/sqrt(in), 1/sqrt(in)]``).

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
  Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA),
  arXiv:2312.03732.
  huggingface/peft, src/peft/tuners/lora/layer.py (initialisation and scaling).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models.layers import matmul

LoRAParam = nnx.LoRAParam

# Short target names -> the module names of the Llama-family ports (and Hugging Face's).
TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
_MODULE_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


class Frozen(nnx.Variable):
    """A base weight that LoRA training leaves untouched.

    Not an ``nnx.Param``: ``nnx.split(model, nnx.Param, ...)`` puts it in the constant rest
    of the model, never in the trained (and donated) state.
    """


class LoRALinear(nnx.Module):
    """``base(x) + scaling * (x @ A) @ B`` around a frozen ``nnx.Linear``.

    Works for a kernel with leading stacked-layer axes too (``[..., in, out]``): the adapters
    get the same leading axes, so a scan over layers slices them with the kernel.

    Args:
      base: the linear layer (its kernel should already be `Frozen`).
      rank: adapter rank r.
      alpha: LoRA's alpha; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with `use_rslora`).
      use_rslora: rank-stabilised scaling.
      rngs: randomness for A.

    Attributes:
      base: the wrapped layer.
      lora_a: ``[..., in, r]`` adapter (PEFT's ``lora_A.weight`` transposed).
      lora_b: ``[..., r, out]`` adapter, zero at initialisation.
      rank: r.
      alpha: alpha.
      use_rslora: whether the scaling is ``alpha / sqrt(r)``.
    """

    def __init__(
        self,
        base: nnx.Linear,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        rngs: nnx.Rngs,
    ):
        kernel = base.kernel.get_value()
        *stack, d_in, d_out = kernel.shape
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (*stack, d_in, rank), jnp.float32, -bound, bound)
        self.lora_a = LoRAParam(a.astype(kernel.dtype))
        self.lora_b = LoRAParam(jnp.zeros((*stack, rank, d_out), kernel.dtype))

    @property
    def scaling(self) -> float:
        """The factor multiplying ``A @ B``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def delta(self) -> jax.Array:
        """The kernel update ``scaling * A @ B`` (``[..., in, out]``, float32)."""
        a = self.lora_a.get_value().astype(jnp.float32)
        b = self.lora_b.get_value().astype(jnp.float32)
        return self.scaling * jnp.matmul(a, b)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        a = self.lora_a[...].astype(y.dtype)
        b = self.lora_b[...].astype(y.dtype)
        return y + self.scaling * matmul(matmul(x.astype(y.dtype), a), b)


# ----------------------------------------------------------------------------- surgery


def _node(root: Any, path: Sequence[Any]) -> Any:
    for key in path:
        root = root[key] if isinstance(key, int) else getattr(root, key)
    return root


def _set(root: Any, path: Sequence[Any], value: Any) -> None:
    parent, key = _node(root, path[:-1]), path[-1]
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _retype(model: nnx.Module, source: type, target: type, skip: type | None = None) -> None:
    """Replaces every `source` variable of `model` by a `target` one with the same value."""
    found = [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, source) and not (skip and isinstance(node, skip))
    ]
    for path, var in found:
        _set(model, path, target(var.get_value(), **var.get_metadata()))


def kernel_names(model: nnx.Module) -> list[str]:
    """The distinct attribute names of the model's ``nnx.Linear`` layers (LoRA targets)."""
    return sorted(
        {str(path[-1]) for path, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear) and path}
    )


def _module_names(targets: Iterable[str], model: nnx.Module) -> set[str]:
    if isinstance(targets, str):
        targets = [targets]
    names = {_MODULE_NAMES.get(t, t) for t in targets}
    if not names:
        raise ValueError("LoRA targets are empty; pass e.g. targets=('q', 'v').")
    available = kernel_names(model)
    missing = sorted(names - set(available))
    if missing:
        raise ValueError(
            f"LoRA targets {missing} match no kernel of {type(model).__name__}; its kernels "
            f"are {available} (short names {list(TARGETS)} stand for q_proj, ..., down_proj)."
        )
    return names


def is_lora(model: nnx.Module) -> bool:
    """Whether `model` carries LoRA adapters."""
    return any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model))


def apply_lora(
    model: nnx.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Iterable[str] = TARGETS,
    use_rslora: bool = False,
    rngs: nnx.Rngs | None = None,
    modules: Iterable[str] | None = None,
) -> nnx.Module:
    """A copy of `model` with LoRA adapters on the target kernels and everything else frozen.

    Args:
      model: a model port (e.g. from `jaxunlearn.checkpoints.load_pretrained`); left as is.
      rank: adapter rank r.
      alpha: LoRA alpha (scaling ``alpha / r``).
      targets: short names from `TARGETS` or module names (``"q_proj"``, GPT-2's
        ``"c_attn"``): every ``nnx.Linear`` with that attribute name gets an adapter.
      use_rslora: scale by ``alpha / sqrt(r)`` (rsLoRA).
      rngs: randomness for the A matrices (default ``nnx.Rngs(0)``).
      modules: restrict to these dotted module paths (``"layers.0.attn.q_proj"``); default all
        that match `targets`.

    Returns:
      The wrapped copy: its ``nnx.Param`` state is exactly the adapters.

    Raises:
      ValueError: a target matches no kernel (the message lists the kernel names), a bad rank,
        or a model that already has adapters.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}.")
    if is_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora it first.")
    names = _module_names(targets, model)
    model = nnx.clone(model)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    _retype(model, nnx.Param, Frozen)
    only = None if modules is None else set(modules)
    chosen = [
        (path, m)
        for path, m in nnx.iter_modules(model)
        if isinstance(m, nnx.Linear) and path and str(path[-1]) in names
        if only is None or ".".join(map(str, path)) in only
    ]
    for path, linear in chosen:
        wrapped = LoRALinear(linear, rank, alpha, use_rslora=use_rslora, rngs=rngs)
        _set(model, path, wrapped)
    return model


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """{dotted module path: `LoRALinear`} of a LoRA model, in model order."""
    return {
        ".".join(map(str, path)): m
        for path, m in nnx.iter_modules(model)
        if isinstance(m, LoRALinear)
    }


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A plain copy of a LoRA model with ``W + scaling * A @ B`` in each kernel.

    The result has the original model's structure and parameter names (every weight an
    ``nnx.Param`` again), so `jaxunlearn.checkpoints.save_pretrained` writes it as a Hugging
    Face directory.
    """
    if not is_lora(model):
        raise ValueError("the model has no LoRA adapters to merge (see apply_lora).")
    model = nnx.clone(model)
    wrapped = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]
    for path, m in wrapped:
        base = m.base
        kernel = base.kernel.get_value()
        merged = (kernel.astype(jnp.float32) + m.delta()).astype(kernel.dtype)
        base.kernel = Frozen(merged, **base.kernel.get_metadata())
        _set(model, path, base)
    _retype(model, Frozen, nnx.Param)
    return model


__all__ = [
    "TARGETS",
    "Frozen",
    "LoRALinear",
    "LoRAParam",
    "apply_lora",
    "is_lora",
    "kernel_names",
    "lora_modules",
    "merge_lora",
]
