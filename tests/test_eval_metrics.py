"""Tests for jaxunlearn.eval.metrics and jaxunlearn.eval.mia.

Every formula is checked against a plain reference written here (numpy loops in the style of
open-unlearning / muse_bench, scipy.stats, sklearn, rouge_score, zlib, torch autograd), on
random inputs and on hand-made edge cases.
"""

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score, roc_curve

from jaxunlearn.eval import metrics as M
from jaxunlearn.eval import mia

# ----------------------------------------------------------------------------- helpers


def random_scores(seed, batch=5, seq=12, min_len=0):
    """Random log-probs and contiguous answer masks of varied lengths (some rows empty)."""
    rng = np.random.default_rng(seed)
    logprob = -rng.exponential(1.5, size=(batch, seq)).astype(np.float32)
    mask = np.zeros((batch, seq), np.float32)
    for b in range(batch):
        n = int(rng.integers(min_len, seq + 1))
        start = int(rng.integers(0, seq - n + 1))
        mask[b, start : start + n] = 1
    return logprob, mask


def ref_scored_positions(mask_row, drop_last):
    """open-unlearning `tokenwise_logprobs`: label positions, minus the last (EOS) one."""
    idx = np.nonzero(mask_row > 0)[0]
    return idx[:-1] if drop_last else idx


def ref_extraction_strength(preds, labels):
    """open-unlearning `_extraction_strength`, written as its Python loop."""
    valid_len = len(labels)
    if valid_len == 0:
        return 0.0
    for k in range(valid_len):
        if list(preds[k:]) == list(labels[k:]):
            break
    return 1 - k / valid_len


def ref_min_k(lp, k, at_least_one):
    """open-unlearning MinKProbAttack (at_least_one) or muse_bench's Min-k (np.mean of [])."""
    if at_least_one and len(lp) == 0:
        return 0.0
    count = int(len(lp) * k)
    if at_least_one:
        count = max(1, count)
    if count == 0:
        return float("nan")
    return -np.mean(np.sort(lp)[:count])


# ----------------------------------------------------------------------------- per-token


@pytest.mark.parametrize("drop_last", [False, True])
def test_length_normalised_loss_and_prob_match_numpy(drop_last):
    logprob, mask = random_scores(0, min_len=1)
    got_loss = np.asarray(M.length_normalised_loss(logprob, mask, drop_last=drop_last))
    for b in range(logprob.shape[0]):
        idx = ref_scored_positions(mask[b], drop_last)
        want = -np.mean(logprob[b, idx].astype(np.float64)) if idx.size else np.nan
        np.testing.assert_allclose(got_loss[b], want, rtol=1e-6)
    got_prob = np.asarray(jax.jit(M.length_normalised_prob)(logprob, mask))
    want_prob = [np.exp(np.mean(logprob[b, mask[b] > 0])) for b in range(logprob.shape[0])]
    np.testing.assert_allclose(got_prob, want_prob, rtol=1e-6)


def test_length_normalised_prob_known_values_and_multi_answer_shape():
    # Pbar is the geometric mean of token probabilities: (0.5 * 0.125)^(1/2) = 0.25.
    lp = np.log(np.array([[0.9, 0.5, 0.125, 0.3]], np.float32))
    mask = np.array([[0, 1, 1, 0]], np.float32)
    np.testing.assert_allclose(np.asarray(M.length_normalised_prob(lp, mask)), [0.25], rtol=1e-6)
    stacked = np.stack([lp, lp], axis=1)  # [B=1, K=2, T]
    out = M.length_normalised_prob(stacked, np.stack([mask, mask], axis=1))
    assert out.shape == (1, 2)
    # An item with no scored labels is NaN (open-unlearning divides 0 by 0).
    assert np.isnan(np.asarray(M.length_normalised_loss(lp, np.zeros_like(mask)))[0])


