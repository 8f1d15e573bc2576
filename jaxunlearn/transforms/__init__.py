"""Unlearning gradient transformations (optax) and parameter-importance tools.

Every transform is an `optax.GradientTransformationExtraArgs` usable inside `optax.chain`
with any optimizer. Transforms that combine forget and retain gradients take
``tx.update(forget_updates, state, params, retain_grads=g_r)``, where the training step
passes ``forget_updates = gamma · grad L_forget`` and ``retain_grads = alpha · grad
L_retain`` (L_forget is minimised, e.g. GA's negated cross-entropy).

- `retain_projection`, `whitened_retain_projection`: Geometric-disentanglement
  Unlearning (GU), the forget update projected off a retain-gradient subspace.
- `hardness_aware`: HAMU's closed-form constrained step (emits the update Delta).
- `fisher_dampening`: updates shrunk by retain importance (extra arg
  ``retain_importance=``).
- `fisher_diagonal`, `importance_abs`, `loss_free_loss`: importances.
- `ssd`, `lf_ssd`: one-shot Selective Synaptic Dampening and its loss-free variant.
"""

from jaxunlearn.transforms._dampening import fisher_dampening, lf_ssd, ssd
from jaxunlearn.transforms._fisher import fisher_diagonal, importance_abs, loss_free_loss
from jaxunlearn.transforms._hamu import HardnessAwareState, hardness_aware
from jaxunlearn.transforms._projection import (
    RetainProjectionState,
    retain_projection,
    whitened_retain_projection,
)

__all__ = [
    "HardnessAwareState",
    "RetainProjectionState",
    "fisher_dampening",
    "fisher_diagonal",
    "hardness_aware",
    "importance_abs",
    "lf_ssd",
    "loss_free_loss",
    "retain_projection",
    "ssd",
    "whitened_retain_projection",
]
