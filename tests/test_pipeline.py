"""Tests of the TOFU benchmark pipeline: tokenizer, from-scratch fine-tuning, presets,
leaderboard and plot, sweeps, and the `tiny` preset end to end (with cache reuse)."""

import json
import math

import numpy as np
import pytest

from jaxunlearn.data import load_tofu
from jaxunlearn.pipeline import presets as P

# ----------------------------------------------------------------------------- tokenizer

TEXTS = [
    "What is the full name of the author born in Taipei?",
    "The author's full name is Hsiao Yun-Hwa.",
    "Hsiao Yun-Hwa is part of the LGBTQ+ community.",
    "I'm not sure I can answer that.",
] * 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from jaxunlearn.pipeline.tokenizer import save_tokenizer, train_bpe_tokenizer

    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    folder = save_tokenizer(tok, tmp_path_factory.mktemp("tok"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_tokenizer_special_tokens_and_round_trip(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) <= 300
    ids = tokenizer("Hsiao Yun-Hwa wrote it.")["input_ids"]
    assert ids[0] == 1 and 2 not in ids  # BOS in front; EOS is the data layer's job
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hsiao Yun-Hwa wrote it."
    # Byte-level: text it never saw (and non-ASCII) still encodes and decodes exactly.
    novel = "Zoë's 1984 café — unseen"
    assert tokenizer.decode(tokenizer(novel)["input_ids"], skip_special_tokens=True) == novel


def test_qa_format_labels_only_the_answer_and_eos(tokenizer):
    from jaxunlearn.data import tokenize_qa

    ex = tokenize_qa(tokenizer, "Who is it?", "Hsiao Yun-Hwa.", "qa", 64)
    prompt = tokenizer("Question: Who is it?\nAnswer:")["input_ids"]
    full = tokenizer("Question: Who is it?\nAnswer: Hsiao Yun-Hwa.")["input_ids"]
    # The prompt's tokens are a prefix of the full text's: the label mask is exact.
    assert full[: len(prompt)] == prompt
    assert ex["input_ids"].tolist() == full + [2]
    scored = ex["labels"] != -100
    assert scored.tolist() == [False] * len(prompt) + [True] * (len(full) - len(prompt) + 1)
    answer = tokenizer.decode(ex["input_ids"][scored][:-1])
    assert answer == " Hsiao Yun-Hwa."


def test_tokenizer_rejects_bad_vocab():
    from jaxunlearn.pipeline.tokenizer import train_bpe_tokenizer

    with pytest.raises(ValueError, match="byte tokens"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="no text"):
        train_bpe_tokenizer([], vocab_size=300)


# ----------------------------------------------------------------------------- fine-tuning


def _tiny_config(tokenizer, hidden=32):
    from jaxunlearn.models import ModelConfig

    return ModelConfig(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=hidden // 2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def test_answer_nll_matches_a_plain_numpy_cross_entropy(tokenizer):
    import jax.numpy as jnp
    from flax import nnx

    from jaxunlearn.data import pad_to_bucket, tokenize_qa
    from jaxunlearn.models import build_model
    from jaxunlearn.pipeline.finetune import answer_nll

    model = build_model(_tiny_config(tokenizer), rngs=nnx.Rngs(3))
    examples = [tokenize_qa(tokenizer, q, a, "qa", 48) for q, a in zip(TEXTS[:3], TEXTS[1:4])]
    batch = pad_to_bucket(examples, (48,), pad_id=0)
    loss = float(
        answer_nll(lambda **kw: model(**kw), {k: jnp.asarray(v) for k, v in batch.items()})
    )
    logits = np.asarray(
        model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])).logits,
        np.float64,
    )
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            label = batch["labels"][b, t]
            if label != -100:  # logits at t - 1 predict the token at t
                nll -= logp[b, t - 1, label]
                count += 1
    np.testing.assert_allclose(loss, nll / count, rtol=1e-5)


def test_epoch_batches_cover_every_item_with_fixed_shapes():
    from jaxunlearn.pipeline.finetune import FinetuneRecipe, epoch_batches, steps_per_epoch

    lengths = [10, 40, 12, 33, 8, 64, 30, 31, 9, 50, 11]
    recipe = FinetuneRecipe(batch_size=3, buckets=(16, 32, 64), seed=4)
    batches = epoch_batches(lengths, recipe, epoch=0)
    assert len(batches) == steps_per_epoch(lengths, recipe)
    seen = set()
    for bucket, rows in batches:
        assert len(rows) == 3
        assert all(lengths[i] <= bucket for i in rows.tolist())
        seen.update(rows.tolist())
    assert seen == set(range(len(lengths)))
    again = epoch_batches(lengths, recipe, epoch=0)
    assert [(b, r.tolist()) for b, r in batches] == [(b, r.tolist()) for b, r in again]
    assert [r.tolist() for _, r in epoch_batches(lengths, recipe, 1)] != [
        r.tolist() for _, r in batches
    ]
    tokens = FinetuneRecipe(batch_tokens=64, buckets=(16, 32, 64))
    sizes = {b: len(r) for b, r in epoch_batches(lengths, tokens, 0)}
    assert sizes == {16: 4, 32: 2, 64: 1}


