"""Tests for jaxunlearn.data: loading, prompt formats and label masks, buckets, sampling.

The tokenizer is a tiny byte-level BPE trained here, offline, on TOFU lines and wrapped in
`transformers.PreTrainedTokenizerFast`, with a small Jinja chat template written below. Byte-level
BPE decodes exactly, so "the scored tokens decode to answer + EOS" is checked on strings.
"""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

import jaxunlearn.data as jd

MUSE_DIR = Path("/work/shared/data/muse-news")
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
DATE = "10 Apr 2025"
SYSTEM = "You are a helpful assistant."
# A minimal chat template: role tags are added tokens; the assistant turn ends with EOS; the
# system turn shows `date_string` so the test sees that the kwarg reached the template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'system' %}Date: {{ date_string }}\n{% endif %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tofu_lines(name):
    path = Path(jd.TOFU_DIR) / f"{name}.json"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _make_tokenizer(chat_template=CHAT_TEMPLATE, name="tiny-bpe"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rows = _tofu_lines("forget10")[:300]
    texts = [r["question"] + " " + r["answer"] for r in rows]
    specials = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=specials[3:],
        clean_up_tokenization_spaces=False,
        name_or_path=name,
    )
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def items():
    rows = _tofu_lines("forget10")
    return [(r["question"], r["answer"]) for r in rows[:5] + rows[-3:]]


def _decode(tok, ids):
    return tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


# Expected prompt strings written out plainly (evaluation.md section 0) and the scored part.
def _expected(fmt, q, a):
    if fmt == "llama2":
        return BOS + "[INST] " + q + " [/INST]", a + EOS
    if fmt == "qa":
        return BOS + "Question: " + q + "\nAnswer:", " " + a + EOS
    if fmt == "raw":
        return BOS + q, a + EOS
    prompt = f"{BOS}<|system|>Date: {DATE}\n{SYSTEM}\n<|user|>{q}\n<|assistant|>"
    return prompt, a + EOS


# ------------------------------------------------------------------ prompt formats, labels


@pytest.mark.parametrize("fmt", ["chat", "llama2", "qa", "raw"])
def test_tokenize_qa_masks_prompt_and_scores_answer_plus_eos(tok, items, fmt):
    for q, a in items:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the border must be clean for every format
            ex = jd.tokenize_qa(tok, q, a, fmt, max_length=512)
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape
        scored = labels != -100
        want_prompt, want_scored = _expected(fmt, q, a)
        assert _decode(tok, ids[~scored]) == want_prompt
        assert _decode(tok, ids[scored]) == want_scored
        # scored positions are one contiguous tail, labels aligned with input_ids (HF style)
        first = int(np.argmax(scored))
        assert scored[first:].all() and not scored[:first].any()
        np.testing.assert_array_equal(labels[scored], ids[scored])
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert int(np.sum(ids == tok.eos_token_id)) == 1  # chat template's EOS is not doubled
        # the masked prefix is exactly the prompt that generation would be fed
        np.testing.assert_array_equal(ids[:first], jd.encode_prompt(tok, q, fmt))


def test_chat_format_passes_system_prompt_and_date_string(tok):
    fmt = jd.prompt_format("chat")
    assert fmt.system_prompt == SYSTEM and dict(fmt.template_kwargs) == {"date_string": DATE}
    text = _decode(tok, jd.encode_prompt(tok, "Who?", "chat"))
    assert f"Date: {DATE}\n" in text and text.endswith("<|user|>Who?\n<|assistant|>")
    no_system = jd.prompt_format("chat", system_prompt=None)
    assert (
        _decode(tok, jd.encode_prompt(tok, "Who?", no_system))
        == f"{BOS}<|user|>Who?\n<|assistant|>"
    )


def test_chat_format_without_template_names_the_tokenizer():
    bare = _make_tokenizer(chat_template=None, name="my-bare-tokenizer")
    with pytest.raises(ValueError, match="my-bare-tokenizer.*no chat template"):
        jd.tokenize_qa(bare, "q", "a", "chat", 64)
    # the templated formats do not need one
    assert jd.tokenize_qa(bare, "q", "a", "llama2", 64)["input_ids"][0] == bare.bos_token_id


