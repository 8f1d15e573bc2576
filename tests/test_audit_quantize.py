"""Quantization attack and forget measures against plain numpy / torch / scipy computations."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _audit_tiny import FORGET, HOLDOUT, build_tokenizer, hf_model, llama_config, torch_answer_loss
from flax import nnx
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from jaxunlearn.audit import measures, quantize
from jaxunlearn.eval.inference import tokenize_items


def numpy_rtn(w, bits, group):
    """Group-wise symmetric RTN over rows of [IN, OUT], written plainly."""
    out = np.zeros_like(w, dtype=np.float64)
    qmax = 2 ** (bits - 1) - 1
    for col in range(w.shape[1]):
        for start in range(0, w.shape[0], group):
            g = w[start : start + group, col].astype(np.float64)
            s = np.abs(g).max() / qmax
            if s == 0:
                continue
            out[start : start + group, col] = s * np.clip(np.round(g / s), -qmax - 1, qmax)
    return out


@pytest.mark.parametrize("bits,group", [(8, 16), (4, 16), (4, 7), (3, 64)])
def test_rtn_matches_numpy(bits, group):
    w = np.random.default_rng(bits).normal(size=(48, 5)).astype(np.float32)
    w[:16, 0] = 0.0  # an all-zero group stays zero
    got = np.asarray(quantize.rtn_fake_quantize(jnp.asarray(w), bits=bits, group_size=group))
    np.testing.assert_allclose(got, numpy_rtn(w, bits, group), rtol=1e-6, atol=1e-7)
    codes, _ = quantize.quantize_codes(jnp.asarray(w), bits, group)
    assert int(codes.max()) <= 2 ** (bits - 1) - 1 and int(codes.min()) >= -(2 ** (bits - 1))


def test_rtn_stacked_layers_quantize_independently():
    w = np.random.default_rng(0).normal(size=(3, 32, 4)).astype(np.float32)
    got = np.asarray(quantize.rtn_fake_quantize(jnp.asarray(w), bits=4, group_size=8))
    for layer in range(3):
        np.testing.assert_allclose(got[layer], numpy_rtn(w[layer], 4, 8), rtol=1e-6, atol=1e-7)


def test_bad_bits_and_group():
    with pytest.raises(ValueError, match="bits"):
        quantize.quantize_codes(jnp.ones((4, 4)), 1, 4)
    with pytest.raises(ValueError, match="group_size"):
        quantize.quantize_codes(jnp.ones((4, 4)), 4, 0)


@pytest.fixture(scope="module")
def tiny():
    from conftest import _nnx_twin

    tok = build_tokenizer()
    cfg = llama_config(tok)
    target = hf_model(cfg, seed=0, noise=0.05)
    unlearned = hf_model(cfg, seed=1, noise=0.02, base=target)
    return tok, target, unlearned, _nnx_twin(target), _nnx_twin(unlearned)


def test_quantize_model_kernels_only(tiny):
    tok, hf_target, _, target, _ = tiny
    q = quantize.quantize_model(target, 4, group_size=16)
    before = dict(nnx.to_flat_state(nnx.state(target, nnx.Param)))
    after = dict(nnx.to_flat_state(nnx.state(q, nnx.Param)))
    quantized = 0
    for path, var in before.items():
        name = ".".join(map(str, path))
        old, new = np.asarray(var[...]), np.asarray(after[path][...])
        if name.endswith("kernel") and "lm_head" not in name:
            np.testing.assert_allclose(new, numpy_rtn(old, 4, 16), rtol=1e-6, atol=1e-7)
            quantized += 1
        else:
            np.testing.assert_array_equal(new, old)
    assert quantized == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    # The original model is untouched, the copy's logits match torch with RTN weights.
    hf_q = hf_model(hf_target.config, seed=0, noise=0.0, base=hf_target)
    with torch.no_grad():
        for name, p in hf_q.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(torch.tensor(numpy_rtn(p.numpy().T, 4, 16).T))
    ids = np.array([[1, 5, 9, 17, 33, 2]])
    want = hf_q(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(ids)).logits), want, atol=2e-5)


def test_changed_code_fraction(tiny):
    _, _, _, target, unlearned = tiny
    assert quantize.changed_code_fraction(target, target, 4) == 0.0
    want_changed = want_total = 0
    kernels_t = quantize._kernels(target, quantize.is_linear_kernel)
    kernels_u = quantize._kernels(unlearned, quantize.is_linear_kernel)
    for name, var in kernels_t.items():
        a, b = np.asarray(var[...], np.float64), np.asarray(kernels_u[name][...], np.float64)
        g = min(128, a.shape[0])
        for x, y in ((a, b),):
            sa = np.abs(x).max(0, keepdims=True) / 7
            sb = np.abs(y).max(0, keepdims=True) / 7
            ca = np.clip(np.round(x / sa), -8, 7)
            cb = np.clip(np.round(y / sb), -8, 7)
            assert g == a.shape[0]
            want_changed += int((ca != cb).sum())
            want_total += a.size
    got = quantize.changed_code_fraction(target, unlearned, 4)
    assert got == pytest.approx(want_changed / want_total)
    assert 0 < got < 1


def test_forget_measures_match_torch(tiny):
    tok, hf_target, _, target, _ = tiny
    items, holdout = FORGET[:5], HOLDOUT[:4]
    got = measures.forget_measures(target, tok, items, holdout=holdout)
    opts = dict(max_length=512)
    losses = [torch_answer_loss(hf_target, e) for e in tokenize_items(tok, items, "raw", **opts)]
    np.testing.assert_allclose(got.per_item["prob"], np.exp(-np.array(losses)), rtol=1e-4)
    # Truth ratio: paraphrased answer vs perturbed answers, each loss from torch.
    tr = []
    for r in items:
        c = torch_answer_loss(
            hf_target,
            tokenize_items(
                tok, [{"question": r["question"], "answer": r["paraphrased_answer"]}], **opts
            )[0],
        )
        p = [
            torch_answer_loss(
                hf_target,
                tokenize_items(tok, [{"question": r["question"], "answer": a}], **opts)[0],
            )
            for a in r["perturbed_answer"]
        ]
        tr.append(np.exp(-np.mean(p)) / (np.exp(-c) + 1e-10))
    np.testing.assert_allclose(got.per_item["truth_ratio"], tr, rtol=1e-4)
    assert got.aggregate["truth_ratio"] == pytest.approx(
        np.mean(np.minimum(tr, 1 / np.array(tr))), rel=1e-4
    )
    h = [torch_answer_loss(hf_target, e) for e in tokenize_items(tok, holdout, "raw", **opts)]
    want_auc = roc_auc_score([0] * 5 + [1] * 4, losses + h)
    assert got.aggregate["mia_loss_auc"] == pytest.approx(want_auc)
    oracle_tr = np.linspace(0.5, 1.5, 5)
    fq = measures.forget_measures(target, tok, items, oracle_truth_ratio=oracle_tr)
    assert fq.aggregate["forget_quality"] == pytest.approx(ks_2samp(tr, oracle_tr).pvalue, rel=1e-3)
    with pytest.raises(ValueError, match="oracle_truth_ratio"):
        measures.forget_measures(target, tok, items, oracle_truth_ratio=oracle_tr[:3])


def test_recovery_formula():
    got = measures.recovery(
        {"a": 0.7, "b": 1.0, "c": 3.0}, {"a": 0.2, "b": 1.0}, {"a": 0.8, "b": 1.0}
    )
    assert got["a"] == pytest.approx((0.7 - 0.2) / (0.8 - 0.2))
    assert np.isnan(got["b"]) and "c" not in got


def test_forget_measures_rouge_matches_torch_greedy(tiny):
    from rouge_score import rouge_scorer

    from jaxunlearn.data import encode_prompt

    tok, hf_target, _, target, _ = tiny
    items = FORGET[:3]
    opts = measures.ScoringOptions("raw", max_new_tokens=6)
    got = measures.forget_measures(target, tok, items, opts, rouge=True)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for i, r in enumerate(items):
        ids = torch.tensor(np.asarray([encode_prompt(tok, r["question"], "raw")], np.int64))
        out = hf_target.generate(
            ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :]  # fmt: skip
        text = tok.decode(out.tolist(), skip_special_tokens=True).strip()
        want = scorer.score(target=r["answer"], prediction=text)["rougeL"].recall
        assert got.per_item["rouge"][i] == pytest.approx(want)
    assert got.aggregate["rouge"] == pytest.approx(got.per_item["rouge"].mean())
