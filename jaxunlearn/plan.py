"""Memory and compute planning: compile the real unlearning step from shapes alone.

`plan` builds the model abstractly (`nnx.eval_shape`: no weights allocated), places the
parameters, optimizer state and batch on a mesh of N devices as `jax.ShapeDtypeStruct`s,
and compiles `jaxunlearn.train.make_step` for a recipe ahead of time. The compiled
executable's `memory_analysis()` gives per-device bytes (arguments, outputs, temporaries),
its `cost_analysis()` the FLOPs. Nothing runs and nothing is allocated, so an 8B model on
8 devices plans in a few GiB of host memory on any laptop.

The N devices are simulated CPU devices: `main` (the ``jaxunlearn plan`` command) re-runs
itself in a subprocess with ``jax_num_cpu_devices = N``, because JAX fixes the device count
when it starts. XLA:CPU schedules and fuses differently from the GPU and TPU compilers
(bfloat16 matmuls, for one, are computed in float32 on CPU), so temporary bytes are an
estimate for accelerators; parameter and optimizer bytes are exact.

With ``lora=R`` the planned step is LoRA unlearning (`jaxunlearn.models.lora.apply_lora`):
only the adapters are trained (parameters, gradients and optimizer state), the base is a
frozen argument of the step. A mesh with a ``model`` axis plans tensor parallelism
(`jaxunlearn.parallel_rules`: heads, MLP hidden and vocabulary split, combined with FSDP).

``scan_bits=True`` (``--scan-bits``) plans the CPU memory mode: the layer scan of
`jaxunlearn.models.scan_bits` (bfloat16 weights carried as uint16 bits; on XLA:CPU with
bfloat16 parameters it removes the float32 copies of the weight stack and its gradient that
XLA:CPU's bfloat16 normalisation otherwise adds) and the step compiled with XLA:CPU's
memory-optimised scheduler (`jaxunlearn.train.step.CPU_MEMORY_SCHEDULING`).

Example:
  >>> from jaxunlearn import plan
  >>> cfg = plan.builtin_config("llama-3.2-1b")
  >>> cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads
  (16, 2048, 8)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

GIB = 2**30
_CHILD = "_JAXUNLEARN_PLAN_DEVICES"

# Published config.json values (Hugging Face model repositories of the same names).
_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}
_LLAMA3 = dict(
    model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
    hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="bfloat16",
)  # fmt: skip
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        _LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        _LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rope_scaling=_LLAMA31_ROPE, tie_word_embeddings=False,
    ),
    "llama-2-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        hidden_act="silu", torch_dtype="float16",
    ),
    "mistral-7b-v0.3": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        hidden_act="silu", torch_dtype="bfloat16",
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, sliding_window=131072, max_window_layers=28,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
        hidden_act="silu", torch_dtype="bfloat16",
    ),
}  # fmt: skip

# Device memory in bytes (vendor data sheets).
ACCELERATORS: dict[str, int] = {
    "h100-80gb": 80 * 10**9,
    "a100-40gb": 40 * 10**9,
    "l4-24gb": 24 * 10**9,
    "t4-16gb": 16 * 10**9,
    "tpu-v5e-16gb": 16 * 10**9,
    "tpu-v5p-95gb": 95 * 10**9,
}
# A plan "fits" when its peak stays under this share of device memory: the runtime,
# collectives' buffers and fragmentation take the rest.
USABLE_FRACTION = 0.9


def builtin_config(name: str) -> Any:
    """The `ModelConfig` of a built-in model name (see `BUILTIN_MODELS`).

    Raises:
      ValueError: an unknown name; the message lists the known ones.
    """
    from jaxunlearn.models import ModelConfig

    key = name.lower()
    if key not in BUILTIN_MODELS:
        raise ValueError(
            f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}, or pass "
            "the path of a Hugging Face config.json."
        )
    return ModelConfig.from_hf_dict(BUILTIN_MODELS[key], source=f"built-in {key}")


def resolve_config(model: str) -> Any:
    """A built-in model name, a config.json path, or a model directory -> `ModelConfig`."""
    from jaxunlearn.models import ModelConfig

    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass a config.json or a built-in name.")
        return ModelConfig.from_json_file(path)
    return builtin_config(model)


def parse_mesh(text: str) -> dict[str, int]:
    """``"fsdp=8"`` or ``"data=2,fsdp=4"`` -> {"data": 2, "fsdp": 4, "model": 1}."""
    sizes = {"data": 1, "fsdp": 1, "model": 1}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = item.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"bad mesh entry {item!r} in {text!r}; write axis=size with axes data, fsdp, "
                "model and positive sizes, e.g. fsdp=8 or data=2,fsdp=4."
            )
        sizes[name] = int(value)
    return sizes


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one unlearning step needs, per device.

    Attributes:
      model: the model's name or config path.
      method: the recipe name.
      mesh: axis sizes.
      batch: rows per device of each batch part; seq: tokens per row.
      precision: precision policy name; remat: rematerialisation policy; scan_layers.
      parameters: number of model parameters.
      param_bytes: parameter bytes per device (sharded).
      optimizer_bytes: optimizer-state bytes per device.
      reference_bytes: frozen reference parameters per device (0 when precomputed).
      batch_bytes: input batch bytes per device.
      temp_bytes: temporaries of the compiled step per device (activations, gradients).
      peak_bytes: arguments + outputs - donated (aliased) + temporaries + code.
      flops: FLOPs per step per device as compiled (recomputation included).
      model_flops: 6 * parameters * tokens per device (+ attention), the usual MFU count;
        with a model axis, its devices share their rows, so tokens per device divide by it.
      compile_seconds: lowering + compilation time of the step.
      reference_parts: batch parts whose reference values run inside the step.
      lora_rank: the LoRA rank when only adapters are trained (then `parameters`,
        `param_bytes` and `optimizer_bytes` are the adapters'), else None.
      frozen_bytes: bytes per device of what the step reads but does not train (the frozen
        base of a LoRA model; 0 otherwise).
      scan_bits: the scanned layers carry bfloat16 weights as uint16 bits
        (`jaxunlearn.models.scan_bits`).
    """

    model: str
    method: str
    mesh: dict[str, int]
    batch: int
    seq: int
    precision: str
    remat: str
    scan_layers: bool
    parameters: int
    param_bytes: int
    optimizer_bytes: int
    reference_bytes: int
    batch_bytes: int
    temp_bytes: int
    peak_bytes: int
    flops: float
    model_flops: float
    compile_seconds: float
    reference_parts: tuple[str, ...]
    lora_rank: int | None = None
    frozen_bytes: int = 0
    scan_bits: bool = False

    def fits(self, accelerator: str) -> bool:
        """Whether the peak fits `USABLE_FRACTION` of the accelerator's memory."""
        return self.peak_bytes <= USABLE_FRACTION * ACCELERATORS[accelerator]

    def shortfall(self, accelerator: str) -> int:
        """Bytes over the accelerator's usable memory (<= 0 when it fits)."""
        return self.peak_bytes - int(USABLE_FRACTION * ACCELERATORS[accelerator])


