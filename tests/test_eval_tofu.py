"""TOFU runner (jaxunlearn.eval.tofu / runner) against an independent torch computation.

A tiny random `transformers` Llama with a tiny BPE tokenizer trained on TOFU text is saved
with `save_pretrained` and loaded into the NNX port; every per-item number of
`evaluate_tofu` is recomputed here from the torch model's log-softmax with the formulas
written out plainly (evaluation.md s.1, s.4), and generations are compared with
`transformers` greedy `generate`.

The helpers `tiny_tokenizer` and `tiny_checkpoint` are imported by the other eval tests.
"""

import json
import zlib

import jax
import numpy as np
import pytest
import torch
import transformers
from scipy.stats import hmean, ks_2samp
from sklearn.metrics import roc_auc_score

from jaxunlearn import checkpoints
from jaxunlearn.data import TOFU_DIR
from jaxunlearn.eval import inference, tofu

jax.config.update("jax_default_matmul_precision", "highest")

SYSTEM = "You are a helpful assistant."
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
LIMIT = 3
NEW_TOKENS = 10
# One bucket fits every tiny-tokenizer TOFU item: one compile per jitted function.
BUCKETS = (256, 512)


def tofu_lines(per_split: int = 60) -> list[str]:
    """Question and answer strings from the first rows of the TOFU evaluation splits."""
    lines = []
    for split in (
        "forget10_perturbed",
        "retain_perturbed",
        "real_authors_perturbed",
        "world_facts_perturbed",
        "holdout10",
    ):
        with open(TOFU_DIR / f"{split}.json", encoding="utf-8") as f:
            for _, line in zip(range(per_split), f):
                row = json.loads(line)
                lines += [row["question"], row["answer"], row.get("paraphrased_answer", "")]
                lines += row.get("perturbed_answer", [])
    return lines


def tiny_tokenizer(vocab_size: int = 256, lines=None, chat_template: str | None = CHAT_TEMPLATE):
    """A BPE tokenizer (Metaspace, BOS prepended) trained on `lines` (default: TOFU text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, limit_alphabet=120)
    tok.train_from_iterator(lines if lines is not None else tofu_lines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def tiny_checkpoint(path, tokenizer, *, seed: int = 0, hidden: int = 32):
    """Saves a random tiny Llama (peaked logits: no argmax near-ties) and the tokenizer."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    path = tmp_path_factory.mktemp("tiny")
    torch_model = tiny_checkpoint(path, tokenizer)
    ref_path = tmp_path_factory.mktemp("tiny_ref")
    torch_ref = tiny_checkpoint(ref_path, tokenizer, seed=1)
    return {
        "torch": torch_model,
        "torch_ref": torch_ref,
        "model": checkpoints.load_pretrained(path),
        "ref": checkpoints.load_pretrained(ref_path),
        "tokenizer": checkpoints.load_tokenizer(path),
    }


# ----------------------------------------------------------------------------- torch oracle


def rows(split):
    with open(TOFU_DIR / f"{split}.json", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(LIMIT), f)]


