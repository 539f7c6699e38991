"""The task functions and graph shapes of every workload, shared by all implementations.

Nothing is imported here at run time: the cold-start workload (W3b) imports
this module inside fresh interpreters, whose import time it measures.

Every implementation (actorflow, plain loop, pykka, dask) calls these very
functions. actorflow gets decorated *copies* (:func:`fresh_copy`), so the plain
loop always calls the raw, undecorated function.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not imported from typing: keeps this module's import cheap
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# --------------------------------------------------------------------------- W1
W1_STAGES = 10


def inc(x: int) -> int:
    """One stage of the W1 chain."""
    return x + 1


# -------------------------------------------------------------------------- W3a
W3A_TASKS = 1000


def source() -> int:
    """W3a root: takes no argument."""
    return 3


def work(x: int) -> int:
    """W3a: one of the 1,000 independent tasks."""
    return x * 2 + 1


def total(*xs: int) -> int:
    """W3a sink: 1,000 positional arguments."""
    return sum(xs)


def w3a_names(n: int = W3A_TASKS) -> list[str]:
    return [f"t{i}" for i in range(n)]


def w3a_spec(n: int = W3A_TASKS) -> dict[str, tuple[Callable[..., Any], list[str]]]:
    """W3a as ``{name: (fn, depends_on)}`` in topological order."""
    spec: dict[str, tuple[Callable[..., Any], list[str]]] = {"source": (source, [])}
    names = w3a_names(n)
    for name in names:
        spec[name] = (work, ["source"])
    spec["sum"] = (total, names)
    return spec


def w3a_expected(n: int = W3A_TASKS) -> int:
    return n * work(source())


# -------------------------------------------------------------------------- W3b
W3B_ARG = 64


def prepare(n: int) -> list[int]:
    return [(i * 7919) % 101 for i in range(n)]


def premium(rows: list[int]) -> int:
    return sum(r for r in rows if r > 50)


def standard(rows: list[int]) -> int:
    return sum(r for r in rows if r <= 50)


def report(prem: int, std: int) -> dict[str, int]:
    return {"premium": prem, "standard": std}


def distribute(rows: list[int]) -> list[list[int]]:
    return [rows[i::4] for i in range(4)]


def _make_batch(i: int) -> Callable[[list[list[int]]], int]:
    def batch(parts: list[list[int]]) -> int:
        return sum(parts[i])

    batch.__name__ = batch.__qualname__ = f"batch_{i + 1}"
    return batch


def aggregate(b1: int, b2: int, b3: int, b4: int) -> int:
    return b1 + b2 + b3 + b4


def _make_level(k: int) -> Callable[[int], int]:
    def level(x: int) -> int:
        return x * 2 + k

    level.__name__ = level.__qualname__ = f"level_{k}"
    return level


def final(rep: dict[str, int], lvl: int) -> dict[str, object]:
    return {"report": rep, "total": lvl}


batch_1, batch_2, batch_3, batch_4 = (_make_batch(i) for i in range(4))
level_1, level_2, level_3, level_4 = (_make_level(k) for k in range(1, 5))


def w3b_spec() -> dict[str, tuple[Callable[..., Any], list[str]]]:
    """W3b's 15 nodes as ``{name: (fn, depends_on)}`` in topological order."""
    return {
        "prepare": (prepare, []),
        "premium": (premium, ["prepare"]),
        "standard": (standard, ["prepare"]),
        "report": (report, ["premium", "standard"]),
        "distribute": (distribute, ["prepare"]),
        "batch_1": (batch_1, ["distribute"]),
        "batch_2": (batch_2, ["distribute"]),
        "batch_3": (batch_3, ["distribute"]),
        "batch_4": (batch_4, ["distribute"]),
        "aggregate": (aggregate, ["batch_1", "batch_2", "batch_3", "batch_4"]),
        "level_1": (level_1, ["aggregate"]),
        "level_2": (level_2, ["level_1"]),
        "level_3": (level_3, ["level_2"]),
        "level_4": (level_4, ["level_3"]),
        "final": (final, ["report", "level_4"]),
    }


def run_w3b_plain(n: int) -> dict[str, Any]:
    """W3b as a plain sequence of calls: the limit."""
    rows = prepare(n)
    rep = report(premium(rows), standard(rows))
    parts = distribute(rows)
    agg = aggregate(batch_1(parts), batch_2(parts), batch_3(parts), batch_4(parts))
    return final(rep, level_4(level_3(level_2(level_1(agg)))))


# --------------------------------------------------------------------------- W4
W4_TASKS = 8


def crunch(i: int, size: int) -> int:
    """W4: chunk ``i`` of pure-Python CPU work (Collatz steps over ``size`` integers).

    Holds the GIL all the time; the run time grows linearly with ``size``.
    """
    lo = 1 + i * size
    steps = 0
    for n in range(lo, lo + size):
        x = n
        while x != 1:
            x = x // 2 if x % 2 == 0 else 3 * x + 1
            steps += 1
    return steps


