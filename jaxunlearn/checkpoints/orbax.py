"""Orbax checkpoints: resumable training state, and models stored as orbax + config.json.

`TrainCheckpointer` is a thin wrapper over orbax's v0 `CheckpointManager` with
`StandardSave` / `StandardRestore`: saves run in the background, each step directory
appears atomically (orbax writes to a temporary name and renames it), old steps are
pruned to `max_to_keep`, and restoring takes an abstract target whose shardings decide
where the arrays land, so a run saved on one mesh resumes on another.

`save_model_orbax` / `load_model_orbax` store a model's parameters plus its
``config.json``, the orbax counterpart of `save_pretrained` / `load_pretrained`.

Example:
  >>> ckpt = TrainCheckpointer("runs/x/ckpt", max_to_keep=3)   # doctest: +SKIP
  >>> ckpt.save(step, {"params": params, "opt_state": opt_state, "rng": key},
  ...           metadata={"cursor": cursor})                    # doctest: +SKIP
  >>> state = ckpt.restore(abstract_state=abstract_target(state, mesh))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.checkpoints._model import (
    CONFIG,
    abstract_model,
    atomic_directory,
    flat_params,
    model_config,
    read_config,
    to_dtype,
)

PARAMS = "params"  # sub-directory of a model checkpoint holding the orbax pytree


def abstract_target(state: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) to restore a state like `state` into.

    Args:
      state: a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
      mesh: restore FSDP-sharded onto this mesh (`jaxunlearn.parallel.param_sharding`, which
        shards optimizer moments exactly like their parameters); default: keep each leaf's
        own sharding, or the default device when it has none.

    Returns:
      The same pytree of `jax.ShapeDtypeStruct` with `sharding` set.
    """
    if mesh is not None:
        shardings = parallel.param_sharding(state, mesh)
    else:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