def test_qa_format_ou_border_override_is_flagged(tok, items):
    q, a = items[0]
    assert a.startswith("The ")
    ou_qa = jd.prompt_format("qa", assistant_start="Answer: ", answer_prefix="")
    assert ou_qa.full_text(q, a) == jd.prompt_format("qa").full_text(q, a)  # same text
    with pytest.warns(UserWarning, match="not a prefix"):
        ex = jd.tokenize_qa(tok, q, a, ou_qa, 512)
    # the OU border hides the first answer token: fewer scored tokens than with our border
    ours = jd.tokenize_qa(tok, q, a, "qa", 512)
    assert np.sum(ex["labels"] != -100) < np.sum(ours["labels"] != -100)


def test_few_shot_prompt_text(tok):
    ex = jd.tokenize_qa(tok, "Q2?", "A2.", "qa", 128, few_shot=[("Q1?", "A1.")])
    scored = ex["labels"] != -100
    assert (
        _decode(tok, ex["input_ids"][~scored])
        == BOS + "Question: Q1?\nAnswer: A1.\n\nQuestion: Q2?\nAnswer:"
    )
    assert _decode(tok, ex["input_ids"][scored]) == " A2." + EOS


def test_truncation_keeps_eos_and_zero_target_items_are_skipped(tok, items):
    q, a = items[1]
    full = jd.tokenize_qa(tok, q, a, "llama2", 512)
    n_prompt = int(np.sum(full["labels"] == -100))
    cut = jd.tokenize_qa(tok, q, a, "llama2", n_prompt + 3)
    assert len(cut["input_ids"]) == n_prompt + 3 and cut["input_ids"][-1] == tok.eos_token_id
    np.testing.assert_array_equal(cut["input_ids"][:-1], full["input_ids"][: n_prompt + 2])
    assert np.sum(cut["labels"] != -100) == 3
    with pytest.warns(UserWarning, match="no answer token"):
        empty = jd.tokenize_qa(tok, q, a, "llama2", 4)
    assert np.all(empty["labels"] == -100)
    records = [{"question": q, "answer": a}, {"question": "Hi", "answer": "Yo"}]
    short = len(jd.tokenize_qa(tok, "Hi", "Yo", "llama2", 512)["input_ids"])
    assert short < n_prompt  # the long item's prompt alone overflows max_length=short
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        kept = jd.tokenize_records(tok, records, "llama2", max_length=short)
    assert (
        len(kept) == 1 and _decode(tok, kept[0]["input_ids"]) == BOS + "[INST] Hi [/INST]Yo" + EOS
    )


def test_tokenize_text_scores_everything_after_bos(tok):
    text = "The author's full name is Hsiao Yun-Hwa."
    ex = jd.tokenize_text(tok, text, 64)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == -100
    np.testing.assert_array_equal(ex["labels"][1:], ex["input_ids"][1:])
    assert _decode(tok, ex["input_ids"][1:]) == text
    with_eos = jd.tokenize_text(tok, text, 64, add_eos=True)
    assert _decode(tok, with_eos["input_ids"][1:]) == text + EOS
    assert len(jd.tokenize_text(tok, text, 5)["input_ids"]) == 5
    # {text} records go through tokenize_text in tokenize_records
    [rec] = jd.tokenize_records(tok, [{"text": text}], "qa", 64)
    np.testing.assert_array_equal(rec["labels"], ex["labels"])


def test_prompt_format_is_recorded_by_name_and_round_trips():
    for name in ("chat", "llama2", "qa", "raw"):
        fmt = jd.prompt_format(name)
        assert fmt.name == name
        record = json.loads(json.dumps(fmt.to_dict()))
        assert jd.prompt_format(record) == fmt
    assert jd.prompt_format("llama2").prompt_text("Q") == "[INST] Q [/INST]"
    assert jd.prompt_format("qa").full_text("Q", "A") == "Question: Q\nAnswer: A"
    assert jd.prompt_format("raw").full_text("Q", "A") == "QA"
    with pytest.raises(ValueError, match="unknown prompt format 'alpaca'"):
        jd.prompt_format("alpaca")
    with pytest.raises(ValueError, match="unknown PromptFormat field"):
        jd.prompt_format("qa", user_begin="x")


