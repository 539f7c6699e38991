"""Regressions: each test pins a defect found in review (races, hangs, wrong semantics)."""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest

import actorflow as af
from actorflow.runtime.running import RunningFlow
from tests.conftest import wait_until


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def test_a_done_callback_may_submit_to_a_node_with_several_workers() -> None:
    @af.task(workers=2)
    def work(x: int) -> int:
        return x

    @af.flow
    def f(x: int) -> Any:
        return work(x)

    done = threading.Event()
    with f.start() as running:

        def chain(fut: Any) -> None:
            n = fut.result()
            if n < 5:
                running.submit(n + 1).add_done_callback(chain)
            else:
                done.set()

        running.submit(0).add_done_callback(chain)
        assert done.wait(10)


def test_a_future_cancelled_by_the_caller_does_not_break_the_graph() -> None:
    release = threading.Event()

    @af.task
    def slow(x: int) -> int:
        release.wait(10)
        return x

    @af.flow
    def f(x: int) -> Any:
        return slow(x)

    with f.start() as running:
        first = running.submit(1)
        second = running.submit(2)
        assert second.cancel()
        release.set()
        assert first.result(10) == 1
        assert running.submit(3).result(10) == 3


def test_an_output_path_that_fails_fails_its_item_not_the_graph() -> None:
    @af.task
    def get(x: int) -> dict[str, int]:
        return {"a": 1} if x else {}

    @af.flow
    def f(x: int) -> Any:
        return get(x)["a"]

    with pytest.raises(af.RunFailed) as info:
        f.run(0)
    assert info.value.failures[0].error_type == "KeyError"
    with f.start() as running:
        with pytest.raises(af.RunFailed):
            running.submit(0).result(10)
        assert running.submit(1).result(10) == 1


@af.task
def skips(x: Any) -> Any:
    return af.SKIP


@af.task
def ran() -> str:
    return "ran"


@af.task
def gathered(xs: list[Any]) -> str:
    return f"ran with {xs}"


def test_a_skip_reaches_an_after_dependant_as_ordering_only_even_when_fused() -> None:
    @af.flow
    def f(x: int) -> Any:
        return ran(after=[skips(x)])

    assert f.run(1) == "ran"


def test_a_skip_inside_a_gather_is_omitted_even_when_fused() -> None:
    @af.flow
    def f(x: int) -> Any:
        return gathered([skips(x)])

    assert f.run(1) == "ran with []"
    with f.start() as running:
        assert list(running.map(range(3))) == ["ran with []"] * 3


def test_af_map_over_a_gather_omits_skipped_elements() -> None:
    seen: list[Any] = []

    @af.task
    def one(x: int) -> int:
        return 1

    @af.task
    def inc(v: int) -> int:
        seen.append(v)
        return v + 1

    @af.flow
    def f(x: int) -> Any:
        return af.map(inc, [one(x), skips(x)])

    assert f.run(0) == [2]
    assert seen == [1]


def test_metrics_can_be_read_while_joins_are_busy(tiny_switch_interval: None) -> None:
    @af.task
    def a(x: int) -> int:
        return x

    @af.task
    def join(x: int, y: int) -> int:
        return x + y

    @af.flow
    def f(x: int) -> Any:
        return join(a(x), a(x))

    errors: list[str] = []
    with f.start(max_in_flight=4096) as running:
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    running.metrics()
                except Exception as exc:
                    errors.append(repr(exc))
                    return

        poller = threading.Thread(target=poll)
        poller.start()
        for _ in range(10):
            assert [fut.result(30) for fut in [running.submit(i) for i in range(200)]] == [
                2 * i for i in range(200)
            ]
        stop.set()
        poller.join()
    assert errors == []


def test_system_exit_in_a_task_reaches_the_caller_as_itself() -> None:
    @af.task(workers=2)
    def boom(x: int) -> int:
        if x == 3:
            raise SystemExit(3)
        return x

    @af.flow
    def g(x: int) -> Any:
        return boom(x)

    for _ in range(5):
        with pytest.raises(SystemExit), g.start() as running:
            list(running.map(range(10)))


