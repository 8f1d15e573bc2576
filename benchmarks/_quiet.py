"""Shared by the benchmarks: the quiet-machine gate, interleaved timing and the JSON record.

On a shared machine other processes' load slows torch's OpenMP workers far more than XLA's
(benchmarks/README.md), so a JAX / torch ratio is only meaningful when measured while the
CPUs are otherwise idle. `interleaved_rounds` alternates the functions it times round by
round and, with a gate, keeps only rounds during which other processes left the CPUs idle;
`gate_record` turns what happened into the ``quiet_gate`` entry every benchmark JSON carries,
and `ratio_entry` refuses to state a ratio as a result when the gate did not hold.

Every benchmark writes one JSON dict with `write_json` (``--json-out PATH``) that includes
`machine_info()`: the CPU model and vector extensions, cores, and library versions, because
XLA and MKL pick other kernels on other CPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

RATIO_LOADED = "loaded"  # ratio entry status when the quiet gate did not hold


class OtherProcessCPU:
    """CPU used by *other* processes, as a fraction of all cores (Linux /proc/stat).

    Busy ticks of the whole machine minus this process's own CPU time (children included),
    over a window.
    """

    def __init__(self):
        self.available = os.path.exists("/proc/stat")
        self._hz = os.sysconf("SC_CLK_TCK") if self.available else 1

    def _busy_s(self) -> float:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return (sum(ticks) - ticks[3] - ticks[4]) / self._hz  # all but idle and iowait

    @staticmethod
    def _own_cpu_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def measure(self, fn) -> float:
        """Runs fn() and returns the other processes' mean CPU share meanwhile (nan if unknown)."""
        if not self.available:
            fn()
            return float("nan")
        b0, c0, w0 = self._busy_s(), self._own_cpu_s(), time.perf_counter()
        fn()
        b1, c1, w1 = self._busy_s(), self._own_cpu_s(), time.perf_counter()
        if w1 - w0 < 0.25:  # /proc/stat counts 10 ms ticks: too coarse for short windows
            return float("nan")
        return max(0.0, (b1 - b0) - (c1 - c0)) / os.cpu_count() / (w1 - w0)


def wait_for_quiet(gate: float | None, deadline: float, other: OtherProcessCPU | None = None):
    """Blocks until other processes use < `gate` of the CPUs for 0.5 s, or until `deadline`."""
    other = other or OtherProcessCPU()
    if gate is None or not other.available:
        return
    while time.monotonic() < deadline and other.measure(lambda: time.sleep(0.5)) > gate:
        pass


