"""Integration tests: graphs run through real pykka host actors and threads."""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import actorflow as af
from tests.conftest import wait_until


@af.task
def multiply(a: int, b: int) -> int:
    return a * b


@af.task
def average(xs: list[int]) -> float:
    return sum(xs) / len(xs)


@af.task
def inc(x: int) -> int:
    return x + 1


@af.task
def double(x: int) -> int:
    return 2 * x


@af.task
def keep_even(x: int) -> Any:
    return x if x % 2 == 0 else af.SKIP


@af.task
def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"three is not allowed (got {x})")
    return x


@af.flow
def avg_of_products() -> Any:
    return average([multiply(3, 2), multiply(4, 5)])


@af.flow
def evens_doubled(x: int) -> Any:
    return double(keep_even(x))


@af.flow
def fragile(x: int) -> Any:
    return inc(fail_on_three(x))


def test_a_gathered_list_of_nodes_fans_in() -> None:
    assert avg_of_products.run() == 13.0


def test_run_returns_any_nesting_of_nodes_and_constants() -> None:
    @af.flow
    def f(x: int) -> Any:
        return {"inc": inc(x), "pair": (double(x), "const"), "list": [inc(x), 7]}

    assert f.run(4) == {"inc": 5, "pair": (8, "const"), "list": [5, 7]}


def test_a_flow_with_several_parameters_binds_keywords_and_defaults() -> None:
    @af.flow
    def f(a: int, b: int = 10) -> Any:
        return multiply(a, b)

    assert f.run(2) == 20
    assert f.run(2, b=3) == 6
    with f.start() as running:
        assert list(running.map([1, 2], [5, 6])) == [5, 12]
        assert running.submit(a=3).result() == 30


def test_a_failed_task_raises_run_failed_and_its_siblings_still_run() -> None:
    seen: list[str] = []

    @af.task
    def sibling(x: int) -> int:
        seen.append("sibling")
        return x

    @af.task
    def after_failure(x: int) -> int:
        seen.append("downstream")
        return x

    @af.flow
    def f(x: int) -> Any:
        return {"bad": after_failure(fail_on_three(x)), "good": sibling(x)}

    with pytest.raises(af.RunFailed) as info:
        f.run(3)
    assert seen == ["sibling"]
    (failure,) = info.value.failures
    assert failure.task == "fail_on_three"
    assert failure.error_type == "ValueError"
    assert failure.message == "three is not allowed (got 3)"
    assert failure.function == "fail_on_three"
    assert failure.file_path == __file__
    assert failure.locals == {"x": "3"}
    assert failure.inputs == ("3",)
    assert failure.run_id == info.value.run_id
    assert "task 'fail_on_three'" in str(info.value)


def test_a_skipped_item_resolves_to_skip_and_map_keeps_positions() -> None:
    assert evens_doubled.run(3) is af.SKIP
    with evens_doubled.start() as running:
        assert running.submit(2).result() == 4
        assert running.submit(3).result() is af.SKIP
        assert list(running.map(range(5))) == [0, af.SKIP, 4, af.SKIP, 8]
        assert sorted(running.stream(range(5))) == [0, 4, 8]


def test_a_long_lived_graph_keeps_serving_after_a_failure() -> None:
    with fragile.start() as running:
        futures = [running.submit(i) for i in range(6)]
        results = []
        for fut in futures:
            try:
                results.append(fut.result(timeout=10))
            except af.RunFailed as exc:
                results.append(exc.failures[0].task)
        assert results == [1, 2, 3, "fail_on_three", 5, 6]
        assert sorted(running.stream(range(6))) == [1, 2, 3, 5, 6]
        dead = running.dead_letters()
        assert [f.task for f in dead] == ["fail_on_three", "fail_on_three"]
        metrics = running.metrics()
        assert metrics["fail_on_three"].failed == 2
        assert metrics["inc"].done == 10


def test_map_raises_run_failed_when_the_failed_item_is_reached() -> None:
    with fragile.start() as running:
        got = []
        with pytest.raises(af.RunFailed) as info:
            for out in running.map(range(10)):
                got.append(out)
        assert got == [1, 2, 3]
        assert info.value.failures[0].item_id is not None


