"""The training layer: the jitted step, the reference model, metrics logging and the driver.

- `step`: `make_step` builds one `jax.jit` that differentiates an objective, runs an optax
  transformation (forget and retain gradients apart when the transformation asks for
  ``retain_grads``) and applies the update, with params and optimizer state donated.
- `reference`: which reference values an objective needs, and their precomputation.
- `logging`: JSON Lines and TensorBoard metrics.
- `loop`: `unlearn`, the run driver (deterministic batches, checkpoints, resume, guards).
- `ssd`: `ssd_unlearn`, Selective Synaptic Dampening as a one-shot run.
"""

from jaxunlearn.train.logging import MetricsLog, open_tensorboard
from jaxunlearn.train.loop import NonFiniteLossError, UnlearnResult, unlearn
from jaxunlearn.train.reference import ReferenceLogprobs, reference_parts
from jaxunlearn.train.ssd import ssd_unlearn, ssd_unlearn_sampler
from jaxunlearn.train.step import (
    CPU_MEMORY_SCHEDULING,
    StepBuilder,
    TrainStep,
    accumulate,
    call_objective,
    has_state_protocol,
    init_objective_state,
    keep_if_finite,
    learning_rate,
    loss_and_grads,
    make_step,
    micro_batches,
    model_forward,
    split_model,
    stop_requested,
    wants_retain_grads,
)

__all__ = [
    "CPU_MEMORY_SCHEDULING",
    "MetricsLog",
    "NonFiniteLossError",
    "ReferenceLogprobs",
    "StepBuilder",
    "TrainStep",
    "UnlearnResult",
    "accumulate",
    "call_objective",
    "has_state_protocol",
    "init_objective_state",
    "keep_if_finite",
    "learning_rate",
    "loss_and_grads",
    "make_step",
    "micro_batches",
    "model_forward",
    "open_tensorboard",
    "reference_parts",
    "split_model",
    "ssd_unlearn",
    "ssd_unlearn_sampler",
    "stop_requested",
    "unlearn",
    "wants_retain_grads",
]