def test_a_busy_host_does_not_hide_a_blocked_one() -> None:
    # three independent nodes: one blocks, one computes, one is quick; the quick one
    # must not wait for the computing one just because the pool's total CPU looks busy
    go = threading.Event()
    quick_ran = threading.Event()

    @af.task
    def sleeper(x: int) -> str:
        go.wait(10)
        return "slept"

    @af.task
    def spinner(x: int) -> str:
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end and not go.is_set():
            pass
        return "spun"

    @af.task
    def quick(x: int) -> str:
        quick_ran.set()
        return "quick"

    @af.flow
    def f(x: int) -> Any:
        return [sleeper(x), spinner(x), quick(x)]

    with f.start() as running:
        start = time.perf_counter()
        fut = running.submit(1)
        assert quick_ran.wait(10)
        elapsed = time.perf_counter() - start
        go.set()
        assert fut.result(10) == ["slept", "spun", "quick"]
    assert elapsed < 0.5  # not held until the spinner's second is over


def test_a_class_task_in_af_map_keeps_its_instance() -> None:
    @af.task
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def __call__(self, x: int) -> int:
            self.n += 1
            return self.n

    @af.task
    def split(n: int) -> list[int]:
        return list(range(n))

    @af.flow
    def f(n: int) -> Any:
        return af.map(Counter, split(n))

    assert f.run(5) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "make",
    [
        lambda n: collections.OrderedDict(k=n),
        lambda n: {n},
        lambda n: collections.namedtuple("P", "a")(n),
    ],
)
def test_a_node_inside_a_container_that_is_not_gathered_is_refused(make: Any) -> None:
    @af.task
    def inc(x: int) -> int:
        return x + 1

    @af.task
    def show(v: Any) -> str:
        return repr(v)

    @af.flow
    def f(x: int) -> Any:
        return show(make(inc(x)))

    with pytest.raises(af.GraphError, match="only plain lists, tuples and dicts of Nodes"):
        _ = f.graph


def test_retired_hosts_do_not_accumulate_in_a_long_lived_graph() -> None:
    @af.task(workers=6)
    def nap(x: int) -> int:
        time.sleep(0.01)
        return x

    @af.flow
    def f(x: int) -> Any:
        return nap(x)

    with f.start() as running:
        for _ in range(8):
            assert list(running.map(range(12))) == list(range(12))
        pool = running._pool
        assert len(pool.threads) <= pool.n_hosts + 1
        assert len(pool._refs) <= pool.n_hosts + 1


def test_odd_keyword_names_survive_code_generation() -> None:
    @af.task
    def a(x: int) -> int:
        return x

    @af.task
    def b(**kw: Any) -> list[str]:
        return sorted(kw)

    @af.flow
    def f(x: int) -> Any:
        return b(**{"f-x": a(x)})

    with f.start() as running:
        assert list(running.map(range(3))) == [["f-x"]] * 3


def test_a_blocked_node_does_not_hold_up_others_while_a_retry_timer_is_pending() -> None:
    # review: schedule() only woke a watcher that slept without a timeout, so while a
    # retry timer was pending a job queued behind a blocked host waited for that host
    release = threading.Event()
    blocked = threading.Event()
    first = threading.Event()
    quick_ran = threading.Event()

    @af.task(retries=1, backoff=af.Backoff(initial=30.0, factor=1.0, maximum=30.0, jitter=0.0))
    def flaky(x: str) -> str:
        if x == "f" and not first.is_set():
            first.set()
            raise ValueError("fails once; its retry waits on the run's timer")
        return x

    @af.task
    def hold(x: str) -> str:
        if x == "s":
            blocked.set()
            release.wait(30)
        return x

    @af.task
    def quick(x: str) -> str:
        if x == "q":
            quick_ran.set()
        return x

    @af.flow
    def f(x: str) -> Any:
        return [flaky(x), hold(x), quick(x)]

    with f.start() as running:
        running.submit("f")  # leaves a 30 s retry timer pending
        pool = running._pool
        wait_until(lambda: bool(pool._timers) and not pool.ready and len(pool.idle) == pool.n_hosts)
        held = running.submit("s")
        wait_until(blocked.is_set)  # a host is now blocked in hold("s")
        running.submit("q")  # quick("q") needs another host: the watcher must notice
        assert quick_ran.wait(timeout=10)
        release.set()
        assert held.result(timeout=10) == ["s", "s", "s"]
        running.stop(drain=False)  # the pending retry is not waited for


