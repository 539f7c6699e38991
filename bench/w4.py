"""Issue-4 workloads: the executors (process, thread, async) and idle memory.

- W4: 8 CPU-bound pure-Python tasks (``crunch``) as ``executor="process"`` nodes on
  ``processes=2``: speedup over the same function 8 times in a loop. Cold: a fresh
  ``flow.run(size, processes=2)`` (it starts its workers). Warm: inside
  ``with flow.start(processes=2) as r:`` after one small warm-up item, the real work
  through ``r.submit(size)`` (8 process nodes in one flow) or ``r.map`` (one node
  with ``workers=2`` over 8 items). Peer: ``ProcessPoolExecutor(2)``, cold (pool
  created in the timing) and warm.
- W2: synthetic JSON log lines, parse -> keep WARN/ERROR -> count and sum of
  latency per service. The flow is ``keep(parse(line))`` with ``keep`` returning
  ``af.SKIP`` for dropped lines; the caller consumes ``running.stream(lines)`` and
  aggregates with :func:`bench.workloads.tally` (what a user writes: the per-service
  totals are a plain dict in the caller). (a) thread tasks vs the plain loop calling
  the same ``parse`` / ``keep``; bytewax (``run_main``, one worker) runs the same
  functions. (b) ``parse`` and ``keep`` as ``executor="process"`` tasks with
  ``workers=2`` on ``processes=2``: they fuse into one chain run inside the workers
  (raw lines in, kept records out); peer ``ProcessPoolExecutor(2).map`` over chunks.
  Times include starting and stopping the graph / pool. Peak memory of each variant
  is measured in a fresh interpreter (its whole process tree).
- W5: RSS of a started, idle graph of one source feeding 1,000 independent thread
  nodes, per 1,000 nodes, in a fresh interpreter; peer: one pykka ThreadingActor per
  node.
- async: 10,000 items through an async task awaiting ``asyncio.sleep(0.1)`` with
  ``concurrency=1000``, ``start(max_in_flight=2000)``; peer: plain asyncio with a
  ``Semaphore(1000)``.

Process workers import this module (the W2 task functions are pickled by value,
but reference its globals), so it must stay import-safe: no work at import time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

import actorflow as af
from bench import REPO_ROOT
from bench._util import (
    Config,
    Failed,
    PeakRSS,
    Row,
    Target,
    Unavailable,
    Value,
    attempt,
    failed,
    leaked_threads,
    live_threads,
    median,
)
from bench.peers import (
    asyncio_gather_limited,
    bytewax_available,
    bytewax_map_filter,
    pykka_start_dag,
    stop_all,
)
from bench.workloads import (
    W2_KEPT,
    W4_TASKS,
    build_w4_flow,
    build_w4_map_flow,
    build_w5_graph,
    crunch,
    crunch_all,
    fresh_copy,
    make_log_lines,
    source,
    tally,
    w3a_names,
    work,
)

RESULT_TIMEOUT = 600.0
NO_BYTEWAX = Unavailable("bytewax is not installed")

# -------------------------------------------------------------- W2 task functions


def parse(line: str) -> dict[str, Any]:
    """W2: one JSON log line -> a record."""
    return json.loads(line)  # type: ignore[no-any-return]


def keep(rec: dict[str, Any]) -> Any:
    """W2: WARN / ERROR records pass, every other record is dropped (``af.SKIP``)."""
    return rec if rec["level"] in W2_KEPT else af.SKIP


def keep_or_none(rec: dict[str, Any]) -> Any:
    """:func:`keep` for bytewax's ``filter_map``, which drops ``None``."""
    out = keep(rec)
    return None if out is af.SKIP else out


def parse_keep_chunk(chunk: Sequence[str]) -> list[dict[str, Any]]:
    """The ProcessPool peer's unit of work: parse and keep a chunk of lines."""
    out = []
    skip = af.SKIP
    for line in chunk:
        rec = keep(parse(line))
        if rec is not skip:
            out.append(rec)
    return out


