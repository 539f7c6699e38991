"""Pykka actors as hosts: the threads that run node state machines.

Every node is a logical actor (a :class:`~actorflow.runtime.node.Segment`
with its own mailbox and state); the threads that run them are pykka actors
acting as *hosts*, pooled per run, as Akka actors run on a dispatcher's
threads. A ready segment runs on any idle host; when none is idle it waits in
the run's ready queue, which every host drains when it finishes a job.

The pool is elastic. It starts with no host: the first job of a started
graph starts one. During ``run()`` the pool is *caller-runs*: the thread that
called ``run()`` runs the jobs itself while it waits for the result, so a
batch of quick tasks starts no thread at all (on a 2-core VM, starting a
thread and handing work to it costs 0.1-0.5 ms: more than a whole 15-node
run). A *watcher* (a supervisor thread for a started graph; during ``run()``
one is started as soon as a job waits while the caller runs another) checks
that jobs keep being taken; when none has been for ``stall_s`` and the busy
threads are blocked in tasks (a sleep, IO), it starts one host per waiting
job, up to ``max_hosts``. So a blocking call takes a thread, not the graph,
while a graph of quick tasks pays for no thread it does not need. Idle hosts
beyond ``keep_idle`` retire.

A process node's pump, which a consumer of ``map`` / ``stream`` runs in rounds
and queues again after each one, is handed to a host only after
``pump_stall_s`` (20 ms): its batches are in flight in worker processes, the
consumer is nearly always back long before, and polling at ``stall_s`` while
it streams cost W2 ~2,000 context switches per run.

No exception ever reaches pykka's own failure handling (which would stop the
actor, and for a ``BaseException`` call pykka's process-global ``stop_all``):
a host catches everything and reports it to the pool's ``on_fatal``.
"""

from __future__ import annotations

import _thread
import heapq
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import pykka

__all__ = ["HostPool", "Job"]

_DEFAULT_MAX_HOSTS = max(64, min(32, (os.cpu_count() or 1) + 4))
_LINGER_S = 0.05  # the watcher polls this long after jobs last waited before it sleeps


class Job(Protocol):
    """Anything a host can run: a segment, or a slice of a parallel map.

    ``helpable``: the job computes in its thread, so a helping consumer may run
    it itself (see :meth:`HostPool.schedule`). ``offerable``: a helpable job
    whose run takes the batches in arrival order, one runner at a time (a
    segment with one worker): the thread that submitted an item may run it
    itself (see :meth:`HostPool.take_offer`). ``pumped``: the job mostly waits
    for worker processes and can also run in rounds that return when the
    consumer's own condition holds (``pump(until, wake)``, see
    :meth:`HostPool.help_one`).
    """

    helpable: bool
    offerable: bool
    pumped: bool

    def run(self) -> None: ...

    def pump(self, until: Callable[[], bool] | None, wake: Any) -> None: ...


class _Offer:
    """A job handed to a host while the thread that queued it may still run it itself.

    ``submit()`` offers the jobs its item starts: the host it wakes and the
    submitting thread, if it then waits in ``result()``, race for it; whoever
    pops ``box`` first runs the job, the other finds it empty. The waiting
    thread skips both thread hand-offs (to the host and back).

    Only ``offerable`` jobs (one runner, batches in arrival order) are offered:
    the batches ahead of the item's are ones it waits behind anyway, so the
    waiting thread never runs work its item does not wait for.
    """

    __slots__ = ("box", "job")
    pumped = False
    offerable = False

    def __init__(self, job: Job) -> None:
        self.job = job
        self.box = [job]  # the claim: popped once, by whoever runs the job

    @property
    def helpable(self) -> bool:
        return self.job.helpable  # a watcher may have marked the job not helpable

    @helpable.setter
    def helpable(self, value: bool) -> None:
        self.job.helpable = value

    def run(self) -> None:
        try:
            job = self.box.pop()
        except IndexError:
            return  # the waiting thread took it
        job.run()

    def pump(self, until: Callable[[], bool] | None, wake: Any) -> None:  # pragma: no cover
        self.run()


class _PoolLocal(threading.local):
    """Per-thread state of a pool's threads, with class defaults: reading an unset
    attribute of a bare ``threading.local`` with ``getattr(..., default)`` raises
    and catches AttributeError inside (~0.6 us; several per submitted item)."""

    prefer = False  # jobs this thread queues wait for it (a helper)
    offers: list[Any] | None = None  # submit(): collect the jobs it starts
    helping_job = False  # running a job it took while waiting (quantum 1)
    host = False  # a host actor's thread
    key: object | None = None  # its key in clocks / _helpers, once it helped
    clock = 0  # its thread's CPU-time clock id