# ----------------------------------------------------------------------------- building


def _check_model_axis(sizes: Mapping[str, int], cfg: Any) -> None:
    """A ``model`` axis must divide the heads, KV heads, MLP hidden size and vocabulary."""
    from types import SimpleNamespace

    from jaxunlearn.parallel_rules import check_model_axis

    if cfg.model_type == "gpt2" and sizes["model"] > 1:
        raise ValueError(
            f"mesh axis 'model' has size {sizes['model']}: tensor parallelism covers the "
            "Llama family (llama, mistral, qwen2, qwen3), not gpt2; use data and fsdp axes."
        )
    check_model_axis(cfg, SimpleNamespace(shape=dict(sizes)))


def _check_mesh(sizes: Mapping[str, int], params: Any) -> None:
    """Rejects an FSDP size that divides (and so shards) too little of the parameters."""
    import jax
    import numpy as np

    n = sizes["fsdp"]
    if n == 1:
        return
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(np.prod(x.shape) * x.dtype.itemsize for _, x in leaves)
    stuck = [(p, x) for p, x in leaves if not any(d % n == 0 for d in x.shape)]
    stuck_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for _, x in stuck)
    if stuck_bytes > 0.01 * total:
        listed = "; ".join(f"{jax.tree_util.keystr(p)} {list(x.shape)}" for p, x in stuck[:4])
        raise ValueError(
            f"mesh axis 'fsdp' of size {n} divides no dimension of {len(stuck)} parameters "
            f"({stuck_bytes / total:.0%} of the parameter bytes would be replicated on every "
            f"device), e.g. {listed}. Choose an fsdp size that divides the model's dimensions "
            "(a power of two for the built-in models)."
        )


