"""Fault injection and error semantics (issue 3).

Retries with backoff, timeouts, ``exceptionally``, ``finally_do``,
``on_failure``, supervisor restarts, bad input tried on purpose, and the
forensic ``af.Failure`` record, all through real runs and started graphs.
"""

from __future__ import annotations

import collections
import inspect
import json
import logging
import os
import pickle
import signal
import threading
import time
from itertools import pairwise
from typing import Any

import pytest

import actorflow as af
from actorflow.testing import crash_node
from tests.conftest import wait_until

# retries that do not slow the suite down
FAST = af.Backoff(initial=0.01, factor=1.0, maximum=0.01, jitter=0.0)

FAILURE_FIELDS = {
    "task",
    "item_id",
    "run_id",
    "attempt",
    "error_type",
    "message",
    "traceback",
    "file_path",
    "line_number",
    "function",
    "timestamp",
    "inputs",
    "locals",
    "pid",
    "thread",
    "executor",
}


class Calls:
    """Counts calls per key, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[Any] = collections.Counter()
        self.order: list[Any] = []

    def hit(self, key: Any) -> int:
        with self.lock:
            self.counts[key] += 1
            self.order.append(key)
            return self.counts[key]


def line_of(fn: Any, marker: str) -> int:
    """The line number of the first source line of ``fn`` containing ``marker``."""
    lines, start = inspect.getsourcelines(getattr(fn, "fn", fn))
    for offset, text in enumerate(lines):
        if marker in text:
            return start + offset
    raise AssertionError(f"{marker!r} not found in the source of {fn!r}")


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of every captured actorflow event called ``name``."""
    return [
        {**r.__dict__, "levelno": r.levelno}
        for r in caplog.records
        if r.name.startswith("actorflow") and r.getMessage() == name
    ]


@af.task
def inc(x: int) -> int:
    return x + 1


@af.task
def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"three is not allowed (got {x})")
    return x


@af.task
def keep_even(x: int) -> Any:
    return x if x % 2 == 0 else af.SKIP


@af.task
def explode(x: int) -> int:
    doubled = x * 2
    label = "boom"
    raise ValueError(f"{label}: {doubled}")  # the raising line


def _check_positive(value: int) -> int:
    if value <= 0:
        raise ArithmeticError(f"{value} is not positive")  # the helper's raising line
    return value


@af.task
def validate(x: int) -> int:
    return _check_positive(x - 100)


# --- 1. retries ------------------------------------------------------------------------


def test_a_task_failing_twice_then_succeeding_with_two_retries_returns_its_value() -> None:
    calls = Calls()

    @af.task(retries=2, backoff=FAST)
    def flaky(x: int) -> int:
        if calls.hit(x) < 3:
            raise ConnectionError(f"item {x} is not reachable yet")
        return x * 10

    @af.flow
    def f(x: int) -> Any:
        return flaky(x)

    assert f.run(4) == 40
    assert calls.counts[4] == 3
    with f.start() as running:
        assert running.submit(5).result(timeout=10) == 50
        m = running.metrics()["flaky"]
        assert (m.done, m.failed, m.retried) == (1, 0, 2)
        assert running.dead_letters() == []
    assert calls.counts[5] == 3


def test_when_retries_run_out_the_failure_records_the_last_attempt() -> None:
    calls = Calls()

    @af.task(retries=1, backoff=FAST)
    def always_down(x: int) -> int:
        calls.hit(x)
        raise ConnectionError("still down")

    @af.flow
    def f(x: int) -> Any:
        return inc(always_down(x))

    with pytest.raises(af.RunFailed) as info:
        f.run(1)
    (failure,) = info.value.failures
    assert (failure.task, failure.attempt) == ("always_down", 2)
    assert (failure.error_type, failure.message) == ("ConnectionError", "still down")
    assert calls.counts[1] == 2  # retries=1: two calls, no more
    with f.start() as running:
        with pytest.raises(af.RunFailed) as info:
            running.submit(2).result(timeout=10)
        assert info.value.failures[0].attempt == 2
        m = running.metrics()
        assert (m["always_down"].done, m["always_down"].failed) == (0, 1)
        assert m["always_down"].retried == 1
        assert m["inc"].done == 0
        assert [f.attempt for f in running.dead_letters()] == [2]
    assert calls.counts[2] == 2


def test_retry_on_limits_which_exceptions_are_retried() -> None:
    calls = Calls()

    @af.task(retries=3, backoff=FAST, retry_on=(ConnectionError,))
    def picky(kind: str) -> str:
        n = calls.hit(kind)
        if kind == "value":
            raise ValueError("not a connection problem: never retried")
        if kind == "refused" and n == 1:
            raise ConnectionRefusedError("a subclass of ConnectionError: retried")
        return kind

    @af.flow
    def f(kind: str) -> Any:
        return picky(kind)

    with f.start() as running:
        assert running.submit("refused").result(timeout=10) == "refused"
        with pytest.raises(af.RunFailed) as info:
            running.submit("value").result(timeout=10)
        assert running.metrics()["picky"].retried == 1
    (failure,) = info.value.failures
    assert (failure.error_type, failure.attempt) == ("ValueError", 1)
    assert calls.counts == {"refused": 2, "value": 1}


def test_the_delays_between_attempts_follow_the_backoff_up_to_its_maximum() -> None:
    stamps: list[float] = []

    @af.task(retries=4, backoff=af.Backoff(initial=0.04, factor=3.0, maximum=0.4, jitter=0.0))
    def flaky(x: int) -> int:
        stamps.append(time.monotonic())
        if len(stamps) <= 4:
            raise ConnectionError("down")
        return x

    @af.flow
    def f(x: int) -> Any:
        return flaky(x)

    assert f.run(7) == 7
    gaps = [b - a for a, b in pairwise(stamps)]
    nominal = [0.04, 0.12, 0.36, 0.4]  # the last one capped (uncapped: 1.08)
    assert len(gaps) == len(nominal)
    for gap, want in zip(gaps, nominal, strict=True):
        assert gap >= want - 0.005, (gaps, nominal)
    assert gaps[0] < gaps[1] < gaps[2]  # growing by the factor
    assert gaps[3] < 0.9, gaps  # capped at maximum=0.4, not 1.08


