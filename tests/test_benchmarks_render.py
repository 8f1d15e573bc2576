"""BENCHMARKS.md rendering: tables from the benchmarks' JSON, loaded runs marked, gaps noted.

The fixtures are built with the same helpers the benchmarks use to write their JSON
(`_quiet.gate_record`, `_quiet.ratio_entry`), so they have the benchmarks' schema.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _quiet  # noqa: E402
import regenerate  # noqa: E402
import render  # noqa: E402

QUIET = _quiet.gate_record(0.05, [0.01, 0.012, 0.004], max_wait=900)
LOADED = _quiet.gate_record(0.05, [0.02, 0.61], max_wait=30)
MACHINE = {"cpu": "Test CPU 9000", "isa": "AVX2", "cores": 2, "versions": {"jax": "0.10.2"},
           "date": "2026-01-01 00:00:00 UTC", "load_avg_1min": 0.3}  # fmt: skip


def model_result(quiet: dict) -> dict:
    """A bench_model result: JAX 1372 / torch 1609 train tok/s, etc."""
    r = lambda v: _quiet.ratio_entry(v, quiet)  # noqa: E731
    return {
        "benchmark": "bench_model",
        "command": "python benchmarks/bench_model.py --reps 5",
        "machine": MACHINE,
        "quiet_gate": quiet,
        "shape": "vocab 4096, hidden 512",
        "params": 21_900_000,
        "matmul": "3 x 2048^3 float32 per call",
        "jax_forward_tok_s": 4931.0,
        "torch_forward_tok_s": 5555.0,
        "jax_train_tok_s": 1372.0,
        "torch_train_tok_s": 1609.0,
        "jax_matmul_gflops": 236.0,
        "torch_matmul_gflops": 292.0,
        "train_step_model_gflops": 180.0,
        "train_step_fraction_of_matmul": 0.7627,
        "torch_train_step_model_gflops": 211.0,
        "torch_train_step_fraction_of_torch_matmul": 0.7226,
        "ratios": {"forward": r(5555 / 4931), "train": r(0.8527), "train_best_times": r(0.78)},
        "reps": 5,
    }


def write(dir_: Path, name: str, res: dict) -> None:
    (dir_ / f"{name}.json").write_text(json.dumps(res), encoding="utf-8")


def test_gate_record_holds_only_when_every_round_was_quiet():
    assert QUIET["held"] and QUIET["other_processes_cpu_max"] == pytest.approx(0.012)
    assert not LOADED["held"] and "deadline passed" in LOADED["reason"]
    assert "61%" in LOADED["reason"]
    unmeasured = _quiet.gate_record(0.05, [0.01, math.nan])
    assert not unmeasured["held"] and "too short" in unmeasured["reason"]
    off = _quiet.gate_record(None, [0.0])
    assert not off["held"] and "gate off" in off["reason"]


def test_ratio_entry_is_a_result_only_under_a_held_gate():
    assert _quiet.ratio_entry(1.2, QUIET) == {"value": 1.2, "status": "quiet"}
    loaded = _quiet.ratio_entry(1.2, LOADED)
    assert loaded["status"] == _quiet.RATIO_LOADED and loaded["reason"] == LOADED["reason"]
    assert "LOADED, not a result" in _quiet.format_ratio(loaded)
    assert "LOADED" not in _quiet.format_ratio(_quiet.ratio_entry(1.2, QUIET))


def test_interleaved_rounds_alternate_order_and_keep_return_values():
    calls = []
    fns = {"a": lambda: calls.append("a") or "A", "b": lambda: calls.append("b") or "B"}
    times, others, values = _quiet.interleaved_rounds(fns, 3, gate=None, deadline=0, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then A B / B A / A B
    assert values == {"a": ["A"] * 3, "b": ["B"] * 3}
    assert len(times["a"]) == len(times["b"]) == len(others) == 3


def test_quiet_run_renders_its_numbers_without_loaded_marks(tmp_path):
    write(tmp_path, "bench_model", model_result(QUIET))
    text = render.render_section("bench_model", tmp_path)
    for expected in ("1372", "1609", "4931", "5555", "236", "292", "0.85×", "1.13×",
                     "Test CPU 9000 (AVX2), 2 cores", "jax 0.10.2",
                     "`python benchmarks/bench_model.py --reps 5`", "Quiet gate: **held**",
                     "missed (0.85×)", "met (76%)"):  # fmt: skip
        assert expected in text, expected
    assert "loaded" not in text.lower()


def test_loaded_run_marks_every_ratio_and_judges_no_target(tmp_path):
    write(tmp_path, "bench_model", model_result(LOADED))
    text = render.render_section("bench_model", tmp_path)
    assert "NOT held — loaded machine" in text and LOADED["reason"] in text
    assert "0.85× **loaded**" in text and "1.13× **loaded**" in text
    assert "0.78× **loaded**" in text
    assert "not judged (0.85× on a loaded machine)" in text
    assert "not judged (76% on a loaded machine)" in text and "met (76%)" not in text


def test_missing_json_and_missing_fragment_give_clear_notes(tmp_path):
    template = tmp_path / "T.md"
    template.write_text(
        "# B\n\n{{render bench_eval}}\n\n{{include benchmarks/results/no_such_file.md}}\nend\n"
    )
    out = tmp_path / "B.md"
    render.render_file(template, out, tmp_path, {"bench_eval": "python make_it.py"})
    text = out.read_text()
    assert "**No result**" in text and "bench_eval.json` is missing" in text
    assert "Produce it with `python make_it.py`" in text
    assert "`benchmarks/results/no_such_file.md` is not present" in text
    assert text.startswith("# B\n") and text.rstrip().endswith("end")


def test_include_shifts_fragment_headings_under_the_section(tmp_path, monkeypatch):
    (tmp_path / "frag.md").write_text("# Title\n\ntext\n\n## Sub\n\nmore # not a heading\n")
    monkeypatch.setattr(render, "ROOT", tmp_path)
    text = render.include("frag.md")
    assert text.splitlines()[0] == "### Title" and "#### Sub" in text
    assert "more # not a heading" in text


def test_unknown_result_falls_back_to_a_field_table(tmp_path):
    res = {"benchmark": "bench_new", "quiet_gate": LOADED, "machine": MACHINE,
           "jax_s": 48.8, "phases": {"generate": 12.5}, "ratios": {
               "compiled": _quiet.ratio_entry(0.9, LOADED)}}  # fmt: skip
    write(tmp_path, "bench_new", res)
    text = render.render_section("bench_new", tmp_path)
    assert "| jax_s | 48.8 |" in text and "| phases.generate | 12.5 |" in text
    assert "| compiled | 0.90× **loaded** |" in text


def eval_result(deadline_passed: bool) -> dict:
    """bench_eval's JSON as it writes it: gate as a string, ratios None when withheld."""
    res = {"machine": "x86_64, 2 cpus", "quiet_gate": "0.05", "other_processes_cpu_max": 0.01,
           "gate_deadline_passed": deadline_passed, "n_items": 160, "batch_size": 32,
           "max_new_tokens": 200, "scoring": "packed", "jax_first_s": 71.0, "jax_s": 48.8,
           "torch_s": 43.8, "phases_s": {"jax (compiled)": {"generate": 30.1, "score/forget": 4.2},
                                          "transformers+torch": {"generate": 25.5}},
           "forget_loss_max_abs_diff": 9.5e-7, "identical_generations": 1.0}  # fmt: skip
    ratios = {"torch_over_jax": 43.8 / 48.8, "torch_over_jax_first": 43.8 / 71.0,
              "torch_over_jax_scoring": 2.5}  # fmt: skip
    if deadline_passed:
        res["ratio_withheld"] = "the quiet-gate deadline passed (--max-wait)"
        ratios = dict.fromkeys(ratios)
    return {**res, **ratios}


