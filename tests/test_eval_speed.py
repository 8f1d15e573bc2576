"""Evaluation speed-ups that must not move a number: packed scoring, the timing hook, the
persistent compilation cache.

`inference.score_packed` (each shared prompt encoded once, rows packed without padding) is
checked against `inference.score_examples`, the per-item path every earlier release used, on
TOFU items with a tiny random Llama and a tiny GPT-2, and the whole TOFU runner against
itself with `packed=False`; all within 1e-5. The compilation-cache test runs the command line
twice in fresh processes and counts cache files and cache hits (never time).
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from test_eval_tofu import rows, tiny_checkpoint, tiny_tokenizer

from jaxunlearn import checkpoints
from jaxunlearn.data import IGNORE_INDEX
from jaxunlearn.eval import inference, tofu
from jaxunlearn.models import cache as kv_cache

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
# One padded length fits every tiny-tokenizer item here: few shapes, few compiles.
BUCKETS = (256, 512)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    path = tmp_path_factory.mktemp("tiny_speed")
    tiny_checkpoint(path, tokenizer)
    return {
        "path": path,
        "model": checkpoints.load_pretrained(path),
        "tokenizer": checkpoints.load_tokenizer(path),
    }


def tofu_items(n: int = 3) -> list[dict]:
    """Each question's answer, paraphrase and perturbed answers (the prompt-sharing case),
    a real-authors question with its three perturbed answers, and a plain text."""
    items = []
    for r in rows("forget10_perturbed")[:n]:
        answers = [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
        items += [{"question": r["question"], "answer": a} for a in answers]
    for r in rows("real_authors_perturbed")[:n]:
        items += [
            {"question": r["question"], "answer": a} for a in [r["answer"], *r["perturbed_answer"]]
        ]
    items.append({"text": "The author was born in Paris and wrote novels about the sea."})
    return items


def assert_same(ours: inference.TokenArrays, ref: inference.TokenArrays) -> None:
    assert ours.logprob.shape == ref.logprob.shape
    np.testing.assert_array_equal(ours.mask, ref.mask)
    np.testing.assert_array_equal(ours.targets, ref.targets)
    for name in ("logprob", "entropy_mean", "entropy_std", "argmax_match"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("stats", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_packed_scores_equal_per_item_scores(world, stats):
    model, tok = world["model"], world["tokenizer"]
    examples = inference.tokenize_items(tok, tofu_items(), "chat", max_length=512)
    kw = dict(batch_size=4, stats=stats, buckets=BUCKETS)
    ref = inference.score_examples(model, examples, **kw)
    # 256-token rows: the 7-answer groups no longer fit one row and are split (prompt repeated).
    for row_length in (inference.PACK_LENGTH, 256):
        assert_same(inference.score_packed(model, examples, row_length=row_length, **kw), ref)
    assert ref.mask.sum() > 0


def test_statistics_only_for_flagged_examples(world):
    """Per-example `stats` flags: flagged rows get every field of the all-statistics path,
    the others the same log-probs and zeros for the statistics; the calls stay balanced."""
    model, tok = world["model"], world["tokenizer"]
    examples = inference.tokenize_items(tok, tofu_items(), "chat", max_length=512)
    flags = [i % 7 == 0 or i >= 21 for i in range(len(examples))]  # forget answers, RA, text
    kw = dict(batch_size=2, buckets=BUCKETS, row_length=256)
    ours = inference.score_packed(model, examples, stats=flags, **kw)
    ref = inference.score_examples(model, examples, stats=True, buckets=BUCKETS, batch_size=4)
    flagged = np.flatnonzero(flags)
    assert_same(ours.take(flagged), ref.take(flagged))
    plain = np.flatnonzero(~np.asarray(flags))
    np.testing.assert_allclose(ours.logprob[plain], ref.logprob[plain], atol=TOL, rtol=0)
    for name in ("entropy_mean", "entropy_std", "argmax_match"):
        assert not getattr(ours, name)[plain].any(), name
        assert getattr(ref, name)[plain].any(), name
    with pytest.raises(ValueError, match="one bool per example"):
        inference.score_packed(model, examples, stats=flags[:-1], **kw)


def test_rows_are_dealt_to_calls_with_balanced_statistics(world):
    tok = world["tokenizer"]
    examples = inference.tokenize_items(tok, tofu_items(), "chat", max_length=512)
    wanted = np.arange(len(examples)) < 7  # only the first question's answers
    plan = inference._pack_rows(inference._shared_prompts(examples), examples, 128)
    calls = inference._deal_rows(plan, examples, wanted, per_call=2)
    assert sorted(map(len, calls), reverse=True) == [2] * (len(plan) // 2) + [1] * (len(plan) % 2)
    dealt = sorted(i for call in calls for row in call for m in row for i in m)
    assert dealt == list(range(len(examples)))

    def stats_positions(call):
        return sum(
            int((examples[i]["labels"] != IGNORE_INDEX).sum())
            for row in call
            for members in row
            for i in members
            if wanted[i]
        )

    # The first question's answers need more than one row: they are spread over calls.
    loaded = [stats_positions(call) for call in calls]
    assert sum(1 for n in loaded if n) > 1
    # Fewer such rows than calls: no call holds two of them (dealing rows in plan order
    # put two in one call here).
    assert max(loaded) == max(stats_positions([row]) for row in plan)


def test_prompts_are_shared_and_rows_packed(world):
    tok = world["tokenizer"]
    examples = inference.tokenize_items(tok, tofu_items(), "chat", max_length=512)
    groups = inference._shared_prompts(examples)
    sizes = sorted(len(members) for _, members in groups)
    # 3 forget questions x 7 answers, 3 real-authors questions x 4, one text on its own.
    assert sizes == [1, 4, 4, 4, 7, 7, 7]
    for prefix, members in groups:
        first = examples[members[0]]
        for i in members:  # the shared tokens are the same and precede every scored label
            np.testing.assert_array_equal(
                examples[i]["input_ids"][:prefix], first["input_ids"][:prefix]
            )
            assert np.all(examples[i]["labels"][: prefix + 1] == IGNORE_INDEX)
    rows_ = inference._pack_rows(groups, examples, 512)
    placed = sorted(i for row in rows_ for members in row for i in members)
    assert placed == list(range(len(examples)))

    def tree_size(members):  # distinct prefixes = trie nodes, counted plainly
        seqs = [tuple(examples[i]["input_ids"].tolist()) for i in members]
        return len({s[: k + 1] for s in seqs for k in range(len(s))})

    for row in rows_:
        assert sum(tree_size(members) for members in row) <= 512
    packed_tokens = sum(tree_size(members) for row in rows_ for members in row)
    lengths = [len(e["input_ids"]) for e in examples]
    prompt_once = sum(p + sum(lengths[i] - p for i in m) for p, m in groups)
    # Each prompt is laid out once per group, and shared answer beginnings once too.
    assert packed_tokens < prompt_once < sum(lengths)


def test_prefix_tree_layout():
    """Depth-first layout of the token trie: shared prefixes once, subtrees contiguous."""
    seqs = [np.array(s) for s in ([5, 1, 2, 3], [5, 1, 4], [5, 1, 2, 3], [5, 6], [5, 1, 2])]
    tokens, end, columns = inference._prefix_tree(seqs)
    # Trie nodes in depth-first order (children by token): 5 1 2 3 4 6.
    np.testing.assert_array_equal(tokens, [5, 1, 2, 3, 4, 6])
    np.testing.assert_array_equal(end, [5, 4, 3, 3, 4, 5])
    for seq, cols in zip(seqs, columns):
        np.testing.assert_array_equal(tokens[cols], seq)  # every sequence is a path
        assert all(end[c] >= cols[-1] for c in cols)  # its last token is in every subtree
    assert len({tuple(q[: k + 1]) for q in seqs for k in range(len(q))}) == len(tokens)


def test_packed_eos_masking_matches_per_item(world):
    """open-unlearning's mask hides EOS-valued tokens inside items; packing keeps that."""
    model, tok = world["model"], world["tokenizer"]
    eos = tok.eos_token_id
    examples = inference.tokenize_items(tok, tofu_items(2), "chat", max_length=512)
    for e in examples[:7]:  # an EOS-valued token inside the shared prompt
        e["input_ids"] = e["input_ids"].copy()
        e["input_ids"][2] = eos
    kw = dict(batch_size=4, pad_id=eos, ou_eos_masking=True, buckets=BUCKETS)
    assert_same(
        inference.score_packed(model, examples, **kw),
        inference.score_examples(model, examples, **kw),
    )


