"""jit-compiled generation: greedy parity with transformers, KV-cache consistency, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxunlearn.models import filter_logits, generate, init_cache
from jaxunlearn.models.generate import _generate_jit, segment_ends

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB, PAD = 96, 0
_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,  # peaked next-token distributions: no near-ties for argmax
    pad_token_id=PAD,
)


def hf_config(arch):
    if arch == "llama":
        return transformers.LlamaConfig(**_SMALL)
    if arch == "qwen3":
        return transformers.Qwen3Config(**_SMALL, head_dim=16, tie_word_embeddings=True)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
            initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    raise ValueError(arch)


def left_padded_prompts(seed=0):
    """3 prompts of lengths 7, 4, 2, left-padded to 7 with PAD."""
    rng = np.random.RandomState(seed)
    lengths = (7, 4, 2)
    ids = np.full((3, 7), PAD, np.int64)
    mask = np.zeros((3, 7), np.int64)
    for row, n in enumerate(lengths):
        ids[row, 7 - n :] = rng.randint(3, VOCAB, size=n)
        mask[row, 7 - n :] = 1
    return ids, mask


def hf_greedy(torch_model, ids, mask, max_new_tokens, eos):
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    return out[:, ids.shape[1] :].numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_greedy_matches_transformers_generate(arch, tiny_hf_model, nnx_twin):
    torch_model = tiny_hf_model(hf_config(arch))
    model = nnx_twin(torch_model)
    ids, mask = left_padded_prompts()
    n = 8
    # Pick as EOS a token that row 0 greedily emits at step 2 (and that is not emitted
    # earlier by it), so one row stops early and the per-row "done" logic is exercised.
    free_run = hf_greedy(torch_model, ids, mask, n, eos=VOCAB + 1)
    eos = int(free_run[0, 2])
    ref = hf_greedy(torch_model, ids, mask, n, eos=eos)
    ours = np.asarray(
        generate(model, ids, mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=PAD)
    )
    assert ours.shape == (3, n) and ours.dtype == np.int32
    # HF stops early once every row has finished; we pad the remaining columns.
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1] :] == PAD).all()
    assert ours[0, 2] == eos and (ours[0, 3:] == PAD).all()
    # Without an EOS hit, all n tokens equal HF's free run.
    free = generate(model, ids, mask, max_new_tokens=n, eos_token_id=None, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(free), free_run)


@pytest.mark.parametrize("attention", ["einsum", "dot_product_attention"])
def test_greedy_matches_transformers_across_cache_segments(attention, tiny_hf_model, tmp_path):
    """40 new tokens run as three cache segments (16, 32, 40 slots past the prompt): the
    cache grows between them and a row that stops in the second keeps padding."""
    from jaxunlearn.checkpoints import load_pretrained

    n = 40
    assert segment_ends(n) == (16, 32, 40)
    torch_model = tiny_hf_model(hf_config("llama"))
    torch_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, attention=attention)
    ids, mask = left_padded_prompts(seed=1)
    free_run = hf_greedy(torch_model, ids, mask, n, eos=VOCAB + 1)
    kw = dict(max_new_tokens=n, pad_token_id=PAD)
    ours = generate(model, ids, mask, eos_token_id=None, **kw)
    np.testing.assert_array_equal(np.asarray(ours), free_run)
    eos = int(free_run[1, 20])
    stop = int(np.flatnonzero(free_run[1] == eos)[0])  # first time row 1 emits it
    ref = hf_greedy(torch_model, ids, mask, n, eos=eos)
    ours = np.asarray(generate(model, ids, mask, eos_token_id=eos, **kw))
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[1, stop + 1 :] == PAD).all()


def test_segment_ends():
    assert segment_ends(1) == (1,)
    assert segment_ends(16) == (16,)
    assert segment_ends(17) == (17,)  # a 1-step tail joins the first segment
    assert segment_ends(65) == (32, 65)
    assert segment_ends(200) == (64, 128, 200)  # an 8-step tail joins the segment before
    assert segment_ends(224) == (64, 128, 192, 224)
    assert segment_ends(200, segments=1) == (200,)
    for n in (5, 63, 64, 65, 199, 1000):
        ends = segment_ends(n)
        assert ends[-1] == n and len(ends) <= 5 and list(ends) == sorted(set(ends))


def test_cached_decoding_matches_full_forward(tiny_hf_model, nnx_twin):
    """Prefill + one-token steps through the KV cache give the full forward's logits."""
    model = nnx_twin(tiny_hf_model(hf_config("qwen3")))
    ids, mask = left_padded_prompts()
    pos = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), position_ids=pos).logits)
    cache = init_cache(model.config, 3, 7)
    out = model(
        jnp.asarray(ids[:, :4]), jnp.asarray(mask[:, :4]), position_ids=pos[:, :4], cache=cache
    )
    step_logits = [np.asarray(out.logits)]
    for t in range(4, 7):
        out = model(
            jnp.asarray(ids[:, t : t + 1]),
            jnp.asarray(mask[:, t : t + 1]),
            position_ids=pos[:, t : t + 1],
            cache=out.cache,
        )
        step_logits.append(np.asarray(out.logits))
    assert int(out.cache.index) == 7
    np.testing.assert_array_equal(np.asarray(out.cache.mask), mask)
    cached = np.concatenate(step_logits, axis=1)
    real = mask == 1
    np.testing.assert_allclose(cached[real], full[real], atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(None, None), (5, None), (None, 0.7), (7, 0.5), (1, 0.9)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    ref = warpers(None, torch.tensor(logits)).numpy()
    ours = np.asarray(filter_logits(jnp.asarray(logits), 0.7, top_k, top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)
    if top_k is not None or top_p is not None:
        assert np.isinf(ref).any()  # the filter actually removed something


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_hf_model, nnx_twin):
    model = nnx_twin(tiny_hf_model(hf_config("llama")))
    ids, mask = left_padded_prompts()
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=PAD)
    greedy = np.asarray(generate(model, ids, mask, **kw))
    one = generate(model, ids, mask, temperature=0.8, top_k=1, rng=jax.random.key(3), **kw)
    np.testing.assert_array_equal(np.asarray(one), greedy)
    a = generate(model, ids, mask, temperature=1.5, top_p=0.95, rng=jax.random.key(0), **kw)
    b = generate(model, ids, mask, temperature=1.5, top_p=0.95, rng=jax.random.key(0), **kw)
    c = generate(model, ids, mask, temperature=1.5, top_p=0.95, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any() and (np.asarray(a) != greedy).any()


def test_compiles_once_per_shape(tiny_hf_model, nnx_twin):
    model = nnx_twin(tiny_hf_model(hf_config("gpt2")))
    ids, mask = left_padded_prompts()
    kw = dict(max_new_tokens=3, eos_token_id=2, pad_token_id=PAD)
    generate(model, ids, mask, **kw)
    before = _generate_jit._cache_size()
    generate(model, (ids + 1) * mask, mask, **kw)  # same shapes, other values
    generate(model, ids, mask, **kw)
    assert _generate_jit._cache_size() == before
    generate(model, ids[:, 1:], mask[:, 1:], **kw)  # new prompt length -> one new compile
    assert _generate_jit._cache_size() == before + 1


def test_generate_rejects_bad_input(tiny_hf_model, nnx_twin):
    model = nnx_twin(tiny_hf_model(hf_config("gpt2")))
    ids, mask = left_padded_prompts()
    kw = dict(max_new_tokens=2, eos_token_id=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask[:, ::-1], **kw)
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, mask, temperature=1.0, **kw)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, mask, temperature=1.0, top_p=0.0, rng=jax.random.key(0), **kw)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2)])
def test_decode_attention_matches_plain_softmax(heads, kv_heads):
    """One decode step over the cache layout (keys [B, KV, D, S], values [B, KV, S, D]),
    multi-head (one query per key/value head, scored through a duplicated query) and
    grouped-query, against softmax attention written out in numpy."""
    from jaxunlearn.models.layers import cached_attention

    rng = np.random.default_rng(0)
    b, d, s = 3, 8, 11
    q = rng.normal(size=(b, 1, heads, d)).astype(np.float32)
    k = rng.normal(size=(b, kv_heads, d, s)).astype(np.float32)
    v = rng.normal(size=(b, kv_heads, s, d)).astype(np.float32)
    allowed = np.arange(s)[None, None, :] < np.array([11, 7, 1])[:, None, None]
    out = np.asarray(cached_attention(q, k, v, allowed, 0.3))
    for i in range(b):
        for h in range(heads):
            g = h // (heads // kv_heads)
            scores = np.where(allowed[i, 0], 0.3 * q[i, 0, h] @ k[i, g], -np.inf)
            p = np.exp(scores - scores.max())
            want = (p / p.sum()) @ v[i, g]
            np.testing.assert_allclose(out[i, 0, h], want, atol=1e-5)
