"""``python -m bench [--only W1a,W3b] [--quick] [--strict] [--json FILE]``.

Runs the workloads, then prints one table: actorflow, the plain-loop limit, raw
pykka, dask, ``ProcessPoolExecutor`` and bytewax side by side (where they apply),
actorflow's speed relative to each, and the targets.
Exit status: 1 if a measurement raised (its traceback is on stderr), or with
``--strict`` if a target was missed; 0 otherwise.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata

from bench._util import PEERS, Config, Row, render_table
from bench.w1 import run_w1a, run_w1b
from bench.w3 import run_w3a, run_w3b


def _w4(name: str) -> Callable[[Config], list[Row]]:
    """A workload of ``bench.w4``, imported on first use: it imports actorflow at the top,
    which the other workloads (W3a's first-run note) leave to their own timing."""

    def run(cfg: Config) -> list[Row]:
        from bench import w4

        return getattr(w4, name)(cfg)  # type: ignore[no-any-return]

    return run


WORKLOADS: dict[str, Callable[[Config], list[Row]]] = {
    "W1a": run_w1a,
    "W1b": run_w1b,
    "W3a": run_w3a,
    "W3b": run_w3b,
    "W4": _w4("run_w4"),
    "W2": _w4("run_w2"),
    "W5": _w4("run_w5"),
    "async": _w4("run_async"),
}
WATCHDOG_S = {True: 90.0, False: 900.0}  # per workload: a hung engine dumps stacks and exits


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="actorflow vs a plain loop and peers (raw pykka, dask, ProcessPoolExecutor, "
        "bytewax), measured in the same run.",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated workloads to run (default: all of {','.join(WORKLOADS)})",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run (< 40 s)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed, too")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    by_lower = {name.lower(): name for name in WORKLOADS}
    unknown = [w for w in wanted if w.lower() not in by_lower]
    if unknown:
        parser.error(
            f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}"
        )
    args.workloads = [by_lower[w.lower()] for w in wanted] or list(WORKLOADS)
    return args


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _header(cfg: Config) -> str:
    versions = ", ".join(f"{d} {_version(d)}" for d in ("actorflow", "pykka", "dask", "bytewax"))
    mode = "quick (smoke run, small sizes)" if cfg.quick else "full"
    return (
        f"actorflow bench - {mode}\n"
        f"Python {platform.python_version()} ({sys.executable}), {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs; {versions}; {_load()}"
    )


def _load() -> str:
    """The 1-minute load average: other work on the machine skews every column."""
    try:
        return f"load average {os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "load average n/a"


def _cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) CPU time of the machine so far, from Linux's /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    times = [int(f) for f in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return times[7], sum(times)


def _steal(before: tuple[int, int] | None) -> str:
    """The share of CPU time a hypervisor gave to others since ``before``: on a VM,
    when it is high, the parallel rows (W2 (b), W4) drop for every engine alike."""
    after = _cpu_jiffies()
    if before is None or after is None or after[1] <= before[1]:
        return ""
    return f", steal {100 * (after[0] - before[0]) / (after[1] - before[1]):.1f}%"


LEGEND = """\
Columns: medians unless the metric says otherwise; "af vs X" = actorflow's speed
relative to X (X's time / actorflow's time, or actorflow's items/s / X's items/s):
> 1 means actorflow is faster, 0.5x means half as fast; for memory rows (MB) it is
X's memory / actorflow's: > 1 means actorflow uses less. n/a: peer not available;
ERROR: the measurement raised (traceback on stderr)."""


def _to_json(rows: Sequence[Row], cfg: Config) -> dict[str, object]:
    def val(v: object) -> object:
        return v if isinstance(v, float) or v is None else str(v)

    return {
        "config": cfg.__dict__,
        "rows": [
            {
                "workload": r.workload,
                "metric": r.metric,
                "kind": r.kind,
                "values": {p: val(r.values.get(p)) for p in PEERS},
                "ratios": {p: r.ratio(p) for p in PEERS[1:]},
                "target": None if r.target is None else r.target.describe(r.kind),
                "result": r.status(),
                "notes": r.notes,
            }
            for r in rows
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    cfg = Config.make(args.quick)
    print(_header(cfg), flush=True)
    rows: list[Row] = []
    started = time.perf_counter()
    for name in args.workloads:
        t0 = time.perf_counter()
        cpu0 = _cpu_jiffies()
        print(f"  running {name} ...", end="", flush=True)
        faulthandler.dump_traceback_later(WATCHDOG_S[cfg.quick], exit=True)
        try:
            rows.extend(WORKLOADS[name](cfg))
        finally:
            faulthandler.cancel_dump_traceback_later()
        print(f" {time.perf_counter() - t0:.1f} s ({_load()}{_steal(cpu0)})", flush=True)
    print()
    print(render_table(rows))
    print()
    print(LEGEND)
    notes = [n for r in rows for n in r.notes]
    if notes:
        print("\nNotes:")
        for n in notes:
            print(f"- {n}")
    print(f"\nTotal bench time {time.perf_counter() - started:.1f} s; {_load()} at the end.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(_to_json(rows, cfg), fh, indent=2)
    failed = any(r.has_error() for r in rows)
    missed = any(r.status() == "FAIL" for r in rows)
    if failed:
        print("Some measurements raised: see stderr.", file=sys.stderr)
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
