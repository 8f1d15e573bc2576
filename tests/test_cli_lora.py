"""``jaxunlearn unlearn --lora-rank``: LoRA unlearning through the command line.

A tiny random llama saved by transformers is unlearned with adapters only; the merged model
in --out must load in transformers, the PEFT adapter must load with ``peft`` onto the
transformers base model with the same logits, and the library loader for ``eval --adapter``
(`load_pretrained_with_adapter`) must give the same model again.
"""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_cli_unlearn import (
    FORGET_ROWS,
    RETAIN_ROWS,
    args,
    build_tokenizer,
    save_tiny_llama,
    write_jsonl,
)

from jaxunlearn import cli

PROMPT = "Question : What gender is author Basil Mahfouz Al-Kuwaiti ?"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_lora")
    tokenizer = build_tokenizer()
    return {
        "root": root,
        "model": str(save_tiny_llama(root / "model", tokenizer)),
        "forget": write_jsonl(root / "forget.jsonl", FORGET_ROWS),
        "retain": write_jsonl(root / "retain.jsonl", RETAIN_ROWS),
    }


def _fast(argv):
    """One GradDiff step on 32-token rows: one compile, no reference precompute."""
    argv = list(argv)
    argv[argv.index("--method") + 1] = "graddiff"
    argv[argv.index("--steps") + 1] = "1"
    argv[argv.index("--buckets") + 1] = "32"
    argv[argv.index("--max-length") + 1] = "32"
    return argv


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


@pytest.fixture(scope="module")
def lora_run(ws):
    out, adapter = ws["root"] / "npo_lora", ws["root"] / "adapter"
    argv = _fast(args(ws, out, "--set", "learning_rate=5e-2", "--lora-rank", "4", "--lora-alpha",
                      "8", "--lora-targets", "q,v,down", "--save-adapter", str(adapter)))  # fmt: skip
    assert cli.main(argv) == 0
    return out, adapter


def test_lora_unlearn_writes_merged_model_and_a_peft_adapter(ws, lora_run):
    from peft import PeftModel

    out, adapter = lora_run
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == ws["model"]
    record = json.loads((out / ".jaxunlearn-run.json").read_text())
    assert record["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q", "v", "down"]}

    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPT)["input_ids"]
    base = transformers.AutoModelForCausalLM.from_pretrained(ws["model"]).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    base_logits, merged_logits = _hf_logits(base, ids), _hf_logits(merged, ids)
    assert np.abs(merged_logits - base_logits).max() > 1e-3  # the adapters were trained
    np.testing.assert_allclose(_hf_logits(with_adapter, ids), merged_logits, atol=2e-5)

    # Only the adapted kernels moved; embeddings, norms and k/o/gate/up are the base's.
    before, after = base.state_dict(), merged.state_dict()
    moved = sorted({k.split(".")[-2] for k in before if not torch.equal(before[k], after[k])})
    assert moved == ["down_proj", "q_proj", "v_proj"]


def test_eval_adapter_loader_matches_the_merged_model(ws, lora_run):
    from jaxunlearn.checkpoints import load_pretrained, load_pretrained_with_adapter

    out, adapter = lora_run
    ids = jnp.asarray([transformers.AutoTokenizer.from_pretrained(out)(PROMPT)["input_ids"]])
    merged = load_pretrained(out)
    for merge in (True, False):
        model = load_pretrained_with_adapter(ws["model"], adapter, merge=merge)
        np.testing.assert_allclose(
            np.asarray(model(ids).logits), np.asarray(merged(ids).logits), atol=2e-5
        )
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        load_pretrained_with_adapter(ws["model"], ws["root"])


def test_no_merge_writes_only_the_adapter(ws, tmp_path):
    out = tmp_path / "adapter_only"
    argv = _fast(args(ws, out, "--lora-rank", "2", "--no-merge"))
    argv[argv.index("--steps") + 1] = "0"  # no training compile: only what is written counts
    assert cli.main(argv) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "config.json").exists() and (out / "metrics.jsonl").is_file()


def _error(argv, capsys):
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_bad_lora_flags_exit_2_with_the_reason(ws, tmp_path, capsys):
    err = _error(args(ws, tmp_path / "a", "--lora-rank", "4", "--lora-targets", "q,query"), capsys)
    assert "['query'] match no kernel" in err
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in err  # the kernel names are listed
    assert not (tmp_path / "a" / "config.json").exists()
    err = _error(args(ws, tmp_path / "b", "--save-adapter", str(tmp_path / "ad")), capsys)
    assert "--save-adapter needs --lora-rank" in err
    err = _error(args(ws, tmp_path / "c", "--lora-rank", "0"), capsys)
    assert "--lora-rank must be a positive int" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    err = _error(args(ws, tmp_path / "d", "--lora-rank", "2", "--save-adapter", str(busy)), capsys)
    assert "holds no PEFT adapter" in err


def test_eval_command_with_adapter_scores_like_the_merged_model(ws, lora_run, tmp_path):
    out, adapter = lora_run
    tofu = ["--benchmark", "tofu", "--limit", "2", "--metrics", "forget_Q_A_Prob",
            "--no-holdout", "--compilation-cache", "off"]  # fmt: skip
    with_adapter, merged = tmp_path / "adapter_EVAL.json", tmp_path / "merged_EVAL.json"
    argv = ["eval", "--model", ws["model"], "--adapter", str(adapter), "--out", str(with_adapter)]
    assert cli.main(argv + tofu) == 0
    assert cli.main(["eval", "--model", str(out), "--out", str(merged), *tofu]) == 0
    got = json.loads(with_adapter.read_text())["forget_Q_A_Prob"]["value_by_index"]
    want = json.loads(merged.read_text())["forget_Q_A_Prob"]["value_by_index"]
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key]["prob"], want[key]["prob"], rtol=1e-4)