def build_w2_flow(processes: bool) -> Any:
    """``keep(parse(line))`` as an ``@af.flow``; process tasks with ``workers=2`` or threads."""
    opts: dict[str, Any] = {"executor": "process", "workers": 2} if processes else {}
    parse_t = af.task(fresh_copy(parse), **opts)
    keep_t = af.task(fresh_copy(keep), **opts)

    def w2(line):
        return keep_t(parse_t(line))

    return af.flow(w2)


# ------------------------------------------------------------------ W2 variants

Totals = dict[str, list[int]]


def w2_plain(lines: Sequence[str]) -> Totals:
    acc: Totals = {}
    skip = af.SKIP
    for line in lines:
        rec = keep(parse(line))
        if rec is not skip:
            tally(acc, rec)
    return acc


def w2_af_threads(lines: Sequence[str]) -> Totals:
    acc: Totals = {}
    with build_w2_flow(processes=False).start() as running:
        for rec in running.stream(lines):
            tally(acc, rec)
    return acc


def w2_af_processes(lines: Sequence[str]) -> Totals:
    acc: Totals = {}
    with build_w2_flow(processes=True).start(processes=2) as running:
        for rec in running.stream(lines):
            tally(acc, rec)
    return acc


W2_CHUNK = 5_000


def w2_procpool(lines: Sequence[str]) -> Totals:
    acc: Totals = {}
    chunks = [lines[i : i + W2_CHUNK] for i in range(0, len(lines), W2_CHUNK)]
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        for recs in ex.map(parse_keep_chunk, chunks):
            for rec in recs:
                tally(acc, rec)
    return acc


def w2_bytewax(lines: Sequence[str]) -> Totals:
    acc: Totals = {}
    for rec in bytewax_map_filter(lines, parse, keep_or_none):
        tally(acc, rec)
    return acc


W2_VARIANTS: dict[str, Callable[[Sequence[str]], Totals]] = {
    "plain": w2_plain,
    "af_threads": w2_af_threads,
    "af_processes": w2_af_processes,
    "procpool": w2_procpool,
    "bytewax": w2_bytewax,
}


def w2_mem_child(variant: str, n_lines: int) -> None:
    """Entry point of a fresh interpreter: one run of ``variant``; prints peak memory JSON."""
    lines = make_log_lines(n_lines)
    fn = W2_VARIANTS[variant]
    gc.collect()
    with PeakRSS(interval=0.05, pss=True) as mem:
        t0 = perf_counter()
        acc = fn(lines)
        seconds = perf_counter() - t0
    out = {
        "peak_rss": mem.peak,
        "peak_pss": mem.peak_pss,
        "before": mem.before,
        "seconds": seconds,
        "kept": sum(c for c, _ in acc.values()),
    }
    sys.stdout.write(json.dumps(out) + "\n")


def _child(code: str, timeout: float = 300.0) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (repo root as cwd); parse its last stdout line."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"child exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _w2_mem(variant: str, n_lines: int) -> dict[str, Any]:
    return _child(f"from bench.w4 import w2_mem_child; w2_mem_child({variant!r}, {n_lines})")