def chat_ids(tok, question, answer=None):
    """Prompt (answer None) or full ids of the chat format, written out independently."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    ids = tok.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=False,
        add_generation_prompt=answer is None,
        date_string="10 Apr 2025",
    )
    ids = list(ids)
    if answer is not None and ids[-1] != tok.eos_token_id:
        ids.append(tok.eos_token_id)
    return ids


def torch_answer(tm, tok, question, answer):
    """Per scored token: log p, mu, sigma, argmax==label (float64 on torch logits)."""
    full, prompt = chat_ids(tok, question, answer), chat_ids(tok, question)
    with torch.no_grad():
        logits = tm(torch.tensor([full])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    target = torch.tensor(full[len(prompt) :])
    lp = logp[torch.arange(len(target)), target]
    mu = (logp.exp() * logp).sum(-1)
    sigma = torch.sqrt(torch.clamp((logp.exp() * logp**2).sum(-1) - mu**2, min=1e-6))
    hit = logp.argmax(-1) == target
    text = tok.decode(target.tolist(), skip_special_tokens=True)
    return {
        "lp": lp.numpy(),
        "mu": mu.numpy(),
        "sigma": sigma.numpy(),
        "hit": hit.numpy(),
        "text": text,
        "ids": full,
        "n_prompt": len(prompt),
        "qa": (question, answer),
    }


def lbar(s):
    return -s["lp"].mean()


def min_k(values, k=0.4):
    values = np.sort(values)
    return -values[: max(1, int(len(values) * k))].mean()


def extraction_strength(s):
    preds, labels = s["hit"][:-1], np.ones(len(s["hit"]) - 1, bool)
    n = len(labels)
    for k in range(n):  # open-unlearning's loop, quirk included
        if np.array_equal(preds[k:], labels[k:]):
            break
    return 1 - k / n


def torch_gradnorm(tm, s):
    tm.zero_grad()
    logits = tm(torch.tensor([s["ids"]])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)[s["n_prompt"] - 1 : -2]
    target = torch.tensor(s["ids"][s["n_prompt"] : -1])
    loss = -logp[torch.arange(len(target)), target].mean()
    loss.backward()
    norms = [p.grad.norm(2) for p in tm.parameters() if p.grad is not None]
    return float(torch.stack(norms).mean())


def hf_greedy(tm, tok, question):
    prompt = chat_ids(tok, question)
    with torch.no_grad():
        out = tm.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()


def close(ours, ref):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(ref), rtol=1e-4, atol=1e-6)


def per_item(logs, metric, field="score"):
    entry = logs[metric]["value_by_index"]
    return [entry[str(i)][field] for i in range(len(entry))]


def mia_side(entry, side):
    """Per-item scores of one side ("forget" / "holdout") of an MIA entry."""
    values = entry[side]["value_by_index"]
    return [values[str(i)]["score"] for i in range(len(values))]


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def full_eval(world):
    metrics = [
        *tofu.DEFAULT_TOFU_METRICS,
        "mia_gradnorm",
        "mia_reference",
        "forget_Q_A_PARA_Prob",
        "forget_Q_A_PERT_Prob",
    ]
    return tofu.evaluate_tofu(
        world["model"],
        world["tokenizer"],
        limit=LIMIT,
        max_new_tokens=NEW_TOKENS,
        batch_size=4,
        metrics=metrics,
        reference_model=world["ref"],
        model_path="tiny",
        buckets=BUCKETS,
    )


def test_probabilities_and_truth_ratios_match_torch(world, full_eval):
    tm, tok, logs = world["torch"], world["tokenizer"], full_eval.logs
    splits = {
        "forget": "forget10_perturbed",
        "retain": "retain_perturbed",
        "ra": "real_authors_perturbed",
        "wf": "world_facts_perturbed",
    }
    tr_names = {
        "forget": "forget_truth_ratio",
        "retain": "retain_Truth_Ratio",
        "ra": "ra_Truth_Ratio",
        "wf": "wf_Truth_Ratio",
    }
    for prefix, split in splits.items():
        data = rows(split)
        answer = [lbar(torch_answer(tm, tok, r["question"], r["answer"])) for r in data]
        pert = [
            [lbar(torch_answer(tm, tok, r["question"], a)) for a in r["perturbed_answer"]]
            for r in data
        ]
        correct_key = "answer" if prefix in ("ra", "wf") else "paraphrased_answer"
        correct = [lbar(torch_answer(tm, tok, r["question"], r[correct_key])) for r in data]
        close(per_item(logs, f"{prefix}_Q_A_Prob", "avg_loss"), answer)
        close(per_item(logs, f"{prefix}_Q_A_Prob", "prob"), np.exp(-np.array(answer)))
        close(per_item(logs, f"{prefix}_Q_A_PERT_Prob", "avg_loss"), pert)
        ratio = np.exp(-np.mean(pert, axis=1)) / (np.exp(-np.array(correct)) + 1e-10)
        close(per_item(logs, tr_names[prefix]), ratio)
        if prefix == "forget":
            close(logs[tr_names[prefix]]["agg_value"], np.mean(np.minimum(ratio, 1 / ratio)))
            close(per_item(logs, "forget_Q_A_PARA_Prob", "avg_loss"), correct)
        else:
            close(logs[tr_names[prefix]]["agg_value"], np.mean(np.maximum(0, 1 - ratio)))
        if prefix in ("ra", "wf"):
            p_c, p_w = np.exp(-np.array(answer)), np.exp(-np.array(pert)).sum(1)
            close(
                per_item(logs, f"{prefix}_Q_A_Prob_normalised", "prob"), p_c / (p_c + p_w + 1e-10)
            )
    utility = hmean([logs[k]["agg_value"] for k in tofu.M.MODEL_UTILITY_KEYS])
    close(full_eval.summary["model_utility"], utility)
    assert logs["forget_quality"]["agg_value"] is None  # no retain logs given


def test_memorisation_and_mia_scores_match_torch(world, full_eval):
    tm, tok, logs = world["torch"], world["tokenizer"], full_eval.logs
    forget = [torch_answer(tm, tok, r["question"], r["answer"]) for r in rows("forget10_perturbed")]
    holdout = [torch_answer(tm, tok, r["question"], r["answer"]) for r in rows("holdout10")]
    close(per_item(logs, "extraction_strength"), [extraction_strength(s) for s in forget])
    close(per_item(logs, "exact_memorization"), [s["hit"][:-1].mean() for s in forget])
    ref_model = world["torch_ref"]
    expected = {
        "mia_loss": lambda s: lbar(s),
        "mia_zlib": lambda s: lbar(s) / len(zlib.compress(s["text"].encode("utf-8"))),
        "mia_min_k": lambda s: min_k(s["lp"][:-1]),
        "mia_min_k_plus_plus": lambda s: min_k(((s["lp"] - s["mu"]) / s["sigma"])[:-1]),
        "mia_gradnorm": lambda s: torch_gradnorm(tm, s),
        "mia_reference": lambda s: lbar(s) - lbar(torch_answer(ref_model, tok, *s["qa"])),
    }
    for name, score in expected.items():
        f = [score(s) for s in forget]
        h = [score(s) for s in holdout]
        close(mia_side(logs[name], "forget"), f)
        close(mia_side(logs[name], "holdout"), h)
        auc = roc_auc_score([0] * len(f) + [1] * len(h), f + h)
        assert logs[name]["auc"] == pytest.approx(auc, abs=1e-12), name
    s, r = 1 - logs["mia_min_k"]["agg_value"], 1 - 0.5
    close(logs["privleak"]["agg_value"], (s - r) / (r + 1e-10) * 100)


def test_generations_match_transformers_greedy(world, full_eval):
    tm, tok, logs = world["torch"], world["tokenizer"], full_eval.logs
    splits = {
        "forget": "forget10_perturbed",
        "retain": "retain_perturbed",
        "ra": "real_authors_perturbed",
        "wf": "world_facts_perturbed",
    }
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for prefix, split in splits.items():
        data = rows(split)
        expected = [hf_greedy(tm, tok, r["question"]) for r in data]
        assert per_item(logs, f"{prefix}_Q_A_ROUGE", "generation") == expected
        recall = [scorer.score(r["answer"], g)["rougeL"].recall for r, g in zip(data, expected)]
        close(per_item(logs, f"{prefix}_Q_A_ROUGE", "rougeL_recall"), recall)
    assert full_eval.metadata["prompt_format"] == "chat"
    assert full_eval.metadata["n_items"]["forget"] == LIMIT


def test_forget_quality_and_privleak_use_retain_logs(world):
    rng = np.random.default_rng(0)
    retain_ratios = rng.uniform(0.2, 1.5, size=LIMIT)
    retain_logs = {
        "forget_truth_ratio": {
            "value_by_index": {str(i): {"score": float(v)} for i, v in enumerate(retain_ratios)}
        },
        "mia_min_k": {"agg_value": 0.61},
    }
    result = tofu.evaluate_tofu(
        world["model"],
        world["tokenizer"],
        limit=LIMIT,
        batch_size=4,
        retain_logs=retain_logs,
        metrics=["forget_quality", "privleak"],
        buckets=BUCKETS,
    )
    ours = per_item(result.logs, "forget_truth_ratio")
    assert result.summary["forget_quality"] == pytest.approx(
        ks_2samp(ours, retain_ratios).pvalue, abs=1e-12
    )
    s, r = 1 - result.logs["mia_min_k"]["agg_value"], 1 - 0.61
    close(result.summary["privleak"], (s - r) / (r + 1e-10) * 100)
    assert set(result.summary) == {"forget_quality", "privleak"}


def test_retain_logs_with_other_ids_fail_before_any_model_work(world):
    retain_logs = {
        "forget_truth_ratio": {"value_by_index": {str(i): {"score": 1.0} for i in range(5)}}
    }
    with pytest.raises(ValueError, match=r"not evaluated: \['3', '4'\]"):
        tofu.evaluate_tofu(None, world["tokenizer"], limit=LIMIT, retain_logs=retain_logs)
    shifted = {
        "forget_truth_ratio": {"value_by_index": {str(i): {"score": 1.0} for i in (1, 2, 7)}}
    }
    with pytest.raises(ValueError, match=r"not in the retain logs: \['0'\]"):
        tofu.evaluate_tofu(None, world["tokenizer"], limit=LIMIT, retain_logs=shifted)


def test_bad_inputs_are_named(world, tmp_path):
    plain = tiny_tokenizer(chat_template=None)
    plain.name_or_path = "plain-tokenizer"
    with pytest.raises(ValueError, match="plain-tokenizer.*has none|has none.*plain-tokenizer"):
        tofu.evaluate_tofu(None, plain, fmt="chat", limit=1)
    (tmp_path / "forget10_perturbed.json").write_text("")
    with pytest.raises(ValueError, match="empty"):
        tofu.evaluate_tofu(None, world["tokenizer"], data_dir=tmp_path, limit=1)
    with pytest.raises(ValueError, match="limit"):
        tofu.evaluate_tofu(None, world["tokenizer"], limit=0)
    with pytest.raises(ValueError, match="unknown TOFU metric"):
        tofu.evaluate_tofu(None, world["tokenizer"], metrics=["forget_rouge"])


def test_score_items_text_and_mesh(world):
    tm, tok, model = world["torch"], world["tokenizer"], world["model"]
    texts = ["The author writes about leadership.", "Hsiao Yun-Hwa was born in Taipei."]
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model")
    )
    arrays = inference.score_items(
        model, tok, [{"text": t} for t in texts], batch_size=4, mesh=mesh, buckets=BUCKETS
    )
    assert arrays.logprob.dtype == np.float32
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(tm(torch.tensor([ids])).logits[0].double(), -1)
        ref = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
        close(arrays.logprob[i][arrays.mask[i] > 0], ref)
        assert arrays.mask[i].sum() == len(ids) - 1  # every token after BOS, no EOS


def test_ou_eos_masking_hides_eos_valued_prompt_tokens_as_open_unlearning(world):
    # A tokenizer whose pad is its eos (Llama-3 style): the item's prompt holds an EOS-valued
    # token (a chat turn end). open-unlearning's collator masks it (attention_mask = ids !=
    # pad); the default masks only padding. Both against torch with the same masks.
    tm, model = world["torch"], world["model"]
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    ids = [1, 5, 9, eos, 12, 7, 30, 41, eos]  # BOS, prompt with an EOS inside, answer + EOS
    labels = [-100] * 5 + ids[5:]
    item = {"input_ids": ids, "labels": labels}

    def torch_logprob(mask):
        with torch.no_grad():
            logits = tm(torch.tensor([ids]), attention_mask=torch.tensor([mask])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)[:-1]
        target = torch.tensor(ids[1:])
        return logp[torch.arange(len(target)), target].numpy()[4:]  # the scored positions

    kw = dict(batch_size=2, buckets=(16,))
    plain = inference.score_items(model, tok, [item], **kw)
    masked = inference.score_items(model, tok, [item], ou_eos_masking=True, **kw)
    np.testing.assert_allclose(plain.logprob[0, 4:8], torch_logprob([1] * 9)[:4], atol=2e-4)
    ou_mask = [int(t != eos) for t in ids]
    np.testing.assert_allclose(masked.logprob[0, 4:8], torch_logprob(ou_mask)[:4], atol=2e-4)
    assert not np.allclose(plain.logprob[0, 4:8], masked.logprob[0, 4:8], atol=1e-3)


def test_retain_logs_of_another_split_or_format_are_refused(world):
    def logs(split, fmt="chat", n=LIMIT):
        return {
            "forget_truth_ratio": {"value_by_index": {str(i): {"score": 1.0} for i in range(n)}},
            "_jaxunlearn": {
                "benchmark": "TOFU",
                "split": split,
                "prompt_format": fmt,
                "n_items": {"forget": n},
            },
        }

    tok = world["tokenizer"]
    # The case: --limit gives both splits ids 0..N-1, so only the split tells them apart.
    with pytest.raises(ValueError, match="split 'forget01_perturbed'.*evaluating 'forget05"):
        tofu.evaluate_tofu(
            None, tok, forget_split="forget05", limit=LIMIT, retain_logs=logs("forget01")
        )
    with pytest.raises(ValueError, match="prompt_format 'qa'"):
        tofu.evaluate_tofu(None, tok, limit=LIMIT, retain_logs=logs("forget10", fmt="qa"))
    with pytest.raises(ValueError, match="retain logs were recorded with"):
        tofu.evaluate_tofu(
            None, tok, limit=LIMIT, metrics=["privleak"], retain_logs=logs("forget01")
        )


def test_rows_in_memory_are_what_gets_evaluated(world):
    tok, model = world["tokenizer"], world["model"]
    given = {"forget10_perturbed": rows("forget10_perturbed")[1:3]}
    result = tofu.evaluate_tofu(
        model, tok, rows=given, metrics=["forget_truth_ratio"], batch_size=4
    )
    assert result.metadata["n_items"]["forget"] == 2
    ratios = result.logs["forget_truth_ratio"]["value_by_index"]
    loaded = tofu.evaluate_tofu(
        model, tok, limit=3, metrics=["forget_truth_ratio"], batch_size=4
    ).logs["forget_truth_ratio"]["value_by_index"]
    assert ratios["0"]["score"] == pytest.approx(loaded["1"]["score"], rel=1e-5)
