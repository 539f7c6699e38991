"""Process tasks through the engine: real worker processes, real crashes and kills."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import psutil
import pytest

import actorflow as af


@af.task(executor="process")
def parse(line: str) -> dict[str, Any]:
    return dict(json.loads(line))


@af.task(executor="process")
def keep_errors(ev: dict[str, Any]) -> Any:
    return ev if ev["level"] == "ERROR" else af.SKIP


@af.task
def service(ev: dict[str, Any]) -> str:
    return str(ev["service"])


@af.flow
def errors_by_service(line: str) -> Any:
    return service(keep_errors(parse(line)))


def _lines(n: int) -> list[str]:
    return [
        json.dumps({"level": "ERROR" if i % 4 == 0 else "INFO", "service": f"s{i % 3}"})
        for i in range(n)
    ]


def _workers_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@af.flow
def error_events(line: str) -> Any:
    return keep_errors(parse(line))


def test_a_chain_that_is_the_flow_output_yields_only_kept_items_and_counts_the_rest() -> None:
    # workers send only the kept results, straight to the flow's output: stream
    # yields them as they are, map puts SKIP back in place, submit resolves each
    lines = _lines(2000)
    want = [json.loads(line) for line in lines]
    with error_events.start(processes=2) as running:
        streamed = list(running.stream(lines))
        mapped = list(running.map(lines))
        futures = [running.submit(line) for line in lines[:8]]
        submitted = [f.result(timeout=30) for f in futures]
        m = running.metrics()
    kept = [ev for ev in want if ev["level"] == "ERROR"]
    assert sorted(streamed, key=json.dumps) == sorted(kept, key=json.dumps)
    assert mapped == [ev if ev["level"] == "ERROR" else af.SKIP for ev in want]
    assert submitted == [ev if ev["level"] == "ERROR" else af.SKIP for ev in want[:8]]
    assert (m["keep_errors"].done, m["keep_errors"].skipped) == (2 * 500 + 2, 2 * 1500 + 6)


def skip_fifths_fail_sevenths(x: int) -> Any:
    if x % 7 == 0:
        raise ValueError(f"seventh {x}")
    return af.SKIP if x % 5 == 0 else x


def skip_thirds(x: int) -> Any:
    return af.SKIP if x % 3 == 0 else x


def _counts(executor: str, how: str, timeout: float | None) -> dict[str, tuple[int, int, int]]:
    opts: dict[str, Any] = {"executor": executor}
    if timeout is not None:
        opts["timeout"] = timeout  # the per-item path in the worker, not the generated loop
    a = af.task(skip_fifths_fail_sevenths, name="A", **opts)
    b = af.task(skip_thirds, name="B", **opts)

    @af.flow
    def two(x: int) -> Any:
        return b(a(x))

    with two.start(processes=1) as running:
        if how == "stream":
            list(running.stream(range(1, 301)))
        else:
            futures = [running.submit(x) for x in range(1, 61)]
            for f in futures:
                f.exception(timeout=30)
        m = running.metrics()
    return {name: (n.done, n.failed, n.skipped) for name, n in m.items()}


@pytest.mark.parametrize(("how", "timeout"), [("stream", None), ("stream", 30.0), ("submit", None)])
def test_a_fused_process_chain_counts_skips_at_the_node_that_skipped_like_threads(
    how: str, timeout: float | None
) -> None:
    # an item that A skips is skipped at A and B, not done at A (the worker says which
    # node skipped it: the generated loop, the per-item path and one-item batches)
    want = _counts("thread", how, timeout)
    assert want["A"][2] > 0  # the case is exercised
    assert _counts("process", how, timeout) == want


@af.task(executor="process")
def add_one(x: int) -> Any:
    return x + 1 if x != 5 else af.SKIP


def test_a_chain_of_120_process_tasks_fuses_and_runs() -> None:
    # the generated loop is flat: nested blocks hit Python's limit near 99 nodes
    @af.flow
    def long_chain(x: int) -> Any:
        for _ in range(120):
            x = add_one(x)
        return x

    with long_chain.start(processes=1) as running:
        out = list(running.map([0, 10, 1000]))
        m = running.metrics()
    assert out == [af.SKIP, 130, 1120]  # 0 reaches 5 on the way: skipped
    assert len(m) == 120
    *_, last = m.values()
    assert (last.done, last.skipped) == (2, 1)


def test_process_tasks_fuse_into_one_chain_run_inside_the_workers() -> None:
    from actorflow.runtime.plan import compile_plan, describe

    assert "parse -> keep_errors (fused)" in describe(compile_plan(errors_by_service.graph))
    with errors_by_service.start(processes=2) as running:
        out = list(running.stream(_lines(400)))
        workers = running.metrics()["parse"].workers
    assert sorted(out) == sorted(f"s{i % 3}" for i in range(400) if i % 4 == 0)
    pids = [w["pid"] for w in workers if w["pid"] is not None]
    assert pids
    assert os.getpid() not in pids
    assert not _workers_alive(pids)  # every worker process is gone after the block


def test_a_process_task_failure_has_a_forensic_record_from_the_worker() -> None:
    with pytest.raises(af.RunFailed) as info:
        errors_by_service.run("{not json", processes=1)
    (failure,) = info.value.failures
    assert failure.task == "parse"
    assert failure.error_type == "JSONDecodeError"
    assert failure.executor == "process"
    assert failure.pid != os.getpid()
    assert failure.traceback.startswith("Traceback")
    assert failure.inputs == ("'{not json'",)


def test_bad_lines_in_a_stream_fail_alone_at_the_right_stage_and_the_rest_flow() -> None:
    lines = _lines(300)
    bad = {7: "{not json", 150: json.dumps({"service": "s9"})}  # parse fails; no "level"
    for i, line in bad.items():
        lines[i] = line
    with errors_by_service.start(processes=2) as running:
        out = list(running.stream(lines))
        dead = running.dead_letters()
        m = running.metrics()
    expected = [f"s{i % 3}" for i in range(300) if i % 4 == 0 and i not in bad]
    assert sorted(out) == sorted(expected)
    by_task = {f.task: f for f in dead}
    assert sorted(by_task) == ["keep_errors", "parse"]
    assert by_task["parse"].error_type == "JSONDecodeError"
    assert by_task["keep_errors"].error_type == "KeyError"
    # a fused process chain records the input it received (the line) for any stage
    assert by_task["keep_errors"].inputs == (repr(bad[150]),)
    assert (m["parse"].done, m["parse"].failed) == (299, 1)
    keep = m["keep_errors"]
    assert (keep.done, keep.skipped, keep.failed) == (len(expected), 298 - len(expected), 1)


@af.task
def skip_zero(x: int) -> Any:
    return af.SKIP if x == 0 else x


@af.task
def plus_one(x: int) -> int:
    return x + 1


@af.task(executor="process")
def add_all(xs: list[int]) -> int:
    return sum(xs)


@af.flow
def gathered(x: int) -> Any:
    return add_all([skip_zero(x), skip_zero(plus_one(x)), plus_one(plus_one(x))])


def test_a_gather_with_skipped_elements_reaches_a_process_task_without_them() -> None:
    with gathered.start(processes=1) as running:
        assert list(running.map([0, 1, 5])) == [1 + 2, 1 + 2 + 3, 5 + 6 + 7]  # 0 left out


@af.task(executor="process")
def chatty(x: int) -> int:
    import logging

    logging.getLogger("tests.chatty").warning("chatty saw %d", x)
    return x


@af.flow
def chatter(x: int) -> Any:
    return chatty(x)


def test_log_records_of_process_tasks_reach_the_application(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with chatter.start(processes=1) as running:
        assert list(running.map(range(5))) == list(range(5))
        (worker,) = running.metrics()["chatty"].workers
    records = [r for r in caplog.records if r.name == "tests.chatty"]
    assert sorted(r.getMessage() for r in records) == [f"chatty saw {i}" for i in range(5)]
    assert {r.process for r in records} == {worker["pid"]}


@af.task(executor="process", retries=1)
def exits_on_three(x: int) -> int:
    if x == 3:
        os._exit(3)
    return x * 10


@af.flow
def crashing(x: int) -> Any:
    return exits_on_three(x)


def test_an_item_that_kills_its_worker_fails_alone_with_worker_crashed() -> None:
    with crashing.start(processes=2) as running:
        futures = [running.submit(i) for i in range(8)]
        results: list[Any] = []
        for fut in futures:
            try:
                results.append(fut.result(60))
            except af.RunFailed as exc:
                results.append(exc.failures[0])
        metrics = running.metrics()["exits_on_three"]
    crashed = results[3]
    assert isinstance(crashed, af.Failure)
    assert crashed.error_type == "WorkerCrashed"
    assert crashed.attempt == 2  # charged an attempt, retried once, then failed
    assert "exited with code 3" in crashed.message
    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50, 60, 70]
    assert metrics.retried == 1


def test_a_worker_killed_mid_batch_loses_no_item() -> None:
    started = threading.Event()

    @af.task
    def count(x: int) -> int:
        return x

    with errors_by_service.start(processes=1, max_in_flight=64) as running:
        # warm the worker up, then SIGKILL it while a stream is in flight
        assert running.submit(_lines(1)[0]).result(60) == "s0"
        pid = running.metrics()["parse"].workers[0]["pid"]

        def kill_soon() -> None:
            started.wait(10)
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        out = []
        for i, svc in enumerate(running.stream(_lines(2000))):
            out.append(svc)
            if i == 10:
                started.set()
        killer.join()
        workers = running.metrics()["parse"].workers
    assert len(out) == 500  # every ERROR line, none lost, none doubled
    assert workers[0]["pid"] != pid  # the slot's worker was replaced
    assert count.name == "count"


@af.task(executor="process", timeout=0.5)
def maybe_hang(x: int) -> int:
    if x == 1:
        threading.Event().wait()  # never returns
    return x


@af.flow
def hanging(x: int) -> Any:
    return maybe_hang(x)


def test_a_process_task_over_its_timeout_is_killed() -> None:
    with hanging.start(processes=1) as running:
        ok = running.submit(0)
        stuck = running.submit(1)
        after = running.submit(2)
        assert ok.result(60) == 0
        with pytest.raises(af.RunFailed) as info:
            stuck.result(60)
        assert after.result(60) == 2
    assert info.value.failures[0].error_type == "TaskTimeout"


@af.task(executor="process", timeout=float("inf"))
def double_unbounded(x: int) -> int:
    return 2 * x


def test_an_infinite_timeout_is_no_limit() -> None:
    # poll() takes an int of milliseconds: inf used to overflow it
    @af.flow
    def f(x: int) -> Any:
        return double_unbounded(x)

    assert f.run(21) == 42


@af.task(executor="process", key=lambda ev: ev["user"], workers=2)
class Sessions:
    """Counts events per user inside worker processes."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, ev: dict[str, Any]) -> tuple[str, int, int]:
        self.seen[ev["user"]] = self.seen.get(ev["user"], 0) + 1
        return ev["user"], self.seen[ev["user"]], os.getpid()


