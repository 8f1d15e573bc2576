"""Multi-process batches: each process builds only the rows of the global batch it holds.

On a TPU pod (or several GPU hosts) every process runs the same program over one global
mesh. `jaxunlearn.parallel.shard_batch` asks every process for the *whole* global batch and
keeps the local rows; at scale that multiplies the host work (padding, reference log-probs,
transfers) by the number of processes. Here each process materialises only its share:

- `process_rows(mesh, global_rows)`: the contiguous rows of the global batch whose batch
  shards live on this process's devices (the batch is split over ``("data", "fsdp")``);
- `ProcessLocalSampler(sampler, mesh)`: wraps a `jaxunlearn.data.ForgetRetainSampler`;
  ``batch_at(step)`` returns only those rows, padded to the length the *global* batch would
  have, so global row ``i`` at step ``s`` is the same item as on one process: the
  (seed, step) order is preserved, whatever the number of processes;
- `place_process_batch(batch, mesh)`: assembles the global `jax.Array`s from the process-local
  rows with `jax.make_array_from_process_local_data` (no cross-host copy).

Example (on every process, after `jaxunlearn.parallel.initialize_distributed()`):
  >>> mesh = parallel.mesh(data=1, fsdp=-1)                              # doctest: +SKIP
  >>> local = ProcessLocalSampler(sampler, mesh)  # doctest: +SKIP
  >>> batch = place_process_batch(local.batch_at(step), mesh)           # global arrays  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxunlearn.data.batching import pad_to_bucket
from jaxunlearn.parallel import BATCH_AXES, batch_sharding


def _batch_shard_ids(mesh: Mesh) -> dict[Any, int]:
    """{device: index of its batch shard}, shards numbered along ``("data", "fsdp")``."""
    names = list(mesh.axis_names)
    out = {}
    for coords in np.ndindex(*mesh.devices.shape):
        device = mesh.devices[coords]
        shard = 0
        for axis in BATCH_AXES:
            i = names.index(axis)
            shard = shard * mesh.devices.shape[i] + coords[i]
        out[device] = shard
    return out


def _local_shards(mesh: Mesh) -> tuple[list[int], int]:
    ids = _batch_shard_ids(mesh)
    local = sorted({s for d, s in ids.items() if d.process_index == jax.process_index()})
    ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if not local or local != list(range(local[0], local[-1] + 1)):
        raise ValueError(
            f"process {jax.process_index()} holds batch shards {local} of {ways}: not one "
            "contiguous block, so it cannot read a contiguous share of the batch; build the "
            "mesh with jaxunlearn.parallel.mesh over jax.devices() (process-major order)."
        )
    return local, ways


def process_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows ``[start, stop)`` of a global batch that this process's devices hold.

    Args:
      mesh: the run's mesh (batches split over ``("data", "fsdp")``).
      global_rows: the global batch size.

    Returns:
      A slice of the batch dimension.

    Raises:
      ValueError: `global_rows` not divisible by ``data * fsdp``, or a mesh whose batch shards
        are not contiguous per process.
    """
    local, ways = _local_shards(mesh)
    if global_rows % ways:
        raise ValueError(
            f"global batch of {global_rows} rows is not divisible by data*fsdp = {ways}; choose "
            f"a batch size that is a multiple of {ways}."
        )
    per = global_rows // ways
    return slice(local[0] * per, (local[-1] + 1) * per)


def place_process_batch(batch: Any, mesh: Mesh) -> Any:
    """Global batch arrays from this process's rows (`jax.make_array_from_process_local_data`).

    Args:
      batch: pytree of numpy arrays holding this process's rows (see `process_rows`); scalars
        must be equal on every process and are replicated.
      mesh: the run's mesh.

    Returns:
      The pytree of global `jax.Array`s, sharded like `jaxunlearn.parallel.shard_batch`'s.
    """
    local, ways = _local_shards(mesh)
    sharding = batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_callback((), replicated, lambda idx: np.array(x))
        if x.shape[0] % len(local):
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has {x.shape[0]} local rows, not "
                f"divisible by this process's {len(local)} batch shards."
            )
        rows = x.shape[0] // len(local) * ways
        return jax.make_array_from_process_local_data(sharding, np.array(x), (rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(place, batch)


def replicate_on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Puts host-local leaves (equal on every process) onto `mesh`, replicated.

    Orbax refuses to save a single-device array in a multi-process run ("Cannot serialize host
    local jax.Array"); a PRNG key or a counter made with plain ``jax.numpy`` on each process is
    such an array. Leaves already sharded over `mesh` are returned as they are.

    Args:
      tree: a pytree of arrays.
      mesh: the run's mesh.

    Returns:
      The pytree with every leaf a global array on `mesh`.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def one(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, replicated, lambda idx: host[idx])

    return jax.tree.map(one, tree)


class ProcessLocalSampler:
    """This process's rows of a `ForgetRetainSampler`'s batches, padded like the global batch.

    Args:
      sampler: the global sampler (every process builds the same one).
      mesh: the run's mesh.

    It deliberately offers only ``batch_at`` (and ``seed``): `jaxunlearn.train.unlearn` then
    runs reference log-probs (NPO, DPO) inside the step instead of precomputing them per item
    on the host, which would need the global batch.

    Attributes:
      sampler: the wrapped sampler.
      mesh: the mesh.
      process_local: True (the driver places these batches with `place_process_batch`).
    """

    process_local = True

    def __init__(self, sampler: Any, mesh: Mesh):
        self.sampler = sampler
        self.mesh = mesh
        self.seed = getattr(sampler, "seed", None)

    def fingerprint(self) -> str:
        """The global sampler's fingerprint: every process resumes the same run."""
        return self.sampler.fingerprint()

    def batch_at(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """This process's rows of ``sampler.batch_at(step)`` (same values, same padding)."""
        examples = self.sampler.examples_at(step)
        pad = self.sampler._pad
        out = {}
        for name, items in examples.items():
            rows = process_rows(self.mesh, len(items))
            longest = max(len(e["input_ids"]) for e in items)
            fits = [b for b in pad["buckets"] if b >= longest]
            # The bucket of the whole batch (pad_to_bucket raises the usual error if none fits).
            buckets = fits[:1] or pad["buckets"]
            out[name] = pad_to_bucket(items[rows], **{**pad, "buckets": buckets})
        return out


__all__ = ["ProcessLocalSampler", "place_process_batch", "process_rows", "replicate_on_mesh"]
