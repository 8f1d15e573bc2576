"""Forward and train-step throughput of a Llama-style model: jaxunlearn vs transformers+torch.

Both run in this one process on the same CPU, same config, same batch, so the printed
ratios compare like with like. The two frameworks' repetitions are interleaved (JAX, torch,
torch, JAX, ...), and on Linux a round is timed only while other processes leave the CPUs
idle (`--gate`; a disturbed round is repeated), because their load slows torch's OpenMP
workers far more than XLA's and so skews the ratio (benchmarks/README.md). Medians are
reported, and the ratio of the best (minimum) times as a check on noise.
The dense-matmul throughput of both backends is measured in the same run and the train
step's model FLOPs (6 * params * tokens) are reported as a fraction of it.

    python benchmarks/bench_model.py            # the issue's size (about 2 minutes on 2 cores)
    python benchmarks/bench_model.py --quick    # tiny smoke run
    python benchmarks/bench_model.py --profile /tmp/trace   # also: per-op profile of the step
    python benchmarks/bench_model.py --json-out benchmarks/results/bench_model.json

XLA flags are left at their defaults; set `XLA_FLAGS` in the environment to try others
(benchmarks/README.md lists the ones measured).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import platform
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _quiet import (  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
    Gate,
    OtherProcessCPU,
    _interleaved_times,
    add_gate_args,
    add_json_arg,
    format_ratio,
    ratio_entry,
    write_json,
)
from flax import nnx

from jaxunlearn.models import ModelConfig, build_model

__all__ = ["OtherProcessCPU", "_interleaved_times", "add_model_args", "apply_quick", "hf_config"]


# The gate lives in _quiet.py; these names stay importable from here (bench_eval uses them).
_OtherCpu = OtherProcessCPU


def matmul_fns(n: int = 2048, k: int = 3) -> dict:
    """Functions doing `k` dense float32 n x n matmuls (2 k n^3 FLOPs) in JAX and torch.

    k > 1 makes a call long enough for the load check of `_interleaved_times`.
    """
    import torch

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    f = jax.jit(lambda x, y: x @ y)

    def jax_mm():
        for _ in range(k):
            f(ja, jb).block_until_ready()

    def torch_mm():
        for _ in range(k):
            torch.mm(ta, tb)

    return {"jax": jax_mm, "torch": torch_mm}


MODEL_SHAPE = (  # the foundation benchmark's Llama, shared by every benchmark here
    ("--vocab", 4096),
    ("--hidden", 512),
    ("--intermediate", 1408),
    ("--layers", 6),
    ("--heads", 8),
    ("--kv-heads", 4),
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model-shape flags (`MODEL_SHAPE`)."""
    for flag, default in MODEL_SHAPE:
        p.add_argument(flag, type=int, default=default)


def apply_quick(args) -> None:
    """``--quick``: tiny model and batch sizes for a smoke run (one place for every benchmark)."""
    if args.quick:
        args.vocab, args.hidden, args.intermediate, args.layers = 256, 64, 128, 2
        args.heads, args.kv_heads, args.batch, args.seq, args.reps = 4, 2, 2, 32, 2
        if hasattr(args, "matmul_n"):
            args.matmul_n = 256


def hf_config(args, **extra):
    """A transformers LlamaConfig of the benchmark shape in `args`; `extra` adds fields."""
    import transformers

    if "max_position_embeddings" not in extra:
        extra["max_position_embeddings"] = max(2 * args.seq, 512)
    return transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        **extra,
    )


def jax_fns(cfg_dict: dict, tokens: np.ndarray):
    """(n_params, forward(), train_step()) for jaxunlearn: jax.jit over nnx.split/merge."""
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = tx.init(params)
    ids = jnp.asarray(tokens)
    mask = jnp.ones_like(ids)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest)(ids, attention_mask=mask).logits
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), ids[:, 1:]
        ).mean()

    @jax.jit
    def forward(p):
        return nnx.merge(graphdef, p, rest)(ids, attention_mask=mask).logits

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = {"p": params, "s": opt_state}

    def run_step():
        state["p"], state["s"], loss = step(state["p"], state["s"])
        loss.block_until_ready()

    return n_params, (lambda: forward(params).block_until_ready()), run_step