def run_w2(cfg: Config) -> list[Row]:
    n = cfg.w2_lines
    lines = make_log_lines(n)
    expected = w2_plain(lines)
    kept = sum(c for c, _ in expected.values())
    notes = [
        f"W2: {n:,} lines, {kept:,} kept ({kept / n:.0%}), {len(expected)} services; "
        f"median of {cfg.w2_reps} interleaved runs, each from building the flow / "
        "creating the pool to its stop (workers started in the timing); "
        f"ProcessPool: map over chunks of {W2_CHUNK:,} lines, aggregation in the parent"
    ]
    has_bytewax = bytewax_available()
    peers: dict[str, Callable[[Sequence[str]], Totals]] = {
        "plain": w2_plain,
        "af_threads": w2_af_threads,
        "af_processes": w2_af_processes,
        "procpool": w2_procpool,
    }
    if has_bytewax:
        peers["bytewax"] = w2_bytewax
    times: dict[str, list[float]] = {p: [] for p in peers}
    errors: dict[str, Failed] = {}
    before = live_threads()
    for _ in range(cfg.w2_reps):  # interleaved: load drift hits every variant alike
        for name, fn in peers.items():
            if name in errors:
                continue
            try:
                gc.collect()
                t0 = perf_counter()
                got = fn(lines)
                t1 = perf_counter()
                if got != expected:
                    raise AssertionError(f"W2 {name}: wrong totals {sorted(got.items())[:3]!r}")
                times[name].append(t1 - t0)
            except Exception as exc:
                errors[name] = failed(f"W2 {name}", exc)
    leaked = leaked_threads(before)
    if leaked:
        notes.append(f"W2: {len(leaked)} thread(s) alive after the runs: {leaked[:5]}")

    def val(name: str) -> Value:
        if name in errors:
            return errors[name]
        if name not in times:
            return NO_BYTEWAX
        return median(times[name])

    a = Row(
        "W2",
        f"(a) thread tasks, stream({n:,} lines)",
        "time",
        target=Target(">=", 0.8, against="plain"),
        notes=notes,
    )
    a.values.update(plain=val("plain"), actorflow=val("af_threads"), bytewax=val("bytewax"))
    b = Row(
        "W2",
        "(b) process tasks, processes=2",
        "time",
        target=Target(">=", 1.3, against="plain", reference="ProcessPool ~1.26x"),
    )
    b.values.update(plain=val("plain"), actorflow=val("af_processes"), procpool=val("procpool"))

    # peak memory: one fresh interpreter per variant, whole process tree
    mem: dict[str, Any] = {}
    for name in peers:
        mem[name] = attempt(f"W2 memory {name}", lambda name=name: _w2_mem(name, n))

    def peak(name: str, key: str) -> Value:
        m = mem.get(name)
        if m is None:
            return NO_BYTEWAX
        if isinstance(m, Failed):
            return m
        return float(m[key])

    rss_a = Row("W2", "(a) peak RSS, fresh process", "mem")
    rss_a.values.update(
        plain=peak("plain", "peak_rss"),
        actorflow=peak("af_threads", "peak_rss"),
        bytewax=peak("bytewax", "peak_rss"),
    )
    rss_b = Row("W2", "(b) peak RSS, process tree (sum)", "mem")
    pss_b = Row("W2", "(b) peak PSS, process tree (sum)", "mem")
    for row, key in ((rss_b, "peak_rss"), (pss_b, "peak_pss")):
        row.values.update(
            plain=peak("plain", key),
            actorflow=peak("af_processes", key),
            procpool=peak("procpool", key),
        )
    base = mem.get("plain")
    if isinstance(base, dict):
        rss_a.notes.append(
            f"W2 memory: one fresh interpreter per variant, peak over the run of the sum over "
            f"its process tree (multiprocessing's forkserver / resource tracker excluded); "
            f"the input lines alone bring the interpreter to {base['before'] / 2**20:.0f} MB. "
            "RSS counts pages shared after fork (ProcessPool's default start method) in every "
            "process; PSS splits them."
        )
    return [a, b, rss_a, rss_b, pss_b]


# --------------------------------------------------------------------------- W4


def _w4_check(got: Any, expected: list[int], label: str) -> None:
    if list(got) != expected:
        raise AssertionError(f"W4 {label}: got {got!r}, expected {expected!r}")