def test_jitter_spreads_the_delay_below_and_above_its_nominal_value() -> None:
    stamps: dict[int, list[float]] = collections.defaultdict(list)

    @af.task(retries=1, backoff=af.Backoff(initial=0.1, factor=1.0, maximum=0.1, jitter=0.5))
    def flaky(x: int) -> int:
        stamps[x].append(time.monotonic())
        if len(stamps[x]) == 1:
            raise ConnectionError("first try fails")
        return x

    @af.flow
    def f(x: int) -> Any:
        return flaky(x)

    with f.start() as running:
        assert list(running.map(range(20))) == list(range(20))
    gaps = sorted(s[1] - s[0] for s in stamps.values())
    assert gaps[0] >= 0.05 - 0.005, gaps  # never below delay * (1 - jitter)
    # only a negative jitter brings a delay below its nominal 0.1 s (scheduling only adds);
    # 20 uniform draws in [0.05, 0.15] all above 0.09 has probability 0.6 ** 20
    assert gaps[0] < 0.09, gaps


def test_a_pending_retry_does_not_block_later_items_of_the_node() -> None:
    first_failed = threading.Event()
    retried = threading.Event()

    @af.task(retries=1, backoff=af.Backoff(initial=1.0, factor=1.0, maximum=1.0, jitter=0.0))
    def fetch(name: str) -> str:
        if name == "slow":
            if not first_failed.is_set():
                first_failed.set()
                raise ConnectionError("first try fails")
            retried.set()
        return name.upper()

    @af.flow
    def f(name: str) -> Any:
        return fetch(name)

    with f.start() as running:
        slow = running.submit("slow")
        assert first_failed.wait(10)
        quick = running.submit("quick")
        assert quick.result(timeout=10) == "QUICK"
        assert not retried.is_set()  # the retry still waits on its timer...
        assert not slow.done()  # ...and the later item did not wait for it
        assert slow.result(timeout=10) == "SLOW"
        assert running.metrics()["fetch"].retried == 1


def test_a_retried_item_is_emitted_when_it_succeeds_after_later_items() -> None:
    calls = Calls()

    @af.task(retries=1, backoff=af.Backoff(initial=0.3, factor=1.0, maximum=0.3, jitter=0.0))
    def fetch(name: str) -> str:
        if name == "slow" and calls.hit(name) == 1:
            raise ConnectionError("first try fails")
        return name.upper()

    @af.flow
    def f(name: str) -> Any:
        return inc_len(fetch(name))

    @af.task
    def inc_len(s: str) -> str:
        return s + "!"

    with f.start() as running:
        assert list(running.stream(["slow", "a", "b"])) == ["A!", "B!", "SLOW!"]
        assert list(running.map(["slow", "c"])) == ["SLOW!", "C!"]  # map keeps input order


def test_retries_inside_a_fused_chain_deliver_every_item_once_and_correctly() -> None:
    flaky_calls = Calls()
    after_calls = Calls()

    @af.task(retries=2, backoff=FAST)
    def flaky(x: int) -> int:
        if x % 10 == 0 and flaky_calls.hit(x) < 3:
            raise ConnectionError(f"item {x} fails twice")
        return x

    @af.task
    def record(x: int) -> int:
        after_calls.hit(x)
        return x

    @af.flow
    def f(x: int) -> Any:
        return record(inc(flaky(inc(x))))

    with f.start() as running:
        assert list(running.map(range(200))) == [x + 2 for x in range(200)]
        m = running.metrics()
        assert m["flaky"].retried == 2 * 20
        assert (m["flaky"].done, m["flaky"].failed) == (200, 0)
        assert m["record"].done == 200
    assert all(n == 3 for n in flaky_calls.counts.values())
    assert len(flaky_calls.counts) == 20
    assert sorted(after_calls.order) == [x + 2 for x in range(200)]  # each item once


def test_a_retried_join_node_gets_its_inputs_again() -> None:
    calls = Calls()

    @af.task
    def left(x: int) -> int:
        return x * 10

    @af.task
    def right(x: int) -> int:
        return x + 1

    @af.task(retries=1, backoff=FAST)
    def combine(a: int, b: int) -> int:
        if calls.hit((a, b)) == 1:
            raise ConnectionError("first try of every item fails")
        return a + b

    @af.flow
    def f(x: int) -> Any:
        return combine(left(x), right(x))

    with f.start() as running:
        assert list(running.map(range(50))) == [11 * x + 1 for x in range(50)]
        assert running.metrics()["combine"].retried == 50
    assert set(calls.counts.values()) == {2}


def test_leaving_the_block_waits_for_an_item_pending_a_retry() -> None:
    calls = Calls()

    @af.task(retries=1, backoff=af.Backoff(initial=0.2, factor=1.0, maximum=0.2, jitter=0.0))
    def fails_once(x: int) -> int:
        if calls.hit(x) == 1:
            raise ConnectionError("first try fails")
        return x

    @af.flow
    def f(x: int) -> Any:
        return fails_once(x)

    with f.start() as running:
        fut = running.submit(1)
        wait_until(lambda: running.metrics()["fails_once"].retried == 1)
    assert fut.result(timeout=0) == 1  # drained: the retry ran before the block ended
    assert calls.counts[1] == 2


def test_stop_without_drain_cancels_an_item_pending_a_retry() -> None:
    calls = Calls()
    outcomes: list[Any] = []

    @af.task(retries=1, backoff=af.Backoff(initial=0.5, factor=1.0, maximum=0.5, jitter=0.0))
    def fails_once(x: int) -> int:
        if calls.hit(x) == 1:
            raise ConnectionError("first try fails")
        return x

    @af.flow(finally_do=lambda outcome: outcomes.append(outcome))
    def f(x: int) -> Any:
        return fails_once(x)

    running = f.start()
    try:
        fut = running.submit(1)
        wait_until(lambda: running.metrics()["fails_once"].retried == 1)
    finally:
        running.stop(drain=False)
    assert fut.cancelled()
    assert [(o.error_type, o.item_id) for o in outcomes] == [("CancelledError", 0)]
    assert calls.counts[1] == 1  # the timer was cancelled with the run's threads


def test_retries_on_a_node_with_several_workers_deliver_every_item_once() -> None:
    calls = Calls()

    @af.task(workers=3, retries=1, backoff=FAST)
    def flaky(x: int) -> int:
        if x % 7 == 0 and calls.hit(x) == 1:
            raise ConnectionError(f"item {x} fails once")
        return x * 2

    @af.flow
    def f(x: int) -> Any:
        return inc(flaky(x))

    with f.start(max_in_flight=64) as running:
        assert list(running.map(range(300))) == [2 * x + 1 for x in range(300)]
        m = running.metrics()
        assert (m["flaky"].done, m["flaky"].retried, m["flaky"].failed) == (300, 43, 0)
        assert m["inc"].done == 300


