"""W3: batch DAGs.

- W3a: source -> 1,000 independent tasks -> sum, built with ``af.Graph`` and run
  with ``g.run()``: wall time per task, building and starting included.
- W3b: the 15-node flow prepare -> {premium, standard} -> report and prepare ->
  distribute -> batch_1..4 -> aggregate -> level_1..4 -> final: time to result
  from a cold process, and warm (a fresh flow's ``run()`` in a process that has
  run one already).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from time import perf_counter
from typing import Any

from bench import REPO_ROOT
from bench._util import (
    Config,
    Failed,
    Row,
    Target,
    Unavailable,
    Value,
    attempt,
    leaked_threads,
    live_threads,
    median,
)
from bench.peers import dask_get, dask_graph, dask_w3a_graph, plain_w3a, pykka_run_dag
from bench.workloads import (
    W3B_ARG,
    build_w3a_graph,
    build_w3b_flow,
    run_w3b_plain,
    source,
    total,
    w3a_expected,
    w3a_spec,
    w3b_spec,
    work,
)

NO_DASK = Unavailable("dask is not installed (pip install -e '.[bench]')")


def _timed_median(
    fn: Callable[[], Any], reps: int, check: Callable[[Any], None], *, collect: bool = True
) -> float:
    """Median time of ``reps`` calls; ``collect``: a full ``gc.collect()`` before each
    (else one before the first: see W3B_WARM_GC_NOTE)."""
    times = []
    gc.collect()
    for _ in range(reps):
        if collect:
            gc.collect()
        t0 = perf_counter()
        out = fn()
        t1 = perf_counter()
        check(out)
        times.append(t1 - t0)
    return median(times)


# ---------------------------------------------------------------------- W3a


def run_w3a(cfg: Config) -> list[Row]:
    n = cfg.w3a_tasks
    expected = w3a_expected(n)
    notes: list[str] = []

    def check_value(out: Any) -> None:
        if out != expected:
            raise AssertionError(f"W3a: got {out!r}, expected {expected}")

    def check_dict(out: Any) -> None:
        if out != {"sum": expected}:
            raise AssertionError(f"W3a: got {out!r}, expected {{'sum': {expected}}}")

    def plain() -> float:
        fn = lambda: plain_w3a(source, work, total, n)  # noqa: E731
        fn()
        return _timed_median(fn, 20, check_value)

    def pykka() -> float:
        fn = lambda: pykka_run_dag(w3a_spec(n))  # noqa: E731
        fn()
        return _timed_median(fn, max(1, min(cfg.w3a_reps, 3)), check_dict)

    def dask() -> Value:
        get = dask_get()
        if get is None:
            return NO_DASK
        fn = lambda: get(dask_w3a_graph(source, work, total, n), "sum")  # noqa: E731
        fn()
        return _timed_median(fn, cfg.w3a_reps, check_value)

    def actorflow() -> float:
        import actorflow as af

        before = live_threads()
        t0 = perf_counter()
        first = build_w3a_graph(af, n).run()
        first_s = perf_counter() - t0
        check_dict(first)
        notes.append(
            f"W3a: actorflow's first run in this process took {first_s * 1e3:.1f} ms "
            f"({first_s / n * 1e6:.1f} µs/task)"
        )
        result = _timed_median(lambda: build_w3a_graph(af, n).run(), cfg.w3a_reps, check_dict)
        leaked = leaked_threads(before)
        if leaked:
            notes.append(f"W3a: {len(leaked)} thread(s) alive after run(): {leaked[:5]}")
        return result

    totals: dict[str, Value] = {
        "plain": attempt("W3a plain", plain),
        "pykka": attempt("W3a pykka", pykka),
        "dask": attempt("W3a dask", dask),
        "actorflow": attempt("W3a actorflow", actorflow),
    }
    per_task = Row(
        "W3a",
        f"wall per task ({n:,} tasks, build+run)",
        "time",
        target=Target("<=", 30e-6),
        notes=notes,
    )
    whole = Row("W3a", "wall per graph run", "time")
    for peer, v in totals.items():
        whole.values[peer] = v
        per_task.values[peer] = v / n if isinstance(v, float) else v
    return [per_task, whole]


# ---------------------------------------------------------------- W3b warm

W3B_WARM_GC_NOTE = (
    "W3b warm: one gc.collect() before the repetitions, not one before each run. A full "
    "collection walks the whole heap of this bench process (~10^5-10^6 objects by now) "
    "and evicts the CPU caches right before a sub-millisecond run: measured, it added "
    "0.05-0.3 ms to every engine's run (actorflow 0.54 -> 0.8 ms with 10^6 objects "
    "alive). The median over the runs leaves out the few that a collection hits"
)


def run_w3b_warm(cfg: Config) -> Row:
    expected = run_w3b_plain(W3B_ARG)
    notes: list[str] = [W3B_WARM_GC_NOTE]

    def check(out: Any) -> None:
        if out != expected:
            raise AssertionError(f"W3b: got {out!r}, expected {expected!r}")

    def check_final(out: Any) -> None:
        check(out.get("final") if isinstance(out, dict) else out)

    def plain() -> float:
        return _timed_median(lambda: run_w3b_plain(W3B_ARG), 1000, check, collect=False)

    def pykka() -> float:
        fn = lambda: pykka_run_dag(w3b_spec(), (W3B_ARG,))  # noqa: E731
        fn()
        return _timed_median(fn, cfg.w3b_warm_reps, check_final, collect=False)

    def dask() -> Value:
        get = dask_get()
        if get is None:
            return NO_DASK
        fn = lambda: get(dask_graph(w3b_spec(), (W3B_ARG,)), "final")  # noqa: E731
        fn()
        return _timed_median(fn, cfg.w3b_warm_reps, check, collect=False)

    def actorflow() -> float:
        import actorflow as af

        before = live_threads()
        check(build_w3b_flow(af).run(W3B_ARG))  # the process's first run: not timed
        times = []
        gc.collect()
        for _ in range(cfg.w3b_warm_reps):
            flow = build_w3b_flow(af)  # a newly defined flow: traced by run()
            t0 = perf_counter()
            out = flow.run(W3B_ARG)
            t1 = perf_counter()
            check(out)
            times.append(t1 - t0)
        leaked = leaked_threads(before)
        if leaked:
            notes.append(f"W3b: {len(leaked)} thread(s) alive after run(): {leaked[:5]}")
        return median(times)

    row = Row(
        "W3b",
        f"warm: fresh flow .run() (median of {cfg.w3b_warm_reps})",
        "time",
        target=Target("<=", 1e-3),
        notes=notes,
    )
    row.values["plain"] = attempt("W3b warm plain", plain)
    row.values["pykka"] = attempt("W3b warm pykka", pykka)
    row.values["dask"] = attempt("W3b warm dask", dask)
    row.values["actorflow"] = attempt("W3b warm actorflow", actorflow)
    return row


# ---------------------------------------------------------------- W3b cold

# Each script starts its clock before any import, imports its engine (``_ti``
# marks the end of that import), builds and runs W3b once, stops the clock and
# prints one JSON line. The parent times spawn -> that line and spawn -> exit.
_PRELUDE = "import time\n_t0 = time.perf_counter()\n"
_EPILOGUE = """\
_t1 = time.perf_counter()
import json, sys
from bench.workloads import W3B_ARG as _A, run_w3b_plain as _ref
_ok = _out == _ref(_A)
sys.stdout.write(json.dumps({"in_process": _t1 - _t0, "import": _ti - _t0, "ok": _ok}) + "\\n")
sys.stdout.flush()
"""
_BODIES = {
    "actorflow": """\
