"""Wall time of `jaxunlearn demo`: what a user waits for, end to end.

Runs ``python -m jaxunlearn.cli demo --preset PRESET`` in a child process (tokenizer,
target and oracle training unless cached, every method's unlearning and evaluation, the
leaderboard and plot) and records its wall time, its CPU time and the machine. With no
``--cache-dir`` the model cache is a fresh temporary folder, so the target and oracle are
trained too (what a first run costs); pass ``--cache-dir`` of a filled cache to time only
unlearning + evaluation.

There is no torch side, but other processes' load still stretches the wall time, so the run
starts only once the CPUs are otherwise idle and the other processes' share during the run
is recorded (`--gate`, as in bench_model.py; ``quiet_gate.held`` says whether it stayed
under the gate).

    python benchmarks/bench_demo.py --preset small
    python benchmarks/bench_demo.py --preset tiny --json-out benchmarks/results/bench_demo.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _quiet import Gate, add_gate_args, add_json_arg, write_json  # noqa: E402


def demo_command(preset: str, out: Path, cache: Path, methods: str | None) -> list[str]:
    """The `jaxunlearn demo` command line, run with this interpreter."""
    cmd = [sys.executable, "-m", "jaxunlearn.cli", "demo", "--preset", preset]
    cmd += ["--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    if methods:
        cmd += ["--methods", methods]
    return cmd


def run_demo(cmd: list[str], log: Path) -> dict:
    """Runs the demo, its output into `log`; returns its exit code and CPU seconds."""
    before = os.times()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return {"returncode": rc, "cpu_s": cpu}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument(
        "--cache-dir", help="model cache to use (default: a fresh one, so models are trained)"
    )
    p.add_argument("--methods", help="comma-separated methods (default: the demo's, all)")
    add_json_arg(p)
    add_gate_args(p, max_wait=300.0)
    args = p.parse_args(argv)

    gate = Gate(args.gate, args.max_wait)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        cmd = demo_command(args.preset, Path(tmp) / "out", cache, args.methods)
        log = Path(tmp) / "demo.log"
        wall, facts = gate.once(lambda: run_demo(cmd, log))
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    if facts["returncode"] != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"jaxunlearn demo failed (exit {facts['returncode']}): {' '.join(cmd)}")
    quiet = gate.record()
    result = {
        "benchmark": "bench_demo",
        "preset": args.preset,
        "cache": "given: " + args.cache_dir if args.cache_dir else "fresh (models trained)",
        "methods": args.methods or "all (the demo's default)",
        "wall_s": wall,
        "cpu_s": facts["cpu_s"],
        "quiet_gate": quiet,
        # The command as a user types it; --out and a fresh --cache-dir are temporary folders.
        "demo_command": " ".join(
            ["jaxunlearn", "demo", "--preset", args.preset]
            + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
            + (["--methods", args.methods] if args.methods else [])
        ),
    }
    print(f"jaxunlearn demo --preset {args.preset}: {wall:.1f} s wall, {facts['cpu_s']:.1f} s CPU")
    print(f"quiet gate {'held' if quiet['held'] else 'NOT HELD'}: {quiet['reason']}")
    write_json(args.json_out, result)


if __name__ == "__main__":
    main()
