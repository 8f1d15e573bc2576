"""What the Hugging Face and orbax formats share: config.json, abstract models, atomic dirs.

A model is loaded in three steps whatever the format: build it abstractly with
`nnx.eval_shape` (no memory for weights), fill each parameter from storage straight onto
its target sharding, then `nnx.merge`. A checkpoint directory is always written into a
hidden temporary sibling and renamed into place, so a crash never leaves a directory that
looks complete but is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn._io import recover_interrupted_save, staging_path, swap_into_place

CONFIG = "config.json"


def read_config(directory: str | os.PathLike) -> Any:
    """Reads and validates ``directory/config.json`` as a `jaxunlearn.models.ModelConfig`.

    Raises:
      FileNotFoundError: if there is no config.json.
      ValueError: if it is not JSON or describes an unsupported architecture.
    """
    from jaxunlearn.models import SUPPORTED_MODEL_TYPES, ModelConfig

    path = Path(directory) / CONFIG
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; pass a model directory.")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a Hugging Face model directory. Pass a "
            "directory holding config.json and model.safetensors (as written by "
            "save_pretrained)."
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore or re-save it.") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(d).__name__}.")
    if d.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type {d.get('model_type')!r} is not supported; supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)}. Use a checkpoint of one of these."
        )
    try:
        return ModelConfig.from_hf_dict(d, source=os.fspath(path))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed config ({type(e).__name__}: {e}); re-save it.") from e


def model_config(model: nnx.Module) -> Any:
    """The `ModelConfig` a model port was built from."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_hf_dict"):
        raise TypeError(
            f"{type(model).__name__} has no `.config` ModelConfig; only models built by "
            "jaxunlearn.models.build_model (or load_pretrained) can be saved this way."
        )
    return cfg


def path_name(path: tuple[Any, ...]) -> str:
    """Dotted parameter name, e.g. ``model.layers.0.attn.q_proj.kernel``."""
    return ".".join(map(str, path))


@dataclass
class AbstractModel:
    """A model port without parameter values.

    Attributes:
      graphdef: the model structure, for `nnx.merge`.
      params: {dotted name: `jax.ShapeDtypeStruct`} of every `nnx.Param`, in model order.
      variables: {dotted name: the abstract `nnx.Param`}, to rebuild the state from.
      rest: concrete non-parameter state (buffers, RNG streams), computed for real.
    """

    graphdef: Any
    params: dict[str, jax.ShapeDtypeStruct]
    variables: dict[str, tuple[tuple[Any, ...], nnx.Variable]]
    rest: nnx.State

    def merge(self, values: dict[str, jax.Array]) -> nnx.Module:
        """Builds the real model from one array per parameter name."""
        state = nnx.from_flat_state(
            [(path, var.replace(values[name])) for name, (path, var) in self.variables.items()]
        )
        return nnx.merge(self.graphdef, state, self.rest)


def abstract_model(cfg: Any, *, dtype: Any, param_dtype: Any, **options: Any) -> AbstractModel:
    """Builds `cfg`'s model abstractly: shapes and dtypes only, no parameter memory.

    `options` (scan_layers, remat, attention) go to `jaxunlearn.models.build_model`.
    """
    from jaxunlearn.models import build_model

    def build():
        return build_model(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **options)

    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    if jax.tree.leaves(rest):
        # Non-parameter state (e.g. precomputed tables) is not stored in checkpoints; build it
        # for real under jit, where the unused parameter initialisers are compiled away.
        rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    variables = {path_name(p): (p, v) for p, v in nnx.to_flat_state(params)}
    shapes = {name: v.get_value() for name, (_, v) in variables.items()}
    return AbstractModel(graphdef, shapes, variables, rest)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """{dotted name: array} of a model's `nnx.Param`s."""
    return {path_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_dtype(dtype: Any) -> jnp.dtype | None:
    """Normalises a dtype spelled as a numpy/jax dtype or a name ("bfloat16")."""
    return None if dtype is None else jnp.dtype(dtype)


# Files a Hugging Face or jaxunlearn checkpoint directory may hold; a directory holding only
# these is a checkpoint we may update, anything else is somebody's data.
_CHECKPOINT_FILE = re.compile(
    r"(config\.json|generation_config\.json|model.*\.safetensors(\.index\.json)?"
    r"|pytorch_model.*\.bin(\.index\.json)?|tokenizer.*|special_tokens_map\.json|vocab\..*"
    r"|merges\.txt|added_tokens\.json|chat_template\..*|params|README\.md|\..*)"
)
# What a save replaces: config and weights in either format. Stale shards of a previous save
# must not survive next to a new index.
_WEIGHT_FILE = re.compile(
    r"(config\.json|model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?"
    r"|params)"
)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _shared_token() -> str:
    """A random name suffix, the same on every host (process 0's)."""
    token = np.frombuffer(os.urandom(4), np.int32)[0]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = multihost_utils.broadcast_one_to_all(token)
    return f"{int(token) & 0xFFFFFFFF:08x}"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the old directory is deleted right after: no need for a copy
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Keeps files of `old` that the new save did not write (tokenizer, notes, ...)."""
    for entry in old.iterdir():
        if _WEIGHT_FILE.fullmatch(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes `path` only if the block succeeds.

    The temporary directory is a hidden sibling (same filesystem, so the final rename is
    atomic); on any error it is deleted and `path` is left as it was. A complete directory
    stays at `path` at every instant where the kernel can swap two directories atomically
    (Linux); elsewhere a crash between the two renames is repaired by the next save (or
    `jaxunlearn._io.recover_interrupted_save`), as are leftovers of killed saves. When `path` already
    exists, its config and weights are replaced and its other files (tokenizer, generation
    config, ...) are kept unless the new save wrote them too, as `transformers` does. With
    several hosts, every host gets the same path and process 0 does the renames.

    Args:
      path: the directory to create or update.
      overwrite: also write into `path` when it holds files that are not checkpoint files
        (they are kept).

    Raises:
      FileExistsError: if `path` is a file, or a non-empty directory that does not look like
        a checkpoint and `overwrite` is False.
    """
    dst = Path(path).absolute()
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory; choose another path.")
    if dst.is_dir() and not overwrite:
        foreign = sorted(p.name for p in dst.iterdir() if not _CHECKPOINT_FILE.fullmatch(p.name))
        if foreign:
            raise FileExistsError(
                f"{dst} is a non-empty directory that is not a checkpoint (it holds "
                f"{', '.join(foreign[:5])}); choose an empty or new directory, or pass "
                "overwrite=True to write the checkpoint into it anyway (other files are kept)."
            )
    leader = jax.process_index() == 0
    token = _shared_token()
    tmp = staging_path(dst, "tmp", token)
    if leader:
        recover_interrupted_save(dst)
        tmp.mkdir(parents=True)
    _barrier(f"jaxunlearn-mkdir-{tmp.name}")
    try:
        yield tmp
        _barrier(f"jaxunlearn-written-{tmp.name}")
        if leader:
            if dst.is_dir():
                _carry_over(dst, tmp)
            ready = staging_path(dst, "ready", token)
            os.rename(tmp, ready)  # complete: from here on a crash is recoverable
            tmp = ready
            swap_into_place(ready, dst)
        _barrier(f"jaxunlearn-renamed-{token}")
    except BaseException:
        if leader:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