def test_af_map_elements_are_retried_under_their_tasks_policy() -> None:
    calls = Calls()

    @af.task(retries=2, backoff=FAST)
    def flaky(x: int) -> int:
        if calls.hit(x) < 2:
            raise ConnectionError(f"element {x} fails once")
        return x * 10

    @af.task
    def split(n: int) -> list[int]:
        return list(range(n))

    @af.flow
    def f(n: int) -> Any:
        return af.map(flaky, split(n))

    assert f.run(3) == [0, 10, 20]
    assert calls.counts == {0: 2, 1: 2, 2: 2}


def test_a_base_exception_is_never_retried() -> None:
    calls = Calls()

    @af.task(retries=3, backoff=FAST)
    def interrupt(x: int) -> int:
        calls.hit(x)
        raise KeyboardInterrupt

    @af.flow
    def f(x: int) -> Any:
        return interrupt(x)

    with pytest.raises(KeyboardInterrupt):
        f.run(1)
    assert calls.counts[1] == 1


def test_retries_and_final_failures_are_logged_as_structured_events(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @af.task(retries=2, backoff=FAST)
    def always_down(x: int) -> int:
        raise ConnectionError("down")

    @af.flow
    def f(x: int) -> Any:
        return always_down(x)

    with caplog.at_level(logging.WARNING, logger="actorflow"):
        with pytest.raises(af.RunFailed) as info:
            f.run(1)
    (failure,) = info.value.failures
    retried = events(caplog, "task_retried")
    assert [(e["levelno"], e["task"], e["attempt"]) for e in retried] == [
        (logging.WARNING, "always_down", 1),
        (logging.WARNING, "always_down", 2),
    ]
    assert all(e["item_id"] == failure.item_id for e in retried)
    (failed,) = events(caplog, "task_failed")  # once per final failure, not per attempt
    assert (failed["levelno"], failed["task"], failed["attempt"]) == (
        logging.ERROR,
        "always_down",
        3,
    )
    assert failed["item_id"] == failure.item_id


# --- 2. timeouts ---------------------------------------------------------------------------


def test_a_task_over_its_timeout_fails_with_task_timeout_and_other_items_flow() -> None:
    release = threading.Event()
    late_returned = threading.Event()

    @af.task(timeout=0.2)
    def lookup(x: int) -> Any:
        if x == 0:
            release.wait(10)
            late_returned.set()
            return "late"
        return x

    @af.flow
    def f(x: int) -> Any:
        return lookup(x)

    try:
        with f.start() as running:
            stuck = running.submit(0)
            others = [running.submit(i) for i in range(1, 5)]
            assert [fut.result(timeout=10) for fut in others] == [1, 2, 3, 4]
            with pytest.raises(af.RunFailed) as info:
                stuck.result(timeout=10)
            abandoned = [
                t for t in threading.enumerate() if t.name.startswith("actorflow-timeout-")
            ]
            assert abandoned
            assert all(t.daemon for t in abandoned)
            release.set()
            assert late_returned.wait(10)
            assert running.submit(5).result(timeout=10) == 5
            assert len(running.dead_letters()) == 1
            m = running.metrics()["lookup"]
            assert (m.done, m.failed, m.retried) == (5, 1, 0)
    finally:
        release.set()
    (failure,) = info.value.failures
    assert (failure.task, failure.error_type, failure.attempt) == ("lookup", "TaskTimeout", 1)
    assert isinstance(failure.exception(), af.TaskTimeout)
    # the late "late" result went nowhere: the item stays failed
    assert stuck.exception() is info.value


def test_run_returns_at_the_timeout_without_waiting_for_the_abandoned_call() -> None:
    release = threading.Event()

    @af.task(timeout=0.1)
    def hang(x: int) -> int:
        release.wait(10)
        return x

    @af.flow
    def f(x: int) -> Any:
        return hang(x)

    t0 = time.monotonic()
    try:
        with pytest.raises(af.RunFailed) as info:
            f.run(1)
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    assert elapsed < 5.0  # the call itself would block for 10 s
    assert info.value.failures[0].error_type == "TaskTimeout"


def test_a_timed_out_attempt_is_retried_like_any_failure() -> None:
    release = threading.Event()
    calls = Calls()

    @af.task(timeout=0.1, retries=2, backoff=FAST)
    def sometimes_hangs(kind: str) -> str:
        n = calls.hit(kind)
        if kind == "always" or n == 1:
            release.wait(10)
        return kind

    @af.flow
    def f(kind: str) -> Any:
        return sometimes_hangs(kind)

    try:
        with f.start() as running:
            assert running.submit("once").result(timeout=10) == "once"
            with pytest.raises(af.RunFailed) as info:
                running.submit("always").result(timeout=10)
            m = running.metrics()["sometimes_hangs"]
            assert (m.done, m.failed, m.retried) == (1, 1, 3)
    finally:
        release.set()
    (failure,) = info.value.failures
    assert (failure.error_type, failure.attempt) == ("TaskTimeout", 3)
    assert calls.counts == {"once": 2, "always": 3}


def test_af_map_elements_honour_their_tasks_timeout() -> None:
    release = threading.Event()

    @af.task(timeout=0.1)
    def lookup(x: int) -> int:
        if x == 1:
            release.wait(2)
        return x

    @af.task
    def split(n: int) -> list[int]:
        return list(range(n))

    @af.flow
    def f(n: int) -> Any:
        return af.map(lookup, split(n))

    try:
        with pytest.raises(af.RunFailed) as info:
            f.run(3)
    finally:
        release.set()
    assert [x.error_type for x in info.value.failures] == ["TaskTimeout"]


# --- 3. exceptionally ----------------------------------------------------------------------


def test_exceptionally_turns_a_failure_back_into_a_value_and_downstream_runs() -> None:
    seen: list[af.Failure] = []
    downstream = Calls()

    def fallback(failure: af.Failure) -> int:
        seen.append(failure)
        return -1

    @af.task
    def scale(x: int) -> int:
        downstream.hit(x)
        return x * 100

    @af.flow
    def f(x: int) -> Any:
        return scale(fail_on_three(x).exceptionally(fallback))

    assert f.run(3) == -100
    (failure,) = seen
    assert (failure.task, failure.error_type) == ("fail_on_three", "ValueError")
    assert failure.message == "three is not allowed (got 3)"
    assert downstream.order == [-1]
    assert f.run(2) == 200
    assert len(seen) == 1  # no error: the handler is skipped
    assert downstream.order == [-1, 2]


def test_exceptionally_is_skipped_for_values_and_skips_and_never_counts_as_a_failure() -> None:
    handled = Calls()

    @af.task
    def fallback(failure: af.Failure) -> int:
        handled.hit(failure.item_id)
        return -1

    @af.flow
    def f(x: int) -> Any:
        return fail_on_three(keep_even(x)).exceptionally(fallback)

    @af.flow
    def g(x: int) -> Any:
        return fail_on_three(x).exceptionally(fallback)

    with f.start() as running:
        assert list(running.map(range(5))) == [0, af.SKIP, 2, af.SKIP, 4]
    assert handled.order == []
    with g.start() as running:
        assert list(running.map(range(6))) == [0, 1, 2, -1, 4, 5]
        assert running.dead_letters() == []  # recovered: not a dead letter
        assert running.metrics()["fail_on_three"].failed == 1
    assert len(handled.order) == 1


def test_a_failure_skips_the_normal_tasks_up_to_the_handler() -> None:
    skipped = Calls()
    seen: list[af.Failure] = []

    @af.task
    def middle(x: int) -> int:
        skipped.hit(x)
        return x

    def fallback(failure: af.Failure) -> int:
        seen.append(failure)
        return 0

    @af.flow
    def f(x: int) -> Any:
        return inc(middle(inc(fail_on_three(x))).exceptionally(fallback))

    assert f.run(3) == 1
    assert skipped.order == []
    assert [s.task for s in seen] == ["fail_on_three"]


def test_exceptionally_receives_the_failure_after_retries_ran_out() -> None:
    seen: list[af.Failure] = []

    @af.task(retries=2, backoff=FAST)
    def always_down(x: int) -> int:
        raise ConnectionError("down")

    def fallback(failure: af.Failure) -> str:
        seen.append(failure)
        return "cached"

    @af.flow
    def f(x: int) -> Any:
        return always_down(x).exceptionally(fallback)

    assert f.run(1) == "cached"
    assert [(s.task, s.attempt) for s in seen] == [("always_down", 3)]


def test_an_exceptionally_handler_may_skip_the_item() -> None:
    @af.flow
    def f(x: int) -> Any:
        return inc(fail_on_three(x).exceptionally(lambda failure: af.SKIP))

    assert f.run(3) is af.SKIP
    with f.start() as running:
        assert list(running.map(range(5))) == [1, 2, 3, af.SKIP, 5]
        assert running.dead_letters() == []


def test_a_raising_exceptionally_handler_fails_the_item_with_its_own_failure() -> None:
    downstream = Calls()

    def broken_fallback(failure: af.Failure) -> int:
        raise LookupError(f"no fallback for {failure.task}")

    @af.task
    def scale(x: int) -> int:
        downstream.hit(x)
        return x * 100

    @af.flow
    def f(x: int) -> Any:
        return scale(fail_on_three(x).exceptionally(broken_fallback))

    with pytest.raises(af.RunFailed) as info:
        f.run(3)
    last = info.value.failures[-1]
    assert (last.task, last.error_type) == ("broken_fallback", "LookupError")
    assert last.message == "no fallback for fail_on_three"
    assert last.function == "broken_fallback"
    assert downstream.order == []
    assert f.run(1) == 100  # no error: the broken handler is never called


# --- 4. finally_do -------------------------------------------------------------------------


def test_finally_do_runs_once_per_run_with_the_value_or_the_failure() -> None:
    outcomes: list[Any] = []

    def cleanup(outcome: Any) -> None:
        outcomes.append(outcome)

    @af.flow(finally_do=cleanup)
    def f(x: int) -> Any:
        return inc(fail_on_three(x))

    assert f.run(1) == 2
    assert outcomes == [2]  # completed before run() returned
    with pytest.raises(af.RunFailed) as info:
        f.run(3)
    assert len(outcomes) == 2
    outcome = outcomes[1]
    assert isinstance(outcome, af.Failure)
    assert (outcome.task, outcome.error_type) == ("fail_on_three", "ValueError")
    assert [f.task for f in info.value.failures] == ["fail_on_three"]  # result unchanged
    assert info.value.failures[0] == outcome


def test_a_raising_finally_do_replaces_the_result_with_its_own_failure() -> None:
    def release_lock(outcome: Any) -> None:
        raise OSError("could not release the lock")

    @af.flow(finally_do=release_lock)
    def f(x: int) -> Any:
        return fail_on_three(x)

    with pytest.raises(af.RunFailed) as info:
        f.run(1)
    assert [(x.task, x.error_type) for x in info.value.failures] == [("release_lock", "OSError")]
    assert info.value.failures[0].message == "could not release the lock"
    with pytest.raises(af.RunFailed) as info:
        f.run(3)
    assert "release_lock" in [x.task for x in info.value.failures]
    with f.start() as running:
        with pytest.raises(af.RunFailed) as info:
            running.submit(1).result(timeout=10)
        assert [x.task for x in info.value.failures] == ["release_lock"]
        assert [x.task for x in running.dead_letters()] == ["release_lock"]


def test_a_finally_do_taking_no_argument_is_called_with_none() -> None:
    plain = Calls()
    as_task = Calls()

    def cleanup() -> None:
        plain.hit("called")

    @af.task
    def cleanup_task() -> None:
        as_task.hit("called")

    @af.flow(finally_do=cleanup)
    def f(x: int) -> Any:
        return inc(x)

    @af.flow(finally_do=cleanup_task)
    def g(x: int) -> Any:
        return inc(x)

    assert f.run(1) == 2
    assert g.run(2) == 3
    assert plain.counts == {"called": 1}
    assert as_task.counts == {"called": 1}
    with f.start() as running:
        assert list(running.map(range(5))) == [1, 2, 3, 4, 5]
    assert plain.counts == {"called": 6}


def test_finally_do_runs_once_per_item_in_a_started_graph() -> None:
    lock = threading.Lock()
    outcomes: list[Any] = []

    def cleanup(outcome: Any) -> None:
        with lock:
            outcomes.append(outcome)

    @af.flow(finally_do=cleanup)
    def f(x: int) -> Any:
        return inc(fail_on_three(x))

    with f.start() as running:
        futures = [running.submit(i) for i in range(20)]
        for fut in futures:
            fut.exception(timeout=10)
        assert len(outcomes) == 20  # each ran before its future resolved
        assert sorted(running.stream(range(10))) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert len(outcomes) == 30
    failures = [o for o in outcomes if isinstance(o, af.Failure)]
    assert [x.task for x in failures] == ["fail_on_three", "fail_on_three"]
    values = sorted(o for o in outcomes if not isinstance(o, af.Failure))
    assert values == sorted([x + 1 for x in range(20) if x != 3] + [1, 2, 3, 5, 6, 7, 8, 9, 10])


def test_finally_do_runs_once_for_every_item_cancelled_by_stop_without_drain() -> None:
    started = threading.Event()
    release = threading.Event()
    lock = threading.Lock()
    outcomes: list[Any] = []

    def cleanup(outcome: Any) -> None:
        with lock:
            outcomes.append(outcome)
        if isinstance(outcome, af.Failure) and outcome.error_type == "CancelledError":
            release.set()  # the call in progress may return once cancellation began

    @af.task
    def hold(x: int) -> int:
        started.set()
        release.wait(10)
        return x

    @af.flow(finally_do=cleanup)
    def f(x: int) -> Any:
        return hold(x)

    running = f.start()
    try:
        futures = [running.submit(i) for i in range(5)]
        assert started.wait(10)
        running.stop(drain=False)
    finally:
        release.set()
        running.stop()
    cancelled = [
        o for o in outcomes if isinstance(o, af.Failure) and o.error_type == "CancelledError"
    ]
    assert len(cancelled) >= 4  # items 1..4 were still queued
    assert sum(fut.cancelled() for fut in futures) >= 4
    # once per item: the item whose call was in progress is not reported twice
    ids = sorted(o.item_id if isinstance(o, af.Failure) else o for o in outcomes)
    assert ids == [0, 1, 2, 3, 4]


def test_finally_do_runs_when_a_task_cancels_the_run_with_a_keyboard_interrupt() -> None:
    outcomes: list[Any] = []

    def cleanup(outcome: Any) -> None:
        outcomes.append(outcome)

    @af.task
    def interrupt(x: int) -> int:
        raise KeyboardInterrupt

    @af.flow(finally_do=cleanup)
    def f(x: int) -> Any:
        return interrupt(x)

    with pytest.raises(KeyboardInterrupt):
        f.run(1)
    assert len(outcomes) == 1  # cancellation: called once, before run() re-raised
    assert isinstance(outcomes[0], af.Failure)


def test_finally_do_runs_on_ctrl_c_while_run_waits() -> None:
    started = threading.Event()
    release = threading.Event()
    outcomes: list[Any] = []

    @af.task
    def busy(x: int) -> int:
        started.set()
        release.wait(10)
        return x

    def cleanup(outcome: Any) -> None:
        outcomes.append(outcome)
        release.set()  # the call in progress may return once cancellation began

    @af.flow(finally_do=cleanup)
    def f(x: int) -> Any:
        return busy(x)

    def press_ctrl_c() -> None:
        if started.wait(10):  # never interrupt anything but this run
            os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            f.run(1)
    finally:
        release.set()
        presser.join()
    assert [(o.error_type, o.item_id) for o in outcomes] == [("CancelledError", 0)]


def test_finally_do_runs_for_items_failed_by_the_restart_limit() -> None:
    outcomes: list[Any] = []

    @af.task
    class Tally:
        def __call__(self, x: int) -> int:
            return x

    @af.flow(
        finally_do=lambda outcome: outcomes.append(outcome),
        supervision=af.Supervision(max_restarts=0),
    )
    def f(x: int) -> Any:
        return Tally(x)

    with f.start() as running:
        crash_node(running, "Tally")
        fut = running.submit(1)
        assert isinstance(fut.exception(timeout=10), af.ActorflowError)
    assert len(outcomes) == 1  # the item failed: its finally_do still ran, once
    assert isinstance(outcomes[0], af.Failure)


# --- 5. on_failure -------------------------------------------------------------------------


def test_on_failure_runs_once_per_final_failure_not_per_retry() -> None:
    calls = Calls()
    alerts: list[af.Failure] = []

    @af.task(retries=2, backoff=FAST)
    def always_down(x: int) -> int:
        calls.hit(x)
        raise ConnectionError("down")

    @af.flow
    def f(x: int) -> Any:
        return inc(always_down(x))

    handler = f.on_failure(alerts.append)
    assert handler == alerts.append  # usable as a decorator: returns the handler
    with pytest.raises(af.RunFailed) as info:
        f.run(1)
    assert calls.counts[1] == 3
    assert [(a.task, a.attempt) for a in alerts] == [("always_down", 3)]
    assert alerts[0] == info.value.failures[0]


def test_on_failure_as_a_decorator_runs_before_the_future_resolves() -> None:
    alerts: list[str] = []

    @af.flow
    def f(x: int) -> Any:
        return fail_on_three(x)

    @f.on_failure
    def alert(failure: af.Failure) -> None:
        alerts.append(failure.task)

    assert callable(alert)
    assert alert.__name__ == "alert"
    with f.start() as running:
        assert [running.submit(i).result(timeout=10) for i in range(3)] == [0, 1, 2]
        assert alerts == []
        fut = running.submit(3)
        assert isinstance(fut.exception(timeout=10), af.RunFailed)
        assert alerts == ["fail_on_three"]  # already ran: no waiting needed
        assert sorted(running.stream(range(10))) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert alerts == ["fail_on_three", "fail_on_three"]


def test_on_failure_also_sees_a_failure_that_exceptionally_recovers() -> None:
    alerts: list[af.Failure] = []

    @af.flow
    def f(x: int) -> Any:
        return fail_on_three(x).exceptionally(lambda failure: 0)

    f.on_failure(alerts.append)
    assert f.run(3) == 0
    assert [a.task for a in alerts] == ["fail_on_three"]
    assert f.run(1) == 1
    assert len(alerts) == 1


def test_a_raising_on_failure_handler_is_logged_and_never_changes_the_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    later: list[str] = []

    def broken_alert(failure: af.Failure) -> None:
        raise RuntimeError("the pager is down")

    @af.flow
    def failing(x: int) -> Any:
        return fail_on_three(x)

    @af.flow
    def recovering(x: int) -> Any:
        return fail_on_three(x).exceptionally(lambda failure: -1)

    for fl in (failing, recovering):
        fl.on_failure(broken_alert)
        fl.on_failure(lambda failure: later.append(failure.task))

    with caplog.at_level(logging.ERROR, logger="actorflow"):
        with pytest.raises(af.RunFailed) as info:
            failing.run(3)
        assert recovering.run(3) == -1
        assert failing.run(2) == 2
    assert [(x.task, x.error_type) for x in info.value.failures] == [
        ("fail_on_three", "ValueError")
    ]
    logged = events(caplog, "on_failure_handler_failed")
    assert len(logged) == 2
    assert all(e["levelno"] == logging.ERROR for e in logged)
    assert later == ["fail_on_three", "fail_on_three"]  # handlers after it still run


def test_on_failure_runs_for_each_failed_input_of_a_join() -> None:
    alerts: list[str] = []

    @af.task
    def fail_a(x: int) -> int:
        raise ValueError("a")

    @af.task
    def fail_b(x: int) -> int:
        raise ValueError("b")

    @af.task
    def add(a: int, b: int) -> int:
        return a + b

    @af.flow
    def f(x: int) -> Any:
        return add(fail_a(x), fail_b(x))

    f.on_failure(lambda failure: alerts.append(failure.task))
    with pytest.raises(af.RunFailed) as info:
        f.run(1)
    assert sorted(alerts) == ["fail_a", "fail_b"]
    assert sorted(x.task for x in info.value.failures) == ["fail_a", "fail_b"]


def test_a_graphs_on_failure_handler_runs_once_per_failure() -> None:
    alerts: list[af.Failure] = []
    g = af.Graph("checks")
    g.add("extract", lambda x: x)
    g.add("check", fail_on_three, depends_on=["extract"])
    g.add("report", inc, depends_on=["check"])
    assert g.on_failure(alerts.append) == alerts.append
    assert g.run(1) == {"report": 2}
    with pytest.raises(af.RunFailed):
        g.run(3)
    assert [a.task for a in alerts] == ["check"]
    with g.start() as running:
        with pytest.raises(af.RunFailed):
            running.submit(3).result(timeout=10)
    assert [a.task for a in alerts] == ["check", "check"]


# --- 6. supervision ------------------------------------------------------------------------


def _tally_class(calls: Calls) -> Any:
    @af.task
    class Tally:
        def __init__(self) -> None:
            self.seen = 0

        def __call__(self, x: int) -> tuple[int, int]:
            calls.hit(x)
            self.seen += 1
            return x, self.seen

    return Tally


def test_a_crashed_node_is_restarted_and_every_item_completes_exactly_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before, during, after = Calls(), Calls(), Calls()
    tally = _tally_class(during)

    @af.task
    def prepare(x: int) -> int:
        before.hit(x)
        return x

    @af.task
    def finish(pair: tuple[int, int]) -> int:
        after.hit(pair[0])
        return pair[0] * 2

    @af.flow
    def f(x: int) -> Any:
        return finish(tally(prepare(x)))

    with caplog.at_level(logging.WARNING, logger="actorflow"):
        with f.start() as running:
            crash_node(running, "Tally", times=3)
            assert list(running.map(range(100))) == [2 * x for x in range(100)]
            assert running.dead_letters() == []
    for calls in (before, during, after):
        assert sorted(calls.order) == list(range(100))  # each item exactly once
    restarted = events(caplog, "node_restarted")
    assert len(restarted) == 3
    assert all(e["levelno"] == logging.WARNING and e["task"] == "Tally" for e in restarted)


def test_a_restart_gives_class_tasks_fresh_instances() -> None:
    tally = _tally_class(Calls())

    @af.flow
    def f(x: int) -> Any:
        return tally(x)

    with f.start() as running:
        assert [running.submit(i).result(timeout=10) for i in range(2)] == [(0, 1), (1, 2)]
        crash_node(running, "Tally")
        assert [running.submit(i).result(timeout=10) for i in range(2, 4)] == [(2, 1), (3, 2)]


def test_an_async_node_crashed_by_fault_injection_is_restarted_and_replays() -> None:
    @af.task
    class AsyncTally:
        def __init__(self) -> None:
            self.n = 0

        async def __call__(self, x: int) -> tuple[int, int]:
            self.n += 1
            return x, self.n

    @af.flow
    def f(x: int) -> Any:
        return AsyncTally(x)

    with f.start() as running:
        assert running.submit(0).result(timeout=10) == (0, 1)
        crash_node(running, "AsyncTally")
        assert running.submit(1).result(timeout=10) == (1, 1)  # replayed on a fresh instance


def test_a_crashed_join_node_replays_its_batch_and_loses_nothing() -> None:
    joined = Calls()

    @af.task
    def left(x: int) -> int:
        return x * 10

    @af.task
    def right(x: int) -> int:
        return x + 1

    @af.task
    def combine(a: int, b: int) -> int:
        joined.hit(a)
        return a + b

    @af.flow
    def f(x: int) -> Any:
        return combine(left(x), right(x))

    with f.start() as running:
        crash_node(running, "combine", times=2)
        assert list(running.map(range(300))) == [11 * x + 1 for x in range(300)]
    assert sorted(joined.order) == [10 * x for x in range(300)]


def test_a_crashed_node_with_several_workers_loses_no_item() -> None:
    calls = Calls()

    @af.task(workers=3)
    def score(x: int) -> int:
        calls.hit(x)
        return x * 3

    @af.flow
    def f(x: int) -> Any:
        return inc(score(x))

    with f.start(max_in_flight=64) as running:
        crash_node(running, "score", times=4)
        assert list(running.map(range(300))) == [3 * x + 1 for x in range(300)]
        assert running.metrics()["score"].done == 300
    assert sorted(calls.order) == list(range(300))


@pytest.mark.parametrize(
    ("strategy", "crashed", "expected"),
    [
        ("one_for_one", "First", (1, 3)),  # only First starts over
        ("with_downstream", "First", (1, 1)),  # Second, downstream of it, too
        ("with_downstream", "Second", (3, 1)),  # First is upstream: kept
    ],
)
def test_the_supervision_strategy_decides_which_class_tasks_start_over(
    strategy: Any, crashed: str, expected: tuple[int, int]
) -> None:
    @af.task
    class First:
        def __init__(self) -> None:
            self.seen = 0

        def __call__(self, x: int) -> int:
            self.seen += 1
            return self.seen

    @af.task
    class Second:
        def __init__(self) -> None:
            self.seen = 0

        def __call__(self, n: int) -> tuple[int, int]:
            self.seen += 1
            return n, self.seen

    @af.flow(supervision=af.Supervision(strategy=strategy))
    def f(x: int) -> Any:
        return Second(First(x))

    with f.start() as running:
        assert [running.submit(i).result(timeout=10) for i in range(2)] == [(1, 1), (2, 2)]
        crash_node(running, crashed)
        assert running.submit(2).result(timeout=10) == expected


def test_more_crashes_than_max_restarts_fail_the_run_with_a_restart_limit_error() -> None:
    gate = threading.Event()
    tally = _tally_class(Calls())

    @af.task
    def wait_for_gate(x: int) -> int:
        gate.wait(10)
        return x

    @af.flow(supervision=af.Supervision(max_restarts=2, within_s=60.0))
    def f(x: int) -> Any:
        return tally(wait_for_gate(x))

    with f.start() as running:  # at the limit: two restarts are fine
        crash_node(running, "Tally", times=2)
        gate.set()
        assert running.submit(1).result(timeout=10) == (1, 1)
    gate.clear()
    try:
        with f.start() as running:
            crash_node(running, "Tally", times=3)
            futures = [running.submit(i) for i in range(3)]
            gate.set()
            for fut in futures:
                exc = fut.exception(timeout=10)
                assert isinstance(exc, af.ActorflowError)
                assert "restart limit" in str(exc)
                assert "Tally" in str(exc)
            with pytest.raises(af.ActorflowError):
                running.submit(4)
    finally:
        gate.set()


def test_the_restart_limit_counts_crashes_across_batches() -> None:
    tally = _tally_class(Calls())

    @af.flow(supervision=af.Supervision(max_restarts=1, within_s=60.0))
    def f(x: int) -> Any:
        return tally(x)

    with f.start() as running:
        crash_node(running, "Tally")
        assert running.submit(1).result(timeout=10) == (1, 1)
        crash_node(running, "Tally")
        with pytest.raises(af.ActorflowError, match="restart limit"):
            running.submit(2).result(timeout=10)


def test_the_restart_limit_error_names_the_crashed_node_even_inside_a_fused_chain() -> None:
    @af.task
    def parse(x: int) -> int:
        return x

    @af.task
    def score(x: int) -> int:
        return x * 2

    @af.flow(supervision=af.Supervision(max_restarts=0))
    def f(x: int) -> Any:
        return score(parse(x))

    with f.start() as running:
        crash_node(running, "score")
        with pytest.raises(af.ActorflowError, match="restart limit") as info:
            running.submit(1).result(timeout=10)
    assert "'score'" in str(info.value)


# --- 7. bad input, tried on purpose ----------------------------------------------------------


class Halt(BaseException):
    """A BaseException of the user's own."""


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, Halt])
@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_base_exception_in_a_task_stops_the_run_and_is_re_raised(
    exc_type: type[BaseException], timeout: float | None
) -> None:
    downstream = Calls()

    @af.task(timeout=timeout)
    def abort(x: int) -> int:
        raise exc_type("stop now")

    @af.task
    def after(x: int) -> int:
        downstream.hit(x)
        return x

    @af.flow
    def f(x: int) -> Any:
        return after(abort(x))

    with pytest.raises(exc_type, match="stop now"):
        f.run(1)
    assert downstream.order == []  # the autouse fixture checks that no thread is left

    @af.flow
    def healthy(x: int) -> Any:
        return inc(x)

    assert healthy.run(1) == 2  # nothing left poisoned