class ActorflowHost(pykka.ThreadingActor):
    """A pykka actor that runs jobs handed to it by its pool."""

    use_daemon_thread = False

    def __init__(self, pool: HostPool) -> None:
        super().__init__()
        self.pool = pool

    def on_start(self) -> None:
        self.pool._local.host = True  # (see HostPool._run_job)
        self.pool._register_thread(threading.current_thread(), self.actor_ref)

    def on_stop(self) -> None:
        self.pool._unregister_clock(self.actor_ref)

    def on_receive(self, message: Any) -> None:
        try:
            self.pool._work(self.actor_ref, message)
        except BaseException as exc:  # never let anything reach pykka
            self.pool._report_fatal(exc)


class HostPool:
    """An elastic pool of pykka host actors, scoped to one run.

    Example::

        pool = HostPool("r1", on_fatal=print)
        pool.schedule(segment)        # some host runs segment.run()
        pool.wait(future.done)        # the caller watches the pool while it waits
        pool.shutdown()               # stops and joins every host thread
    """

    def __init__(
        self,
        run_id: str,
        on_fatal: Callable[[BaseException], None],
        *,
        max_hosts: int = _DEFAULT_MAX_HOSTS,
        keep_idle: int = 2,
        stall_s: float = 0.002,
        pump_stall_s: float = 0.02,
        watcher_thread: bool = True,
        caller_runs: bool = False,
    ) -> None:
        self.run_id = run_id
        self.on_fatal = on_fatal
        self.max_hosts = max_hosts
        self.keep_idle = keep_idle
        self.stall_s = stall_s
        self.pump_stall_s = pump_stall_s
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.ready: deque[Job] = deque()
        self.idle: list[pykka.ActorRef[Any]] = []
        self.n_hosts = 0
        self.started_hosts = 0
        self.taken = 0  # jobs taken from the ready queue: progress, for the watcher
        self.threads: list[threading.Thread] = []
        self.clocks: dict[Any, int] = {}  # host actor ref -> its thread's CPU-time clock id
        self._retired: list[threading.Thread] = []  # retired hosts' threads, joined at shutdown
        self.closed = False
        self._use_watcher_thread = watcher_thread
        self._watcher: _Watcher | None = None
        # how long the watcher's current wait may last (0: it is not waiting): schedule()
        # wakes it when a job must not wait that long
        self._watch_timeout = 0.0
        self._linger_until = 0.0  # the watcher polls until then, even with nothing queued
        self._timers: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._starting = 0  # hosts being started right now (shutdown waits for them)
        self._timer_seq = 0
        self._refs: list[pykka.ActorRef[Any]] = []
        # caller-runs (``run()``): the thread in wait() runs queued jobs itself; no
        # host starts until a job waits while that thread is blocked in a task
        self._caller_runs = caller_runs
        self._caller_waiting = False  # the caller-runs thread sleeps in wait()
        # keys of the threads running a job they took while waiting (shutdown waits
        # for them), and the job each runs
        self._helpers: set[object] = set()
        self._helper_jobs: dict[object, Job] = {}
        # per thread: .prefer (jobs it queues wait for it to help), .key / .clock (its
        # CPU clock, registered in ``clocks`` while it runs a job)
        self._local = _PoolLocal()
        self._poked = False  # notify() was called: wait() re-checks its predicate

    # -- scheduling ------------------------------------------------------------
    def schedule(self, job: Job, *, to_host: bool = False) -> None:
        """Run ``job.run()`` on an idle host, or queue it for the next free one.

        A job queued by a thread that helps (``run()``'s caller, or a consumer
        of ``map`` / ``stream`` inside :meth:`helping`) waits for that thread,
        which runs it when it next waits for results; the watcher hands it to
        a host if it is still waiting after ``stall_s``. ``to_host``: never
        keep it for the calling thread.
        """
        spawn = False
        with self.lock:
            if self.closed:
                return
            # a job that mostly waits (a process chain's runner, unless it can be run
            # in rounds) is better run by a host while the helper consumes results. A
            # pump is kept for the helper, which runs it when it next waits for
            # results; if it waits for something else, help_one() has the watcher
            # hand the pump to a host
            prefer = not to_host and (
                self._caller_runs or (self._local.prefer and (job.helpable or job.pumped))
            )
            offers = self._local.offers
            if offers is not None and job.offerable and job.helpable and not prefer:
                job = _Offer(job)
                offers.append(job)
            if self.idle and not (prefer and not self._caller_runs):
                host = self.idle.pop()
            else:
                host = None
                self.ready.append(job)
                if prefer:
                    if self._caller_waiting:
                        self.cond.notify_all()  # the caller-runs thread takes it
                    elif self._helpers:
                        # a helper runs a job meanwhile and may block in it: the
                        # watcher must poll (it is not woken per job)
                        self._ensure_watching()
                elif self.n_hosts == 0:
                    spawn = True
                    self.n_hosts += 1
                    self._starting += 1
                elif self._use_watcher_thread and self._watcher is None:
                    self._start_watcher()
                elif self._watch_timeout > self.stall_s:
                    # the watcher sleeps (or polls slowly) only while nothing waits
                    self.cond.notify_all()
        if host is not None:
            host.tell(job)
        elif spawn:
            self._spawn_one()

    def _spawn_one(self) -> None:
        # n_hosts and _starting were already counted by the caller, under the lock
        ref = ActorflowHost.start(self)
        with self.lock:
            self._refs.append(ref)
            self.started_hosts += 1
            self._starting -= 1
            closed = self.closed
            job = self.ready.popleft() if self.ready and not closed else None
            if job is None and not closed:
                self.idle.append(ref)
            elif job is not None:
                self.taken += 1
            self.cond.notify_all()  # shutdown may wait for spawns in progress
        if job is not None:
            ref.tell(job)

    def _work(self, ref: pykka.ActorRef[Any], job: Job) -> None:
        while True:
            job.run()
            with self.lock:
                if self.ready and not self.closed:
                    job = self.ready.popleft()
                    self.taken += 1
                    continue
                if len(self.idle) >= self.keep_idle and not self.closed:
                    self.n_hosts -= 1  # retire: enough idle hosts already
                    retire = True
                    # forget it (the lists stay bounded); its thread is joined at shutdown
                    current = threading.current_thread()
                    if ref in self._refs:
                        self._refs.remove(ref)
                    if current in self.threads:
                        self.threads.remove(current)
                    self._retired = [t for t in self._retired if t.is_alive()]
                    self._retired.append(current)
                else:
                    self.idle.append(ref)
                    retire = False
            if retire:
                ref.stop(block=False)  # processed after this message: the thread then exits
            return

    # -- watching --------------------------------------------------------------
    def _busy_cpu(self) -> dict[Any, int]:
        """CPU time (ns) consumed so far by each host that is not idle."""
        idle = set(self.idle)
        out: dict[Any, int] = {}
        for ref, clock in list(self.clocks.items()):
            if ref in idle:
                continue
            try:
                out[ref] = time.clock_gettime_ns(clock)
            except OSError:  # the thread has exited
                pass
        return out

    def _mark(self) -> tuple[int, float, dict[Any, int]]:
        return self.taken, time.monotonic(), self._busy_cpu()

    def _watch_step(
        self, mark: tuple[int, float, dict[Any, int]]
    ) -> tuple[int, float, dict[Any, int]]:
        """Under the lock: start hosts if the backlog stalled; return the new progress mark.

        Stalled means: jobs are waiting, no host took one for ``stall_s``, and
        some busy host used under a quarter of that time on the CPU, so it is
        blocked (sleep, IO, a lock), not computing. A host that computes keeps
        its thread (more threads would not help it under the GIL); one host
        per blocked host is added, or one per waiting job when every busy
        host is blocked.
        """
        taken, now = self.taken, time.monotonic()
        if not self.ready or self.closed or taken != mark[0]:
            return self._mark()
        window = now - mark[1]
        if window < self._stall_limit():
            return mark  # keep measuring from the older mark
        if self.idle:
            # jobs a helper queued wait while hosts idle (the helper went off to run
            # its own code): hand them over
            self._hand_to_idle()
            if not self.ready:
                return self._mark()
        cpu = self._busy_cpu()
        before = mark[2]
        measured = [r for r in cpu if r in before]
        if not measured and cpu:
            # the busy threads started after the last mark: measure a full window first
            return self._mark()
        # nobody runs anything (queued jobs wait for a helper that went away), or
        # some busy threads are blocked in tasks
        blocked = [r for r in measured if cpu[r] - before[r] < window * 0.25e9]
        if not self._caller_runs:
            for r in blocked:
                job = self._helper_jobs.get(r)
                if job is not None:
                    # a consumer blocked in this job's task: from now on its work goes to
                    # hosts, and the consumer stays free to yield results
                    job.helpable = False
        if blocked or not cpu:
            every = len(blocked) == len(measured)
            if not cpu:
                want = 1  # nobody runs anything: one host drains the queue; then measure it
            else:
                want = len(self.ready) if every else len(blocked)
            n = min(want, self.max_hosts - self.n_hosts)
            if n > 0:
                self.n_hosts += n
                self._starting += n
                self.lock.release()
                try:
                    for _ in range(n):
                        self._spawn_one()
                finally:
                    self.lock.acquire()
        return self._mark()

    def _hand_to_idle(self) -> None:
        # under the lock (released to tell the hosts)
        handed = []
        while self.ready and self.idle:
            handed.append((self.idle.pop(), self.ready.popleft()))
            self.taken += 1
        self.lock.release()
        try:
            for host, job in handed:
                host.tell(job)
        finally:
            self.lock.acquire()

    def wait(self, predicate: Callable[[], bool]) -> None:
        """Block until ``predicate()`` is true, watching the pool meanwhile.

        The predicate is re-checked whenever the pool notifies (a host went
        idle, a job was queued) or ``notify()`` is called. In a caller-runs
        pool the waiting thread runs queued jobs itself; while it does, a
        watcher thread (started only when a second job waits) starts hosts if
        that thread blocks in a task.
        """
        with self.lock:
            mark: tuple[int, float, dict[Any, int]] | None = None
            while True:
                self._poked = False
                if predicate():
                    return
                if self._caller_runs:
                    # run queued jobs until none is left or notify() says the
                    # predicate may have changed (an item finished, a fatal error)
                    if self.ready and not self.closed and not self._poked:
                        self._run_in_caller()
                    if self._poked or (self.ready and not self.closed):
                        continue
                    mark = None  # the caller was busy: measure stalls afresh
                if self._watcher is not None:
                    # the watcher thread watches and fires timers; schedule() and
                    # notify() wake us
                    self._caller_waiting = True
                    try:
                        self.cond.wait()
                    finally:
                        self._caller_waiting = False
                    continue
                if mark is None:
                    mark = self._mark()
                self._caller_waiting = True
                try:
                    self._sleep_or_poll()
                finally:
                    self._caller_waiting = False
                mark = self._watch_step(mark)

    def _run_in_caller(self) -> None:
        # under the lock: run queued jobs in this (the waiting) thread until none is
        # left or notify() says the caller's predicate may have changed
        self._run_job(self.ready.popleft(), series=True)

    def _run_job(
        self,
        job: Job,
        *,
        series: bool = False,
        pump: tuple[Callable[[], bool], Any] | None = None,
        keep: bool = True,
    ) -> None:
        """Under the lock (released while jobs run): a waiting thread runs ``job``, then,
        with ``series``, the next queued jobs while there are any and nobody pokes.
        With ``pump`` (a consumer's ``(until, wake)``), a pumped job runs one round."""
        local = self._local
        key = local.key
        if key is None:
            key = local.key = object()
            local.clock = time.pthread_getcpuclockid(threading.get_ident())
        # a job's task may wait on this pool again (a future of its own graph): the
        # inner call leaves the outer one's registration in place; a host's thread is
        # measured as a host already
        nested = key in self._helpers or local.host
        outer_job = self._helper_jobs.get(key)
        if not nested:
            self.clocks[key] = local.clock  # the watcher measures this thread like a host
            self._helpers.add(key)
        prefer = local.prefer
        helping = local.helping_job
        local.prefer = keep  # jobs these queue wait for this thread, too
        local.helping_job = True  # a segment it runs yields after one batch (see quantum())
        ready = self.ready
        try:
            while True:
                self.taken += 1
                if ready or self._timers:
                    # others wait while this thread runs a job it may block in: someone
                    # must see a stall (and fire timers); the watcher polls while jobs wait
                    self._ensure_watching()
                self._helper_jobs[key] = job
                self.lock.release()
                try:
                    if pump is not None and job.pumped:
                        job.pump(*pump)
                    else:
                        job.run()
                except KeyboardInterrupt as exc:
                    # Ctrl-C lands in whatever this thread runs: it is re-raised here,
                    # so run() / the consumer's loop sees it; a started graph stops,
                    # as a segment may have been interrupted half-way
                    if not self._caller_runs:
                        self._report_fatal(exc)
                    raise
                except BaseException as exc:  # as a host does: a task's SystemExit ends it
                    self._report_fatal(exc)
                finally:
                    self.lock.acquire()
                if not (series and ready and not self._poked and not self.closed):
                    return
                job = ready.popleft()
        finally:
            local.prefer = prefer
            local.helping_job = helping
            if nested:
                if outer_job is not None:
                    self._helper_jobs[key] = outer_job
                else:
                    self._helper_jobs.pop(key, None)
            else:
                self._helpers.discard(key)
                self._helper_jobs.pop(key, None)
                del self.clocks[key]
            if self.closed:
                self.cond.notify_all()  # shutdown() waits for helpers to finish their job

    def offering(self, offers: list[Any] | None) -> list[Any] | None:
        """Collect in ``offers`` the jobs this thread queues (None: stop); return the
        list collected before, to restore it (a submit inside a submit)."""
        local = self._local
        before: list[Any] | None = local.offers
        local.offers = offers
        return before

    def take_offer(self, offer: Any) -> bool:
        """Run ``offer``'s job in this thread unless a host took it (then nothing
        happens); whether this thread went to run it.

        The job's segment runs one batch (see :meth:`quantum`), the oldest it
        holds; what it emits goes to hosts, not to this thread. Runs as a
        helper's job: the watcher sees this thread blocked in it as it sees a
        blocked host (and then leaves the node's work to hosts from there on).
        """
        with self.lock:
            if self.closed or not offer.box:
                return False
            try:
                self.ready.remove(offer)  # queued when no host was idle
            except ValueError:
                pass
            try:
                # the claim (box.pop) happens in offer.run(), inside the job run: a
                # job whose claim was taken is always run
                self._run_job(offer, keep=False)
            except BaseException:
                if offer.box and not self.closed:
                    # interrupted (Ctrl-C) before the claim: a host must run it
                    self.ready.appendleft(offer)
                    if self.idle:
                        self._hand_to_idle()
                    else:
                        self._ensure_watching()
                raise
        return True

    def is_helping(self) -> bool:
        """Whether this thread is a helper right now (see :meth:`helping`)."""
        return bool(self._local.prefer)

    def quantum(self, default: int) -> int:
        """How many batches a segment may run before requeueing itself: one when a
        consumer thread runs it (it must get back to yielding results soon)."""
        if not self._caller_runs and self._local.helping_job:
            return 1
        return default

    def help_one(self, pump: tuple[Callable[[], bool], Any] | None = None) -> bool:
        """Run one queued job that computes in its thread, if any; return whether one ran.

        A thread that waits for results (a consumer of ``map`` / ``stream``)
        calls it instead of sleeping, so the work it queued runs without a
        hand-off to another thread (a blocked helper is covered by the
        watcher, as a blocked host is). With ``pump`` = ``(until, wake)`` it
        may also run one round of a pumped job (a process node's runner),
        which returns once ``until()`` holds; ``wake`` must be signalled when
        ``until()`` may have become true.

        Example::

            while not results_ready():
                if not pool.help_one():
                    wait_for_results()
        """
        with self.lock:
            if self.closed:
                return False
            ready = self.ready
            for i, job in enumerate(ready):  # the head, nearly always
                if job.helpable or (pump is not None and job.pumped):
                    del ready[i]
                    self._run_job(job, pump=pump)
                    return True
            if ready:
                # only jobs this call may not run: a pump this thread queued, while it
                # waits for something else (room for its items): a host must take it
                self._ensure_watching()
        return False  # only jobs that mostly wait (process runners): hosts take them

    def helping(self, on: bool) -> None:
        """Mark this thread as a helper: jobs it queues wait for it (see :meth:`schedule`).

        Turning it off with jobs still queued lets the watcher hand them to
        hosts after ``stall_s`` (the thread goes off to run its own code).

        Example::

            pool.helping(True)
            try:
                ...  # queue work, then help_one() while waiting
            finally:
                pool.helping(False)
        """
        self._local.prefer = on
        if not on and self.ready:
            with self.lock:
                if self.ready and not self.closed:
                    self._ensure_watching()

    def notify(self) -> None:
        """Wake whoever waits in :meth:`wait` (e.g. an item completed)."""
        with self.lock:
            self._poked = True
            self.cond.notify_all()

    def _ensure_watching(self) -> None:
        # under the lock: jobs wait, so the watcher must run and poll often enough (it
        # sleeps without a timeout while nothing waits); only pumps may wait longer
        pumped = self._stall_limit() > self.stall_s
        if pumped:
            # a consumer queues its pump again after every round: keep the watcher
            # polling slowly for a while, rather than wake it for every round
            self._linger_until = time.monotonic() + _LINGER_S
        if self._watcher is None:
            self._start_watcher()
        elif self._watch_timeout > (self.pump_stall_s if pumped else self.stall_s):
            self.cond.notify_all()

    def _stall_limit(self) -> float:
        # under the lock: how long the queued jobs may wait before a host takes them
        for job in self.ready:
            if not job.pumped:
                return self.stall_s
        return self.pump_stall_s

    def _start_watcher(self) -> None:
        # under the lock; see _Watcher for why this is not a threading.Thread
        watcher = _Watcher()
        _thread.start_new_thread(self._watch_main, (watcher,))
        self._watcher = watcher  # only once it runs: shutdown() joins it

    def _watch_main(self, watcher: _Watcher) -> None:
        try:
            self._watch_loop()
        except BaseException as exc:  # nothing may escape a bare thread
            try:
                self._report_fatal(exc)
            except BaseException:
                pass
        finally:
            watcher.exited()

    def _watch_loop(self) -> None:
        with self.lock:
            mark = self._mark()
            named = False
            first = True
            while not self.closed:
                if not named and not (first and self.ready and not self._timers):
                    # about to live a while, fire timers or start hosts: register a
                    # named stand-in (listed by threading.enumerate(), so leak checks
                    # see it; named in log records). A watcher that only polls once
                    # during a short run() skips it: that costs ~0.08 ms there.
                    threading.current_thread().name = f"actorflow-supervisor-{self.run_id}"
                    named = True
                first = False
                self._sleep_or_poll()
                mark = self._watch_step(mark)

    def _sleep_or_poll(self) -> None:
        """Under the lock: poll every ``stall_s`` while jobs wait, else sleep until woken.

        Busy hosts alone need no watching: a stall is a job that waits. ``schedule``
        wakes a sleeping watcher when it queues a job; the stall window then counts
        from the last mark, so a host blocked all along is seen as blocked at once.
        Due timers fire here (outside the lock), so the watcher is the run's clock.
        """
        timeout: float | None = None
        if self.ready:
            timeout = self._stall_limit()
            self._linger_until = time.monotonic() + _LINGER_S
        elif self._linger_until and time.monotonic() < self._linger_until:
            # jobs waited a moment ago (a consumer that pumps a process node queues its
            # pump again after every round): keep polling slowly rather than be woken
            # for every round
            timeout = self.pump_stall_s
        if self._timers:
            until = self._timers[0][0] - time.monotonic()
            timeout = until if timeout is None else min(timeout, until)
        if timeout is None or timeout > 0:
            # schedule() wakes us when it queues a job that must not wait this long, or
            # a stall would go unseen until then
            self._watch_timeout = math.inf if timeout is None else timeout
            try:
                self.cond.wait(timeout)
            finally:
                self._watch_timeout = 0.0
        self._fire_timers()

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        """Call ``fn(*args)`` in the watcher after ``delay`` seconds (retries, timeouts).

        Example::

            pool.call_later(0.05, segment.retry, item)
        """
        with self.lock:
            if self.closed:
                return
            self._timer_seq += 1
            heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, fn, args))
            if self._watcher is None and (self._use_watcher_thread or self._helpers):
                self._start_watcher()
            self.cond.notify_all()  # the watcher recomputes its deadline

    def _fire_timers(self) -> None:
        # under the lock; callbacks run outside it (they take segment locks, then ours)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now and not self.closed:
            _, _, fn, args = heapq.heappop(self._timers)
            self.lock.release()
            try:
                fn(*args)
            except BaseException as exc:
                self._report_fatal(exc)
            finally:
                self.lock.acquire()

    # -- failures and shutdown ---------------------------------------------------
    def _register_thread(self, thread: threading.Thread, ref: Any) -> None:
        # called by the host thread itself: its clock id stays valid (or fails
        # cleanly with OSError) even after the thread exits
        clock = time.pthread_getcpuclockid(threading.get_ident())
        with self.lock:
            self.threads.append(thread)
            self.clocks[ref] = clock
            self.cond.notify_all()  # shutdown waits until every started host is here

    def _unregister_clock(self, ref: Any) -> None:
        with self.lock:
            self.clocks.pop(ref, None)

    def _report_fatal(self, exc: BaseException) -> None:
        try:
            self.on_fatal(exc)
        finally:
            self.notify()

    def cancel_queued(self) -> None:
        """Drop jobs nobody has started (``stop(drain=False)``)."""
        with self.lock:
            self.ready.clear()

    def shutdown(self) -> None:
        """Stop every host and the watcher; join their threads (none remains after)."""
        with self.lock:
            self.closed = True
            self.ready.clear()
            self._timers.clear()
            self.idle.clear()
            self.cond.notify_all()
            # hosts being started right now must be stopped and joined too, and
            # threads running a job they took while waiting (not this one) must be done
            me = self._local.key
            while (
                self._starting
                or len(self.threads) < len(self._refs)
                or any(k is not me for k in self._helpers)
            ):
                self.cond.wait()
            refs = list(self._refs)
            watcher = self._watcher
        for ref in refs:
            try:
                ref.stop(block=False)  # joined below, through its thread
            except pykka.ActorDeadError:
                pass
        if watcher is not None:
            watcher.join()
        current = threading.current_thread()
        for thread in [*self.threads, *self._retired]:
            if thread is not current:
                thread.join()

    # -- parallel map (af.map) ---------------------------------------------------
    def map_parallel(
        self, fn: Callable[[Any], Any], items: list[Any], parallelism: int, policy: Any = None
    ) -> list[tuple[bool, Any, int]]:
        """Call ``fn`` on every item, up to ``parallelism`` at once, on this pool's hosts.

        The calling host works through the items too, so the call finishes even
        when no other host is free. With a ``policy`` (a Task: ``retryable``,
        ``backoff``), a failed element is parked until its backoff delay has
        passed while runners serve other elements. Returns
        ``(ok, result_or_exception, attempts)`` per item, in order.
        """
        n = len(items)
        results: list[tuple[bool, Any, int]] = [(False, None, 0)] * n
        if n == 0:
            return results
        state = _MapState(fn, items, results, policy)
        for _ in range(min(parallelism, n) - 1):
            self.schedule(state)
        state.run()
        state.wait_idle()
        return results


