"""One device mesh for the whole library: build it, shard parameters and batches over it.

The mesh has three axes, always in this order:

- ``"data"``: pure data parallelism (parameters replicated);
- ``"fsdp"``: data parallelism with parameters (and therefore optimizer state) sharded
  ZeRO-3 style, each parameter split along one dimension;
- ``"model"``: tensor parallelism: with a size above 1, `param_sharding` splits attention
  heads, the MLP hidden dimension and the vocabulary along it (`jaxunlearn.parallel_rules`).

Batches are split over ``("data", "fsdp")`` together, so the global batch is spread over
every device whatever the split between the two axes. The same program runs on one CPU,
a GPU node or a TPU pod: on several hosts call `initialize_distributed()` first and give
every host the same global batch (`shard_batch` keeps only the local rows).

The run's numeric precision is a policy too (`precision_policy`): float32; bfloat16
compute with float32 master weights and optimizer state; or bfloat16 parameters with
float32 optimizer moments. Losses, log-softmax and metrics are float32 under every policy
(`jaxunlearn.scores` computes them in float32 whatever the model's dtype).

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
      A pytree of the same structure with a `NamedSharding` per leaf (see `fsdp_spec`). On a
      mesh whose ``"model"`` axis is larger than 1, tensor-parallel shardings by parameter
      name (`jaxunlearn.parallel_rules`: heads and MLP hidden split, vocabulary-parallel
      embedding and head), combined with FSDP.
    """
    if mesh.shape.get("model", 1) > 1:
        from jaxunlearn import parallel_rules

        # Non-strict: optimizer states of shape-changing transforms (GU's [rank, ...] basis)
        # fall back to FSDP where the model axis does not divide them.
        return parallel_rules.param_sharding(abstract_state, mesh, strict=False)
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


# ----------------------------------------------------------------------------- precision


class PrecisionPolicy(NamedTuple):
    """How a run stores and computes with its numbers.

    Models follow Flax's ``dtype`` / ``param_dtype`` convention: parameters are stored in
    `param_dtype` and cast to the compute dtype where they are used, so gradients come back
    in `param_dtype` and the training step needs no change for "bfloat16 compute, float32
    master weights". Scores, losses and metrics are float32 under every policy.

    Attributes:
      name: the policy's name (one of `PRECISIONS`).
      compute_dtype: dtype of activations and matmuls (the model's ``dtype``).
      param_dtype: storage dtype of the parameters (the model's ``param_dtype``).
      moment_dtype: dtype of the optimizer state (Adam's first and second moments).
    """

    name: str
    compute_dtype: Any
    param_dtype: Any
    moment_dtype: Any

    def model_kwargs(self) -> dict[str, Any]:
        """``dtype`` and ``param_dtype`` for `load_pretrained` / `build_model`."""
        return {"dtype": self.compute_dtype, "param_dtype": self.param_dtype}

    def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """`tx` made to keep its state in `moment_dtype` (wrapped only when needed)."""
        if jnp.dtype(self.moment_dtype) == jnp.dtype(self.param_dtype):
            return tx
        return float32_moments(tx)


PRECISIONS: dict[str, PrecisionPolicy] = {
    "float32": PrecisionPolicy("float32", jnp.float32, jnp.float32, jnp.float32),
    "bf16": PrecisionPolicy("bf16", jnp.bfloat16, jnp.float32, jnp.float32),
    "bf16-params": PrecisionPolicy("bf16-params", jnp.bfloat16, jnp.bfloat16, jnp.float32),
}


def precision_policy(name: str) -> PrecisionPolicy:
    """The precision policy called `name`.

    - ``"float32"``: everything in float32.
    - ``"bf16"``: bfloat16 compute, float32 master weights and optimizer state (mixed
      precision as in Micikevicius et al.; bfloat16 needs no loss scaling).
    - ``"bf16-params"``: bfloat16 parameters and compute, float32 optimizer moments (half
      the parameter memory; each update is added in float32 and rounded once).

    Args:
      name: one of `PRECISIONS` (case-insensitive; "fp32"/"f32" read as "float32").

    Returns:
      The `PrecisionPolicy`.

    Raises:
      ValueError: an unknown name (the message lists the known ones).

    References:
      Micikevicius et al., "Mixed Precision Training", 2017, arXiv:1710.03740. Kalamkar et
      al., "A Study of BFLOAT16 for Deep Learning Training", 2019, arXiv:1905.12322.
    """
    key = str(name).lower().replace("_", "-")
    key = {"fp32": "float32", "f32": "float32", "bfloat16": "bf16"}.get(key, key)
    if key not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}.")
    return PRECISIONS[key]


def _to_float32(tree: Any) -> Any:
    def cast(x):
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(jnp.float32)
        if isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.floating):
            return jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding)
        return x

    return jax.tree.map(cast, tree)


def float32_moments(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` on float32 copies of gradients and parameters.

    For bfloat16 parameters: `inner`'s state (Adam's mu *and* nu; optax's ``mu_dtype``
    covers mu only) is created and kept in float32, hyperparameters that
    ``optax.inject_hyperparams`` casts to the parameters' dtype stay float32 (bfloat16
    rounds Adam's b2 = 0.999 to 1.0), and the returned updates are float32, so
    `optax.apply_updates` adds them in float32 and rounds each parameter once. Floating
    extra arguments (e.g. ``retain_grads``) are cast too.

    Args:
      inner: any optax transformation (e.g. ``optax.chain(clip, adamw)``).

    Returns:
      A `GradientTransformationExtraArgs` with the same state structure as `inner`, in
      float32.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = float32_moments(optax.adam(1e-3))
      >>> state = tx.init({"w": jnp.ones(3, jnp.bfloat16)})
      >>> state[0].nu["w"].dtype
      dtype('float32')
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return inner.init(_to_float32(params))

    def update_fn(updates, state, params=None, **extra_args):
        return inner.update(
            _to_float32(updates), state, _to_float32(params), **_to_float32(extra_args)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
