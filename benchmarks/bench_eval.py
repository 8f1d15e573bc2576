"""TOFU evaluation wall time: jaxunlearn's runner vs the same work in transformers + torch.

One process, one model, same batch size. The model is the foundation benchmark's Llama shape
(vocab 4096, hidden 512, intermediate 1408, 6 layers, 8 heads, 4 KV heads, random weights),
with a BPE tokenizer (vocab 4096) trained on TOFU text and a small chat template. Timed:

- jax: `jaxunlearn.eval.evaluate_tofu` with the default suite (Prob, ROUGE with greedy
  generation, truth ratios, forget quality inputs, model utility, ES, EM, Min-K / Min-K++ /
  LOSS / ZLib MIAs, PrivLeak) on forget10 / retain_perturbed / real authors / world facts /
  holdout10. The first run includes compilation; later runs reuse it.
- torch: a plain, reasonable transformers implementation of the same model work, as
  open-unlearning does it: batched teacher-forced scoring (dynamic padding, float32
  log-softmax, gather; entropy moments and argmax for the forget / holdout answers) and
  `model.generate` (greedy, left padding) for the ROUGE questions, same batch size, then the
  same ROUGE scoring of the decoded text.

Both sides report where their time goes, per phase: tokenize, compile (JAX), teacher-forced
scoring (torch per split: score/forget, score/retain, score/ra, score/wf, score/holdout; JAX
scores every split in one packed call, score/all), generate, metrics. The JAX phases come from the library's own hook (`eval.inference.collect_timings`),
not from a copy of its pipeline. The compiled JAX runs and the torch runs alternate
(JAX, torch, torch, JAX, ...) and, on Linux, a round is timed only while other processes
leave the CPUs idle (`--gate`, as bench_model.py); the first JAX run (with compilation) waits
for quiet too. When the wait deadline passes, rounds run under load and no ratio is printed
(the reason is, and the JSON's ratios are null); `--gate 0` times whatever the load and
marks the ratios as ungated.

    python benchmarks/bench_eval.py --limit 8 --max-new-tokens 64 --batch-size 8
    python benchmarks/bench_eval.py --limit 32 --max-new-tokens 200 --batch-size 32 --repeats 1
    python benchmarks/bench_eval.py ... --unpacked    # the per-item scoring path, for before/after

Prints a per-phase table and the result dict (also written to `--json-out`). Wall times depend
on the device (JAX's default backend; torch CUDA when available).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _quiet import OtherProcessCPU, command_line, machine_info, write_json  # noqa: E402

# Same model definition and quiet-machine gate as the other benchmarks.
from bench_model import _interleaved_times, add_model_args, hf_config  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPLITS = (
    "forget10_perturbed",
    "retain_perturbed",
    "real_authors_perturbed",
    "world_facts_perturbed",
    "holdout10",
)


def train_tokenizer(vocab_size: int):
    """A BPE tokenizer (Metaspace, BOS prepended) trained on every TOFU question and answer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from jaxunlearn.data import TOFU_DIR

    lines = []
    for path in sorted(TOFU_DIR.glob("*.json")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            lines += [v for v in row.values() if isinstance(v, str)]
            lines += [v for v in row.get("perturbed_answer", []) if isinstance(v, str)]
    special = [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_model(path: Path, tokenizer, args):
    import torch
    import transformers

    torch.manual_seed(0)
    config = hf_config(
        args, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------- torch side

# Split name -> phase suffix, as the JAX runner names its scoring phases.
PHASE = {
    "forget10_perturbed": "forget",
    "retain_perturbed": "retain",
    "real_authors_perturbed": "ra",
    "world_facts_perturbed": "wf",
    "holdout10": "holdout",
}


def _rows(limit):
    from jaxunlearn.data import load_tofu

    out = {}
    for split in SPLITS:
        rows = load_tofu(split).to_list()
        out[split] = rows if limit is None else rows[:limit]
    return out


def _torch_workload(data):
    """Per split: (plain QA items, stats QA items), and the questions to answer."""
    per_split, questions = {}, []
    for split, rows in data.items():
        plain, stats = [], []
        for r in rows:
            if split == "holdout10":
                stats.append((r["question"], r["answer"]))
                continue
            (stats if split == "forget10_perturbed" else plain).append((r["question"], r["answer"]))
            if "paraphrased_answer" in r:
                plain.append((r["question"], r["paraphrased_answer"]))
            plain += [(r["question"], a) for a in r["perturbed_answer"]]
            questions.append((r["question"], r["answer"]))
        per_split[split] = (plain, stats)
    return per_split, questions


class _Phases:
    """Wall seconds per phase of one torch run."""

    def __init__(self):
        self.seconds = {}

    def time(self, name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out


def torch_eval(model, tok, data, *, fmt: str, batch_size: int, max_new_tokens: int, device):
    """The model work of the TOFU suite in plain transformers + torch.

    Returns (summaries, {phase: seconds}).
    """
    import torch

    from jaxunlearn.data import encode_prompt, tokenize_qa
    from jaxunlearn.eval.metrics import rouge_scores

    phases = _Phases()
    per_split, questions = _torch_workload(data)

    def tokenize():
        examples = {
            split: tuple([tokenize_qa(tok, q, a, fmt, 2048) for q, a in items] for items in pair)
            for split, pair in per_split.items()
        }
        return examples, [encode_prompt(tok, q, fmt) for q, _ in questions]

    def score(examples, with_stats):
        losses = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            width = max(len(e["input_ids"]) for e in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, e in enumerate(chunk):
                n = len(e["input_ids"])
                ids[i, :n], labels[i, :n] = (
                    torch.from_numpy(e["input_ids"]),
                    torch.from_numpy(e["labels"]),
                )
                mask[i, :n] = 1
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            with torch.inference_mode():
                logp = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), -1)[:, :-1]
                target = labels[:, 1:]
                scored = target != -100
                lp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * scored
                losses.append((-lp.sum(-1) / scored.sum(-1)).cpu())
                if with_stats:  # Min-K%++ moments and the argmax for ES / EM
                    p = logp.exp()
                    mu = (p * logp).sum(-1)
                    sigma = ((p * logp**2).sum(-1) - mu**2).clamp(min=1e-6).sqrt()
                    hits = logp.argmax(-1) == target
                    _ = (mu * scored).sum().item(), (sigma * scored).sum().item(), hits.sum().item()
        return torch.cat(losses).numpy() if losses else np.zeros(0)

    def generate(prompts):
        texts = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.from_numpy(p), 1
            with torch.inference_mode():
                out = model.generate(
                    ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                )
            texts += [t.strip() for t in tok.batch_decode(out[:, width:], skip_special_tokens=True)]
        return texts

    examples, prompts = phases.time("tokenize", tokenize)
    plain_loss, stats_loss = [], []
    for split, (plain, stats) in examples.items():
        name = f"score/{PHASE[split]}"
        plain_loss.append(phases.time(name, score, plain, False))
        stats_loss.append(phases.time(name, score, stats, True))
    generations = phases.time("generate", generate, prompts)
    rouge = phases.time("metrics", rouge_scores, generations, [a for _, a in questions])
    summary = {
        "plain_loss": np.concatenate(plain_loss),
        "stats_loss": np.concatenate(stats_loss),
        "generations": generations,
        "rougeL_recall": float(np.mean([s["rougeL_recall"] for s in rouge])),
    }
    return summary, phases.seconds


# ----------------------------------------------------------------------------- main

PHASE_ORDER = (
    "tokenize",
    "compile",
    "score/forget",
    "score/retain",
    "score/ra",
    "score/wf",
    "score/holdout",
    "score/all",
    "generate",
    "metrics",
    "other",
)


def _with_other(phases: dict, wall: float) -> dict:
    """The phases plus "other": wall time outside every phase (loading rows, packing logs)."""
    return {**phases, "other": max(0.0, wall - sum(phases.values()))}


def _median_phases(runs: list[dict]) -> dict:
    names = {name for run in runs for name in run}
    return {name: statistics.median(run.get(name, 0.0) for run in runs) for name in names}


def _scoring(phases: dict) -> float:
    return sum(v for k, v in phases.items() if k.startswith("score/"))


def _kept(calls: list[tuple[float, dict]], kept_times: list[float]) -> list[dict]:
    """The phases of the calls whose wall times `_interleaved_times` kept (it repeats a
    disturbed round, so some calls were discarded): matched by nearest wall time."""
    return [min(calls, key=lambda c: abs(c[0] - t))[1] for t in kept_times]


def _print_table(columns: dict[str, dict]) -> None:
    names = [n for n in PHASE_ORDER if any(n in c for c in columns.values())]
    print(f"{'phase (s)':<16}" + "".join(f"{c:>20}" for c in columns))
    for name in names:
        cells = "".join(
            f"{columns[c][name]:>20.2f}" if name in columns[c] else f"{'-':>20}" for c in columns
        )
        print(f"{name:<16}{cells}")
    totals = "".join(f"{sum(c.values()):>20.2f}" for c in columns.values())
    print(f"{'total':<16}{totals}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, help="items per split (default: all of forget10)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=1, help="timed rounds per side (medians)")
    p.add_argument("--template", default="chat", choices=("chat", "qa"))
    add_model_args(p)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument(
        "--unpacked",
        action="store_true",
        help="JAX scores each (question, answer) on its own (evaluate_tofu(packed=False))",
    )
    p.add_argument(
        "--gate",
        type=float,
        default=0.05,
        help="time only while other processes use less than this share of the CPUs "
        "(Linux; 0 disables and marks the ratios ungated)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=900.0,
        help="seconds to wait in total for quiet; afterwards rounds run under load and no "
        "ratio is printed",
    )
    p.add_argument("--json-out", help="also write the result dict to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary model directory")
    args = p.parse_args(argv)

    import jax
    import torch

    from jaxunlearn import checkpoints
    from jaxunlearn.eval import inference, tofu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(args.vocab)
    save_model(tmp, tokenizer, args)
    setup_s = time.perf_counter() - t0
    model = checkpoints.load_pretrained(tmp)
    tokenizer = checkpoints.load_tokenizer(tmp)
    load_before = os.getloadavg()[0]
    gate = None if args.gate <= 0 else args.gate
    deadline = time.monotonic() + args.max_wait
    other = OtherProcessCPU()

    jax_calls: list[tuple[float, dict]] = []
    state = {}

    def run_jax():
        t = time.perf_counter()
        with inference.collect_timings() as timings:
            state["result"] = tofu.evaluate_tofu(
                model,
                tokenizer,
                fmt=args.template,
                limit=args.limit,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                packed=not args.unpacked,
            )
        wall = time.perf_counter() - t
        jax_calls.append((wall, _with_other(dict(timings.seconds), wall)))
        state["compiles"] = timings.calls.get("compile", 0)

    # The first run compiles; it too waits for a quiet machine.
    if gate is not None and other.available:
        while time.monotonic() < deadline and other.measure(lambda: time.sleep(0.5)) > gate:
            pass
    first_share = other.measure(run_jax)
    first_wall, first_phases = jax_calls[0]
    first_compiles = state["compiles"]
    fns = {"jax": run_jax}
    torch_calls: list[tuple[float, dict]] = []
    if not args.skip_torch:
        import transformers

        data = _rows(args.limit)
        # Loading is outside the timed region on both sides.
        torch_tok = transformers.AutoTokenizer.from_pretrained(tmp)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()
        kw = dict(fmt=args.template, batch_size=args.batch_size, device=device)
        # Untimed warm-up on one item per split (allocator, kernels, generate's first call),
        # as the JAX side's first run is reported apart from the compiled runs.
        torch_eval(torch_model, torch_tok, _rows(1), max_new_tokens=2, **kw)

        def run_torch():
            t = time.perf_counter()
            out, phases = torch_eval(
                torch_model, torch_tok, data, max_new_tokens=args.max_new_tokens, **kw
            )
            wall = time.perf_counter() - t
            state["torch"] = out
            torch_calls.append((wall, _with_other(phases, wall)))

        fns["torch"] = run_torch
    times, others = _interleaved_times(fns, args.repeats, gate=gate, deadline=deadline, warmup=0)
    late = gate is not None and time.monotonic() > deadline
    med = {k: statistics.median(v) for k, v in times.items()}
    jax_phases = _median_phases(_kept(jax_calls[1:], times["jax"]))
    columns = {"jax (first run)": first_phases, "jax (compiled)": jax_phases}
    if torch_calls:
        columns["transformers+torch"] = _median_phases(_kept(torch_calls, times["torch"]))
    result = state["result"]
    n_items = result.metadata["n_items"]
    print(
        f"TOFU forget10 eval, limit={args.limit}, items={n_items}, batch={args.batch_size}, "
        f"max_new_tokens={args.max_new_tokens}, template={args.template}, "
        f"scoring={'unpacked' if args.unpacked else 'packed'}"
    )
    print(
        f"jax backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); torch: {device}; "
        f"setup (tokenizer + checkpoint) {setup_s:.1f}s; {first_compiles} compilations"
    )
    _print_table(columns)
    shares = [x for x in [first_share, *others] if x == x]
    out = {
        "command": command_line(),
        "machine": machine_info(),
        "devices": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"jax {jax.default_backend()}, torch {device} ({torch.get_num_threads()} threads)",
        "load_avg_1min_before_after": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
        "other_processes_cpu_max": max(shares, default=float("nan")),
        "quiet_gate": "off" if gate is None else f"{gate:.2f}",
        "gate_deadline_passed": late,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "n_items": n_items,
        "max_new_tokens": args.max_new_tokens,
        "scoring": "unpacked" if args.unpacked else "packed",
        "jax_compilations": first_compiles,
        "jax_backend": jax.default_backend(),
        "torch_device": device,
        "jax_first_s": first_wall,
        **{f"{k}_s": v for k, v in med.items()},
        "runs_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "phases_s": {
            name: {k: round(v, 3) for k, v in sorted(c.items())} for name, c in columns.items()
        },
    }
    if torch_calls:
        torch_phases = columns["transformers+torch"]
        ratios = {
            "torch_over_jax": med["torch"] / med["jax"],
            "torch_over_jax_first": med["torch"] / first_wall,
            "torch_over_jax_scoring": _scoring(torch_phases) / _scoring(jax_phases),
        }
        if late:
            out["ratio_withheld"] = (
                "the quiet-gate deadline passed (--max-wait), so some rounds ran while other "
                "processes loaded the CPUs, which slows torch's threads more than XLA's"
            )
            out.update({k: None for k in ratios})
            print(f"no ratio: {out['ratio_withheld']}")
        else:
            out.update(ratios)
            note = " (UNGATED: --gate 0, other processes may have loaded the CPUs)" * (gate is None)
            print(
                f"torch / jax: compiled {ratios['torch_over_jax']:.2f}x, with compilation "
                f"{ratios['torch_over_jax_first']:.2f}x, teacher-forced scoring alone "
                f"{ratios['torch_over_jax_scoring']:.2f}x{note}"
            )
        torch_out = state["torch"]
        ours = result.logs["forget_Q_A_Prob"]["value_by_index"]
        n_forget = len(ours)
        jax_loss = np.array([ours[str(i)]["avg_loss"] for i in range(n_forget)])
        out["forget_loss_max_abs_diff"] = float(
            np.abs(jax_loss - torch_out["stats_loss"][:n_forget]).max()
        )
        jax_gens = [
            v["generation"]
            for key in ("forget_Q_A_ROUGE", "retain_Q_A_ROUGE", "ra_Q_A_ROUGE", "wf_Q_A_ROUGE")
            for v in result.logs[key]["value_by_index"].values()
        ]
        same = np.mean([a == b for a, b in zip(jax_gens, torch_out["generations"])])
        out["identical_generations"] = float(same)
        print(
            f"forget Lbar max |diff| {out['forget_loss_max_abs_diff']:.2e}; identical "
            f"generations {same:.0%}"
        )
    print(json.dumps(out, default=str))
    write_json(args.json_out, out)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
