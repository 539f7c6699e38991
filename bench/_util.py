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

PEERS = ("actorflow", "plain", "pykka", "dask", "procpool", "bytewax")
PEER_TITLES = {
    "actorflow": "actorflow",
    "plain": "plain loop",
    "pykka": "raw pykka",
    "dask": "dask",
    "procpool": "ProcessPool",
    "bytewax": "bytewax",
}
RATIO_TITLES = {
    "plain": "af vs plain",
    "pykka": "af vs pykka",
    "dask": "af vs dask",
    "procpool": "af vs ProcessPool",
    "bytewax": "af vs bytewax",
}

Kind = Literal["time", "rate", "mem"]  # mem: bytes, smaller is better (like time)


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
    w4_size: int  # integers per crunch task (--quick only; a full run calibrates ~0.25 s)
    w4_reps: int
    w2_lines: int
    w2_reps: int
    w5_reps: int
    async_reps: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(
                quick=True,
                w1a_items=200,
                w1a_warmup=50,
                w1b_items=2_000,
                w1b_reps=3,
                w3a_tasks=1_000,
                w3a_reps=1,
                w3b_warm_reps=10,
                w3b_cold_reps=1,
                w4_size=3_000,
                w4_reps=1,
                w2_lines=30_000,
                w2_reps=1,
                w5_reps=1,
                async_reps=1,
            )
        return cls(
            quick=False,
            w1a_items=2_000,
            w1a_warmup=300,
            w1b_items=20_000,
            w1b_reps=5,
            w3a_tasks=1_000,
            w3a_reps=5,
            w3b_warm_reps=50,
            w3b_cold_reps=5,
            w4_size=12_000,
            w4_reps=5,
            w2_lines=300_000,
            w2_reps=5,
            w5_reps=3,
            async_reps=3,
        )


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

    op: Literal["<=", ">=", "<"]
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
        return a / p if self.kind == "rate" else p / a

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
        if t.op == "<=":
            ok = measured <= t.value
        elif t.op == "<":
            ok = measured < t.value
        else:
            ok = measured >= t.value
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
    if kind == "mem":
        return f"{v / 2**20:.3g} MB"
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
        *(RATIO_TITLES[p] for p in PEERS[1:]),
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
    right = set(range(2, 2 + 2 * len(PEERS) - 1))

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


_MP_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


class PeakRSS:
    """Samples the RSS of this process plus its descendants in a thread; keeps the peak.

    ``with PeakRSS() as mem: ...`` then ``mem.peak`` (bytes) and ``mem.before`` (this
    process alone, on entry). Child RSS counts pages shared with the parent (e.g. after
    ``fork``) in each process, as ``ps`` does; with ``pss=True`` the proportional set
    size (shared pages split between the processes sharing them) is summed as well, into
    ``mem.peak_pss`` (slower: each sample reads ``/proc/PID/smaps``). multiprocessing's
    interpreter-wide helpers (the forkserver, the resource tracker) are not counted; the
    workers they fork are.
    """

    def __init__(self, interval: float = 0.02, pss: bool = False) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._pss = pss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-peak-rss", daemon=True)
        self._helpers: dict[int, bool] = {}
        self.before = 0
        self.peak = 0
        self.peak_pss = 0

    def _memory(self, proc: Any) -> tuple[int, int]:
        if self._pss:
            full = proc.memory_full_info()
            return int(full.rss), int(full.pss)
        return int(proc.memory_info().rss), 0

    def sample(self) -> tuple[int, int]:
        """``(rss, pss)`` summed over this process and its descendants (pss 0 unless asked)."""
        import psutil

        rss, pss = self._memory(self._proc)
        for child in self._proc.children(recursive=True):
            try:
                if not self._is_helper(child):
                    r, p = self._memory(child)
                    rss += r
                    pss += p
            except psutil.Error:
                pass
        return rss, pss

    def _is_helper(self, child: Any) -> bool:
        """multiprocessing's interpreter-wide forkserver / resource tracker: not counted."""
        known = self._helpers.get(child.pid)
        if known is None:
            # the forkserver's workers share its command line, but are its children
            direct = child.ppid() == self._proc.pid
            cmd = " ".join(child.cmdline()) if direct else ""
            known = self._helpers[child.pid] = any(h in cmd for h in _MP_HELPERS)
        return known

    def _update(self) -> None:
        rss, pss = self.sample()
        self.peak = max(self.peak, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def _loop(self) -> None:
        while True:
            self._update()
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakRSS:
        self.before = int(self._proc.memory_info().rss)
        self._update()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
