"""Model and training checkpoints: Hugging Face directories, orbax, and conversion.

- `load_pretrained` / `save_pretrained` / `load_tokenizer`: Hugging Face directories
  (config.json + safetensors), placed straight onto a mesh when loading.
- `TrainCheckpointer`: asynchronous, atomic, rotating orbax checkpoints of a training state,
  restorable onto a different mesh; `save_model_orbax` / `load_model_orbax` for models.
- `save_peft_adapter` / `load_peft_adapter`: LoRA adapters in PEFT's format;
  `load_pretrained_with_adapter`: a base model directory with a PEFT adapter on it.
- `convert.convert`: Hugging Face <-> orbax (the ``jaxunlearn convert`` command). The function is not re-exported here so that `checkpoints.convert` stays the
  module.
"""

from jaxunlearn.checkpoints import convert
from jaxunlearn.checkpoints.hf import load_pretrained, load_tokenizer, save_pretrained
from jaxunlearn.checkpoints.orbax import (
    TrainCheckpointer,
    abstract_target,
    load_model_orbax,
    save_model_orbax,
)
from jaxunlearn.checkpoints.peft import (
    load_peft_adapter,
    load_pretrained_with_adapter,
    save_peft_adapter,
)

__all__ = [
    "TrainCheckpointer",
    "abstract_target",
    "convert",
    "load_model_orbax",
    "load_peft_adapter",
    "load_pretrained",
    "load_pretrained_with_adapter",
    "load_tokenizer",
    "save_model_orbax",
    "save_peft_adapter",
    "save_pretrained",
]