def test_packed_gpt2_learned_positions(tiny_hf_model, nnx_twin, world):
    config = transformers.GPT2Config(
        vocab_size=len(world["tokenizer"]), n_positions=512, n_embd=32, n_layer=2, n_head=4
    )
    model = nnx_twin(tiny_hf_model(config))
    examples = inference.tokenize_items(world["tokenizer"], tofu_items(1), "chat", max_length=256)
    kw = dict(batch_size=4, buckets=BUCKETS)
    assert_same(
        inference.score_packed(model, examples, row_length=256, **kw),
        inference.score_examples(model, examples, **kw),
    )


@pytest.mark.slow
def test_sliding_window_models_fall_back(tiny_hf_model, nnx_twin, world):
    config = transformers.MistralConfig(
        vocab_size=len(world["tokenizer"]),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        max_position_embeddings=512,
    )
    model = nnx_twin(tiny_hf_model(config))
    examples = inference.tokenize_items(world["tokenizer"], tofu_items(1), "chat", max_length=256)
    kw = dict(batch_size=4, buckets=BUCKETS)
    assert_same(
        inference.score_packed(model, examples, row_length=256, **kw),
        inference.score_examples(model, examples, **kw),
    )


def test_full_attention_mask_is_refused_with_a_cache_or_window():
    cfg_cache = kv_cache.KVCache((), (), np.zeros((1, 4), np.int32), np.int32(0))
    allowed = np.tril(np.ones((1, 4, 4), bool))
    with pytest.raises(ValueError, match=r"\[B, T, T\] attention mask"):
        kv_cache.attention_mask_bts(allowed, cfg_cache)
    with pytest.raises(ValueError, match="sliding-window"):
        kv_cache.attention_mask_bts(allowed, None, sliding_window=2)
    got, key_mask = kv_cache.attention_mask_bts(allowed, None)
    np.testing.assert_array_equal(np.asarray(got), allowed)
    np.testing.assert_array_equal(np.asarray(key_mask), [[1, 1, 1, 1]])