def test_every_item_reaches_the_output_exactly_once_in_map_order() -> None:
    calls: list[int] = []
    lock = threading.Lock()

    @af.task
    def record(x: int) -> int:
        with lock:
            calls.append(x)
        return x

    @af.flow
    def f(x: int) -> Any:
        return double(record(inc(x)))

    n = 5000
    with f.start(max_in_flight=256) as running:
        assert list(running.map(range(n))) == [2 * (i + 1) for i in range(n)]
    assert sorted(calls) == [i + 1 for i in range(n)]


def test_independent_blocking_nodes_run_on_separate_hosts() -> None:
    # four nodes that each block until all four are running at once
    barrier = threading.Barrier(4, timeout=10)

    @af.task
    def wait_for_others(x: int) -> int:
        barrier.wait()
        return x

    @af.task
    def total(xs: list[int]) -> int:
        return sum(xs)

    @af.flow
    def f(x: int) -> Any:
        return total([wait_for_others(x) for _ in range(4)])

    assert f.run(1) == 4


def test_four_sleeping_nodes_finish_together() -> None:
    @af.task
    def nap(x: int) -> float:
        time.sleep(0.3)
        return time.perf_counter()

    @af.flow
    def f(x: int) -> Any:
        return [nap(x) for _ in range(4)]

    start = time.perf_counter()
    ends = f.run(0)
    assert max(ends) - min(ends) < 0.2  # together, not one after another (0.3 s apart)
    assert time.perf_counter() - start < 0.3 * 4  # generous sanity bound


def test_run_executes_quick_tasks_in_the_calling_thread() -> None:
    threads: list[str] = []

    @af.task
    def where(x: int) -> int:
        threads.append(threading.current_thread().name)
        return x + 1

    @af.task
    def add(a: int, b: int, c: int) -> int:
        threads.append(threading.current_thread().name)
        return a + b + c

    @af.flow
    def f(x: int) -> Any:
        return add(where(x), where(x), where(x))  # a fan-out: jobs wait while one runs

    assert f.run(1) == 6
    assert threads == [threading.current_thread().name] * 4  # no host thread was needed


def test_run_moves_waiting_nodes_off_a_caller_blocked_in_a_task() -> None:
    # the caller runs the first node itself; while it is blocked, the others must not wait
    barrier = threading.Barrier(3, timeout=10)

    @af.task
    def meet(x: int) -> str:
        barrier.wait()
        return threading.current_thread().name

    @af.flow
    def f(x: int) -> Any:
        return [meet(x) for _ in range(3)]

    names = f.run(0)
    assert len(set(names)) == 3
    assert threading.current_thread().name in names


def test_a_map_consumer_runs_quick_work_itself() -> None:
    calls: collections.Counter[str] = collections.Counter()

    @af.task
    def where(x: int) -> int:
        calls[threading.current_thread().name] += 1
        return x * 2

    @af.flow
    def f(x: int) -> Any:
        return where(x)

    with f.start(max_in_flight=64) as running:
        assert list(running.map(range(500))) == [x * 2 for x in range(500)]
        assert list(running.stream(range(5))) == [0, 2, 4, 6, 8]
    # no hand-off to a host for quick work (work the consumer leaves queued while it
    # is away, e.g. descheduled on a busy machine, may go to a host after 2 ms)
    assert calls[threading.current_thread().name] >= 0.8 * sum(calls.values())


def test_a_helping_consumer_blocked_in_a_task_does_not_hold_back_the_others() -> None:
    barrier = threading.Barrier(3, timeout=10)

    @af.task(workers=3)
    def meet(x: int) -> int:
        barrier.wait()  # three calls must run at once
        return x

    @af.flow
    def f(x: int) -> Any:
        return meet(x)

    with f.start() as running:
        assert sorted(running.stream(range(3))) == [0, 1, 2]