def torch_fns(hf_cfg, tokens: np.ndarray):
    """(threads, forward(), train_step()) for transformers + torch.optim.AdamW."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).float()
    ids = torch.from_numpy(tokens).long()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def fwd():
        model.eval()
        with torch.no_grad():
            model(ids)

    def step():
        model.train()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return torch.get_num_threads(), fwd, step


def profile_step(step, log_dir: str, n: int = 3, top: int = 25) -> None:
    """Traces `n` train steps with jax.profiler and prints the ops that took longest.

    Op times are summed over XLA:CPU's worker threads, so they can exceed wall time;
    open the `.trace.json.gz` in https://ui.perfetto.dev for the timeline.
    """
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(n):
            step()
    paths = []
    for root, _, files in os.walk(log_dir):
        paths += [os.path.join(root, f) for f in files if f.endswith(".trace.json.gz")]
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    by_op, by_kind = collections.Counter(), collections.Counter()
    for e in events:
        name = e["name"]
        # Keep XLA ops; drop runtime bookkeeping (executors, thread-pool waits, Python).
        if name.startswith(("$", "end: ")) or re.search(
            r"Thunk|Await|Pjit|Execut|Handle|Alloc|ParseArguments", name
        ):
            continue
        by_op[name] += e["dur"] / n / 1e3
        by_kind[re.sub(r"\.\d+$", "", name)] += e["dur"] / n / 1e3
    total = sum(by_kind.values())
    print(f"\nprofile: {total:.0f} ms of XLA op time per train step (trace in {log_dir})")
    for name, ms in by_kind.most_common(12):
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {name}")
    print("  slowest single ops:")
    for name, ms in by_op.most_common(top):
        print(f"  {ms:8.1f} ms  {name}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the square matmuls")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    add_json_arg(p)
    p.add_argument("--profile", metavar="DIR", help="trace 3 JAX train steps into DIR")
    add_gate_args(p)
    args = p.parse_args(argv)
    apply_quick(args)

    load_before = os.getloadavg()[0]
    hf_cfg = hf_config(args)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq), np.int32)
    tok = args.batch * args.seq
    n_mm, k_mm = args.matmul_n, 3
    gate = Gate(args.gate, args.max_wait)
    mm = gate.times(matmul_fns(n_mm, k_mm), max(args.reps, 5))
    n_params, j_fwd, j_step = jax_fns(hf_cfg.to_dict(), tokens)
    threads, t_fwd, t_step = torch_fns(hf_cfg, tokens)
    fwd = gate.times({"jax": j_fwd, "torch": t_fwd}, args.reps)
    step = gate.times({"jax": j_step, "torch": t_step}, args.reps)
    f_med = {k: statistics.median(v) for k, v in fwd.items()}
    s_med = {k: statistics.median(v) for k, v in step.items()}
    peak = {k: 2 * k_mm * n_mm**3 / statistics.median(v) for k, v in mm.items()}
    step_flops = 6 * n_params * tok
    quiet = gate.record()
    res = {
        "benchmark": "bench_model",
        "backend": f"{jax.device_count()} {jax.default_backend()} device(s), "
        f"torch threads {threads}, {platform.machine()}",
        "load_avg_1min_before_after": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
        "quiet_gate": quiet,
        "shape": f"vocab {args.vocab}, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, "
        f"batch {args.batch} x {args.seq}, float32",
        "params": n_params,
        "tokens_per_step": tok,
        "matmul": f"{k_mm} x {n_mm}^3 float32 per call",
        "jax_forward_tok_s": tok / f_med["jax"],
        "torch_forward_tok_s": tok / f_med["torch"],
        "jax_train_tok_s": tok / s_med["jax"],
        "torch_train_tok_s": tok / s_med["torch"],
        "jax_matmul_gflops": peak["jax"] / 1e9,
        "torch_matmul_gflops": peak["torch"] / 1e9,
        "train_step_model_gflops": step_flops / s_med["jax"] / 1e9,
        "train_step_fraction_of_matmul": step_flops / s_med["jax"] / peak["jax"],
        "torch_train_step_model_gflops": step_flops / s_med["torch"] / 1e9,
        "torch_train_step_fraction_of_torch_matmul": step_flops / s_med["torch"] / peak["torch"],
        "ratios": {  # torch time / JAX time: > 1 means JAX is faster
            "forward": ratio_entry(f_med["torch"] / f_med["jax"], quiet),
            "train": ratio_entry(s_med["torch"] / s_med["jax"], quiet),
            "train_best_times": ratio_entry(min(step["torch"]) / min(step["jax"]), quiet),
        },
        "times_s": {"matmul": mm, "forward": fwd, "train_step": step},
        "reps": args.reps,
    }
    for k, v in res.items():
        if k == "ratios":
            for name, entry in v.items():
                print(f"{'ratio torch/jax ' + name:42s} {format_ratio(entry)}")
        elif k == "quiet_gate":
            print(f"{'quiet_gate':42s} {'held' if v['held'] else 'NOT HELD'}: {v['reason']}")
        elif k != "times_s":
            print(f"{k:42s} {v:.4g}" if isinstance(v, float) else f"{k:42s} {v}")
    write_json(args.json_out, res)
    if args.profile:
        profile_step(j_step, args.profile)


if __name__ == "__main__":
    main()
