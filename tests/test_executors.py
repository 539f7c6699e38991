"""Async tasks and keyed stateful tasks (issue 4), through real hosts and a real event loop."""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading
import time
from typing import Any

import pytest

import actorflow as af
from tests.conftest import wait_until


@af.task(concurrency=50)
async def lookup(ip: int) -> str:
    await asyncio.sleep(0.05)
    return f"host-{ip}"


@af.flow
def resolve(ip: int) -> Any:
    return lookup(ip)


def test_a_coroutine_function_becomes_an_async_task() -> None:
    assert lookup.executor == "async"
    assert resolve.run(3) == "host-3"


def test_async_awaits_overlap_up_to_the_nodes_concurrency() -> None:
    active = 0
    peak = 0

    @af.task(concurrency=20)
    async def wait(x: int) -> int:
        nonlocal active, peak
        active += 1  # one event loop thread: no lock needed
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return x

    @af.flow
    def f(x: int) -> Any:
        return wait(x)

    with f.start(max_in_flight=500) as running:
        start = time.perf_counter()
        assert list(running.map(range(200))) == list(range(200))
        elapsed = time.perf_counter() - start
    assert peak == 20  # bounded by concurrency, and reached
    assert elapsed < 200 * 0.02 / 2  # generous: far below sequential awaiting


def test_ten_thousand_awaits_with_concurrency_1000_finish_quickly() -> None:
    @af.task(concurrency=1000)
    async def slow(x: int) -> int:
        await asyncio.sleep(0.1)
        return x

    @af.flow
    def f(x: int) -> Any:
        return slow(x)

    with f.start(max_in_flight=2000) as running:
        start = time.perf_counter()
        assert sum(running.map(range(10_000))) == sum(range(10_000))
        assert time.perf_counter() - start < 2.0 * 3  # target 2 s; x3 for a loaded CI box


def test_an_async_timeout_cancels_the_coroutine_and_is_retried() -> None:
    cancelled = 0

    @af.task(timeout=0.05, retries=1, backoff=af.Backoff(initial=0.01, jitter=0))
    async def hang(x: int) -> int:
        nonlocal cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return x

    @af.flow
    def f(x: int) -> Any:
        return hang(x)

    with pytest.raises(af.RunFailed) as info:
        f.run(1)
    (failure,) = info.value.failures
    assert (failure.error_type, failure.attempt, failure.executor) == ("TaskTimeout", 2, "async")
    assert cancelled == 2


