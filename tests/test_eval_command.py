"""The ``jaxunlearn eval`` command (jaxunlearn.cli.eval) end to end on a tiny model."""

import json

import jax
import pytest
from test_eval_mc import mc_rows
from test_eval_tofu import tiny_checkpoint, tiny_tokenizer

from jaxunlearn import cli

jax.config.update("jax_default_matmul_precision", "highest")

TOFU_ARGS = (
    "--benchmark tofu --forget-split forget10 --template chat --limit 2 --max-new-tokens 4 "
    "--batch-size 4 --buckets 256,512"
).split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_model")
    tiny_checkpoint(path, tiny_tokenizer())
    return path


def test_tofu_writes_eval_summary_and_markdown(model_dir, tmp_path, capsys):
    out = tmp_path / "run" / "TOFU_EVAL.json"
    assert cli.main(["eval", "--model", str(model_dir), *TOFU_ARGS, "--out", str(out)]) == 0
    logs = json.loads(out.read_text())
    summary = json.loads((tmp_path / "run" / "TOFU_SUMMARY.json").read_text())
    markdown = (tmp_path / "run" / "TOFU_SUMMARY.md").read_text()
    assert logs["_jaxunlearn"]["prompt_format"] == "chat"
    assert logs["_jaxunlearn"]["n_items"]["forget"] == 2
    assert set(logs["forget_truth_ratio"]["value_by_index"]) == {"0", "1"}
    for name in ("forget_Q_A_Prob", "model_utility", "privleak", "extraction_strength"):
        assert summary[name] == logs[name]["agg_value"]
    assert "forget_quality" not in summary  # None without retain logs, as open-unlearning
    assert "prompt_format: `chat`" in markdown and "| model_utility |" in markdown
    assert "| forget_truth_ratio |" in capsys.readouterr().out

    # The run's own logs as the oracle: identical truth ratios, so the KS p-value is 1.
    again = tmp_path / "again.json"
    args = ["--model", str(model_dir), *TOFU_ARGS, "--retain-logs", str(out), "--out", str(again)]
    assert cli.main(["eval", *args, "--metrics", "forget_quality,privleak"]) == 0
    summary = json.loads((tmp_path / "again_SUMMARY.json").read_text())
    assert summary["forget_quality"] == pytest.approx(1.0)
    assert summary["privleak"] == pytest.approx(0.0, abs=1e-6)  # same Min-K AUC as the oracle
    assert json.loads(again.read_text())["_jaxunlearn"]["retain_logs"] == str(out)


def test_retain_logs_for_other_items_exit_with_the_ids(model_dir, tmp_path, capsys):
    retain = tmp_path / "retain_EVAL.json"
    retain.write_text(
        json.dumps(
            {"forget_truth_ratio": {"value_by_index": {str(i): {"score": 1.0} for i in range(400)}}}
        )
    )
    out = tmp_path / "x_EVAL.json"
    code = cli.main(
        [
            "eval",
            "--model",
            str(model_dir),
            *TOFU_ARGS,
            "--retain-logs",
            str(retain),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "item ids differ" in err and "'2', '3'" in err
    assert not out.exists()


def test_multiple_choice_file(model_dir, tmp_path):
    data = tmp_path / "wmdp-bio.jsonl"
    rows = [{k: v for k, v in r.items() if k != "subject"} for r in mc_rows()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mc" / "WMDP_EVAL.json"
    args = [
        "--model",
        str(model_dir),
        "--benchmark",
        "mc",
        "--data",
        str(data),
        "--subject",
        "wmdp-bio",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert cli.main(["eval", *args]) == 0
    summary = json.loads((tmp_path / "mc" / "WMDP_SUMMARY.json").read_text())
    per_item = json.loads(out.read_text())["wmdp_bio_acc"]["value_by_index"]
    assert summary["wmdp_bio_acc"] == pytest.approx(
        sum(v["correct"] for v in per_item.values()) / len(rows)
    )


def test_argument_errors(model_dir, tmp_path):
    assert (
        cli.main(["eval", "--model", str(model_dir), "--benchmark", "muse", "--out", "x.json"]) == 2
    )
    limit = ["--limit", "0", "--out", "x.json"]
    assert cli.main(["eval", "--model", str(model_dir), *TOFU_ARGS, *limit]) == 2
    code = cli.main(
        [
            "eval",
            "--model",
            str(tmp_path / "missing"),
            *TOFU_ARGS,
            "--out",
            str(tmp_path / "o.json"),
        ]
    )
    assert code == 2


SHARDED = """
import sys, json
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np
sys.path.insert(0, "tests")
from jaxunlearn import checkpoints, parallel
from jaxunlearn.eval import inference
path = sys.argv[1]
tok = checkpoints.load_tokenizer(path)
rows = [json.loads(l) for l in open("jaxunlearn/data/tofu/forget10_perturbed.json")][:5]
items = [{"question": r["question"], "answer": r["answer"]} for r in rows]
kw = dict(batch_size=4, buckets=(256,))
plain = inference.score_items(checkpoints.load_pretrained(path), tok, items, "chat", stats=True, **kw)
gens = inference.generate_answers(checkpoints.load_pretrained(path), tok,
                               [r["question"] for r in rows], "chat", max_new_tokens=6, **kw)
mesh = parallel.mesh(data=4, fsdp=2)
model = checkpoints.load_pretrained(path, mesh=mesh)
sharded = inference.score_items(model, tok, items, "chat", stats=True, mesh=mesh, **kw)
for a, b in zip(plain, sharded):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
assert inference.generate_answers(model, tok, [r["question"] for r in rows], "chat",
                               max_new_tokens=6, mesh=mesh, **kw) == gens
# Packed scoring with statistics for some items: gathered positions split over the mesh.
flags = [i % 2 == 0 for i in range(len(items))]
packed = inference.score_items(checkpoints.load_pretrained(path), tok, items, "chat",
                               stats=flags, packed=True, **kw)
sharded = inference.score_items(model, tok, items, "chat", stats=flags, packed=True, mesh=mesh, **kw)
for a, b in zip(packed, sharded):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(packed.logprob, plain.logprob, rtol=1e-5, atol=1e-5)
print("OK", len(jax.devices()))
"""


def test_scores_and_generations_on_an_8_device_mesh_equal_one_device(model_dir):
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", SHARDED, str(model_dir)], cwd=repo, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "OK 8" in run.stdout


def test_retain_logs_of_another_split_are_refused_before_the_model_is_loaded(
    model_dir, tmp_path, capsys
):
    retain = tmp_path / "retain_EVAL.json"
    retain.write_text(
        json.dumps(
            {
                "forget_truth_ratio": {
                    "value_by_index": {"0": {"score": 1.0}, "1": {"score": 1.0}}
                },
                "_jaxunlearn": {"benchmark": "TOFU", "split": "forget01", "prompt_format": "chat"},
            }
        )
    )
    # --model names no model at all: the retain logs must be refused first.
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--tokenizer", str(model_dir),
            *TOFU_ARGS, "--retain-logs", str(retain), "--out", str(tmp_path / "x.json")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "split 'forget01_perturbed'" in err and "evaluating 'forget10_perturbed'" in err
    assert not (tmp_path / "x.json").exists()