def test_chunk_text(tok):
    texts = ["First article about books.", "Second one, a little longer than the first."]
    chunks = jd.chunk_text(tok, texts, 4)
    n_ids = len(tok("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    assert len(chunks) == math.ceil(n_ids / 4)
    assert "".join(chunks) == "\n\n".join(texts)


# ------------------------------------------------------------------ padding and buckets


def _toy_examples():
    return [
        {"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]},
        {"input_ids": [1, 7, 2], "labels": [-100, 7, 2]},
        {"input_ids": [1, 8, 9, 10, 11, 2], "labels": [-100, -100, -100, 10, 11, 2]},
    ]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_to_bucket(side):
    examples = _toy_examples()
    batch = jd.pad_to_bucket(examples, (4, 8, 16), pad_id=0, side=side)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for value in batch.values():
        assert value.dtype == np.int32 and value.shape == (3, 8)  # longest is 6 -> bucket 8
    for row, ex in enumerate(examples):
        n, pad = len(ex["input_ids"]), 8 - len(ex["input_ids"])
        ids = ex["input_ids"] + [0] * pad if side == "right" else [0] * pad + ex["input_ids"]
        lab = ex["labels"] + [-100] * pad if side == "right" else [-100] * pad + ex["labels"]
        mask = [1] * n + [0] * pad if side == "right" else [0] * pad + [1] * n
        assert batch["input_ids"][row].tolist() == ids
        assert batch["labels"][row].tolist() == lab
        assert batch["attention_mask"][row].tolist() == mask
    assert jd.pad_to_bucket(examples[:2], (4, 8, 16), pad_id=0)["input_ids"].shape == (2, 4)


def test_pad_to_bucket_eos_masking_and_extras():
    eos = 2
    ex = [
        {
            "input_ids": [1, 5, eos, 6, eos],
            "labels": [-100, -100, -100, 6, eos],
            "ref_logprob": -3.5,
        }
    ]
    ex.append({"input_ids": [1, 7, eos], "labels": [-100, 7, eos], "ref_logprob": -1.0})
    ours = jd.pad_to_bucket(ex, (8,), pad_id=eos)
    ou = jd.pad_to_bucket(ex, (8,), pad_id=eos, ou_eos_masking=True)
    assert ours["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    # OU: every EOS, in-sequence ones included, is hidden from attention
    assert ou["attention_mask"].tolist() == [[1, 1, 0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    np.testing.assert_array_equal(ours["input_ids"], ou["input_ids"])
    assert ours["ref_logprob"].dtype == np.float32 and ours["ref_logprob"].tolist() == [-3.5, -1.0]


def test_pad_to_bucket_errors():
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        jd.pad_to_bucket(_toy_examples(), (4,), pad_id=0)
    with pytest.raises(ValueError, match="side"):
        jd.pad_to_bucket(_toy_examples(), pad_id=0, side="middle")
    with pytest.raises(ValueError, match="increasing"):
        jd.pad_to_bucket(_toy_examples(), (16, 8), pad_id=0)
    with pytest.raises(ValueError, match="labels have 2 positions"):
        jd.pad_to_bucket([{"input_ids": [1, 2, 3], "labels": [1, 2]}], pad_id=0)
    assert jd.bucket_length(64) == 64 and jd.bucket_length(65) == 128


# ------------------------------------------------------------------ forget/retain sampling


def _fake_examples(n, offset):
    # example i has token ids that identify it, so batches can be mapped back to items
    return [{"input_ids": [1, offset + i, 2], "labels": [-100, offset + i, 2]} for i in range(n)]


def _ids(seq_batch):
    return seq_batch["input_ids"][:, 1].tolist()


def test_batch_at_is_a_pure_function_of_seed_and_step():
    forget, retain = _fake_examples(10, 100), _fake_examples(50, 1000)
    kw = dict(batch_size=4, seed=7, buckets=(8,))
    a = jd.ForgetRetainSampler(forget, retain, **kw)
    in_order = [a.batch_at(s) for s in range(12)]
    b = jd.ForgetRetainSampler(forget, retain, **kw)
    backwards = {s: b.batch_at(s) for s in reversed(range(12))}
    for s in range(12):
        for part in ("forget", "retain"):
            for key in ("input_ids", "attention_mask", "labels"):
                np.testing.assert_array_equal(in_order[s][part][key], backwards[s][part][key])
    # resuming at step 5 (the data cursor is the step) gives the same stream
    resumed = list(jd.forget_retain_batches(forget, retain, start_step=5, num_steps=3, **kw))
    for s, batch in zip(range(5, 8), resumed):
        assert _ids(batch["forget"]) == _ids(in_order[s]["forget"])
        assert _ids(batch["retain"]) == _ids(in_order[s]["retain"])
    # another seed gives another order and other retain draws
    c = jd.ForgetRetainSampler(forget, retain, batch_size=4, seed=8, buckets=(8,))
    assert [_ids(c.batch_at(s)["forget"]) for s in range(3)] != [
        _ids(in_order[s]["forget"]) for s in range(3)
    ]
    assert [_ids(c.batch_at(s)["retain"]) for s in range(3)] != [
        _ids(in_order[s]["retain"]) for s in range(3)
    ]


def test_forget_epochs_are_permutations_and_retain_depends_on_step_only():
    forget, retain = _fake_examples(10, 100), _fake_examples(50, 1000)
    sampler = jd.ForgetRetainSampler(forget, retain, batch_size=4, seed=3)
    assert sampler.steps_per_epoch == 3  # 4 + 4 + 2, as a DataLoader with drop_last=False
    for epoch in range(3):
        seen = [i for s in range(3 * epoch, 3 * epoch + 3) for i in sampler.indices_at(s).forget]
        assert sorted(seen) == list(range(10))
        assert len(sampler.indices_at(3 * epoch + 2).forget) == 2
    orders = [tuple(sampler.indices_at(3 * e).forget) for e in range(3)]
    assert len(set(orders)) == 3  # a fresh permutation each epoch
    # retain draws depend on (seed, step) only: a different forget set does not change them
    other = jd.ForgetRetainSampler(_fake_examples(40, 500), retain, batch_size=4, seed=3)
    for s in (0, 1, 3, 4):  # steps where both forget batches are full
        np.testing.assert_array_equal(other.indices_at(s).retain, sampler.indices_at(s).retain)
    for s in range(6):
        idx = sampler.indices_at(s)
        assert len(idx.retain) == len(idx.forget) and np.all(idx.retain < 50)
    full = jd.ForgetRetainSampler(forget, retain, batch_size=4, seed=3, drop_last=True)
    assert full.steps_per_epoch == 2
    assert all(len(full.indices_at(s).forget) == 4 for s in range(10))
    forget_only = jd.ForgetRetainSampler(forget, None, batch_size=4, seed=3, buckets=(8,))
    assert set(forget_only.batch_at(0)) == {"forget"}


def test_idk_alternates_pair_each_forget_question_with_a_refusal(tok, items):
    refusals = jd.load_idk()
    forget = [jd.tokenize_qa(tok, q, a, "qa", 256) for q, a in items]
    alternates = jd.idk_alternates(tok, [q for q, _ in items], "qa", 256)
    kw = dict(batch_size=3, seed=11, alternates=alternates, buckets=(64, 128, 256))
    sampler = jd.ForgetRetainSampler(forget, forget, **kw)
    batch = sampler.batch_at(4)
    assert set(batch) == {"forget", "alternate", "retain"}
    idx = sampler.indices_at(4)
    for row, item in enumerate(idx.forget.tolist()):
        alt = batch["alternate"]
        real = alt["attention_mask"][row] == 1
        scored = alt["labels"][row] != -100
        q = items[item][0]
        assert (
            _decode(tok, alt["input_ids"][row][real & ~scored])
            == BOS + "Question: " + q + "\nAnswer:"
        )
        assert (
            _decode(tok, alt["input_ids"][row][scored]) == " " + refusals[idx.alternate[row]] + EOS
        )
    # the refusal choice is a function of (seed, step, item): a new sampler agrees
    again = jd.ForgetRetainSampler(forget, forget, **kw)
    np.testing.assert_array_equal(again.indices_at(4).alternate, idx.alternate)
    choices = {tuple(sampler.indices_at(s).alternate) for s in range(8)}
    assert len(choices) > 1
    with pytest.raises(ValueError, match="alternates cover 2 items"):
        jd.ForgetRetainSampler(forget, None, batch_size=2, seed=0, alternates=[[forget[0]]] * 2)


def test_sampler_errors_and_overlap():
    with pytest.raises(ValueError, match="forget set is empty"):
        jd.ForgetRetainSampler([], _fake_examples(3, 0), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="forget set is empty"):
        jd.forget_retain_batches([], None, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="retain set is empty"):
        jd.ForgetRetainSampler(_fake_examples(3, 0), [], batch_size=2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        jd.ForgetRetainSampler(_fake_examples(3, 0), None, batch_size=2, seed=-1)
    with pytest.raises(ValueError, match="batch_size"):
        jd.ForgetRetainSampler(_fake_examples(3, 0), None, batch_size=0, seed=0)
    forget10, retain90, full = (jd.load_tofu(s) for s in ("forget10", "retain90", "full"))
    assert jd.check_overlap(list(forget10), list(retain90)) == 0
    assert jd.check_overlap(list(forget10), list(full)) == 400
    toks = _fake_examples(5, 0)
    assert jd.check_overlap(toks, toks[3:] + _fake_examples(2, 50)) == 2


# ------------------------------------------------------------------ TOFU / MUSE / files


TOFU_ROWS = {
    "full": 4000, "forget01": 40, "forget05": 200, "forget10": 400, "retain99": 3960,
    "retain95": 3800, "retain90": 3600, "holdout01": 40, "holdout05": 200, "holdout10": 400,
    "forget01_perturbed": 40, "forget05_perturbed": 200, "forget10_perturbed": 400,
    "retain_perturbed": 400, "real_authors_perturbed": 100, "world_facts_perturbed": 117,
    "real_authors": 100, "world_facts": 117,
}  # fmt: skip


def test_every_tofu_split_loads_with_its_rows_and_fields():
    assert set(TOFU_ROWS) == set(jd.TOFU_SPLITS)
    loaded = {split: jd.load_tofu(split) for split in TOFU_ROWS}
    for split, rows in TOFU_ROWS.items():
        assert len(loaded[split]) == rows, split
    pert = loaded["forget10_perturbed"]
    assert set(pert.column_names) == {
        "question",
        "answer",
        "paraphrased_answer",
        "perturbed_answer",
        "paraphrased_question",
    }
    assert all(len(p) == 5 for p in pert["perturbed_answer"])
    assert pert["question"] == loaded["forget10"]["question"]
    assert pert["answer"] == loaded["forget10"]["answer"]
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        assert set(loaded[split].column_names) == {"question", "answer", "perturbed_answer"}
        assert all(len(p) == 3 for p in loaded[split]["perturbed_answer"])
    # splits are contiguous parts of `full` (data README)
    full = loaded["full"]["question"]
    assert loaded["retain90"]["question"] == full[:3600]
    assert loaded["forget10"]["question"] == full[3600:]
    assert loaded["retain_perturbed"]["question"] == full[:400]
    assert loaded["holdout10"]["question"][:40] == loaded["holdout01"]["question"]
    assert not set(loaded["holdout10"]["question"]) & set(full)
    mc = jd.load_multiple_choice(list(loaded["real_authors"]))
    for row, item in zip(loaded["real_authors"], mc):
        assert item["choices"] == [row[f"option{i}"] for i in range(1, 5)]
        assert item["choices"][item["answer"]] == row["answer"]
    idk = jd.load_idk()
    assert len(idk) == 100 and idk[0] == "I'm not certain about that."


def test_tofu_split_maps():
    assert jd.tofu_retain_split("forget10") == "retain90"
    assert jd.tofu_retain_split("forget01") == "retain99"
    assert jd.tofu_retain_split("forget05_perturbed") == "retain95"
    assert jd.tofu_holdout_split("forget05") == "holdout05"
    assert jd.tofu_perturbed_split("forget01") == "forget01_perturbed"
    with pytest.raises(ValueError, match="not a TOFU forget split"):
        jd.tofu_retain_split("retain90")
    with pytest.raises(ValueError, match="unknown TOFU split 'forget20'"):
        jd.load_tofu("forget20")


@pytest.mark.skipif(not MUSE_DIR.is_dir(), reason="shared MUSE-News copy not on this machine")
def test_muse_loading():
    expected = {
        ("knowmem", "forget_qa"): 100, ("knowmem", "retain_qa"): 100,
        ("knowmem", "forget_qa_icl"): 10, ("knowmem", "retain_qa_icl"): 10,
        ("verbmem", "forget"): 100, ("privleak", "forget"): 100, ("privleak", "retain"): 100,
        ("privleak", "holdout"): 100, ("raw", "forget"): 889,
    }  # fmt: skip
    for (config, split), rows in expected.items():
        ds = jd.load_muse(MUSE_DIR, config, split)
        assert len(ds) == rows
        assert set(ds.column_names) == set(jd.MUSE_CONFIGS[config])
    with pytest.raises(FileNotFoundError, match="retain1.*splits there: \\['forget'\\]"):
        jd.load_muse(MUSE_DIR, "raw", "retain1")
    with pytest.raises(ValueError, match="unknown MUSE config 'kmem'"):
        jd.load_muse(MUSE_DIR, "kmem", "forget_qa")


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bad_tofu_and_muse_files_name_split_file_line_and_field(tmp_path):
    good = '{"question": "q1", "answer": "a1"}\n'
    _write(tmp_path / "forget10.json", good + '{"question": "q2"}\n')
    with pytest.raises(
        ValueError, match=r"TOFU split 'forget10'.*forget10\.json.*line 2.*missing field 'answer'"
    ):
        jd.load_tofu("forget10", data_dir=tmp_path)
    _write(tmp_path / "retain90.json", good + good + '{"question": "q3", answer: 1}\n')
    with pytest.raises(ValueError, match=r"retain90\.json, line 3: unreadable JSON"):
        jd.load_tofu("retain90", data_dir=tmp_path)
    _write(tmp_path / "holdout10.json", "\n")
    with pytest.raises(ValueError, match=r"TOFU split 'holdout10'.*empty"):
        jd.load_tofu("holdout10", data_dir=tmp_path)
    _write(tmp_path / "forget01_perturbed.json", good)
    with pytest.raises(ValueError, match=r"forget01_perturbed.*missing field 'paraphrased_answer'"):
        jd.load_tofu("forget01_perturbed", data_dir=tmp_path)
    _write(tmp_path / "forget05.json", '{"question": "q", "answer": 5}\n')
    with pytest.raises(ValueError, match=r"line 1: field 'answer' must be a string"):
        jd.load_tofu("forget05", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no file full.json"):
        jd.load_tofu("full", data_dir=tmp_path)
    _write(tmp_path / "verbmem" / "forget.json", '{"prompt": "p", "gt": "g"}\n{"prompt": "p"}\n')
    with pytest.raises(
        ValueError, match=r"MUSE verbmem split 'forget'.*line 2: missing field 'gt'"
    ):
        jd.load_muse(tmp_path, "verbmem", "forget")
    # a custom split name is fine in a user's folder
    _write(tmp_path / "my_forget.json", good)
    assert len(jd.load_tofu("my_forget", data_dir=tmp_path)) == 1


def test_read_jsonl_records(tmp_path):
    qa = _write(
        tmp_path / "qa.jsonl",
        '{"question": "q", "answer": "a", "id": 3}\n\n{"question": "q2", "answer": "a2"}\n',
    )
    assert jd.read_jsonl_records(qa) == [
        {"question": "q", "answer": "a", "id": 3},
        {"question": "q2", "answer": "a2"},
    ]
    text = _write(tmp_path / "text.jsonl", '{"text": "hello"}\n{"text": "world"}\n')
    assert [r["text"] for r in jd.read_jsonl_records(text)] == ["hello", "world"]
    arr = _write(
        tmp_path / "arr.json",
        '[{"question": "q", "answer": "a"},\n {"question": "r", "answer": "b"}]',
    )
    assert len(jd.read_jsonl_records(arr)) == 2
    bad = _write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: unreadable JSON line"):
        jd.read_jsonl_records(bad)
    missing = _write(
        tmp_path / "missing.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q"}\n'
    )
    with pytest.raises(ValueError, match=r"missing\.jsonl, line 2: missing field 'answer'"):
        jd.read_jsonl_records(missing)
    empty = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file is empty"):
        jd.read_jsonl_records(empty)
    odd = _write(tmp_path / "odd.jsonl", '{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"odd\.jsonl, line 1: expected records with fields"):
        jd.read_jsonl_records(odd)
    bad_arr = _write(tmp_path / "bad_arr.json", '[{"text": "a"},\n {"text": }]')
    with pytest.raises(ValueError, match=r"bad_arr\.json, line 2: unreadable JSON array"):
        jd.read_jsonl_records(bad_arr)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        jd.read_jsonl_records(tmp_path / "nope.jsonl")


def test_load_multiple_choice_forms(tmp_path):
    rows = [
        {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"},
        {"question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": "B"},
    ]
    path = _write(tmp_path / "mc.jsonl", "\n".join(json.dumps(r) for r in rows))
    for source in (path, rows):
        items = jd.load_multiple_choice(source)
        assert [it["answer"] for it in items] == [1, 1]
        assert items[0]["subject"] == "math" and items[1]["choices"] == ["Rome", "Paris"]
    with pytest.raises(ValueError, match=r"rows, item 0: answer 7 is out of range"):
        jd.load_multiple_choice([{"question": "q", "choices": ["a", "b"], "answer": 7}])
    with pytest.raises(ValueError, match=r"item 0: missing field 'choices'"):
        jd.load_multiple_choice([{"question": "q", "answer": 0}])
    with pytest.raises(ValueError, match="no multiple-choice items"):
        jd.load_multiple_choice([])


# ----------------------------------------------------------------------------- your own data


@pytest.fixture(scope="module")
def records():
    rows = _tofu_lines("forget10")
    return [{"question": r["question"], "answer": r["answer"]} for r in rows[:12]]


def test_forget_retain_takes_records_files_and_datasets_alike(tok, records, tmp_path):
    import datasets

    items = records
    forget, retain = items[:5], items[5:12]
    path = tmp_path / "forget.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in forget), encoding="utf-8")
    kw = dict(fmt="qa", max_length=96, batch_size=2, seed=3)
    from_records = jd.forget_retain(tok, forget, retain, **kw)
    from_file = jd.forget_retain(tok, str(path), datasets.Dataset.from_list(retain), **kw)
    assert from_records.fingerprint() == from_file.fingerprint()
    for step in range(4):
        a, b = from_records.batch_at(step), from_file.batch_at(step)
        for part in ("forget", "retain"):
            np.testing.assert_array_equal(a[part]["input_ids"], b[part]["input_ids"])
    # the examples are the data layer's own tokenisation of each record
    expected = jd.tokenize_qa(tok, forget[0]["question"], forget[0]["answer"], "qa", 96)
    np.testing.assert_array_equal(from_records.forget[0]["input_ids"], expected["input_ids"])
    assert from_records.prompt_format == "qa"
    assert jd.forget_retain(tok, forget, **kw).retain is None


def test_forget_retain_buckets_refusals_and_auto_format(tok, records):
    items = records
    forget = items[:4]
    one = jd.forget_retain(tok, forget, items[4:8], fmt="qa", buckets="longest", batch_size=2)
    longest = max(len(e["input_ids"]) for e in [*one.forget, *one.retain])
    (bucket,) = one._pad["buckets"]
    assert bucket % 16 == 0 and longest <= bucket < longest + 16
    assert jd.forget_retain(tok, forget, fmt="qa", max_length=100)._pad["buckets"] == (
        16, 32, 64, 100,
    )  # fmt: skip
    idk = jd.forget_retain(tok, forget, fmt="qa", refusals=["I don't know.", "No idea."])
    batch = idk.batch_at(0)
    assert set(batch) == {"forget", "alternate"}
    text = _decode(tok, batch["alternate"]["input_ids"][0])
    assert "I don't know." in text or "No idea." in text
    assert jd.forget_retain(tok, forget).prompt_format == "chat"  # tok has a chat template


def test_forget_retain_bad_input_is_named(tok, records, tmp_path):
    items = records
    with pytest.raises(ValueError, match="forget: no records"):
        jd.forget_retain(tok, [], fmt="qa")
    with pytest.raises(TypeError, match="forget: expected a JSON Lines path"):
        jd.forget_retain(tok, 42, fmt="qa")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        jd.forget_retain(tok, str(tmp_path / "missing.jsonl"), fmt="qa")
    with pytest.raises(ValueError, match="question/answer records, not text"):
        jd.forget_retain(tok, [{"text": "some text"}], fmt="qa", refusals=True)
    with pytest.warns(UserWarning, match="2 of 3 forget items also appear in the retain set"):
        jd.forget_retain(tok, items[:3], items[1:6], fmt="qa")
