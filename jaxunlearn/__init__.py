"""jaxunlearn: JAX-native, functional machine unlearning for Hugging Face causal LMs.

Unlearning is three composable, pure pieces: an objective (a loss transform built from
shared per-token scores), an optax gradient transformation, and a schedule of forget /
retain batches. See the README in the repository for the architecture.
"""

import importlib

__version__ = "0.1.0"

# Public names resolved lazily so `import jaxunlearn` stays cheap and a CLI call pays only
# for what it uses.
_LAZY = {
    "load_pretrained": "jaxunlearn.checkpoints",
    "save_pretrained": "jaxunlearn.checkpoints",
    "unlearn": "jaxunlearn.train",
}
_SUBMODULES = (
    "models", "checkpoints", "scores", "objectives", "transforms", "data", "eval",
    "parallel", "recipes", "train", "bilevel", "plan", "classifiers", "distributed", "cli",
)  # fmt: skip


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxunlearn.{name}")
    raise AttributeError(f"module 'jaxunlearn' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY, *_SUBMODULES]