def test_drop_last_label_removes_final_scored_position():
    mask = np.array([[0, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 1]])
    got = np.asarray(M.drop_last_label(mask))
    want = np.zeros_like(mask)
    for b in range(mask.shape[0]):
        want[b, ref_scored_positions(mask[b], True)] = 1
    np.testing.assert_array_equal(got, want)


def test_extraction_strength_hand_cases():
    mask = np.array([[0, 1, 1, 1, 1, 1]], np.float32)  # 5 labels; last (EOS) is dropped -> 4
    cases = {
        (0, 1, 1, 1, 1, 0): 1.0,  # full match on the 4 kept labels (EOS mismatch is dropped)
        (0, 0, 0, 0, 0, 1): 0.25,  # no suffix matches: OU loop quirk gives 1/|a|, not 0
        (0, 0, 0, 1, 1, 1): 0.5,  # suffix of 2 matches: k* = 2
        (0, 1, 1, 1, 0, 1): 0.25,  # last kept token wrong: k* = n-1 = 3 as well
        (0, 0, 1, 1, 1, 1): 0.75,  # k* = 1
    }
    for match, want in cases.items():
        got = float(M.extraction_strength(np.array([match], np.float32), mask)[0])
        assert got == pytest.approx(want), match
    # Without dropping EOS the same "full match" row has a mismatch at its last label.
    got = float(M.extraction_strength(np.array([[0, 1, 1, 1, 1, 0]]), mask, drop_last=False)[0])
    assert got == pytest.approx(1 / 5)
    # One answer token: the loop ends at k = 0 either way, ES = 1; no tokens: 0.
    one = np.array([[0, 1, 0]], np.float32)
    assert float(M.extraction_strength(np.array([[0, 0, 0]]), one, drop_last=False)[0]) == 1.0
    assert float(M.extraction_strength(np.array([[1, 1, 1]]), np.zeros((1, 3)))[0]) == 0.0


def test_extraction_strength_and_exact_memorisation_random_vs_loop():
    rng = np.random.default_rng(1)
    _, mask = random_scores(2, batch=40, seq=10)
    # Mostly-matching rows so that long matching suffixes actually occur.
    match = (rng.random(mask.shape) < 0.8).astype(np.int32)
    es = np.asarray(jax.jit(M.extraction_strength)(match, mask))
    em = np.asarray(jax.jit(M.exact_memorisation)(match, mask))
    for b in range(mask.shape[0]):
        idx = ref_scored_positions(mask[b], True)
        labels = np.zeros(idx.size, np.int32)
        preds = 1 - match[b, idx]  # pred == label exactly where match == 1
        assert es[b] == pytest.approx(ref_extraction_strength(preds, labels)), b
        if idx.size == 0:
            assert np.isnan(em[b])
        else:
            assert em[b] == pytest.approx(np.mean(preds == labels)), b


# ----------------------------------------------------------------------------- per-item


def test_truth_ratio_known_pbar_values():
    # Correct Pbar 0.5; perturbed Pbar 0.25 and 0.5 -> geometric mean sqrt(0.125).
    correct = -np.log([0.5])
    perturbed = -np.log([[0.25, 0.5]])
    r = M.truth_ratio(correct, perturbed)
    np.testing.assert_allclose(r, [math.sqrt(0.125) / (0.5 + 1e-10)], rtol=1e-12)
    # Averaging in loss space differs from averaging probabilities: (0.25 + 0.5) / 2 / 0.5.
    assert abs(r[0] - 0.75) > 0.04
    # Pre-averaged [B] input gives the same.
    np.testing.assert_allclose(M.truth_ratio(correct, perturbed.mean(-1)), r, rtol=1e-12)