def test_work_queued_by_a_consumer_runs_while_its_loop_body_blocks() -> None:
    # items the consumer entered wait for it to help; while its own loop body waits for
    # the last item it read ahead, that item must be handed to a host instead
    processed: set[int] = set()
    cv = threading.Condition()

    @af.task
    def mark(x: int) -> int:
        with cv:
            processed.add(x)
            cv.notify_all()
        return x

    @af.flow
    def f(x: int) -> Any:
        return mark(x)

    last_read = -1

    def source() -> Iterator[int]:
        nonlocal last_read
        for i in range(300):
            last_read = i
            yield i

    waits = 0
    out = []
    with f.start(max_in_flight=64) as running:
        for x in running.stream(source()):
            last = last_read  # entered (read ahead), maybe not yet run
            with cv:
                if last not in processed:
                    waits += 1
                    assert cv.wait_for(lambda last=last: last in processed, timeout=10)
            out.append(x)
    assert sorted(out) == list(range(300))
    assert waits > 0  # the situation this test is about did occur


def test_workers_n_runs_up_to_n_calls_of_a_function_task_at_once() -> None:
    barrier = threading.Barrier(3, timeout=10)

    @af.task(workers=3)
    def meet(x: int) -> int:
        barrier.wait()
        return x

    @af.flow
    def f(x: int) -> Any:
        return meet(x)

    with f.start() as running:
        futures = [running.submit(i) for i in range(3)]
        assert [fut.result(timeout=10) for fut in futures] == [0, 1, 2]


def test_an_output_node_with_workers_hands_on_each_item_as_it_completes() -> None:
    # futures resolve independently: item 1 is not held back behind item 0 (what
    # stream yields is in completion order); map still restores input order
    gate = threading.Event()

    @af.task(workers=2)
    def first_waits(x: int) -> int:
        if x == 0:
            gate.wait(timeout=10)
        return x

    @af.flow
    def f(x: int) -> Any:
        return first_waits(x)

    with f.start() as running:
        first, second = running.submit(0), running.submit(1)
        assert second.result(timeout=5) == 1
        assert not first.done()
        gate.set()
        assert first.result(timeout=5) == 0
        assert list(running.map([3, 0, 2, 1])) == [3, 0, 2, 1]  # the gate is open now


def test_a_single_worker_node_never_runs_two_calls_at_once() -> None:
    active = 0
    peak = 0
    lock = threading.Lock()

    @af.task
    def guarded(x: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.001)
        with lock:
            active -= 1
        return x

    @af.flow
    def f(x: int) -> Any:
        return guarded(x)

    with f.start() as running:
        futures = [running.submit(i) for i in range(20)]
        assert [fut.result(timeout=10) for fut in futures] == list(range(20))
    assert peak == 1


def test_class_tasks_get_fresh_instances_for_every_run_and_start() -> None:
    @af.task
    class Counter:
        def __init__(self) -> None:
            self.seen = 0

        def __call__(self, x: int) -> int:
            self.seen += 1
            return self.seen

    @af.flow
    def f(x: int) -> Any:
        return Counter(x)

    assert f.run(0) == 1
    assert f.run(0) == 1
    with f.start() as running:
        assert list(running.map(range(3))) == [1, 2, 3]
    with f.start() as running:
        assert running.submit(0).result() == 1


def test_after_orders_a_node_behind_another_without_passing_data() -> None:
    order: list[str] = []

    @af.task
    def report(x: int) -> int:
        time.sleep(0.01)
        order.append("report")
        return x

    @af.task
    def audit(x: int) -> None:
        order.append("audit")

    @af.flow
    def f(x: int) -> Any:
        r = report(x)
        audit(x, after=[r])
        return r

    assert f.run(1) == 1
    assert order == ["report", "audit"]


def test_af_map_fans_out_in_parallel_and_keeps_order() -> None:
    barrier = threading.Barrier(3, timeout=10)

    @af.task
    def split(n: int) -> list[int]:
        return list(range(n))

    @af.task
    def square(x: int) -> int:
        if x < 3:
            barrier.wait()  # the first three run at once
        return x * x

    @af.task
    def total(xs: list[int]) -> list[int]:
        return xs

    @af.flow
    def f(n: int) -> Any:
        return total(af.map(square, split(n), max_parallelism=3))

    assert f.run(6) == [0, 1, 4, 9, 16, 25]


def test_af_map_aggregates_element_failures_or_keeps_them_in_place() -> None:
    @af.task
    def split(n: int) -> list[int]:
        return list(range(n))

    @af.flow
    def strict(n: int) -> Any:
        return af.map(fail_on_three, split(n))

    @af.flow
    def lenient(n: int) -> Any:
        return af.map(fail_on_three, split(n), return_exceptions=True)

    with pytest.raises(af.RunFailed) as info:
        strict.run(5)
    assert [f.task for f in info.value.failures] == ["fail_on_three"]
    out = lenient.run(5)
    assert out[:3] == [0, 1, 2]
    assert isinstance(out[3], ValueError)
    assert out[4] == 4