def test_bench_eval_result_renders_times_phases_and_withheld_ratios(tmp_path):
    write(tmp_path, "bench_eval", eval_result(False))
    text = render.render_section("bench_eval", tmp_path)
    for expected in ("48.8 s", "71 s", "43.8 s", "0.90×", "0.62×", "2.50×", "Quiet gate: **held**",
                     "| generate | 30.1 | 25.5 |", "| score/forget | 4.2 | – |", "9.5e-07"):  # fmt: skip
        assert expected in text, expected
    # Derived rows: generation alone (torch / jax generate phase) and the compiled-suite
    # ratio with jaxunlearn's scoring phases taken out (43.8 / (48.8 - 4.2) = 0.98).
    assert f"| generation alone | 30.1 s | {25.5 / 30.1:.2f}× |" in text
    assert f"took no time | {48.8 - 4.2:.1f} s | {43.8 / (48.8 - 4.2):.2f}× |" in text
    write(tmp_path, "bench_eval", eval_result(True))
    text = render.render_section("bench_eval", tmp_path)
    assert text.count("withheld (loaded)") == 3 and "NOT held" in text
    assert "0.90×" not in text


def test_bench_decode_renders_attention_rows_and_the_step_products(tmp_path):
    held = {"gate": 0.05, "held": True, "reason": "quiet", "rounds": 3}
    res = {"shape": {"rows": 32, "kv_heads": 4, "query_heads": 8, "head_dim": 64, "layers": 6},
           "slots": {"64": {"ms_per_step": {"jax": 2.0, "jax_before": 5.0, "torch": 1.5},
                            "max_abs_diff": 7e-7,
                            "torch_over_jax": {"value": 0.75, "status": "quiet"},
                            "before_over_jax": {"value": 2.5, "status": "quiet"}}},
           "projections": {"products": 43, "ms_per_step": {"jax": 11.0, "torch": 8.8},
                           "max_rel_diff": 5e-6,
                           "torch_over_jax": {"value": 0.8, "status": "quiet"}},
           "quiet_gate": held}  # fmt: skip
    write(tmp_path, "bench_decode", res)
    text = render.render_section("bench_decode", tmp_path)
    assert "| 64 | 2 | 5 | 1.5 | 0.75× | 2.50× | 7.0e-07 |" in text
    assert "| 43 products, 32 rows | 11 | 8.8 | 0.80× | 5.0e-06 |" in text
    del res["projections"]
    write(tmp_path, "bench_decode", res)
    assert "products" not in render.render_section("bench_decode", tmp_path)


