"""RMU: representation misdirection on one decoder layer's hidden states.

The forget term pushes the layer-l activations of forget tokens towards a fixed random
direction c·u; the retain term keeps retain activations at the frozen model's. Only a few
weight matrices are trained: `rmu_param_labels` builds the `optax.partition` labels.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxunlearn.objectives._base import (
    ForgetRetain,
    Term,
    run_model,
    run_reference,
    sequence_batch,
)
from jaxunlearn.scores import IGNORE_INDEX


def rmu_control_vector(key: jax.Array | int, hidden_size: int, steering_coeff: float) -> jax.Array:
    """The RMU target c·u with u = r/||r||, r ~ Uniform[0, 1)^hidden_size.

    Uniform, not Gaussian, as in the official code (`torch.rand`). Draw it once per forget
    corpus; the same key always gives the same vector.

    Args:
      key: a PRNG key or an int seed.
      hidden_size: the model's hidden size D.
      steering_coeff: c, the target norm.

    Returns:
      float32 [D].
    """
    key = jax.random.key(key) if isinstance(key, int) else key
    direction = jax.random.uniform(key, (hidden_size,), jnp.float32)
    return steering_coeff * direction / jnp.linalg.norm(direction)


def _layer_hidden(out: Any, layer: int, name: str) -> jax.Array:
    states = getattr(out, "hidden_states", None) or {}
    if layer not in states:
        raise ValueError(
            f"{name}: the model output has no hidden state for decoder layer {layer} (got "
            f"{sorted(states)}); the model must return out.hidden_states[{layer}] when "
            f"called with hidden_layers=({layer},)."
        )
    return states[layer].astype(jnp.float32)


def activation_loss(
    hidden: jax.Array, target: jax.Array, labels: jax.Array, *, ou_broadcast_quirk: bool = False
) -> jax.Array:
    """mean_i[ sum_t m_t · mean_d (h - target)^2 / sum_t m_t ], m_t = [labels_t != -100].

    The masked per-token mean, then per-sample mean (on the unshifted labels) that
    open-unlearning's `compute_activation_loss` intends (`src/trainer/unlearn/rmu.py`). Its code
    divides a [B] vector of masked sums S by a [B, 1] vector of token counts N, which
    broadcasts to a [B, B] matrix, so it actually returns mean_i(S_i) · mean_i(1 / N_i);
    the two agree when all sequences have the same number of scored tokens.
    `ou_broadcast_quirk=True` reproduces the code for parity runs. A sequence with no
    scored token counts as one token rather than giving NaN.
    """
    mask = (labels != IGNORE_INDEX).astype(jnp.float32)
    per_token = jnp.mean((hidden - target) ** 2, axis=-1)
    sums = (per_token * mask).sum(-1)
    counts = jnp.maximum(mask.sum(-1), 1.0)
    if ou_broadcast_quirk:
        return (sums[None, :] / counts[:, None]).mean()
    return (sums / counts).mean()


def rmu_forget(
    *,
    layer: int = 7,
    steering_coeff: float = 2.0,
    control_vector: jax.Array | None = None,
    key: jax.Array | int = 0,
    ou_broadcast_quirk: bool = False,
) -> Term:
    """RMU forget term: activation MSE of forget tokens to the control vector c·u.

    The target is, in order of precedence: `batch["control_vector"]` ([D] or [B, D], e.g.
    one per forget corpus), `control_vector`, or `rmu_control_vector(key, D,
    steering_coeff)` drawn from the fixed key (a constant of the compiled step).

    Args:
      layer: 0-based decoder layer whose output is steered (7 = HF hidden_states[8]).
      steering_coeff: c, used when the vector is drawn from `key`.
      control_vector: the full target c·u [D], already scaled.
      key: PRNG key or int seed for drawing u.
      ou_broadcast_quirk: reproduce open-unlearning's [B, B] broadcast (`activation_loss`).

    Returns:
      A term.

    References:
      Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With
      Unlearning", arXiv 2403.03218 (2024); open-unlearning `rmu.py`.
    """

    def term(forward, batch, *, ref_forward=None):
        del ref_forward
        batch = sequence_batch(batch, "rmu_forget")
        hidden = _layer_hidden(
            run_model(forward, batch, hidden_layers=(layer,)), layer, "rmu_forget"
        )
        target = batch.get("control_vector", control_vector)
        if target is None:
            target = rmu_control_vector(key, hidden.shape[-1], steering_coeff)
        target = jnp.asarray(target, jnp.float32)
        target = target[:, None, :] if target.ndim == 2 else target
        loss = activation_loss(
            hidden, target, batch["labels"], ou_broadcast_quirk=ou_broadcast_quirk
        )
        return loss, {}

    return term


def rmu_retain(*, layer: int = 7, ou_broadcast_quirk: bool = False) -> Term:
    """RMU retain term (open-unlearning `EMBED_DIFF`): activation MSE to the frozen model.

    Same masked per-token-then-per-sample mean as the forget term, against the layer-l
    hidden states of `ref_forward` on the retain batch.

    Args:
      layer: 0-based decoder layer.
      ou_broadcast_quirk: reproduce open-unlearning's [B, B] broadcast (`activation_loss`).

    Returns:
      A term that requires `ref_forward`.
    """

    def term(forward, batch, *, ref_forward=None):
        batch = sequence_batch(batch, "rmu_retain")
        ref_out = run_reference(ref_forward, batch, "rmu_retain", hidden_layers=(layer,))
        reference = _layer_hidden(ref_out, layer, "rmu_retain (reference)")
        hidden = _layer_hidden(
            run_model(forward, batch, hidden_layers=(layer,)), layer, "rmu_retain"
        )
        loss = activation_loss(
            hidden, reference, batch["labels"], ou_broadcast_quirk=ou_broadcast_quirk
        )
        return loss, {}

    return term


def rmu(
    *,
    layer: int = 7,
    steering_coeff: float = 2.0,
    alpha: float | jax.Array = 1.0,
    gamma: float | jax.Array = 1.0,
    control_vector: jax.Array | None = None,
    key: jax.Array | int = 0,
    ou_broadcast_quirk: bool = False,
) -> ForgetRetain:
    """RMU: gamma · forget activation MSE to c·u + alpha · retain MSE to the reference.

    Defaults follow open-unlearning's WMDP experiment (c = 2, alpha = 1;
    `configs/experiment/unlearn/wmdp/default.yaml`);
    the official Zephyr-7B runs use c = 6.5, alpha = 1200 and open-unlearning's trainer
    yaml c = 300, alpha = 1000: the scale depends on the model's activation norms. Train
    only the chosen matrices with `rmu_param_labels` and `optax.partition`.

    Args:
      layer: 0-based decoder layer (7 = HF hidden_states[8]).
      steering_coeff: c, the control vector's norm.
      alpha: retain weight.
      gamma: forget weight.
      control_vector: full target c·u [D]; drawn from `key` when None.
      key: PRNG key or int seed for the control vector.
      ou_broadcast_quirk: reproduce open-unlearning's [B, B] broadcast in both terms
        (see `activation_loss`); default is the intended per-sample mean.

    Returns:
      A `ForgetRetain` objective; it requires `ref_forward`.

    References:
      Li et al., "The WMDP Benchmark", arXiv 2403.03218 (2024).
    """
    if isinstance(steering_coeff, int | float) and steering_coeff <= 0:
        raise ValueError(f"rmu: steering_coeff must be > 0, got {steering_coeff}.")
    forget = rmu_forget(
        layer=layer,
        steering_coeff=steering_coeff,
        control_vector=control_vector,
        key=key,
        ou_broadcast_quirk=ou_broadcast_quirk,
    )
    retain = rmu_retain(layer=layer, ou_broadcast_quirk=ou_broadcast_quirk)
    return ForgetRetain(forget, retain, gamma=gamma, alpha=alpha)


def _path_name(path: Sequence[Any]) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def rmu_param_labels(
    params: Any,
    layers: Sequence[int] = (5, 6, 7),
    module: str = "mlp.down_proj",
    *,
    layers_name: str = "layers",
) -> Any:
    """Label tree for `optax.partition` training only RMU's chosen matrices.

    A leaf is "trainable" when its path contains `<layers_name>.<i>.<module>` for an i in
    `layers` (e.g. "layers.6.mlp.down_proj.kernel"), else "frozen". Use it as

        optax.partition({"trainable": optax.adamw(5e-5), "frozen": optax.set_to_zero()},
                        rmu_param_labels(params))

    (`optax.masked` alone would pass frozen gradients through unchanged.)

    Args:
      params: the parameter pytree (an `nnx.State` from `nnx.split`, or nested dicts).
      layers: decoder layer indices to train (the WMDP default is 5, 6, 7).
      module: dotted module path inside a layer.
      layers_name: name of the layer list in the parameter tree.

    Returns:
      A pytree like `params` with "trainable" / "frozen" string leaves.
    """
    choice = "|".join(str(int(i)) for i in layers)
    pattern = re.compile(rf"(^|\.){re.escape(layers_name)}\.({choice})\.{re.escape(module)}(\.|$)")
    names = []

    def label(path, leaf):
        del leaf
        name = _path_name(path)
        names.append(name)
        return "trainable" if pattern.search(name) else "frozen"

    labels = jax.tree_util.tree_map_with_path(label, params)
    if not any(pattern.search(n) for n in names):
        raise ValueError(
            f"rmu_param_labels: no parameter matches {layers_name}.{{{choice}}}.{module}; "
            f"parameter paths look like {names[:4]}. Adjust layers, module or layers_name."
        )
    return labels