import actorflow as af
_ti = time.perf_counter()
from bench.workloads import W3B_ARG, build_w3b_flow
_out = build_w3b_flow(af).run(W3B_ARG)
""",
    "plain": """\
_ti = time.perf_counter()
from bench.workloads import W3B_ARG, run_w3b_plain
_out = run_w3b_plain(W3B_ARG)
""",
    "pykka": """\
import pykka
_ti = time.perf_counter()
from bench.peers import pykka_run_dag
from bench.workloads import W3B_ARG, w3b_spec
_out = pykka_run_dag(w3b_spec(), (W3B_ARG,))["final"]
""",
    "dask": """\
import dask.threaded
_ti = time.perf_counter()
from bench.workloads import W3B_ARG, w3b_spec
_dsk = {k: (fn, *(deps or (W3B_ARG,))) for k, (fn, deps) in w3b_spec().items()}
_out = dask.threaded.get(_dsk, "final")
""",
}


def cold_script(peer: str) -> str:
    return _PRELUDE + _BODIES[peer] + _EPILOGUE


def cold_env(pycache: str) -> dict[str, str]:
    """The cold processes' environment: bytecode is cached (under ``pycache``), as
    for an installed package; ``PYTHONDONTWRITEBYTECODE`` would make every start
    compile the modules that have no ``.pyc`` yet (an editable actorflow, bench/),
    while site-packages peers (pykka, dask) load theirs."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def _spawn_once(
    peer: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> dict[str, float]:
    """Run one cold process; times from spawn to its result line and to its exit."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", cold_script(peer)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        t_result = perf_counter()
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        t_exit = perf_counter()
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"cold {peer} run exited {proc.returncode}:\n{stderr[-3000:]}")
    data = json.loads(line)
    if not data["ok"]:
        raise AssertionError(f"cold {peer} run returned a wrong result")
    return {
        "to_result": t_result - t0,
        "to_exit": t_exit - t0,
        "in_process": data["in_process"],
        "import": data["import"],
    }


def _dask_importable() -> bool:
    return dask_get() is not None


def run_w3b_cold(cfg: Config) -> list[Row]:
    peers = ["plain", "pykka", "dask", "actorflow"]
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in peers}
    errors: dict[str, Value] = {}
    if not _dask_importable():
        errors["dask"] = NO_DASK
    compiled: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="af-bench-pyc-") as pycache:
        env = cold_env(pycache)
        for peer in peers:  # warm-up: writes the bytecode cache, fills the OS page cache
            if peer not in errors:
                r = attempt(f"W3b cold {peer}", partial(_spawn_once, peer, env))
                if isinstance(r, Failed):
                    errors[peer] = r
                elif peer == "actorflow":
                    compiled = r
        for _ in range(cfg.w3b_cold_reps):  # interleaved, so drift hits every peer alike
            for peer in peers:
                if peer not in errors:
                    r = attempt(f"W3b cold {peer}", partial(_spawn_once, peer, env))
                    if isinstance(r, Failed):
                        errors[peer] = r
                    else:
                        samples[peer].append(r)

    metrics = [
        ("to_result", "cold: spawn -> result (subprocess)"),
        ("in_process", "cold: in-process, before import -> result"),
        ("import", "cold: import of the engine alone"),
        ("to_exit", "cold: spawn -> process exit"),
    ]
    rows = []
    for key, label in metrics:
        row = Row("W3b", f"{label}", "time")
        for peer in peers:
            if peer in errors:
                row.values[peer] = errors[peer]
            elif key == "import" and peer == "plain":
                row.values[peer] = None
            else:
                row.values[peer] = median([s[key] for s in samples[peer]])
        rows.append(row)
    rows[0].notes.append(
        f"W3b cold: median of {cfg.w3b_cold_reps} fresh interpreters per column "
        "(after one untimed warm-up spawn); 'plain loop' = bare interpreter + the plain calls"
    )
    note = (
        "W3b cold: bytecode cached as for an installed package (PYTHONPYCACHEPREFIX in a "
        "temporary directory, PYTHONDONTWRITEBYTECODE unset; the untimed warm-up writes it)"
    )
    if compiled and samples["actorflow"] and "actorflow" not in errors:
        extra = compiled["import"] - median([s["import"] for s in samples["actorflow"]])
        note += (
            f"; in actorflow's warm-up, compiling what had no .pyc yet (actorflow, and "
            f"stdlib modules no earlier peer imported) added {extra * 1e3:.0f} ms"
        )
    rows[0].notes.append(note)
    return rows


def run_w3b(cfg: Config) -> list[Row]:
    return [*run_w3b_cold(cfg), run_w3b_warm(cfg)]