def test_template_renders_with_no_results_at_all(tmp_path):
    out = tmp_path / "B.md"
    regenerate.main(["--render-only", "--results", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert "{{" not in text
    for b in regenerate.BENCHES:
        if f"{{{{render {b.name}}}}}" in regenerate.TEMPLATE.read_text():
            assert f"--only {b.name}" in text, b.name


def test_committed_benchmarks_md_is_the_rendering_of_the_stored_results(tmp_path):
    """BENCHMARKS.md is generated: re-rendering the stored JSON reproduces it exactly."""
    out = tmp_path / "B.md"
    regenerate.main(["--render-only", "--out", str(out)])
    assert out.read_text() == (ROOT / "BENCHMARKS.md").read_text(), (
        "BENCHMARKS.md differs from its rendering: run `python benchmarks/regenerate.py "
        "--render-only` (and edit benchmarks/BENCHMARKS.template.md, not BENCHMARKS.md)"
    )


@pytest.mark.slow
def test_quick_bench_model_writes_json_that_renders(tmp_path):
    out = tmp_path / "bench_model.json"
    cmd = [sys.executable, "benchmarks/bench_model.py", "--quick", "--gate", "0",
           "--json-out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert res["machine"]["cores"] >= 1 and not res["quiet_gate"]["held"]
    text = render.render_section("bench_model", tmp_path)
    assert f"| train step, tok/s | {render.num(res['jax_train_tok_s'])} |" in text
    assert "**loaded**" in text  # --gate 0: no ratio is a result
