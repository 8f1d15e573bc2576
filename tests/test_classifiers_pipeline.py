"""The classifier benchmark end to end on the tiny preset: leaderboard files, cache reuse, errors."""

import dataclasses
import json

import numpy as np
import pytest

from jaxunlearn.classifiers import leaderboard as lb
from jaxunlearn.pipeline import classifiers as pc

METHODS = ("ssd", "acu", "gradascent")
# Smaller than "tiny" so the default suite stays fast; the slow test runs "tiny" itself.
MICRO = dataclasses.replace(
    pc.get_preset("tiny"), name="micro", subsample=(200, 100),
    recipe=dataclasses.replace(pc.get_preset("tiny").recipe, epochs=5),
)  # fmt: skip


def test_micro_run_writes_leaderboard_and_reuses_cache(tmp_path):
    _check_run(tmp_path, MICRO, ("acu",))


@pytest.mark.slow
def test_tiny_run_with_ssd(tmp_path):
    _check_run(tmp_path, "tiny", METHODS)


def _check_run(tmp_path, preset, methods):
    logs = []
    run = pc.run_classifiers(preset, "full_class", tmp_path / "out", methods=methods,
                             cache_dir=tmp_path / "cache", log=logs.append)  # fmt: skip
    assert [r.method for r in run.rows] == ["target", "oracle", *methods]
    assert sum("training the" in line for line in logs) == 2
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    for header in ("SSD / Bad-Teacher", "SalUn convention", "linear probe", "| acu |"):
        assert header in md
    rows = lb.load_leaderboard(tmp_path / "out" / "leaderboard.json")
    assert rows[1].kind == "oracle" and rows[1].metrics["avg_gap"] == 0.0
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 1000
    target, oracle = run.row("target").metrics, run.row("oracle").metrics
    assert target["Df"] > 50 and oracle["Df"] == 0.0  # the oracle never saw class 3
    assert run.row("acu").metrics["Df"] < target["Df"]
    # avg gap is SalUn's formula over the written metrics
    ssd = run.row(methods[-1]).metrics
    gap = np.mean([abs(ssd[k] - oracle[k]) for k in ("UA", "RA", "TA", "MIA_efficacy")])
    assert ssd["avg_gap"] == pytest.approx(gap)
    # second run: target and oracle come from the cache (same hash), identical metrics
    logs.clear()
    again = pc.run_classifiers(preset, "full_class", tmp_path / "out2", methods=("acu",),
                               cache_dir=tmp_path / "cache", log=logs.append)  # fmt: skip
    assert not any("training the" in line for line in logs)
    assert again.row("target").metrics == pytest.approx(target)
    meta = json.loads((tmp_path / "out2" / "run.json").read_text())
    assert meta["task"]["forget"] == int(run.task.forget.sum())


def test_oracle_cache_key_depends_on_forget_set_and_recipe():
    preset = pc.get_preset("tiny")
    data = pc.load_data(preset)
    a = pc.make_task(data, "full_class", "3")
    b = pc.make_task(data, "full_class", "4")
    cfg = pc.model_config(preset, a)
    key = pc.model_cache_key
    assert key(cfg, preset.recipe, data, a, "target") == key(cfg, preset.recipe, data, b, "target")
    assert key(cfg, preset.recipe, data, a, "oracle") != key(cfg, preset.recipe, data, b, "oracle")
    other = dataclasses.replace(preset.recipe, epochs=9)
    assert key(cfg, preset.recipe, data, a, "oracle") != key(cfg, other, data, a, "oracle")


def test_bad_requests_are_named(tmp_path):
    with pytest.raises(ValueError, match="forget class 42 does not exist"):
        pc.run_classifiers("tiny", "full_class", tmp_path, forget=42, methods=())
    with pytest.raises(ValueError, match="unknown scenario"):
        pc.run_classifiers("tiny", "whole_class", tmp_path)
    with pytest.raises(ValueError, match="unknown methods"):
        pc.run_classifiers("tiny", "full_class", tmp_path, methods=("npo",))
    with pytest.raises(ValueError, match="JAXUNLEARN_CIFAR10"):
        pc.load_data(pc.get_preset("cifar10"))


def test_checkpoint_with_wrong_label_count(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=8, image_size=8, patch_size=4, num_channels=1,
                                 num_labels=7)  # fmt: skip
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="7 output labels but the data has 10 classes"):
        pc.run_classifiers("tiny", "full_class", tmp_path / "o", checkpoint=tmp_path / "vit",
                           cache_dir=tmp_path / "c", methods=())  # fmt: skip