def test_truth_ratio_and_aggregates_random():
    rng = np.random.default_rng(3)
    c = rng.uniform(0.1, 4, size=50)
    p = rng.uniform(0.1, 4, size=(50, 5))
    r = M.truth_ratio(c, p)
    want = np.array([np.exp(-np.mean(p[i])) / (np.exp(-c[i]) + 1e-10) for i in range(50)])
    np.testing.assert_allclose(r, want, rtol=1e-12)
    assert M.truth_ratio_closer_to_1(r) == pytest.approx(
        np.mean([min(x, 1 / (x + 1e-10)) for x in r]), rel=1e-12
    )
    assert M.truth_ratio_true_better(r) == pytest.approx(
        np.mean([max(0.0, 1 - x) for x in r]), rel=1e-12
    )
    # Hand values: R = 2 -> 0.5 (closer_to_1), 0 (true_better); R = 0.25 -> 0.25, 0.75.
    assert M.truth_ratio_closer_to_1([2.0, 0.25]) == pytest.approx((0.5 + 0.25) / 2)
    assert M.truth_ratio_true_better([2.0, 0.25]) == pytest.approx(0.75 / 2)


def test_multi_answer_mean_loss_and_ragged_mask():
    losses = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]])
    np.testing.assert_allclose(M.multi_answer_mean_loss(losses), [2.0, (0.5 + 0.5 + 9) / 3])
    ragged = M.multi_answer_mean_loss(losses, np.array([[1, 1, 1], [1, 1, 0]]))
    np.testing.assert_allclose(ragged, [2.0, 0.5])
    with pytest.raises(ValueError, match="batch, answers"):
        M.multi_answer_mean_loss(np.array([1.0, 2.0]))


def test_option_normalised_prob():
    c = np.array([0.6, 0.1])
    w = np.array([[0.1, 0.1, 0.2], [0.3, 0.3, 0.3]])
    want = [0.6 / (0.6 + 0.4 + 1e-10), 0.1 / (0.1 + 0.9 + 1e-10)]
    np.testing.assert_allclose(M.option_normalised_prob(c, w), want, rtol=1e-12)
    # All-zero probabilities stay finite thanks to the epsilon.
    assert M.option_normalised_prob([0.0], [[0.0, 0.0]])[0] == 0.0


def test_forget_quality_is_scipy_ks_pvalue_for_r_and_inverse_r():
    rng = np.random.default_rng(4)
    a = rng.lognormal(0.0, 0.5, size=400)
    b = rng.lognormal(0.2, 0.5, size=400)
    want = scipy.stats.ks_2samp(a, b).pvalue
    assert M.forget_quality(a, b) == want
    # KS is invariant to the monotone map R -> 1/R (evaluation.md s.1.3).
    assert M.forget_quality(1 / a, 1 / b) == pytest.approx(want, rel=1e-12)
    # Small samples take scipy's exact path under method='auto'.
    small_a, small_b = a[:40], b[:40]
    assert M.forget_quality(small_a, small_b) == scipy.stats.ks_2samp(small_a, small_b).pvalue
    # Identical samples: p = 1.
    assert M.forget_quality(a, a) == 1.0
    with pytest.raises(ValueError, match="tr_retain has non-finite"):
        M.forget_quality(a, np.array([1.0, np.nan]))


def test_model_utility_hmean_and_missing_keys():
    rng = np.random.default_rng(5)
    values = {k: float(v) for k, v in zip(M.MODEL_UTILITY_KEYS, rng.uniform(0.1, 1, 9))}
    values["forget_Q_A_Prob"] = 0.99  # extra keys (a whole summary) are ignored
    want = scipy.stats.hmean([values[k] for k in M.MODEL_UTILITY_KEYS])
    assert M.model_utility(values) == pytest.approx(want, rel=1e-12)
    assert M.model_utility({**values, "ra_Q_A_ROUGE": 0.0}) == 0.0
    partial = {k: v for k, v in values.items() if k not in ("wf_Truth_Ratio", "retain_Q_A_Prob")}
    with pytest.raises(ValueError, match=r"retain_Q_A_Prob.*wf_Truth_Ratio"):
        M.model_utility(partial)
    with pytest.raises(ValueError, match="ra_Truth_Ratio"):
        M.model_utility({**values, "ra_Truth_Ratio": float("nan")})


# ----------------------------------------------------------------------------- text


