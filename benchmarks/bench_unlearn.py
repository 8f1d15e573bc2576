"""Unlearning step throughput: jaxunlearn's jitted steps vs a plain transformers+torch loop.

The foundation benchmark's Llama shape (vocab 4096, hidden 512, intermediate 1408, 6 layers,
8 heads, 4 KV heads, float32, random weights). Every step takes a forget batch and a retain
batch of B x T tokens each with answer-only labels (the second half of each row is scored,
the first half is -100), and ends with an AdamW update. Timed, in this one process:

- GradDiff: `objectives.grad_diff()` + `optax.adamw` in `train.make_step`, vs torch
  `-model(**forget).loss + model(**retain).loss`, backward, `AdamW.step`.
- NPO (beta 0.1) + NLL retain with reference log-probs precomputed once and carried in the
  batch (`forget["ref_logprob"]`), vs torch with the same precomputed tensor.
- NPO with a reference forward every step (frozen params passed to the jitted step), vs
  torch running a frozen copy of the model under `no_grad` every step (open-unlearning).
- GU: NPO with separate forget/retain gradients through
  `optax.chain(transforms.retain_projection(rank=8, refresh_every=10), optax.adamw)`. Its
  time is the mean step time over whole 10-step refresh cycles (so each cycle pays exactly
  one basis refresh); also timed: the same split-gradient step without the projection.
- SSD's diagonal Fisher over `--fisher-items` items (default 1,000 of `--fisher-seq` = 64
  tokens, shorter than the step's rows to keep a CPU run to minutes; NLL on the second
  half of each item): `transforms.fisher_diagonal` with the exact per-example convention
  (vmap of per-example grads over `--fisher-chunk` examples at a time) and the SSD code's
  batch-mean convention (batches of `--fisher-batch`), vs torch's SSD loop (per batch:
  loss.backward(), accumulate grad ** 2). A one-batch call first compiles (the library
  compiles once per loss function and batch shape, and that time is reported apart);
  then the full call over all items is timed.

Step times are medians over `--reps` timed steps after warm-up (compile + one step). Each
JAX step is timed interleaved with its torch counterpart (JAX, torch, torch, JAX, ...), and
on Linux a round counts only while other processes leave the CPUs idle (`--gate`, the same
gate as bench_model.py; a disturbed round is repeated), because their load slows torch's
OpenMP workers far more than XLA's. If the gate's `--max-wait` passes, rounds are kept
whatever the load and every ratio is printed and stored marked "loaded", not as a result.

    python benchmarks/bench_unlearn.py --reps 5 --gu-cycles 2   # full size (~9 min quiet)
    python benchmarks/bench_unlearn.py --quick                  # tiny smoke run
    python benchmarks/bench_unlearn.py --json-out benchmarks/results/bench_unlearn.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Same model definition as the foundation benchmark, so the two tables compare directly.
from _quiet import Gate, add_gate_args, add_json_arg, format_ratio, ratio_entry, write_json
from bench_model import add_model_args, apply_quick, hf_config  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from flax import nnx

from jaxunlearn import objectives, train, transforms
from jaxunlearn.models import ModelConfig, build_model

LIBRARY_FISHER_CHUNK = 8  # transforms.fisher_diagonal's default chunk_size
GU_CYCLE_NOTE = "mean step time over whole refresh cycles (one refresh per cycle)"
# transformers / the donation path warn on every call on CPU; the warnings say nothing
# about timing and would bury the table.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def sequence_batch(rng: np.random.Generator, rows: int, seq: int, vocab: int) -> dict:
    """input_ids / attention_mask / labels [rows, seq]; only the second half of a row is scored."""
    ids = rng.integers(0, vocab, (rows, seq), dtype=np.int32)
    labels = ids.copy()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def _add_retain() -> optax.GradientTransformationExtraArgs:
    """forget_updates + retain_grads: the split-gradient step with no projection in it."""

    def update(updates, state, params=None, *, retain_grads=None, retain_weight=1.0, **extra):
        del params, extra
        return jax.tree.map(lambda f, r: f + retain_weight * r, updates, retain_grads), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


# ----------------------------------------------------------------------------- JAX


class JaxBench:
    """The split model, its initial params and the unlearning batches, on JAX arrays."""

    def __init__(self, hf_cfg, forget: dict, retain: dict, args):
        cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
        model = build_model(cfg, rngs=nnx.Rngs(0))
        self.graphdef, self.params0, self.rest = train.split_model(model)
        self.n_params = sum(x.size for x in jax.tree.leaves(self.params0))
        self.args = args
        to_jax = lambda b: {k: jnp.asarray(v) for k, v in b.items()}  # noqa: E731
        self.forget, self.retain = to_jax(forget), to_jax(retain)
        self.tx = lambda: optax.adamw(args.lr, weight_decay=0.01)

        ref_fn = jax.jit(
            lambda p, b: objectives.reference_logprob(
                train.model_forward(self.graphdef, p, self.rest), b
            )
        )
        ref_fn(self.params0, self.forget).block_until_ready()  # compile
        t0 = time.perf_counter()
        self.ref_logprob = ref_fn(self.params0, self.forget).block_until_ready()
        self.ref_precompute_s = time.perf_counter() - t0

    def params(self):
        """A fresh copy of the initial params (the step donates what it is given)."""
        return jax.tree.map(jnp.copy, self.params0)

    def batch(self, *, precomputed: bool) -> dict:
        forget = dict(self.forget)
        if precomputed:
            forget["ref_logprob"] = self.ref_logprob
        return {"forget": forget, "retain": self.retain}

    def stepper(self, objective, tx, batch, **kwargs):
        """A closure running one step of `train.make_step` and waiting for it."""
        step = train.make_step(self.graphdef, self.rest, objective, tx, **kwargs)
        params = self.params()
        state = {"p": params, "s": step.init(params), "o": train.init_objective_state(objective)}

        def run():
            state["p"], state["s"], state["o"], metrics = step(
                state["p"], state["s"], batch, state["o"]
            )
            metrics["loss"].block_until_ready()

        return run, state

    def gu_cycle(self, objective, batch):
        """(run one whole refresh cycle, compile) for GU: one refresh per cycle.

        The cycle function returns its steps' times split into the refresh step and the rest.
        """
        every = self.args.gu_refresh
        tx = optax.chain(
            transforms.retain_projection(rank=self.args.gu_rank, refresh_every=every),
            self.tx(),
        )
        run, state = self.stepper(objective, tx, batch)  # GU asks for retain_grads itself

        def compile_and_warm():
            for _ in range(2):  # compile (on a refresh step) and one more
                run()

        def cycle():
            refresh, other = [], []
            for _ in range(every):
                count = int(state["s"][0].count)
                t0 = time.perf_counter()
                run()
                (refresh if count % every == 0 else other).append(time.perf_counter() - t0)
            return {"refresh": refresh, "other": other}

        return cycle, compile_and_warm

    def loss_fn(self):
        term = objectives.nll()

        def loss(p, batch):
            return term(train.model_forward(self.graphdef, p, self.rest), batch)[0]

        return loss

    def fisher_call(self, batches: list[dict], convention: str, chunk: int = 8):
        """(the full `fisher_diagonal` call, seconds of a one-batch call that compiles)."""
        loss = self.loss_fn()
        kw = {"convention": convention}
        if convention == "per_example":
            kw["chunk_size"] = chunk

        def call(bs):
            out = transforms.fisher_diagonal(loss, self.params0, bs, **kw)
            jax.block_until_ready(out)

        t0 = time.perf_counter()
        call(batches[:1])
        return (lambda: call(batches)), time.perf_counter() - t0


# ----------------------------------------------------------------------------- torch


class TorchBench:
    """The same steps as a plain transformers + torch training loop."""

    def __init__(self, hf_cfg, forget: dict, retain: dict, args):
        import torch
        import transformers

        torch.manual_seed(0)
        self.torch = torch
        self.args = args
        self.model0 = transformers.LlamaForCausalLM(hf_cfg).float()
        to_t = lambda b: {k: torch.from_numpy(v).long() for k, v in b.items()}  # noqa: E731
        self.forget, self.retain = to_t(forget), to_t(retain)
        ref = copy.deepcopy(self.model0).eval()
        with torch.no_grad():
            self.ref_logprob = self.sequence_logprob(ref, self.forget)
        self.threads = torch.get_num_threads()

    def sequence_logprob(self, model, batch):
        """Sum of answer-token log-probs per row (open-unlearning's compute_batch_nll)."""
        f = self.torch.nn.functional
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted = logits[:, :-1].transpose(1, 2)  # [B, V, T-1] for cross_entropy
        nll = f.cross_entropy(shifted, batch["labels"][:, 1:], ignore_index=-100, reduction="none")
        return -nll.sum(-1)

    def fresh(self):
        model = copy.deepcopy(self.model0).train()
        opt = self.torch.optim.AdamW(model.parameters(), lr=self.args.lr, weight_decay=0.01)
        return model, opt

    def graddiff_step(self):
        model, opt = self.fresh()

        def step():
            forget_loss = -model(**self.forget).loss
            retain_loss = model(**self.retain).loss
            (forget_loss + retain_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def npo_step(self, *, ref_forward: bool):
        f, beta = self.torch.nn.functional, self.args.beta
        model, opt = self.fresh()
        ref = copy.deepcopy(self.model0).eval()
        for p in ref.parameters():
            p.requires_grad_(False)

        def step():
            if ref_forward:
                with self.torch.no_grad():
                    ref_lp = self.sequence_logprob(ref, self.forget)
            else:
                ref_lp = self.ref_logprob
            log_ratio = self.sequence_logprob(model, self.forget) - ref_lp
            forget_loss = (2.0 / beta) * f.softplus(beta * log_ratio).mean()
            retain_loss = model(**self.retain).loss
            (forget_loss + retain_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def fisher_call(self, batches: list[dict]):
        """SSD's reference loop: mean over batches of the squared batch-mean gradient."""
        torch = self.torch
        model = copy.deepcopy(self.model0).eval()
        t_batches = [{k: torch.from_numpy(v).long() for k, v in b.items()} for b in batches]

        def call():
            imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
            for b in t_batches:
                model.zero_grad(set_to_none=True)
                model(**b).loss.backward()
                for n, p in model.named_parameters():
                    imp[n] += p.grad.detach() ** 2
            for v in imp.values():
                v /= len(t_batches)

        return call


# ----------------------------------------------------------------------------- main


def _check(value: dict, target: float, larger_is_better: bool) -> str:
    if value["status"] != "quiet":
        return "not judged (loaded run)"
    ok = value["value"] >= target if larger_is_better else value["value"] <= target
    return f"{'met' if ok else 'MISSED'} ({'>=' if larger_is_better else '<='} {target:g})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument(
        "--batch", type=int, default=8, help="rows of the forget and of the retain batch"
    )
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5, help="timed steps per measurement (median)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1, help="NPO beta")
    p.add_argument("--gu-rank", type=int, default=8)
    p.add_argument("--gu-refresh", type=int, default=10)
    p.add_argument("--gu-cycles", type=int, default=2, help="timed refresh cycles (median)")
    p.add_argument("--fisher-items", type=int, default=1000)
    p.add_argument(
        "--fisher-seq",
        type=int,
        default=64,
        help="Fisher item length (shorter than --seq: CPU time)",
    )
    p.add_argument("--fisher-batch", type=int, default=8, help="batch-mean convention's batch size")
    p.add_argument(
        "--fisher-chunk",
        type=int,
        default=LIBRARY_FISHER_CHUNK,
        help="per_example chunk_size (examples whose grads are held at once)",
    )
    p.add_argument("--fisher-reps", type=int, default=1, help="timed full Fisher calls (median)")
    p.add_argument("--no-fisher", action="store_true", help="skip the Fisher section")
    p.add_argument("--no-torch-fisher", action="store_true", help="skip torch's Fisher loop")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    add_json_arg(p)
    add_gate_args(p)
    return p


def time_steps(jb: JaxBench, tb: TorchBench, gate: Gate, args) -> tuple[dict, dict]:
    """Median step seconds, each JAX step interleaved with its torch counterpart.

    Returns (medians by name, every kept round's seconds by name).
    """
    npo = objectives.forget_retain(objectives.npo(beta=args.beta), objectives.nll())
    pre, ref_batch = jb.batch(precomputed=True), jb.batch(precomputed=False)
    groups = {
        "graddiff": {
            "jax_graddiff": jb.stepper(objectives.grad_diff(), jb.tx(), pre)[0],
            "torch_graddiff": tb.graddiff_step(),
        },
        "npo_precomputed": {
            "jax_npo_precomputed": jb.stepper(npo, jb.tx(), pre)[0],
            "torch_npo_precomputed": tb.npo_step(ref_forward=False),
            "jax_npo_split_grads": jb.stepper(npo, optax.chain(_add_retain(), jb.tx()), pre)[0],
        },
        "npo_ref_forward": {
            "jax_npo_ref_forward": jb.stepper(npo, jb.tx(), ref_batch, ref_params=jb.params())[0],
            "torch_npo_ref_forward": tb.npo_step(ref_forward=True),
        },
    }
    rounds: dict = {}
    for fns in groups.values():  # warm-up 2: compile + one step
        rounds.update(gate.times(fns, args.reps, warmup=2))
    med = {f"{k}_s": statistics.median(v) for k, v in rounds.items()}
    cycle, warm = jb.gu_cycle(npo, pre)
    warm()
    gu_times, gu_values = gate.rounds({"jax_gu_cycle": cycle}, args.gu_cycles, warmup=0)
    every = args.gu_refresh
    med["jax_gu_cycle_mean_s"] = statistics.median(t / every for t in gu_times["jax_gu_cycle"])
    refresh = [t for v in gu_values["jax_gu_cycle"] for t in v["refresh"]]
    other = [t for v in gu_values["jax_gu_cycle"] for t in v["other"]]
    med["jax_gu_refresh_step_s"] = statistics.median(refresh)
    med["jax_gu_other_steps_s"] = statistics.median(other) if other else float("nan")
    rounds["jax_gu_cycle"] = gu_times["jax_gu_cycle"]
    return med, rounds


def time_fisher(jb: JaxBench, tb: TorchBench, gate: Gate, args) -> tuple[dict, dict]:
    """The full Fisher calls (JAX both conventions, torch's SSD loop), interleaved."""
    n_batches = -(-args.fisher_items // args.fisher_batch)
    frng = np.random.default_rng(1)
    batches = [
        sequence_batch(frng, args.fisher_batch, args.fisher_seq, args.vocab)
        for _ in range(n_batches)
    ]
    extra = args.fisher_batch * n_batches - args.fisher_items
    if extra:  # trim the last batch so the item count is exact (one more compile)
        batches[-1] = {k: v[: args.fisher_batch - extra] for k, v in batches[-1].items()}
    r, fns = {}, {}
    for name, chunk in (("per_example", args.fisher_chunk), ("batch_mean", None)):
        fns[f"jax_fisher_{name}_call"], first = jb.fisher_call(batches, name, chunk)
        r[f"jax_fisher_{name}_first_one_batch_call_s"] = first
    if not args.no_torch_fisher:
        fns["torch_fisher_batch_mean"] = tb.fisher_call(batches)
    rounds = gate.times(fns, args.fisher_reps, warmup=0)
    r.update({f"{k}_s": statistics.median(v) for k, v in rounds.items()})
    return r, rounds


def ratios_of(r: dict) -> dict[str, float]:
    """The ratios the issue's targets refer to (torch / JAX: > 1 means JAX is faster)."""
    ratios = {
        "graddiff_speedup_vs_torch": r["torch_graddiff_s"] / r["jax_graddiff_s"],
        "npo_precomputed_over_graddiff": r["jax_npo_precomputed_s"] / r["jax_graddiff_s"],
        "npo_ref_forward_over_graddiff": r["jax_npo_ref_forward_s"] / r["jax_graddiff_s"],
        "torch_npo_ref_forward_over_torch_graddiff": r["torch_npo_ref_forward_s"]
        / r["torch_graddiff_s"],
        "torch_npo_precomputed_over_torch_graddiff": r["torch_npo_precomputed_s"]
        / r["torch_graddiff_s"],
        "npo_precomputed_speedup_vs_torch": r["torch_npo_precomputed_s"]
        / r["jax_npo_precomputed_s"],
        "npo_ref_forward_speedup_vs_torch": r["torch_npo_ref_forward_s"]
        / r["jax_npo_ref_forward_s"],
        "gu_over_npo": r["jax_gu_cycle_mean_s"] / r["jax_npo_precomputed_s"],
        "gu_over_npo_split_grads": r["jax_gu_cycle_mean_s"] / r["jax_npo_split_grads_s"],
        "npo_split_grads_over_npo": r["jax_npo_split_grads_s"] / r["jax_npo_precomputed_s"],
    }
    if "jax_fisher_per_example_call_s" in r:
        ratios["fisher_per_example_over_batch_mean"] = (
            r["jax_fisher_per_example_call_s"] / r["jax_fisher_batch_mean_call_s"]
        )
    if "torch_fisher_batch_mean_s" in r:
        ratios["fisher_batch_mean_speedup_vs_torch"] = (
            r["torch_fisher_batch_mean_s"] / r["jax_fisher_batch_mean_call_s"]
        )
        ratios["fisher_per_example_speedup_vs_torch_batch_mean"] = (
            r["torch_fisher_batch_mean_s"] / r["jax_fisher_per_example_call_s"]
        )
    return ratios


TARGETS = {  # ratio name: (target, larger is better)
    "graddiff_speedup_vs_torch": (1.5, True),
    "npo_precomputed_over_graddiff": (1.1, False),
    "gu_over_npo": (1.3, False),
    "fisher_per_example_over_batch_mean": (2.0, False),
}


def main(argv=None):
    args = _parser().parse_args(argv)
    apply_quick(args)
    if args.quick:
        args.gu_cycles, args.fisher_items, args.fisher_batch = 1, 16, 4
        args.fisher_seq = args.seq

    load_start = os.getloadavg()
    t_start = time.perf_counter()
    hf_cfg = hf_config(args)
    rng = np.random.default_rng(0)
    forget = sequence_batch(rng, args.batch, args.seq, args.vocab)
    retain = sequence_batch(rng, args.batch, args.seq, args.vocab)
    jb = JaxBench(hf_cfg, forget, retain, args)
    tb = TorchBench(hf_cfg, forget, retain, args)
    gate = Gate(args.gate, args.max_wait)
    r, rounds = time_steps(jb, tb, gate, args)
    if not args.no_fisher:
        fr, frounds = time_fisher(jb, tb, gate, args)
        r.update(fr)
        rounds.update(frounds)
    quiet = gate.record()
    ratios = {k: ratio_entry(v, quiet) for k, v in ratios_of(r).items()}
    targets = {k: _check(ratios[k], *t) for k, t in TARGETS.items() if k in ratios}
    info = {
        "backend": f"{jax.device_count()} {jax.default_backend()} device(s), torch threads "
        f"{tb.threads}, {platform.machine()}",
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "params": jb.n_params,
        "shape": f"vocab {args.vocab}, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, {args.heads} heads, {args.kv_heads} kv heads, float32",
        "step_batch": f"forget {args.batch}x{args.seq} + retain {args.batch}x{args.seq} tokens, "
        "second half of each row scored",
        "reps": args.reps,
        "gu": f"rank {args.gu_rank}, refresh every {args.gu_refresh}, {args.gu_cycles} cycle(s); "
        + GU_CYCLE_NOTE,
        "jax_ref_logprob_precompute_s": jb.ref_precompute_s,
        "total_wall_s": time.perf_counter() - t_start,
    }
    if not args.no_fisher:
        info["fisher"] = (
            f"{args.fisher_items} items x {args.fisher_seq} tokens (second half scored), "
            f"batch-mean batch {args.fisher_batch}, per-example chunk_size {args.fisher_chunk}; "
            f"median of {args.fisher_reps} full call(s) after a one-batch compile call"
            + ("" if args.fisher_seq == args.seq else f" (SHORTER than the step's {args.seq})")
        )

    for k, v in info.items():
        print(f"{k:44s} {v}")
    print(f"{'quiet_gate':44s} {'held' if quiet['held'] else 'NOT HELD'}: {quiet['reason']}")
    print("-- times (s)")
    for k, v in r.items():
        print(f"{k:44s} {v:.4g}")
    print("-- ratios")
    for k, v in ratios.items():
        print(f"{k:44s} {format_ratio(v)}  {targets.get(k, '')}")
    write_json(
        args.json_out,
        {
            "benchmark": "bench_unlearn",
            "info": info,
            "quiet_gate": quiet,
            "times_s": r,
            "ratios": ratios,
            "targets": targets,
            "rounds_s": rounds,
        },
    )


if __name__ == "__main__":
    main()
