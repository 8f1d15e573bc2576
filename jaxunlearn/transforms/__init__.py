"""Unlearning gradient transformations (optax) and parameter-importance tools.

Every transform is an `optax.GradientTransformationExtraArgs` usable inside `optax.chain`
with any optimizer. Transforms that combine forget and retain gradients take
``tx.update(forget_updates, state, params, retain_grads=g_r, retain_weight=alpha)``, where the
training step passes ``forget_updates = gamma · grad L_forget``, the unweighted ``retain_grads
= grad L_retain`` and the retain weight alpha (L_forget is minimised, e.g. GA's negated
cross-entropy). The step does so for any chain that reads ``retain_grads``
(`jaxunlearn.train.wants_retain_grads`).

- `retain_projection`, `whitened_retain_projection`: Geometric-disentanglement
  Unlearning (GU), the forget update projected off a retain-gradient subspace.
- `hardness_aware`: HAMU's closed-form constrained step (emits the update Delta).
- `fisher_dampening`: updates shrunk by retain importance (extra arg
  ``retain_importance=``).
- `fisher_diagonal`, `importance_abs`, `loss_free_loss`: importances.
- `ssd`, `lf_ssd`: one-shot Selective Synaptic Dampening and its loss-free variant.
- `group_sparse`: GS-LoRA's group-lasso penalty on LoRA adapters, per decoder layer.
"""

from jaxunlearn.transforms._dampening import fisher_dampening, lf_ssd, ssd
from jaxunlearn.transforms._fisher import fisher_diagonal, importance_abs, loss_free_loss
from jaxunlearn.transforms._group_sparse import group_norms, group_sparse, group_sparse_penalty
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
    "group_norms",
    "group_sparse",
    "group_sparse_penalty",
    "hardness_aware",
    "importance_abs",
    "lf_ssd",
    "loss_free_loss",
    "retain_projection",
    "ssd",
    "whitened_retain_projection",
]