GENS = ["The author was running late to the book fair", "", "She wrote novels", "Paris"]
GTS = ["The author runs a book fair in Paris", "nothing", "She writes novels and poems", "Paris"]


@pytest.mark.parametrize("stemmer", [True, False])
def test_rouge_matches_rouge_score(stemmer):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stemmer)
    ref = [scorer.score(gt, gen) for gen, gt in zip(GENS, GTS)]
    np.testing.assert_allclose(
        M.rouge_l(GENS, GTS, kind="recall", stemmer=stemmer), [s["rougeL"].recall for s in ref]
    )
    np.testing.assert_allclose(
        M.rouge_l(GENS, GTS, kind="f1", stemmer=stemmer), [s["rougeL"].fmeasure for s in ref]
    )
    r1 = [d["rouge1_recall"] for d in M.rouge_scores(GENS, GTS, stemmer=stemmer)]
    np.testing.assert_allclose(r1, [s["rouge1"].recall for s in ref])


def test_rouge_argument_order_and_stemmer_matter():
    # recall is over the target's tokens: a short generation inside a long target has low
    # recall, so swapping target and prediction would be caught.
    assert M.rouge_l(["Paris"], ["The capital is Paris"])[0] == pytest.approx(0.25)
    assert M.rouge_l(["runs"], ["running"], stemmer=True)[0] == 1.0
    assert M.rouge_l(["runs"], ["running"], stemmer=False)[0] == 0.0
    with pytest.raises(ValueError, match="kind"):
        M.rouge_l(["a"], ["a"], kind="precision")


def test_truncate_at_stops_and_muse_helpers():
    assert M.truncate_at_stops("Paris\n\nQuestion: next") == "Paris"
    assert M.truncate_at_stops("Paris\nQuestion: next") == "Paris"
    assert M.truncate_at_stops("Paris Question: x\n\ny") == "Paris "
    assert M.truncate_at_stops("no stop here") == "no stop here"
    assert M.truncate_at_stops("a</s>b", ["</s>"]) == "a"

    gens = ["Paris\n\nQuestion: What?", "Lyon is big", "x"]
    answers = ["Paris", "Lyon", "y"]
    mean, per_item = M.knowmem(gens, answers, stemmer=False, percent=True)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    cut = ["Paris", "Lyon is big", "x"]
    want = [scorer.score(a, g)["rougeL"].fmeasure for g, a in zip(cut, answers)]
    np.testing.assert_allclose(per_item, want)
    assert mean == pytest.approx(100 * np.mean(want))

    vmean, vitems = M.verbmem(GENS, GTS)  # OU defaults: stemmer, 0-1
    np.testing.assert_allclose(vitems, M.rouge_l(GENS, GTS, kind="f1", stemmer=True))
    assert vmean == pytest.approx(np.mean(vitems))


# ----------------------------------------------------------------------------- MIA


@pytest.mark.parametrize("at_least_one", [True, False])
@pytest.mark.parametrize("k", [0.2, 0.4, 0.5])
def test_min_k_matches_reference_on_random_inputs(k, at_least_one):
    logprob, mask = random_scores(6, batch=30, seq=12)
    fn = jax.jit(functools.partial(mia.min_k_score, k=k, at_least_one=at_least_one))
    got = np.asarray(fn(logprob, mask))
    for b in range(logprob.shape[0]):
        idx = ref_scored_positions(mask[b], True)
        want = ref_min_k(logprob[b, idx].astype(np.float64), k, at_least_one)
        if np.isnan(want):
            assert np.isnan(got[b])
        else:
            assert got[b] == pytest.approx(want, rel=1e-6), b