@af.flow
def sessions(ev: dict[str, Any]) -> Any:
    return Sessions(ev)


def test_keyed_instances_live_in_worker_processes_and_keep_state_per_key() -> None:
    events = [{"user": u} for u in ["ann", "bob", "cid", "dan"] * 25]
    with sessions.start(processes=2) as running:
        out = list(running.map(events))
    per_user: dict[str, list[int]] = {}
    pids: dict[str, set[int]] = {}
    for user, n, pid in out:
        per_user.setdefault(user, []).append(n)
        pids.setdefault(user, set()).add(pid)
    assert all(v == list(range(1, 26)) for v in per_user.values())
    assert all(len(p) == 1 for p in pids.values())
    assert os.getpid() not in {p for ps in pids.values() for p in ps}


def test_a_killed_worker_loses_its_keyed_state_and_says_so() -> None:
    with sessions.start(processes=1) as running:
        first = running.submit({"user": "ann"}).result(60)
        worker = psutil.Process(first[2])
        os.kill(first[2], signal.SIGKILL)  # killed while idle
        psutil.wait_procs([worker], timeout=30)
        again = running.submit({"user": "ann"}).result(60)
        lost = running.metrics()["Sessions"].state_lost
    assert first[1] == 1
    assert again[1] == 1  # a fresh instance: state starts over
    assert again[2] != first[2]
    assert lost >= 1