def interleaved_rounds(
    fns: dict, reps: int, *, gate: float | None, deadline: float, warmup: int = 1
) -> tuple[dict[str, list[float]], list[float], dict[str, list]]:
    """Times each function `reps` times, alternating their order every round.

    With `gate`, a round starts only once other processes use less than that share of the
    CPUs, and a round during which they used more is discarded and repeated, until
    `deadline` (time.monotonic()); after it, rounds are kept whatever the load.

    Returns:
      (seconds per call of each function, other processes' CPU share during each kept
      round, each function's return values in the kept rounds).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    other = OtherProcessCPU()
    gate = gate if other.available else None
    times = {name: [] for name in fns}
    values = {name: [] for name in fns}
    others = []
    names = list(fns)
    while len(others) < reps:
        order = names if len(others) % 2 == 0 else names[::-1]
        wait_for_quiet(gate, deadline, other)
        round_times, round_values = {}, {}

        def run_round(order=order, round_times=round_times, round_values=round_values):
            for name in order:
                t0 = time.perf_counter()
                round_values[name] = fns[name]()
                round_times[name] = time.perf_counter() - t0

        share = other.measure(run_round)
        if gate is not None and share > gate and time.monotonic() < deadline:  # nan passes
            continue  # disturbed: repeat the round
        for name, t in round_times.items():
            times[name].append(t)
            values[name].append(round_values[name])
        others.append(share)
    return times, others, values


def _interleaved_times(
    fns: dict, reps: int, *, gate: float | None, deadline: float, warmup: int = 1
) -> tuple[dict[str, list[float]], list[float]]:
    """`interleaved_rounds` without the return values: (times per name, others' shares)."""
    times, others, _ = interleaved_rounds(fns, reps, gate=gate, deadline=deadline, warmup=warmup)
    return times, others


def add_gate_args(p: argparse.ArgumentParser, max_wait: float = 900.0) -> None:
    """``--gate`` and ``--max-wait``, the same for every benchmark."""
    p.add_argument(
        "--gate",
        type=float,
        default=0.05,
        help="time only while other processes use less than this share of the CPUs "
        "(Linux; 0 disables). On a shared machine their load skews JAX/torch ratios",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=max_wait,
        help="seconds to wait in total for quiet; afterwards time whatever the load, and "
        "mark the ratios 'loaded'",
    )


def add_json_arg(p: argparse.ArgumentParser) -> None:
    """``--json-out PATH`` (``--json`` kept as an alias)."""
    p.add_argument("--json-out", "--json", dest="json_out", help="write the result dict here")


class Gate:
    """The gate settings of one run and every kept round's other-process CPU share."""

    def __init__(self, gate: float, max_wait: float):
        self.gate = None if gate is None or gate <= 0 else gate
        self.max_wait = max_wait
        self.deadline = time.monotonic() + max_wait
        self.others: list[float] = []

    def rounds(self, fns: dict, reps: int, warmup: int = 1):
        """`interleaved_rounds` under this gate; remembers the shares. Returns (times, values)."""
        times, others, values = interleaved_rounds(
            fns, reps, gate=self.gate, deadline=self.deadline, warmup=warmup
        )
        self.others += others
        return times, values

    def times(self, fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
        return self.rounds(fns, reps, warmup)[0]

    def once(self, fn) -> tuple[float, object]:
        """Times a call that cannot be repeated (a cold, compiling call): waits for quiet,
        runs it once and records the load meanwhile. Returns (seconds, fn's value)."""
        other = OtherProcessCPU()
        wait_for_quiet(self.gate if other.available else None, self.deadline, other)
        out = {}

        def call():
            t0 = time.perf_counter()
            out["value"] = fn()
            out["s"] = time.perf_counter() - t0

        self.others.append(other.measure(call))
        return out["s"], out["value"]

    def record(self) -> dict:
        return gate_record(self.gate, self.others, self.max_wait)


def gate_record(gate: float | None, others: list[float], max_wait: float | None = None) -> dict:
    """The ``quiet_gate`` entry of a result: did other processes leave the CPUs idle?

    ``held`` is true only if the gate was on and every kept round's other-process share
    was measured and below it.
    """
    known = [x for x in others if not math.isnan(x)]
    worst = max(known) if known else None
    if gate is None:
        held, reason = False, "gate off (--gate 0 or no /proc/stat): timed whatever the load"
    elif not others:
        held, reason = True, "nothing timed against the gate"
    elif worst is not None and worst > gate:
        held = False
        reason = (
            f"deadline passed (--max-wait {max_wait:g} s): rounds kept while other processes "
            f"used up to {100 * worst:.0f}% of the CPUs (gate {100 * gate:.0f}%)"
        )
    elif len(known) < len(others):
        held = False
        reason = (
            f"{len(others) - len(known)} round(s) under 0.25 s, too short to measure other "
            "processes' CPU (smoke-run sizes?)"
        )
    else:
        held, reason = True, f"other processes used at most {100 * worst:.1f}% of the CPUs"
    return {
        "gate": gate,
        "held": held,
        "reason": reason,
        "other_processes_cpu_max": worst,
        "rounds": len(others),
        "max_wait_s": max_wait,
    }


def ratio_entry(value: float, quiet_gate: dict) -> dict:
    """A JAX/torch ratio with its standing: a result only if the quiet gate held."""
    if quiet_gate["held"]:
        return {"value": value, "status": "quiet"}
    return {"value": value, "status": RATIO_LOADED, "reason": quiet_gate["reason"]}


def format_ratio(entry: dict) -> str:
    """How a ratio is printed: loaded ones never bare."""
    if entry["status"] == "quiet":
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [LOADED, not a result: {entry['reason']}]"


def _cpu() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001  (not installed: nothing to report)
        return None


def machine_info() -> dict:
    """CPU model, vector extensions, cores, memory, load and library versions of this run."""
    model, flags = _cpu()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "amx_tile" in flags:
        isa += " + AMX"
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    versions = {
        m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")
    }
    return {
        "cpu": model,
        "isa": isa,
        "cores": os.cpu_count(),
        "memory_gib": None if mem is None else round(mem, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {k: v for k, v in versions.items() if v},
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def command_line() -> str:
    """The command that produced this run, as a user would type it."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def write_json(path: str | None, result: dict) -> None:
    """Writes `result` (plus `command` and `machine` if missing) to `path`, if given."""
    result.setdefault("command", command_line())
    result.setdefault("machine", machine_info())
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=_jsonable)
            f.write("\n")


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