def test_min_k_small_t_where_floor_is_zero():
    lp = np.log(np.array([[0.5, 0.1, 0.9, 0.7]], np.float32))
    mask = np.array([[1, 1, 1, 0]], np.float32)  # 3 labels, EOS dropped -> 2 tokens
    # floor(0.4 * 2) = 0: open-unlearning keeps one token (the lowest), MUSE gets nan.
    assert float(mia.min_k_score(lp, mask)[0]) == pytest.approx(-np.log(0.1))
    assert np.isnan(float(mia.min_k_score(lp, mask, at_least_one=False)[0]))
    # MUSE scores every token after BOS: 3 tokens, floor(1.2) = 1.
    muse = mia.min_k_score(lp, mask, drop_last=False, at_least_one=False)
    assert float(muse[0]) == pytest.approx(-np.log(0.1))
    # No tokens: open-unlearning returns 0.
    assert float(mia.min_k_score(lp, np.zeros_like(mask))[0]) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        mia.min_k_score(lp, mask, k=0.0)


def test_min_k_count_uses_python_rounding():
    # int(n * k) with Python floats: 10 * 0.7 = 7.000000000000001 -> 7, 100 * 0.29 -> 28.
    for n, k in [(10, 0.7), (100, 0.29), (3, 0.1), (7, 0.3)]:
        lp = -np.arange(1, n + 1, dtype=np.float32)[None]  # sorted ascending = reversed
        mask = np.ones((1, n), np.float32)
        count = max(1, int(n * k))
        want = -np.mean(np.sort(lp[0])[:count])
        got = float(mia.min_k_score(lp, mask, k=k, drop_last=False)[0])
        assert got == pytest.approx(want, rel=1e-6), (n, k)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_min_k_plus_plus_matches_reference_from_logits():
    rng = np.random.default_rng(7)
    batch, seq, vocab = 6, 10, 17
    logits = rng.normal(0, 2.0, size=(batch, seq, vocab))
    labels = rng.integers(0, vocab, size=(batch, seq))
    _, mask = random_scores(8, batch=batch, seq=seq, min_len=2)
    logp = np_log_softmax(logits)
    token_lp = np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    mu = (np.exp(logp) * logp).sum(-1)
    var = (np.exp(logp) * logp**2).sum(-1) - mu**2
    got = np.asarray(
        jax.jit(mia.min_k_plus_plus_score)(
            token_lp.astype(np.float32),
            mu.astype(np.float32),
            np.sqrt(var).astype(np.float32),
            mask,
        )
    )
    for b in range(batch):
        idx = ref_scored_positions(mask[b], True)
        # open-unlearning min_k_plus_plus.py, with sigma^2 clamped at 1e-6.
        z = (token_lp[b, idx] - mu[b, idx]) / np.sqrt(np.clip(var[b, idx], 1e-6, None))
        count = max(1, int(len(z) * 0.4))
        assert got[b] == pytest.approx(-np.mean(np.sort(z)[:count]), rel=1e-5), b


def test_min_k_plus_plus_clamps_sigma():
    lp = np.array([[-0.01, -0.02]], np.float32)
    mu = np.array([[-0.015, -0.015]], np.float32)
    sigma = np.zeros((1, 2), np.float32)  # a one-hot distribution
    ones = np.ones((1, 2))
    got = float(mia.min_k_plus_plus_score(lp, mu, sigma, ones, k=0.5, drop_last=False)[0])
    # lowest z of [(-0.01+0.015)/1e-3, (-0.02+0.015)/1e-3] = -5 -> score 5.
    assert got == pytest.approx(5.0, rel=1e-4)


def test_loss_zlib_reference_scores():
    logprob, mask = random_scores(9, min_len=2)
    got = np.asarray(mia.loss_score(logprob, mask))
    want = [-np.mean(logprob[b, mask[b] > 0]) for b in range(logprob.shape[0])]
    np.testing.assert_allclose(got, want, rtol=1e-6)  # LOSS keeps EOS, like OU
    got_dropped = np.asarray(mia.loss_score(logprob, mask, drop_last=True))
    want_dropped = [
        -np.mean(logprob[b, ref_scored_positions(mask[b], True)]) for b in range(mask.shape[0])
    ]
    np.testing.assert_allclose(got_dropped, want_dropped, rtol=1e-6)

    texts = ["hello hello hello hello", "Ünïcode text ✓", "a", "zz" * 40, "The author"]
    z = mia.zlib_score(want, texts)
    np.testing.assert_allclose(
        z,
        [float(w) / len(zlib.compress(bytes(t, "utf-8"))) for w, t in zip(want, texts)],
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="texts"):
        mia.zlib_score(want, texts[:2])

    np.testing.assert_allclose(mia.reference_score([2.0, 1.0], [0.5, 1.5]), [1.5, -0.5])