def test_finetune_learns_and_schedule_is_adamw_shape(tokenizer):
    import optax

    from jaxunlearn.data import tokenize_qa
    from jaxunlearn.pipeline.finetune import FinetuneRecipe, finetune, training_schedule

    examples = [tokenize_qa(tokenizer, "Who?", a, "qa", 32) for a in TEXTS[1:3]]
    recipe = FinetuneRecipe(epochs=30, batch_size=2, learning_rate=1e-2, buckets=(32,))
    cfg = _tiny_config(tokenizer)
    model, history = finetune(cfg, examples, recipe, progress=False)
    assert len(history) == 30 and history[-1] < 0.5 * history[0]
    # Same recipe, same data: same weights (the init is seeded by the recipe).
    _, again = finetune(cfg, examples, recipe, progress=False)
    np.testing.assert_allclose(history, again, rtol=1e-5)
    schedule = training_schedule(recipe, 30)
    expected = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 30, 1e-2 * 0.05)
    np.testing.assert_allclose([schedule(i) for i in range(30)], [expected(i) for i in range(30)])
    with pytest.raises(ValueError, match="learning_rate"):
        FinetuneRecipe(learning_rate=0.0)


# ----------------------------------------------------------------------------- presets


def _questions(rows):
    return [r["question"] for r in rows]


def test_small_preset_authors_match_the_tofu_files():
    from jaxunlearn.pipeline.tofu import load_tofu_data

    preset = P.get_preset("small")
    data = load_tofu_data(preset)
    forget10 = load_tofu("forget10").to_list()
    n_forget = 20 * preset.forget_authors
    assert _questions(data.forget["forget10"]) == _questions(forget10[:n_forget])
    retain_rows = load_tofu("retain_perturbed").to_list()[: 20 * preset.retain_authors]
    realworld = [
        r
        for name in ("real_authors", "world_facts")
        for r in load_tofu(name).to_list()[: preset.realworld_train_items]
    ]
    assert _questions(data.retain["forget10"]) == _questions(retain_rows + realworld)
    assert data.retain["forget10"] == data.oracle_train["forget10"]
    forget_q = set(_questions(data.forget["forget10"]))
    oracle_q = set(_questions(data.oracle_train["forget10"]))
    target_q = set(_questions(data.target_train))
    assert not forget_q & oracle_q and forget_q <= target_q
    assert target_q - forget_q == oracle_q
    rows = data.eval_rows["forget10"]
    assert _questions(rows["forget10_perturbed"]) == _questions(forget10[:n_forget])
    assert len(rows["holdout10"]) == n_forget
    assert not set(_questions(rows["holdout10"])) & target_q  # MIA non-members: never trained
    assert set(_questions(rows["retain_perturbed"])) <= oracle_q  # utility on trained authors
    assert set(_questions(rows["real_authors_perturbed"])) <= oracle_q


def test_full_preset_oracles_are_the_tofu_retain_splits():
    preset = P.get_preset("full")
    assert P.target_author_ids(preset) == list(range(200))
    full = load_tofu("full").to_list()
    for split, retain in (
        ("forget01", "retain99"),
        ("forget05", "retain95"),
        ("forget10", "retain90"),
    ):
        rows = [r for a in P.retain_author_ids(preset, split) for r in full[20 * a : 20 * a + 20]]
        assert _questions(rows) == _questions(load_tofu(retain).to_list())
        rows = [r for a in P.forget_author_ids(preset, split) for r in full[20 * a : 20 * a + 20]]
        assert _questions(rows) == _questions(load_tofu(split).to_list())


def test_preset_validation():
    with pytest.raises(ValueError, match="retain_authors"):
        P.TofuPreset(name="x", description="", retain_authors=190)
    with pytest.raises(ValueError, match="one forget split"):
        P.TofuPreset(
            name="x", description="", forget_splits=("forget01", "forget05"), forget_authors=1
        )
    with pytest.raises(ValueError, match="forget split"):
        P.TofuPreset(name="x", description="", forget_splits=("forget20",))
    with pytest.raises(ValueError, match="unknown TOFU preset"):
        P.get_preset("huge")


# ----------------------------------------------------------------------------- sweeps


