"""MUSE runner (jaxunlearn.eval.muse) on the first items of the real MUSE-News splits.

A tiny random Llama and a BPE tokenizer trained on MUSE text; KnowMem / VerbMem generations
are compared with `transformers` greedy `generate` on prompts built here from muse_bench's
recipe, and the PrivLeak / MIA / memorisation numbers with a plain torch computation
(evaluation.md s.2, s.4).
"""

import json
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score
from test_eval_tofu import tiny_checkpoint, tiny_tokenizer

from jaxunlearn import checkpoints
from jaxunlearn.eval import muse

jax.config.update("jax_default_matmul_precision", "highest")

MUSE_DIR = Path("/work/shared/data/muse-news")
LIMIT = 3
NEW_TOKENS = 8
MAX_LENGTH = 384  # PrivLeak texts cut here to keep the CPU test short
BUCKETS = (512, 2048)

pytestmark = pytest.mark.skipif(not MUSE_DIR.is_dir(), reason="MUSE-News data not present")


def read(config, split, n=LIMIT):
    with open(MUSE_DIR / config / f"{split}.json", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    lines = [r["prompt"] for r in read("verbmem", "forget", 30)]
    lines += [r["text"] for r in read("privleak", "holdout", 20)]
    lines += [r["question"] + " " + r["answer"] for r in read("knowmem", "forget_qa", 100)]
    tokenizer = tiny_tokenizer(vocab_size=2048, lines=lines, chat_template=None)
    path = tmp_path_factory.mktemp("tiny_muse")
    torch_model = tiny_checkpoint(path, tokenizer)
    model = checkpoints.load_pretrained(path)
    tokenizer = checkpoints.load_tokenizer(path)
    result = muse.evaluate_muse(
        model,
        tokenizer,
        MUSE_DIR,
        limit=LIMIT,
        knowmem_max_new_tokens=NEW_TOKENS,
        verbmem_max_new_tokens=NEW_TOKENS,
        privleak_max_length=MAX_LENGTH,
        batch_size=4,
        buckets=BUCKETS,
        metrics=[m for m in muse.MUSE_METRICS if m != "mia_reference"],
    )
    return {"torch": torch_model, "tokenizer": tokenizer, "result": result, "model": model}


def hf_greedy(tm, tok, prompt):
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        out = tm.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def close(ours, ref):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(ref), rtol=1e-4, atol=1e-6)


def per_item(entry, field="score"):
    values = entry["value_by_index"]
    return [values[str(i)][field] for i in range(len(values))]


def test_knowmem_matches_muse_bench_recipe(world):
    tm, tok, logs = world["torch"], world["tokenizer"], world["result"].logs
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for side in ("forget", "retain"):
        icl = read("knowmem", f"{side}_qa_icl", 10)
        shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
        expected = []
        for r in read("knowmem", f"{side}_qa"):
            text = hf_greedy(tm, tok, shots + f"Question: {r['question']}\nAnswer: ")
            for stop in ("\n\n", "\nQuestion", "Question:"):
                text = text.split(stop)[0]
            expected.append(text.strip())
        entry = logs[f"{side}_knowmem_ROUGE"]
        assert per_item(entry, "generation") == expected
        answers = [r["answer"] for r in read("knowmem", f"{side}_qa")]
        f1 = [scorer.score(a, g)["rougeL"].fmeasure for a, g in zip(answers, expected)]
        close(per_item(entry, "rougeL_f1"), f1)
        close(entry["agg_value"], np.mean(f1))


def test_verbmem_generation_and_ground_truth(world):
    tm, tok, logs = world["torch"], world["tokenizer"], world["result"].logs
    data = read("verbmem", "forget")
    entry = logs["forget_verbmem_ROUGE"]
    expected = [hf_greedy(tm, tok, r["prompt"]).strip() for r in data]
    assert per_item(entry, "generation") == expected
    gts = [
        tok.decode(tok(r["gt"])["input_ids"][:NEW_TOKENS], skip_special_tokens=True) for r in data
    ]
    assert per_item(entry, "ground_truth") == gts


