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

    python benchmarks/bench_eval.py --limit 8 --max-new-tokens 32   # quick sanity run
    python benchmarks/bench_eval.py --repeats 3                     # full forget10, medians

Prints one table and a JSON line. Wall times depend on the device (JAX and torch each use the
default accelerator they see: JAX's default backend, torch CUDA when available).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# Same model definition as the other benchmarks, so the tables compare directly.
from bench_model import add_model_args, hf_config  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

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


def _rows(limit):
    from jaxunlearn.data import load_tofu

    out = {}
    for split in SPLITS:
        rows = load_tofu(split).to_list()
        out[split] = rows if limit is None else rows[:limit]
    return out


def _torch_workload(data):
    """(plain QA items, stats QA items, questions to answer) of the default TOFU suite."""
    plain, stats, questions = [], [], []
    for split, rows in data.items():
        for r in rows:
            if split == "holdout10":
                stats.append((r["question"], r["answer"]))
                continue
            (stats if split == "forget10_perturbed" else plain).append((r["question"], r["answer"]))
            if "paraphrased_answer" in r:
                plain.append((r["question"], r["paraphrased_answer"]))
            plain += [(r["question"], a) for a in r["perturbed_answer"]]
            questions.append((r["question"], r["answer"]))
    return plain, stats, questions


def torch_eval(model, tok, data, *, fmt: str, batch_size: int, max_new_tokens: int, device):
    """The model work of the TOFU suite in plain transformers + torch; returns summaries."""
    import torch

    from jaxunlearn.data import encode_prompt, tokenize_qa
    from jaxunlearn.eval.metrics import rouge_scores

    plain, stats, questions = _torch_workload(data)

    def score(items, with_stats):
        losses = []
        for start in range(0, len(items), batch_size):
            examples = [
                tokenize_qa(tok, q, a, fmt, 2048) for q, a in items[start : start + batch_size]
            ]
            width = max(len(e["input_ids"]) for e in examples)
            ids = torch.full((len(examples), width), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(examples), width), -100, dtype=torch.long)
            mask = torch.zeros((len(examples), width), dtype=torch.long)
            for i, e in enumerate(examples):
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
        return torch.cat(losses).numpy()

    def generate():
        tok.padding_side = "left"
        texts = []
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            prompts = [encode_prompt(tok, q, fmt) for q, _ in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
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

    plain_loss, stats_loss = score(plain, False), score(stats, True)
    generations = generate()
    rouge = rouge_scores(generations, [a for _, a in questions])
    return {
        "plain_loss": plain_loss,
        "stats_loss": stats_loss,
        "generations": generations,
        "rougeL_recall": float(np.mean([s["rougeL_recall"] for s in rouge])),
    }


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, help="items per split (default: all of forget10)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side (medians)")
    p.add_argument("--template", default="chat", choices=("chat", "qa"))
    add_model_args(p)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temporary model directory")
    args = p.parse_args(argv)

    import jax
    import torch

    from jaxunlearn import checkpoints
    from jaxunlearn.eval import tofu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(args.vocab)
    save_model(tmp, tokenizer, args)
    setup_s = time.perf_counter() - t0
    model = checkpoints.load_pretrained(tmp)
    tokenizer = checkpoints.load_tokenizer(tmp)

    def run_jax():
        result = tofu.evaluate_tofu(
            model,
            tokenizer,
            fmt=args.template,
            limit=args.limit,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        return result

    times = {"jax_first": [], "jax": [], "torch": []}
    t = time.perf_counter()
    result = run_jax()
    times["jax_first"].append(time.perf_counter() - t)
    for _ in range(args.repeats):
        t = time.perf_counter()
        result = run_jax()
        times["jax"].append(time.perf_counter() - t)
    torch_out = None
    if not args.skip_torch:
        import transformers

        data = _rows(args.limit)
        # Loading is outside the timed region on both sides.
        torch_tok = transformers.AutoTokenizer.from_pretrained(tmp)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()
        # Untimed warm-up on one item per split (allocator, kernels, generate's first call),
        # as the JAX side's first run is reported apart from the compiled runs.
        torch_eval(
            torch_model,
            torch_tok,
            _rows(1),
            fmt=args.template,
            batch_size=args.batch_size,
            max_new_tokens=2,
            device=device,
        )
        for _ in range(args.repeats):
            t = time.perf_counter()
            torch_out = torch_eval(
                torch_model,
                torch_tok,
                data,
                fmt=args.template,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                device=device,
            )
            times["torch"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    n_items = result.metadata["n_items"]
    print(
        f"TOFU forget10 eval, limit={args.limit}, items={n_items}, batch={args.batch_size}, "
        f"max_new_tokens={args.max_new_tokens}, template={args.template}"
    )
    print(
        f"jax backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); torch: {device}; "
        f"setup (tokenizer + checkpoint) {setup_s:.1f}s"
    )
    print(f"{'side':<22}{'median s':>10}   runs")
    for name, label in (
        ("jax_first", "jax (incl. compile)"),
        ("jax", "jax (compiled)"),
        ("torch", "transformers+torch"),
    ):
        if name in med:
            print(f"{label:<22}{med[name]:>10.2f}   {[round(x, 2) for x in times[name]]}")
    out = {
        "limit": args.limit,
        "batch_size": args.batch_size,
        "n_items": n_items,
        "max_new_tokens": args.max_new_tokens,
        "jax_backend": jax.default_backend(),
        "torch_device": device,
        **{f"{k}_s": v for k, v in med.items()},
    }
    if torch_out is not None:
        out["torch_over_jax"] = med["torch"] / med["jax"]
        out["torch_over_jax_first"] = med["torch"] / med["jax_first"]
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
            f"torch / jax (compiled): {out['torch_over_jax']:.2f}x; torch / jax (incl. compile): "
            f"{out['torch_over_jax_first']:.2f}x; forget Lbar max |diff| "
            f"{out['forget_loss_max_abs_diff']:.2e}; identical generations {same:.0%}"
        )
    print(json.dumps(out))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