def test_parse_grid_and_points():
    from jaxunlearn.pipeline.sweep import grid_points, parse_grid, setting_label, split_point

    grid = parse_grid(["beta=0.05,0.1,0.5", "lr=1e-5,5e-5", "retain_loss=nll"])
    assert grid == {"beta": [0.05, 0.1, 0.5], "lr": [1e-5, 5e-5], "retain_loss": ["nll"]}
    points = grid_points(grid)
    assert len(points) == 6 and points[0] == {"beta": 0.05, "lr": 1e-5, "retain_loss": "nll"}
    assert setting_label(points[1]) == 'beta=0.05,lr=5e-05,retain_loss="nll"'
    assert split_point(points[1]) == ({"learning_rate": 5e-5}, {"beta": 0.05, "retain_loss": "nll"})
    for bad in (["beta"], ["=1"], ["beta="], ["beta=1", "beta=2"]):
        with pytest.raises(ValueError):
            parse_grid(bad)


def test_sweep_rejects_unknown_hyperparameter(tmp_path):
    from jaxunlearn import cli

    code = cli.main(
        [
            "sweep",
            "--method",
            "npo",
            "--grid",
            "betta=0.1",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path),
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert code == 2


# ----------------------------------------------------------------------------- leaderboard


def _rows():
    from jaxunlearn.pipeline.leaderboard import row_from_summary

    base = {
        "model_utility": 0.5,
        "forget_truth_ratio": 0.6,
        "forget_Q_A_Prob": 0.9,
        "forget_Q_A_ROUGE": 0.8,
        "privleak": -50.0,
        "mia_min_k": 0.9,
        "mia_loss": 0.95,
    }
    return [
        row_from_summary("target", "forget10", "target", {**base, "forget_quality": 1e-12}),
        row_from_summary("oracle", "forget10", "oracle", {**base, "forget_quality": 1.0}),
        row_from_summary(
            "npo",
            "forget10",
            "unlearned",
            {**base, "forget_quality": 0.2},
            hyperparameters={"beta": 0.1},
            unlearn_seconds=3.5,
        ),
        row_from_summary(
            "gradascent",
            "forget10",
            "unlearned",
            {**base, "forget_quality": 0.0, "model_utility": 0.0},
        ),
    ]


def test_leaderboard_files_and_plot(tmp_path):
    import matplotlib.image

    from jaxunlearn.pipeline.leaderboard import load_leaderboard, write_leaderboard

    rows = _rows()
    paths = write_leaderboard(rows, tmp_path, notes=["preset `x`"], metadata={"a": 1})
    text = paths["markdown"].read_text()
    assert "| **target** | 1.00e-12 | 0.500 |" in text
    assert "| npo | 0.2 | 0.500 |" in text and "beta=0.1" in text and "| 3.5 |" in text
    assert text.index("**target**") < text.index("**oracle**") < text.index("| npo")
    back = load_leaderboard(paths["json"])
    assert [r.method for r in back] == [r.method for r in rows]
    assert back[2].metrics["forget_quality"] == 0.2 and back[2].hyperparameters == {"beta": 0.1}
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(paths["plot"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# ----------------------------------------------------------------------------- end to end


def _run_tiny(out_dir, cache_dir, methods=None):
    import jax

    from jaxunlearn.pipeline import run_tofu

    # The tiny run is dominated by XLA compiling ~20 small programs (one step per method, the
    # evaluation); skipping most optimisations compiles them faster. Numbers are checked for
    # consistency with the logs, not against fixed values, so this changes no assertion.
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        return run_tofu(
            "tiny",
            out_dir=out_dir,
            cache_dir=cache_dir,
            methods=methods,
            progress=False,
            log=lambda _: None,
        )
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, _run_tiny(root / "out", root / "cache")


def _eval(row):
    with open(row.eval_path) as f:
        return json.load(f)


def _truth_ratios(logs):
    values = logs["forget_truth_ratio"]["value_by_index"]
    return np.array([values[k]["score"] for k in sorted(values, key=int)])


def test_tiny_end_to_end_leaderboard(tiny_run):
    from scipy.stats import hmean, ks_2samp

    from jaxunlearn.eval.metrics import MODEL_UTILITY_KEYS

    root, run = tiny_run
    assert set(run.models.trained) == {"tokenizer", "target", "oracle-forget10"}
    methods = [r.method for r in run.rows]
    assert methods == ["target", "oracle", *P.ALL_METHODS]
    oracle, target = run.row("oracle"), run.row("target")
    assert oracle.metrics["forget_quality"] == 1.0
    oracle_tr = _truth_ratios(_eval(oracle))
    for row in run.rows:
        logs = _eval(row)
        assert logs["_jaxunlearn"]["prompt_format"] == "qa"
        # Forget quality: the KS p-value against the oracle's per-item truth ratios.
        expected = ks_2samp(_truth_ratios(logs), oracle_tr).pvalue
        assert math.isclose(row.metrics["forget_quality"], expected, rel_tol=1e-9)
        mu = hmean([logs[k]["agg_value"] for k in MODEL_UTILITY_KEYS])
        assert math.isclose(row.metrics["model_utility"], mu, rel_tol=1e-9, abs_tol=1e-12)
        for column in (
            "forget_truth_ratio",
            "forget_prob",
            "forget_rouge",
            "privleak",
            "mia_min_k_auc",
            "mia_loss_auc",
        ):
            assert row.metrics[column] is not None, (row.method, column)
        if row.kind == "unlearned":
            assert row.unlearn_seconds > 0 and row.eval_seconds > 0
    assert run.row("ssd").steps is None and run.row("npo").steps == 2  # 1 epoch of 20 / 10
    assert run.row("npo").hyperparameters["learning_rate"] == 1e-3
    assert oracle.metrics["privleak"] == 0.0  # against its own Min-K AUC
    assert target.metrics["forget_quality"] < 1.0


def test_tiny_outputs_exist(tiny_run):
    import matplotlib.image

    root, run = tiny_run
    out = root / "out"
    for name in ("leaderboard.md", "leaderboard.json", "fq_vs_mu.png", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "fq_vs_mu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out / "fq_vs_mu.png").shape[-1] in (3, 4)
    record = json.loads((out / "leaderboard.json").read_text())
    assert len(record["rows"]) == 2 + len(P.ALL_METHODS)
    for method in ("target", "oracle", *P.ALL_METHODS):
        assert (out / "evals" / "forget10" / method / "TOFU_EVAL.json").is_file(), method
        assert f"| {method} |" in (out / "leaderboard.md").read_text() or method in (
            "target",
            "oracle",
        )
    cache = run.models.cache_dir
    for folder in ("tokenizer", "target", "oracle-forget10"):
        assert (cache / folder).is_dir()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cache / "target"))
    assert len(tok) == json.loads((cache / "target" / "config.json").read_text())["vocab_size"]


def test_tiny_second_call_reuses_the_cache(tiny_run):
    from jaxunlearn.pipeline import run_tofu

    root, first = tiny_run
    cache = first.models.cache_dir
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    evals = {p: p.stat().st_mtime_ns for p in cache.rglob("TOFU_EVAL.json")}
    assert len(stamps) == 2 and len(evals) == 2
    second = run_tofu(
        "tiny",
        out_dir=root / "out2",
        cache_dir=root / "cache",
        progress=False,
        methods=[],
        log=lambda _: None,
    )
    assert second.models.trained == [] and second.models.cache_dir == cache
    # Neither the models nor their evaluations were redone.
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == stamps
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("TOFU_EVAL.json")} == evals
    for name in ("target", "oracle"):
        assert second.row(name).metrics == first.row(name).metrics
    assert [r.method for r in second.rows] == ["target", "oracle"]
    assert (root / "out2" / "leaderboard.md").is_file()


def test_tiny_leaderboard_is_reproduced_exactly_from_scratch(tiny_run, tmp_path):
    # Same machine, same device count: a second run with an empty model cache retrains the
    # tokenizer, target and oracle and unlearns again; every number must come out identical.
    root, first = tiny_run
    methods = ["graddiff", "npo", "gu_npo", "ssd"]
    second = _run_tiny(tmp_path / "out", tmp_path / "cache", methods)
    assert second.models.trained == ["tokenizer", "target", "oracle-forget10"]
    for name in ("target", "oracle", *methods):
        assert second.row(name).metrics == first.row(name).metrics, name
        assert second.row(name).hyperparameters == first.row(name).hyperparameters, name


def test_tiny_robustness_columns_come_from_the_audit(tiny_run, tmp_path):
    # `--robustness`: the leaderboard carries the audit's columns (audit.robustness_summary,
    # tested in tests/test_audit_suite.py) for each unlearned model, without changing the rest.
    from jaxunlearn.pipeline.tofu import TofuBenchmark

    root, first = tiny_run
    bench = TofuBenchmark(
        "tiny", out_dir=tmp_path / "out", progress=False, log=lambda _: None,
        models=first.models, robustness=True,
    )  # fmt: skip
    row = bench.run("gradascent")
    for column in ("fq_relearn50", "fq_quant4", "probe_best_accuracy", "trace_accuracy"):
        value = row.metrics[column]
        assert value is not None and 0.0 <= value <= 1.0, (column, value)
    assert row.metrics["forget_quality"] == first.row("gradascent").metrics["forget_quality"]
    paths = bench.write_leaderboard()
    markdown = paths["markdown"].read_text()
    assert "| FQ relearn 50 | FQ 4-bit | probe acc | trace acc |" in markdown
    assert "Robustness (`--robustness`)" in markdown
    record = json.loads(paths["json"].read_text())
    saved = next(r for r in record["rows"] if r["method"] == "gradascent")
    assert saved["metrics"]["fq_quant4"] == row.metrics["fq_quant4"]
