"""Statistics, result rows and table formatting for the benchmark suite."""

from __future__ import annotations

import math
import statistics
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

PEERS = ("actorflow", "plain", "pykka", "dask")
PEER_TITLES = {
    "actorflow": "actorflow",
    "plain": "plain loop",
    "pykka": "raw pykka",
    "dask": "dask",
}

Kind = Literal["time", "rate"]


@dataclass(frozen=True)
class Config:
    """Sizes and repetitions; ``quick`` shrinks them for a smoke run."""

    quick: bool
    w1a_items: int
    w1a_warmup: int
    w1b_items: int
    w1b_reps: int
    w3a_tasks: int
    w3a_reps: int
    w3b_warm_reps: int
    w3b_cold_reps: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(True, 200, 50, 2_000, 3, 1_000, 1, 10, 1)
        return cls(False, 2_000, 300, 20_000, 5, 1_000, 5, 50, 5)


class Unavailable:
    """A peer that could not be measured for a benign reason (e.g. dask not installed)."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __str__(self) -> str:
        return "n/a"


class Failed:
    """A measurement that raised: shown as ERROR, the traceback goes to stderr."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __str__(self) -> str:
        return "ERROR"


Value = float | Unavailable | Failed | None


@dataclass(frozen=True)
class Target:
    """``op value`` on the actorflow measurement, or on its ratio to a peer."""

    op: Literal["<=", ">="]
    value: float
    against: str | None = None  # None: absolute; else a peer name (ratio to it)
    reference: str = ""  # e.g. "raw pykka ~240 µs"

    def describe(self, kind: Kind) -> str:
        if self.against is None:
            text = f"{self.op} {fmt_value(self.value, kind)}"
        else:
            text = f"{self.op} {self.value:g}x {PEER_TITLES[self.against]}"
        return text


@dataclass
class Row:
    """One line of the table: a metric of a workload across implementations."""

    workload: str
    metric: str
    kind: Kind
    values: dict[str, Value] = field(default_factory=dict)
    target: Target | None = None
    notes: list[str] = field(default_factory=list)

    def ratio(self, peer: str) -> float | None:
        """actorflow's speed relative to ``peer`` (> 1: actorflow is faster)."""
        a, p = self.values.get("actorflow"), self.values.get(peer)
        if not isinstance(a, float) or not isinstance(p, float) or a <= 0 or p <= 0:
            return None
        return p / a if self.kind == "time" else a / p

    def status(self) -> str:
        t = self.target
        if t is None:
            return ""
        if t.against is None:
            measured = self.values.get("actorflow")
            if not isinstance(measured, float):
                return "n/a"
        else:
            measured = self.ratio(t.against)
            if measured is None:
                return "n/a"
        ok = measured <= t.value if t.op == "<=" else measured >= t.value
        return "PASS" if ok else "FAIL"

    def has_error(self) -> bool:
        return any(isinstance(v, Failed) for v in self.values.values())


# ------------------------------------------------------------------- statistics


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 100]."""
    s = sorted(xs)
    k = max(0, math.ceil(q / 100 * len(s)) - 1)
    return s[k]


# ------------------------------------------------------------------- formatting


def fmt_value(v: Value, kind: Kind) -> str:
    if v is None:
        return "-"
    if not isinstance(v, float):
        return str(v)
    if kind == "rate":
        for scale, suffix in ((1e6, "M"), (1e3, "k")):
            if v >= scale:
                return f"{v / scale:.3g}{suffix}/s"
        return f"{v:.3g}/s"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v * 1e9:.3g} ns"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2g}x" if r < 100 else f"{r:.0f}x"


def render_table(rows: Sequence[Row]) -> str:
    header = [
        "workload",
        "metric",
        *(PEER_TITLES[p] for p in PEERS),
        "af vs plain",
        "af vs pykka",
        "af vs dask",
        "target",
        "result",
    ]
    lines: list[list[str]] = []
    for row in rows:
        target = ""
        if row.target is not None:
            target = row.target.describe(row.kind)
            if row.target.reference:
                target += f" ({row.target.reference})"
        lines.append(
            [
                row.workload,
                row.metric,
                *(fmt_value(row.values.get(p), row.kind) for p in PEERS),
                *(fmt_ratio(row.ratio(p)) for p in PEERS[1:]),
                target,
                row.status(),
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = set(range(2, 9))

    def fmt(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [fmt(header), rule, *(fmt(line) for line in lines)]
    return "\n".join(body)


# ----------------------------------------------------------------------- helpers


def failed(label: str, exc: BaseException) -> Failed:
    """Report a measurement that raised (traceback to stderr) as :class:`Failed`."""
    print(f"\n[bench] {label} failed:", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    return Failed(exc)


def attempt(label: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; an exception becomes :class:`Failed` (traceback to stderr)."""
    try:
        return fn()
    except Exception as exc:
        return failed(label, exc)


def live_threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def leaked_threads(before: set[threading.Thread], grace: float = 1.0) -> list[str]:
    """Names of threads started since ``before`` still alive after ``grace`` seconds."""
    import time

    deadline = time.perf_counter() + grace
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.perf_counter() >= deadline:
            return sorted(t.name for t in extra)
        time.sleep(0.02)