def test_all_process_tasks_of_a_run_share_one_pool() -> None:
    @af.task(executor="process")
    def pid_a(x: int) -> int:
        return os.getpid()

    @af.task(executor="process")
    def pid_b(x: int) -> int:
        return os.getpid()

    @af.flow
    def f(x: int) -> Any:
        return [pid_a(x), pid_b(x), pid_a(x), pid_b(x)]

    with f.start(processes=2) as running:
        pids = {p for out in running.map(range(20)) for p in out}
    assert 1 <= len(pids) <= 2


@af.task(executor="process")
def square(x: int) -> int:
    if x == 13:
        raise ValueError("unlucky")
    return x * x


@af.task
def numbers(n: int) -> list[int]:
    return list(range(n))


def test_af_map_of_a_process_task_runs_the_elements_in_the_workers() -> None:
    @af.flow
    def f(n: int) -> Any:
        return af.map(square, numbers(n))

    @af.flow
    def lenient(n: int) -> Any:
        return af.map(square, numbers(n), return_exceptions=True)

    assert f.run(10, processes=2) == [x * x for x in range(10)]
    with pytest.raises(af.RunFailed) as info:
        f.run(20, processes=2)
    assert [(x.task, x.error_type, x.executor) for x in info.value.failures] == [
        ("square", "ValueError", "process")
    ]
    out = lenient.run(15, processes=2)
    assert isinstance(out[13], ValueError)
    assert out[12] == 144