def torch_token_scores(tm, ids, start):
    """log p, mu, sigma, argmax hit for every position predicting ids[start:]."""
    with torch.no_grad():
        logp = torch.log_softmax(tm(torch.tensor([ids])).logits[0].double(), -1)[start - 1 : -1]
    target = torch.tensor(ids[start:])
    lp = logp[torch.arange(len(target)), target]
    mu = (logp.exp() * logp).sum(-1)
    sigma = torch.sqrt(torch.clamp((logp.exp() * logp**2).sum(-1) - mu**2, min=1e-6))
    return lp.numpy(), mu.numpy(), sigma.numpy(), (logp.argmax(-1) == target).numpy()


def test_privleak_and_mia_match_torch(world):
    tm, tok, logs = world["torch"], world["tokenizer"], world["result"].logs
    scores = {"mia_min_k": [], "mia_loss": [], "mia_zlib": [], "mia_min_k_plus_plus": []}
    for split in ("forget", "holdout"):
        for r in read("privleak", split):
            ids = tok(r["text"])["input_ids"][:MAX_LENGTH]
            lp, mu, sigma, _ = torch_token_scores(tm, ids, 1)  # every token after BOS
            count = int(len(lp) * 0.4)  # muse_bench: no max(1, .)
            scores["mia_min_k"].append(-np.sort(lp)[:count].mean())
            scores["mia_loss"].append(-lp.mean())
            scores["mia_zlib"].append(-lp.mean() / len(zlib.compress(r["text"].encode("utf-8"))))
            z = np.sort((lp - mu) / sigma)
            scores["mia_min_k_plus_plus"].append(-z[: max(1, count)].mean())
    labels = [0] * LIMIT + [1] * LIMIT
    for name, values in scores.items():
        entry = logs[name]
        close(per_item(entry["forget"]) + per_item(entry["holdout"]), values)
        assert entry["auc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    auc_muse = 1 - roc_auc_score(labels, scores["mia_min_k"])  # muse_bench orientation
    close(logs["privleak"]["agg_value"], (auc_muse - 0.4772) / 0.4772 * 100)
    assert world["result"].metadata["privleak_reference_auc"] == pytest.approx(1 - 0.4772)


def test_verbmem_extraction_strength_and_memorisation(world):
    tm, tok, logs = world["torch"], world["tokenizer"], world["result"].logs
    es, em = [], []
    for r in read("verbmem", "forget"):
        ids = tok(r["prompt"] + " " + r["gt"])["input_ids"][: max(BUCKETS)]
        start = len(tok(r["prompt"])["input_ids"])
        hit = torch_token_scores(tm, ids, start)[3][:-1]  # open-unlearning drops the last label
        k = next((k for k in range(len(hit)) if hit[k:].all()), len(hit) - 1)
        es.append(1 - k / len(hit))
        em.append(hit.mean())
    close(per_item(logs["extraction_strength"]), es)
    close(per_item(logs["exact_memorization"]), em)


def test_reference_auc_sources_and_bad_input(world, tmp_path):
    tok, model = world["tokenizer"], world["model"]
    kwargs = dict(
        limit=2, batch_size=4, buckets=BUCKETS, privleak_max_length=64, metrics=["privleak"]
    )
    books = muse.evaluate_muse(model, tok, MUSE_DIR, corpus="books", **kwargs)
    assert books.metadata["privleak_reference_auc"] == pytest.approx(1 - 0.5393)
    theirs = muse.evaluate_muse(
        model, tok, MUSE_DIR, retain_logs={"mia_min_k": {"agg_value": 0.3}}, **kwargs
    )
    s = 1 - theirs.logs["mia_min_k"]["agg_value"]
    close(theirs.summary["privleak"], (s - 0.7) / (0.7 + 1e-10) * 100)
    (tmp_path / "knowmem").mkdir()
    (tmp_path / "knowmem" / "forget_qa.json").write_text("")
    with pytest.raises(ValueError, match="empty"):
        muse.evaluate_muse(model, tok, tmp_path, metrics=["forget_knowmem_ROUGE"])
    with pytest.raises(ValueError, match="unknown MUSE metric"):
        muse.evaluate_muse(model, tok, MUSE_DIR, metrics=["verbmem"])
