"""Unlearning objectives as pure loss transforms, matching open-unlearning's numerics.

A *term* is `term(forward, batch, *, ref_forward=None) -> (loss, aux)`. It calls
`forward(input_ids=..., attention_mask=..., return_logits=False, hidden_layers=...)` and
scores `out.head` in vocabulary chunks (`jaxunlearn.scores`), so no [B, T, V] logits are
materialised. `ref_forward` is the frozen reference model's forward; its outputs are used
under stop_gradient. Reference sequence log-probs can instead be precomputed once per item
(`reference_logprob`) and stored as `batch["ref_logprob"]`.

A combined objective (`forget_retain`, `grad_diff`, `rmu`, `pdu`) takes an unlearning
batch {"forget", "retain", ("alternate")} and offers one protocol for the training step:

    state = objective.init_state()                    # None, or PDU's PDUState
    loss, aux = objective(forward, batch, ref_forward=ref_forward, state=state)
    state = objective.update_state(state, aux)        # after the parameter update

    # transforms that need the two gradients apart (GU, HAMU):
    gamma, alpha = objective.weights(state)
    L_f, aux_f = objective.forget_loss(forward, batch, ref_forward=ref_forward)
    L_r, aux_r = objective.retain_loss(forward, batch, ref_forward=ref_forward)
    # updates = gamma · grad L_f, retain_grads = alpha · grad L_r

`aux` always holds "loss", "forget_loss" and "retain_loss" (unweighted). A combined
objective's call runs the model once on the rows of all the parts its terms read, stacked
(`one_call=True`, the default: one forward and one backward pass, the same numbers) when
the forward is marked `rowwise` (`jaxunlearn.train.model_forward`'s are).
"""

from jaxunlearn.objectives._base import (
    ForgetRetain,
    Term,
    forget_retain,
    is_paired,
    paired,
    reference_logprob,
    weighted_sum,
)
from jaxunlearn.objectives._distillation import ceu, undial
from jaxunlearn.objectives._flat import flat, mean_token_probability
from jaxunlearn.objectives._likelihood import grad_ascent, grad_diff, kl_retain, nll, satimp, wga
from jaxunlearn.objectives._pdu import PDUState, PrimalDual, pdu, pdu_margin
from jaxunlearn.objectives._preference import dpo, idk_dpo, npo, simnpo
from jaxunlearn.objectives._rmu import (
    activation_loss,
    rmu,
    rmu_control_vector,
    rmu_forget,
    rmu_param_labels,
    rmu_retain,
)
from jaxunlearn.objectives._rows import rowwise

__all__ = [
    "ForgetRetain",
    "PDUState",
    "PrimalDual",
    "Term",
    "activation_loss",
    "ceu",
    "dpo",
    "flat",
    "forget_retain",
    "grad_ascent",
    "grad_diff",
    "idk_dpo",
    "is_paired",
    "kl_retain",
    "mean_token_probability",
    "nll",
    "npo",
    "paired",
    "pdu",
    "pdu_margin",
    "reference_logprob",
    "rmu",
    "rmu_control_vector",
    "rmu_forget",
    "rmu_param_labels",
    "rmu_retain",
    "rowwise",
    "satimp",
    "simnpo",
    "undial",
    "weighted_sum",
    "wga",
]
