"""LoRA vs full-parameter unlearning steps: jaxunlearn vs transformers + peft, one process.

The benchmark model (`bench_model.MODEL_SHAPE`: Llama, vocab 4096, hidden 512, 6 layers,
float32, random weights). One GradDiff step (forget batch + retain batch of B x T tokens,
answer-only labels, AdamW) four ways:

- jaxunlearn full-parameter: `train.make_step` on ``split_model(model)``;
- jaxunlearn LoRA: ``train.make_step`` (the frozen base passed as
  an argument) on ``split_model(apply_lora(model, rank, alpha))`` (adapters on q, k, v, o,
  gate, up, down; the frozen base outside the trained state);
- torch full-parameter: transformers ``LlamaForCausalLM`` + ``torch.optim.AdamW``;
- torch LoRA: ``peft.get_peft_model`` with the same rank, alpha and targets + AdamW on the
  trainable parameters.

Reported: median step seconds (the four are interleaved round by round), trainable
parameters, bytes of trainable params + gradients + optimizer state (counted from the
tensors), and for JAX XLA's own memory analysis of the compiled step (argument, output and
temporary bytes; for LoRA the frozen base is among the arguments).

    python benchmarks/bench_lora.py                 # benchmark size
    python benchmarks/bench_lora.py --quick         # tiny smoke run
    python benchmarks/bench_lora.py --json-out benchmarks/results/bench_lora.json

The four steps are timed only while other processes leave the CPUs idle (`--gate`, as in
bench_model.py); when the gate's deadline passes the ratios are stored marked "loaded".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _quiet import Gate, add_gate_args, add_json_arg, ratio_entry, write_json
from bench_model import add_model_args, apply_quick, hf_config  # noqa: E402
from flax import nnx

from jaxunlearn import objectives, train
from jaxunlearn.models import ModelConfig, build_model, lora

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sequence_batch(rng: np.random.Generator, rows: int, seq: int, vocab: int) -> dict:
    ids = rng.integers(0, vocab, (rows, seq), dtype=np.int32)
    labels = ids.copy()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def jax_step(model, batch, lr: float):
    """(run_one_step, facts) for `make_step` on `model` (full or LoRA)."""
    graphdef, params, rest = train.split_model(model)
    objective = objectives.grad_diff()
    step = train.make_step(graphdef, rest, objective, optax.adamw(lr, weight_decay=0.01))
    params = jax.tree.map(jnp.copy, params)
    opt_state = step.init(params)
    compiled = (
        jax.jit(step.update_fn, donate_argnums=(0, 1))
        .lower(params, opt_state, batch, None, step.frozen)
        .compile()
    )
    mem = compiled.memory_analysis()
    facts = {
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(params))),
        # params + grads (same size) + optimizer state
        "train_state_bytes": 2 * _bytes(params) + _bytes(opt_state),
        "xla_argument_bytes": int(mem.argument_size_in_bytes),
        "xla_output_bytes": int(mem.output_size_in_bytes),
        "xla_temp_bytes": int(mem.temp_size_in_bytes),
    }
    state = {"p": params, "s": opt_state}

    def run():
        state["p"], state["s"], _, metrics = step(state["p"], state["s"], batch, None)
        metrics["loss"].block_until_ready()

    return run, facts


def torch_step(model, forget, retain, lr: float):
    """(run_one_step, facts) for a transformers (or peft) model and AdamW."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    model.train()

    def run():
        loss = -model(**forget).loss + model(**retain).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    run()  # creates the optimizer state
    opt_bytes = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    n = sum(p.numel() for p in trainable)
    facts = {
        "trainable_params": int(n),
        "train_state_bytes": int(2 * sum(p.numel() * p.element_size() for p in trainable))
        + int(opt_bytes),
    }
    return run, facts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4, help="rows of the forget and retain batches")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--reps", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    add_json_arg(p)
    add_gate_args(p)
    args = p.parse_args(argv)
    apply_quick(args)

    import peft
    import torch
    import transformers

    load_before = os.getloadavg()[0]
    hf_cfg = hf_config(args)
    rng = np.random.default_rng(0)
    forget_np, retain_np = (sequence_batch(rng, args.batch, args.seq, args.vocab) for _ in range(2))
    batch = {
        "forget": {k: jnp.asarray(v) for k, v in forget_np.items()},
        "retain": {k: jnp.asarray(v) for k, v in retain_np.items()},
    }
    model = build_model(ModelConfig.from_hf_dict(hf_cfg.to_dict()), rngs=nnx.Rngs(0))
    lora_model = lora.apply_lora(model, rank=args.rank, alpha=args.alpha, targets=TARGETS)
    j_full, j_full_facts = jax_step(model, batch, args.lr)
    j_lora, j_lora_facts = jax_step(lora_model, batch, args.lr)

    torch.manual_seed(0)
    to_t = lambda b: {k: torch.from_numpy(v).long() for k, v in b.items()}  # noqa: E731
    forget_t, retain_t = to_t(forget_np), to_t(retain_np)
    base = transformers.LlamaForCausalLM(hf_cfg).float()
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0
        ),
    )
    t_full, t_full_facts = torch_step(base, forget_t, retain_t, args.lr)
    t_lora, t_lora_facts = torch_step(peft_model, forget_t, retain_t, args.lr)

    gate = Gate(args.gate, args.max_wait)
    times = gate.times(
        {"jax_full": j_full, "jax_lora": j_lora, "torch_full": t_full, "torch_lora": t_lora},
        args.reps,
    )
    quiet = gate.record()
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "benchmark": "bench_lora",
        "quiet_gate": quiet,
        "backend": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"{jax.device_count()} {jax.default_backend()} device(s), torch threads "
        f"{torch.get_num_threads()}, peft {peft.__version__}",
        "load_avg_1min_before_after": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
        "shape": f"vocab {args.vocab}, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"layers {args.layers}, heads {args.heads}/{args.kv_heads}; forget+retain "
        f"{args.batch}x{args.seq} each; LoRA r={args.rank} alpha={args.alpha} on {TARGETS}",
        "reps": args.reps,
    }
    facts = {
        "jax_full": j_full_facts,
        "jax_lora": j_lora_facts,
        "torch_full": t_full_facts,
        "torch_lora": t_lora_facts,
    }
    for name in facts:
        res[name] = {
            "step_s_median": med[name],
            "step_s_min": min(times[name]),
            "step_s_all": times[name],
            **facts[name],
        }
    res["ratios"] = {  # every ratio carries the gate's verdict ("quiet" or "loaded")
        "lora_speedup_jax": ratio_entry(med["jax_full"] / med["jax_lora"], quiet),
        "lora_speedup_torch": ratio_entry(med["torch_full"] / med["torch_lora"], quiet),
        "lora_jax_vs_torch": ratio_entry(med["torch_lora"] / med["jax_lora"], quiet),
        "full_jax_vs_torch": ratio_entry(med["torch_full"] / med["jax_full"], quiet),
    }
    write_json(args.json_out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