def test_indexing_a_node_with_one_input_passes_the_element_whole() -> None:
    @af.task
    def pairs() -> list[tuple[int, int]]:
        return [(1, 2), (3, 4)]

    @af.task
    def ident(t: tuple[int, int]) -> tuple[int, int]:
        return t

    @af.flow
    def first() -> Any:
        return ident(pairs()[0])

    assert first.run() == (1, 2)


@af.task(executor="process")
def whoami(x: int) -> int:
    return os.getpid()


@af.flow
def pids(x: int) -> Any:
    return whoami(x)


def test_workers_are_recycled_after_max_tasks_per_worker() -> None:
    with pids.start(processes=1, max_tasks_per_worker=3) as running:
        seen = [running.submit(i).result(60) for i in range(7)]
    # one item per batch: a fresh worker after every third item
    assert len(set(seen)) == 3
    assert seen[0] == seen[1] == seen[2]
    assert seen[3] != seen[0]


# -- the pump: a consumer of map / stream runs a process node's batches itself ------


@af.task(executor="process", workers=2)
def double(x: int) -> int:
    return 2 * x


def test_a_stream_flows_on_while_its_consumer_is_away() -> None:
    # the consumer pumps the process node while it waits for results; when it goes
    # off to run its own code, hosts take over the batches in flight and the rest
    seen: list[int] = []
    all_seen = threading.Event()

    @af.task
    def note(x: int) -> int:
        seen.append(x)
        if len(seen) == 32:
            all_seen.set()
        return x

    @af.flow
    def f(x: int) -> Any:
        return note(double(x))

    with f.start(processes=2, max_in_flight=64) as running:
        it = running.stream(range(32))  # all 32 are read in before the first result
        first = next(it)
        assert all_seen.wait(60), f"only {len(seen)} of 32 items done while away"
        rest = list(it)
    assert sorted([first, *rest]) == [2 * x for x in range(32)]


@af.task(executor="process")
def inc_in_worker(x: int) -> int:
    return x + 1


@af.task
def times_ten(x: int) -> int:
    return x * 10


@af.task(executor="process")
def minus_one(x: int) -> int:
    return x - 1


def test_two_process_nodes_on_one_worker_take_turns_in_a_stream() -> None:
    @af.flow
    def f(x: int) -> Any:
        return minus_one(times_ten(inc_in_worker(x)))

    with f.start(processes=1, max_in_flight=256) as running:
        out = sorted(running.stream(range(3000)))
        m = running.metrics()
    assert out == sorted((x + 1) * 10 - 1 for x in range(3000))
    assert m["inc_in_worker"].done == m["minus_one"].done == 3000


def test_workers_are_recycled_during_a_long_stream() -> None:
    # the pump holds its worker across batches; it still gives it back to be recycled
    with pids.start(processes=1, max_tasks_per_worker=50, max_in_flight=64) as running:
        seen = set(running.stream(range(600)))
    assert len(seen) >= 3


def test_an_ordered_map_through_two_workers_keeps_the_input_order() -> None:
    @af.task(executor="process", workers=2)
    def uneven(x: int) -> int:
        sum(range(20_000 if x % 7 == 0 else 10))  # some batches take longer
        return x * 3

    @af.flow
    def f(x: int) -> Any:
        return times_ten(uneven(x))

    with f.start(processes=2, max_in_flight=32) as running:
        assert list(running.map(range(2000))) == [x * 30 for x in range(2000)]


def test_stop_without_drain_in_the_middle_of_a_stream_leaves_no_worker() -> None:
    @af.task(executor="process", workers=2)
    def slowish(x: int) -> int:
        sum(range(50_000))
        return x

    @af.flow
    def f(x: int) -> Any:
        return slowish(x)

    with f.start(processes=2, max_in_flight=64) as running:
        assert running.submit(0).result(60) == 0
        worker_pids = [w["pid"] for w in running.metrics()["slowish"].workers if w["pid"]]
        got = 0
        for _ in running.stream(range(100_000)):
            got += 1
            if got == 5:
                running.stop(drain=False)  # batches are in flight in both workers
                break
        metrics = running.metrics()["slowish"]
    assert got == 5
    assert worker_pids
    assert _workers_alive(worker_pids) == []
    assert metrics.in_flight == 0  # the batches the workers had are not in flight any more


