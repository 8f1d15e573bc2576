"""Hugging Face tensor names and layouts for the vision ports (ResNet, ViT).

The NNX modules use transformers' module names, so a parameter's Hugging Face name is its
dotted NNX path with the leaf renamed (``kernel``/``scale`` -> ``weight``, batch norm
``mean``/``var`` -> ``running_mean``/``running_var``) plus ResNet's ``classifier.1``
(transformers wraps the head in ``Sequential(Flatten, Linear)``). Layouts: a dense kernel
is the transpose of torch's [out, in] weight; a convolution kernel [kh, kw, in, out] is
torch's [out, in, kh, kw] permuted.

Older ViT checkpoints (those on the Hub, saved by transformers < 5) name the blocks
``vit.encoder.layer.N.attention.attention.query`` etc.; `modern_vit_name` renames them as
transformers 5 does on load.
"""

from __future__ import annotations

import re

import numpy as np

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_LEGACY_VIT = (
    (r"\.encoder\.layer\.(\d+)\.", r".layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(\.layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
)
# Hugging Face tensors with no counterpart in the ports: ignored on import.
IGNORED_HF = (r"\.num_batches_tracked$", r"^vit\.pooler\.")


def hf_name(name: str, model_type: str) -> str:
    """The Hugging Face tensor name of the NNX parameter / batch statistic `name`."""
    head, _, leaf = name.rpartition(".")
    out = f"{head}.{_LEAF_TO_HF.get(leaf, leaf)}" if head else _LEAF_TO_HF.get(leaf, leaf)
    if model_type == "resnet":
        out = re.sub(r"^classifier\.", "classifier.1.", out)
    return out


def nnx_name(hf: str, names: list[str], model_type: str) -> str | None:
    """The NNX name among `names` whose Hugging Face name is `hf` (None if none)."""
    table = {hf_name(n, model_type): n for n in names}
    return table.get(modern_vit_name(hf) if model_type == "vit" else hf)


def modern_vit_name(name: str) -> str:
    """A transformers < 5 ViT tensor name in transformers 5 naming (identity otherwise)."""
    for pattern, repl in _LEGACY_VIT:
        name = re.sub(pattern, repl, name)
    return name


def is_ignored(hf: str) -> bool:
    """Whether a Hugging Face tensor has no counterpart in the ports (BN counters, pooler)."""
    return any(re.search(p, hf) for p in IGNORED_HF)


def to_nnx(name: str, array: np.ndarray) -> np.ndarray:
    """Torch layout -> NNX layout for the parameter `name` (NNX dotted name)."""
    if name.endswith(".kernel") and array.ndim == 2:
        return array.T
    if name.endswith(".kernel") and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def to_hf(name: str, array: np.ndarray) -> np.ndarray:
    """NNX layout -> torch layout for the parameter `name` (NNX dotted name)."""
    if name.endswith(".kernel") and array.ndim == 2:
        return array.T
    if name.endswith(".kernel") and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array