def test_a_task_returning_an_unpicklable_value_works_with_thread_tasks() -> None:
    lock = threading.Lock()

    @af.task
    def make_lock(x: int) -> Any:
        return lock

    @af.task
    def use_lock(held: Any) -> str:
        with held:
            return "used"

    @af.flow
    def f(x: int) -> Any:
        return {"lock": make_lock(x), "used": use_lock(make_lock(x))}

    out = f.run(1)
    assert out["lock"] is lock
    assert out["used"] == "used"
    with f.start() as running:
        assert running.submit(2).result(timeout=10)["lock"] is lock


def test_an_exception_holding_an_unpicklable_value_still_gives_a_picklable_failure() -> None:
    class LockedError(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()

    @af.task
    def locked(x: int) -> int:
        raise LockedError("holding a lock")

    @af.flow
    def f(x: int) -> Any:
        return locked(x)

    with pytest.raises(af.RunFailed) as info:
        f.run(1)
    clone = pickle.loads(pickle.dumps(info.value))
    (failure,) = clone.failures
    assert (failure.error_type, failure.message) == ("LockedError", "holding a lock")
    assert "holding a lock" in str(failure.exception())


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str exploded")

    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


class Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


def test_an_exception_whose_str_and_repr_raise_is_still_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @af.task
    def raise_unprintable(x: Any) -> int:
        thing = Unrepresentable()
        raise Unprintable(thing)

    @af.flow
    def f(x: Any) -> Any:
        return raise_unprintable(x)

    with caplog.at_level(logging.ERROR, logger="actorflow"):
        with pytest.raises(af.RunFailed) as info:
            f.run(Unrepresentable())
        with f.start() as running:
            with pytest.raises(af.RunFailed):
                running.submit(Unrepresentable()).result(timeout=10)
            assert len(running.dead_letters()) == 1
    (failure,) = info.value.failures
    assert failure.error_type == "Unprintable"
    assert isinstance(failure.message, str)
    assert isinstance(failure.locals["thing"], str)
    assert "Unrepresentable" in failure.locals["thing"]
    assert isinstance(failure.inputs[0], str)
    assert "Unprintable" in str(info.value)
    json.dumps(failure.to_dict())
    assert pickle.loads(pickle.dumps(failure)).error_type == "Unprintable"
    assert len(events(caplog, "task_failed")) == 2


def test_an_enormous_local_or_input_is_truncated_in_the_failure() -> None:
    @af.task
    def with_enormous_locals(text: str) -> int:
        blob = text * 2
        rows = list(range(1_000_000))
        raise ValueError(f"too big: {len(blob)} chars, {len(rows)} rows")

    @af.flow
    def f(text: str) -> Any:
        return with_enormous_locals(text)

    with pytest.raises(af.RunFailed) as info:
        f.run("y" * 5_000_000)
    (failure,) = info.value.failures
    assert failure.message == "too big: 10000000 chars, 1000000 rows"
    assert set(failure.locals) == {"text", "blob", "rows"}
    assert all(len(v) <= 1000 for v in failure.locals.values())
    assert failure.locals["blob"].startswith("'yyyy")
    assert len(failure.inputs[0]) <= 1000
    assert len(pickle.dumps(failure)) < 100_000
    assert len(json.dumps(failure.to_dict())) < 100_000
    assert len(str(info.value)) < 10_000


def test_ten_thousand_items_with_every_tenth_failing_give_exact_dead_letters() -> None:
    @af.task
    def every_tenth_fails(x: int) -> int:
        if x % 10 == 0:
            raise ValueError(f"item {x} is a multiple of ten")
        return x

    @af.flow
    def f(x: int) -> Any:
        return inc(every_tenth_fails(x))

    n = 10_000
    with f.start() as running:
        futures = [running.submit(x) for x in range(n)]
        results: dict[int, int] = {}
        failed: list[int] = []
        for x, fut in enumerate(futures):
            exc = fut.exception(timeout=30)
            if exc is None:
                results[x] = fut.result()
            else:
                assert isinstance(exc, af.RunFailed)
                assert exc.failures[0].message == f"item {x} is a multiple of ten"
                failed.append(x)
        assert failed == list(range(0, n, 10))
        assert results == {x: x + 1 for x in range(n) if x % 10}
        dead = running.dead_letters()
        assert len(dead) == 1000
        assert {d.task for d in dead} == {"every_tenth_fails"}
        assert sorted(d.inputs for d in dead) == sorted((repr(x),) for x in range(0, n, 10))
        m = running.metrics()
        assert (m["every_tenth_fails"].done, m["every_tenth_fails"].failed) == (9000, 1000)
        assert m["inc"].done == 9000
    with f.start() as running:
        assert sorted(running.stream(range(n))) == [x + 1 for x in range(n) if x % 10]
        assert len(running.dead_letters()) == 1000
        assert running.metrics()["every_tenth_fails"].failed == 1000
        got: list[int] = []
        with pytest.raises(af.RunFailed):
            got.extend(running.map(range(1, n)))
        assert got == list(range(2, 11))  # map raises when item 10 is reached


# --- 8. the forensic record ----------------------------------------------------------------


def test_a_failure_points_at_the_users_raising_line_with_its_locals() -> None:
    @af.flow
    def f(x: int) -> Any:
        return explode(x)

    t0 = time.time()
    with pytest.raises(af.RunFailed) as info:
        f.run(21)
    t1 = time.time()
    (failure,) = info.value.failures
    assert failure.file_path == __file__
    assert failure.line_number == line_of(explode, "raise ValueError")
    assert failure.function == "explode"
    assert failure.locals == {"x": "21", "doubled": "42", "label": "'boom'"}
    assert failure.inputs == ("21",)
    assert (failure.task, failure.error_type, failure.message) == (
        "explode",
        "ValueError",
        "boom: 42",
    )
    assert failure.attempt == 1
    assert failure.run_id == info.value.run_id
    assert failure.pid == os.getpid()
    assert isinstance(failure.thread, str)
    assert failure.thread
    assert failure.executor == "thread"
    assert t0 <= failure.timestamp <= t1
    assert 'raise ValueError(f"{label}: {doubled}")' in failure.traceback
    assert "ValueError: boom: 42" in failure.traceback
    assert f"{__file__}:{failure.line_number}" in str(info.value)


def test_a_failure_raised_in_a_helper_points_at_the_helper() -> None:
    @af.flow
    def f(x: int) -> Any:
        return validate(x)

    with pytest.raises(af.RunFailed) as info:
        f.run(1)
    (failure,) = info.value.failures
    assert failure.task == "validate"
    assert failure.function == "_check_positive"
    assert failure.file_path == __file__
    assert failure.line_number == line_of(_check_positive, "raise ArithmeticError")
    assert failure.locals == {"value": "-99"}
    assert failure.inputs == ("1",)


def test_a_failure_under_a_timeout_or_in_a_class_task_still_points_at_user_code() -> None:
    @af.task(timeout=5.0)
    def timed(x: int) -> int:
        limit = 10
        raise OverflowError(f"{x} over {limit}")  # timed raising line

    @af.task
    class Checker:
        def __call__(self, x: int) -> int:
            raise KeyError(x)  # class raising line

    @af.flow
    def f(x: int) -> Any:
        return timed(x)

    @af.flow
    def g(x: int) -> Any:
        return Checker(x)

    with pytest.raises(af.RunFailed) as info:
        f.run(11)
    (failure,) = info.value.failures
    assert (failure.function, failure.file_path) == ("timed", __file__)
    assert failure.line_number == line_of(timed, "# timed raising line")
    assert failure.locals == {"x": "11", "limit": "10"}
    with pytest.raises(af.RunFailed) as info:
        g.run(5)
    (failure,) = info.value.failures
    assert (failure.task, failure.function, failure.file_path) == ("Checker", "__call__", __file__)
    assert failure.line_number == line_of(Checker, "# class raising line")
    assert failure.locals["x"] == "5"


def test_a_failure_from_a_real_run_survives_pickle_and_json() -> None:
    @af.flow
    def f(x: int) -> Any:
        return explode(x)

    with f.start() as running:
        with pytest.raises(af.RunFailed) as info:
            running.submit(4).result(timeout=10)
        (dead,) = running.dead_letters()
    (failure,) = info.value.failures
    assert dead == failure
    clone = pickle.loads(pickle.dumps(failure))
    assert clone == failure
    assert clone.to_dict() == failure.to_dict()
    assert isinstance(clone.exception(), ValueError)
    assert str(clone.exception()) == "boom: 8"
    data = failure.to_dict()
    assert set(data) == FAILURE_FIELDS
    assert json.loads(json.dumps(data)) == data
    assert data["line_number"] == line_of(explode, "raise ValueError")
    assert data["locals"] == {"x": "4", "doubled": "8", "label": "'boom'"}
    error = pickle.loads(pickle.dumps(info.value))
    assert isinstance(error, af.RunFailed)
    assert error.failures == [failure]
    assert error.run_id == info.value.run_id == running.run_id