@pytest.mark.parametrize("options", [{"workers": 2}, {"timeout": 120}], ids=["pump", "timed"])
def test_stop_without_drain_kills_workers_running_long_items(
    options: dict[str, Any], tmp_path: Any
) -> None:
    # stop(drain=False) used to wait for the batches in the workers' pipes: two
    # batches of a 5 s item took 9.5 s to "cancel"
    @af.task(executor="process", **options)
    def stuck(x: int) -> int:
        with open(os.path.join(str(tmp_path), f"started-{x}"), "w"):
            pass
        time.sleep(120)
        return x

    @af.flow
    def f(x: int) -> Any:
        return stuck(x)

    from tests.conftest import wait_until

    with f.start(processes=2) as running:
        futures = [running.submit(i) for i in range(4)]
        wait_until(lambda: len(os.listdir(tmp_path)) >= 1, timeout=60)
        worker_pids = [w["pid"] for w in running.metrics()["stuck"].workers if w["pid"]]
        t0 = time.monotonic()
        running.stop(drain=False)
        stopped_in = time.monotonic() - t0
    assert stopped_in < 60  # a sanity bound: the items would sleep 120 s
    assert all(fut.cancelled() for fut in futures)
    assert worker_pids
    assert _workers_alive(worker_pids) == []


@pytest.mark.parametrize("options", [{}, {"timeout": 60}], ids=["pump", "timed"])
def test_a_stuck_item_does_not_hold_back_items_another_worker_can_run(
    options: dict[str, Any],
) -> None:
    # the batch behind a stuck one was sent ahead into the same worker's pipe (pump)
    # or taken by the same runner (timed), while the other worker idled: it waited
    # for the stuck item (for ever without a timeout)
    @af.task(executor="process", workers=2, **options)
    def nap(x: float) -> int:
        time.sleep(x)
        return os.getpid()

    @af.flow
    def f(x: float) -> Any:
        return nap(x)

    with f.start(processes=2) as running:
        assert len(list(running.map([0.05] * 6))) == 6  # both workers up; an estimate
        stuck = running.submit(120.0)
        quick = [running.submit(0.05) for _ in range(6)]
        pids = {fut.result(timeout=30) for fut in quick}
        assert not stuck.done()
        running.stop(drain=False)
    assert len(pids) == 1  # all on the worker that was free