def test_the_builder_runs_and_starts_like_a_flow() -> None:
    g = af.Graph("etl")
    g.add("extract", lambda path: [1, 2, 3] if path == "in" else [])
    g.add("transform", lambda rows: [r * 10 for r in rows], depends_on=["extract"])
    g.add("load", lambda rows: sum(rows), depends_on=["transform"])
    g.add("count", lambda rows: len(rows), depends_on=["extract"])
    assert g.run("in") == {"load": 60, "count": 3}
    with g.start() as running:
        assert running.submit("in").result() == {"load": 60, "count": 3}
        assert list(running.map(["in", "out"])) == [
            {"load": 60, "count": 3},
            {"load": 0, "count": 0},
        ]


def test_map_reads_at_most_max_in_flight_items_ahead_of_the_consumer() -> None:
    read = 0

    def source() -> Any:
        nonlocal read
        for i in range(1000):
            read += 1
            yield i

    with evens_doubled.start(max_in_flight=50) as running:
        it = running.map(source())
        for consumed in range(1, 200):
            next(it)
            assert read <= consumed + 50
        it.close()  # abandoned: items already in flight finish and are discarded
    assert read < 1000


def _holding_flow(release: threading.Event) -> Any:
    """A flow ``f`` whose one thread task waits for ``release`` (10 s at most),
    then returns its input."""

    @af.task
    def hold(x: int) -> int:
        release.wait(10)
        return x

    @af.flow
    def f(x: int) -> Any:
        return hold(x)

    return f


def test_submit_blocks_while_max_in_flight_items_are_in_flight() -> None:
    release = threading.Event()
    f = _holding_flow(release)

    with f.start(max_in_flight=2) as running:
        first = [running.submit(i) for i in range(2)]
        third: list[Any] = []
        submitter = threading.Thread(target=lambda: third.append(running.submit(2)))
        submitter.start()
        submitter.join(0.2)
        assert submitter.is_alive()  # blocked: two items already in flight
        assert running.in_flight == 2
        release.set()
        submitter.join(10)
        assert [fut.result(10) for fut in first] == [0, 1]
        assert third[0].result(10) == 2


def test_result_without_a_timeout_may_run_the_item_in_the_waiting_thread() -> None:
    # submit() hands the item to a host, but a caller that waits in result() before
    # the host took it runs it itself: no hand-off there and back (W1a)
    threads: list[int] = []

    @af.task
    def where(x: int) -> int:
        threads.append(threading.get_ident())
        return x + 1

    @af.task
    def double(x: int) -> int:
        return 2 * x

    @af.flow
    def f(x: int) -> Any:
        return double(where(x))

    with f.start() as running:
        assert [running.submit(x).result() for x in range(50)] == [2 * (x + 1) for x in range(50)]
        assert running.metrics()["where"].done == 50
    assert threading.get_ident() in threads  # never, when a host ran every item


def test_result_never_runs_another_items_batch_of_a_node_with_workers() -> None:
    # with workers=2 a quick item overtakes a slow one: waiting for the quick one must
    # not run the slow one's batch in the waiting thread (review of the offers)
    release = threading.Event()

    @af.task(workers=2)
    def work(x: int) -> int:
        if x == 0:
            release.wait(10)
        return x

    @af.flow
    def f(x: int) -> Any:
        return work(x)

    try:
        with f.start() as running:
            for i in range(1, 21):
                release.clear()
                slow = running.submit(0)
                assert running.submit(i).result() == i
                assert not slow.done()  # still waiting for release: run by a host
                release.set()
                assert slow.result() == 0
    finally:
        release.set()


def test_a_caller_inside_an_event_loop_leaves_its_items_to_hosts() -> None:
    # a task run by result() in a thread with a running event loop could not call
    # asyncio.run() (review of the offers: 200 of 200 items failed)
    import asyncio

    @af.task
    def fetch(x: int) -> int:
        async def go() -> int:
            return x + 1

        return asyncio.run(go())

    @af.flow
    def f(x: int) -> Any:
        return fetch(x)

    async def main() -> list[int]:
        with f.start() as running:
            return [running.submit(x).result() for x in range(100)]

    assert asyncio.run(main()) == list(range(1, 101))


