"""A 1B-class unlearning run on CPU: Llama-3.2-1B shape, bfloat16 parameters, NPO + retain.

Phases, each in its own process so their peak resident memory is measured apart:

1. ``make``: transformers builds a random Llama-3.2-1B-shaped model (the published
   config) in bfloat16 and saves it as bfloat16 safetensors.
2. ``jax``: `load_pretrained` with stacked layers, the "bf16-params" precision policy
   (bfloat16 parameters, float32 Adam moments) and rematerialisation; reference log-probs
   of the forget rows from the loaded model; 5 NPO + NLL-retain steps of the npo recipe at
   batch 2 x 128 (forget and retain each); `save_pretrained` to a new directory. By default
   the CPU memory mode of ``jaxunlearn plan --scan-bits``: the uint16-bits layer scan and
   XLA:CPU's memory-optimised scheduler (forget and retain rows go through one model call,
   as in every `forget_retain` objective).
3. ``torch``: the same 5 steps in transformers + torch (bfloat16 model, AdamW).
4. ``check``: transformers loads the saved directory; its bfloat16 logits on probe rows
   must match ours to the bf16 tolerance of tests/test_precision.py.

Prints one JSON line: peak RSS per phase, seconds per step for both frameworks, the logit
check. The full run peaked at 17.6 GiB resident in its JAX phase (planned 16.0 GiB; about
15 minutes on a 2-core CPU); it refuses to start with less than ``--min-free-gib`` available
unless ``--force``. ``--smoke`` runs every phase on a tiny model in about half a minute.

    python benchmarks/bench_1b_cpu.py --json-out benchmarks/results/bench_1b_cpu.json  # heavy
    python benchmarks/bench_1b_cpu.py --smoke --json-out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from _quiet import write_json  # noqa: E402  (benchmarks/ is on sys.path)

STEPS, ROWS, SEQ, BETA = 5, 2, 128, 0.1
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _hf_config(smoke: bool):
    import transformers

    from jaxunlearn.plan import BUILTIN_MODELS

    d = {k: v for k, v in BUILTIN_MODELS["llama-3.2-1b"].items()
         if k not in ("model_type", "torch_dtype")}  # fmt: skip
    if smoke:
        d.update(SMOKE)
    return transformers.LlamaConfig(**d)


def _batch(vocab: int) -> dict:
    rng = np.random.RandomState(0)

    def part():
        ids = rng.randint(0, vocab, (ROWS, SEQ)).astype(np.int32)
        labels = ids.copy()
        labels[:, : SEQ // 2] = -100  # answer-only labels
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}

    return {"forget": part(), "retain": part()}


def phase_make(directory: str, smoke: bool) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(_hf_config(smoke)).eval()
    model.save_pretrained(directory)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def phase_jax(directory: str, out: str, remat: str, scan: bool, scan_bits: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxunlearn import objectives, parallel, recipes, train
    from jaxunlearn.checkpoints.hf import load_pretrained, save_pretrained

    policy = parallel.precision_policy("bf16-params")
    model = load_pretrained(directory, scan_layers=scan, remat=remat, **policy.model_kwargs())
    graphdef, params, rest = train.split_model(model)
    cfg = model.config
    del model
    if scan_bits:  # the same modules, with the uint16-bits layer scan (graph only)
        from jaxunlearn.models import build_model

        kw = dict(scan_layers=True, remat=remat, scan_bits=True, **policy.model_kwargs())
        graphdef = train.split_model(nnx.eval_shape(lambda: build_model(cfg, **kw)))[0]
    batch = _batch(int(params["embed_tokens"]["embedding"].shape[0]))
    ref = jax.jit(
        lambda p, b: objectives.reference_logprob(train.model_forward(graphdef, p, rest), b)
    )
    batch["forget"]["ref_logprob"] = np.asarray(ref(params, batch["forget"]))
    recipe = recipes.recipe("npo", beta=BETA)
    from jaxunlearn.train.step import CPU_MEMORY_SCHEDULING

    options = CPU_MEMORY_SCHEDULING if scan_bits else None  # the planner's --scan-bits mode
    step = train.make_step(graphdef, rest, recipe.objective, policy.optimizer(recipe.tx),
                           compiler_options=options)  # fmt: skip
    opt_state = step.init(params)
    times, losses = [], []
    for _ in range(STEPS + 1):  # the first call compiles
        start = time.perf_counter()
        params, opt_state, _, metrics = step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - start)
    probe = jnp.asarray(batch["retain"]["input_ids"])
    logits = train.model_forward(graphdef, params, rest)(input_ids=probe).logits
    model = nnx.merge(graphdef, params, rest)
    save_pretrained(model, out)
    np.save(os.path.join(out, "probe_logits.npy"), np.asarray(logits, np.float32))
    np.save(os.path.join(out, "probe_ids.npy"), np.asarray(probe))
    return {"compile_and_first_step_s": times[0], "step_s": float(np.median(times[1:])),
            "losses": losses, "finite": bool(metrics["finite"])}  # fmt: skip


def phase_torch(directory: str) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    model.train()
    batch = {k: {kk: torch.tensor(v, dtype=torch.long) for kk, v in part.items()}
             for k, part in _batch(model.config.vocab_size).items()}  # fmt: skip

    def seq_logprob(part):
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        logp = F.log_softmax(logits[:, :-1].float(), -1)
        labels = part["labels"][:, 1:]
        scored = labels != -100
        tok = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (tok * scored).sum(-1), scored.sum()

    with torch.no_grad():
        ref = seq_logprob(batch["forget"])[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    times = []
    for _ in range(STEPS + 1):
        start = time.perf_counter()
        logp, _ = seq_logprob(batch["forget"])
        npo = (-2.0 / BETA * F.logsigmoid(-BETA * (logp - ref))).mean()
        retain, n = seq_logprob(batch["retain"])
        loss = npo - retain.sum() / n
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
    return {"step_s": float(np.median(times[1:])), "threads": torch.get_num_threads()}


def phase_check(out: str) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = torch.tensor(np.load(os.path.join(out, "probe_ids.npy")), dtype=torch.long)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float().numpy()
    ours = np.load(os.path.join(out, "probe_logits.npy"))
    scale = float(np.abs(ref).max())
    diff = np.abs(ours - ref)
    return {"logit_scale": scale, "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "within_bf16_tolerance": bool(diff.max() <= 0.03 * scale
                                          and diff.mean() <= 0.005 * scale)}  # fmt: skip


def _run_phase(args: list[str]) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                         text=True)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"phase {args[1]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--remat", default="full")
    parser.add_argument(
        "--no-scan",
        action="store_true",
        help="unstacked layers (XLA:CPU plans 24.7 GiB for them vs 26.4 GiB stacked, but "
        "compiles for minutes)",
    )
    parser.add_argument(
        "--no-scan-bits",
        action="store_true",
        help="plain layer scan and XLA:CPU's default scheduler: by default scanned layers with "
        "remat 'full' carry the bf16 weights as uint16 bits (jaxunlearn.models.scan_bits; "
        "XLA:CPU's float32 copies avoided) and the step uses the memory-optimised scheduler",
    )
    parser.add_argument("--json-out", help="also write the result dict (JSON) here")
    parser.add_argument("--min-free-gib", type=float, default=18.0)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    scan_bits = not args.no_scan and args.remat == "full" and not args.no_scan_bits
    if args.phase:
        name, *paths = args.phase
        result = {"make": lambda: phase_make(paths[0], args.smoke),
                  "jax": lambda: phase_jax(paths[0], paths[1], args.remat, not args.no_scan,
                                           scan_bits),
                  "torch": lambda: phase_torch(paths[0]),
                  "check": lambda: phase_check(paths[0])}[name]()  # fmt: skip
        print(json.dumps({**result, "peak_rss_bytes": _peak_rss()}))
        return
    free = _available_gib()
    load_at_start = round(os.getloadavg()[0], 2)
    if not args.smoke and free < args.min_free_gib and not args.force:
        sys.exit(f"only {free:.1f} GiB available (< {args.min_free_gib}); not starting.")
    smoke = (["--smoke"] if args.smoke else []) + (["--no-scan"] if args.no_scan else [])
    smoke += ["--no-scan-bits"] if args.no_scan_bits else []
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in"), os.path.join(d, "out")
        report = {"benchmark": "bench_1b_cpu", "model": "smoke" if args.smoke else "llama-3.2-1b-shape", "steps": STEPS,
                  "batch": f"{ROWS}x{SEQ} forget + {ROWS}x{SEQ} retain", "remat": args.remat,
                  "precision": "bf16-params", "scan_layers": not args.no_scan, "scan_bits": scan_bits,
                  "available_gib_at_start": round(free, 1)}  # fmt: skip
        for name, paths in (("make", [src]), ("jax", [src, dst]), ("torch", [src]),
                            ("check", [dst])):  # fmt: skip
            report[name] = _run_phase(["--phase", name, *paths, *smoke, "--remat", args.remat])
        report["jax_peak_rss_gib"] = report["jax"]["peak_rss_bytes"] / 2**30
    load = (load_at_start, round(os.getloadavg()[0], 2))
    # One long run, not interleaved with torch: the times are never quiet-gated.
    report["quiet_gate"] = {
        "held": False,
        "reason": f"not gated: one run of each framework; "
        f"1-min load average {load[0]} at the start, {load[1]} at the end",
    }
    report["ratios"] = {"jax_step_over_torch_step": {
        "value": report["jax"]["step_s"] / report["torch"]["step_s"], "status": "loaded",
        "reason": report["quiet_gate"]["reason"]}}  # fmt: skip
    write_json(args.json_out, report)  # adds the command and the machine
    print(json.dumps(report))


if __name__ == "__main__":
    main()