@pytest.mark.slow
def test_tofu_packed_equals_unpacked(world):
    metrics = [
        "forget_truth_ratio",
        "forget_Q_A_Prob",
        "retain_Truth_Ratio",
        "ra_Q_A_Prob_normalised",
        "wf_Truth_Ratio",
        "extraction_strength",
        "exact_memorization",
        "mia_min_k_plus_plus",
        "mia_zlib",
    ]
    kw = dict(limit=1, batch_size=4, metrics=metrics, buckets=BUCKETS)
    ours = tofu.evaluate_tofu(world["model"], world["tokenizer"], packed=True, **kw)
    ref = tofu.evaluate_tofu(world["model"], world["tokenizer"], packed=False, **kw)
    assert set(ours.logs) == set(ref.logs)

    def numbers(tree, path=""):
        if isinstance(tree, dict):
            for k, v in tree.items():
                yield from numbers(v, f"{path}/{k}")
        elif isinstance(tree, float | int) and not isinstance(tree, bool):
            yield path, float(tree)

    a, b = dict(numbers(ours.logs)), dict(numbers(ref.logs))
    assert a.keys() == b.keys() and len(a) > 25
    for key in a:
        assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(b[key])), (key, a[key], b[key])


def test_timings_split_phases_and_compilation(world):
    model, tok = world["model"], world["tokenizer"]
    items = tofu_items(1)
    start = time.perf_counter()
    with inference.collect_timings() as timings:
        with inference.phase("score/x"):
            # a bucket no other test uses: this call compiles
            inference.score_items(model, tok, items, "chat", batch_size=3, buckets=(320, 640))
        with inference.phase("metrics"):
            time.sleep(0.01)
    wall = time.perf_counter() - start
    assert {"tokenize", "score/x", "compile", "metrics"} <= set(timings.seconds)
    assert timings.calls["compile"] >= 1  # tracing, lowering, XLA compile events
    assert all(v >= 0 for v in timings.seconds.values())
    # Exclusive times: nested tokenisation and compilation are not counted twice.
    assert timings.total() <= wall + 1e-3
    with inference.collect_timings() as again:
        inference.score_items(model, tok, items, "chat", batch_size=3, buckets=(320, 640))
    assert "compile" not in again.seconds  # same shapes: nothing compiled
    with inference.phase("outside"):  # no collector: a no-op
        pass