def test_a_helping_thread_runs_computing_jobs_and_leaves_waiting_ones_to_hosts() -> None:
    from actorflow.runtime.actors import HostPool

    errors: list[BaseException] = []
    pool = HostPool("helping", errors.append)
    ran: dict[str, str] = {}
    done = threading.Event()

    class Job:
        pumped = False

        def __init__(self, name: str, helpable: bool) -> None:
            self.name = name
            self.helpable = helpable

        def run(self) -> None:
            ran[self.name] = threading.current_thread().name
            if len(ran) == 2:
                done.set()

    try:
        pool.helping(True)
        pool.schedule(Job("computes", True))  # waits for this thread
        assert pool.help_one()
        pool.schedule(Job("waits", False))  # e.g. a process chain's runner: a host's
        assert not pool.help_one()
        pool.helping(False)
        assert done.wait(10)
    finally:
        pool.shutdown()
    assert ran["computes"] == threading.current_thread().name
    assert ran["waits"] != threading.current_thread().name
    assert errors == []


def test_map_does_not_miss_a_result_while_another_thread_submits() -> None:
    # the consumer helped, found nothing it may run, and slept through the notify of a
    # block that had finished meanwhile (review of the helping change)
    @af.task
    def inc(x: int) -> int:
        return x + 1

    @af.flow
    def f(x: int) -> Any:
        return inc(x)

    for _ in range(30):
        with f.start(max_in_flight=4) as running:
            stop = threading.Event()

            def submitter(r: Any = running, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    r.submit(0).result(timeout=10)

            t = threading.Thread(target=submitter)
            t.start()
            try:
                assert list(running.map(range(50))) == list(range(1, 51))
            finally:
                stop.set()
                t.join()


def test_a_consumer_blocked_on_backpressure_runs_the_items_it_queued() -> None:
    @af.task
    def inc(x: int) -> int:
        return x + 1

    @af.flow
    def f(x: int) -> Any:
        return inc(x)

    with f.start(max_in_flight=4) as running:
        futures: list[Any] = []

        def source() -> Iterator[int]:
            yield 0
            # other items arrive while map reads its source: the consumer's next
            # _enter() waits for room that only its own queued job can make
            futures.append(running.submit(100))
            futures.append(running.submit(200))
            yield from (1, 2, 3)

        assert list(running.map(source())) == [1, 2, 3, 4]
        assert [fut.result(timeout=10) for fut in futures] == [101, 201]


def test_a_consumer_yields_its_first_result_before_the_rest_are_computed() -> None:
    @af.task
    def slow(x: int) -> int:
        time.sleep(0.05)
        return x

    @af.flow
    def f(x: int) -> Any:
        return slow(x)

    with f.start() as running:
        for mode in ("map", "stream"):
            first: float | None = None
            t0 = time.perf_counter()
            for _ in getattr(running, mode)(range(40)):
                if first is None:
                    first = time.perf_counter() - t0
            total = time.perf_counter() - t0
            assert first is not None
            assert first < total / 4  # not after the whole read-ahead ran (40 x 0.05 s)


def test_stop_without_drain_from_another_thread_waits_for_a_helping_consumer() -> None:
    calls: list[float] = []

    @af.task
    def slow(x: int) -> int:
        calls.append(time.perf_counter())
        time.sleep(0.1)
        return x

    @af.flow
    def f(x: int) -> Any:
        return slow(x)

    running = f.start()
    started = threading.Event()
    stopped_at: list[float] = []

    def stopper() -> None:
        started.wait(10)
        running.stop(drain=False)
        stopped_at.append(time.perf_counter())

    t = threading.Thread(target=stopper)
    t.start()
    got = []
    with pytest.raises(af.ActorflowError):
        for v in running.map(range(64)):
            got.append(v)
            started.set()
    t.join()
    assert got  # some items finished before the stop
    assert not [c for c in calls if c > stopped_at[0]]  # no call began after stop returned


def test_jobs_left_queued_with_nobody_running_start_one_host_not_one_each() -> None:
    # a consumer left its queued jobs behind (its loop body runs): the watcher used to
    # start one host per waiting job (38 hosts for a 21-node graph)
    from actorflow.runtime.actors import HostPool

    errors: list[BaseException] = []
    pool = HostPool("stranded", errors.append, watcher_thread=False)
    done = threading.Semaphore(0)

    class Job:
        helpable = True
        pumped = False

        def run(self) -> None:
            done.release()

    try:
        with pool.lock:
            pool.ready.extend(Job() for _ in range(5))
            window_ago = (pool.taken, time.monotonic() - 1.0, {})  # nobody was busy
            pool._watch_step(window_ago)
            assert pool.n_hosts == 1
        for _ in range(5):
            assert done.acquire(timeout=10)  # the one host drains the queue
    finally:
        pool.shutdown()
    assert pool.started_hosts == 1
    assert errors == []


def test_an_offered_job_runs_once_and_may_be_taken_from_inside_a_taken_job() -> None:
    # submit() offers its item's job; result() takes it unless a host did. A task
    # run that way may wait on another future of the same pool (nested): the inner
    # take must leave the outer registration (CPU clock, helper key) in place
    from actorflow.runtime.actors import HostPool

    errors: list[BaseException] = []
    pool = HostPool("offers", errors.append, watcher_thread=False)
    release = threading.Event()
    ran: list[tuple[str, int]] = []

    class Job:
        helpable = True
        offerable = True
        pumped = False

        def __init__(self, name: str, inner: Job | None = None) -> None:
            self.name = name
            self.inner = inner

        def run(self) -> None:
            ran.append((self.name, threading.get_ident()))
            if self.name == "blocker":
                release.wait(10)
            if self.inner is not None:
                inner_offers: list[Any] = []
                pool.offering(inner_offers)
                pool.schedule(self.inner)
                pool.offering(None)
                assert len(inner_offers) == 1
                assert pool.take_offer(inner_offers[0])
                assert len(pool._helpers) == 1  # still the outer take's

    try:
        pool.schedule(Job("blocker"))  # the only host blocks in it: nobody takes offers
        offers: list[Any] = []
        pool.offering(offers)
        pool.schedule(Job("outer", Job("inner")))
        pool.offering(None)
        assert len(offers) == 1
        assert pool.take_offer(offers[0])
        assert not pool.take_offer(offers[0])  # an offer runs once
        with pool.lock:
            assert not pool._helpers
            assert not pool._helper_jobs
            assert len(pool.clocks) == 1  # the blocked host's only
            assert not pool.ready
        release.set()
    finally:
        release.set()
        pool.shutdown()
    me = threading.get_ident()
    where = dict(ran)
    assert len(ran) == 3
    assert where["outer"] == where["inner"] == me
    assert where["blocker"] != me
    assert errors == []


def test_run_returns_when_a_node_fails_internally_past_its_restart_limit() -> None:
    from actorflow.testing import crash_node

    @af.task
    def a(x: int) -> int:
        return x + 1

    @af.task
    def b(x: int) -> int:
        return x * 2

    @af.flow(supervision=af.Supervision(max_restarts=0))
    def f(x: int) -> Any:
        return b(a(x))

    original = RunningFlow.submit

    def submit(self: RunningFlow, *args: Any, **kwargs: Any) -> Any:
        crash_node(self, "a", times=1)  # inside run(), before the item enters
        return original(self, *args, **kwargs)

    with mock.patch.object(RunningFlow, "submit", submit), pytest.raises(af.ActorflowError):
        f.run(1)  # used to hang: the caller waited in the pool and was never woken


def test_single_items_through_a_chain_take_the_fast_loop_and_keep_exact_counts() -> None:
    # one single item in 8 is timed on the careful path; the others take the generated
    # loop: results, failures and counters must be the same either way
    @af.task
    def inc(x: int) -> int:
        return x + 1

    @af.task
    def picky(x: int) -> int:
        if x == 6:
            raise ValueError("six")
        return x

    @af.task
    def dec(x: int) -> Any:
        return af.SKIP if x == 11 else x - 1

    @af.flow
    def f(x: int) -> Any:
        return dec(picky(inc(x)))

    with f.start() as running:
        outs = []
        for i in range(20):
            fut = running.submit(i)
            try:
                outs.append(fut.result(timeout=10))
            except af.RunFailed as exc:
                outs.append(f"failed in {exc.failures[0].task}")
        m = running.metrics()
    expected: list[Any] = list(range(20))
    expected[5], expected[10] = "failed in picky", af.SKIP
    assert outs == expected
    assert (m["inc"].done, m["picky"].done, m["picky"].failed) == (20, 19, 1)
    assert (m["dec"].done, m["dec"].skipped) == (18, 1)
    assert m["inc"].p50_s is not None  # sampled


def test_no_os_thread_outlives_a_run_whose_watcher_started_hosts() -> None:
    # the watcher is a bare thread (not in threading.enumerate()); the hosts it starts
    # register a stand-in thread object for it, dropped when it exits
    import psutil

    me = psutil.Process()
    before = me.num_threads()

    @af.task
    def nap(x: int) -> int:
        time.sleep(0.05)
        return x

    @af.flow
    def f(x: int) -> Any:
        return [nap(x) for _ in range(4)]

    assert f.run(1) == [1, 1, 1, 1]
    assert not [t for t in threading.enumerate() if "Dummy" in t.name]
    wait_until(lambda: me.num_threads() <= before)  # the OS threads are gone too


def test_an_exceptionally_handler_retried_inside_a_fused_chain_never_leaks_a_marker() -> None:
    # the generated loop's error branch kept an internal <pending retry> value as the
    # item's output when the handler after the failing node scheduled a retry
    seen: collections.Counter[int] = collections.Counter()

    @af.task
    def inc(x: int) -> int:
        return x + 1

    @af.task
    def boom(x: int) -> int:
        raise ValueError(f"boom {x}")

    @af.task(retries=1, backoff=af.Backoff(initial=0.01, factor=1.0, maximum=0.01, jitter=0.0))
    def handler(failure: af.Failure) -> str:
        seen[failure.item_id] += 1
        if seen[failure.item_id] == 1:
            raise RuntimeError("flaky once")
        return "recovered"

    @af.flow
    def f(x: int) -> Any:
        return boom(inc(x)).exceptionally(handler)

    with f.start() as running:
        singles = [running.submit(i).result(timeout=10) for i in range(4)]
        batch = list(running.map(range(4, 12)))
    assert singles == ["recovered"] * 4
    assert batch == ["recovered"] * 8


def test_a_watcher_that_cannot_start_fails_the_run_instead_of_hanging_it() -> None:
    import _thread

    from actorflow.runtime import actors

    real = _thread.start_new_thread
    calls = 0

    def flaky_start(fn: Any, args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("can't start new thread")
        return real(fn, args)

    @af.task
    def nap(x: int) -> int:
        time.sleep(0.01)
        return x

    @af.flow
    def f(x: int) -> Any:
        return [nap(x) for _ in range(4)]  # a fan-out: the watcher starts

    with mock.patch.object(actors._thread, "start_new_thread", flaky_start):
        with pytest.raises(RuntimeError, match="can't start new thread"):
            f.run(1)
        assert f.run(2) == [2, 2, 2, 2]  # the next run works


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_stop_in_a_forked_child_does_not_wait_for_the_parents_watcher() -> None:
    @af.task
    def nap(x: int) -> int:
        time.sleep(0.01)
        return x

    @af.flow
    def f(x: int) -> Any:
        return [nap(x) for _ in range(4)]

    running = f.start()
    try:
        assert running.submit(1).result(timeout=10) == [1, 1, 1, 1]
        wait_until(  # the watcher is listed once it lives beyond its first poll
            lambda: any(t.name.startswith("actorflow-supervisor-") for t in threading.enumerate())
        )
        pid = os.fork()
        if pid == 0:  # the child: nothing in flight, the watcher thread does not exist here
            try:
                running.stop()
            finally:
                os._exit(0)
        statuses: list[int] = []

        def reaped() -> bool:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                statuses.append(status)
            return bool(done)

        try:
            wait_until(reaped, timeout=10)  # stop() in the child used to hang
        finally:
            if not statuses:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(statuses[0]) == 0
    finally:
        running.stop()


def test_a_failure_in_an_early_part_of_a_block_reaches_the_dead_letters() -> None:
    # workers=2 splits a read-ahead block in two parts, emitted in order: the clean
    # second part completes the block, which must still count the first part's failure
    @af.task(workers=2)
    def fails_on_three(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x

    @af.flow
    def f(x: int) -> Any:
        return fails_on_three(x)

    with f.start() as running:
        out = sorted(running.stream(range(8)))  # blocks of 1, 2, 4 and 1 items
        dead = running.dead_letters()
    assert out == [0, 1, 2, 4, 5, 6, 7]
    assert [(d.task, d.item_id, d.error_type) for d in dead] == [
        ("fails_on_three", 3, "ValueError")
    ]


def test_a_pump_queued_for_a_consumer_that_waits_for_something_else_goes_to_a_host() -> None:
    # a consumer queued its process node's pump (it runs it while it waits for
    # results), then waited for room for more items instead: nobody ran the pump
    # and the stream hung (review of the pump)
    from actorflow.runtime.actors import HostPool

    errors: list[BaseException] = []
    pool = HostPool("pump-away", errors.append)
    ran = threading.Event()

    class Pump:
        helpable = False
        pumped = True

        def run(self) -> None:
            ran.set()

        def pump(self, until: Any, wake: Any) -> None:
            raise AssertionError("help_one() without pump= must not run a pump")

    try:
        pool.helping(True)  # a consumer inside map/stream
        pool.schedule(Pump())  # kept for this thread
        assert not pool.help_one()  # waiting for room: it may not pump here
        assert ran.wait(10)  # a host ran it (after pump_stall_s), though we still help
    finally:
        pool.helping(False)
        pool.shutdown()
    assert errors == []


def test_a_pumped_node_pipelines_batches_with_skipped_items() -> None:
    # an upstream filter puts skip markers in most batches a process node receives:
    # those must go through the pump's workers like clean ones, not one at a time
    # the general (blocking) way (review of the pump)
    from actorflow.runtime.node import Segment

    @af.task
    def drop_tens(x: int) -> Any:
        return af.SKIP if x % 10 == 0 else x

    @af.task(executor="process", workers=2)
    def triple(x: int) -> int:
        return 3 * x

    @af.flow
    def f(x: int) -> Any:
        return triple(drop_tens(x))

    with (
        mock.patch.object(
            Segment, "process", autospec=True, side_effect=Segment.process
        ) as general,
        f.start(processes=2) as running,
    ):
        out = sorted(running.stream(range(3000)))
        m = running.metrics()["triple"]
    assert out == [3 * x for x in range(3000) if x % 10]
    assert (m.done, m.skipped) == (2700, 300)
    assert [c for c in general.call_args_list if c.args[0].name == "triple"] == []


def test_retries_of_a_pumped_process_node_complete_in_a_stream(tmp_path: Any) -> None:
    # a retried item comes back as a special batch: the pump spun on it for ever
    # (review of the pump)
    base = str(tmp_path)

    @af.task(executor="process", retries=1, backoff=af.Backoff(initial=0.001))
    def fails_once(x: int) -> int:
        marker = os.path.join(base, str(x))
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ValueError(f"first attempt of {x}")
        return x

    @af.flow
    def f(x: int) -> Any:
        return fails_once(x)

    with f.start(processes=2, max_in_flight=16) as running:
        out = sorted(running.stream(range(64)))
        m = running.metrics()["fails_once"]
    assert out == list(range(64))
    assert (m.done, m.retried, m.failed) == (64, 64, 0)


def test_arguments_that_cannot_be_built_fail_the_item_at_a_pumped_node() -> None:
    # a skipped input makes the parent build the call's arguments; a missing key
    # there raised inside the pump after it had taken the batch: batch lost, the
    # stream hung (second review of the pump)
    @af.task
    def record(x: int) -> dict[str, int]:
        return {"k": x} if x != 1 else {}

    @af.task
    def maybe(x: int) -> Any:
        return af.SKIP if x == 1 else x

    @af.task(executor="process")
    def first_key(k: int, items: list[Any]) -> int:
        return k

    @af.flow
    def f(x: int) -> Any:
        return first_key(record(x)["k"], [maybe(x)])

    with f.start(processes=1, max_in_flight=4) as running:
        out = sorted(running.stream(range(12)))
        m = running.metrics()["first_key"]
        dead = running.dead_letters()
    assert out == [x for x in range(12) if x != 1]
    assert [(d.task, d.item_id, d.error_type) for d in dead] == [("first_key", 1, "KeyError")]
    assert (m.failed, m.in_flight) == (1, 0)


def test_a_pump_gives_back_an_idle_worker_that_another_node_waits_for(tmp_path: Any) -> None:
    # `slow_or_quick` holds both workers; its quick item is done while the slow one
    # runs, which waits for `unblock` (another node) to run: the pump must give the
    # idle worker back before it waits, or this never finishes (second review)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    @af.task(executor="process", workers=2)
    def slow_or_quick(x: int) -> int:
        if x == 0 and not _await_fifo(fifo):  # until `unblock` writes (or 30 s)
            return -1
        return x

    @af.task
    async def later(x: int) -> int:
        import asyncio

        await asyncio.sleep(0.05)  # reaches `unblock` once the pump holds both workers
        return x

    @af.task(executor="process")
    def unblock(x: int) -> int:
        if x == 0:
            _signal_fifo(fifo)
        return x

    @af.flow
    def f(x: int) -> Any:
        return {"a": slow_or_quick(x), "b": unblock(later(x))}

    with f.start(processes=2, max_in_flight=8) as running:
        assert running.submit(5).result(60) == {"a": 5, "b": 5}
        assert list(running.map([0, 1])) == [{"a": 0, "b": 0}, {"a": 1, "b": 1}]


def test_a_fresh_workers_hello_is_not_taken_for_its_results(tmp_path: Any) -> None:
    # the pump polled a just-started worker's pipe, found its hello and waited for
    # that worker's whole first batch: the other worker's results waited too
    # (third review of the pump)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    @af.task(executor="process", workers=2)
    def gated(x: int) -> int:
        if x == 1:
            with open(fifo) as f:  # blocks until the test lets it go
                f.read()
        elif x == 2:
            time.sleep(0.2)  # still running when item 1 is sent to the other worker
        return x

    @af.flow
    def f(x: int) -> Any:
        return gated(x)

    with f.start(processes=2) as running:
        assert running.submit(0).result(60) == 0  # one worker warm
        quick = running.submit(2)  # to the warm worker
        slow = running.submit(1)  # to the other one, which starts now
        try:
            assert quick.result(30) == 2  # while the other worker's batch still runs
        finally:
            _signal_fifo(fifo)
        assert slow.result(60) == 1


def test_a_worker_given_back_goes_to_the_node_waiting_for_it(tmp_path: Any) -> None:
    # a pump gave a worker back to a node waiting for one and took it back itself
    # a moment later: both workers then ran items waiting for that node (deadlock;
    # fourth review of the pump)
    fifos = {x: str(tmp_path / f"fifo{x}") for x in (0, 4)}
    for path in fifos.values():
        os.mkfifo(path)

    @af.task(executor="process", workers=2)
    def needs_b(x: int) -> int:
        if x in fifos and not _await_fifo(fifos[x]):  # until b(x) has run (or 30 s)
            return -1
        if x == 1:
            time.sleep(0.3)
        return x

    @af.task
    async def later(x: int) -> int:
        import asyncio

        await asyncio.sleep(0.1)
        return x

    @af.task(executor="process")
    def b(x: int) -> int:
        if x in fifos:
            _signal_fifo(fifos[x])
        return x

    @af.flow
    def f(x: int) -> Any:
        return {"a": needs_b(x), "b": b(later(x))}

    with f.start(processes=2, max_in_flight=16) as running:
        futures = [running.submit(x) for x in range(5)]
        assert [fut.result(60) for fut in futures] == [{"a": x, "b": x} for x in range(5)]


def _await_fifo(path: str, timeout: float = 30.0) -> bool:
    """In a worker: wait until someone writes to the FIFO at ``path``; False after
    ``timeout`` (so a regression fails its test instead of hanging the run)."""
    import os
    import select

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def _signal_fifo(path: str) -> None:
    """Let the reader of the FIFO at ``path`` go (blocks until it has opened it)."""
    with open(path, "w") as f:
        f.write("go")