def test_a_process_class_task_is_never_instantiated_in_the_parent() -> None:
    # its instances live in the workers; the parent built `workers` more (a heavy
    # model loaded twice over, and an __init__ error escaping start() raw)
    parent = os.getpid()

    @af.task(executor="process", workers=2)
    class Model:
        def __init__(self) -> None:
            if os.getpid() == parent:
                raise RuntimeError("instantiated in the parent")

        def __call__(self, x: int) -> int:
            return x * 2

    @af.flow
    def f(x: int) -> Any:
        return Model(x)

    with f.start(processes=2) as running:
        assert list(running.map(range(6))) == [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize(
    "option",
    [
        {"processes": 0},
        {"max_tasks_per_worker": 0},
        {"max_tasks_per_worker": 2.5},
        {"max_worker_rss_mb": -1},
        {"max_worker_rss_mb": "big"},
    ],
)
def test_bad_pool_options_are_refused_by_start_naming_the_option(option: dict[str, Any]) -> None:
    # they used to be accepted, then fail the first process item as "a bug in
    # actorflow" (acceptance test of issue 4)
    @af.task(executor="process")
    def double(x: int) -> int:
        return 2 * x

    @af.flow
    def f(x: int) -> Any:
        return double(x)

    (name,) = option
    with pytest.raises(ValueError, match=name):
        f.start(**option)


def test_a_worker_killed_while_idle_is_noticed_and_restarted_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # noticed through its exit sentinel by the pool's sentry, with no item sent:
    # before, only the next item found it dead (and worker_died was logged twice)
    @af.task(executor="process", workers=2)
    def pid(x: int) -> int:
        return os.getpid()

    @af.flow
    def f(x: int) -> Any:
        return pid(x)

    from tests.conftest import wait_until

    caplog.set_level(logging.WARNING, logger="actorflow")
    with f.start(processes=2) as running:
        assert len(set(running.map(range(40)))) >= 1
        workers = running.metrics()["pid"].workers
        victim = next(w["pid"] for w in workers if w["pid"])
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = running.metrics()["pid"].workers
            return all(w["alive"] for w in now if w["restarts"] or w["pid"] is None) and any(
                w["restarts"] == 1 and w["alive"] for w in now
            )

        wait_until(replaced, timeout=30)
        assert victim not in {w["pid"] for w in running.metrics()["pid"].workers}
        assert running.submit(1).result(timeout=30) != victim
    died = [r for r in caplog.records if "worker_died" in r.getMessage()]
    assert len(died) == 1


def test_an_unpicklable_result_is_blamed_on_the_task_that_returned_it() -> None:
    # the message named 'partial', the engine's wrapper (acceptance test of issue 4)
    @af.task(executor="process")
    def first(x: int) -> int:
        return x

    @af.task(executor="process")
    def make_lock(x: int) -> Any:
        return threading.Lock()

    @af.flow
    def f(x: int) -> Any:
        return make_lock(first(x))

    with pytest.raises(af.RunFailed) as info:
        f.run(1, processes=1)
    (failure,) = info.value.failures
    assert failure.task == "make_lock"
    assert "make_lock' (lock) could not be pickled" in failure.message  # its qualname
    assert failure.function is not None
    assert failure.function.endswith("make_lock")


def test_skips_from_upstream_count_at_every_node_of_a_fused_process_chain() -> None:
    # as on the thread path; they were counted at the chain's first node only
    @af.task
    def gate(x: int) -> Any:
        return x if x % 5 == 0 else af.SKIP

    @af.task(executor="process")
    def plus(x: int) -> int:
        return x + 1

    @af.task(executor="process")
    def twice(x: int) -> int:
        return 2 * x

    @af.flow
    def f(x: int) -> Any:
        return twice(plus(gate(x)))

    with f.start(processes=1) as running:
        out = list(running.map(range(100)))
        metrics = running.metrics()
    assert [v for v in out if v is not af.SKIP] == [2 * (x + 1) for x in range(0, 100, 5)]
    assert {name: (m.done, m.skipped) for name, m in metrics.items()} == {
        "gate": (20, 80),
        "plus": (20, 80),
        "twice": (20, 80),
    }


def test_slow_items_are_spread_evenly_over_the_workers() -> None:
    # a quick item first leaves a misleading estimate of the node's time per item;
    # a map of slow items must still go item by item, not in pairs to one worker
    @af.task(executor="process", workers=2)
    def nap(x: float) -> int:
        time.sleep(x)
        return os.getpid()

    @af.flow
    def f(x: float) -> Any:
        return nap(x)

    with f.start(processes=2) as running:
        for _ in range(3):  # (a worker's first batch, with its start-up, is not measured)
            running.submit(0.0).result(60)
        pids = list(running.map([0.2] * 8))
    assert sorted(Counter(pids).values()) == [4, 4]


def test_a_workers_start_up_is_not_taken_for_the_cost_of_its_first_items() -> None:
    # a fresh worker's first batch also waits for the worker to start and load the
    # code: measured, it made quick items look slow for a while (they then went out
    # in small pieces: W2 reached its full batch size 5-8 ms later)
    @af.task(executor="process")
    def inc(x: int) -> int:
        return x + 1

    @af.flow
    def f(x: int) -> Any:
        return inc(x)

    with f.start(processes=1) as running:
        (segment,) = running._segments
        assert running.submit(1).result(60) == 2
        assert segment.item_s < 0  # no estimate from the cold batch
        for x in range(3):
            assert running.submit(x).result(60) == x + 1
        assert segment.item_s >= 0  # the warm ones are measured


def test_read_ahead_blocks_are_sized_for_the_workers_that_can_run_at_once() -> None:
    # workers=8 on a pool of 2 processes keeps 2 workers busy: blocks sized for 8
    # (16 of 64 items) would cost the parent 4x the work per item for nothing
    @af.task(executor="process", workers=8)
    def double(x: int) -> int:
        return 2 * x

    @af.flow
    def f(x: int) -> Any:
        return double(x)

    with f.start(processes=2, max_in_flight=1024) as running:
        assert list(running.map(range(50))) == [2 * x for x in range(50)]
        assert running._chunk_div == 4  # two blocks for each of the 2 busy workers
