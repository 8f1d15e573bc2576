"""Unlearning-step throughput and model FLOPs utilisation on one accelerator.

A Llama-3.2-1B-shaped model (the published architecture, random weights made on the
device) in bfloat16 runs two real unlearning steps built by `jaxunlearn.train.make_step`
from the recipes: GU (NPO + retain-gradient projection, forget and retain gradients
apart) and GradDiff, each on a forget batch and a retain batch of B x T tokens. For each
it reports compile time, seconds per step, tokens per second, model FLOPs utilisation
(MFU = 6 N tokens + attention, per second, over the device's peak dense bfloat16 FLOP/s)
and the device's peak memory. Prints one JSON line. Target on an H100/H200: MFU >= 40%,
under 5 minutes in total.

    python benchmarks/bench_accelerator.py                    # GPU / TPU
    python benchmarks/bench_accelerator.py --smoke            # tiny model, any backend (CPU)
    python benchmarks/bench_accelerator.py --peak-tflops 989  # a device missing from the table
    python benchmarks/bench_accelerator.py --json-out benchmarks/results/bench_accelerator.json

No torch side, so no quiet gate: an accelerator is not shared the way the CPU box is.

References:
  Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022,
  arXiv:2204.02311, Appendix B (model FLOPs utilisation).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import numpy as np
from _quiet import add_json_arg, write_json  # noqa: E402  (benchmarks/ is on sys.path)
from flax import nnx

from jaxunlearn import parallel, plan, recipes, train
from jaxunlearn.models import ModelConfig, build_model

# Peak dense bfloat16 FLOP/s (vendor data sheets, without sparsity), by device_kind prefix.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "Tesla T4": 65e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v4": 275e12,
}
SMOKE_MODEL = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def device_peak(device: jax.Device, override_tflops: float | None) -> float | None:
    """The device's peak bf16 FLOP/s (None when unknown, e.g. a CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    kind = device.device_kind
    for prefix, flops in PEAK_BF16_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def peak_memory_bytes(device: jax.Device) -> int:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: process RSS


def make_batch(rng, cfg, rows: int, seq: int) -> dict:
    def part():
        ids = rng.randint(0, cfg.vocab_size, (rows, seq)).astype(np.int32)
        labels = ids.copy()
        labels[:, : seq // 2] = -100  # answer-only labels: the second half is scored
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}

    forget = {**part(), "ref_logprob": np.full(rows, -float(seq), np.float32)}
    return {"forget": forget, "retain": part()}


def time_method(name, cfg, args, policy, batch) -> dict:
    """Compiles and times one recipe's step; returns its row of the report."""
    recipe = recipes.recipe(name)

    def build():
        return build_model(cfg, rngs=nnx.Rngs(0), scan_layers=True, remat=args.remat,
                           attention=args.attention, **policy.model_kwargs())  # fmt: skip

    graphdef, _, rest = train.split_model(nnx.eval_shape(build))
    params = jax.jit(lambda: train.split_model(build())[1])()
    tx = policy.optimizer(recipe.tx)
    step = train.make_step(graphdef, rest, recipe.objective, tx)
    opt_state = step.init(params)
    batch = jax.device_put(batch)
    start = time.perf_counter()
    params, opt_state, _, metrics = step(params, opt_state, batch)  # compile + first step
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, _, metrics = step(params, opt_state, batch)
    jax.block_until_ready((params, metrics))
    seconds = (time.perf_counter() - start) / args.steps
    parameters = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    tokens = 2 * args.batch * args.seq  # forget + retain rows
    flops = plan.model_flops(cfg, parameters, tokens, args.seq)
    return {
        "method": name, "compile_s": round(compile_s, 2), "step_s": seconds,
        "tokens_per_s": tokens / seconds, "model_tflops_per_s": flops / seconds / 1e12,
        "loss_finite": bool(metrics["finite"]), "parameters": parameters,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 steps (any backend)")
    parser.add_argument("--batch", type=int, default=8, help="rows of forget and of retain")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="bf16-params")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--methods", nargs="+", default=["gu_npo", "graddiff"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    add_json_arg(parser)
    args = parser.parse_args()
    if args.smoke:
        cfg = ModelConfig.from_hf_dict(SMOKE_MODEL)
        args.batch, args.seq, args.steps = 2, 32, 2
        name = "smoke"
    else:
        cfg, name = plan.builtin_config("llama-3.2-1b"), "llama-3.2-1b"
    policy = parallel.precision_policy(args.precision)
    device = jax.devices()[0]
    peak = device_peak(device, args.peak_tflops)
    batch = make_batch(np.random.RandomState(0), cfg, args.batch, args.seq)
    started = time.perf_counter()
    rows = [time_method(m, cfg, args, policy, batch) for m in args.methods]
    for row in rows:
        row["mfu"] = None if peak is None else row["model_tflops_per_s"] * 1e12 / peak
    result = {
        "benchmark": "bench_accelerator", "model": name, "device": device.device_kind,
        "backend": jax.default_backend(), "jax": jax.__version__, "precision": policy.name,
        "remat": args.remat, "attention": args.attention, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "peak_device_flops": peak, "methods": rows,
        "peak_memory_bytes": peak_memory_bytes(device),
        "total_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(json.dumps(result))
    write_json(args.json_out, result)


if __name__ == "__main__":
    main()
