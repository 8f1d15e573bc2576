"""Regenerates BENCHMARKS.md: runs the benchmarks (quiet-gated), then renders the file.

    python benchmarks/regenerate.py                  # every CPU benchmark, then render
    python benchmarks/regenerate.py --core           # bench_model, bench_unlearn, bench_eval
    python benchmarks/regenerate.py --only bench_lora --only bench_demo
    python benchmarks/regenerate.py --render-only    # re-render from the stored JSON
    python benchmarks/regenerate.py --quick          # smoke run: tiny sizes, own folder
    python benchmarks/regenerate.py --list           # the benchmarks and their commands

Each benchmark runs in its own process with ``--json-out benchmarks/results/NAME.json``;
its output goes to ``benchmarks/results/logs/NAME.log``. A failed benchmark leaves its
previous JSON in place (and says so); the others still run. Then BENCHMARKS.md is rendered
from benchmarks/BENCHMARKS.template.md (`render.py`): every table from those JSON files,
each section with its command, machine and whether the quiet gate held.

``--quick`` writes to benchmarks/results/quick/ and renders
benchmarks/results/quick/BENCHMARKS.md, so a smoke run never replaces real results.
Benchmarks in the "heavy" group (audit_small: ~20 min; bench_1b_cpu: ~15 min and ~18 GiB
resident) and the accelerator benchmark (needs a GPU/TPU) run only when named with ``--only``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from render import ROOT, render_file  # noqa: E402  (benchmarks/ is on sys.path)

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "BENCHMARKS.template.md"


@dataclass(frozen=True)
class Bench:
    """One benchmark run: its script, full and smoke-run arguments, and its group.

    Attributes:
      name: the result's file name (``results/NAME.json``).
      script: the script in benchmarks/.
      args: arguments of the full run (``--json-out`` is added).
      quick: arguments of the smoke run (None: skipped by ``--quick``).
      group: "core", "extra" (run by default), "heavy" or "accelerator" (only with --only).
      minutes: rough wall time of the full run on a quiet 2-core CPU.
    """

    name: str
    script: str
    args: tuple[str, ...]
    quick: tuple[str, ...] | None
    group: str
    minutes: float

    def command(self, quick: bool) -> list[str]:
        return [f"benchmarks/{self.script}", *(self.quick if quick else self.args)]


BENCHES = [
    Bench("bench_model", "bench_model.py", ("--reps", "5"), ("--quick",), "core", 3),
    Bench(
        "bench_unlearn",
        "bench_unlearn.py",
        ("--reps", "5", "--gu-cycles", "2"),
        ("--quick",),
        "core",
        10,
    ),  # fmt: skip
    Bench(
        "bench_eval",
        "bench_eval.py",
        ("--limit", "32", "--max-new-tokens", "200", "--batch-size", "32", "--repeats", "3"),
        ("--limit", "4", "--max-new-tokens", "8", "--batch-size", "4", "--repeats", "1"),
        "core",
        8,
    ),  # fmt: skip
    Bench(
        "bench_decode", "bench_decode.py", (), ("--slots", "64", "--repeats", "2"), "extra", 1
    ),  # fmt: skip
    Bench("bench_lora", "bench_lora.py", ("--reps", "5"), ("--quick",), "extra", 3),
    Bench(
        "bench_ssd_vision_cnn",
        "bench_ssd_vision.py",
        ("--epochs", "15"),
        ("--epochs", "1", "--reps", "1"),
        "extra",
        1.5,
    ),  # fmt: skip
    Bench(
        "bench_ssd_vision_resnet18",
        "bench_ssd_vision.py",
        ("--model", "resnet18", "--epochs", "15"),
        ("--model", "resnet18", "--epochs", "1", "--reps", "1"),
        "extra",
        4,
    ),  # fmt: skip
    Bench("bench_plan_table", "bench_plan.py", ("--table",), None, "extra", 6),
    Bench(
        "bench_plan_compile", "bench_plan.py", ("--compile", "--repeats", "2"), None, "extra", 4
    ),  # fmt: skip
    Bench(
        "bench_demo", "bench_demo.py", ("--preset", "small"), ("--preset", "tiny"), "extra", 8
    ),  # fmt: skip
    Bench("audit_small", "audit_small.py", ("--out", "/dev/null"), None, "heavy", 25),
    # ~18 GiB resident: run it alone on the machine
    Bench("bench_1b_cpu", "bench_1b_cpu.py", (), ("--smoke",), "heavy", 15),
    Bench("bench_accelerator", "bench_accelerator.py", (), ("--smoke",), "accelerator", 5),
]
BY_NAME = {b.name: b for b in BENCHES}


def how_to(b: Bench) -> str:
    return f"python benchmarks/regenerate.py --only {b.name}"


# Results that regenerate.py does not produce from the current code, and how they were made.
ONE_OFF = {
    "bench_demo_before": "git worktree add /tmp/before HEAD && cd /tmp/before && git checkout "
    "6eab679 -- jaxunlearn && python benchmarks/bench_demo.py --preset small --json-out "
    "benchmarks/results/bench_demo_before.json (then copy the JSON back; run it the same day "
    "as --only bench_demo: the machine's speed drifts between days)",
}


def selected(args) -> list[Bench]:
    if args.only:
        unknown = [n for n in args.only if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"--only {unknown}: unknown; known: {', '.join(BY_NAME)}")
        return [BY_NAME[n] for n in args.only]
    groups = {"core"} if args.core else {"core", "extra"}
    return [b for b in BENCHES if b.group in groups and (b.quick is not None or not args.quick)]


def run_one(b: Bench, results: Path, quick: bool, gate_args: list[str]) -> dict:
    """Runs one benchmark; returns its record for runs.json."""
    out = results / f"{b.name}.json"
    log = results / "logs" / f"{b.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out  # the JSON's "command"
    cmd = [sys.executable, *b.command(quick), "--json-out", str(shown)]
    if b.group != "heavy" and b.script not in ("bench_plan.py", "bench_accelerator.py"):
        cmd += gate_args
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    before = out.stat().st_mtime if out.exists() else None
    start = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {b.name}: {' '.join(cmd[1:])}", flush=True)
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    fresh = out.exists() and out.stat().st_mtime != before
    status = "ok" if rc == 0 and fresh else f"FAILED (exit {rc}; see {log.relative_to(ROOT)})"
    print(f"    {status}, {wall:.0f} s", flush=True)
    return {"command": " ".join(cmd[1:]), "returncode": rc, "wall_s": round(wall, 1),
            "json_written": fresh, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", action="append", help="run only this benchmark (repeatable)")
    p.add_argument("--core", action="store_true", help="bench_model, bench_unlearn, bench_eval")
    p.add_argument("--render-only", action="store_true", help="only re-render BENCHMARKS.md")
    p.add_argument("--quick", action="store_true", help="smoke run into results/quick/")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--results", type=Path, help="results folder (default benchmarks/results)")
    p.add_argument("--out", type=Path, help="rendered file (default BENCHMARKS.md)")
    p.add_argument("--gate", help="passed on to every gated benchmark")
    p.add_argument("--max-wait", help="passed on to every gated benchmark")
    args = p.parse_args(argv)

    if args.list:
        for b in BENCHES:
            print(
                f"{b.name:28s} {b.group:12s} ~{b.minutes:g} min  python {' '.join(b.command(False))}"
            )
        return
    results = args.results or (HERE / "results" / "quick" if args.quick else HERE / "results")
    out = args.out or (results / "BENCHMARKS.md" if args.quick else ROOT / "BENCHMARKS.md")
    results.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        gate_args = []
        for flag in ("gate", "max_wait"):
            if getattr(args, flag) is not None:
                gate_args += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
        if args.quick and args.max_wait is None:
            gate_args += ["--max-wait", "20"]
        runs_path = results / "runs.json"
        runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
        for b in selected(args):
            if args.quick and b.quick is None:
                print(f"{b.name}: no smoke-run size, skipped by --quick", flush=True)
                continue
            runs[b.name] = run_one(b, results, args.quick, gate_args)
            runs_path.write_text(json.dumps(runs, indent=2) + "\n")
    render_file(TEMPLATE, out, results, {**ONE_OFF, **{b.name: how_to(b) for b in BENCHES}})
    print(f"rendered {out}")


if __name__ == "__main__":
    main()
