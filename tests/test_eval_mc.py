"""Multiple-choice runner (jaxunlearn.eval.multiple_choice) against a plain torch computation.

Items in WMDP / MMLU form go through `evaluate_multiple_choice`; the test rebuilds lm-eval's
context (evaluation.md s.3.2) and each choice's continuation tokens itself, scores them with
the torch model's log-softmax, and checks the per-choice log-likelihoods, the predictions,
the accuracy and the size-weighted MMLU group scores. One tokenizer has single-token letters
(" A" .. " D", the one-forward-pass path), one has none (the summed-continuation fallback).
"""

import json

import jax
import numpy as np
import pytest
import torch
from test_eval_tofu import tiny_checkpoint, tiny_tokenizer

from jaxunlearn import checkpoints
from jaxunlearn.data import TOFU_DIR
from jaxunlearn.eval import multiple_choice

jax.config.update("jax_default_matmul_precision", "highest")

BUCKETS = (128, 256)
SUBJECTS = ["anatomy", "anatomy", "philosophy", "marketing", "anatomy", "philosophy"]


def mc_rows():
    rows = []
    for split in ("real_authors", "world_facts"):
        with open(TOFU_DIR / f"{split}.json", encoding="utf-8") as f:
            rows += [json.loads(line) for _, line in zip(range(3), f)]
    for row, subject in zip(rows, SUBJECTS):
        row["choices"] = [row.pop(f"option{i}") for i in range(1, 5)]
        row["answer"] = row["choices"].index(row["answer"])
        row["subject"] = subject
    return rows


def letters_are_single_tokens(tok):
    return all(len(tok(f" {x}", add_special_tokens=False)["input_ids"]) == 1 for x in "ABCD")


@pytest.fixture(scope="module", params=["single_token", "fallback"])
def world(request, tmp_path_factory):
    rows = mc_rows()
    lines = [r["question"] + " " + " ".join(r["choices"]) for r in rows] * 20
    lines += [f"Answer: {x}" for x in "ABCD"] * 50
    if request.param == "single_token":
        tokenizer = tiny_tokenizer(vocab_size=256, lines=lines, chat_template=None)
        assert letters_are_single_tokens(tokenizer)
    else:  # no merges at all: " A" is "▁" + "A"
        tokenizer = tiny_tokenizer(vocab_size=40, lines=lines, chat_template=None)
        assert not letters_are_single_tokens(tokenizer)
    path = tmp_path_factory.mktemp(f"mc_{request.param}")
    torch_model = tiny_checkpoint(path, tokenizer)
    data = path / "mmlu_like.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model, tokenizer = checkpoints.load_pretrained(path), checkpoints.load_tokenizer(path)
    return {
        "torch": torch_model,
        "tokenizer": tokenizer,
        "model": model,
        "data": data,
        "rows": rows,
        "mode": request.param,
    }


def torch_loglikelihoods(tm, tok, row):
    about = row["subject"].replace("_", " ")
    context = (
        f"The following are multiple choice questions (with answers) about {about}.\n\n"
        + row["question"].strip()
        + "\n"
        + "".join(f"{x}. {c}\n" for x, c in zip("ABCD", row["choices"]))
        + "Answer:"
    )
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    out = []
    for x in "ABCD":
        cont = tok(context + " " + x, add_special_tokens=False)["input_ids"][len(ctx) :]
        ids = ctx + cont
        with torch.no_grad():
            logp = torch.log_softmax(tm(torch.tensor([ids])).logits[0].double(), -1)
        out.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
    return np.array(out)


def test_choice_loglikelihoods_and_accuracy_match_torch(world):
    tm, tok = world["torch"], world["tokenizer"]
    result = multiple_choice.evaluate_multiple_choice(
        world["model"], tok, world["data"], name="mmlu", batch_size=4, buckets=BUCKETS
    )
    assert result.metadata["single_token_items"] == (6 if world["mode"] == "single_token" else 0)
    entry = result.logs["mmlu_acc"]["value_by_index"]
    expected = [torch_loglikelihoods(tm, tok, r) for r in world["rows"]]
    for i, ref in enumerate(expected):
        np.testing.assert_allclose(entry[str(i)]["loglikelihoods"], ref, rtol=1e-4, atol=1e-6)
        assert entry[str(i)]["prediction"] == int(np.argmax(ref))
    correct = np.array([np.argmax(ref) == r["answer"] for ref, r in zip(expected, world["rows"])])
    assert result.summary["mmlu_acc"] == pytest.approx(correct.mean())
    subjects = np.array(SUBJECTS)
    stem = subjects == "anatomy"  # the only STEM subject here
    assert result.summary["mmlu_stem_acc"] == pytest.approx(correct[stem].mean())
    assert result.summary["mmlu_anatomy_acc"] == pytest.approx(correct[stem].mean())
    other = subjects == "marketing"
    assert result.summary["mmlu_other_acc"] == pytest.approx(correct[other].mean())
    assert result.logs["mmlu_humanities_acc"]["n"] == 2


def test_wmdp_description_and_bad_input(world, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "subject"} for r in world["rows"][:2]]
    result = multiple_choice.evaluate_multiple_choice(
        world["model"],
        world["tokenizer"],
        rows,
        name="wmdp_bio",
        subject="wmdp-bio",
        batch_size=4,
        buckets=BUCKETS,
    )
    assert set(result.summary) == {"wmdp_bio_acc"}  # one subject: no group entries
    context = multiple_choice.context_text(rows[0]["question"], rows[0]["choices"], "wmdp-bio")
    assert context.startswith(
        "The following are multiple choice questions (with answers) about biology.\n\n"
    )
    assert context.endswith(f"D. {rows[0]['choices'][3]}\nAnswer:")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match="out of range"):
        multiple_choice.evaluate_multiple_choice(world["model"], world["tokenizer"], bad)