class _Watcher:
    """Handle of the watcher thread: a bare ``_thread`` thread, joined through a lock.

    ``threading.Thread.start()`` waits until the new thread runs, and on a
    2-core VM that hand-off (with the join) cost 0.14 ms of a ~1 ms 15-node
    ``run()``; a bare thread starts without waiting. It is joined like any
    other thread of the run (no thread outlives it). Once it lives beyond its
    first poll (or fires timers), Python's stand-in ``_DummyThread`` for it,
    named ``actorflow-supervisor-<run id>``, is listed by
    ``threading.enumerate()``; it is dropped when the watcher exits. In a
    child forked meanwhile the thread does not exist: ``join()`` returns at
    once there.
    """

    __slots__ = ("_done", "_pid")

    def __init__(self) -> None:
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self._pid = os.getpid()

    def exited(self) -> None:
        """Called by the watcher thread as its last act."""
        ident = _thread.get_ident()
        active = getattr(threading, "_active", None)
        guard = getattr(threading, "_active_limbo_lock", None)
        dummy = getattr(threading, "_DummyThread", None)
        if active is not None and guard is not None and dummy is not None:
            with guard:
                if isinstance(active.get(ident), dummy):
                    del active[ident]
        self._done.release()

    def join(self) -> None:
        """Wait until the watcher thread has exited."""
        if os.getpid() != self._pid:
            return  # a forked child: the thread was not copied into it
        with self._done:
            pass


