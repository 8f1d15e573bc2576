"""Hyperparameter selection on a validation split of authors (`jaxunlearn sweep --select
validation`): which authors, which data, the selection rule, and the run end to end."""

import importlib
import json
import math
from types import SimpleNamespace

import pytest

from jaxunlearn.data import load_tofu
from jaxunlearn.pipeline import presets as P

# The module (the package's `sweep` attribute is the sweep function).
S = importlib.import_module("jaxunlearn.pipeline.sweep")


def test_validation_authors_are_learned_unevaluated_and_disjoint():
    small = P.get_preset("small")
    authors = S.validation_author_ids(small, "forget10")
    assert authors == [4, 5]
    assert set(authors) <= set(P.target_author_ids(small))  # the target learned them
    assert not set(authors) & set(P.forget_author_ids(small, "forget10"))
    # small evaluates 40 retain_perturbed rows = authors 0 and 1.
    evaluated = set(range(P.eval_counts(small, "forget10")["retain"] // 20))
    assert evaluated == {0, 1} and not set(authors) & evaluated
    assert S.validation_author_ids(P.get_preset("tiny"), "forget10") == [1]
    with pytest.raises(ValueError, match="validation split needs 20 trained retain"):
        S.validation_author_ids(P.get_preset("full"), "forget10")


def test_validation_data_moves_the_request_and_keeps_the_rest():
    from jaxunlearn.pipeline.tofu import load_tofu_data

    small = P.get_preset("small")
    data = load_tofu_data(small)
    val = S.validation_data(small, "forget10", data)
    full = load_tofu("full").to_list()
    pairs = lambda rows: [(r["question"], r["answer"]) for r in rows]  # noqa: E731
    assert pairs(val.forget["forget10"]) == pairs(full[80:120])  # authors 4 and 5
    oracle = set(pairs(val.oracle_train["forget10"]))
    assert len(oracle) == len(data.target_train) - 40 == 200
    assert not oracle & set(pairs(full[80:120]))
    assert set(pairs(full[3600:3640])) <= oracle  # the real forget authors stay in
    assert val.retain["forget10"] == val.oracle_train["forget10"]
    rows = val.eval_rows["forget10"]
    assert [r["question"] for r in rows["forget10_perturbed"]] == [
        r["question"] for r in full[80:120]
    ]
    assert all(
        r["paraphrased_answer"] and r["perturbed_answer"] for r in rows["forget10_perturbed"]
    )
    for name, original in data.eval_rows["forget10"].items():
        if name != "forget10_perturbed":
            assert rows[name] == original
    assert val.target_train == data.target_train


def _row(fq, mu):
    return SimpleNamespace(metrics={"forget_quality": fq, "model_utility": mu})


def _runs(n):
    return [SimpleNamespace(method="m", setting=f"s{i}") for i in range(n)]


def plain_rule(rows, target_mu, fraction):
    """The rule written out: best FQ among MU >= bar (ties: MU, then first); else best MU."""
    best, best_key = None, None
    for i, r in enumerate(rows):
        fq, mu = r.metrics["forget_quality"], r.metrics["model_utility"]
        fq = -math.inf if fq is None else fq
        mu = -math.inf if mu is None else mu
        if mu >= fraction * target_mu and (best_key is None or (fq, mu) > best_key):
            best, best_key = i, (fq, mu)
    if best is not None:
        return best, True
    mus = [-math.inf if r.metrics["model_utility"] is None else r.metrics["model_utility"]
           for r in rows]  # fmt: skip
    return mus.index(max(mus)), False


@pytest.mark.parametrize(
    "values",
    [
        [(0.9, 0.5), (0.3, 0.95), (0.2, 0.99)],  # the best FQ fails the bar
        [(0.3, 0.95), (0.3, 0.97), (0.1, 1.0)],  # tie on FQ: higher MU
        [(0.9, 0.1), (0.5, 0.8), (None, 0.85)],  # none qualifies: highest MU
        [(0.4, 0.96), (0.4, 0.96), (None, None)],  # full tie: grid order
    ],
)
def test_select_setting_follows_the_rule(values):
    rows = [_row(fq, mu) for fq, mu in values]
    got = S.select_setting(_runs(len(rows)), rows, target_mu=1.0, mu_fraction=0.95)
    index, qualified = plain_rule(rows, 1.0, 0.95)
    assert got.setting == f"s{index}" and got.qualified == qualified
    with pytest.raises(ValueError):
        S.select_setting(_runs(2), rows[:1], 1.0)


def test_method_runs_scale_each_methods_own_rate():
    small = P.get_preset("small")
    runs = S.method_runs("npo", {"lr_scale": [0.5, 2.0]}, small)
    assert [r.overrides["learning_rate"] for r in runs] == pytest.approx([1.5e-3, 6e-3])
    assert [r.setting for r in runs] == ["lr_scale=0.5", "lr_scale=2.0"]
    gd = S.method_runs("graddiff", {"lr_scale": [2.0], "epochs": [3]}, small)[0]
    assert gd.overrides["learning_rate"] == pytest.approx(2e-3) and gd.epochs == 3
    with pytest.raises(ValueError, match="no learning rate"):
        S.method_runs("ssd", {"lr_scale": [2.0]}, small)
    with pytest.raises(ValueError, match="no hyperparameter"):
        S.method_runs("npo", {"betta": [1]}, small)


def test_validated_sweep_reports_only_the_selected_settings(monkeypatch, tmp_path):
    """Wiring with the models faked: each validation run's FQ/MU is a function of its
    learning rate; the test run must receive exactly the rule's choice per method."""
    import jaxunlearn.pipeline.tofu as T

    fake_models = T.TofuModels(tmp_path, "k", None, tmp_path / "target", {}, [], {})
    monkeypatch.setattr(T, "prepare_models", lambda *a, **k: fake_models)
    monkeypatch.setattr(S, "prepare_validation_oracle", lambda *a, **k: tmp_path / "val")
    seen = {}

    def metrics_of(run):
        lr = run.overrides.get("learning_rate", 1e-3)
        return {"forget_quality": lr * 100, "model_utility": 1.0 - lr * 20}

    class FakeBench:
        def __init__(self, preset, **kw):
            seen["bench"] = kw
            self.rows = [SimpleNamespace(metrics={"model_utility": 1.0})]

        def run(self, run):
            row = SimpleNamespace(metrics=metrics_of(run), run=run)
            self.rows.append(row)
            return row

        def write_leaderboard(self, title):
            return {"markdown": tmp_path / "validation.md"}

    def fake_run_tofu(preset, runs, **kw):
        seen["test_runs"] = runs
        rows = {r.method: SimpleNamespace(metrics=metrics_of(r), hyperparameters={}) for r in runs}
        return SimpleNamespace(row=lambda m: rows[m], paths={})

    monkeypatch.setattr(T, "TofuBenchmark", FakeBench)
    monkeypatch.setattr(T, "run_tofu", fake_run_tofu)
    result = S.validated_sweep(
        ["npo", "graddiff", "ssd"], {"lr_scale": [0.5, 1.0, 2.0]}, "small", out_dir=tmp_path,
        progress=False, log=lambda _: None,
    )  # fmt: skip
    # npo (base 3e-3): MU 1 - 20 lr >= 0.95 holds for lr <= 2.5e-3 -> 1.5e-3 (x0.5).
    # graddiff (base 1e-3): every point qualifies -> the highest FQ, 2e-3 (x2).
    chosen = {r.method: r for r in seen["test_runs"]}
    assert chosen["npo"].overrides["learning_rate"] == pytest.approx(1.5e-3)
    assert chosen["graddiff"].overrides["learning_rate"] == pytest.approx(2e-3)
    assert chosen["ssd"].setting == "validated:preset"  # no learning rate: its preset setting
    assert chosen["npo"].setting == "validated:lr_scale=0.5"
    assert [a for a in result.validation_authors] == [4, 5]
    record = json.loads((tmp_path / "selection.json").read_text())
    assert record["selected"]["graddiff"]["setting"] == "lr_scale=2.0"
    assert record["validation_authors"] == [4, 5]
    assert (
        seen["bench"]["data"].forget["forget10"][0]["question"]
        == (load_tofu("full").to_list()[80]["question"])
    )


@pytest.mark.slow
def test_validated_sweep_tiny_end_to_end(tmp_path):
    from jaxunlearn.pipeline import load_leaderboard, validated_sweep

    result = validated_sweep(
        ["gradascent"], {"lr_scale": [0.5, 2.0]}, "tiny", out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache", progress=False, log=lambda _: None,
    )  # fmt: skip
    folder = next((tmp_path / "cache").glob("tiny-*"))
    val_oracle = next(folder.glob("oracle-validation-*"))
    target_items = json.loads((folder / "target" / "train_log.json").read_text())["items"]
    assert json.loads((val_oracle / "train_log.json").read_text())["items"] == target_items - 20
    rows = load_leaderboard(result.paths["validation_markdown"].with_suffix(".json"))
    target = next(r for r in rows if r.kind == "target")
    grid = [r for r in rows if r.method == "gradascent"]
    index, _ = plain_rule(grid, target.metrics["model_utility"], 0.95)
    assert result.selections["gradascent"].setting == grid[index].setting
    test_rows = load_leaderboard(result.test.paths["json"])
    assert [r.setting for r in test_rows if r.kind == "unlearned"] == [
        f"validated:{grid[index].setting}"
    ]
