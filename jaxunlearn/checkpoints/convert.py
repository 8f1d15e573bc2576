"""Convert model checkpoints between Hugging Face directories and orbax, both ways.

The library side of ``jaxunlearn convert SRC DST --to orbax|hf`` (`jaxunlearn.cli.convert`). Weights keep their stored dtype
unless ``--dtype`` says otherwise; tokenizer and generation files are copied along, and the
destination appears atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from jaxunlearn.checkpoints import hf, orbax
from jaxunlearn.checkpoints._model import atomic_directory

FORMATS = ("orbax", "hf")
# Files that travel with the weights: tokenizer, chat template, generation defaults.
_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str,
    dtype: Any = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Converts a model checkpoint directory to the other format.

    Args:
      src: a Hugging Face directory (``to="orbax"``) or a `save_model_orbax` directory
        (``to="hf"``).
      dst: destination directory.
      to: ``"orbax"`` or ``"hf"``.
      dtype: store weights in this dtype (default: the dtype `src` stores).
      overwrite: write into `dst` even if it holds files that are not checkpoint files.
      allow_pickle: accept a ``pytorch_model.bin`` source (see `load_pretrained`).

    Returns:
      The directory written.

    Raises:
      ValueError: `to` is not a known format, or `src` is not a checkpoint of the other one.
    """
    if to not in FORMATS:
        raise ValueError(f"to={to!r} is not a checkpoint format; use one of {FORMATS}.")
    src = Path(src)
    if src.absolute() == Path(dst).absolute():
        raise ValueError(f"source and destination are both {src}; convert into a new directory.")
    if to == "orbax":
        dtype = dtype or hf.stored_dtype(src, allow_pickle=allow_pickle)
        model = hf.load_pretrained(src, dtype=dtype, allow_pickle=allow_pickle)
    else:
        dtype = dtype or orbax.stored_dtype(src)
        model = orbax.load_model_orbax(src, dtype=dtype)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        if to == "orbax":
            orbax.write_orbax_files(model, tmp, dtype=dtype)
        else:
            hf.write_hf_files(model, tmp, dtype=dtype)
        for name in _SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return Path(dst)