class _W4Runner:
    """The W4 implementations; warm ones keep their pool / graph open across repetitions."""

    def __init__(self, size: int, warm_size: int) -> None:
        self.size = size
        self.warm_size = warm_size
        self.items = list(range(W4_TASKS))
        self.sizes = [size] * W4_TASKS
        self.flow = build_w4_flow(af)
        self.map_flow = build_w4_map_flow(af)
        self._closers: list[Any] = []

    def open_warm(self) -> None:
        pool = concurrent.futures.ProcessPoolExecutor(2)
        self._closers.append(pool)
        pool.submit(crunch, 0, self.warm_size).result()  # starts both workers (fork)
        self.pool = pool
        for attr, flow, warm in (
            ("running", self.flow, lambda r: r.submit(self.warm_size)),
            ("running_map", self.map_flow, lambda r: r.submit(0, self.warm_size)),
        ):
            cm = flow.start(processes=2)
            running = cm.__enter__()
            self._closers.append(cm)
            warm(running).result(timeout=RESULT_TIMEOUT)  # the one warm-up item
            setattr(self, attr, running)

    def close_warm(self) -> None:
        for c in reversed(self._closers):
            if isinstance(c, concurrent.futures.ProcessPoolExecutor):
                c.shutdown()
            else:
                c.__exit__(None, None, None)
        self._closers.clear()

    def sequential(self) -> list[int]:
        return crunch_all(self.size)

    def procpool_cold(self) -> list[int]:
        with concurrent.futures.ProcessPoolExecutor(2) as ex:
            return list(ex.map(crunch, self.items, self.sizes))

    def procpool_warm(self) -> list[int]:
        return list(self.pool.map(crunch, self.items, self.sizes))

    def af_cold(self) -> list[int]:
        return self.flow.run(self.size, processes=2)  # type: ignore[no-any-return]

    def af_warm(self) -> list[int]:
        return self.running.submit(self.size).result(timeout=RESULT_TIMEOUT)  # type: ignore[no-any-return]

    def af_warm_map(self) -> list[int]:
        return list(self.running_map.map(self.items, self.sizes))


W4_TASK_S = 0.25  # the task length: ~0.25 s of pure Python each


def w4_calibrated_size(probe: int = 2_000) -> int:
    """Integers per ``crunch`` task for ~``W4_TASK_S`` seconds each on this machine now.

    Probes the 8 tasks' own ranges at ``probe`` integers each (Collatz chains grow
    with the numbers), best of three (a noisy VM only ever slows a probe down),
    then scales linearly.
    """
    best = min(_timed(lambda: crunch_all(probe)) for _ in range(3)) / W4_TASKS
    return max(probe, int(probe * W4_TASK_S / best))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = perf_counter()
    fn()
    return perf_counter() - t0