def test_futures_cancelled_by_stop_do_not_keep_the_run_alive() -> None:
    import gc
    import weakref

    release = threading.Event()
    f = _holding_flow(release)

    cm = f.start()
    running = cm.__enter__()
    futures = [running.submit(i) for i in range(3)]
    ref = weakref.ref(running)
    try:
        running.stop(drain=False)
    finally:
        release.set()
        cm.__exit__(None, None, None)
    assert all(fut.cancelled() for fut in futures)
    del running, cm
    gc.collect()
    assert ref() is None  # the cancelled futures kept it before


def test_result_with_a_timeout_never_runs_work_in_the_waiting_thread() -> None:
    # the timeout must hold: a task run in the caller's thread could overrun it
    threads: list[int] = []
    release = threading.Event()

    @af.task
    def where(x: int) -> int:
        threads.append(threading.get_ident())
        if x < 0:
            release.wait(10)
        return x + 1

    @af.flow
    def f(x: int) -> Any:
        return where(x)

    with f.start() as running:
        assert [running.submit(x).result(timeout=10) for x in range(50)] == list(range(1, 51))
        stuck = running.submit(-5)
        with pytest.raises(TimeoutError):
            stuck.result(timeout=0.05)
        release.set()
        assert stuck.result() == -4
    assert threading.get_ident() not in threads


def test_a_class_task_whose_init_raises_fails_the_run_with_its_failure() -> None:
    @af.task
    class Boom:
        def __init__(self) -> None:
            raise RuntimeError("cannot load the model")

        def __call__(self, x: int) -> int:
            return x

    @af.flow
    def f(x: int) -> Any:
        return Boom(x)

    with pytest.raises(af.RunFailed) as info:
        f.run(1)
    (failure,) = info.value.failures
    assert (failure.task, failure.error_type) == ("Boom", "RuntimeError")
    assert failure.function == "__init__"
    with pytest.raises(af.RunFailed):
        f.start()


def test_waiting_for_an_item_in_a_done_callback_is_refused_not_a_hang() -> None:
    # a callback runs in the thread that hands the node's outputs on; waiting there
    # for another item of the flow hung the graph, and leaving the block hung too
    release = threading.Event()
    outcome: list[Any] = []

    @af.task
    def gate(x: int) -> int:
        if x == 1:
            release.wait(10)
        return x

    @af.flow
    def f(x: int) -> Any:
        return gate(x)

    def callback(fut: Any) -> None:
        for wait in (lambda: running.submit(5).result(), lambda: list(running.map([6]))):
            try:
                outcome.append(wait())
            except af.ActorflowError as exc:
                outcome.append(exc)

    with f.start() as running:
        first = running.submit(1)
        first.add_done_callback(callback)  # before it resolves: runs in the graph's thread
        release.set()
        assert first.result() == 1
        assert running.submit(7).result(timeout=10) == 7  # the graph goes on
    assert len(outcome) == 2
    assert all(isinstance(o, af.ActorflowError) for o in outcome)
    assert "done-callback" in str(outcome[0])


def test_leaving_the_block_drains_in_flight_items() -> None:
    release = threading.Event()

    @af.task
    def slow(x: int) -> int:
        release.wait(10)
        return x

    @af.flow
    def f(x: int) -> Any:
        return slow(x)

    with f.start() as running:
        futures = [running.submit(i) for i in range(5)]
        threading.Timer(0.05, release.set).start()
    assert [fut.result(0) for fut in futures] == list(range(5))
    assert running.metrics()["slow"].done == 5  # still readable after the block


def test_stop_without_drain_cancels_queued_items() -> None:
    started = threading.Event()
    release = threading.Event()

    @af.task
    def slow(x: int) -> int:
        started.set()
        release.wait(10)
        return x

    @af.flow
    def f(x: int) -> Any:
        return slow(x)

    running = f.start()
    futures = [running.submit(i) for i in range(5)]
    started.wait(10)
    threading.Timer(0.05, release.set).start()
    running.stop(drain=False)
    assert sum(fut.cancelled() for fut in futures) >= 3
    with pytest.raises(af.ActorflowError, match="is stopped"):
        running.submit(1)


