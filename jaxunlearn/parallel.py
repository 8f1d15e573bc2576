"""One device mesh for the whole library: build it, shard parameters and batches over it.

The mesh has three axes, always in this order:

- ``"data"``: pure data parallelism (parameters replicated);
- ``"fsdp"``: data parallelism with parameters (and therefore optimizer state) sharded
  ZeRO-3 style, each parameter split along one dimension;
- ``"model"``: reserved for tensor parallelism; parameters are not split along it by
  `param_sharding`, so with the default size 1 it costs nothing.

Batches are split over ``("data", "fsdp")`` together, so the global batch is spread over
every device whatever the split between the two axes. The same program runs on one CPU,
a GPU node or a TPU pod: on several hosts call `initialize_distributed()` first and give
every host the same global batch (`shard_batch` keeps only the local rows).

Example:
  >>> import jax
  >>> from jaxunlearn import parallel
  >>> m = parallel.mesh(data=-1)          # every device on "data"
  >>> dict(m.shape) == {"data": jax.device_count(), "fsdp": 1, "model": 1}
  True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def mesh(
    data: int = -1, fsdp: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a ``("data", "fsdp", "model")`` mesh over `devices`.

    All axes use `AxisType.Auto`. jax >= 0.8 `make_mesh` defaults to `Explicit` axes, under
    which every matmul whose contracting dimension is sharded (exactly what FSDP does to a
    kernel) raises ``ShardingTypeError`` unless each call passes ``out_sharding=``. With
    `Auto` axes the compiler (GSPMD/Shardy) propagates shardings and inserts the
    all-gathers itself, so model code stays free of sharding annotations.

    Args:
      data: size of the data-parallel axis; -1 means all devices the other axes leave.
      fsdp: size of the parameter-sharding axis; -1 as for `data`.
      model: size of the tensor-parallel axis; -1 as for `data`.
      devices: devices to use (default: all devices of all hosts, `jax.devices()`).

    Returns:
      A `jax.sharding.Mesh` with axis names `AXES`.

    Raises:
      ValueError: if a size is not positive or -1, more than one size is -1, or the sizes
        do not fit the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "model": model}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; use a positive int or -1.")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh axes {free} are all -1; at most one axis can take the rest.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n % fixed:
            raise ValueError(
                f"mesh {sizes}: the fixed axes need a multiple of {fixed} devices, but there "
                f"are {n}; choose sizes whose product divides {n}."
            )
        sizes[free[0]] = n // fixed
    elif fixed != n:
        raise ValueError(
            f"mesh {sizes} covers {fixed} devices, but there are {n}; set one axis to -1 or "
            f"pass devices=jax.devices()[:{fixed}]."
        )
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
    """The FSDP partition spec of one parameter.

    Shards the largest dimension whose size the ``"fsdp"`` axis divides (the first such on
    ties); replicates the parameter when no dimension qualifies or `fsdp_size` is 1.

    Args:
      shape: the parameter's shape.
      fsdp_size: size of the mesh's ``"fsdp"`` axis.

    Returns:
      A `PartitionSpec` naming ``"fsdp"`` at most once.
    """
    if fsdp_size == 1:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], -i))
    return P(*(["fsdp" if i == axis else None for i in range(len(shape))]))


def param_sharding(abstract_state: Any, mesh: Mesh) -> Any:
    """FSDP shardings for a pytree of parameters.

    Args:
      abstract_state: any pytree whose leaves have a ``.shape`` (arrays,
        `jax.ShapeDtypeStruct`s, e.g. ``nnx.state(nnx.eval_shape(...), nnx.Param)``).
      mesh: a mesh from `mesh` (it must have an ``"fsdp"`` axis).

    Returns:
      A pytree of the same structure with a `NamedSharding` per leaf (see `fsdp_spec`).
    """
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size)), abstract_state
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading (batch) dimension over ``("data", "fsdp")``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host pytree of global-batch arrays onto `mesh`, split along the batch.

    Every host passes the same global batch (sample order depends only on seed and step,
    never on the device count); each host copies only the rows its own devices hold, so
    this works unchanged on several hosts. Scalars are replicated.

    Args:
      batch: pytree of numpy arrays whose leading dimension is the global batch size.
      mesh: a mesh from `mesh`.

    Returns:
      The same pytree of global `jax.Array`s sharded with `batch_sharding(mesh)`.

    Raises:
      ValueError: if a leaf's batch size is not divisible by ``data * fsdp``.
    """
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    sharding = batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())

    def place(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_callback(x.shape, replicated, lambda idx: np.array(x))
        if x.shape[0] % ways:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has {x.shape[0]} rows, not divisible by "
                f"data*fsdp = {ways} devices; choose a global batch size that is a multiple of {ways}."
            )
        # Copy the rows: on CPU, device_put aliases numpy memory, and loaders reuse buffers.
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.array(x[idx]))

    return jax.tree_util.tree_map_with_path(place, batch)


def place_batch(batch: Any, mesh: Mesh | None) -> Any:
    """A host batch on the devices: split along the batch over `mesh` (`shard_batch`), or on
    the default device when `mesh` is None."""
    if mesh is None:
        return jax.device_put(jax.tree.map(np.asarray, batch))
    return shard_batch(batch, mesh)


def place_split_model(params: Any, rest: Any, mesh: Mesh | None) -> tuple[Any, Any]:
    """Places a split model (``nnx.split(model, nnx.Param, ...)``) on `mesh`.

    Parameters and the rest of the state (e.g. a LoRA model's frozen base) both get FSDP
    shardings (`param_sharding`): a large frozen base is not replicated on every device. With
    no mesh both are returned unchanged.
    """
    if mesh is None:
        return params, rest
    params = jax.device_put(params, param_sharding(params, mesh))
    return params, jax.device_put(rest, param_sharding(rest, mesh))


def initialize_distributed(**kwargs: Any) -> None:
    """Connects the processes of a multi-host job; call once, before any other JAX call.

    A thin wrapper over `jax.distributed.initialize` that is a no-op when already
    initialized. On a TPU pod slice, Slurm or Open MPI every argument is detected
    automatically, so each host runs the *same* script::

        # gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python run.py"
        from jaxunlearn import parallel
        parallel.initialize_distributed()
        m = parallel.mesh(data=-1)   # now spans the devices of every host

    Elsewhere pass ``coordinator_address="host0:1234", num_processes=N, process_id=i``.
    After this, `jax.devices()` lists the devices of all hosts and the rest of the library
    (loading, sharding, checkpointing) works unchanged.

    Args:
      **kwargs: forwarded to `jax.distributed.initialize`.
    """
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**kwargs)
