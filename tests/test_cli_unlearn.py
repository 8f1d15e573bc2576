"""End-to-end tests of ``jaxunlearn unlearn`` on a tiny random llama saved by transformers.

The model (vocab 128, hidden 32, 2 layers) and a WordLevel tokenizer trained on a handful
of TOFU rows are built in the test; the output directory must load in
`transformers.AutoModelForCausalLM` with the same logits as the unlearned JAX model.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxunlearn import cli
from jaxunlearn.data import TOFU_DIR

FORGET_ROWS = [json.loads(x) for x in (TOFU_DIR / "forget01.json").read_text().splitlines()[:4]]
RETAIN_ROWS = [json.loads(x) for x in (TOFU_DIR / "retain99.json").read_text().splitlines()[:6]]
REFUSALS = (TOFU_DIR / "idontknow.jsonl").read_text().splitlines()[:5]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]
    )
    texts = [r["question"] + " " + r["answer"] for r in FORGET_ROWS + RETAIN_ROWS] + REFUSALS
    tok.train_from_iterator(texts + ["Question : Answer :"], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def save_tiny_llama(directory, tokenizer, *, nan=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if nan:
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_tokenizer()
    assert len(tokenizer) <= 128
    return {
        "root": root,
        "model": str(save_tiny_llama(root / "model", tokenizer)),
        "forget": write_jsonl(root / "forget.jsonl", FORGET_ROWS),
        "retain": write_jsonl(root / "retain.jsonl", RETAIN_ROWS),
    }


def args(ws, out, *extra, method="npo", steps="2", retain=True):
    argv = [
        "unlearn", "--model", ws["model"], "--method", method, "--forget", ws["forget"],
        "--steps", steps, "--out", str(out), "--batch-size", "2", "--max-length", "64",
        "--buckets", "32,64", "--no-progress",
    ]  # fmt: skip
    if retain:
        argv += ["--retain", ws["retain"]]
    return argv + list(extra)


def test_unlearn_writes_a_transformers_loadable_model(workspace, tmp_path, capsys):
    from jaxunlearn.checkpoints import load_pretrained

    out = tmp_path / "npo"
    assert cli.main(args(workspace, out, "--set", "beta=0.2", "--set", "learning_rate=1e-2")) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]
    assert all(np.isfinite(r["loss"]) and r["lr"] == pytest.approx(1e-2) for r in lines)
    assert "wrote the unlearned model" in capsys.readouterr().out

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("Question : What gender is author Basil Mahfouz Al-Kuwaiti ?")["input_ids"]
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits.numpy()
    ours = load_pretrained(out)(jnp.asarray([ids])).logits
    np.testing.assert_allclose(np.asarray(ours), hf_logits, rtol=1e-4, atol=1e-4)
    before = transformers.AutoModelForCausalLM.from_pretrained(workspace["model"])
    changed = [
        not torch.equal(a, b)
        for a, b in zip(hf.state_dict().values(), before.state_dict().values())
    ]
    assert any(changed)  # the run did update the weights


def test_nan_loss_is_reported_and_nothing_is_written(workspace, tmp_path, capsys):
    bad = save_tiny_llama(tmp_path / "nan_model", build_tokenizer(), nan=True)
    out = tmp_path / "out"
    ws = {**workspace, "model": str(bad)}
    assert cli.main(args(ws, out, method="gradascent", retain=False)) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 0" in err
    assert not (out / "model.safetensors").exists()


def test_overlap_is_warned_with_its_count(workspace, tmp_path, capsys):
    forget = write_jsonl(tmp_path / "f.jsonl", FORGET_ROWS)
    retain = write_jsonl(tmp_path / "r.jsonl", RETAIN_ROWS + FORGET_ROWS[:2])
    ws = {**workspace, "forget": forget, "retain": retain}
    assert cli.main(args(ws, tmp_path / "out", method="graddiff", steps="0")) == 0
    assert "2 of 4 forget items also appear in the retain set" in capsys.readouterr().err


def run_error(argv, capsys, code=2):
    assert cli.main(argv) == code
    return capsys.readouterr().err


def test_bad_inputs_are_reported(workspace, tmp_path, capsys):
    ws = workspace
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = run_error(args({**ws, "forget": str(empty)}, tmp_path / "o1"), capsys)
    assert "empty.jsonl" in err and "empty" in err

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(FORGET_ROWS[0]) + "\n" + json.dumps(FORGET_ROWS[1]) + "\n{oops\n")
    err = run_error(args({**ws, "forget": str(broken)}, tmp_path / "o2"), capsys)
    assert "broken.jsonl" in err and "line 3" in err

    missing_field = tmp_path / "missing.jsonl"
    missing_field.write_text(
        json.dumps(FORGET_ROWS[0]) + "\n" + json.dumps({"question": "q"}) + "\n"
    )
    err = run_error(args({**ws, "forget": str(missing_field)}, tmp_path / "o3"), capsys)
    assert "line 2" in err and "answer" in err

    err = run_error(args(ws, tmp_path / "o4", method="no_such_method"), capsys)
    assert "unknown method" in err and "npo" in err and "simnpo" in err

    err = run_error(args(ws, tmp_path / "o5", retain=False), capsys)
    assert "needs a retain set" in err and "--retain" in err

    err = run_error(args(ws, tmp_path / "o6", "--set", "betta=1"), capsys)
    assert "betta" in err and "beta" in err and "valid" in err
    err = run_error(args(ws, tmp_path / "o7", "--set", "beta=big"), capsys)
    assert "beta=big" in err and "float" in err

    err = run_error(args(ws, tmp_path / "o8", method="pdu"), capsys)
    assert "retain_loss_eps" in err

    err = run_error(args(ws, tmp_path / "o9", "--mesh", "data=3,pipes=2"), capsys)
    assert "--mesh" in err

    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    err = run_error(args(ws, full), capsys)
    assert "not empty" in err and "--overwrite" in err

    err = run_error(args(ws, tmp_path / "o10", "--refusals", str(tmp_path / "nope.txt"),
                         method="idkdpo"), capsys)  # fmt: skip
    assert "nope.txt" in err
    text_rows = write_jsonl(tmp_path / "text.jsonl", [{"text": "Basil was born in Kuwait."}])
    err = run_error(args({**ws, "forget": text_rows}, tmp_path / "o11", method="idkdpo"), capsys)
    assert "question/answer" in err


def test_idkdpo_defaults_to_the_packaged_refusals(workspace, tmp_path):
    from jaxunlearn import recipes
    from jaxunlearn.checkpoints import load_tokenizer

    parser = cli.build_parser()
    ns = parser.parse_args(args(workspace, tmp_path / "o", method="idkdpo"))
    from jaxunlearn.cli import unlearn as unlearn_command

    sampler = unlearn_command.prepare_data(ns, recipes.recipe("idkdpo"), load_tokenizer(ns.model))
    batch = sampler.batch_at(0)
    assert set(batch) == {"forget", "alternate", "retain"}
    assert batch["alternate"]["input_ids"].shape[0] == 2
    # Each alternate row is the forget row's question followed by a refusal answer.
    tok = load_tokenizer(ns.model)
    text = tok.decode(
        batch["alternate"]["input_ids"][0][batch["alternate"]["attention_mask"][0] > 0]
    )
    assert text.startswith("Question")
    assert sampler.prompt_format == "qa"


def test_top_level_help_and_hooks(capsys):
    assert cli.main([]) == 2
    help_text = capsys.readouterr().err
    for name in ("unlearn", "eval", "convert", "demo", "sweep"):
        assert name in help_text and name in cli.SUBCOMMANDS


def test_one_shot_ssd_through_the_cli(workspace, tmp_path):
    out = tmp_path / "ssd"
    argv = args(workspace, out, "--set", "alpha=1.0", method="ssd", steps="0")
    argv[argv.index("--buckets") + 1] = "64"  # one padded length: one compile
    assert cli.main(argv) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["selected"] > 0
    transformers.AutoModelForCausalLM.from_pretrained(out)