def test_mia_auc_orientation_and_sklearn():
    # Forget items with lower loss than holdout look like members -> AUC 1.
    assert mia.mia_auc([0.1, 0.2], [0.8, 0.9]) == 1.0
    assert mia.mia_auc([0.8, 0.9], [0.1, 0.2]) == 0.0
    rng = np.random.default_rng(10)
    f, h = rng.normal(0, 1, 60), rng.normal(0.3, 1, 45)
    want = roc_auc_score(np.r_[np.zeros(60), np.ones(45)], np.r_[f, h])
    assert mia.mia_auc(f, h) == pytest.approx(want, rel=1e-12)
    # muse_bench: roc_curve on -score with forget = 0, holdout = 1, then auc(fpr, tpr).
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(60), np.ones(45)], -np.r_[f, h])
    assert mia.muse_auc(mia.mia_auc(f, h)) == pytest.approx(sk_auc(fpr, tpr), rel=1e-12)
    with pytest.raises(ValueError, match="non-empty"):
        mia.mia_auc([], [1.0])


def test_privleak_sign_conventions_and_reference_numbers():
    # open-unlearning: s = 1 - AUC, r = 1 - AUC_retain, (s - r) / (r + 1e-10) * 100.
    assert mia.privleak(1.0, 0.5) == pytest.approx(-100.0)  # forget looks fully member-like
    assert mia.privleak(0.5) == pytest.approx(0.0)  # fallback retain AUC 0.5
    assert mia.privleak(0.0, 0.5) == pytest.approx(100.0)  # over-unlearned
    assert mia.privleak(0.7, 0.6) == pytest.approx((0.3 - 0.4) / (0.4 + 1e-10) * 100)
    # MUSE News target: PrivLeak -99.8 against the retrain AUC 0.4772 (evaluation.md s.8.2).
    assert round(mia.MUSE_AUC_RETRAIN["news"], 4) == 0.4772
    assert round(mia.MUSE_AUC_RETRAIN["books"], 4) == 0.5393
    ret = mia.MUSE_AUC_RETRAIN["news"]
    auc_muse_target = ret * (1 - 0.998)
    assert mia.privleak_muse(auc_muse_target, ret) == pytest.approx(-99.8, rel=1e-12)
    # The same number from open-unlearning's orientation (AUC_OU = 1 - AUC_MUSE).
    assert mia.privleak(1 - auc_muse_target, 1 - ret) == pytest.approx(-99.8, rel=1e-8)
    assert mia.muse_auc(0.25) == 0.75


