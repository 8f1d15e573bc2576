"""Renders BENCHMARKS.md from a template and the benchmarks' JSON results.

The template (benchmarks/BENCHMARKS.template.md) is Markdown prose with directives, each on
a line of its own:

- ``{{render NAME}}``: the section body for ``results/NAME.json``: the command that produced
  it, the machine it ran on, whether the quiet gate held, and its tables. Every number in
  a table comes from that JSON; a ratio measured while the gate did not hold is marked
  "loaded" with the reason, and a missing JSON gives a note saying how to produce it.
- ``{{include PATH}}``: a Markdown fragment (path from the repository root), e.g. another
  benchmark's write-up in benchmarks/results/*.md, or a note if it is absent.

Nothing here runs a benchmark; `regenerate.py` does, then calls `render_file`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r"^\{\{\s*(render|include)\s+(\S+)\s*\}\}\s*$")
LOADED = "**loaded**"


# ----------------------------------------------------------------------------- formatting


def num(x, digits: int = 3) -> str:
    """A number with `digits` significant digits ('–' for None / nan)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def ratio(entry) -> str:
    """A ratio cell: 'x.xx×', or marked loaded when the quiet gate did not hold."""
    if entry is None:
        return "–"
    if isinstance(entry, (int, float)):  # a bare number: the producer recorded no gate
        return f"{entry:.2f}× (ungated)"
    text = f"{entry['value']:.2f}×"
    return text if entry.get("status") == "quiet" else f"{text} {LOADED}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(machine: dict | str | None) -> str:
    if not machine:
        return "Machine: not recorded."
    if isinstance(machine, str):  # an older writer's one-line description
        return f"Machine: {machine}."
    v = machine.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "flax", "torch", "transformers") if k in v)
    mem = f", {machine['memory_gib']} GiB" if machine.get("memory_gib") else ""
    load = machine.get("load_avg_1min")
    return (
        f"Machine: {machine.get('cpu', '?')} ({machine.get('isa', '?')}), "
        f"{machine.get('cores', '?')} cores{mem}; {libs}; run {machine.get('date', '?')}"
        + (f", 1-min load average at the end {load}" if load is not None else "")
        + "."
    )


def normalise_gate(res: dict) -> dict | None:
    """The ``quiet_gate`` record; older writers stored the gate as a string plus flags."""
    quiet = res.get("quiet_gate")
    if quiet is None or isinstance(quiet, dict):
        return quiet
    worst = res.get("other_processes_cpu_max")
    if quiet == "off":
        return {"held": False, "reason": "gate off: timed whatever the load"}
    if res.get("gate_deadline_passed") or "deadline passed" in quiet:
        return {"held": False, "reason": res.get("ratio_withheld", "gate deadline passed")}
    worst = "unknown" if worst is None else f"{100 * worst:.1f}%"
    return {"held": True, "reason": f"gate {quiet}; other processes used at most {worst}"}


def gate_line(quiet: dict | None) -> str:
    if quiet is None:
        return "Quiet gate: none (nothing timed against torch)."
    if quiet.get("held"):
        return f"Quiet gate: **held** ({quiet['reason']})."
    return (
        "Quiet gate: **NOT held — loaded machine**: times below are inflated by other "
        f"processes and every ratio is marked {LOADED}, not a result "
        f"({quiet.get('reason', 'no reason recorded')})."
    )