class TrainCheckpointer:
    """Asynchronous, atomic, rotating checkpoints of a training state.

    Each save stores two items under ``directory/<step>/``: ``state``, any pytree of arrays
    (params, optimizer state, PRNG keys, step counters), and ``metadata``, a small JSON dict
    (data cursor, config) that can be read without touching the arrays.

    Args:
      directory: where step directories go (created if missing).
      max_to_keep: newest checkpoints kept; older ones are deleted (None keeps all).
      save_interval_steps: `save` only writes when ``step % save_interval_steps == 0``
        (unless forced).
      async_save: write in a background thread; `save` returns once arrays are copied.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a crashed save are not checkpoints
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "metadata")
        )

    def save(
        self, step: int, state: Any, *, metadata: dict | None = None, force: bool = False
    ) -> bool:
        """Starts saving `state` (and JSON `metadata`) as checkpoint `step`.

        Args:
          step: the training step; checkpoints are ordered by it.
          state: pytree of arrays to store; may be sharded over any mesh.
          metadata: small JSON-serialisable dict stored beside the arrays.
          force: save even if `save_interval_steps` says not to.

        Returns:
          Whether a save was started. Call `wait_until_finished` before reading it back.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(dict(metadata or {}))
        )
        return self._manager.save(step, args=args, force=force)

    def _step(self, step: int | None) -> int:
        self._manager.wait_until_finished()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}; nothing to restore.")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: "
                f"{list(self._manager.all_steps())}."
            )
        return step

    def restore(self, step: int | None = None, *, abstract_state: Any) -> Any:
        """Restores the state saved at `step` (default: the latest).

        Args:
          step: which checkpoint; None for the latest.
          abstract_state: pytree like the saved state whose leaves are
            `jax.ShapeDtypeStruct`s with shardings (see `abstract_target`) or arrays;
            arrays are restored with these shardings and dtypes, whatever mesh saved them.

        Returns:
          The restored pytree, with the structure of `abstract_state`.

        Raises:
          FileNotFoundError: no checkpoint (at `step`) in the directory.
        """
        step = self._step(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self._manager.restore(step, args=args)["state"]

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata saved with checkpoint `step` (default: the latest)."""
        step = self._step(step)
        return self._manager.restore(
            step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
        )["metadata"]

    def latest_step(self) -> int | None:
        """The newest step saved (including one still being written), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every step kept, oldest first."""
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- models


_STACK = "layers."  # stacked (scan_layers) parameters: "layers.attn.q_proj.kernel" [L, ...]


def _is_stacked(name: str) -> bool:
    return name.startswith(_STACK) and not name[len(_STACK) :].split(".", 1)[0].isdigit()


def _unstacked(params: dict[str, Any]) -> dict[str, Any]:
    """Per-layer names ("layers.3.attn.q_proj.kernel") for stacked-layer parameters."""
    out = {}
    for name, value in params.items():
        if not _is_stacked(name):
            out[name] = value
            continue
        for i in range(value.shape[0]):
            out[f"{_STACK}{i}.{name[len(_STACK) :]}"] = value[i]
    return out


def _stacked(values: dict[str, Any], names: dict[str, Any], layers: int) -> dict[str, Any]:
    """Values of per-layer names stacked into the stacked-layer `names` ([L, ...] each)."""
    out = {}
    for name in names:
        if _is_stacked(name):
            tail = name[len(_STACK) :]
            out[name] = jnp.stack([values.pop(f"{_STACK}{i}.{tail}") for i in range(layers)])
        else:
            out[name] = values.pop(name)
    return out


def write_orbax_files(model: nnx.Module, directory: Path, *, dtype: Any = None) -> None:
    """Writes config.json and the orbax parameter tree into an existing directory.

    Stacked layers (``scan_layers=True``) are stored per layer, as the Hugging Face files
    are, so one checkpoint loads with or without `scan_layers`."""
    # flat {dotted name: array}: the same names as hf_param_map of the unstacked model
    params = _unstacked(flat_params(model))
    if dtype is not None:
        params = {k: v.astype(dtype) for k, v in params.items()}
    stored = {str(v.dtype) for v in params.values()}
    config = model_config(model).to_hf_dict(dtype=stored.pop() if len(stored) == 1 else None)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS, params)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_model_orbax(
    model: nnx.Module, path: str | os.PathLike, *, dtype: Any = None, overwrite: bool = False
) -> Path:
    """Saves a model's parameters as an orbax checkpoint plus its config.json.

    Layout: ``path/config.json`` (Hugging Face spelling) and ``path/params/`` (orbax pytree
    keyed by dotted parameter name). The directory appears atomically.

    Args:
      model: a jaxunlearn model port.
      path: destination directory; in an existing checkpoint there the config and weights are
        replaced and other files are kept.
      dtype: store parameters in this dtype (default: as they are).
      overwrite: write into `path` even if it holds files that are not checkpoint files
        (they are kept).

    Returns:
      The directory written.
    """
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_orbax_files(model, tmp, dtype=dtype)
    return Path(path)


def load_model_orbax(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    scan_layers: bool = False,
    remat: str = "none",
    attention: str = "auto",
) -> nnx.Module:
    """Loads a model written by `save_model_orbax`.

    Args:
      path: the directory (``config.json`` + ``params/``).
      dtype: computation dtype.
      param_dtype: parameter dtype (default: the dtype they were stored in).
      mesh: restore FSDP-sharded onto this mesh; default: the default device.
      scan_layers: build the model with stacked, scanned layers (the stored per-layer
        tensors are stacked; see `jaxunlearn.models.LlamaForCausalLM`).
      remat: per-layer rematerialisation ("none", "matmuls", "full").
      attention: attention implementation ("auto", "einsum", "dot_product_attention").

    Returns:
      The model with restored parameters.

    Raises:
      FileNotFoundError: missing config.json or ``params/``.
      ValueError: unsupported model type, or stored parameters that do not match the config.
    """
    cfg = read_config(path)
    params_dir = Path(path).absolute() / PARAMS
    if not params_dir.is_dir():
        raise FileNotFoundError(
            f"{params_dir} not found: {path} is not an orbax model checkpoint (save one with "
            "save_model_orbax, or use load_pretrained for a Hugging Face directory)."
        )
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(params_dir).item_metadata.tree
        if param_dtype is None:
            param_dtype = next(iter(stored.values())).dtype
        options = dict(dtype=dtype, param_dtype=to_dtype(param_dtype), remat=remat,
                       attention=attention)  # fmt: skip
        # Checkpoints store layers one by one; older ones from a scanned model stacked.
        in_file = abstract_model(cfg, scan_layers=any(map(_is_stacked, stored)), **options)
        _check_stored(params_dir, in_file.params, stored)
        values = ckptr.restore(params_dir, abstract_target(in_file.params, mesh))
    model = abstract_model(cfg, scan_layers=scan_layers, **options)
    if set(values) != set(model.params):  # the file's layout is not the one asked for
        if scan_layers:
            values = _stacked(dict(values), model.params, cfg.num_hidden_layers)
        else:
            values = _unstacked(values)
        if mesh is not None:
            values = jax.device_put(values, abstract_target(model.params, mesh))
    return model.merge(values)


def _check_stored(params_dir: Path, expected: dict, stored: dict) -> None:
    problems = [f"tensor {k!r} is missing" for k in expected if k not in stored]
    problems += [
        f"tensor {k!r} has shape {list(stored[k].shape)}, expected {list(v.shape)}"
        for k, v in expected.items()
        if k in stored and tuple(stored[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise ValueError(
            f"{params_dir} does not match its config.json: {'; '.join(problems[:8])}. Check "
            "that config.json belongs to these parameters."
        )


def stored_dtype(path: str | os.PathLike) -> jnp.dtype:
    """The dtype an orbax model checkpoint's parameters are stored in."""
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(Path(path).absolute() / PARAMS).item_metadata.tree
    return jnp.dtype(next(iter(tree.values())).dtype)