def crunch_all(size: int, n: int = W4_TASKS) -> list[int]:
    """W4 sequentially: the same function ``n`` times in a loop (the baseline)."""
    return [crunch(i, size) for i in range(n)]


# --------------------------------------------------------------------------- W2
W2_KEPT = frozenset({"WARN", "ERROR"})
W2_SERVICES = tuple(f"svc-{i:02d}" for i in range(20))
W2_MESSAGES = (
    "request served",
    "cache miss",
    "upstream slow",
    "retrying connection",
    "payload rejected",
    "user logged in",
)


def make_log_lines(n: int, seed: int = 2024) -> list[str]:
    """``n`` deterministic JSON log lines; about 20% are WARN or ERROR.

    Fields: ts (float seconds), level, service (20 values), latency_ms (int), msg.
    """
    import json
    import random

    rng = random.Random(seed)
    dumps = json.dumps
    lines = []
    ts = 1_700_000_000.0
    for _ in range(n):
        ts += rng.random() * 0.01
        r = rng.random()
        level = "ERROR" if r < 0.05 else "WARN" if r < 0.20 else "INFO" if r < 0.9 else "DEBUG"
        lines.append(
            dumps(
                {
                    "ts": round(ts, 3),
                    "level": level,
                    "service": W2_SERVICES[rng.randrange(len(W2_SERVICES))],
                    "latency_ms": rng.randrange(1, 2_000),
                    "msg": W2_MESSAGES[rng.randrange(len(W2_MESSAGES))],
                }
            )
        )
    return lines


def tally(acc: dict[str, list[int]], rec: dict[str, Any]) -> None:
    """W2 aggregation, in the caller: per service ``[count, sum of latency_ms]``."""
    slot = acc.get(rec["service"])
    if slot is None:
        acc[rec["service"]] = [1, rec["latency_ms"]]
    else:
        slot[0] += 1
        slot[1] += rec["latency_ms"]


# ------------------------------------------------------------ actorflow builders
def fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A new function object sharing ``fn``'s code: decorating it leaves ``fn`` raw."""
    function_type = type(inc)
    assert isinstance(fn, function_type)
    new = function_type(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__doc__ = fn.__doc__
    new.__annotations__ = dict(fn.__annotations__)
    return new


def build_w1_flow(af: Any, stages: int = W1_STAGES) -> Any:
    """``@af.flow`` chaining ``stages`` calls of the ``inc`` task."""
    inc_t = af.task(fresh_copy(inc))

    def chain(x):
        for _ in range(stages):
            x = inc_t(x)
        return x

    return af.flow(chain)


def build_w3a_graph(af: Any, n: int = W3A_TASKS) -> Any:
    """``af.Graph("w3a")``: source -> n independent ``work`` tasks -> sum."""
    source_t = af.task(fresh_copy(source))
    work_t = af.task(fresh_copy(work))
    total_t = af.task(fresh_copy(total))
    g = af.Graph("w3a")
    g.add("source", source_t)
    names = w3a_names(n)
    for name in names:
        g.add(name, work_t, depends_on=["source"])
    g.add("sum", total_t, depends_on=names)
    return g


def build_w3b_flow(af: Any) -> Any:
    """W3b as an ``@af.flow`` with fresh task objects (a newly built graph)."""
    t = {name: af.task(fresh_copy(fn)) for name, (fn, _deps) in w3b_spec().items()}

    def w3b(n):
        rows = t["prepare"](n)
        rep = t["report"](t["premium"](rows), t["standard"](rows))
        parts = t["distribute"](rows)
        agg = t["aggregate"](
            t["batch_1"](parts), t["batch_2"](parts), t["batch_3"](parts), t["batch_4"](parts)
        )
        lvl = t["level_4"](t["level_3"](t["level_2"](t["level_1"](agg))))
        return t["final"](rep, lvl)

    return af.flow(w3b)


def build_w4_flow(af: Any, n: int = W4_TASKS) -> Any:
    """``@af.flow`` of ``n`` independent process-task nodes ``crunch(i, size)``."""
    crunch_t = af.task(fresh_copy(crunch), executor="process")

    def w4(size):
        return [crunch_t(i, size) for i in range(n)]

    return af.flow(w4)


def build_w4_map_flow(af: Any) -> Any:
    """``@af.flow`` of ONE process-task node ``crunch(i, size)`` with ``workers=2``."""
    crunch_t = af.task(fresh_copy(crunch), executor="process", workers=2)

    def w4_one(i, size):
        return crunch_t(i, size)

    return af.flow(w4_one)


def build_w5_graph(af: Any, n: int) -> Any:
    """``af.Graph("w5")``: one source feeding ``n`` independent thread nodes."""
    source_t = af.task(fresh_copy(source))
    work_t = af.task(fresh_copy(work))
    g = af.Graph("w5")
    g.add("source", source_t)
    for name in w3a_names(n):
        g.add(name, work_t, depends_on=["source"])
    return g