def test_a_keyboard_interrupt_in_a_task_stops_the_run_and_is_re_raised() -> None:
    @af.task
    def interrupt(x: int) -> int:
        raise KeyboardInterrupt

    @af.flow
    def f(x: int) -> Any:
        return inc(interrupt(x))

    with pytest.raises(KeyboardInterrupt):
        f.run(1)


def test_ctrl_c_while_run_waits_cancels_cleanly() -> None:
    started = threading.Event()

    @af.task
    def busy(x: int) -> int:
        started.set()
        time.sleep(0.3)
        return x

    @af.flow
    def f(x: int) -> Any:
        return busy(x)

    def press_ctrl_c() -> None:
        started.wait(10)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    with pytest.raises(KeyboardInterrupt):
        f.run(1)
    presser.join()


def test_metrics_count_done_skipped_and_failed_per_node() -> None:
    with evens_doubled.start() as running:
        list(running.map(range(10)))
        m = running.metrics()
    assert (m["keep_even"].done, m["keep_even"].skipped) == (5, 5)
    assert m["double"].done == 5
    assert m["double"].p50_s is not None
    assert m["double"].p50_s <= m["double"].p99_s  # type: ignore[operator]
    assert set(m) == {"keep_even", "double"}
    assert all(x.in_flight == 0 and x.queued == 0 for x in m.values())


def test_the_library_is_silent_unless_logging_is_enabled(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(af.RunFailed):
        fragile.run(3)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="actorflow"):
        with pytest.raises(af.RunFailed) as info:
            fragile.run(3)
    events = [r.getMessage() for r in caplog.records]
    assert events == ["run_started", "task_failed", "run_finished"]
    failed = caplog.records[1]
    assert failed.levelno == logging.ERROR
    assert failed.run_id == info.value.run_id  # type: ignore[attr-defined]
    assert failed.task == "fail_on_three"  # type: ignore[attr-defined]
    assert failed.__dict__["item_id"] == 0


def test_stream_yields_outputs_before_the_source_is_exhausted() -> None:
    read = 0

    def source() -> Any:
        nonlocal read
        for i in range(10_000):
            read += 1
            yield i

    with evens_doubled.start(max_in_flight=64) as running:
        it = running.stream(source())
        assert next(it) == 0
        assert read <= 64  # the first output came long before the source ended
        assert len(list(it)) == 4999


def test_a_started_graph_can_be_used_from_many_threads() -> None:
    with evens_doubled.start(max_in_flight=64) as running:
        results: dict[int, list[Any]] = {}

        def worker(k: int) -> None:
            results[k] = list(running.map(range(k * 100, k * 100 + 100)))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    for k in range(4):
        expected = [2 * x if x % 2 == 0 else af.SKIP for x in range(k * 100, k * 100 + 100)]
        assert results[k] == expected


def test_host_threads_retire_and_none_remains_after_the_block() -> None:
    @af.task
    def nap(x: int) -> int:
        time.sleep(0.05)
        return x

    @af.flow
    def f(x: int) -> Any:
        return [nap(x) for _ in range(6)]

    with f.start() as running:
        assert running.submit(1).result(10) == [1] * 6
        wait_until(lambda: running._pool.n_hosts <= 3)
    assert not [t for t in threading.enumerate() if t.name.startswith("ActorflowHost")]


def test_debug_logging_reports_node_lifecycle_and_every_task_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="actorflow"):
        with evens_doubled.start() as running:
            assert list(running.map(range(4))) == [0, af.SKIP, 4, af.SKIP]
    events = [(r.getMessage(), r.__dict__.get("task")) for r in caplog.records]
    assert ("node_started", "keep_even") in events
    assert ("node_finished", "double") in events
    calls = [r for r in caplog.records if r.getMessage() == "task_finished"]
    assert sorted((r.task, r.item_id) for r in calls) == sorted(  # type: ignore[attr-defined]
        [("keep_even", i) for i in range(4)] + [("double", 0), ("double", 2)]
    )
    assert all(r.elapsed_s >= 0 and r.run_id == running.run_id for r in calls)  # type: ignore[attr-defined]