class _MapState:
    """Shared cursor over a parallel map's items; each runner takes the next ready element."""

    helpable = False  # its runners are there to run in parallel with the caller
    offerable = False
    pumped = False

    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: list[Any],
        results: list[tuple[bool, Any, int]],
        policy: Any,
    ) -> None:
        self.fn = fn
        self.items = items
        self.results = results
        self.policy = policy
        self.next = 0
        self.delayed: list[tuple[float, int, int]] = []  # (due, index, attempt)
        self.active = 0
        self.cond = threading.Condition()

    def _take(self) -> tuple[int, int] | None:
        # under cond: the next element to call, waiting for a parked retry if need be
        while True:
            if self.next < len(self.items):
                i = self.next
                self.next += 1
                return i, 1
            if not self.delayed:
                return None
            due, i, attempt = self.delayed[0]
            wait = due - time.monotonic()
            if wait <= 0:
                heapq.heappop(self.delayed)
                return i, attempt
            self.cond.wait(wait)

    def run(self) -> None:
        cond = self.cond
        with cond:
            self.active += 1
        try:
            while True:
                with cond:
                    taken = self._take()
                if taken is None:
                    return
                i, attempt = taken
                try:
                    self.results[i] = (True, self.fn(self.items[i]), attempt)
                except Exception as exc:
                    policy = self.policy
                    if policy is not None and policy.retryable(exc, attempt):
                        due = time.monotonic() + policy.backoff.jittered(attempt)
                        with cond:
                            heapq.heappush(self.delayed, (due, i, attempt + 1))
                            cond.notify_all()
                    else:
                        self.results[i] = (False, exc, attempt)
        finally:
            with cond:
                self.active -= 1
                cond.notify_all()

    def pump(self, until: Callable[[], bool] | None, wake: Any) -> None:
        self.run()  # not pumped: never called in rounds

    def wait_idle(self) -> None:
        with self.cond:
            while self.active or self.delayed:
                if self.delayed and not self.active:
                    # every runner left while a retry was parked: run it here
                    self.cond.release()
                    try:
                        self.run()
                    finally:
                        self.cond.acquire()
                    continue
                self.cond.wait()