def _abstract_batch(parts: Sequence[str], rows: int, seq: int, sharding: Any) -> dict:
    import jax
    import jax.numpy as jnp

    def part():
        ids = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=sharding)
        return {"input_ids": ids, "attention_mask": ids, "labels": ids}

    return {name: part() for name in parts}


def _with_ref_logprob(batch: dict, parts: set[str], sharding: Any) -> dict:
    import jax
    import jax.numpy as jnp

    out = dict(batch)
    for name in parts & set(batch):
        rows = batch[name]["input_ids"].shape[0]
        ref = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sharding)
        out[name] = {**batch[name], "ref_logprob": ref}
    return out


def _placed(tree: Any, mesh: Any) -> Any:
    import jax

    from jaxunlearn import parallel

    shardings = parallel.param_sharding(tree, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _count(tree: Any) -> int:
    """Number of floating-point elements of a tree of shapes (a frozen base's weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    leaves = jax.tree.leaves(tree)
    return int(sum(np.prod(x.shape) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)))


def _per_device_bytes(tree: Any) -> int:
    import jax
    import numpy as np

    return int(
        sum(
            np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(tree)
        )
    )


@dataclasses.dataclass
class _Setup:
    step: Any
    params: Any
    opt_state: Any
    batch: Any
    objective_state: Any
    ref_params: Any
    ref_parts: tuple[str, ...]
    parameters: int
    rest: Any = None


def _setup(
    cfg,
    recipe,
    mesh,
    policy,
    *,
    rows,
    seq,
    remat,
    scan_layers,
    micro_batches,
    lora=None,
    scan_bits=False,
):
    """Abstract params, optimizer state, batch and the step for one plan (`lora`: the
    `apply_lora` keyword arguments, or None for full-parameter training)."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxunlearn import parallel, train
    from jaxunlearn.models import build_model

    def build():
        model = build_model(
            cfg,
            rngs=nnx.Rngs(0),
            scan_layers=scan_layers,
            remat=remat,
            scan_bits=scan_bits,
            **policy.model_kwargs(),
        )
        if lora is None:
            return model
        from jaxunlearn.models.lora import apply_lora

        return apply_lora(model, **lora)  # adapters are the Params; the base is frozen

    graphdef, params, rest = train.split_model(nnx.eval_shape(build))
    parameters = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    params = _placed(params, mesh)
    replicated = NamedSharding(mesh, P())
    rest = _placed(rest, mesh)  # FSDP-sharded like the parameters, as `unlearn` places it
    parts = ["forget"] + ["retain"] * recipe.needs_retain + ["alternate"] * recipe.needs_alternate
    batch = _abstract_batch(parts, rows, seq, parallel.batch_sharding(mesh))
    objective_state = train.init_objective_state(recipe.objective)
    tx = policy.optimizer(recipe.tx)
    split = train.wants_retain_grads(tx, params)  # GU / HAMU read retain_grads
    in_step = set(train.reference_parts(recipe.objective, graphdef, params, rest, batch,
                                        objective_state, split=split))  # fmt: skip
    if in_step:  # precompute reference log-probs where they suffice, as `unlearn` does
        batch = _with_ref_logprob(batch, in_step, parallel.batch_sharding(mesh))
        in_step = set(train.reference_parts(recipe.objective, graphdef, params, rest, batch,
                                            objective_state, split=split))  # fmt: skip
    ref_params = params if in_step else None
    from jaxunlearn.train.step import CPU_MEMORY_SCHEDULING

    step = train.make_step(
        graphdef, rest, recipe.objective, tx, ref_params=ref_params,
        micro_batches=micro_batches, compiler_options=CPU_MEMORY_SCHEDULING if scan_bits else None,
    )  # fmt: skip
    opt_state = _placed(jax.eval_shape(tx.init, params), mesh)
    if objective_state is not None:
        objective_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            objective_state,
        )
    return _Setup(step, params, opt_state, batch, objective_state, ref_params,
                  tuple(sorted(in_step)), parameters, rest)  # fmt: skip