def _spin_until(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():  # pure Python, never awaits: holds the event loop
        n += 1


def test_a_coroutine_that_never_yields_is_interrupted_at_its_timeout() -> None:
    spinning = threading.Event()
    never = threading.Event()

    @af.task(timeout=0.3)
    async def crunch(x: int) -> int:
        if x == 1:
            spinning.set()
            _spin_until(never)  # no await: asyncio alone could never cancel this
        await asyncio.sleep(0)
        return x * 10

    @af.flow
    def f(x: int) -> Any:
        return crunch(x)

    with f.start() as running:
        futures = [running.submit(x) for x in range(4)]
        assert futures[0].result(timeout=30) == 0
        with pytest.raises(af.RunFailed) as info:
            futures[1].result(timeout=30)
        assert [fut.result(timeout=30) for fut in futures[2:]] == [20, 30]
        assert spinning.is_set()
    (failure,) = info.value.failures
    assert (failure.task, failure.error_type, failure.executor) == (
        "crunch",
        "TaskTimeout",
        "async",
    )
    assert "without yielding" in failure.message
    assert "executor='thread'" in failure.message


def test_a_loop_held_by_another_coroutine_does_not_time_out_a_waiting_one() -> None:
    # items 2 and 3 wait (their 0.3 s deadlines running) while item 1 holds the loop
    # past them; asyncio.wait_for cancelled them the moment the loop was free, though
    # they never had the loop (acceptance test of issue 4)
    never = threading.Event()

    @af.task(timeout=0.3, concurrency=10)
    async def step(x: int) -> int:
        if x == 1:
            _spin_until(never)  # interrupted by the watchdog past the timeout
        await asyncio.sleep(0.01)
        return x * 10

    @af.flow
    def f(x: int) -> Any:
        return step(x)

    with f.start() as running:
        futures = [running.submit(x) for x in range(4)]
        with pytest.raises(af.RunFailed) as info:
            futures[1].result(timeout=30)
        assert [futures[i].result(timeout=30) for i in (0, 2, 3)] == [0, 20, 30]
    assert "without yielding" in info.value.failures[0].message


def test_a_loop_held_by_a_coroutine_is_reported_and_freed_at_stop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from actorflow.runtime import loopwatch

    monkeypatch.setattr(loopwatch, "WARN_S", 0.6)
    caplog.set_level(logging.WARNING, logger="actorflow")
    spinning = threading.Event()
    never = threading.Event()

    @af.task
    async def hog(x: int) -> int:
        spinning.set()
        _spin_until(never)
        return x

    @af.flow
    def f(x: int) -> Any:
        return hog(x)

    with f.start() as running:
        fut = running.submit(7)
        wait_until(
            lambda: any("async_task_blocking_loop" in r.getMessage() for r in caplog.records)
        )
        running.stop(drain=False)  # the loop's thread is interrupted, not left behind
    assert spinning.is_set()
    assert fut.done()
    (warning,) = [r for r in caplog.records if "async_task_blocking_loop" in r.getMessage()]
    assert warning.__dict__["task"] == "hog"


def test_an_async_failure_skip_and_downstream_thread_task_compose() -> None:
    @af.task
    async def check(x: int) -> Any:
        await asyncio.sleep(0)
        if x == 3:
            raise ValueError("three")
        return af.SKIP if x % 2 else x

    @af.task
    def double(x: int) -> int:
        return 2 * x

    @af.flow
    def f(x: int) -> Any:
        return double(check(x))

    with f.start() as running:
        futures = [running.submit(i) for i in range(5)]
        out: list[Any] = []
        for fut in futures:
            try:
                out.append(fut.result(10))
            except af.RunFailed as exc:
                out.append(exc.failures[0].error_type)
    assert out == [0, af.SKIP, 4, "ValueError", 8]


def test_the_event_loop_thread_is_gone_after_the_block() -> None:
    with resolve.start() as running:
        assert running.submit(1).result(10) == "host-1"
        assert any(t.name.startswith("actorflow-loop-") for t in threading.enumerate())
    assert not any(t.name.startswith("actorflow-loop-") for t in threading.enumerate())


def test_waiting_for_an_item_in_the_event_loops_thread_is_refused_not_a_hang() -> None:
    # an async node resolves its futures in the loop's thread, so their done-callbacks
    # run there; one that waited for another item of the graph blocked the loop that
    # item needs (it hung; with a timeout, it timed out)
    outcome: list[Any] = []
    done = threading.Event()

    def callback(fut: Any) -> None:
        try:
            outcome.append(running.submit(2).result())
        except af.ActorflowError as exc:
            outcome.append(exc)
        try:
            next(iter(running.map([3])))
        except af.ActorflowError as exc:
            outcome.append(exc)
        done.set()

    with resolve.start() as running:
        running.submit(1).add_done_callback(callback)
        assert done.wait(30)
        assert running.submit(4).result(10) == "host-4"  # the graph goes on
    assert len(outcome) == 2
    assert "event loop" in str(outcome[0])
    assert "'resolve'" in str(outcome[0])
    assert "map / stream" in str(outcome[1])


def test_executor_async_on_a_plain_function_is_refused() -> None:
    with pytest.raises(af.GraphError, match="needs a coroutine function"):
        af.task(executor="async")(lambda x: x)


def test_concurrency_on_a_task_that_is_not_async_is_refused_not_ignored() -> None:
    with pytest.raises(af.GraphError, match=r"this is a process task.*use workers=N"):
        af.task(executor="process", concurrency=8)(abs)
    with pytest.raises(af.GraphError, match="this is a thread task"):
        af.task(concurrency=8)(abs)


@af.task(key=lambda ev: ev["service"], workers=4)
class PerService:
    """Counts events per service; one instance per key bucket."""

    def __init__(self) -> None:
        self.seen: collections.Counter[str] = collections.Counter()

    def __call__(self, ev: dict[str, Any]) -> tuple[str, int, int]:
        self.seen[ev["service"]] += 1
        return ev["service"], self.seen[ev["service"]], id(self)


@af.flow
def per_service(ev: dict[str, Any]) -> Any:
    return PerService(ev)


SERVICES = ["auth", "cart", "search", "pay", "mail", "feed"]


def assert_keyed(out: list[tuple[str, int, int]], per_key: int) -> None:
    """``(key, count so far, instance id)`` outputs: one instance per key, counts in
    order, keys spread over several instances."""
    instances: dict[str, set[int]] = collections.defaultdict(set)
    counts: dict[str, list[int]] = collections.defaultdict(list)
    for service, n, instance in out:
        instances[service].add(instance)
        counts[service].append(n)
    assert all(len(v) == 1 for v in instances.values())  # one instance per key
    assert all(v == list(range(1, per_key + 1)) for v in counts.values())  # state and order
    assert len({i for v in instances.values() for i in v}) > 1  # keys spread over instances


def test_items_with_the_same_key_reach_the_same_instance_in_order() -> None:
    events = [{"service": SERVICES[i % len(SERVICES)]} for i in range(600)]
    with per_service.start() as running:
        assert_keyed(list(running.map(events)), 100)


@af.task(key=lambda ev: ev["service"], workers=3)
class AsyncPerService:
    """The keyed task above, as a coroutine: one batch per instance at a time."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = collections.Counter()

    async def __call__(self, ev: dict[str, Any]) -> tuple[str, int, int]:
        await asyncio.sleep(0)
        self.counts[ev["service"]] += 1
        return ev["service"], self.counts[ev["service"]], id(self)


def test_a_keyed_async_class_task_routes_keys_and_serves_every_batch() -> None:
    # each instance used to take one batch and stay marked busy for ever, and every
    # item ran on the first instance whatever its key
    @af.flow
    def f(ev: dict[str, Any]) -> Any:
        return AsyncPerService(ev)

    events = [{"service": SERVICES[i % len(SERVICES)]} for i in range(300)]
    with f.start(max_in_flight=64) as running:
        assert_keyed(list(running.map(events)), 50)


def test_a_keyed_async_instance_processes_its_keys_items_in_arrival_order() -> None:
    @af.task(key=lambda ev: ev[0], workers=2)
    class Seen:
        def __init__(self) -> None:
            self.seen: list[int] = []

        async def __call__(self, ev: tuple[str, int]) -> list[int]:
            await asyncio.sleep(0.002 * ((ev[1] * 7) % 3))  # earlier items may wait longer
            self.seen.append(ev[1])
            return list(self.seen)

    @af.flow
    def f(ev: tuple[str, int]) -> Any:
        return Seen(ev)

    with f.start(max_in_flight=64) as running:
        out = list(running.map([("k", i) for i in range(40)]))
    assert out[-1] == list(range(40))


def test_an_async_task_that_raises_cancelled_error_fails_only_its_item() -> None:
    @af.task
    async def awaits_a_cancelled_one(x: int) -> int:
        if x == 3:
            other = asyncio.ensure_future(asyncio.sleep(10))
            other.cancel()
            await other  # raises CancelledError inside this task
        return x

    @af.flow
    def f(x: int) -> Any:
        return awaits_a_cancelled_one(x)

    with f.start() as running:
        futures = [running.submit(i) for i in range(6)]
        with pytest.raises(af.RunFailed) as info:
            futures[3].result(10)
        assert [futures[i].result(10) for i in (0, 1, 2, 4, 5)] == [0, 1, 2, 4, 5]
    assert info.value.failures[0].error_type == "CancelledError"


def test_stop_without_drain_settles_an_async_nodes_counters() -> None:
    started = 0

    @af.task(concurrency=10)
    async def forever(x: int) -> int:
        nonlocal started
        started += 1
        await asyncio.sleep(60)
        return x

    @af.flow
    def f(x: int) -> Any:
        return forever(x)

    with f.start() as running:
        futures = [running.submit(i) for i in range(3)]
        wait_until(lambda: started == 3)
        running.stop(drain=False)
        assert running.metrics()["forever"].in_flight == 0  # was 3: callbacks never ran
    assert all(fut.cancelled() for fut in futures)


def test_an_unkeyed_async_class_task_spreads_batches_over_its_instances() -> None:
    @af.task(workers=3)
    class Which:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0)
            return id(self)

    @af.flow
    def f(x: int) -> Any:
        return Which(x)

    with f.start() as running:
        ids = {running.submit(i).result(10) for i in range(6)}
    assert len(ids) == 3  # one item per batch here: the batches take turns


def test_keyed_routing_uses_a_stable_hash_not_pythons_salted_one() -> None:
    from actorflow.task import stable_hash

    assert stable_hash("checkout") == 2_939_694_414  # CRC-32: the same in every process
    assert stable_hash(("a", 1)) == stable_hash(("a", 1))
    assert stable_hash(7) == 7


def test_a_key_function_that_raises_fails_only_its_item() -> None:
    with per_service.start() as running:
        good = running.submit({"service": "auth"})
        bad = running.submit({"no_service": 1})
        assert good.result(10)[:2] == ("auth", 1)
        with pytest.raises(af.RunFailed) as info:
            bad.result(10)
    assert info.value.failures[0].error_type == "KeyError"
    assert info.value.failures[0].task == "PerService"


def test_a_keyed_task_needs_exactly_one_input() -> None:
    @af.task(key=lambda x: x, workers=2)
    class Two:
        def __call__(self, a: int, b: int) -> int:
            return a + b

    @af.task
    def one(x: int) -> int:
        return x

    @af.flow
    def f(x: int) -> Any:
        return Two(one(x), one(x))

    with pytest.raises(af.GraphError, match="must be called with one input"):
        f.run(1)


@pytest.mark.skipif(
    not hasattr(inspect, "markcoroutinefunction"), reason="inspect.markcoroutinefunction: 3.12+"
)
def test_a_function_marked_as_a_coroutine_function_is_an_async_task() -> None:
    async def later(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    def marked(x: int) -> Any:  # a plain def returning an awaitable
        return later(x)

    t = af.task(inspect.markcoroutinefunction(marked))  # type: ignore[attr-defined]
    assert t.executor == "async"

    @af.flow
    def f(x: int) -> Any:
        return t(x)

    assert f.run(21) == 42