CACHE_PROBE = textwrap.dedent(
    """
    import json, sys
    import jax
    from jaxunlearn import cli
    counts = {}
    def listen(event, **kw):
        counts[event] = counts.get(event, 0) + 1
    jax.monitoring.register_event_listener(listen)
    status = cli.main(sys.argv[1:])
    print("COUNTS", json.dumps(counts))
    sys.exit(status)
    """
)


@pytest.mark.slow
def test_compilation_cache_is_reused_by_a_second_process(world, tmp_path):
    cache = tmp_path / "xla"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["eval", "--model", str(world["path"]), "--benchmark", "tofu", "--limit", "1"]
    args += ["--metrics", "forget_Q_A_Prob", "--no-holdout", "--compilation-cache", str(cache)]
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}" / "TOFU_EVAL.json"
        proc = subprocess.run(
            [sys.executable, "-c", CACHE_PROBE, *args, "--out", str(out)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("COUNTS"))
        runs.append((json.loads(line[len("COUNTS") :]), sorted(p.name for p in cache.iterdir())))
    (first, files1), (second, files2) = runs
    assert files1, "the first process wrote no cache entry"
    assert first.get("/jax/compilation_cache/cache_hits", 0) == 0
    assert second.get("/jax/compilation_cache/cache_hits", 0) >= len(
        [f for f in files1 if not f.endswith("-atime")]
    )
    assert files2 == files1  # nothing new compiled


SMALL_PROBE = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from jaxunlearn.eval import inference
    counts = {}
    jax.monitoring.register_event_listener(lambda e, **kw: counts.__setitem__(e, counts.get(e, 0) + 1))
    inference.enable_compilation_cache(sys.argv[1], min_compile_secs=0)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    f(jnp.ones((8, 8))).block_until_ready()
    print("COUNTS", json.dumps(counts))
    """
)


def test_enable_compilation_cache_second_process_hits(tmp_path):
    cache = tmp_path / "xla"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    counts, files = [], []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", SMALL_PROBE, str(cache)],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("COUNTS"))
        counts.append(json.loads(line[len("COUNTS") :]))
        files.append(sorted(p.name for p in cache.iterdir()))
    assert files[0] and files[1] == files[0]
    assert counts[0].get("/jax/compilation_cache/cache_hits", 0) == 0
    assert counts[1].get("/jax/compilation_cache/cache_hits", 0) >= 1
    assert inference.default_compilation_cache_dir().parts[-2:] == (
        "jaxunlearn",
        "jax-compilation-cache",
    )


def test_one_length_generation_gives_the_same_tokens(world):
    model, tok = world["model"], world["tokenizer"]
    questions = [r["question"] for r in rows("forget10_perturbed")[:3]] + ["Who?"]
    prompts = [inference.encode_prompt(tok, q, "chat") for q in questions]
    buckets = (min(len(p) for p in prompts), 128)  # "Who?" alone in the short bucket
    assert len({inference.bucket_length(len(p), buckets) for p in prompts}) == 2
    kw = dict(max_new_tokens=4, eos_token_id=tok.eos_token_id, pad_token_id=0, batch_size=4)
    ours = inference.generate_tokens(model, prompts, buckets=buckets, one_length=True, **kw)
    ref = inference.generate_tokens(model, prompts, buckets=buckets, **kw)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