class Deadlines:
    """Runs calls that have a timeout on daemon runner threads, abandoning late ones.

    A thread cannot be killed: a call over its timeout is abandoned (its
    runner thread is a daemon, left to finish on its own), the caller gets
    :class:`~actorflow.TaskTimeout`, and the late result is discarded and
    counted in ``late``. Runners that finished in time are reused; at
    shutdown idle runners are stopped and joined, abandoned ones are reported.

    Example::

        deadlines = Deadlines("r1")
        deadlines.call(lambda: fetch(url), 5.0, "fetch", item=3, attempt=1)
        deadlines.shutdown()
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.lock = threading.Lock()
        self.idle: list[_Runner] = []
        self.runners: list[_Runner] = []
        self.abandoned = 0
        self.late = 0  # late results discarded
        self.closed = False

    def call(
        self, thunk: Callable[[], Any], timeout: float, task: str, item: Any, attempt: int
    ) -> Any:
        """Return ``thunk()``, or raise TaskTimeout once ``timeout`` seconds have passed."""
        with self.lock:
            if self.closed:  # the run stopped: no new thread may start
                from actorflow.errors import ActorflowError

                raise ActorflowError(
                    f"task {task!r} (item {item!r}) was not called: its run was stopped"
                )
            runner = self.idle.pop() if self.idle else None
        if runner is None:
            runner = _Runner(self, f"actorflow-timeout-{self.run_id}-{len(self.runners)}")
            with self.lock:
                self.runners.append(runner)
        job = _TimedJob(thunk)
        runner.give(job)
        if job.done.wait(timeout):
            with self.lock:
                self.idle.append(runner)
            if job.error is not None:
                raise job.error
            return job.result
        with self.lock:
            job.abandoned = True
            self.abandoned += 1
            if not job.done.is_set():
                runner.abandon()
            else:  # finished at the last moment: keep the runner, drop the result
                self.late += 1
                self.idle.append(runner)
        from actorflow.errors import TaskTimeout

        raise TaskTimeout(
            f"task {task!r} (item {item!r}, attempt {attempt}) took longer than {timeout} s; "
            "the call was abandoned (a thread cannot be killed: it runs on until it returns, "
            "and its late result is discarded)"
        )

    def _late_result(self) -> None:
        with self.lock:
            self.late += 1

    def shutdown(self) -> int:
        """Stop and join idle runners; return how many abandoned threads are still running."""
        with self.lock:
            self.closed = True
            runners = list(self.runners)
        for r in runners:
            r.give(None)
        for r in runners:
            if not r.abandoned:
                r.thread.join()
        return sum(1 for r in runners if r.abandoned and r.thread.is_alive())


class _TimedJob:
    __slots__ = ("abandoned", "done", "error", "result", "thunk")

    def __init__(self, thunk: Callable[[], Any]) -> None:
        self.thunk = thunk
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False


class _Runner:
    """One daemon thread that runs timed calls one at a time."""

    def __init__(self, owner: Deadlines, name: str) -> None:
        self.owner = owner
        self.slot: deque[_TimedJob | None] = deque()
        self.ready = threading.Semaphore(0)
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def give(self, job: _TimedJob | None) -> None:
        self.slot.append(job)
        self.ready.release()

    def abandon(self) -> None:
        # under owner.lock: the runner exits after its current call
        self.abandoned = True

    def _loop(self) -> None:
        while True:
            self.ready.acquire()
            job = self.slot.popleft()
            if job is None:
                return
            try:
                job.result = job.thunk()
            except BaseException as exc:
                job.error = exc
            with self.owner.lock:
                job.done.set()
                if job.abandoned:
                    self.owner.late += 1
                if self.abandoned:
                    return