@pytest.mark.parametrize("p", [1, 2, float("inf")])
def test_gradnorm_scores_match_torch_autograd(p):
    rng = np.random.default_rng(11)
    vocab, dim, n, seq = 13, 6, 4, 7
    params = {
        "embed": rng.normal(0, 0.5, (vocab, dim)).astype(np.float32),
        "proj": rng.normal(0, 0.5, (dim, vocab)).astype(np.float32),
        "bias": rng.normal(0, 0.1, (vocab,)).astype(np.float32),
    }
    tokens = rng.integers(0, vocab, (n, seq)).astype(np.int32)
    mask = np.zeros((n, seq), np.float32)
    for i in range(n):
        mask[i, 2 : 3 + i + 1] = 1  # answer labels (incl. EOS) of different lengths

    traces = []

    def loss_fn(params, ex):
        traces.append(1)
        h = params["embed"][ex["tokens"][:, :-1]]
        logp = jax.nn.log_softmax(h @ params["proj"] + params["bias"])
        lp = jnp.take_along_axis(logp, ex["tokens"][:, 1:, None], -1)[..., 0]
        return mia.loss_score(lp, ex["mask"][:, 1:], drop_last=True)[0]

    jparams = jax.tree.map(jnp.asarray, params)
    got = mia.gradnorm_scores(loss_fn, jparams, {"tokens": tokens, "mask": mask}, p=p)
    assert len(traces) == 1  # one trace for all examples of one shape

    want = []
    for i in range(n):
        tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        tok = torch.tensor(tokens[i], dtype=torch.long)
        logp = torch.log_softmax(tp["embed"][tok[:-1]] @ tp["proj"] + tp["bias"], -1)
        lp = logp.gather(-1, tok[1:, None])[:, 0]
        idx = ref_scored_positions(mask[i, 1:], True)
        (-lp[torch.tensor(idx)].mean()).backward()
        want.append(torch.stack([tp[k].grad.norm(p=p) for k in params]).mean().item())
    np.testing.assert_allclose(got, want, rtol=1e-5)

    # A list of batch-1 examples gives the same.
    as_list = [{"tokens": tokens[i : i + 1], "mask": mask[i : i + 1]} for i in range(n)]
    np.testing.assert_allclose(mia.gradnorm_scores(loss_fn, jparams, as_list, p=p), got, rtol=1e-6)


def test_gradnorm_score_is_mean_of_per_tensor_norms_not_global():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.zeros((2, 2))}
    assert float(mia.gradnorm_score(grads)) == pytest.approx(2.5)  # (5 + 0) / 2, global is 5
    assert float(mia.gradnorm_score(grads, p=1)) == pytest.approx(3.5)
    assert float(mia.gradnorm_score(grads, p=float("inf"))) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="p must be"):
        mia.gradnorm_score(grads, p=3)


def test_public_api_resolves():
    import jaxunlearn.eval as ev

    assert [name for name in ev.__all__ if not hasattr(ev, name)] == []


def test_host_inputs_run_in_numpy_and_match_jax_inputs():
    """The runners pass host arrays: the per-token metrics then run in NumPy (no compile per
    shape) and give the jax.numpy path's numbers; under jit they still trace."""
    rng = np.random.default_rng(0)
    logprob = -rng.gamma(2.0, 1.0, size=(5, 9)).astype(np.float32)
    mask = (np.arange(9)[None] < np.array([[9], [4], [1], [0], [7]])).astype(np.float32)
    match = (rng.random((5, 9)) < 0.6).astype(np.float32)
    mu, sd = rng.normal(size=(5, 9)).astype(np.float32), rng.random((5, 9)).astype(np.float32)
    calls = {
        "drop_last_label": lambda a: M.drop_last_label(a[1]),
        "loss": lambda a: M.length_normalised_loss(a[0], a[1]),
        "loss_drop_last": lambda a: M.length_normalised_loss(a[0], a[1], drop_last=True),
        "prob": lambda a: M.length_normalised_prob(a[0], a[1]),
        "em": lambda a: M.exact_memorisation(a[2], a[1]),
        "es": lambda a: M.extraction_strength(a[2], a[1]),
        "min_k": lambda a: mia.min_k_score(a[0], a[1]),
        "min_k_muse": lambda a: mia.min_k_score(a[0], a[1], at_least_one=False),
        "min_k_pp": lambda a: mia.min_k_plus_plus_score(a[0], a[3], a[4], a[1]),
    }
    host = (logprob, mask, match, mu, sd)
    for name, fn in calls.items():
        ours = fn(host)
        assert isinstance(ours, np.ndarray), name
        ref = fn(tuple(jnp.asarray(x) for x in host))
        assert isinstance(ref, jax.Array), name
        np.testing.assert_allclose(ours, np.asarray(ref), rtol=1e-6, atol=1e-6, err_msg=name)
        jitted = jax.jit(lambda *a, fn=fn: fn(a))(*host)
        np.testing.assert_allclose(ours, np.asarray(jitted), rtol=1e-6, atol=1e-6, err_msg=name)