def header(res: dict, varies: str) -> str:
    """Command, machine, gate and which numbers depend on the CPU type."""
    command = re.sub(r"(?<=\s)/\S*/(?=benchmarks/results/)", "", res.get("command", "?"))
    lines = [
        f"Command: `{command}`",  # the results folder shown repository-relative
        "",
        machine_line(res.get("machine")),
        "",
        gate_line(normalise_gate(res)),
    ]
    if varies:
        lines += ["", f"Differs across CPU types: {varies}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sections


def render_bench_model(res: dict) -> str:
    r = res["ratios"]
    rows = [
        [
            "train step, tok/s",
            num(res["jax_train_tok_s"]),
            num(res["torch_train_tok_s"]),
            f"{ratio(r['train'])} (best times {ratio(r['train_best_times'])})",
        ],
        [
            "forward, tok/s",
            num(res["jax_forward_tok_s"]),
            num(res["torch_forward_tok_s"]),
            ratio(r["forward"]),
        ],
        [
            f"matmul ({res.get('matmul', '?')}), GFLOP/s",
            num(res["jax_matmul_gflops"]),
            num(res["torch_matmul_gflops"]),
            "",
        ],
        [
            "train step model GFLOP/s (fraction of own matmul)",
            f"{num(res['train_step_model_gflops'])} ({num(res['train_step_fraction_of_matmul'], 2)})",
            f"{num(res['torch_train_step_model_gflops'])} "
            f"({num(res['torch_train_step_fraction_of_torch_matmul'], 2)})",
            "",
        ],
    ]
    body = table(["", "JAX", "torch (same run)", "torch / JAX"], rows)
    frac = res["train_step_fraction_of_matmul"]
    if (res.get("quiet_gate") or {}).get("held"):
        frac_verdict = f"{'met' if frac >= 0.6 else 'missed'} ({100 * frac:.0f}%)"
    else:  # the matmuls and the step were slowed unequally: the fraction means nothing
        frac_verdict = f"not judged ({100 * frac:.0f}% on a loaded machine)"
    targets = (
        f"Targets: train step >= 60% of JAX's own matmul throughput: {frac_verdict}. "
        f"Train step >= 1.5× torch: {_judge(r['train'], 1.5, True)}."
    )
    return (
        f"Model: {res.get('shape', '?')}, {res['params'] / 1e6:.1f} M parameters; median of "
        f"{res.get('reps', '?')} interleaved repetitions.\n\n{body}\n\n{targets}"
    )


def _judge(entry: dict | None, target: float, larger_is_better: bool) -> str:
    if entry is None:
        return "not measured"
    if entry.get("status") != "quiet":
        return f"not judged ({entry['value']:.2f}× on a loaded machine)"
    ok = entry["value"] >= target if larger_is_better else entry["value"] <= target
    return f"{'met' if ok else 'missed'} ({entry['value']:.2f}×)"


UNLEARN_STEPS = [  # (label, JAX key, torch key, ratio key)
    ("GradDiff", "jax_graddiff_s", "torch_graddiff_s", "graddiff_speedup_vs_torch"),
    (
        "NPO, precomputed reference",
        "jax_npo_precomputed_s",
        "torch_npo_precomputed_s",
        "npo_precomputed_speedup_vs_torch",
    ),
    (
        "NPO, reference forward every step",
        "jax_npo_ref_forward_s",
        "torch_npo_ref_forward_s",
        "npo_ref_forward_speedup_vs_torch",
    ),
    ("NPO, forget and retain gradients apart", "jax_npo_split_grads_s", None, None),
    ("GU rank 8, refreshed every 10 (mean over whole cycles)", "jax_gu_cycle_mean_s", None, None),
    ("GU refresh step alone", "jax_gu_refresh_step_s", None, None),
]


def _s(t: dict, key: str | None) -> str:
    return "–" if key is None or key not in t else f"{num(t[key])} s"


def render_bench_unlearn(res: dict) -> str:
    t, r, info = res["times_s"], res["ratios"], res.get("info", {})
    steps = table(
        ["step", "JAX", "torch", "torch / JAX"],
        [
            [label, _s(t, j), _s(t, tk), ratio(r.get(rk)) if rk else "–"]
            for label, j, tk, rk in UNLEARN_STEPS
        ],
    )
    parts = [
        f"Model: {info.get('shape', '?')}, {info.get('params', 0) / 1e6:.1f} M parameters; "
        f"{info.get('step_batch', '?')}; median of {info.get('reps', '?')} steps; GU: "
        f"{info.get('gu', '?')}.",
        steps,
    ]
    if "jax_fisher_batch_mean_call_s" in t:
        fisher = table(
            ["convention", "JAX full call", "JAX one-batch (compiling) call", "torch SSD loop"],
            [
                [
                    "exact per-example (`vmap`)",
                    _s(t, "jax_fisher_per_example_call_s"),
                    _s(t, "jax_fisher_per_example_first_one_batch_call_s"),
                    "–",
                ],
                [
                    "batch-mean (SSD's code)",
                    _s(t, "jax_fisher_batch_mean_call_s"),
                    _s(t, "jax_fisher_batch_mean_first_one_batch_call_s"),
                    _s(t, "torch_fisher_batch_mean_s"),
                ],
            ],
        )
        parts += [f"SSD Fisher: {info.get('fisher', '?')}.", fisher]
    ratio_rows = [[k, ratio(v), res.get("targets", {}).get(k, "")] for k, v in r.items()]
    parts += ["Ratios (JAX/JAX ratios too, from the same run):",
              table(["ratio", "value", "target"], ratio_rows)]  # fmt: skip
    return "\n\n".join(parts)


def render_bench_lora(res: dict) -> str:
    names = [
        ("jax_full", "jaxunlearn full-parameter"),
        ("jax_lora", "jaxunlearn LoRA"),
        ("torch_full", "transformers full-parameter"),
        ("torch_lora", "transformers + peft LoRA"),
    ]
    rows = []
    for key, label in names:
        d = res[key]
        mb = lambda k: "–" if k not in d else f"{d[k] / 1e6:.1f} MB"  # noqa: B023, E731
        rows.append([label, f"{num(d['step_s_median'])} s", f"{num(d['step_s_min'])} s",
                     f"{d['trainable_params'] / 1e6:.2f} M", mb("train_state_bytes"),
                     mb("xla_argument_bytes"), mb("xla_temp_bytes")])  # fmt: skip
    body = table(
        ["step", "median", "min", "trainable params", "params + grads + optimizer state",
         "XLA arguments", "XLA temp"], rows)  # fmt: skip
    r = res["ratios"]
    return (
        f"Setup: {res.get('shape', '?')}; median of {res.get('reps', '?')} interleaved rounds.\n\n"
        f"{body}\n\nLoRA over full-parameter: {ratio(r['lora_speedup_jax'])} in jaxunlearn, "
        f"{ratio(r['lora_speedup_torch'])} in transformers + peft. jaxunlearn vs torch: "
        f"LoRA {ratio(r['lora_jax_vs_torch'])}, full {ratio(r.get('full_jax_vs_torch'))}."
    )


def render_bench_ssd_vision(res: dict) -> str:
    s, r, acc = res["seconds"], res["ratios"], res["test_acc"]
    reps = res.get("reps", "?")
    rows = [
        ["retrain oracle (JAX)", num(s["retrain_oracle"]), "1.0"],
        ["jaxunlearn SSD, cold (incl. compile)", num(s["jax_cold"]), ratio(r["cold_vs_retrain"])],
        [f"jaxunlearn SSD, warm (median of {reps})", num(s["jax_warm_median"]),
         ratio(r["warm_vs_retrain"])],
        [f"torch SSD (median of {reps})", num(s["torch_median"]), ratio(r["torch_vs_retrain"])],
    ]  # fmt: skip
    return (
        f"{res['model']}: {res.get('setup', '')}. Test accuracy: target {acc['target']:.1f}, "
        f"retrained oracle {acc['oracle']:.1f}, after SSD {acc['jax']:.1f} (JAX) / "
        f"{acc['torch']:.1f} (torch); the two SSD results agree on "
        f"{100 * res['prediction_agreement']:.1f}% of test predictions; torch twin logits "
        f"within {res['parity_max_abs_logit_diff']:.1e}.\n\n"
        + table(["what", "seconds", "speed-up vs retrain"], rows)
        + f"\n\njaxunlearn warm vs torch: {ratio(r['warm_vs_torch'])}"
    )


def render_bench_plan(res: dict) -> str:
    parts = []
    if "table" in res:
        g = 2**30
        rows = [
            [p["model"], p["method"], p["mesh"], f"{p['batch']} x {p['seq']}", p["precision"],
             p["remat"], f"{p['param_bytes'] / g:.2f}", f"{p['optimizer_bytes'] / g:.2f}",
             f"{p['temp_bytes'] / g:.2f}", f"{p['peak_bytes'] / g:.2f}",
             f"{p['flops'] / 1e9:.0f}", f"{p['compile_seconds']:.1f}",
             "yes" if p["fits_h100_80gb"] else "no"]
            for p in res["table"]["rows"]
        ]  # fmt: skip
        parts.append(table(
            ["model", "method", "mesh", "batch/device x seq", "precision", "remat", "params GiB",
             "optimizer GiB", "temp GiB", "peak GiB/device", "GFLOP/step/device", "compile s",
             "fits H100 80GB"], rows))  # fmt: skip
    if "compile" in res:
        c = res["compile"]
        best = c["best_compile_s"]
        parts.append(
            table(["model", "best compile s"], [[m, f"{s:.1f}"] for m, s in best.items()])
            + f"\n\nRatio 8B / 1B: **{c['ratio_8b_over_1b']:.2f}** (target <= 2; best of "
            f"{c['repeats']}, mesh {c['mesh']})."
        )
    if "validate" in res:
        rows = [[v["precision"], f"{v['planned_peak_bytes'] / 2**20:.0f}",
                 f"{v['measured_peak_bytes'] / 2**20:.0f}",
                 f"{v['ratio_measured_over_planned']:.2f}"] for v in res["validate"]["rows"]]  # fmt: skip
        parts.append(table(["precision", "planned MiB", "measured RSS MiB", "measured / planned"],
                           rows))  # fmt: skip
    return "\n\n".join(parts)


def render_bench_demo(res: dict) -> str:
    held = (res.get("quiet_gate") or {}).get("held", False)
    wall = num(res["wall_s"]) + ("" if held else f" {LOADED}")
    return table(
        ["command", "model cache", "wall s", "CPU s"],
        [[f"`{res['demo_command']}`", res["cache"], wall, num(res["cpu_s"])]],
    )


def render_bench_accelerator(res: dict) -> str:
    rows = [
        [m["method"], num(m["compile_s"]), num(m["step_s"]), num(m["tokens_per_s"]),
         num(m["model_tflops_per_s"]), "–" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"]
        for m in res["methods"]
    ]  # fmt: skip
    return (
        f"Device: {res['device']} ({res['backend']}), model {res['model']}, {res['precision']}, "
        f"batch {res['batch']} x {res['seq']}, peak memory "
        f"{res['peak_memory_bytes'] / 2**30:.1f} GiB.\n\n"
        + table(["method", "compile s", "step s", "tokens/s", "model TFLOP/s", "MFU"], rows)
    )


def _flat(d: dict, prefix: str = "", depth: int = 2):
    for k, v in d.items():
        if isinstance(v, dict) and depth > 1 and not {"value", "status"} <= set(v):
            yield from _flat(v, f"{prefix}{k}.", depth - 1)
        elif isinstance(v, (int, float, str)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def render_bench_eval(res: dict) -> str:
    """bench_eval: wall times, the three ratios (withheld when loaded) and the phase table."""
    quiet = normalise_gate(res) or {"held": False, "reason": "no gate recorded"}

    def eval_ratio(key: str) -> str:
        v = res.get(key)
        if isinstance(v, dict):
            return ratio(v)
        if v is None:
            return "withheld (loaded)" if "ratio_withheld" in res else "–"
        return ratio(_ratio_from(v, quiet))

    rows = [
        ["jaxunlearn, first run (compilation included)", f"{num(res.get('jax_first_s'))} s",
         eval_ratio("torch_over_jax_first")],
        ["jaxunlearn, compiled", f"{num(res.get('jax_s'))} s", eval_ratio("torch_over_jax")],
        ["transformers + torch", f"{num(res.get('torch_s'))} s", ""],
        ["teacher-forced scoring alone", "", eval_ratio("torch_over_jax_scoring")],
    ]  # fmt: skip
    rows += _eval_bounds(res, quiet)
    parts = [
        f"{res.get('n_items', '?')} items, batch {res.get('batch_size', '?')}, "
        f"{res.get('max_new_tokens', '?')} new tokens, scoring {res.get('scoring', '?')}.",
        table(["side", "wall time", "torch / jaxunlearn"], rows),
    ]
    phases = res.get("phases_s") or {}
    if phases:
        names = sorted({k for col in phases.values() for k in col})
        prow = [[n, *(num(col.get(n)) for col in phases.values())] for n in names]
        parts += ["Seconds per phase:", table(["phase", *phases], prow)]
    if "forget_loss_max_abs_diff" in res:
        parts.append(
            f"Forget-set length-normalised losses agree to {res['forget_loss_max_abs_diff']:.1e}; "
            f"{100 * res.get('identical_generations', 0):.0f}% of generations are identical."
        )
    return "\n\n".join(parts)


def _eval_bounds(res: dict, quiet: dict) -> list[list[str]]:
    # From the compiled run's phases: generation alone, and the compiled-suite ratio the
    # run would reach if jaxunlearn's teacher-forced scoring took no time at all.
    phases = res.get("phases_s") or {}
    jax_p, torch_p = phases.get("jax (compiled)"), phases.get("transformers+torch")
    if not (jax_p and torch_p and jax_p.get("generate") and res.get("jax_s")):
        return []
    score = sum(v for k, v in jax_p.items() if k.startswith("score/"))
    return [
        ["generation alone", f"{num(jax_p['generate'])} s",
         ratio(_ratio_from(torch_p["generate"] / jax_p["generate"], quiet))],
        ["bound: compiled suite if jaxunlearn's scoring took no time",
         f"{num(res['jax_s'] - score)} s", ratio(_ratio_from(res["torch_s"] / (res["jax_s"] - score), quiet))],
    ]  # fmt: skip


def render_bench_decode(res: dict) -> str:
    """bench_decode: milliseconds per decode step's attention (6 layers), per cache size."""
    rows = [
        [slots, *(num(r["ms_per_step"].get(k)) for k in ("jax", "jax_before", "torch")),
         ratio(r["torch_over_jax"]), ratio(r["before_over_jax"]), f"{r['max_abs_diff']:.1e}"]
        for slots, r in (res.get("slots") or {}).items()
    ]  # fmt: skip
    head = ["slots", "jaxunlearn ms", "previous layout ms", "torch sdpa ms", "torch / jaxunlearn",
            "previous / jaxunlearn", "max abs diff"]  # fmt: skip
    shape = res.get("shape", {})
    out = (
        f"{shape.get('rows', '?')} rows, {shape.get('query_heads', '?')} query heads over "
        f"{shape.get('kv_heads', '?')} key/value heads of {shape.get('head_dim', '?')}, "
        f"{shape.get('layers', '?')} layers per step.\n\n" + table(head, rows)
    )
    proj = res.get("projections")
    if proj:
        ms = proj["ms_per_step"]
        out += "\n\n" + table(
            ["the step's matrix products", "jaxunlearn (XLA:CPU) ms", "torch ms",
             "torch / jaxunlearn", "max rel diff"],
            [[f"{proj['products']} products, {shape.get('rows', '?')} rows", num(ms["jax"]),
              num(ms["torch"]), ratio(proj["torch_over_jax"]), f"{proj['max_rel_diff']:.1e}"]],
        )  # fmt: skip
    return out


def _ratio_from(value: float, quiet: dict) -> dict:
    if quiet.get("held"):
        return {"value": value, "status": "quiet"}
    return {"value": value, "status": "loaded", "reason": quiet.get("reason", "")}


def render_generic(res: dict) -> str:
    """Any result without its own renderer: its scalar fields (two levels) and its ratios."""
    skip = ("command", "benchmark", "machine", "quiet_gate", "ratios")
    rows = [
        [k, num(v) if isinstance(v, (int, float)) else v]
        for k, v in _flat({k: v for k, v in res.items() if k not in skip})
    ]
    out = table(["field", "value"], rows) if rows else ""
    ratios = res.get("ratios")
    if isinstance(ratios, dict) and ratios:
        out += "\n\n" + table(["ratio", "value"], [[k, ratio(v)] for k, v in ratios.items()])
    return out


RENDERERS: dict[str, Callable[[dict], str]] = {
    "bench_model": render_bench_model,
    "bench_eval": render_bench_eval,
    "bench_decode": render_bench_decode,
    "bench_unlearn": render_bench_unlearn,
    "bench_lora": render_bench_lora,
    "bench_ssd_vision": render_bench_ssd_vision,
    "bench_plan": render_bench_plan,
    "bench_demo": render_bench_demo,
    "bench_accelerator": render_bench_accelerator,
}

# Which numbers change with the CPU (or device) a benchmark runs on, by benchmark.
VARIES = {
    "bench_model": "all times and ratios (XLA's YNNPACK vs MKL kernels depend on AVX-512/AMX).",
    "bench_unlearn": "all times and ratios.",
    "bench_decode": "times and ratios; the outputs agree to float rounding.",
    "bench_eval": "times and ratios; the scores themselves agree across CPUs to float tolerance.",
    "bench_lora": "times and ratios; parameter and byte counts do not.",
    "bench_ssd_vision": "times and ratios; accuracies only in the last digits.",
    "bench_plan": "compile seconds (and their ratio); bytes and FLOPs do not.",
    "bench_demo": "wall and CPU time; the leaderboard's last digits (README.md says why).",
    "bench_accelerator": "everything: it depends on the accelerator.",
}


def missing_note(name: str, results_dir: Path, how: str | None) -> str:
    where = results_dir / f"{name}.json"
    try:
        where = where.relative_to(ROOT)
    except ValueError:
        pass
    return (
        f"> **No result**: `{where}` is missing, so this section has no figures. "
        + (f"Produce it with `{how}`." if how else "")
    ).rstrip()


def render_section(name: str, results_dir: Path, how: str | None = None) -> str:
    """The body for ``{{render name}}``: header + tables, or a note if there is no JSON."""
    path = results_dir / f"{name}.json"
    if not path.exists():
        return missing_note(name, results_dir, how)
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return f"> **Unreadable result** `{path.name}`: {e}. Re-run `{how or name}`."
    kind = res.get("benchmark", name)
    body = RENDERERS.get(kind, render_generic)(res)
    return header(res, VARIES.get(kind, "")) + "\n\n" + body


HEADING = re.compile(r"^(#+)(\s)", re.M)


def include(path: str, top_level: int = 3) -> str:
    """A Markdown fragment, its headings shifted so the shallowest is `top_level` deep."""
    p = ROOT / path
    if not p.exists():
        return f"> `{path}` is not present (its benchmark's write-up has not been merged yet)."
    text = p.read_text(encoding="utf-8").strip()
    levels = [len(m.group(1)) for m in HEADING.finditer(text)]
    if levels:
        shift = top_level - min(levels)
        text = HEADING.sub(lambda m: "#" * max(1, len(m.group(1)) + shift) + m.group(2), text)
    return text


def render_text(template: str, results_dir: Path, how: dict[str, str] | None = None) -> str:
    """Replaces every directive line of `template`."""
    out = []
    for line in template.splitlines():
        m = DIRECTIVE.match(line)
        if not m:
            out.append(line)
        elif m.group(1) == "render":
            out.append(render_section(m.group(2), results_dir, (how or {}).get(m.group(2))))
        else:
            out.append(include(m.group(2)))
    return "\n".join(out).rstrip() + "\n"


def render_file(
    template: Path, out: Path, results_dir: Path, how: dict[str, str] | None = None
) -> None:
    out.write_text(render_text(template.read_text(encoding="utf-8"), results_dir, how), "utf-8")
