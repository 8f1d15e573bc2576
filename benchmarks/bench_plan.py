"""The planner against reality, and the issue's planning targets.

``--validate``: plans the real NPO + retain step of a mid-sized Llama-shaped model (vocab
32000, hidden 512, intermediate 1536, 8 layers, 8 heads / 4 KV heads: 49 M parameters) on
one CPU device, then runs that step for real in a fresh process and measures the growth
of resident memory (sampled every 2 ms from /proc/self/statm) from just before the
parameters are created to the end of the first steps. Compilation happens before the
baseline, so its memory is not counted. Prints one JSON line per precision with the
planned peak, the measured peak and their ratio.

``--compile``: compile time of the 32-layer 8B step over the 16-layer 1B step (same mesh,
alternated, best of ``--repeats``).

``--table``: runs ``jaxunlearn plan`` for the issue's targets (Llama-3.1-8B NPO on
fsdp=8, Llama-3.2-1B on one device, compile time of 8B vs 1B) and prints a Markdown table.

    python benchmarks/bench_plan.py --validate
    python benchmarks/bench_plan.py --validate --lora 16 --precisions bf16-params
    python benchmarks/bench_plan.py --table
    python benchmarks/bench_plan.py --compile --repeats 3
    python benchmarks/bench_plan.py --table --json-out benchmarks/results/bench_plan_table.json

Nothing here is timed against torch, so there is no quiet gate; compile seconds are
wall time and grow with the machine's load (bytes do not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from _quiet import add_json_arg, write_json  # noqa: E402  (benchmarks/ is on sys.path)

VALIDATION_MODEL = dict(
    model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1536,
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory in a thread; `.peak` is the maximum."""

    def __init__(self, every: float = 0.002):
        self.peak, self._stop, self._every = _rss(), threading.Event(), every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self._every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure(
    config_path: str, precision: str, batch: int, seq: int, remat: str, lora: int | None = None
) -> dict:
    """Plans, then runs, the NPO step on one CPU device; returns both peaks in bytes.

    With `lora`, the step trains LoRA adapters of that rank (alpha 2r, all seven kernels)
    and the frozen base is an argument of the step, as in `jaxunlearn plan --lora`."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxunlearn import parallel, plan, recipes, train
    from jaxunlearn.models import ModelConfig, build_model

    p = plan.plan(config_path, method="npo", mesh="fsdp=1", batch=batch, seq=seq,
                  precision=precision, remat=remat, exact_flops=False, lora=lora)  # fmt: skip
    cfg = ModelConfig.from_json_file(config_path)
    policy = parallel.precision_policy(precision)
    recipe = recipes.recipe("npo")

    def build():
        model = build_model(cfg, rngs=nnx.Rngs(0), scan_layers=True, remat=remat,
                            **policy.model_kwargs())  # fmt: skip
        if lora is None:
            return model
        from jaxunlearn.models.lora import apply_lora

        return apply_lora(model, rank=lora, alpha=2.0 * lora)

    graphdef, abstract, rest = train.split_model(nnx.eval_shape(build))
    tx = policy.optimizer(recipe.tx)
    step = train.make_step(graphdef, rest, recipe.objective, tx)
    rng = np.random.RandomState(0)

    def part():
        ids = rng.randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}

    data = {"forget": {**part(), "ref_logprob": np.full(batch, -300.0, np.float32)},
            "retain": part()}  # fmt: skip
    opt_abstract = jax.eval_shape(tx.init, abstract)
    jitted = jax.jit(step.update_fn, donate_argnums=(0, 1))
    compiled = jitted.lower(abstract, opt_abstract, data, None, step.frozen).compile()
    init = jax.jit(lambda: train.split_model(build())[1:])  # params, rest (a frozen base)
    init_opt = jax.jit(tx.init, donate_argnums=())
    init.lower().compile(), init_opt.lower(abstract).compile()  # compile before the baseline
    base = _rss()
    with PeakRSS() as rss:
        params, rest = init()
        frozen = (None, rest, rest)  # (reference params, rest, reference rest = rest)
        opt_state = init_opt(params)
        for _ in range(2):
            params, opt_state, _, metrics = compiled(params, opt_state, data, None, frozen)
        jax.block_until_ready(params)
    return {
        "precision": precision, "batch": batch, "seq": seq, "remat": remat, "lora": lora,
        "parameters": p.parameters, "planned_peak_bytes": p.peak_bytes,
        "measured_peak_bytes": rss.peak - base,
        "ratio_measured_over_planned": (rss.peak - base) / p.peak_bytes,
        "loss_finite": bool(metrics["finite"]),
    }  # fmt: skip


def validate(args) -> dict:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.json")
        with open(path, "w") as f:
            json.dump(VALIDATION_MODEL, f)
        for precision in args.precisions:
            cmd = [sys.executable, __file__, "--measure", path, "--precision", precision,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--remat", args.remat]  # fmt: skip
            if args.lora:
                cmd += ["--lora", str(args.lora)]
            env = {**os.environ, "JAX_PLATFORMS": "cpu"}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"rows": rows}


TARGETS = [
    ("llama-3.1-8b", "npo", "fsdp=8", 4, 512, "bf16-params", "matmuls"),
    ("llama-3.1-8b", "npo", "fsdp=8", 4, 512, "bf16", "matmuls"),
    ("llama-3.2-1b", "npo", "fsdp=1", 8, 512, "bf16-params", "matmuls"),
    ("llama-3.2-1b", "npo", "fsdp=1", 8, 512, "bf16", "matmuls"),
    ("llama-3.2-1b", "npo", "fsdp=8", 4, 512, "bf16-params", "matmuls"),
]


def table(args) -> dict:
    plans = []
    rows = [
        "| model | method | mesh | batch/device x seq | precision | remat | params GiB | "
        "optimizer GiB | temp GiB | peak GiB/device | GFLOP/step/device | compile s | "
        "fits H100 80GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, method, mesh, batch, seq, precision, remat in TARGETS:
        cmd = [sys.executable, "-m", "jaxunlearn.plan", "--model", model, "--method", method,
               "--mesh", mesh, "--batch", str(batch), "--seq", str(seq), "--precision",
               precision, "--remat", remat, "--json"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        p = json.loads(out.stdout.strip().splitlines()[-1])
        keep = ("param_bytes", "optimizer_bytes", "temp_bytes", "peak_bytes", "flops")
        plans.append(
            {"model": model, "method": method, "mesh": mesh, "batch": batch, "seq": seq,
             "precision": precision, "remat": remat, **{k: p[k] for k in keep},
             "compile_seconds": p["compile_seconds"], "fits_h100_80gb": p["fits"]["h100-80gb"]}
        )  # fmt: skip
        g = 2**30
        rows.append(
            f"| {model} | {method} | {mesh} | {batch} x {seq} | {precision} | {remat} | "
            f"{p['param_bytes'] / g:.2f} | {p['optimizer_bytes'] / g:.2f} | "
            f"{p['temp_bytes'] / g:.2f} | {p['peak_bytes'] / g:.2f} | {p['flops'] / 1e9:.0f} | "
            f"{p['compile_seconds']:.1f} | {'yes' if p['fits']['h100-80gb'] else 'no'} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    return {"rows": plans, "load_avg": os.getloadavg()}


def compile_times(args) -> dict:
    """Compile time of the 16-layer 1B and the 32-layer 8B step, alternated, best of N."""
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for model in ("llama-3.2-1b", "llama-3.1-8b"):
            cmd = [sys.executable, "-m", "jaxunlearn.plan", "--model", model, "--mesh",
                   args.mesh, "--batch", "4", "--seq", "512", "--precision", "bf16-params",
                   "--remat", "matmuls", "--fast-flops", "--json"]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            seconds = json.loads(out.stdout.strip().splitlines()[-1])["compile_seconds"]
            best[model] = min(best.get(model, float("inf")), seconds)
    ratio = best["llama-3.1-8b"] / best["llama-3.2-1b"]
    res = {"mesh": args.mesh, "best_compile_s": best, "ratio_8b_over_1b": ratio,
           "repeats": args.repeats, "load_avg": os.getloadavg()}  # fmt: skip
    print(json.dumps(res))
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--compile", action="store_true", help="8B vs 1B compile time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mesh", default="fsdp=8")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16", "bf16-params"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--remat", default="matmuls")
    parser.add_argument("--lora", type=int, help="--validate the LoRA step of this rank")
    add_json_arg(parser)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.precision, args.batch, args.seq, args.remat,
                                 args.lora)))  # fmt: skip
        return
    modes = {"validate": validate, "table": table, "compile": compile_times}
    chosen = [m for m in modes if getattr(args, m)]
    if not chosen:
        parser.error("pass --validate, --table or --compile")
    result = {"benchmark": "bench_plan"}
    for mode in chosen:
        result[mode] = modes[mode](args)
    write_json(args.json_out, result)


if __name__ == "__main__":
    main()