def _compile(s: _Setup, mesh: Any) -> tuple[Any, float]:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    shardings = (
        jax.tree.map(lambda x: x.sharding, s.params),
        jax.tree.map(lambda x: x.sharding, s.opt_state),
        replicated,
        replicated,
    )
    start = time.perf_counter()
    jitted = jax.jit(
        s.step.update_fn,
        donate_argnums=(0, 1),
        out_shardings=shardings,
        compiler_options=s.step.compiler_options,
    )
    compiled = jitted.lower(
        s.params, s.opt_state, s.batch, s.objective_state, s.step.frozen
    ).compile()
    return compiled, time.perf_counter() - start


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def _layer_flops(cfg, recipe, mesh, policy, **kw) -> float:
    """FLOPs of the step as if unrolled: XLA counts a scanned loop body once, so compile
    1- and 2-layer unstacked variants and extrapolate linearly in depth."""
    costs = []
    for layers in (1, 2):
        types = None if cfg.layer_types is None else cfg.layer_types[:layers]
        small = dataclasses.replace(cfg, num_hidden_layers=layers, layer_types=types)
        s = _setup(small, recipe, mesh, policy, **{**kw, "scan_layers": False, "scan_bits": False})
        costs.append(_flops(_compile(s, mesh)[0]))
    return costs[0] + (cfg.num_hidden_layers - 1) * (costs[1] - costs[0])


def model_flops(cfg: Any, parameters: int, tokens: int, seq: int, frozen: int = 0) -> float:
    """Training FLOPs of a step by the usual count: tokens * (6 N + 4 F + 12 L H Dh T).

    N are the trained parameters and F the frozen ones (a LoRA base): a frozen weight costs
    its forward matmul and the backward one for the activations' gradient, not the third
    one for its own gradient.

    References:
      Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022,
      arXiv:2204.02311, Appendix B.
    """
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq
    return float(tokens * (6 * parameters + 4 * frozen + attention))


