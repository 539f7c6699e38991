"""The worker process pool, with real worker processes and real signals.

Functions shipped to workers live at module level (pickled by reference, the
worker imports this module) unless a test is about lambdas and closures.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

import actorflow as af
from actorflow.runtime.processes import (
    Crashed,
    Err,
    Ok,
    PoolClosed,
    ProcessPool,
    Timeout,
    WakeFd,
    _Ticker,
)
from tests.conftest import wait_until

# --------------------------------------------------------------------------- helpers


def _descendants() -> set[int]:
    """Live descendant processes, except multiprocessing's interpreter-wide helpers.

    The forkserver and the resource tracker are direct children; the workers that the
    forkserver forks are its children (and carry its command line).
    """
    helpers = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            is_helper = child.ppid() == os.getpid() and any(
                h in " ".join(child.cmdline()) for h in helpers
            )
        except psutil.Error:
            continue
        if not is_helper:
            pids.add(child.pid)
    return pids


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def no_worker_leaks() -> Iterator[None]:
    """Every test must leave no worker process behind."""
    before = _descendants()
    yield
    leaked = _descendants() - before
    assert not leaked, f"worker processes left running: {sorted(leaked)}"


class Events:
    """Collects ``on_event`` calls (from any thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        with self.lock:
            self.items.append((name, data))

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [data for event, data in self.items if event == name]


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def pool(events: Events) -> Iterator[ProcessPool]:
    p = ProcessPool(2, name="test", on_event=events)
    yield p
    p.shutdown(kill=True)


@pytest.fixture
def solo(events: Events) -> Iterator[ProcessPool]:
    p = ProcessPool(1, name="solo", on_event=events, kill_grace=0.2)
    yield p
    p.shutdown(kill=True)


def values(outcomes: list[Any]) -> list[Any]:
    assert all(isinstance(o, Ok) for o in outcomes), outcomes
    return [o.value for o in outcomes]


# --------------------------------------------------------------------------- tasks

SCALE = {"factor": 3}


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return 2 * x


def drop_odd(x: int) -> Any:
    return af.SKIP if x % 2 else x


def scaled(x: int) -> int:
    return x * SCALE["factor"]


def divide(x: int) -> float:
    ratio = 10
    return ratio / x  # the line the failure must point at


class TwoArgError(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def raise_two_arg(x: int) -> int:
    raise TwoArgError(x, x + 1)


def lock_for_one(x: int) -> Any:
    return threading.Lock() if x == 1 else x


def exit_on_three(x: int) -> int:
    if x == 3:
        os._exit(3)
    return x


def sleep_then_return(x: Any) -> Any:
    if x == "hang":
        time.sleep(3600)
    elif isinstance(x, float):
        time.sleep(x)
    return x


def _rebuild_slowly(seconds: float) -> SlowToLoad:
    time.sleep(seconds)
    return SlowToLoad(seconds)


class SlowToLoad:
    """Captured by a chain, it makes loading that chain in a worker take ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_slowly, (self.seconds,))


def ignore_sigterm_and_hang(x: Any) -> Any:
    if x == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    return x


def logged_slow(arg: tuple[str, int]) -> int:
    """Record each run (pid) in a file, then take longer than the flush interval."""
    folder, i = arg
    with open(Path(folder) / f"ran-{i}", "a") as f:
        f.write(f"{os.getpid()}\n")
    (Path(folder) / f"started-{i}").touch()  # after the pid is written
    time.sleep(0.15)
    return i


def logged_slow_skip_odd(arg: tuple[str, int]) -> Any:
    """:func:`logged_slow`, skipping odd items."""
    i = logged_slow(arg)
    return af.SKIP if i % 2 else i


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def shout(n: int) -> int:
    sys.stdout.write("x" * n + "\n")
    sys.stderr.write("done shouting\n")
    return n


def pid_of(_: Any) -> int:
    return os.getpid()


def logs_warning(x: int) -> int:
    logging.getLogger("tests.worker").warning("item %s seen in %s", x, os.getpid())
    logging.getLogger("tests.worker").debug("debug %s is below the parent's level", x)
    if x == 2:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("tests.worker").exception("item %s failed", x)
    return x


class Unloadable:
    """Pickles in the parent; unpickling it in a worker raises (its module is "gone")."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_in_worker, (os.getpid(),))


def _refuse_in_worker(parent_pid: int) -> Unloadable:
    if os.getpid() != parent_pid:
        raise ImportError("Unloadable cannot be rebuilt in a worker")
    return Unloadable()


class NeedsTwo(Exception):
    """Pickles in the worker; unpickling calls NeedsTwo(a), which raises TypeError."""

    def __init__(self, a: str, b: int) -> None:
        super().__init__(a)
        self.b = b


def two_arg_error_for_one(x: int) -> Any:
    return NeedsTwo("bad", 2) if x == 1 else x * 10


def logs_odd_extra(x: int) -> int:
    import enum

    class Level(enum.IntEnum):  # local: its members cannot be pickled
        HIGH = 2

    logging.getLogger("tests.worker").warning("odd extra", extra={"level": Level.HIGH})
    return x


def skip_lock_fail(x: int) -> Any:
    """Skips multiples of 3; 4 returns a lock (does not pickle); 5 raises."""
    if x % 3 == 0:
        return af.SKIP
    if x == 4:
        return threading.Lock()
    if x == 5:
        raise ValueError("five")
    return x * 10


def slow_skip_odd(x: int) -> Any:
    time.sleep(0.02)  # 8 items span several 50 ms flushes
    return af.SKIP if x % 2 else x


def generated_loop_for(fn: Any) -> Any:
    """The batch loop plan.py generates for a one-node process chain calling ``fn``."""
    from actorflow.runtime.plan import compile_plan

    task = af.task(fn, executor="process")

    @af.flow
    def one(x: Any) -> Any:
        return task(x)

    return compile_plan(one.graph).segments[0].remote_loop()


def batch_loop(
    vals: Any,
    out: list[Any],
    kept_at: list[int],
    err: list[Any],
    tick: list[bool],
    i: int,
    skips: list[int],
) -> int:
    """A hand-written ``loop=`` for the chain [inc, double]: what plan.py generates."""
    for item in vals:
        try:
            v = inc(item)
        except BaseException as e:
            err.append((0, e))
            return i + 1
        try:
            out.append(double(v) if v != 4 else 1 // 0)
        except BaseException as e:
            err.append((1, e))
            return i + 1
        kept_at.append(i)
        i += 1
    return i


class Counter:
    """A keyed stateful task: counts the items it has seen."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, item: Any) -> tuple[Any, int, int]:
        self.seen += 1
        return item, self.seen, os.getpid()


# --------------------------------------------------------------------------- chains, errors


def test_chain_runs_each_item_through_every_function_in_order(pool: ProcessPool) -> None:
    pool.register("inc_double", [inc, double])
    assert values(pool.call_batch("inc_double", [1, 2, 3])) == [4, 6, 8]
    assert pool.call_batch("inc_double", []) == []


def test_skip_stops_the_chain_for_that_item(pool: ProcessPool) -> None:
    pool.register("evens", [drop_odd, double])
    outs = values(pool.call_batch("evens", [1, 2, 3, 4]))
    assert outs == [af.SKIP, 4, af.SKIP, 8]
    assert outs[0] is af.SKIP


def test_lambdas_and_closures_over_module_state_run_in_workers(pool: ProcessPool) -> None:
    offset = 100
    pool.register("lambda", [lambda x: x + offset, scaled])
    assert values(pool.call_batch("lambda", [1, 2])) == [303, 306]


def test_registering_a_key_again_replaces_its_chain(pool: ProcessPool) -> None:
    pool.register("f", [inc])
    assert values(pool.call_batch("f", [1])) == [2]
    pool.register("f", [double])
    assert values(pool.call_batch("f", [1])) == [2 * 1]


def test_unknown_key_is_a_clear_error(pool: ProcessPool) -> None:
    with pytest.raises(KeyError, match="no chain 'nope' is registered in process pool 'test'"):
        pool.call_batch("nope", [1])


def test_exception_is_described_in_the_worker_with_its_frame(pool: ProcessPool) -> None:
    pool.register("divide", [inc, divide])
    ok, err = pool.call_batch("divide", [1, -1])
    assert ok == Ok(5.0)
    assert isinstance(err, Err)
    assert err.stage == 1
    e = err.error
    assert isinstance(e.exception, ZeroDivisionError)
    assert (e.error_type, e.message) == ("ZeroDivisionError", "division by zero")
    assert e.file_path == __file__
    assert e.function == "divide"
    assert e.line_number == divide.__code__.co_firstlineno + 2
    assert e.locals == {"x": "0", "ratio": "10"}
    assert "ZeroDivisionError" in e.traceback
    assert "in divide" in e.traceback
    assert e.pid != os.getpid()
    assert e.pid in {w["pid"] for w in pool.stats()}


def test_exception_that_cannot_be_rebuilt_still_arrives_described(pool: ProcessPool) -> None:
    pool.register("two", [raise_two_arg])
    (err,) = pool.call_batch("two", [1])
    assert isinstance(err, Err)
    assert err.error.exception is None
    assert (err.error.error_type, err.error.message) == ("TwoArgError", "1/2")


def test_unpicklable_function_is_refused_with_a_clear_error(pool: ProcessPool) -> None:
    lock = threading.Lock()

    def guarded(x: int) -> int:
        with lock:
            return x

    with pytest.raises(af.GraphError, match=r"task '.*guarded' .*cannot run in a worker process"):
        pool.register("guarded", [inc, guarded])
    with pytest.raises(af.GraphError, match=r"_thread\.lock"):
        pool.register_instances("guarded", lambda: lock, n=1)


def test_unpicklable_result_fails_only_its_item(pool: ProcessPool) -> None:
    pool.register("locks", [lock_for_one])
    first, err, last = pool.call_batch("locks", [0, 1, 2])
    assert (first, last) == (Ok(0), Ok(2))
    assert isinstance(err, Err)
    assert err.error.error_type == "PicklingError"
    assert err.error.function == "lock_for_one"
    assert "could not be pickled" in err.error.message
    assert "lock" in err.error.message


def test_batch_loop_runs_the_chain_and_isolates_each_failure(pool: ProcessPool) -> None:
    pool.register("loop", [inc, double], loop=batch_loop)
    items = list(range(200))
    vals, fails = pool.run_batch("loop", items)
    assert sorted(fails) == [3]  # inc(3) == 4 divides by zero in stage 1
    err = fails[3]
    assert isinstance(err, Err)
    assert (err.stage, err.error.error_type) == (1, "ZeroDivisionError")
    assert [v for i, v in enumerate(vals) if i != 3] == [2 * (x + 1) for x in items if x != 3]
    outs = pool.call_batch("loop", [1, 3, 5])  # the same through the outcome API
    assert (outs[0], outs[2]) == (Ok(4), Ok(12))
    assert isinstance(outs[1], Err)


def test_batch_that_does_not_unpickle_in_the_worker_is_resent_item_by_item(
    pool: ProcessPool,
) -> None:
    pool.register("same", [lambda x: x if not isinstance(x, Unloadable) else "?"])
    first, err, last = pool.call_batch("same", [1, Unloadable(), 3])
    assert (first, last) == (Ok(1), Ok(3))
    assert isinstance(err, Err)
    assert err.stage == -1
    assert "cannot be rebuilt in a worker" in err.error.message


def test_log_records_of_workers_reach_the_parents_loggers(
    events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # before the workers start: they take the root's level
    with ProcessPool(1, name="logs", on_event=events) as p:
        p.register("logs", [logs_warning])
        assert values(p.call_batch("logs", [1, 2, 3])) == [1, 2, 3]
        worker_pid = p.stats()[0]["pid"]
    records = [r for r in caplog.records if r.name == "tests.worker"]
    assert [r.getMessage() for r in records if r.levelno == logging.WARNING] == [
        f"item {i} seen in {worker_pid}" for i in (1, 2, 3)
    ]
    assert all(r.process == worker_pid for r in records)
    assert not [r for r in records if r.levelno < logging.INFO]  # filtered in the worker
    (failed,) = [r for r in records if r.levelno == logging.ERROR]
    assert failed.getMessage() == "item 2 failed"
    assert failed.exc_text is not None
    assert "ValueError: boom" in failed.exc_text


def test_a_lease_runs_a_series_of_batches_on_one_worker(pool: ProcessPool) -> None:
    pool.register("pids", [pid_of])
    chunks = [list(range(i, i + 5)) for i in range(0, 20, 5)]
    seen: list[list[Any]] = []
    with pool.lease("pids") as lease:
        lease.send(chunks[0])
        for nxt in chunks[1:]:
            values, fails = lease.wait()
            lease.send(nxt)  # the worker computes while we look at the results
            assert not fails
            seen.append(values)
        values, fails = lease.wait()
        seen.append(values)
    assert len({pid for values in seen for pid in values}) == 1  # one worker, held
    with pytest.raises(RuntimeError, match="released"):
        lease.send([1])


def test_a_lease_isolates_an_item_that_kills_its_worker(pool: ProcessPool) -> None:
    pool.register("exit3", [exit_on_three])
    with pool.lease("exit3") as lease:
        lease.send(list(range(6)))
        values, fails = lease.wait()
        lease.send([7, 8])
        assert lease.wait() == ([7, 8], {})  # the restarted worker serves the lease
    assert [v for i, v in enumerate(values) if i not in fails] == [0, 1, 2, 4, 5]
    crashed = fails[3]
    assert isinstance(crashed, Crashed)
    assert crashed.exitcode == 3


def test_a_lease_sends_the_next_batch_ahead_and_returns_batches_in_order(
    pool: ProcessPool,
) -> None:
    pool.register("inc", [inc])
    with pool.lease("inc") as lease:
        lease.send([1, 2, 3])
        lease.send([10, 20])  # written to the worker's pipe while it runs the first
        assert lease.in_flight == 2
        with pytest.raises(RuntimeError, match="two batches are in flight"):
            lease.send([0])
        assert lease.wait() == ([2, 3, 4], {})
        lease.send([100])
        assert lease.wait() == ([11, 21], {})
        assert lease.wait() == ([101], {})
        assert lease.in_flight == 0


def test_a_batch_sent_ahead_survives_its_worker_dying_on_the_batch_before(
    pool: ProcessPool,
) -> None:
    pool.register("exit3", [exit_on_three])
    with pool.lease("exit3") as lease:
        lease.send(list(range(6)))
        lease.send([7, 8])  # in the pipe of the worker that item 3 kills
        values, fails = lease.wait()
        assert lease.wait() == ([7, 8], {})  # sent again to the restarted worker
    assert [v for i, v in enumerate(values) if i not in fails] == [0, 1, 2, 4, 5]
    assert isinstance(fails[3], Crashed)
    assert fails[3].exitcode == 3


def test_an_item_killing_the_worker_in_a_batch_sent_ahead_is_isolated(
    pool: ProcessPool,
) -> None:
    pool.register("exit3", [exit_on_three])
    with pool.lease("exit3") as lease:
        lease.send([0, 1])
        lease.send([2, 3, 4])
        assert lease.wait() == ([0, 1], {})
        values, fails = lease.wait()
    assert [v for i, v in enumerate(values) if i not in fails] == [2, 4]
    assert isinstance(fails[1], Crashed)
    assert fails[1].exitcode == 3


def test_a_batch_sent_ahead_of_one_resent_item_by_item_keeps_its_results(
    pool: ProcessPool,
) -> None:
    pool.register("same", [lambda x: x if not isinstance(x, Unloadable) else "?"])
    with pool.lease("same") as lease:
        lease.send([1, Unloadable(), 3])  # the worker asks for it item by item...
        lease.send([4, 5])  # ...after it ran this one
        (first, _, last), fails = lease.wait()
        assert lease.wait() == ([4, 5], {})
    assert (first, last) == (1, 3)
    assert list(fails) == [1]


def exit_on_three_logged(x: Any, log: str) -> Any:
    if x == 3:
        with open(log, "a") as fh:
            fh.write("ran\n")
    return exit_on_three(x)


def same_or_big(x: Any) -> Any:
    if isinstance(x, Unloadable):
        return "?"
    return "r" * 3_000_000 if x == "big" else len(x)


def test_ready_returns_when_the_batch_ahead_was_read_while_the_one_before_was_resent(
    solo: ProcessPool,
) -> None:
    solo.register("same", [lambda x: x if not isinstance(x, Unloadable) else "?"])
    wake = WakeFd()
    try:
        with solo.lease("same") as lease:
            lease.send([1, Unloadable(), 3])  # resent item by item: runs after the next
            lease.send([4, 5])
            lease.wait()  # reads (routes) the second batch's results on the way
            assert lease.ready(wake)  # nothing more will come: must not block
            assert lease.wait() == ([4, 5], {})
    finally:
        wake.close()


def test_an_item_killing_the_worker_in_a_batch_run_before_a_resend_runs_twice(
    solo: ProcessPool, tmp_path: Path
) -> None:
    log = tmp_path / "ran3.log"
    solo.register("killer", [functools.partial(exit_on_three_logged, log=str(log))])
    with solo.lease("killer") as lease:
        lease.send([Unloadable(), 1])  # resent: the worker runs the next batch first
        lease.send([2, 3, 4])
        lease.wait()
        values, fails = lease.wait()
    assert [v for i, v in enumerate(values) if i not in fails] == [2, 4]
    assert isinstance(fails[1], Crashed)
    assert log.read_text().count("ran") == 2  # in its batch, then alone: not a third time


def test_a_large_resend_behind_a_batch_with_large_results_does_not_deadlock(
    solo: ProcessPool,
) -> None:
    solo.register("big", [same_or_big])
    with solo.lease("big") as lease:
        lease.send([Unloadable(), "a" * 3_000_000])  # resent loose: > the 1 MiB pipe
        lease.send(["big"])  # its 3 MB result fills the pipe back while we write
        first, fails = lease.wait()
        (second,), _ = lease.wait()
    assert first[1] == 3_000_000
    assert list(fails) == [0]
    assert len(second) == 3_000_000


def test_a_timed_batch_behind_another_runs_with_its_own_timeout(solo: ProcessPool) -> None:
    solo.register("sleepy", [sleep_then_return])
    with solo.lease("sleepy") as lease:
        lease.send([0.01], timeout=5)
        lease.send([0.01, 60.0], timeout=0.5)  # sent when the first is back
        assert lease.wait() == ([0.01], {})
        values, fails = lease.wait()
    assert values[0] == 0.01
    assert isinstance(fails[1], Timeout)


def test_releasing_a_lease_with_a_batch_in_flight_stops_that_worker(
    pool: ProcessPool, events: Events
) -> None:
    pool.register("sleepy", [sleep_then_return])
    lease = pool.lease("sleepy")
    lease.send([60.0])
    busy = [w["pid"] for w in pool.stats() if w["busy"]]
    assert len(busy) == 1
    lease.release()  # never waited for: the worker's state is unknown
    assert _gone(busy[0])
    assert values(pool.call_batch("sleepy", [1, 2])) == [1, 2]  # the pool goes on


def test_a_result_the_parent_cannot_unpickle_fails_only_its_item(pool: ProcessPool) -> None:
    pool.register("two", [two_arg_error_for_one], loop=generated_loop_for(two_arg_error_for_one))
    first, err, last = pool.call_batch("two", [0, 1, 2])
    assert (first, last) == (Ok(0), Ok(20))
    assert isinstance(err, Err)
    assert err.error.error_type == "PicklingError"
    assert "could not be unpickled in the parent" in err.error.message


def skip_fifths(x: Any) -> Any:
    return af.SKIP if isinstance(x, int) and x % 5 == 0 else x


def skip_thirds(x: Any) -> Any:
    return af.SKIP if isinstance(x, int) and x % 3 == 0 else x


@pytest.mark.parametrize("loose", [False, True], ids=["bulk", "loose"])
def test_run_batch_reports_how_many_items_each_stage_but_the_last_skipped(
    pool: ProcessPool, loose: bool
) -> None:
    # the per-item path in the worker (no generated loop); "loose": one item does
    # not pickle, so the batch goes item by item
    pool.register("two", [skip_fifths, skip_thirds])
    items: list[Any] = list(range(1, 31))
    if loose:
        items.append(threading.Lock())
    skips: list[int] = []
    vals, fails = pool.run_batch("two", items, skips_at=skips)
    assert skips == [6]  # 5, 10, ..., 30 at stage 0; the last stage's 3s are not counted
    assert vals[:30] == [af.SKIP if x % 5 == 0 or x % 3 == 0 else x for x in range(1, 31)]
    assert list(fails) == ([30] if loose else [])


def _shape(outcome: Any) -> Any:
    if isinstance(outcome, Ok):
        return ("ok", outcome.value)
    assert isinstance(outcome, Err)
    return ("err", outcome.stage, outcome.error.error_type)


def test_the_generated_loop_sends_only_kept_results_with_the_same_outcomes(
    pool: ProcessPool, events: Events
) -> None:
    # kept results travel with their positions; skipped ones, failures and a result
    # that does not pickle (the chunk then goes item by item) land where they belong
    pool.register("plain", [skip_lock_fail])
    pool.register("loop", [skip_lock_fail], loop=generated_loop_for(skip_lock_fail))
    items = list(range(12))
    plain = [_shape(o) for o in pool.call_batch("plain", items)]
    looped = [_shape(o) for o in pool.call_batch("loop", items)]
    assert looped == plain
    skip = ("ok", af.SKIP)
    assert looped[:6] == [
        skip,
        ("ok", 10),
        ("ok", 20),
        skip,
        ("err", 0, "PicklingError"),
        ("err", 0, "ValueError"),
    ]
    assert looped[6:] == [skip, ("ok", 70), ("ok", 80), skip, ("ok", 100), ("ok", 110)]
    assert events.named("worker_died") == []  # not recovered by isolating items


def test_kept_results_flushed_in_several_chunks_keep_their_positions(
    solo: ProcessPool, events: Events
) -> None:
    solo.register("slow", [slow_skip_odd], loop=generated_loop_for(slow_skip_odd))
    vals, fails = solo.run_batch("slow", list(range(8)))
    assert fails == {}
    assert vals == [0, af.SKIP, 2, af.SKIP, 4, af.SKIP, 6, af.SKIP]
    assert events.named("worker_died") == []


def test_a_log_record_with_an_unpicklable_extra_arrives_as_text(
    events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with ProcessPool(1, name="odd", on_event=events) as p:
        p.register("odd", [logs_odd_extra])
        assert values(p.call_batch("odd", [0, 1, 2])) == [0, 1, 2]
    assert events.named("worker_died") == []
    records = [r for r in caplog.records if r.name == "tests.worker"]
    assert len(records) == 3
    assert all(r.__dict__["level"] == "<Level.HIGH: 2>" for r in records)


def test_unpicklable_input_fails_only_its_item(pool: ProcessPool) -> None:
    pool.register("inc", [inc])
    first, err, last = pool.call_batch("inc", [1, threading.Lock(), 3])
    assert (first, last) == (Ok(2), Ok(4))
    assert isinstance(err, Err)
    assert err.stage == -1
    assert err.error.error_type == "PicklingError"


def test_outcomes_become_failures_for_the_engine(pool: ProcessPool) -> None:
    pool.register("divide", [divide])
    (err,) = pool.call_batch("divide", [0])
    assert isinstance(err, Err)
    failure = err.to_failure(task="divide", item_id=7, run_id="r1", attempt=2, inputs=(0,))
    assert (failure.task, failure.item_id, failure.attempt) == ("divide", 7, 2)
    assert (failure.executor, failure.error_type) == ("process", "ZeroDivisionError")
    assert isinstance(failure.exception(), ZeroDivisionError)
    assert pickle.loads(pickle.dumps(failure)).locals == {"x": "0", "ratio": "10"}
    crashed = Crashed("was killed by SIGKILL", -9, 123).to_failure(task="t", item_id=1, run_id="")
    assert crashed.error_type == "WorkerCrashed"
    assert isinstance(crashed.exception(), af.WorkerCrashed)
    assert "SIGKILL" in crashed.message
    timed_out = Timeout(2.0, 123).to_failure(task="t", item_id=1, run_id="")
    assert timed_out.error_type == "TaskTimeout"
    assert "within 2 s" in timed_out.message


# --------------------------------------------------------------------------- deaths and timeouts


def test_item_that_kills_its_worker_alone_is_crashed_and_the_others_complete(
    pool: ProcessPool, events: Events
) -> None:
    pool.register("exit3", [exit_on_three])
    outs = pool.call_batch("exit3", list(range(6)))
    assert [o.value for o in outs if isinstance(o, Ok)] == [0, 1, 2, 4, 5]
    crashed = outs[3]
    assert isinstance(crashed, Crashed)
    assert crashed.exitcode == 3
    assert crashed.description == "exited with code 3"
    assert len(events.named("worker_died")) == 2  # the batch, then the culprit alone
    assert values(pool.call_batch("exit3", [7])) == [7]  # the pool is healthy afterwards


def test_worker_killed_mid_batch_keeps_returned_results_and_resends_the_rest(
    solo: ProcessPool, events: Events, tmp_path: Path
) -> None:
    solo.register("logged", [logged_slow])
    items = [(str(tmp_path), i) for i in range(8)]
    result: list[Any] = []
    caller = threading.Thread(target=lambda: result.extend(solo.call_batch("logged", items)))
    caller.start()
    wait_until(lambda: (tmp_path / "started-3").exists())
    victim = int((tmp_path / "ran-3").read_text().split()[0])
    os.kill(victim, signal.SIGKILL)
    caller.join(timeout=30)
    assert values(result) == list(range(8))
    runs = {i: (tmp_path / f"ran-{i}").read_text().split() for i in range(8)}
    assert all(len(runs[i]) == 1 for i in (0, 1, 2, 4, 5, 6, 7)), runs  # kept / not re-run
    assert len(runs[3]) == 2  # in flight when killed: re-sent alone, not charged
    (died,) = events.named("worker_died")
    assert died["pid"] == victim
    assert died["reason"] == "was killed by SIGKILL"


@pytest.mark.parametrize("skip_odd", [False, True], ids=["all-kept", "odd-skipped"])
def test_the_generated_loop_flushes_slow_items_so_a_death_loses_none(
    solo: ProcessPool, events: Events, tmp_path: Path, skip_odd: bool
) -> None:
    # with skips, the chunks flushed before the death carry only kept results
    fn = logged_slow_skip_odd if skip_odd else logged_slow
    solo.register("logged", [fn], loop=generated_loop_for(fn))
    items = [(str(tmp_path), i) for i in range(8)]
    result: list[Any] = []
    caller = threading.Thread(target=lambda: result.extend(solo.call_batch("logged", items)))
    caller.start()
    wait_until(lambda: (tmp_path / "started-3").exists())
    os.kill(int((tmp_path / "ran-3").read_text().split()[0]), signal.SIGKILL)
    caller.join(timeout=30)
    assert values(result) == [af.SKIP if skip_odd and i % 2 else i for i in range(8)]
    runs = {i: (tmp_path / f"ran-{i}").read_text().split() for i in range(8)}
    assert all(len(runs[i]) == 1 for i in (0, 1, 2, 4, 5, 6, 7)), runs  # flushed, kept
    assert len(runs[3]) == 2


def test_the_ticker_ticks_during_a_batch_sleeps_when_idle_and_wakes_for_the_next() -> None:
    ticker = _Ticker.start()
    try:
        ticker.begin()
        wait_until(lambda: ticker.tick[0])  # the generated loop returns after this item
        ticker.end()
        wait_until(lambda: ticker.asleep)  # ~1 s without a batch
        ticker.begin()
        assert not ticker.tick[0]  # each batch starts with the flag down
        wait_until(lambda: ticker.tick[0])  # begin() woke it
        ticker.end()
    finally:
        ticker.close()
        ticker.thread.join(timeout=5)
    assert not ticker.thread.is_alive()


def test_a_ticker_without_a_thread_never_ticks_and_never_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    ticker = _Ticker.start()  # a worker at its thread limit still runs its batches
    ticker.begin()
    ticker.end()
    assert not ticker.tick[0]
    assert not ticker.thread.is_alive()


def test_worker_killed_while_idle_is_restarted_on_next_use(
    solo: ProcessPool, events: Events
) -> None:
    solo.start()
    (before,) = solo.stats()
    os.kill(before["pid"], signal.SIGKILL)
    wait_until(lambda: _gone(before["pid"]))
    solo.register("pid", [pid_of])
    (out,) = solo.call_batch("pid", [None])
    assert isinstance(out, Ok)
    assert out.value != before["pid"]
    (after,) = solo.stats()
    assert after["alive"]
    assert after["pid"] == out.value
    assert after["restarts"] == 1
    assert events.named("worker_died")[0]["pid"] == before["pid"]


def test_worker_killed_just_before_a_batch_is_sent_does_not_blame_the_item(
    solo: ProcessPool,
) -> None:
    solo.register("pid", [pid_of])
    for _ in range(5):  # no wait: the death may be noticed before, during or after the send
        (victim,) = values(solo.call_batch("pid", [None]))
        os.kill(victim, signal.SIGKILL)
        (out,) = solo.call_batch("pid", [None])
        assert isinstance(out, Ok)
        assert out.value != victim


def test_item_over_its_timeout_kills_and_restarts_the_worker(
    solo: ProcessPool, events: Events
) -> None:
    solo.register("sleepy", [sleep_then_return])
    solo.start()
    (before,) = solo.stats()
    t0 = time.monotonic()
    outs = solo.call_batch("sleepy", [1, "hang", 2], timeout=0.5)
    elapsed = time.monotonic() - t0
    assert outs[0] == Ok(1)
    assert outs[2] == Ok(2)
    assert isinstance(outs[1], Timeout)
    assert outs[1].seconds == 0.5
    assert outs[1].pid == before["pid"]
    assert 0.5 <= elapsed < 3.0
    assert _gone(before["pid"])
    assert events.named("worker_timed_out")[0]["pid"] == before["pid"]
    (after,) = solo.stats()
    assert after["alive"]
    assert after["pid"] != before["pid"]


def test_timeout_escalates_to_sigkill_when_the_worker_ignores_sigterm(solo: ProcessPool) -> None:
    solo.register("stubborn", [ignore_sigterm_and_hang])
    t0 = time.monotonic()
    outs = solo.call_batch("stubborn", ["hang", 5], timeout=0.3)
    assert isinstance(outs[0], Timeout)
    assert outs[1] == Ok(5)
    assert time.monotonic() - t0 < 5.0


def test_items_within_their_timeout_are_not_killed(solo: ProcessPool) -> None:
    solo.register("sleepy", [sleep_then_return])
    # each item is well below the timeout, the batch as a whole above it
    assert values(solo.call_batch("sleepy", [0.04] * 12, timeout=0.3)) == [0.04] * 12


def test_loading_code_does_not_count_against_an_item_timeout(solo: ProcessPool) -> None:
    slow = SlowToLoad(0.6)
    solo.register("slow_load", [lambda x: x if slow else None])
    assert values(solo.call_batch("slow_load", [1, 2], timeout=0.3)) == [1, 2]


def test_item_hanging_right_after_a_slow_load_still_times_out_on_time(solo: ProcessPool) -> None:
    slow = SlowToLoad(0.6)
    solo.register("slow_then_hang", [lambda x: sleep_then_return(x) if slow else None])
    t0 = time.monotonic()
    outs = solo.call_batch("slow_then_hang", ["hang", 1], timeout=0.3)
    assert isinstance(outs[0], Timeout)
    assert outs[1] == Ok(1)
    assert time.monotonic() - t0 < 5.0  # not the 30 s allowed for loading


def test_loading_that_hangs_times_out_every_item(
    solo: ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from actorflow.runtime import processes

    monkeypatch.setattr(processes, "_LOAD_GRACE_S", 0.5)
    stuck = SlowToLoad(3600)
    solo.register("stuck", [lambda x: x if stuck else None])
    t0 = time.monotonic()
    outs = solo.call_batch("stuck", [1, 2], timeout=0.1)
    assert all(isinstance(o, Timeout) for o in outs)
    assert time.monotonic() - t0 < 5.0


# --------------------------------------------------------------------------- keyed instances


def test_keyed_instances_keep_state_and_lose_it_when_their_worker_dies(
    pool: ProcessPool, events: Events
) -> None:
    pool.register_instances("count", Counter, n=3)  # 0 and 2 on worker 0, 1 on worker 1
    a, b = pool.call_instance("count", 0, ["a", "b"])
    assert (a.value[:2], b.value[:2]) == (("a", 1), ("b", 2))  # type: ignore[union-attr]
    assert values(pool.call_instance("count", 2, ["c"]))[0][:2] == ("c", 1)
    assert values(pool.call_instance("count", 1, ["x"]))[0][:2] == ("x", 1)
    (d,) = values(pool.call_instance("count", 0, ["d"]))
    assert d[:2] == ("d", 3)
    victim = d[2]
    assert victim == pool.stats()[0]["pid"]

    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: _gone(victim))
    (e,) = values(pool.call_instance("count", 0, ["e"]))
    assert e[:2] == ("e", 1)  # recreated with empty state
    assert e[2] != victim
    (lost,) = events.named("instance_state_lost")
    assert (lost["key"], lost["indices"], lost["pid"]) == ("count", [0, 2], victim)
    assert values(pool.call_instance("count", 1, ["y"]))[0][:2] == ("y", 2)  # worker 1 kept it
    with pytest.raises(IndexError):
        pool.call_instance("count", 3, ["z"])


# --------------------------------------------------------------------------- throughput, output


def timed_spin(n: int) -> tuple[int, float, float]:
    t0 = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable across processes
    spin(n)
    return os.getpid(), t0, time.monotonic()


def _speedup(pool: ProcessPool, n: int) -> tuple[float, float, list[tuple[int, float, float]]]:
    t0 = time.perf_counter()
    for _ in range(8):
        pool.call_batch("spin", [n])
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda _: pool.call_batch("spin", [n]), range(8)))
    parallel = time.perf_counter() - t0
    return sequential, parallel, [values(o)[0] for o in outs]


@pytest.mark.slow
def test_cpu_bound_calls_run_in_parallel_on_two_workers(pool: ProcessPool) -> None:
    pool.register("spin", [timed_spin])
    t0 = time.perf_counter()
    spin(200_000)
    n = max(10_000, int(200_000 * 0.12 / (time.perf_counter() - t0)))  # ~0.12 s per call
    pool.start()
    with ThreadPoolExecutor(2) as ex:  # load the chain in both workers
        list(ex.map(lambda _: pool.call_batch("spin", [1]), range(4)))

    # Wall-clock speedup is the bench's job (W4): on a shared VM another program can
    # take the second core at any time. What the pool controls is dispatch: both
    # workers must be inside a call at the same time for most of the parallel phase.
    sequential, parallel, runs = _speedup(pool, n)
    assert len({pid for pid, _, _ in runs}) == 2
    first = [(start, end) for pid, start, end in runs if pid == runs[0][0]]
    other = [(start, end) for pid, start, end in runs if pid != runs[0][0]]
    both = sum(
        max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in first for s2, e2 in other
    )  # calls of one worker never overlap each other, so this is the time both were busy
    span = max(e for _, _, e in runs) - min(s for _, s, _ in runs)
    print(
        f"8 calls: sequential {sequential:.2f} s, 2 workers {parallel:.2f} s, "
        f"x{sequential / parallel:.2f}; both workers busy {both / span:.0%} of the span"
    )
    assert both > 0.6 * span


def test_many_threads_share_the_pool(pool: ProcessPool) -> None:
    pool.register("inc", [inc])
    pool.register_instances("count", Counter, n=2)

    def work(t: int) -> list[Any]:
        got = []
        for i in range(10):
            got.append(values(pool.call_batch("inc", list(range(t, t + i)))))
            pool.call_instance("count", t % 2, [t])
        return got

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(work, range(16)))
    for t, got in enumerate(results):
        assert got == [[x + 1 for x in range(t, t + i)] for i in range(10)]
    seen = [values(pool.call_instance("count", i, [None]))[0][1] for i in range(2)]
    assert seen == [81, 81]  # every instance call reached its one instance, none lost


def test_large_batches_travel_quickly(pool: ProcessPool) -> None:
    pool.register("inc", [inc])
    pool.start()
    t0 = time.perf_counter()
    outs = pool.call_batch("inc", list(range(20_000)))
    elapsed = time.perf_counter() - t0
    assert values(outs) == list(range(1, 20_001))
    assert elapsed < 2.0


def test_task_printing_megabytes_completes_and_reaches_stdout(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with ProcessPool(1, name="loud") as loud:  # started inside the test: captured stdout
        loud.register("shout", [shout])
        assert values(loud.call_batch("shout", [5_000_000, 10])) == [5_000_000, 10]
    out, err = capfd.readouterr()
    assert len(out) >= 5_000_000
    assert err.count("done shouting") == 2


# --------------------------------------------------------------------------- lifecycle


def test_shutdown_joins_every_worker_and_is_idempotent(events: Events) -> None:
    p = ProcessPool(2, name="lifecycle", on_event=events)
    p.register("pid", [pid_of])
    p.start()
    pids = {w["pid"] for w in p.stats()}
    assert len(pids) == 2
    assert pids <= _descendants()
    p.shutdown()
    assert not pids & _descendants()
    assert all(_gone(pid) for pid in pids)
    assert not _descendants()
    p.shutdown()
    p.shutdown(kill=True)
    with pytest.raises(PoolClosed, match="'lifecycle' is shut down"):
        p.call_batch("pid", [1])
    assert [w["alive"] for w in p.stats()] == [False, False]


def test_graceful_shutdown_waits_for_calls_in_flight(solo: ProcessPool, tmp_path: Path) -> None:
    solo.register("logged", [logged_slow])
    result: list[Any] = []
    caller = threading.Thread(
        target=lambda: result.extend(solo.call_batch("logged", [(str(tmp_path), 0)]))
    )
    caller.start()
    wait_until(lambda: (tmp_path / "started-0").exists())
    solo.shutdown()
    caller.join()
    assert values(result) == [0]


def test_shutdown_with_kill_cancels_calls_in_flight(solo: ProcessPool) -> None:
    solo.register("sleepy", [sleep_then_return])
    solo.start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            solo.call_batch("sleepy", ["hang"])
        except PoolClosed as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: solo.stats()[0]["busy"])
    t0 = time.monotonic()
    solo.shutdown(kill=True)
    caller.join()
    assert time.monotonic() - t0 < 3.0
    assert len(errors) == 1


def test_worker_is_recycled_after_max_tasks(events: Events) -> None:
    with ProcessPool(1, name="recycle", max_tasks_per_worker=3, on_event=events) as p:
        p.register("pid", [pid_of])
        first = values(p.call_batch("pid", [1, 2]))
        second = values(p.call_batch("pid", [3, 4]))  # reaches 4 >= 3: replaced afterwards
        third = values(p.call_batch("pid", [5]))
    assert len(set(first + second)) == 1
    assert third[0] != first[0]
    (recycled,) = events.named("worker_recycled")
    assert "max_tasks_per_worker=3" in recycled["reason"]


def test_worker_is_recycled_above_max_rss(events: Events) -> None:
    with ProcessPool(1, name="rss", max_worker_rss_mb=1.0, on_event=events) as p:
        p.register("pid", [pid_of])
        pids = [values(p.call_batch("pid", [i]))[0] for i in range(2)]
    assert pids[0] != pids[1]
    assert "max_worker_rss_mb=1" in events.named("worker_recycled")[0]["reason"]


def test_stats_report_each_worker(pool: ProcessPool) -> None:
    assert [w["alive"] for w in pool.stats()] == [False, False]  # started lazily
    pool.register("spin", [spin])
    pool.start()
    pool.call_batch("spin", [100_000, 1, 2])
    stats = pool.stats()
    assert [w["worker"] for w in stats] == [0, 1]
    assert all(w["alive"] and w["rss_mb"] > 1 for w in stats)
    assert sorted(w["tasks_done"] for w in stats) == [0, 3]
    assert all(isinstance(w["cpu_percent"], float) for w in stats)


def test_a_failing_event_handler_does_not_break_the_pool() -> None:
    def handler(name: str, data: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

    with ProcessPool(1, name="handler", on_event=handler) as p:
        p.register("exit3", [exit_on_three])
        outs = p.call_batch("exit3", [3, 4])
    assert isinstance(outs[0], Crashed)
    assert outs[1] == Ok(4)


def test_spawn_start_method_works() -> None:
    with ProcessPool(1, name="spawned", start_method="spawn") as p:
        assert p.start_method == "spawn"
        p.register("lambda", [lambda x: x * 2])
        assert values(p.call_batch("lambda", [21])) == [42]


def test_plain_fork_is_refused() -> None:
    with pytest.raises(ValueError, match="'forkserver' or 'spawn'"):
        ProcessPool(1, start_method="fork")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
def test_worker_pipes_hold_a_whole_batch(pool: ProcessPool) -> None:
    # a batch of log lines is ~70 KB: with the default 64 KB pipe the parent could not
    # send the next batch until the worker started reading it
    import fcntl

    with open("/proc/sys/fs/pipe-max-size") as f:
        if int(f.read()) < 1 << 20:
            pytest.skip("this machine caps pipes below 1 MiB")
    pool.start()
    for slot in pool._slots:
        for conn in (slot.to_worker, slot.from_worker):
            assert conn is not None
            assert fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032)) == 1 << 20


def test_close_gives_pool_closed_to_a_thread_waiting_for_a_worker(solo: ProcessPool) -> None:
    # a cancelled run dropped the job that held the only worker: a host waiting for
    # that worker must not wait for ever (review of the pump)
    solo.register("pid", [pid_of])
    held = solo.lease("pid")
    got: list[BaseException] = []
    waiting = threading.Event()

    def wait_for_worker() -> None:
        waiting.set()
        try:
            solo.lease("pid")
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=wait_for_worker)
    t.start()
    waiting.wait(10)
    wait_until(solo.contended)
    solo.close()
    t.join(10)
    held.release()
    assert not t.is_alive()
    assert len(got) == 1
    assert isinstance(got[0], PoolClosed)
    with pytest.raises(PoolClosed):
        solo.try_lease("pid")  # closed: no new lease either


def test_a_pool_dropped_without_shutdown_is_collected_with_its_sentry_and_workers() -> None:
    # the sentry thread held the pool (a bound method): never collected, its workers
    # and thread left behind, and at exit the sentry restarted the killed workers
    import gc
    import weakref

    pool = ProcessPool(2, name="dropped")
    pool.register("abs", [abs])
    pool.start()
    pids = [w["pid"] for w in pool.stats()]
    assert any(t.name == "actorflow-dropped-sentry" for t in threading.enumerate())
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None
    wait_until(lambda: all(_gone(pid) for pid in pids))
    wait_until(lambda: not any(t.name == "actorflow-dropped-sentry" for t in threading.enumerate()))


class _DyingContext:
    """A multiprocessing context whose processes exit at once (a worker that cannot
    start: an import error, OOM...)."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # mirrors the context API
        kwargs["target"], kwargs["args"] = os._exit, (3,)
        return self._ctx.Process(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def test_a_worker_that_dies_at_start_up_is_not_restarted_in_a_loop_by_the_sentry() -> None:
    # the sentry restarted a worker that died before its hello, which died again, with
    # no end (586 restarts in 2 s); such a worker is reaped and left to the next call
    events: list[str] = []
    pool = ProcessPool(1, name="dies", on_event=lambda name, data: events.append(name))
    pool.register("abs", [abs])
    pool._ctx = _DyingContext(pool._ctx)
    try:
        pool.launch()  # started without waiting for its hello: it dies
        wait_until(lambda: events.count("worker_died") >= 1)
        threading.Event().wait(0.5)  # an observation window: nothing more may happen
        assert events.count("worker_started") == 1
        assert events.count("worker_died") == 1
    finally:
        pool.shutdown()


def _exit_slowly(folder: str) -> int:
    """Make this worker's exit take 0.5 s, writing when it begins and ends."""
    from multiprocessing import util

    def slow_exit() -> None:
        Path(folder, f"begin-{os.getpid()}").write_text(repr(time.time()))
        time.sleep(0.5)
        Path(folder, f"end-{os.getpid()}").write_text(repr(time.time()))

    util.Finalize(None, slow_exit, exitpriority=0)
    time.sleep(0.2)  # holds this worker while the other takes the second item
    return os.getpid()


def test_shutdown_stops_the_workers_at_once_not_one_after_another(tmp_path: Path) -> None:
    p = ProcessPool(2, name="exits")
    p.register("exit_slowly", [_exit_slowly])
    try:
        with ThreadPoolExecutor(2) as callers:  # one call per worker, at the same time
            calls = [callers.submit(p.call_batch, "exit_slowly", [str(tmp_path)]) for _ in "ab"]
            pids = {values(c.result())[0] for c in calls}
    finally:
        p.shutdown()
    assert len(pids) == 2
    begins = [float(Path(tmp_path, f"begin-{pid}").read_text()) for pid in pids]
    ends = [float(Path(tmp_path, f"end-{pid}").read_text()) for pid in pids]
    assert max(begins) < min(ends)  # both were exiting at the same time
