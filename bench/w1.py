"""W1: a 10-stage chain of ``x + 1``.

- W1a: one item at a time through a started graph (``running.submit(x).result()``):
  median and p99 latency.
- W1b: many items through ``running.map``: items/s.
"""

from __future__ import annotations

import gc
from time import perf_counter
from typing import Any

from bench._util import (
    Config,
    Failed,
    Row,
    Target,
    Value,
    attempt,
    failed,
    leaked_threads,
    live_threads,
    median,
    percentile,
)
from bench.peers import PykkaChain, plain_chain10, plain_chain10_many
from bench.workloads import W1_STAGES, build_w1_flow, inc

STAGES = [inc] * W1_STAGES
assert W1_STAGES == 10, "the plain loops write the 10 calls out"


def _check(got: Any, x: int) -> None:
    if got != x + W1_STAGES:
        raise AssertionError(f"W1: item {x} gave {got!r}, expected {x + W1_STAGES}")


# ---------------------------------------------------------------------- W1a


def _latencies(call: Any, cfg: Config) -> list[float]:
    for x in range(cfg.w1a_warmup):
        _check(call(x), x)
    gc.collect()
    lat = []
    for x in range(cfg.w1a_items):
        t0 = perf_counter()
        got = call(x)
        t1 = perf_counter()
        lat.append(t1 - t0)
        _check(got, x)
    return lat


def w1a_plain(cfg: Config) -> list[float]:
    return _latencies(lambda x: plain_chain10(inc, x), cfg)


def w1a_pykka(cfg: Config) -> list[float]:
    with PykkaChain(STAGES) as chain:
        return _latencies(chain.call, cfg)


def w1a_actorflow(cfg: Config, notes: list[str]) -> list[float]:
    import actorflow as af

    before = live_threads()
    flow = build_w1_flow(af)
    with flow.start() as running:
        # the call: result() without a timeout (which may run the item here)
        lat = _latencies(lambda x: running.submit(x).result(), cfg)
    leaked = leaked_threads(before)
    if leaked:
        notes.append(f"W1a: {len(leaked)} thread(s) alive after the start() block: {leaked[:5]}")
    return lat


def run_w1a(cfg: Config) -> list[Row]:
    notes: list[str] = []
    lats = {
        "plain": attempt("W1a plain", lambda: w1a_plain(cfg)),
        "pykka": attempt("W1a pykka", lambda: w1a_pykka(cfg)),
        "actorflow": attempt("W1a actorflow", lambda: w1a_actorflow(cfg, notes)),
    }
    med = Row(
        "W1a",
        f"latency median ({cfg.w1a_items:,} items)",
        "time",
        target=Target("<=", 100e-6, reference="raw pykka ~240 µs"),
        notes=notes,
    )
    p99 = Row("W1a", "latency p99", "time")
    for peer, lat in lats.items():
        if isinstance(lat, list):
            med.values[peer] = median(lat)
            p99.values[peer] = percentile(lat, 99)
        else:
            med.values[peer] = p99.values[peer] = lat
    med.values["dask"] = p99.values["dask"] = None
    return [med, p99]


# ---------------------------------------------------------------------- W1b


def _rate(n: int, seconds: float) -> float:
    return n / seconds


def w1b_pykka(cfg: Config) -> float:
    n = cfg.w1b_items
    items = list(range(n))
    with PykkaChain(STAGES) as chain:
        chain.run_many(list(range(500)))  # warm-up
        gc.collect()
        t0 = perf_counter()
        out = chain.run_many(items)
        t1 = perf_counter()
    if out != list(range(W1_STAGES, n + W1_STAGES)):
        raise AssertionError("W1b pykka: wrong outputs")
    return _rate(n, t1 - t0)


def _plain_rate(n: int, expected: list[int]) -> float:
    gc.collect()
    t0 = perf_counter()
    out = plain_chain10_many(inc, range(n))
    t1 = perf_counter()
    if out != expected:
        raise AssertionError("W1b plain: wrong outputs")
    return _rate(n, t1 - t0)


def w1b_plain_and_actorflow(cfg: Config, notes: list[str]) -> tuple[Value, Value]:
    """Interleaved repetitions (plain, actorflow, plain, ...): load drift hits both alike.

    The graph stays started across repetitions; each repetition is one full
    ``list(running.map(range(n)))``.
    """
    n = cfg.w1b_items
    expected = list(range(W1_STAGES, n + W1_STAGES))
    plain_chain10_many(inc, range(1000))  # warm-up
    plain_rates: list[float] = []
    af_rates: list[float] = []
    af_failed: Failed | None = None
    before = live_threads()
    try:
        import actorflow as af

        with build_w1_flow(af).start() as running:
            warm = list(running.map(range(min(n, 1000))))
            if warm != expected[: len(warm)]:
                raise AssertionError("W1b actorflow: wrong outputs in warm-up")
            for _ in range(cfg.w1b_reps):
                plain_rates.append(_plain_rate(n, expected))
                gc.collect()
                t0 = perf_counter()
                out = list(running.map(range(n)))
                t1 = perf_counter()
                if out != expected:
                    raise AssertionError(f"W1b actorflow: wrong outputs {out[:5]!r}...")
                af_rates.append(_rate(n, t1 - t0))
    except Exception as exc:
        af_failed = failed("W1b actorflow", exc)
    leaked = leaked_threads(before)
    if leaked:
        notes.append(f"W1b: {len(leaked)} thread(s) alive after the start() block: {leaked[:5]}")
    while len(plain_rates) < cfg.w1b_reps:
        plain_rates.append(_plain_rate(n, expected))
    return median(plain_rates), af_failed or median(af_rates)


def run_w1b(cfg: Config) -> list[Row]:
    notes: list[str] = []
    row = Row(
        "W1b",
        f"throughput, map({cfg.w1b_items:,} items)",
        "rate",
        target=Target(">=", 0.5, against="plain"),
        notes=notes,
    )
    row.values["pykka"] = attempt("W1b pykka", lambda: w1b_pykka(cfg))
    row.values["plain"], row.values["actorflow"] = w1b_plain_and_actorflow(cfg, notes)
    row.values["dask"] = None
    return [row]