def plan(
    model: str,
    *,
    method: str = "npo",
    mesh: Mapping[str, int] | str = "fsdp=1",
    batch: int = 4,
    seq: int = 512,
    precision: str = "bf16",
    remat: str = "matmuls",
    scan_layers: bool = True,
    micro_batches: int = 1,
    exact_flops: bool = True,
    overrides: Mapping[str, Any] | None = None,
    lora: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | None = None,
    scan_bits: bool = False,
) -> Plan:
    """Compiles `method`'s unlearning step for `model` from shapes and measures it.

    Needs as many JAX devices as the mesh has (`main` arranges simulated CPU devices).

    Args:
      model: a built-in name (`BUILTIN_MODELS`), a config.json path or a model directory.
      method: a recipe name (`jaxunlearn.recipes.METHODS`, loss-based methods).
      mesh: axis sizes, e.g. ``{"fsdp": 8}`` or ``"data=2,fsdp=4"``.
      batch: rows per device of each batch part (forget, retain, ...); the global batch
        is ``batch * data * fsdp``.
      seq: tokens per row.
      precision: a `jaxunlearn.parallel.precision_policy` name.
      remat: "none", "matmuls" or "full".
      scan_layers: stack and scan the layers (Llama family).
      micro_batches: gradient-accumulation micro-batches per step.
      exact_flops: also compile 1- and 2-layer variants to count FLOPs of every layer
        (XLA counts a scanned body once); otherwise `flops` is the compiled count as is.
      overrides: recipe hyperparameter overrides.
      lora: plan LoRA unlearning with adapters of this rank (base frozen), or None.
      lora_alpha: LoRA alpha (default 2 * rank); only the scaling, not the bytes, depends on it.
      lora_targets: kernels to adapt (default all: q, k, v, o, gate, up, down).
      scan_bits: run the scanned layers with bfloat16 weights carried as uint16 bits
        (`jaxunlearn.models.scan_bits`; needs remat "full"): on XLA:CPU with bfloat16
        parameters this removes the float32 copies of the weight stack and its gradient;
        and compile the step with XLA:CPU's memory-optimised scheduler
        (`jaxunlearn.train.step.CPU_MEMORY_SCHEDULING`), as a CPU run should.

    Returns:
      The `Plan`.

    Raises:
      ValueError: unknown model or method, a method that is not loss-based, a mesh that
        does not fit the devices or shards too little, a ``model`` axis that does not
        divide the heads, KV heads, MLP hidden size or vocabulary, bad sizes.
    """
    import jax

    from jaxunlearn import parallel, recipes

    sizes = (
        parse_mesh(mesh) if isinstance(mesh, str) else {"data": 1, "fsdp": 1, "model": 1, **mesh}
    )
    cfg = resolve_config(model)
    checked = [("batch", batch), ("seq", seq), ("micro_batches", micro_batches)]
    for name, value in checked + ([("lora", lora)] if lora is not None else []):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if batch % micro_batches:
        raise ValueError(f"batch {batch} is not a multiple of micro_batches {micro_batches}.")
    recipe = recipes.recipe(method, **(overrides or {}))
    if recipe.kind != "loss":
        raise ValueError(
            f"method {method!r} is {recipe.kind}; the planner compiles loss-based steps "
            "(npo, graddiff, simnpo, ...)."
        )
    policy = parallel.precision_policy(precision)
    _check_model_axis(sizes, cfg)
    n = math.prod(sizes.values())
    if jax.device_count() < n:
        raise ValueError(
            f"mesh {sizes} needs {n} devices but JAX has {jax.device_count()}; run the "
            "`jaxunlearn plan` command (it simulates them) or set jax_num_cpu_devices first."
        )
    m = parallel.mesh(**sizes, devices=jax.devices()[:n])
    rows = batch * sizes["data"] * sizes["fsdp"]
    lora_kw = None
    if lora is not None:
        from jaxunlearn.models.lora import TARGETS

        alpha = float(2 * lora if lora_alpha is None else lora_alpha)
        lora_kw = dict(rank=lora, alpha=alpha, targets=tuple(lora_targets or TARGETS))
    kw = dict(rows=rows, seq=seq, remat=remat, scan_layers=scan_layers,
              micro_batches=micro_batches, lora=lora_kw, scan_bits=scan_bits)  # fmt: skip
    s = _setup(cfg, recipe, m, policy, **kw)
    _check_mesh(sizes, s.params if lora is None else s.rest)
    compiled, seconds = _compile(s, m)
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
    )  # fmt: skip
    flops = _layer_flops(cfg, recipe, m, policy, **kw) if exact_flops else _flops(compiled)
    tokens = batch * seq * len(s.batch) / sizes["model"]  # a model-axis group shares its rows
    return Plan(
        model=model, method=recipe.name, mesh=dict(sizes), batch=batch, seq=seq,
        precision=policy.name, remat=remat, scan_layers=scan_layers, parameters=s.parameters,
        param_bytes=_per_device_bytes(s.params), optimizer_bytes=_per_device_bytes(s.opt_state),
        reference_bytes=0 if s.ref_params is None else _per_device_bytes(s.ref_params),
        batch_bytes=_per_device_bytes(s.batch), temp_bytes=int(mem.temp_size_in_bytes),
        peak_bytes=int(peak), flops=flops,
        model_flops=model_flops(cfg, s.parameters, tokens, seq, frozen=_count(s.rest) if lora else 0),
        compile_seconds=seconds, reference_parts=s.ref_parts, lora_rank=lora,
        frozen_bytes=_per_device_bytes(s.rest) if lora is not None else 0, scan_bits=scan_bits,
    )  # fmt: skip