def run_w4(cfg: Config) -> list[Row]:
    size = cfg.w4_size if cfg.quick else w4_calibrated_size()
    warm_size = max(1, size // 100)
    expected = crunch_all(size)  # also warms the sequential path
    runner = _W4Runner(size, warm_size)
    notes: list[str] = []
    variants = [
        "sequential",
        "procpool_cold",
        "af_cold",
        "procpool_warm",
        "af_warm",
        "af_warm_map",
    ]
    times: dict[str, list[float]] = {v: [] for v in variants}
    errors: dict[str, Failed] = {}
    before = live_threads()
    t0 = perf_counter()
    first = attempt("W4 actorflow first run", lambda: runner.flow.run(warm_size, processes=2))
    first_s = perf_counter() - t0
    if isinstance(first, Failed):
        errors["af_cold"] = first
    else:
        notes.append(
            f"W4: actorflow's first flow.run(processes=2) in this process, with 1/100 of the "
            f"work (forkserver start included, not timed below): {first_s:.2f} s"
        )
    opened = attempt("W4 warm start", runner.open_warm)
    if isinstance(opened, Failed):
        for v in ("procpool_warm", "af_warm", "af_warm_map"):
            errors[v] = opened
    try:
        for _ in range(cfg.w4_reps):  # interleaved: load drift hits every variant alike
            for v in variants:
                if v in errors:
                    continue
                try:
                    gc.collect()
                    t0 = perf_counter()
                    got = getattr(runner, v)()
                    t1 = perf_counter()
                    _w4_check(got, expected, v)
                    times[v].append(t1 - t0)
                except Exception as exc:
                    errors[v] = failed(f"W4 {v}", exc)
    finally:
        closed = attempt("W4 warm stop", runner.close_warm)
        if isinstance(closed, Failed):
            errors.setdefault("af_warm", closed)
    leaked = leaked_threads(before)
    if leaked:
        notes.append(f"W4: {len(leaked)} thread(s) alive after the runs: {leaked[:5]}")

    def val(v: str) -> Value:
        return errors[v] if v in errors else median(times[v])

    seq = val("sequential")
    if isinstance(seq, float):
        notes.insert(
            0,
            f"W4: {W4_TASKS} tasks of crunch(i, {size:,}) take {seq / W4_TASKS:.3g} s each "
            f"sequentially here; median of {cfg.w4_reps} interleaved runs; 'af vs plain' is "
            "the speedup over the sequential loop (limit 2x on 2 processes). The target "
            f"applies to the warm rows: inside flow.start(processes=2), after one warm-up item "
            f"(crunch size {warm_size}); ProcessPool warm: same, one warm-up submit",
        )
        notes.append(
            "W4: actorflow starts worker processes lazily (forkserver): the r.map row's one "
            "warm-up item starts one of its two workers, so its first timed run also starts "
            "the second (~0.1 s); ProcessPoolExecutor forks both workers on its first submit "
            "(default start method fork, also in the cold row)"
        )
    target = Target(">=", 1.85, against="plain", reference="ProcessPool ~1.88x; limit 2x")
    cold = Row("W4", f"cold: flow.run(processes=2), {W4_TASKS} nodes", "time", notes=notes)
    cold.values.update(plain=seq, actorflow=val("af_cold"), procpool=val("procpool_cold"))
    warm = Row("W4", f"warm: r.submit(), {W4_TASKS} process nodes", "time", target=target)
    warm.values.update(plain=seq, actorflow=val("af_warm"), procpool=val("procpool_warm"))
    warm_map = Row("W4", f"warm: r.map({W4_TASKS} items), 1 node workers=2", "time", target=target)
    warm_map.values.update(plain=seq, actorflow=val("af_warm_map"), procpool=val("procpool_warm"))
    return [cold, warm, warm_map]


# --------------------------------------------------------------------------- W5

W5_NODES = 1_000


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _settle() -> int:
    time.sleep(0.3)
    gc.collect()
    return _rss()


def w5_child(peer: str, n: int) -> None:
    """Entry point of a fresh interpreter: RSS deltas of ``n`` idle nodes; prints JSON."""
    import threading

    expected = {name: work(source()) for name in w3a_names(n)}
    threads0 = threading.active_count()
    rss0 = _settle()
    if peer == "actorflow":
        with build_w5_graph(af, n).start() as running:
            rss1 = _settle()
            threads1 = threading.active_count()
            out = running.submit().result(timeout=RESULT_TIMEOUT)
            rss2 = _settle()
    else:
        spec: dict[str, tuple[Callable[..., Any], list[str]]] = {"source": (source, [])}
        spec.update((name, (work, ["source"])) for name in w3a_names(n))
        results: dict[str, Any] = {}
        done = threading.Event()

        def make_sink(name: str) -> Callable[[Any], None]:
            def sink(value: Any) -> None:
                results[name] = value  # one assignment per actor thread: atomic
                if len(results) == n:
                    done.set()

            return sink

        refs = pykka_start_dag(spec, make_sink)
        try:
            rss1 = _settle()
            threads1 = threading.active_count()
            refs["source"].tell((None, ()))
            if not done.wait(RESULT_TIMEOUT):
                raise TimeoutError("pykka W5: outputs missing")
            out = results
            rss2 = _settle()
        finally:
            stop_all(refs.values())
    if out != expected:
        raise AssertionError(f"W5 {peer}: wrong outputs")
    data = {"idle": rss1 - rss0, "after_item": rss2 - rss0, "threads": threads1 - threads0}
    sys.stdout.write(json.dumps(data) + "\n")


def run_w5(cfg: Config) -> list[Row]:
    n = W5_NODES
    samples: dict[str, list[dict[str, Any]]] = {"actorflow": [], "pykka": []}
    errors: dict[str, Failed] = {}
    for _ in range(cfg.w5_reps):
        for peer, got in samples.items():
            if peer in errors:
                continue
            r = attempt(
                f"W5 {peer}",
                lambda peer=peer: _child(f"from bench.w4 import w5_child; w5_child({peer!r}, {n})"),
            )
            if isinstance(r, Failed):
                errors[peer] = r
            else:
                got.append(r)
    scale = 1_000 / n

    def val(peer: str, key: str) -> Value:
        if peer in errors:
            return errors[peer]
        return median([s[key] for s in samples[peer]]) * scale

    idle = Row(
        "W5",
        "RSS per 1,000 idle nodes (started graph)",
        "mem",
        target=Target("<=", 5.0 * 2**20, reference="raw pykka ~11 MB"),
    )
    after = Row("W5", "same, after one item went through", "mem")
    for peer in samples:
        idle.values[peer] = val(peer, "idle")
        after.values[peer] = val(peer, "after_item")
    threads = {p: s[0]["threads"] for p, s in samples.items() if s}
    idle.notes.append(
        f"W5: source + {n:,} independent thread nodes, g.start(), idle; RSS delta in a fresh "
        f"interpreter (graph building included), median of {cfg.w5_reps}; threads started: "
        + ", ".join(f"{p} {t}" for p, t in threads.items())
    )
    return [idle, after]


# ------------------------------------------------------------------------ async

ASYNC_ITEMS = 10_000
ASYNC_CONCURRENCY = 1_000
ASYNC_SLEEP_S = 0.1


async def nap(x: int) -> int:
    """async: one awaited ``asyncio.sleep(0.1)``."""
    await asyncio.sleep(ASYNC_SLEEP_S)
    return x


def run_async(cfg: Config) -> list[Row]:
    n = ASYNC_ITEMS
    expected = list(range(n))
    nap_t = af.task(fresh_copy(nap), concurrency=ASYNC_CONCURRENCY)

    def one(x):
        return nap_t(x)

    flow = af.flow(one)
    plain_times: list[float] = []
    af_times: list[float] = []
    block_times: list[float] = []
    errors: dict[str, Failed] = {}
    before = live_threads()
    for _ in range(cfg.async_reps):
        try:
            gc.collect()
            t0 = perf_counter()
            got = asyncio_gather_limited(nap, expected, ASYNC_CONCURRENCY)
            plain_times.append(perf_counter() - t0)
            if got != expected:
                raise AssertionError("async plain: wrong outputs")
        except Exception as exc:
            errors.setdefault("plain", failed("async plain", exc))
        if "actorflow" in errors:
            continue
        try:
            gc.collect()
            t0 = perf_counter()
            with flow.start(max_in_flight=2_000) as running:
                running.submit(-1).result(timeout=RESULT_TIMEOUT)  # warm-up: starts the loop
                t1 = perf_counter()
                got = list(running.map(expected))
                t2 = perf_counter()
            t3 = perf_counter()
            if got != expected:
                raise AssertionError(f"async actorflow: wrong outputs {got[:5]!r}...")
            af_times.append(t2 - t1)
            block_times.append(t3 - t0)
        except Exception as exc:
            errors["actorflow"] = failed("async actorflow", exc)
    notes = []
    leaked = leaked_threads(before)
    if leaked:
        notes.append(f"async: {len(leaked)} thread(s) alive after the runs: {leaked[:5]}")
    limit = n / ASYNC_CONCURRENCY * ASYNC_SLEEP_S
    msg = (
        f"async: list(r.map({n:,} items)) after one warm-up item, median of {cfg.async_reps}; "
        f"the floor is {limit:.1f} s ({n:,} / {ASYNC_CONCURRENCY} x {ASYNC_SLEEP_S} s); "
        "'plain loop' = asyncio.gather under a Semaphore(1000)"
    )
    if block_times:
        msg += f"; whole start() block incl. start and stop: {median(block_times):.2f} s"
    notes.insert(0, msg)
    row = Row(
        "async",
        f"{n:,} x sleep(0.1), concurrency=1000",
        "time",
        target=Target("<", 2.0),
        notes=notes,
    )
    row.values["plain"] = errors.get("plain") or median(plain_times)
    row.values["actorflow"] = errors.get("actorflow") or median(af_times)
    return [row]
