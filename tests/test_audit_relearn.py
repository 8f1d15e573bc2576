"""Relearning attack: item split, one AdamW step against torch, exact resume across milestones."""

import functools

import numpy as np
import optax
import pytest
import torch
from _audit_tiny import FORGET, build_tokenizer, hf_model, llama_config, torch_answer_loss

from jaxunlearn import objectives
from jaxunlearn.audit import measures, relearn
from jaxunlearn.data import ForgetRetainSampler, tokenize_records
from jaxunlearn.eval.inference import tokenize_items
from jaxunlearn.train import unlearn


def test_split_disjoint_and_sized():
    split = relearn.relearn_split(40, 0.1, seed=3)
    assert len(split.relearn) == 4 and len(split.measured) == 36
    assert not set(split.relearn) & set(split.measured)
    assert sorted([*split.relearn, *split.measured]) == list(range(40))
    assert len(relearn.relearn_split(3, 0.01).relearn) == 1
    assert len(relearn.relearn_split(3, 0.99).measured) == 1
    with pytest.raises(ValueError, match="fraction"):
        relearn.relearn_split(10, 1.0)
    with pytest.raises(ValueError, match=">= 2 forget items"):
        relearn.relearn_split(1, 0.5)


@pytest.fixture(scope="module")
def tiny():
    from conftest import _nnx_twin

    tok = build_tokenizer()
    hf = hf_model(llama_config(tok), seed=0)
    return tok, hf, _nnx_twin(hf)


def test_one_step_matches_torch_adamw(tiny):
    tok, hf, model = tiny
    items = [{"question": r["question"], "answer": r["answer"]} for r in FORGET]
    split = relearn.relearn_split(len(items), 0.25, seed=0)
    measure = functools.partial(measures.forget_measures, tokenizer=tok)
    curve = relearn.relearn_curve(
        model, tok, items, lambda m, its: measure(m, items=its), split=split, steps=(0, 1),
        learning_rate=1e-3, batch_size=4, max_length=64,
    )  # fmt: skip
    assert curve.steps == (0, 1) and len(curve.losses) == 1
    # torch: token-weighted mean NLL over the 3 relearn items, one AdamW step.
    train = tokenize_items(tok, [items[i] for i in split.relearn], "raw", max_length=64)
    hf_new = hf_model(hf.config, noise=0.0, base=hf)
    opt = torch.optim.AdamW(hf_new.parameters(), lr=1e-3, weight_decay=0.0, eps=1e-8)
    total, count = 0.0, 0
    for ex in train:
        ids = torch.tensor(ex["input_ids"][None].astype(np.int64))
        labels = torch.tensor(ex["labels"][1:].astype(np.int64))
        logp = torch.log_softmax(hf_new(ids).logits[0, :-1], -1)
        keep = labels != -100
        total = total - logp[keep].gather(1, labels[keep][:, None]).sum()
        count += int(keep.sum())
    loss = total / count
    assert curve.losses[0] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    opt.step()
    measured = tokenize_items(tok, [items[i] for i in split.measured], "raw", max_length=512)
    for step, model_t in ((0, hf), (1, hf_new)):
        want = np.exp(-np.array([torch_answer_loss(model_t, e) for e in measured]))
        np.testing.assert_allclose(curve.measures[step].per_item["prob"], want, rtol=2e-3)
    assert curve.measures[1].aggregate["prob"] > curve.measures[0].aggregate["prob"]


@pytest.mark.slow
def test_milestones_follow_one_unlearn_run(tiny):
    tok, _, model = tiny
    items = [{"question": r["question"], "answer": r["answer"]} for r in FORGET]
    split = relearn.relearn_split(len(items), 0.5, seed=1)

    def measure(m, its):
        return measures.forget_measures(m, tok, its)

    curve = relearn.relearn_curve(
        model, tok, items, measure, split=split, steps=(3, 0, 1), learning_rate=1e-3,
        batch_size=2,
    )  # fmt: skip
    assert curve.steps == (0, 1, 3) and len(curve.losses) == 3
    examples = tokenize_records(tok, [items[i] for i in split.relearn], "raw", 512)
    sampler = ForgetRetainSampler(examples, None, batch_size=2, seed=0)
    direct = unlearn(
        model, objectives.forget_retain(objectives.nll()), optax.adamw(1e-3, weight_decay=0.0),
        sampler, steps=3, progress=False,
    )  # fmt: skip
    want = measure(direct.model, [items[i] for i in split.measured]).per_item["prob"]
    np.testing.assert_allclose(curve.measures[2].per_item["prob"], want, rtol=1e-5)
    np.testing.assert_allclose(curve.losses, [m["loss"] for m in direct.metrics], rtol=1e-5)


def test_public_text_relearn_measures_every_item(tiny):
    tok, _, model = tiny
    items = [{"question": r["question"], "answer": r["answer"]} for r in FORGET[:4]]
    curve = relearn.relearn_curve(
        model, tok, items, lambda m, its: measures.forget_measures(m, tok, its), steps=(0,),
        relearn_items=[{"text": FORGET[5]["answer"]}],
    )  # fmt: skip
    assert len(curve.split.relearn) == 0 and list(curve.split.measured) == [0, 1, 2, 3]
    assert curve.measures[0].per_item["prob"].shape == (4,)