# ----------------------------------------------------------------------------- reporting


def advice(p: Plan, accelerator: str) -> list[str]:
    """What to change when `p` does not fit `accelerator` (empty when it fits)."""
    short = p.shortfall(accelerator)
    if short <= 0:
        return []
    usable = USABLE_FRACTION * ACCELERATORS[accelerator]
    state = p.param_bytes + p.optimizer_bytes + p.reference_bytes + p.frozen_bytes
    fsdp = p.mesh["fsdp"]
    lines = [
        f"does not fit {accelerator}: needs {p.peak_bytes / GIB:.1f} GiB per device, "
        f"{usable / GIB:.1f} GiB usable ({USABLE_FRACTION:.0%} of {ACCELERATORS[accelerator] / 1e9:.0f} GB): "
        f"short by {short / GIB:.1f} GiB. Try:"
    ]
    lines.append(
        f"  --mesh fsdp={2 * fsdp} (more devices): parameters + optimizer state "
        f"{state / GIB:.1f} -> {state / 2 / GIB:.1f} GiB per device"
    )
    if p.batch > 1:
        lines.append(
            f"  --batch {max(1, p.batch // 2)} (or micro-batches): temporaries "
            f"{p.temp_bytes / GIB:.1f} GiB shrink roughly in proportion"
        )
    if p.remat != "full":
        lines.append("  --remat full: keep only each layer's input for the backward pass")
    if p.precision == "float32":
        lines.append("  --precision bf16-params: half the parameter bytes, bfloat16 compute")
    if p.lora_rank is None:
        lines.append("  --lora 16 (a frozen base): optimizer state only for the adapters")
    return lines


def format_plan(p: Plan, accelerator: str | None = None) -> str:
    """A human-readable report of a plan (per-device bytes, FLOPs, fit per accelerator)."""
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items() if v != 1) or "1 device"
    devices = math.prod(p.mesh.values())
    lines = [
        f"{p.model} | {p.method} | mesh {mesh} | batch {p.batch}/device x {p.seq} tokens "
        f"(global {p.batch * p.mesh['data'] * p.mesh['fsdp']}) | precision {p.precision} | "
        f"remat {p.remat} | {'scanned' if p.scan_layers else 'unrolled'} layers"
        + (" (uint16-bits scan)" if p.scan_bits else "")
        + (f" | LoRA rank {p.lora_rank}, base frozen" if p.lora_rank else ""),
        f"{'adapter params' if p.lora_rank else 'parameters    '}    {p.parameters / 1e9:8.3f} B",
        "per device:",
    ]
    if p.frozen_bytes:
        lines.append(f"  frozen base     {p.frozen_bytes / GIB:8.2f} GiB")
    lines += [
        f"  {'adapters  ' if p.lora_rank else 'parameters'}      {p.param_bytes / GIB:8.2f} GiB",
        f"  optimizer state {p.optimizer_bytes / GIB:8.2f} GiB",
    ]
    if p.reference_bytes:
        lines.append(f"  reference model {p.reference_bytes / GIB:8.2f} GiB (in-step: "
                     f"{', '.join(p.reference_parts)})")  # fmt: skip
    lines += [
        f"  batch           {p.batch_bytes / GIB:8.4f} GiB",
        f"  temporaries     {p.temp_bytes / GIB:8.2f} GiB",
        f"  peak            {p.peak_bytes / GIB:8.2f} GiB",
        f"  FLOPs/step      {p.flops:.3e} compiled ({p.model_flops:.3e} model, 6N+attention)",
        f"all {devices} devices: {p.flops * devices:.3e} FLOPs/step; compiled in "
        f"{p.compile_seconds:.1f} s (XLA:CPU; GPU/TPU compilers fuse differently)",
        "fits (peak <= 90% of memory):",
    ]
    for name in ACCELERATORS:
        verdict = "yes" if p.fits(name) else f"no (short {p.shortfall(name) / GIB:.1f} GiB)"
        lines.append(f"  {name:14s} {verdict}")
    if accelerator is not None:
        lines += advice(p, accelerator)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plan`` command's options."""
    a = parser.add_argument
    a("--model", required=True, help=f"built-in ({', '.join(BUILTIN_MODELS)}) or config.json")
    a("--method", default="npo", help="recipe name (default npo)")
    a("--mesh", default="fsdp=1", help="axis sizes, e.g. fsdp=8 or data=2,fsdp=4")
    a("--batch", type=int, default=4, help="rows per device of each batch part")
    a("--seq", type=int, default=512, help="tokens per row")
    a("--precision", default="bf16", help="float32 | bf16 | bf16-params")
    a("--remat", default="matmuls", help="none | matmuls | full")
    a("--no-scan", action="store_true", help="unstacked layers (compile time grows with depth)")
    a("--scan-bits", action="store_true",
      help="CPU memory mode: bf16 layer weights through the scan as uint16 bits and XLA:CPU's "
           "memory-optimised scheduler (needs --remat full)")  # fmt: skip
    a("--micro-batches", type=int, default=1)
    a("--lora", type=int, default=None, metavar="R",
      help="plan LoRA unlearning: adapters of rank R trained, the base frozen")  # fmt: skip
    a("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2R)")
    a("--device", default="h100-80gb", help=f"explain the fit on: {', '.join(ACCELERATORS)}")
    a("--fast-flops", action="store_true", help="skip the 1-/2-layer compiles for FLOPs")
    a("--json", action="store_true", help="print the plan as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Runs a parsed ``plan`` command (in a subprocess with enough simulated devices)."""
    if args.device not in ACCELERATORS:
        raise SystemExit(
            f"plan: unknown --device {args.device!r}; known: {', '.join(ACCELERATORS)}."
        )
    try:
        n = math.prod(parse_mesh(args.mesh).values())
    except ValueError as e:
        raise SystemExit(f"plan: {e}") from None
    if os.environ.get(_CHILD) != str(n):
        env = {**os.environ, _CHILD: str(n), "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, "-m", "jaxunlearn.plan", *_argv(args)]
        return subprocess.run(cmd, env=env, check=False).returncode
    import jax

    jax.config.update("jax_num_cpu_devices", n)
    try:
        p = plan(
            args.model, method=args.method, mesh=args.mesh, batch=args.batch, seq=args.seq,
            precision=args.precision, remat=args.remat, scan_layers=not args.no_scan,
            micro_batches=args.micro_batches, exact_flops=not args.fast_flops,
            lora=args.lora, lora_alpha=args.lora_alpha, scan_bits=args.scan_bits,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = dataclasses.asdict(p)
        out["fits"] = {name: p.fits(name) for name in ACCELERATORS}
        print(json.dumps(out))
    else:
        print(format_plan(p, args.device))
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--method", args.method, "--mesh", args.mesh,
           "--batch", str(args.batch), "--seq", str(args.seq), "--precision", args.precision,
           "--remat", args.remat, "--micro-batches", str(args.micro_batches),
           "--device", args.device]  # fmt: skip
    for flag, value in (("--lora", args.lora), ("--lora-alpha", args.lora_alpha)):
        if value is not None:
            out += [flag, str(value)]
    for flag, on in (("--no-scan", args.no_scan), ("--fast-flops", args.fast_flops),
                     ("--json", args.json), ("--scan-bits", args.scan_bits)):  # fmt: skip
        if on:
            out.append(flag)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxunlearn.plan --model llama-3.1-8b --mesh fsdp=8 ...``."""
    parser = argparse.ArgumentParser(prog="jaxunlearn plan", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
