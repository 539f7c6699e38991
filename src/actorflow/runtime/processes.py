"""Worker processes for ``executor="process"`` tasks: one shared, self-healing pool per run.

:class:`ProcessPool` is a standalone, thread-safe component: host threads call it,
it never calls them (except through ``on_event``). It owns no thread of its own;
the calling thread does all the waiting, on file descriptors, never with sleeps.

API::

    pool = ProcessPool(processes=2, name="run-1", on_event=handler)
    pool.register("score", [parse, score])          # a chain: item -> parse -> score
    pool.call_batch("score", items, timeout=5.0)    # -> [Ok | Err | Crashed | Timeout]
    pool.register_instances("rate", ErrorRate, n=4) # keyed stateful instances
    pool.call_instance("rate", 2, events)           # instance 2 lives on worker 2 % P
    pool.stats()                                    # per worker: pid, alive, tasks_done, ...
    pool.shutdown()                                 # stop and join every worker (idempotent)

Outcomes, one per item, in order:

- ``Ok(value)``: the chain ran to its end, or a function returned ``SKIP``
  (then ``value is SKIP``).
- ``Err(stage, error)``: ``fns[stage]`` raised; ``error`` is a :class:`RemoteError`
  computed in the worker (type name, message, traceback text, innermost user
  frame, locals reprs, pid, and the exception itself when it survives pickling).
  ``stage == -1``: the item never reached a function (its input could not be
  pickled or unpickled, or the chain could not be loaded in the worker). A result
  that cannot be pickled fails only its own item, with ``error_type ==
  "PicklingError"``.
- ``Crashed(description, exitcode, pid, alone)``: the item killed a worker while
  alone in its batch (``os._exit``, a segfault, the OOM killer, SIGKILL). Only if
  workers keep dying during start-up (``alone=False``) is the item not to blame.
- ``Timeout(seconds, pid)``: the item was still running ``timeout`` seconds after
  it started; its worker was killed (SIGTERM, then SIGKILL after a grace period).

Each of ``Err``, ``Crashed`` and ``Timeout`` turns into an :class:`actorflow.Failure`
with ``to_failure(task=..., item_id=..., run_id=..., attempt=...)``.

Design
------

*Processes.* Workers are started with ``forkserver`` (preloading this module) where
available, else ``spawn``; never plain ``fork`` (a fork of a threaded process can
deadlock, and it would leak every open descriptor into the worker). Each worker is a
long-lived process with two one-way pipes (requests in, results out) and a tiny
shared-memory progress record. Workers start lazily on first use of their slot, or
eagerly with :meth:`ProcessPool.start`. The parent's current stdout / stderr
descriptors are handed to each worker at start, so ``print`` in a task reaches the
parent's stdout even though a forkserver child descends from the forkserver.

*Protocol.* One request per batch, parent -> worker: ``(kind, batch_id, key,
version, code, index, timed, n, items)``. ``code`` is the cloudpickled chain (or
class), pickled once in the parent and sent to a worker only the first time that
worker sees this version of the key. ``items`` is normally ONE pickle of the whole
list ("bulk"): no per-item work on either side. If that pickle fails in the parent,
or the worker cannot unpickle it (it answers ``_RESEND``), the batch goes again as
per-item pickles ("loose"), so an item that does not travel fails alone. A chain
registered with a generated batch ``loop`` runs bulk batches through it (one call
per tick of the worker's ``_Ticker``, not per item per stage).

Results come back as chunks ``(batch_id, start, format, payload, errors, logs,
skips)`` (``skips``: per stage but the last, how many items it skipped): a bulk
chunk's payload is ``(count, kept_at, results)``, the results one pickle, with
the failures apart as ``(offset, encoded error)``. ``kept_at`` None: one result per
item (``SKIP`` included); else, from the generated loop, only the kept items'
results and their batch positions, so skipped items neither travel nor cost the
parent anything. If the results do not pickle as a whole, the chunk falls back to
per-item pickles and only the offending item fails. A fast batch returns in one
message; a slow one flushes whatever finished every ``_FLUSH_INTERVAL_S``, so that
results that returned before a death are kept. The protocol is strictly
request/response per worker (the worker reads a whole request before it writes
anything), so the two pipes cannot deadlock; task output goes to the inherited
stdout / stderr, not through the pipes.

*Logging.* Each worker's root logger has one handler, which keeps the records (the
message formatted, the exception as text, extra fields as reprs) and sends them
with the next result chunk; the parent hands them to its own loggers of the same
names (``logger.handle``), so the application's logging configuration applies to
them, with ``record.process`` the worker's pid. The worker's root level is the
parent root logger's effective level when the worker started; handlers that the
main module's import installed in the worker (a ``basicConfig()``) are removed.

*Death detection.* The calling thread blocks in
``multiprocessing.connection.wait([result_pipe, process.sentinel])``: a worker that
dies (SIGKILL, ``os._exit``, OOM) wakes it at once. Complete result messages still
in the pipe are drained first, then the worker is reaped and the slot restarted on
its next use (at once if items of the batch remain).

*Isolation.* Items of a batch that had not returned when its worker died are
re-sent ONE AT A TIME, in order, on the restarted worker of the same slot. Only an
item that kills a worker while alone gets ``Crashed``; the others complete normally.
The pool does not retry a ``Crashed`` item: charging attempts is the caller's job.
A worker whose progress record shows it never started the batch (it died during
start-up, or was killed while idle just before the batch was sent) blames no item:
the batch is sent again whole, up to three times in a row.

*Timeouts.* Before each item the worker writes ``(batch_id, position,
start_time)`` into shared memory (three doubles, no message). The waiting thread
sleeps in ``wait`` until the running item's deadline (re-reading the record at least
once per ``timeout``), then kills the worker only if the same item (same record) is
still running. The other unreturned items of the batch are re-sent together (they
are not suspects). Loading a chain in a worker (unpickling, imports) is not charged
to an item: it may take up to ``max(timeout, 30 s)``; a load that hangs longer gives
every item of the batch ``Timeout``.

*Keyed instances.* ``register_instances(key, cls, n)``: instance ``i`` is created
with ``cls()`` in worker ``i % processes`` on first use and keeps its state across
calls. A worker that dies, times out or is recycled loses its instances: reported
through ``on_event("instance_state_lost", {...})``; they are recreated empty on next
use.

*Recycling.* After a call, a worker that has run ``max_tasks_per_worker`` items or
whose RSS exceeds ``max_worker_rss_mb`` is stopped gracefully and replaced on next
use.

*Events* passed to ``on_event(name, data)`` (from the calling thread; exceptions
in the handler are logged and ignored): ``worker_started``, ``worker_died``,
``worker_timed_out``, ``worker_recycled``, ``instance_state_lost``.

*Locks.* ``_cond`` guards slot ownership (a call owns one slot, exclusively, for
its whole duration, re-sends included, so there is no hold-and-wait).
``_proc_lock`` serialises every operation on ``multiprocessing.Process`` objects
(start, poll, join, signals), which multiprocessing does not make thread-safe.

Limits: POSIX only (signals, fd passing). A task that runs in a worker and is killed
may have run partially (side effects happen at least once); results finished less
than ``_FLUSH_INTERVAL_S`` before a death are lost and recomputed. Functions are
pickled by reference when their module is importable, so that module must import in
the worker too; workers import the main module (``if __name__ == "__main__":``).
Output goes to the parent's stdout / stderr *descriptors* as they were when the
worker started (``capsys``-style Python-level redirection does not reach workers).
A per-logger level set in the parent is not mirrored in workers (only the root's).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import RawArray
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, overload

import cloudpickle
import psutil

from actorflow._markers import SKIP
from actorflow.errors import (
    ActorflowError,
    Failure,
    GraphError,
    TaskTimeout,
    WorkerCrashed,
    safe_repr,
)
from actorflow.observe.log import EventLog

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext

__all__ = [
    "Crashed",
    "Err",
    "Lease",
    "Ok",
    "Outcome",
    "PoolClosed",
    "ProcessPool",
    "RemoteError",
    "Timeout",
]

_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
_FLUSH_INTERVAL_S: Final = 0.05
_FLUSH_BYTES: Final = 4 * 1024 * 1024
_KILL_GRACE_S: Final = 1.0
_STOP_GRACE_S: Final = 5.0
_MAX_UNDELIVERED: Final = 3
_LOAD_GRACE_S: Final = 30.0  # loading code (imports) may take this long whatever the timeout
_LOADING: Final = -1  # progress position while a worker loads a chain / builds an instance

# parent -> worker request kinds; worker -> parent batch id 0 is the start-up hello
_RUN: Final = 1
_INSTANCE: Final = 2
_STOP: Final = 3
_STOP_MESSAGE: Final = pickle.dumps((_STOP,))
_HELLO_BATCH: Final = 0
# result chunk formats (worker -> parent)
_BULK: Final = 0  # the results themselves, one pickle; failures apart, by offset
_LOOSE: Final = 1  # one pickle per item (a tagged Ok / Err)
_RESEND: Final = 2  # the bulk items did not unpickle in the worker: send them one by one
_FLUSH_LOGS: Final = 1000  # send a chunk early once this many log records wait
_TICK_S: Final = _FLUSH_INTERVAL_S / 4  # a worker's ticker period (see _Ticker)
_TICK_IDLE_ROUNDS: Final = 80  # ticks without a batch before the ticker sleeps (~1 s)
# per-item result tags
_OK: Final = 0
_ERR: Final = 1


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class RemoteError:
    """An exception raised in a worker process, described there (frames cannot cross).

    ``exception`` is the exception object itself when it survives pickling both
    ways, else ``None``. ``file_path`` / ``line_number`` / ``function`` / ``locals``
    describe the innermost frame outside actorflow; ``locals`` maps names to safe,
    truncated reprs.

    Example::

        out = pool.call_batch("parse", ["{bad"])[0]
        if isinstance(out, Err):
            print(out.error.error_type, out.error.message, out.error.line_number)
    """

    error_type: str
    message: str
    traceback: str
    file_path: str | None
    line_number: int | None
    function: str | None
    locals: dict[str, str]
    pid: int
    thread: str
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    def __reduce__(self) -> tuple[Any, ...]:
        # the exception travels as separate bytes: if it cannot be rebuilt on the
        # other side, the record still arrives (with exception=None)
        return (
            _rebuild_remote_error,
            (
                self.error_type,
                self.message,
                self.traceback,
                self.file_path,
                self.line_number,
                self.function,
                self.locals,
                self.pid,
                self.thread,
                _dumps_or_none(self.exception),
            ),
        )

    def to_failure(
        self,
        *,
        task: str,
        item_id: Any,
        run_id: str,
        attempt: int = 1,
        inputs: tuple[Any, ...] = (),
    ) -> Failure:
        """Return the :class:`actorflow.Failure` for this error (``executor="process"``).

        Example::

            failure = out.error.to_failure(task="parse", item_id=7, run_id="r1")
        """
        return Failure(
            task=task,
            item_id=item_id,
            run_id=run_id,
            attempt=attempt,
            error_type=self.error_type,
            message=self.message,
            traceback=self.traceback,
            file_path=self.file_path,
            line_number=self.line_number,
            function=self.function,
            timestamp=time.time(),
            inputs=tuple(safe_repr(v) for v in inputs),
            locals=dict(self.locals),
            pid=self.pid,
            thread=self.thread,
            executor="process",
            _exception=self.exception,
        )


def _rebuild_remote_error(
    error_type: str,
    message: str,
    traceback_text: str,
    file_path: str | None,
    line_number: int | None,
    function: str | None,
    local_reprs: dict[str, str],
    pid: int,
    thread: str,
    exc_bytes: bytes | None,
) -> RemoteError:
    exception = None
    if exc_bytes is not None:
        try:
            exception = pickle.loads(exc_bytes)
        except Exception:
            exception = None
    return RemoteError(
        error_type,
        message,
        traceback_text,
        file_path,
        line_number,
        function,
        local_reprs,
        pid,
        thread,
        exception if isinstance(exception, BaseException) else None,
    )


def _dumps_or_none(value: Any) -> bytes | None:
    if value is None:
        return None
    for dumps in (pickle.dumps, cloudpickle.dumps):
        try:
            data: bytes = dumps(value, protocol=_PROTOCOL)
            return data
        except Exception:
            continue
    return None


@dataclass(frozen=True, slots=True)
class Ok:
    """The chain ran for this item; ``value`` is its result (possibly ``SKIP``).

    Example::

        [Ok(2), Ok(4)] == pool.call_batch("double", [1, 2])
    """

    value: Any


@dataclass(frozen=True, slots=True)
class Err:
    """``fns[stage]`` raised (``stage == -1``: the item never reached a function).

    Example::

        out = pool.call_batch("parse", ["{bad"])[0]
        if isinstance(out, Err):
            failure = out.to_failure(task="parse", item_id=1, run_id="r1")
    """

    stage: int
    error: RemoteError

    def to_failure(
        self,
        *,
        task: str,
        item_id: Any,
        run_id: str,
        attempt: int = 1,
        inputs: tuple[Any, ...] = (),
    ) -> Failure:
        """Return the :class:`actorflow.Failure` for this item.

        Example::

            failure = err.to_failure(task="parse", item_id=1, run_id="r1", attempt=2)
        """
        return self.error.to_failure(
            task=task, item_id=item_id, run_id=run_id, attempt=attempt, inputs=inputs
        )


@dataclass(frozen=True, slots=True)
class Crashed:
    """This item killed a worker process while it was alone in its batch.

    ``description`` says how (``"was killed by SIGKILL"``, ``"exited with code
    3"``); ``exitcode`` is the process exit code (negative: the signal number).
    ``alone`` is ``False`` in the one case where the item is not to blame: worker
    processes kept dying during start-up, before they could run anything.

    Example::

        out = pool.call_batch("native", [bad_input])[0]
        if isinstance(out, Crashed):
            print(out.description, out.exitcode)
    """

    description: str
    exitcode: int | None
    pid: int | None
    alone: bool = True

    def to_failure(
        self,
        *,
        task: str,
        item_id: Any,
        run_id: str,
        attempt: int = 1,
        inputs: tuple[Any, ...] = (),
    ) -> Failure:
        """Return an ``af.WorkerCrashed`` :class:`actorflow.Failure` for this item.

        Example::

            failure = crashed.to_failure(task="native", item_id=3, run_id="r1")
        """
        message = f"worker process {self.pid} {self.description}"
        if self.alone:
            message += (
                " while running this item alone: the item kills the process that runs it "
                "(os._exit, a crash in native code, or out of memory)"
            )
        return _synthetic_failure(
            WorkerCrashed(message), task, item_id, run_id, attempt, inputs, self.pid
        )


@dataclass(frozen=True, slots=True)
class Timeout:
    """This item was still running ``seconds`` after it started; its worker was killed.

    Example::

        out = pool.call_batch("slow", [x], timeout=2.0)[0]
        if isinstance(out, Timeout):
            print(f"gave up after {out.seconds} s")
    """

    seconds: float
    pid: int | None

    def to_failure(
        self,
        *,
        task: str,
        item_id: Any,
        run_id: str,
        attempt: int = 1,
        inputs: tuple[Any, ...] = (),
    ) -> Failure:
        """Return an ``af.TaskTimeout`` :class:`actorflow.Failure` for this item.

        Example::

            failure = timeout.to_failure(task="slow", item_id=3, run_id="r1")
        """
        message = (
            f"task {task!r} did not finish within {self.seconds:g} s; its worker process "
            f"{self.pid} was killed and restarted"
        )
        return _synthetic_failure(
            TaskTimeout(message), task, item_id, run_id, attempt, inputs, self.pid
        )


Outcome: TypeAlias = Ok | Err | Crashed | Timeout
"""What :meth:`ProcessPool.call_batch` returns for each item."""


def _synthetic_failure(
    exc: BaseException,
    task: str,
    item_id: Any,
    run_id: str,
    attempt: int,
    inputs: tuple[Any, ...],
    pid: int | None,
) -> Failure:
    return Failure(
        task=task,
        item_id=item_id,
        run_id=run_id,
        attempt=attempt,
        error_type=type(exc).__name__,
        message=str(exc),
        traceback=f"{type(exc).__name__}: {exc}\n",
        file_path=None,
        line_number=None,
        function=None,
        timestamp=time.time(),
        inputs=tuple(safe_repr(v) for v in inputs),
        locals={},
        pid=pid if pid is not None else 0,
        thread="",
        executor="process",
        _exception=exc,
    )


class PoolClosed(ActorflowError):
    """The process pool was shut down; no more calls are accepted.

    Raised by calls made after :meth:`ProcessPool.shutdown`, and by calls in
    flight when ``shutdown(kill=True)`` kills their worker.

    Example::

        pool.shutdown()
        pool.call_batch("score", [1])   # PoolClosed: process pool 'run' is shut down
    """


# --------------------------------------------------------------------------- worker side


def _code_location(fn: Any) -> tuple[str | None, int | None, str | None]:
    while isinstance(fn, functools.partial):  # a bound task: the function it runs
        fn = fn.args[0] if getattr(fn.func, "af_stage", False) and fn.args else fn.func
    code = getattr(fn, "__code__", None)
    if code is None:  # a callable object: describe its class's __call__
        code = getattr(type(fn).__dict__.get("__call__"), "__code__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    if code is None:
        return None, None, name
    return code.co_filename, code.co_firstlineno, name


def _pickling_error(what: str, exc: BaseException, fn: Any) -> RemoteError:
    message = f"{what}: {type(exc).__name__}: {exc}"
    file_path, line_number, function = _code_location(fn) if fn is not None else (None,) * 3
    return RemoteError(
        error_type="PicklingError",
        message=message,
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        file_path=file_path,
        line_number=line_number,
        function=function,
        locals={},
        pid=os.getpid(),
        thread=threading.current_thread().name,
        exception=pickle.PicklingError(message),
    )


def _capture(exc: BaseException) -> RemoteError:
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        exc = exc.with_traceback(tb.tb_next)  # drop the worker loop's own frame
    failure = Failure.capture(exc, task="", item_id=None, run_id="", executor="process")
    return RemoteError(
        error_type=failure.error_type,
        message=failure.message,
        traceback=failure.traceback,
        file_path=failure.file_path,
        line_number=failure.line_number,
        function=failure.function,
        locals=failure.locals,
        pid=failure.pid,
        thread=failure.thread,
        exception=failure.exception(),
    )


def _encode_err(stage: int, error: RemoteError) -> bytes:
    return pickle.dumps((_ERR, stage, error), protocol=_PROTOCOL)


def _encode_ok(value: Any, stage: int, fn: Any) -> bytes:
    try:
        return pickle.dumps((_OK, stage, value), protocol=_PROTOCOL)
    except Exception:
        pass
    try:
        data: bytes = cloudpickle.dumps((_OK, stage, value), protocol=_PROTOCOL)
        return data
    except Exception as exc:
        error = _pickling_error(
            f"the result of {_code_location(fn)[2]!r} ({type(value).__name__}) could not be "
            "pickled to return it from the worker process; return plain data (or build the "
            "object in the next step), or use executor='thread'",
            exc,
            fn,
        )
        return _encode_err(stage, error)


def _adopt_stdio(fds: tuple[int | None, int | None]) -> None:
    """Point this worker's fds 1 and 2 at the parent's stdout / stderr."""
    received = [fd for fd in fds if fd is not None]
    for fd, target in zip(fds, (1, 2), strict=True):
        if fd is not None and fd != target:
            with contextlib.suppress(OSError):
                os.dup2(fd, target)
    for fd in set(received):
        if fd > 2:
            with contextlib.suppress(OSError):
                os.close(fd)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()


@dataclass(frozen=True, slots=True)
class _LoadFailed:
    """The code of a key could not be loaded (or an instance not built) in this worker."""

    error: RemoteError
    stage: int = -1


_LOG_FIELDS: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_PLAIN: Final = frozenset({str, int, float, bool, type(None)})


class _LogForwarder(logging.Handler):
    """The worker's only root handler: keeps records to send with the next result chunk.

    A record travels as a plain dict: its message is formatted here (``args`` cannot
    be trusted to pickle), its exception as text, extra fields as reprs unless plain.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            data["msg"] = record.getMessage()
            data["args"] = None
            if record.exc_info and not record.exc_text:
                data["exc_text"] = self._formatter.formatException(record.exc_info)
            data["exc_info"] = None
            for name, value in data.items():
                if name not in _LOG_FIELDS and type(value) not in _PLAIN:
                    data[name] = safe_repr(value, 200)
            self.records.append(data)
        except Exception:
            self.handleError(record)

    def take(self) -> list[dict[str, Any]] | None:
        if not self.records:
            return None
        records, self.records = self.records, []
        return records


def _forward_logs(level: int) -> _LogForwarder:
    """Route every ``logging`` record of this worker to the parent (at ``level`` and up)."""
    forwarder = _LogForwarder()
    root = logging.getLogger()
    for handler in list(root.handlers):  # e.g. a basicConfig() run by the imported main module
        root.removeHandler(handler)
    root.addHandler(forwarder)
    root.setLevel(level)
    return forwarder


def _chunk(
    batch_id: int,
    start: int,
    fmt: int,
    payload: Any,
    errors: list[tuple[int, bytes]] | None,
    logs: list[dict[str, Any]] | None,
    skips: list[int] | None = None,
) -> bytes:
    """One result message; log records that do not pickle are dropped, never fatal.
    ``skips``: per stage before the last, how many of the chunk's items it skipped
    (None when none did)."""
    if skips is not None and not any(skips):
        skips = None
    try:
        return pickle.dumps(
            (batch_id, start, fmt, payload, errors, logs, skips), protocol=_PROTOCOL
        )
    except Exception:
        if logs is None:
            raise
        return pickle.dumps(
            (batch_id, start, fmt, payload, errors, None, skips), protocol=_PROTOCOL
        )


class _Ticker:
    """A worker's clock for the generated batch loop: a daemon thread that sets
    ``tick[0]`` every ``_TICK_S`` while a batch runs.

    The loop reads the flag after each item (a list lookup, ~free) where reading
    ``time.monotonic()`` cost ~0.1 us per item (~3% of a quick item such as a JSON
    parse); it returns when the flag is set, and the caller compares the clock with
    its flush deadline. Slow items so still flush at most ``_TICK_S`` after the
    deadline (plus the interpreter's switch interval, 5 ms, for the ticker to get
    the GIL). After ``_TICK_IDLE_ROUNDS`` ticks without a batch the ticker sleeps
    until the next batch starts (an idle worker does not wake 80 times a second).

    The handshake needs no lock: ``begin`` sets ``running`` and then reads
    ``asleep``; the ticker sets ``asleep`` and then reads ``running`` before it
    waits. Under the GIL one of the two sees the other's write, so a batch never
    runs with the ticker asleep (at worst the ticker wakes once for nothing).

    Example (inside a worker)::

        ticker = _Ticker.start()
        ticker.begin()
        pos = loop(items, out, kept_at, err, ticker.tick, pos, skips)  # returns soon after a tick
        ticker.end()
        ticker.close()  # the thread ends within _TICK_S
    """

    __slots__ = ("asleep", "closed", "running", "thread", "tick", "wake")

    def __init__(self) -> None:
        self.tick = [False]
        self.running = False
        self.asleep = False
        self.closed = False
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="actorflow-ticker", daemon=True)

    @classmethod
    def start(cls) -> _Ticker:
        ticker = cls()
        try:
            ticker.thread.start()
        except RuntimeError:
            # the process cannot start another thread: no ticks, so a batch's results
            # are sent when it ends instead of every _FLUSH_INTERVAL_S; nothing fails
            pass
        return ticker

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    def begin(self) -> None:
        self.tick[0] = False
        self.running = True
        if self.asleep:
            self.wake.set()

    def end(self) -> None:
        self.running = False

    def _run(self) -> None:
        idle = _TICK_IDLE_ROUNDS  # a fresh worker has no batch yet: sleep first
        while not self.closed:
            if idle >= _TICK_IDLE_ROUNDS:
                self.asleep = True
                if not self.running:
                    self.wake.wait()
                    self.wake.clear()
                self.asleep = False
                idle = 0
            time.sleep(_TICK_S)
            if self.running:
                self.tick[0] = True
                idle = 0
            else:
                idle += 1


class _Worker:
    """The loop of one worker process: load code, run batches, send results in chunks.

    Requests are ``(kind, batch_id, key, version, code, index, timed, fused, n,
    items)``; ``items`` is one pickle of the list of items ("bulk", the fast path)
    or a list of per-item pickles ("loose": one unpicklable item fails alone).
    Result chunks are ``(batch_id, start, format, payload, errors, log_records,
    skips)`` (``skips``: per stage but the last, the items it skipped, or None):
    a bulk chunk's payload is ``(count, kept_at, results)``, the results one
    pickle (all ``count`` of them when ``kept_at`` is None, else only the kept
    ones, ``kept_at`` their batch positions), ``errors`` the encoded failures by
    offset; a loose chunk's payload is a list of per-item pickles.
    """

    def __init__(
        self, inbox: Connection, outbox: Connection, progress: Any, logs: _LogForwarder
    ) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self.progress = progress
        self.logs = logs
        self.chains: dict[str, tuple[int, Any]] = {}
        self.factories: dict[str, tuple[int, Any]] = {}
        self.instances: dict[tuple[str, int], tuple[int, Any]] = {}
        self.ticker: _Ticker | None = None  # started with the first generated loop

    def serve(self) -> None:
        self._send(_HELLO_BATCH, 0, _LOOSE, [pickle.dumps(os.getpid())], None)
        while True:
            try:
                msg = pickle.loads(_recv_frame(self.inbox))
            except (EOFError, OSError):
                return  # the parent closed the pipe or died
            kind = msg[0]
            if kind == _STOP:
                return
            _, batch_id, key, version, code, index, timed, fused, n, items = msg
            self._mark(batch_id, _LOADING)  # a load that hangs is bounded too
            if kind == _RUN:
                target = self._load(self.chains, key, version, code)
            else:
                target = self._instance(key, version, code, index)
                if not isinstance(target, _LoadFailed):
                    target = ([target], None)
            if isinstance(target, _LoadFailed):
                self._fail_all(batch_id, n, target)
            elif type(items) is bytes:
                fns, loop = target
                if loop is not None and fused and not timed:
                    self._run_loop(batch_id, fns, loop, items)
                else:
                    self._run_bulk(batch_id, fns, items, timed)
            else:
                self._run_loose(batch_id, target[0], items, timed)

    def _mark(self, batch_id: int, position: int) -> None:
        # start time first, batch id last: the parent trusts a record only when it
        # reads the same three values before and after a full wait
        self.progress[2] = time.monotonic()
        self.progress[1] = float(position)
        self.progress[0] = float(batch_id)

    def _load(
        self, cache: dict[str, tuple[int, Any]], key: str, version: int, code: bytes | None
    ) -> Any:
        """The unpickled chain / factory, or a :class:`_LoadFailed` saying why not."""
        if code is not None:
            try:
                cache[key] = (version, pickle.loads(code))
            except BaseException as exc:
                cache[key] = (version, _LoadFailed(_capture(exc)))
        cached = cache.get(key)
        if cached is None or cached[0] != version:
            return _LoadFailed(_describe(RuntimeError(f"{key!r} v{version} was never sent")))
        return cached[1]

    def _instance(self, key: str, version: int, code: bytes | None, index: int) -> Any:
        factory = self._load(self.factories, key, version, code)
        if isinstance(factory, _LoadFailed):
            return factory
        current = self.instances.get((key, index))
        if current is not None and current[0] == version:
            return current[1]
        try:
            instance = factory()
        except BaseException as exc:
            return _LoadFailed(_capture(exc), stage=0)
        self.instances[(key, index)] = (version, instance)
        return instance

    def _fail_all(self, batch_id: int, n: int, failed: _LoadFailed) -> None:
        data = _encode_err(failed.stage, failed.error)
        self._send(batch_id, 0, _LOOSE, [data] * n, None)

    def _send(
        self,
        batch_id: int,
        start: int,
        fmt: int,
        payload: list[Any] | None,
        errors: list[tuple[int, bytes]] | None,
        skips: list[int] | None = None,
    ) -> None:
        _flush_stdio()  # output printed by these items reaches stdout before they return
        logs = self.logs.take()
        _send_frame(self.outbox, _chunk(batch_id, start, fmt, payload, errors, logs, skips))

    def _send_bulk(
        self,
        batch_id: int,
        start: int,
        count: int,
        results: list[Any],
        kept_at: list[int] | None,
        errors: list[tuple[int, bytes]],
        fns: list[Any],
        skips: list[int],
    ) -> None:
        """Send the results of items ``start .. start + count - 1`` of a batch.

        ``kept_at`` None: ``results`` holds one value per item (a failed item's is
        a placeholder). Else only the kept items' values, ``kept_at`` their batch
        positions: the others were skipped or failed (then in ``errors``).
        """
        logs = self.logs.take()
        _flush_stdio()
        if kept_at is not None and len(results) == count:
            kept_at = None  # every item kept: the positions say nothing
        try:
            # nested: a result the parent cannot unpickle spoils only this payload
            payload: Any = (count, kept_at, pickle.dumps(results, protocol=_PROTOCOL))
            fmt = _BULK
        except Exception:
            # a result does not pickle: encode item by item, so only that item fails
            if kept_at is not None:
                dense: list[Any] = [SKIP] * count
                for position, value in zip(kept_at, results, strict=True):
                    dense[position - start] = value
                results = dense
            failed = dict(errors)
            payload = [
                failed[offset] if offset in failed else _encode_ok(value, len(fns) - 1, fns[-1])
                for offset, value in enumerate(results)
            ]
            fmt, errors = _LOOSE, []
        _send_frame(self.outbox, _chunk(batch_id, start, fmt, payload, errors or None, logs, skips))

    def _due(self, last_flush: float, pending: int) -> bool:
        return (
            time.monotonic() - last_flush >= _FLUSH_INTERVAL_S
            or pending >= _FLUSH_BYTES
            or len(self.logs.records) >= _FLUSH_LOGS
        )

    def _run_bulk(self, batch_id: int, fns: list[Any], blob: bytes, timed: bool) -> None:
        try:
            items = pickle.loads(blob)
        except BaseException:
            # an item does not unpickle here: ask for the batch item by item
            self._send(batch_id, 0, _RESEND, None, None)
            return
        skip, clock, logs = SKIP, time.monotonic, self.logs
        last = len(fns) - 1
        results: list[Any] = []
        errors: list[tuple[int, bytes]] = []
        skips = [0] * last
        start = 0
        last_flush = clock()
        for position, item in enumerate(items):
            if timed:
                self._mark(batch_id, position)
            stage = 0
            value = item
            try:
                for fn in fns:
                    value = fn(value)
                    if value is skip:
                        if stage < last:
                            skips[stage] += 1
                        break
                    stage += 1
            except BaseException as exc:
                errors.append((position - start, _encode_err(stage, _capture(exc))))
                value = None
            results.append(value)
            if clock() - last_flush >= _FLUSH_INTERVAL_S or len(logs.records) >= _FLUSH_LOGS:
                self._send_bulk(batch_id, start, len(results), results, None, errors, fns, skips)
                start, results, errors, last_flush = position + 1, [], [], clock()
                skips = [0] * last
        if results:
            self._send_bulk(batch_id, start, len(results), results, None, errors, fns, skips)
        else:
            _flush_stdio()

    def _run_loop(self, batch_id: int, fns: list[Any], loop: Any, blob: bytes) -> None:
        """Bulk items through the chain's generated batch loop.

        The loop shares one iterator over the items across calls and returns
        at the first failure or soon after a tick of the worker's :class:`_Ticker`;
        results are flushed once ``_FLUSH_INTERVAL_S`` has passed, so slow items
        still flush about every ``_FLUSH_INTERVAL_S`` and quick ones cost one
        loop call per tick. Only kept results travel, with their positions
        (W2 skips 80% of its items: the parent never touches those).
        """
        try:
            items = pickle.loads(blob)
        except BaseException:
            self._send(batch_id, 0, _RESEND, None, None)
            return
        ticker = self.ticker
        if ticker is None:
            ticker = self.ticker = _Ticker.start()
        clock, logs, tick = time.monotonic, self.logs, ticker.tick
        n = len(items)
        it = iter(items)
        results: list[Any] = []
        kept_at: list[int] = []
        errors: list[tuple[int, bytes]] = []
        err: list[tuple[int, BaseException]] = []
        skips = [0] * (len(fns) - 1)
        base = pos = 0  # base: the position of the chunk's first item
        last_flush = clock()
        ticker.begin()
        try:
            while pos < n:
                pos = loop(it, results, kept_at, err, tick, pos, skips)
                tick[0] = False
                if err:
                    stage, exc = err.pop()
                    errors.append((pos - 1 - base, _encode_err(stage, _capture(exc))))
                if clock() - last_flush >= _FLUSH_INTERVAL_S or len(logs.records) >= _FLUSH_LOGS:
                    self._send_bulk(
                        batch_id, base, pos - base, results, kept_at, errors, fns, skips
                    )
                    base, results, kept_at, errors, last_flush = pos, [], [], [], clock()
                    skips = [0] * (len(fns) - 1)
        finally:
            ticker.end()
        if pos > base:
            self._send_bulk(batch_id, base, pos - base, results, kept_at, errors, fns, skips)
        else:
            _flush_stdio()

    def _run_loose(self, batch_id: int, fns: list[Any], items: list[bytes], timed: bool) -> None:
        results: list[bytes] = []
        skips = [0] * (len(fns) - 1)
        start = 0
        pending = 0
        last_flush = time.monotonic()
        for position, payload in enumerate(items):
            if timed:
                self._mark(batch_id, position)
            data = self._run_one(fns, payload, skips)
            results.append(data)
            pending += len(data)
            if self._due(last_flush, pending):
                self._send(batch_id, start, _LOOSE, results, None, skips)
                start, results, pending, last_flush = position + 1, [], 0, time.monotonic()
                skips = [0] * (len(fns) - 1)
        if results:
            self._send(batch_id, start, _LOOSE, results, None, skips)
        else:
            _flush_stdio()

    @staticmethod
    def _run_one(fns: list[Any], payload: bytes, skips: list[int]) -> bytes:
        try:
            value = pickle.loads(payload)
        except BaseException as exc:
            return _encode_err(-1, _capture(exc))
        stage = 0
        for stage, fn in enumerate(fns):
            try:
                value = fn(value)
            except BaseException as exc:
                return _encode_err(stage, _capture(exc))
            if value is SKIP:
                if stage < len(skips):
                    skips[stage] += 1
                break
        return _encode_ok(value, stage, fns[stage])


def _describe(exc: BaseException) -> RemoteError:
    """A record for an exception that has no traceback (built, not raised)."""
    try:
        raise exc
    except BaseException as raised:
        return _capture(raised)


def _worker_main(
    inbox: Connection,
    outbox: Connection,
    progress: Any,
    stdio: tuple[int | None, int | None],
    log_level: int = logging.WARNING,
) -> None:
    """Entry point of a worker process (importable by name: spawn / forkserver)."""
    # Ctrl-C reaches the whole process group: the parent decides how to stop workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _adopt_stdio(stdio)
    logs = _forward_logs(log_level)
    try:
        _Worker(inbox, outbox, progress, logs).serve()
    except (BrokenPipeError, EOFError, ConnectionError):
        pass  # the parent went away
    finally:
        _flush_stdio()


class _InheritedFd:
    """Pickles as a descriptor duplicated into the child being started."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_detach_fd, (reduction.DupFd(self.fd),))


def _detach_fd(dup: Any) -> int:
    return int(dup.detach())


def _stdio_handles() -> tuple[_InheritedFd | None, _InheritedFd | None]:
    handles: list[_InheritedFd | None] = []
    for fd in (1, 2):
        try:
            os.fstat(fd)
            handles.append(_InheritedFd(fd))
        except OSError:
            handles.append(None)
    return handles[0], handles[1]


# --------------------------------------------------------------------------- parent side


@dataclass(frozen=True, slots=True)
class _Code:
    version: int
    payload: bytes
    stages: int
    n: int = 0  # number of instances (class registrations)


@dataclass(frozen=True, slots=True)
class _Target:
    kind: int
    key: str
    code: _Code
    index: int = -1
    code_key: str = field(init=False)  # what a worker caches the code under

    def __post_init__(self) -> None:
        object.__setattr__(self, "code_key", f"{self.kind}:{self.key}")


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_NOT_BACK: Final = _Marker("<not back>")  # an item whose result has not arrived
_FAILED: Final = _Marker("<failed>")  # an item whose outcome is in the failures
_REDO: Final = _Marker("<redo>")  # ran, but its result did not unpickle here: run it alone


class _Exchange:
    """One request and its results: ``back[position]`` is a result, ``_NOT_BACK`` or
    ``_FAILED`` (then ``fails[position]`` says how). A plain class whose defaults
    live on the class: one is made per batch, and only two fields vary then."""

    fate: Literal["done", "died", "timeout", "undelivered", "resend"] = "done"
    count = 0
    position = -1
    redo: tuple[int, ...] = ()  # results the parent could not unpickle
    kept: list[Any] | None = None  # a clean whole batch's results without the skipped
    skips: list[int] | None = None  # per stage before the last: the items it skipped
    description = ""
    exitcode: int | None = None
    pid: int | None = None

    def __init__(self, back: list[Any], fails: dict[int, Outcome]) -> None:
        self.back = back
        self.fails = fails


def _add_skips(into: list[int] | None, more: list[int]) -> list[int]:
    """Per-stage skip counts ``into`` plus ``more`` (``into`` may be None)."""
    if into is None:
        return list(more)
    if len(into) < len(more):
        into.extend([0] * (len(more) - len(into)))
    for k, c in enumerate(more):
        into[k] += c
    return into


class _Batch:
    """The items of one call, their results, and how they are sent.

    First as one pickle of the whole list ("bulk"): no per-item cost on either
    side. If that pickle fails here (or the worker cannot unpickle it), item by
    item ("loose"): an item that does not pickle fails alone, with a clear error.
    """

    __slots__ = ("bulk", "items", "loose", "skips", "values")

    def __init__(self, items: Sequence[Any]) -> None:
        self.items: list[Any] = items if type(items) is list else list(items)
        self.values: list[Any] = [_NOT_BACK] * len(self.items)
        self.bulk = True
        self.loose: list[bytes | None] | None = None
        self.skips: list[int] | None = None  # per stage before the last: items it skipped

    def encode(
        self, group: Sequence[int], fails: dict[int, Outcome]
    ) -> tuple[Sequence[int], bytes | list[bytes]] | None:
        """``(group, data)`` to send, the unpicklable items left out (failed), or None."""
        items = self.items
        if self.bulk:
            whole = type(group) is range and len(group) == len(items)
            try:
                chosen = items if whole else [items[i] for i in group]
                return group, pickle.dumps(chosen, protocol=_PROTOCOL)
            except Exception:
                self.bulk = False
        loose = self.loose
        if loose is None:
            loose = self.loose = [self._encode_one(i, fails) for i in range(len(items))]
        kept = [i for i in group if loose[i] is not None]
        if not kept:
            return None
        return kept, [p for p in (loose[i] for i in kept) if p is not None]

    def _encode_one(self, i: int, fails: dict[int, Outcome]) -> bytes | None:
        item = self.items[i]
        try:
            return pickle.dumps(item, protocol=_PROTOCOL)
        except Exception:
            pass
        try:
            data: bytes = cloudpickle.dumps(item, protocol=_PROTOCOL)
            return data
        except Exception as exc:
            what = (
                f"the input ({type(item).__name__}) could not be pickled to send it to a "
                "worker process; pass plain data, or use executor='thread'"
            )
            fails[i] = Err(-1, _pickling_error(what, exc, None))
            self.values[i] = _FAILED
            return None


_MAX_POLL_S = 2_000_000.0  # poll() takes an int of milliseconds: longer is for ever


class _Slot:
    """One worker position; its process is replaced when it dies or is recycled.

    Owned by the thread that holds it (``busy``), except for ``_proc_lock``-guarded
    reads by ``stats`` and signals sent by ``shutdown(kill=True)``.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.busy = False
        self.process: BaseProcess | None = None
        self.pid: int | None = None
        self.to_worker: Connection | None = None
        self.from_worker: Connection | None = None
        self.ready = False
        self.progress: Any = RawArray("d", 3)
        self.loaded: dict[str, int] = {}
        self.instances: set[tuple[str, int]] = set()
        self.tasks_done = 0
        self.starts = 0
        self.psutil_process: Any = None
        self.pipe_bytes = _DEFAULT_PIPE_BYTES  # what a request to this worker may weigh
        # a lease's batch sent ahead: its results are routed here by batch id
        self.routes: dict[int, tuple[_Exchange, int]] = {}
        # the worker's result pipe and exit sentinel, registered once per process:
        # waiting is one poll() call, not multiprocessing's wait() (a selector built,
        # filled and closed per call: ~20 Python calls, twice per batch)
        self.poller: Any = None
        self.conn_fd = -1
        self.sentinel_fd = -1
        self.sentry_recheck = False  # died while held: its release wakes the sentry
        self.stop_sent = False  # the current process was asked to stop

    def exited(self) -> bool:
        """Whether the worker process has exited (its sentinel is readable): one
        poll() call, where ``Process.is_alive()`` is a waitpid() behind ~8 calls."""
        fd = self.sentinel_fd
        return any(ready == fd for ready, _ in self.poller.poll(0))

    def wait_fds(self, timeout: float | None = None, extra: int = -1) -> list[int]:
        """The descriptors among the result pipe, the sentinel and ``extra`` that are
        readable (or closed), waiting up to ``timeout`` seconds (None: for ever)."""
        poller = self.poller
        if extra >= 0:
            poller.register(extra, select.POLLIN)
        try:
            ms = None
            if timeout is not None and timeout < _MAX_POLL_S:  # inf: wait for ever
                ms = math.ceil(max(0.0, timeout) * 1000)
            return [fd for fd, _ in poller.poll(ms)]
        finally:
            if extra >= 0:
                poller.unregister(extra)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "disappeared (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


def _resolve_context(start_method: str | None) -> ForkServerContext | SpawnContext:
    methods = multiprocessing.get_all_start_methods()
    if start_method is None:
        start_method = "forkserver" if "forkserver" in methods else "spawn"
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(
            f"start_method must be 'forkserver' or 'spawn', not {start_method!r}: a plain "
            "fork of a threaded process can deadlock"
        )
    if start_method not in methods:
        raise ValueError(
            f"start method {start_method!r} is not available on this platform; "
            f"available: {', '.join(methods)}"
        )
    if start_method == "spawn":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # interpreter-wide, effective until the server starts. The worker's own module, not
    # just ``actorflow``: the package imports it lazily, and every worker would then
    # import it (with cloudpickle and psutil) again after the fork: ~80 ms per start.
    ctx.set_forkserver_preload([__name__])
    return ctx


def _pickle_code(value: Any, fns: Sequence[Any], what: str) -> bytes:
    try:
        data: bytes = cloudpickle.dumps(value, protocol=_PROTOCOL)
        return data
    except Exception as exc:
        culprit, reason = fns[0], exc
        for fn in fns:
            try:
                cloudpickle.dumps(fn, protocol=_PROTOCOL)
            except Exception as inner:
                culprit, reason = fn, inner
                break
        name = getattr(culprit, "__qualname__", None) or safe_repr(culprit, 80)
        raise GraphError(
            f"task {name!r} ({what}) cannot run in a worker process: it could not be pickled "
            f"with cloudpickle ({type(reason).__name__}: {reason}); create unpicklable "
            "objects (locks, connections, open files) inside the function instead of "
            "capturing them, or use executor='thread'"
        ) from exc


def _kill_leftovers(slots: list[_Slot], lock: threading.Lock, sentries: list[_Sentry]) -> None:
    """Finalizer: kill and reap any worker still running (pool dropped without shutdown,
    or at exit); the sentry first, or it would start replacements."""
    for sentry in sentries:
        sentry.stop()
    for slot in slots:
        with lock:
            proc = slot.process
            if proc is None:
                continue
            with contextlib.suppress(Exception):
                proc.kill()
        with contextlib.suppress(Exception):
            proc.join(_STOP_GRACE_S)


class _Sentry:
    """A pool's watcher of idle workers: a thread that waits on every live worker's
    exit sentinel (and a wake pipe), so a worker that dies while no thread holds it
    is reported and replaced at once (``ProcessPool._sentry_found``).

    It holds only a weak reference to the pool between rounds, so a pool dropped
    without ``shutdown()`` is still collected (its finalizer stops the sentry).

    Example::

        sentry = _Sentry(pool)
        sentry.thread.start()
        sentry.wake()    # a worker started: look again
        sentry.stop()    # joins the thread, closes the pipe
    """

    def __init__(self, pool: ProcessPool) -> None:
        r, w = os.pipe()  # (os.pipe2 is Linux only)
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.rfd, self.wfd = r, w
        self.lock = threading.Lock()  # the pipe and ``closed``
        self.closed = False
        self.pipe_open = True
        self.thread = threading.Thread(
            target=_sentry_main,
            args=(weakref.ref(pool), self),
            name=f"actorflow-{pool.name}-sentry",
            daemon=True,
        )

    def is_closed(self) -> bool:
        return self.closed

    def wake(self) -> None:
        with self.lock:
            if not self.closed:
                with contextlib.suppress(OSError):  # full: it will look anyway
                    os.write(self.wfd, b"x")

    def stop(self) -> None:
        """Stop the thread and join it, then close the pipe. Called in the sentry's
        own thread (a finalizer run there), it leaves the closing to the thread's
        exit (``close_pipe``)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(OSError):
                os.write(self.wfd, b"x")
        thread = self.thread
        if thread is threading.current_thread():
            return
        if thread.ident is not None:
            thread.join()
        self.close_pipe()

    def close_pipe(self) -> None:
        with self.lock:
            if not self.pipe_open:
                return
            self.pipe_open = False
            for fd in (self.rfd, self.wfd):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _sentry_main(pool_ref: weakref.ref[ProcessPool], sentry: _Sentry) -> None:
    seen_dead: set[BaseProcess] = set()  # dead processes handled (objects: ids recur)
    held_dead: set[BaseProcess] = set()  # dead while held: looked at again when woken
    rfd = sentry.rfd
    try:
        while not sentry.closed:
            pool = pool_ref()
            watched = None if pool is None else pool._sentry_watch(seen_dead, held_dead)
            del pool  # not held while waiting: a dropped pool is collected
            if watched is None:
                return
            poller = select.poll()
            poller.register(rfd, select.POLLIN)
            for fd in watched:
                poller.register(fd, select.POLLIN)
            events = poller.poll()
            if sentry.is_closed():  # (read again: stop() may have run meanwhile)
                return
            pool = pool_ref()
            if pool is None:
                return
            for fd, _ in events:
                if fd == rfd:
                    with contextlib.suppress(OSError):
                        while os.read(rfd, 4096):
                            pass
                    held_dead.clear()  # released or restarted meanwhile: look again
                    continue
                slot, proc = watched[fd]
                pool._sentry_found(slot, proc, seen_dead, held_dead)
            del pool
    except BaseException as exc:  # nothing may escape a thread
        if not sentry.closed:
            EventLog().error("sentry_failed", error=safe_repr(exc))
            pool = pool_ref()
            if pool is not None:
                pool._sentry_lost(sentry)  # the next worker start makes a new one
            del pool
    finally:
        if sentry.closed and sentry.thread is threading.current_thread():
            with sentry.lock:
                joined_by_nobody = sentry.pipe_open
            if joined_by_nobody:
                # stopped from inside (a finalizer ran here), or failed: its pipe is
                # its own to close (a joining stop() closes it after the join)
                sentry.close_pipe()


_HEADER = struct.Struct("!i")  # multiprocessing.Connection's frame header
_ONE_WRITE_MAX = 0x7FFFF000 - 4  # Linux caps one write here; macOS rejects >= 2 GiB
_PIPE_BYTES = 1 << 20  # a batch of log lines is ~70 KB: more than a default 64 KB pipe
_DEFAULT_PIPE_BYTES = 4096  # POSIX guarantees PIPE_BUF >= 512; Linux and macOS give more
_FRAMING_BYTES = 1024  # a request's envelope around its items and code, generously
_RSS_CHECK_EVERY = 16  # Lease.due_back(): read a held worker's RSS once per this many calls


def _send_frame(conn: Connection, message: bytes) -> None:
    """``conn.send_bytes(message)`` in one system call: multiprocessing writes a
    message over 16 KiB as two (header, then body), and each write to an idle
    worker's pipe wakes it; on a VM a wake-up is a costly cross-CPU interrupt.
    Same framing (a 4-byte big-endian length), so ``recv_bytes`` reads it."""
    n = len(message)
    if n >= _ONE_WRITE_MAX:
        conn.send_bytes(message)  # near 2 GiB: multiprocessing's framing and writes
        return
    fd = conn.fileno()
    header = _HEADER.pack(n)
    sent = os.writev(fd, (header, message))
    if sent < n + 4:  # interrupted by a signal: write the rest
        if sent < 4:
            os.write(fd, header[sent:])  # 4 bytes or fewer: written whole
            sent = 4
        rest = memoryview(message)[sent - 4 :]
        while rest:
            rest = rest[os.write(fd, rest) :]


def _recv_frame(conn: Connection) -> bytes:
    """``conn.recv_bytes()`` in two reads and few Python calls (the same framing)."""
    fd = conn.fileno()
    head = _read_exact(fd, 4)
    (n,) = _HEADER.unpack(head)
    if n == -1:  # multiprocessing's framing of a message over 2 GiB
        (n,) = struct.unpack("!Q", _read_exact(fd, 8))
    return _read_exact(fd, n)


def _read_exact(fd: int, n: int) -> bytes:
    data = os.read(fd, n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        if not data:
            raise EOFError("the pipe was closed")
        data = os.read(fd, n - got)
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _widen_pipe(conn: Any) -> int:
    """Give a worker pipe 1 MiB of buffer (Linux), so a batch is written without
    waiting for the other side to read: the parent sends the next batch while the
    worker computes, and the worker flushes results while the parent is busy.
    Returns the pipe's capacity in bytes (a safe lower bound elsewhere)."""
    if not sys.platform.startswith("linux"):
        return _DEFAULT_PIPE_BYTES
    import fcntl

    try:
        return int(fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES))
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size for this user: the default stays
    try:
        return int(fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032)))
    except OSError:
        return _DEFAULT_PIPE_BYTES


class ProcessPool:
    """A pool of long-lived worker processes that runs chains of functions on batches.

    Thread-safe: many host threads may call :meth:`call_batch` at once; each call
    takes one free worker (or waits for one) for its whole duration. See the module
    docstring for the protocol, death handling and isolation.

    ``processes``: number of workers (default: the number of cores). ``start_method``:
    ``"forkserver"`` (default where available, preloading actorflow) or ``"spawn"``.
    ``max_tasks_per_worker`` / ``max_worker_rss_mb``: recycle a worker between calls
    after that many items / above that resident size. ``on_event(name, data)``: see
    the module docstring. ``kill_grace``: seconds between SIGTERM and SIGKILL when a
    timed-out worker is killed; ``stop_grace``: seconds a worker gets to exit at
    shutdown before it is killed.

    Example::

        with ProcessPool(2, name="demo") as pool:
            pool.register("square", [lambda x: x * x])
            outs = pool.call_batch("square", [1, 2, 3])
            assert [o.value for o in outs] == [1, 4, 9]
    """

    def __init__(
        self,
        processes: int | None = None,
        *,
        name: str = "run",
        start_method: str | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_rss_mb: float | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        kill_grace: float = _KILL_GRACE_S,
        stop_grace: float = _STOP_GRACE_S,
    ) -> None:
        if processes is None:
            processes = os.cpu_count() or 1
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be a positive int, not {processes!r}")
        if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
            raise ValueError(f"max_tasks_per_worker must be >= 1, not {max_tasks_per_worker!r}")
        if max_worker_rss_mb is not None and max_worker_rss_mb <= 0:
            raise ValueError(f"max_worker_rss_mb must be > 0, not {max_worker_rss_mb!r}")
        self.name = name
        self.processes = processes
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_worker_rss_mb = max_worker_rss_mb
        self._ctx = _resolve_context(start_method)
        self.start_method: str = self._ctx.get_start_method()
        self._on_event = on_event
        self._kill_grace = kill_grace
        self._stop_grace = stop_grace
        self._log = EventLog(pool=name)
        self._slots = [_Slot(i) for i in range(processes)]
        self._cond = threading.Condition()
        self._proc_lock = threading.Lock()
        self._shutdown_lock = threading.Lock()
        self._closed = False  # no new calls
        self._killed = False  # no new processes; calls in flight are cancelled
        self._chains: dict[str, _Code] = {}
        self._classes: dict[str, _Code] = {}
        self._versions = itertools.count(1)
        self._batch_ids = itertools.count(_HELLO_BATCH + 1)
        self._acquiring = 0  # threads waiting in _acquire for a free worker
        # the sentry (see _Sentry), started with the first worker; in a list the
        # finalizer holds, so a pool dropped without shutdown stops it too
        self._sentry: _Sentry | None = None
        self._sentries: list[_Sentry] = []
        self._finalizer = weakref.finalize(
            self, _kill_leftovers, self._slots, self._proc_lock, self._sentries
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<ProcessPool {self.name!r} processes={self.processes} "
            f"start_method={self.start_method!r} {state}>"
        )

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- registration

    def register(
        self,
        key: str,
        fns: Sequence[Callable[..., Any]],
        *,
        loop: Callable[[Any, list[Any], list[int], list[Any], list[bool], int, list[int]], int]
        | None = None,
    ) -> None:
        """Register a chain of functions under ``key``: item -> fns[0] -> fns[1] -> ...

        The chain is pickled once here with cloudpickle (lambdas and closures work)
        and shipped to each worker on its first use there. Registering a key again
        replaces the chain. Raises :class:`actorflow.GraphError` naming the function
        that cannot be pickled.

        ``loop``, optional, is the same chain as one batch loop
        ``loop(values, out, kept_at, err, tick, i, skips) -> int``: over an iterator
        of values numbered from ``i``, it appends each kept result to ``out`` and its
        number to ``kept_at`` (a ``SKIP`` appends nothing, and adds 1 to
        ``skips[k]`` when ``fns[k]``, not the last, returned it); when ``fns[k]`` raises
        on item ``j``, it appends ``(k, exception)`` to ``err`` and returns ``j +
        1``; it also returns after the first item that ends with ``tick[0]`` true
        (the worker's ticker sets it every ``_TICK_S`` while a batch runs, so
        results flush on time). It returns the number after the last item run.
        Workers then run batches through it (no per-item dispatch); items with a
        ``timeout`` still go through ``fns`` one by one.

        Example::

            pool.register("parse_score", [parse, score])
        """
        fns = list(fns)
        if not fns:
            raise ValueError(f"chain {key!r} needs at least one function")
        for fn in fns:
            if not callable(fn):
                raise TypeError(f"chain {key!r}: {safe_repr(fn, 80)} is not callable")
        payload = _pickle_code((fns, loop), fns, f"chain {key!r}")
        with self._cond:
            self._chains[key] = _Code(next(self._versions), payload, len(fns))

    def register_instances(self, key: str, cls: type | Callable[[], Any] | bytes, n: int) -> None:
        """Register ``n`` keyed stateful instances of ``cls`` under ``key``.

        ``cls`` is a class (or any zero-argument factory), or its cloudpickled bytes.
        Instance ``i`` is created with ``cls()`` in worker ``i % processes`` on first
        use and keeps its state across :meth:`call_instance` calls, until its worker
        dies, times out or is recycled (then ``on_event("instance_state_lost", ...)``
        and it is recreated empty on next use).

        Example::

            pool.register_instances("rate", ErrorRate, n=4)
            pool.call_instance("rate", stable_hash(ev["service"]) % 4, [ev])
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"instances of {key!r}: n must be a positive int, not {n!r}")
        if isinstance(cls, bytes | bytearray):
            payload = bytes(cls)
        else:
            if not callable(cls):
                raise TypeError(f"instances of {key!r}: {safe_repr(cls, 80)} is not callable")
            payload = _pickle_code(cls, [cls], f"instances {key!r}")
        with self._cond:
            self._classes[key] = _Code(next(self._versions), payload, 1, n)

    # ----------------------------------------------------------------- calls

    def start(self) -> None:
        """Start every idle worker now and wait until each one is ready to serve.

        Example::

            pool = ProcessPool(4)
            pool.start()      # first calls then pay no start-up latency
        """
        claimed: list[_Slot] = []
        with self._cond:
            self._check_open()
            for slot in self._slots:
                if not slot.busy:
                    slot.busy = True
                    claimed.append(slot)
        try:
            for slot in claimed:
                self._ensure_started(slot)
            for slot in claimed:
                self._await_ready(slot)
        finally:
            for slot in claimed:
                self._release(slot, recycle=False)

    def launch(self) -> None:
        """Start every idle worker that is not running, without waiting for it.

        Workers then start in parallel with the caller's work; the first call
        on each one waits for its hello as usual. Used by runs when their first
        process task needs the pool, so that ``workers=2`` finds two workers.

        Example::

            pool.launch()     # returns after the forks were requested
        """
        claimed: list[_Slot] = []
        with self._cond:
            self._check_open()
            for slot in self._slots:
                if not slot.busy and slot.process is None:
                    slot.busy = True
                    claimed.append(slot)
        try:
            for slot in claimed:
                self._ensure_started(slot)
        finally:
            for slot in claimed:
                self._release(slot, recycle=False)

    def call_batch(
        self, key: str, items: Sequence[Any], *, timeout: float | None = None
    ) -> list[Outcome]:
        """Run the chain ``key`` on each item in one worker; one outcome per item, in order.

        Blocks the calling thread (waiting for a free worker first). ``timeout`` is
        per item, in seconds from when the item starts in the worker.

        Example::

            outs = pool.call_batch("parse_score", lines, timeout=10.0)
            values = [o.value for o in outs if isinstance(o, Ok)]
        """
        return _outcomes(*self.run_batch(key, items, timeout=timeout))

    def run_batch(
        self,
        key: str,
        items: Sequence[Any],
        *,
        timeout: float | None = None,
        fused: bool = True,
        skips_at: list[int] | None = None,
    ) -> tuple[list[Any], dict[int, Outcome]]:
        """:meth:`call_batch` without an object per item: ``(values, failures)``.

        ``values[i]`` is item ``i``'s result (``SKIP`` included) unless ``i`` is a
        key of ``failures`` (its ``Err`` / ``Crashed`` / ``Timeout``); then
        ``values[i]`` is a placeholder. The fast path for large batches.
        ``fused=False``: run the items through the chain's functions one by one,
        not through its generated ``loop`` (items the loop cannot take).
        ``skips_at``, a list: on return, ``skips_at[k]`` adds how many items the
        chain's function ``k`` (not the last) skipped (it grows as needed).

        Example::

            values, failures = pool.run_batch("parse_keep", lines)
            kept = [v for i, v in enumerate(values) if i not in failures and v is not SKIP]
        """
        with self._cond:
            code = self._chains.get(key)
        if code is None:
            raise KeyError(f"no chain {key!r} is registered in process pool {self.name!r}")
        return self._call(_Target(_RUN, key, code), None, items, timeout, fused, skips_at)

    def call_instance(
        self, key: str, index: int, items: Sequence[Any], *, timeout: float | None = None
    ) -> list[Outcome]:
        """Call instance ``index`` of ``key`` on each item, in order, in its worker.

        Example::

            pool.call_instance("rate", 2, [ev1, ev2])   # -> [Ok(...), Ok(...)]
        """
        return _outcomes(*self.run_instance(key, index, items, timeout=timeout))

    def run_instance(
        self, key: str, index: int, items: Sequence[Any], *, timeout: float | None = None
    ) -> tuple[list[Any], dict[int, Outcome]]:
        """:meth:`call_instance` as ``(values, failures)``, like :meth:`run_batch`.

        Example::

            values, failures = pool.run_instance("rate", 2, events)
        """
        with self._cond:
            code = self._classes.get(key)
        if code is None:
            raise KeyError(f"no instances {key!r} are registered in process pool {self.name!r}")
        if not 0 <= index < code.n:
            raise IndexError(f"instances {key!r}: index {index} is outside 0..{code.n - 1}")
        slot = index % self.processes
        return self._call(_Target(_INSTANCE, key, code, index), slot, items, timeout)

    def _call(
        self,
        target: _Target,
        pinned: int | None,
        items: Sequence[Any],
        timeout: float | None,
        fused: bool = True,
        skips_at: list[int] | None = None,
    ) -> tuple[list[Any], dict[int, Outcome]]:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, not {timeout!r}")
        batch = _Batch(items)
        fails: dict[int, Outcome] = {}
        if batch.items:
            slot = self._acquire(pinned, target.code_key, target.code.version)
            try:
                self._drive(slot, target, batch, fails, timeout, fused=fused)
            except BaseException:
                if slot.process is not None:  # state unknown (interrupted mid-batch)
                    self._stop(slot, kill=True, reason="call interrupted")
                raise
            finally:
                self._release(slot)
        if skips_at is not None and batch.skips:
            skips_at[:] = _add_skips(list(skips_at), batch.skips)
        return batch.values, fails

    def _drive(
        self,
        slot: _Slot,
        target: _Target,
        batch: _Batch,
        fails: dict[int, Outcome],
        timeout: float | None,
        in_flight: tuple[Sequence[int], int, _Exchange] | None = None,
        *,
        fused: bool = True,
    ) -> None:
        """Run the batch to its end: every item gets a value or a failure.

        ``in_flight``: the first request was already sent (``(group, batch_id,
        exchange)``, see :class:`Lease`); its results are collected first.
        """
        values = batch.values
        groups: deque[Sequence[int]] = deque()
        if in_flight is None:
            groups.append(range(len(batch.items)))
        undelivered = 0
        while groups or in_flight is not None:
            if in_flight is not None:
                group, batch_id, ex = in_flight
                in_flight = None
                if ex.fate == "done":
                    ex = self._collect(slot, ex, len(group), batch_id, timeout, target)
            else:
                group = groups.popleft()
                sent = self._send_group(slot, target, batch, group, fails, timeout, fused)
                if sent is None:
                    continue  # no item of the group pickles: each has its Err already
                group, batch_id, ex = sent
                if ex.fate == "done":
                    ex = self._collect(slot, ex, len(group), batch_id, timeout, target)
            if ex.fate == "resend":
                batch.bulk = False  # an item does not unpickle in the worker
                groups.appendleft(group)
                continue
            back = ex.back
            if ex.skips:
                batch.skips = _add_skips(batch.skips, ex.skips)
            if type(group) is range and group.step == 1:
                values[group.start : group.stop] = back
            else:
                for position, i in enumerate(group):
                    values[i] = back[position]
            for position, outcome in ex.fails.items():
                fails[group[position]] = outcome
            slot.tasks_done += ex.count
            if ex.redo:  # results that did not unpickle here: run those items one by one
                batch.bulk = False
                groups.appendleft([group[p] for p in ex.redo])
            if ex.fate == "done":
                undelivered = 0
                continue
            if self._killed:
                raise PoolClosed(f"process pool {self.name!r} was shut down (kill=True)")
            left = [i for position, i in enumerate(group) if back[position] is _NOT_BACK]
            if ex.fate == "undelivered":
                undelivered += 1
                if undelivered < _MAX_UNDELIVERED:
                    groups.appendleft(left)
                    continue
                for i in left:
                    values[i] = _FAILED
                    fails[i] = Crashed(
                        f"{ex.description} before it could run anything; its stderr says why "
                        "(a script that runs flows at import time needs an "
                        "`if __name__ == '__main__':` guard: workers import the main module)",
                        ex.exitcode,
                        ex.pid,
                        alone=False,
                    )
            elif ex.fate == "timeout" and ex.position == _LOADING:
                for i in left:  # loading the code hung: every item would hang the same way
                    values[i] = _FAILED
                    fails[i] = Timeout(float(timeout or 0.0), ex.pid)
            elif ex.fate == "timeout":
                culprit = group[ex.position]
                values[culprit] = _FAILED
                fails[culprit] = Timeout(float(timeout or 0.0), ex.pid)
                rest = [i for i in left if i != culprit]
                if rest:
                    groups.appendleft(rest)
            elif len(group) == 1:
                if left:
                    values[left[0]] = _FAILED
                    fails[left[0]] = Crashed(ex.description, ex.exitcode, ex.pid)
            else:  # isolation: re-send each unreturned item alone, in order
                groups.extendleft(reversed([[i] for i in left]))

    def _send_group(
        self,
        slot: _Slot,
        target: _Target,
        batch: _Batch,
        group: Sequence[int],
        fails: dict[int, Outcome],
        timeout: float | None,
        fused: bool = True,
        encoded: tuple[Sequence[int], bytes | list[bytes]] | None = None,
    ) -> tuple[Sequence[int], int, _Exchange] | None:
        data = encoded or batch.encode(group, fails)
        if data is None:
            return None
        group, items = data
        self._ensure_started(slot)
        batch_id = next(self._batch_ids)
        timed = timeout is not None
        message = self._request(slot, target, batch_id, timed, fused and batch.bulk, group, items)
        return group, batch_id, self._send(slot, message, len(group), batch_id)

    def _send_ahead(
        self,
        slot: _Slot,
        target: _Target,
        batch: _Batch,
        fails: dict[int, Outcome],
        fused: bool = True,
    ) -> tuple[tuple[Sequence[int], int, _Exchange] | None, Any]:
        """Send a lease's next batch while the worker still runs the previous one.

        Returns ``(sent, None)``, or ``(None, encoded)`` when it must wait until
        the previous batch is back: the worker is gone, or the request could
        fill the pipe (the parent would block writing while the worker blocks
        writing results nobody reads). Never starts or reaps a worker: that is
        for whoever collects the batch in flight.
        """
        encoded = batch.encode(range(len(batch.items)), fails)
        if encoded is None or slot.to_worker is None or slot.process is None:
            return None, encoded
        group, items = encoded
        size = len(items) if isinstance(items, bytes) else sum(len(b) for b in items)
        if slot.loaded.get(target.code_key) != target.code.version:
            size += len(target.code.payload)
        if size + _FRAMING_BYTES > slot.pipe_bytes:
            return None, encoded
        batch_id = next(self._batch_ids)
        message = self._request(slot, target, batch_id, False, fused and batch.bulk, group, items)
        ex = _Exchange([_NOT_BACK] * len(group), {})
        try:
            _send_frame(slot.to_worker, message)
        except OSError:
            return None, encoded  # the worker died: whoever collects its batch sees why
        slot.routes[batch_id] = (ex, target.code.stages - 1)
        return (group, batch_id, ex), None

    def lease(self, key: str) -> Lease:
        """Hold one worker for a series of batches of the chain ``key`` (blocks for it).

        A lease sends the next batch before the caller handles the previous
        batch's results, so the worker computes while the caller works: see
        :class:`Lease`. Release it promptly (other calls wait for its worker).

        Example::

            with pool.lease("parse_keep") as lease:
                lease.send(chunk1)
                values, fails = lease.wait()
        """
        with self._cond:
            code = self._chains.get(key)
        if code is None:
            raise KeyError(f"no chain {key!r} is registered in process pool {self.name!r}")
        target = _Target(_RUN, key, code)
        return Lease(self, self._acquire(None, target.code_key, code.version), target)

    def try_lease(self, key: str) -> Lease | None:
        """Like :meth:`lease`, but None at once when no worker is free, or when
        another thread already waits for one (a worker just given back goes to
        that thread, not back to the holder that gave it up).

        Example::

            lease = pool.try_lease("parse_keep")
            if lease is None:
                ...  # every worker is held: come back later
        """
        with self._cond:
            code = self._chains.get(key)
        if code is None:
            raise KeyError(f"no chain {key!r} is registered in process pool {self.name!r}")
        target = _Target(_RUN, key, code)
        if self._acquiring:
            return None
        slot = self._acquire(None, target.code_key, code.version, block=False)
        return None if slot is None else Lease(self, slot, target)

    def has_free(self) -> bool:
        """Whether some worker is free right now (a hint: another thread may take it).

        Example::

            if pool.has_free() and not pool.contended():
                lease = pool.try_lease("parse_keep")  # most likely a lease
        """
        return any(not slot.busy for slot in self._slots)

    def contended(self) -> bool:
        """Whether some thread waits for a free worker (a lease holder should give
        its worker back soon).

        Example::

            if pool.contended():
                lease.release()  # once its batches are back
        """
        return self._acquiring > 0

    def _request(
        self,
        slot: _Slot,
        target: _Target,
        batch_id: int,
        timed: bool,
        fused: bool,
        group: Sequence[int],
        items: bytes | list[bytes],
    ) -> bytes:
        code: bytes | None = None
        if slot.loaded.get(target.code_key) != target.code.version:
            code = target.code.payload
            slot.loaded[target.code_key] = target.code.version
        if target.kind == _INSTANCE:
            slot.instances.add((target.key, target.index))
        key, version = target.key, target.code.version
        msg = (
            target.kind,
            batch_id,
            key,
            version,
            code,
            target.index,
            timed,
            fused,
            len(group),
            items,
        )
        return pickle.dumps(msg, protocol=_PROTOCOL)

    def _exchange(
        self,
        slot: _Slot,
        message: bytes,
        n: int,
        batch_id: int,
        timeout: float | None,
        target: _Target,
    ) -> _Exchange:
        ex = self._send(slot, message, n, batch_id)
        if ex.fate != "done":
            return ex
        return self._collect(slot, ex, n, batch_id, timeout, target)

    def _send(self, slot: _Slot, message: bytes, n: int, batch_id: int) -> _Exchange:
        """Send one request; the exchange is lost (fate set) if the worker is gone."""
        assert slot.to_worker is not None
        ex = _Exchange([_NOT_BACK] * n, {})
        if slot.routes and len(message) + _FRAMING_BYTES > slot.pipe_bytes:
            # a batch sent ahead may be running: it could block writing its results
            # while we block writing this. Read its results first.
            self._settle_routes(slot)
        try:
            _send_frame(slot.to_worker, message)
        except OSError:
            return self._lost(slot, ex, in_flight=n, batch_id=batch_id)
        return ex

    def _settle_routes(self, slot: _Slot) -> None:
        """Read the results of the batches sent ahead to this worker until each is
        complete (routed to its exchange), or the worker dies (its collector sees)."""
        conn, process = slot.from_worker, slot.process
        if conn is None or process is None:
            return
        while any(ex.fate == "done" and ex.count < len(ex.back) for ex, _ in slot.routes.values()):
            ready = slot.wait_fds()
            # no batch id of our own: every chunk goes to its route (or is dropped)
            if slot.conn_fd not in ready or not self._receive(
                slot, conn, _HELLO_BATCH - 1, None, 0
            ):
                return

    def _collect(
        self,
        slot: _Slot,
        ex: _Exchange,
        n: int,
        batch_id: int,
        timeout: float | None,
        target: _Target,
    ) -> _Exchange:
        """Wait for a sent request's results (deaths and timeouts noticed at once)."""
        assert slot.process is not None
        assert slot.from_worker is not None
        conn, conn_fd, sentinel_fd = slot.from_worker, slot.conn_fd, slot.sentinel_fd
        last_stage = target.code.stages - 1
        while ex.count < n:
            record = None
            wait_s = None
            if timeout is not None:
                record = self._running(slot, batch_id, ex)
                # look again at least once per `timeout`: the worker moves from loading
                # (long deadline) to its first item without telling us
                wait_s = timeout
                if record is not None:
                    wait_s = min(timeout, max(0.0, _deadline(record, timeout) - _now()))
            ready = slot.wait_fds(wait_s)
            if conn_fd in ready:
                if not self._receive(slot, conn, batch_id, ex, last_stage):
                    return self._lost(slot, ex, in_flight=n - ex.count, batch_id=batch_id)
                if ex.fate == "resend":
                    return ex
                continue
            if sentinel_fd in ready:
                while self._poll(conn) and self._receive(slot, conn, batch_id, ex, last_stage):
                    pass
                if ex.count == n:
                    break  # everything arrived: the death is noticed on next use
                return self._lost(slot, ex, in_flight=n - ex.count, batch_id=batch_id)
            if record is not None and timeout is not None:
                again = self._running(slot, batch_id, ex)
                if again == record and _now() >= _deadline(record, timeout):
                    return self._time_out(slot, ex, int(record[1]), timeout)
        return ex

    @staticmethod
    def _running(slot: _Slot, batch_id: int, ex: _Exchange) -> tuple[float, float, float] | None:
        p = slot.progress
        record = (p[0], p[1], p[2])
        position = int(record[1])
        if int(record[0]) != batch_id:
            return None  # not started yet
        if position != _LOADING and (
            not 0 <= position < len(ex.back) or ex.back[position] is not _NOT_BACK
        ):
            return None  # between items
        return record

    @staticmethod
    def _poll(conn: Connection) -> bool:
        try:
            return conn.poll()
        except OSError:
            return False

    def _receive(
        self,
        slot: _Slot,
        conn: Connection,
        batch_id: int,
        ex: _Exchange | None,
        last_stage: int,
    ) -> bool:
        try:
            data = _recv_frame(conn)
        except (EOFError, OSError):
            return False
        chunk_batch, start, fmt, payload, errors, logs, skips = pickle.loads(data)
        if logs:
            self._replay_logs(logs)
        if chunk_batch == _HELLO_BATCH:
            slot.ready = True
            return True
        if chunk_batch != batch_id or ex is None:
            route = slot.routes.get(chunk_batch)
            if route is None:
                return True  # a batch nobody waits for any more (given up on)
            ex, last_stage = route
        self._deliver(ex, start, fmt, payload, errors, last_stage, skips)
        return True

    def _deliver(
        self,
        ex: _Exchange,
        start: int,
        fmt: int,
        payload: Any,
        errors: list[tuple[int, bytes]] | None,
        last_stage: int,
        skips: list[int] | None = None,
    ) -> None:
        """Put one chunk of a worker's results into its exchange (``skips``: see
        ``_chunk``; counted only with results that are kept, not redone)."""
        back, fails = ex.back, ex.fails
        if fmt == _BULK:
            count, kept_at, blob = payload
            failed = set()
            for offset, encoded in errors or ():
                back[start + offset] = _FAILED
                fails[start + offset] = self._decode(encoded, last_stage)
                failed.add(offset)
            try:
                results = pickle.loads(blob)
            except Exception:  # e.g. a class the parent cannot import: item by item
                redo = [start + i for i in range(count) if i not in failed]
                for position in redo:
                    back[position] = _REDO
                ex.redo = (*ex.redo, *redo)
            else:
                if kept_at is not None:  # only the kept items came: SKIP elsewhere
                    if count == len(back) and not failed:
                        ex.kept = results  # what a stream yields, as it is
                    dense: list[Any] = [SKIP] * count
                    for position, value in zip(kept_at, results, strict=True):
                        dense[position - start] = value
                    results = dense
                for offset in failed:
                    results[offset] = _FAILED
                if count == len(back):  # the whole batch in one chunk: no copy
                    ex.back = results
                else:
                    back[start : start + count] = results
                if skips:
                    ex.skips = _add_skips(ex.skips, skips)
            ex.count += count
        elif fmt == _LOOSE:
            for offset, encoded in enumerate(payload):
                outcome = self._decode(encoded, last_stage)
                if type(outcome) is Ok:
                    back[start + offset] = outcome.value
                else:
                    back[start + offset] = _FAILED
                    fails[start + offset] = outcome
            if skips:
                ex.skips = _add_skips(ex.skips, skips)
            ex.count += len(payload)
        else:
            ex.fate = "resend"

    @staticmethod
    def _replay_logs(records: list[dict[str, Any]]) -> None:
        """Hand the worker's log records to the parent's loggers, as if logged here."""
        for data in records:
            try:
                record = logging.makeLogRecord(data)
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
            except Exception:  # a broken handler must not break the pool
                continue

    @staticmethod
    def _decode(data: bytes, last_stage: int) -> Outcome:
        try:
            tag, stage, payload = pickle.loads(data)
        except Exception as exc:
            what = (
                "the result could not be unpickled in the parent process; return plain "
                "data whose classes the parent can import"
            )
            return Err(last_stage, _pickling_error(what, exc, None))
        if tag == _OK:
            return Ok(payload)
        assert isinstance(payload, RemoteError)
        return Err(int(stage), payload)

    # ----------------------------------------------------------------- worker lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed(f"process pool {self.name!r} is shut down; no more calls")

    @overload
    def _acquire(self, pinned: int | None, code_key: str, version: int) -> _Slot: ...

    @overload
    def _acquire(
        self, pinned: int | None, code_key: str, version: int, *, block: bool
    ) -> _Slot | None: ...

    def _acquire(
        self, pinned: int | None, code_key: str, version: int, *, block: bool = True
    ) -> _Slot | None:
        with self._cond:
            while True:
                self._check_open()
                if pinned is not None:
                    slot = self._slots[pinned]
                    if not slot.busy:
                        break
                else:
                    free = [s for s in self._slots if not s.busy]
                    if free:
                        # warm first (code already loaded), then started, then any
                        slot = min(
                            free,
                            key=lambda s: (
                                s.process is None,
                                s.loaded.get(code_key) != version,
                                s.index,
                            ),
                        )
                        break
                if not block:
                    return None
                self._acquiring += 1
                try:
                    self._cond.wait()
                finally:
                    self._acquiring -= 1
            slot.busy = True
            return slot

    def _release(self, slot: _Slot, *, recycle: bool = True) -> None:
        try:
            if recycle and not self._killed and slot.process is not None:
                reason = self._recycle_reason(slot)
                if reason is not None:
                    self._stop(slot, kill=False, reason=reason)
        finally:
            with self._cond:
                slot.busy = False
                self._cond.notify_all()
                recheck, slot.sentry_recheck = slot.sentry_recheck, False
            if recheck:
                self._wake_sentry()

    def _recycle_reason(self, slot: _Slot) -> str | None:
        limit = self.max_tasks_per_worker
        if limit is not None and slot.tasks_done >= limit:
            return f"ran {slot.tasks_done} items (max_tasks_per_worker={limit})"
        if self.max_worker_rss_mb is not None:
            rss = self._rss_mb(slot)
            if rss is not None and rss > self.max_worker_rss_mb:
                return f"RSS {rss:.1f} MB > max_worker_rss_mb={self.max_worker_rss_mb:g}"
        return None

    def _rss_mb(self, slot: _Slot) -> float | None:
        proc = self._psutil(slot)
        if proc is None:
            return None
        try:
            return float(proc.memory_info().rss) / 2**20
        except psutil.Error:
            return None

    @staticmethod
    def _psutil(slot: _Slot) -> Any:
        pid = slot.pid
        if pid is None:
            return None
        proc = slot.psutil_process
        if proc is None or proc.pid != pid:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                return None
            slot.psutil_process = proc
        return proc

    def _ensure_started(self, slot: _Slot) -> None:
        if slot.process is not None:
            if not slot.exited():
                return
            self._lost(slot, None, in_flight=0)  # died while idle: reap, report, replace
        inbox, to_worker = self._ctx.Pipe(duplex=False)
        from_worker, outbox = self._ctx.Pipe(duplex=False)
        slot.pipe_bytes = _widen_pipe(to_worker)
        _widen_pipe(outbox)
        process = self._ctx.Process(
            target=_worker_main,
            args=(
                inbox,
                outbox,
                slot.progress,
                _stdio_handles(),
                logging.getLogger().getEffectiveLevel(),
            ),
            name=f"actorflow-{self.name}-worker-{slot.index}",
            daemon=False,  # a task may start its own processes; shutdown() reaps workers
        )
        try:
            with self._proc_lock:
                if self._killed:
                    raise PoolClosed(f"process pool {self.name!r} was shut down (kill=True)")
                process.start()
                slot.process, slot.pid = process, process.pid
        except BaseException:
            to_worker.close()
            from_worker.close()
            raise
        finally:
            inbox.close()  # the worker holds its own ends: EOF reaches us when it dies
            outbox.close()
        slot.to_worker, slot.from_worker = to_worker, from_worker
        poller = select.poll()
        slot.conn_fd, slot.sentinel_fd = from_worker.fileno(), process.sentinel
        poller.register(slot.conn_fd, select.POLLIN)
        poller.register(slot.sentinel_fd, select.POLLIN)
        slot.poller = poller
        slot.ready = False
        slot.tasks_done = 0
        slot.starts += 1
        slot.stop_sent = False
        slot.psutil_process = None
        self._emit("worker_started", worker=slot.index, pid=slot.pid)
        self._wake_sentry(start=True)

    # ----------------------------------------------------------------- the sentry

    def _wake_sentry(self, *, start: bool = False) -> None:
        """Have the sentry look at the workers again (``start``: start it if need be)."""
        with self._cond:
            sentry = self._sentry
            if sentry is None:
                if not start or self._closed:
                    return
                sentry = _Sentry(self)
                try:
                    sentry.thread.start()
                except RuntimeError as exc:  # no thread to spare: deaths found on use
                    sentry.close_pipe()
                    self._log.warning("sentry_not_started", error=safe_repr(exc))
                    return
                self._sentry = sentry
                self._sentries.append(sentry)
                return
        sentry.wake()

    def _sentry_watch(
        self, seen_dead: set[BaseProcess], held_dead: set[BaseProcess]
    ) -> dict[int, tuple[_Slot, BaseProcess]] | None:
        """The sentinels the sentry waits on: every live worker's but the dead ones
        it handled or left to their holder; None once the pool is closed."""
        watched: dict[int, tuple[_Slot, BaseProcess]] = {}
        with self._cond:
            if self._closed:
                return None
            with self._proc_lock:
                seen_dead &= {slot.process for slot in self._slots}  # forget replaced ones
                for slot in self._slots:
                    proc = slot.process
                    if proc is None or proc in seen_dead or proc in held_dead:
                        continue
                    try:
                        watched[proc.sentinel] = (slot, proc)
                    except ValueError:  # closed: being reaped by its holder
                        continue
        return watched

    def _sentry_found(
        self,
        slot: _Slot,
        proc: BaseProcess,
        seen_dead: set[BaseProcess],
        held_dead: set[BaseProcess],
    ) -> None:
        """``proc``'s sentinel fired: if nobody holds its slot, report the death and
        start the replacement (its hello is read by the next call, as after any start).
        A held worker is its holder's; if the holder gives it back without noticing,
        its release wakes the sentry (``slot.sentry_recheck``)."""
        with self._cond:
            if self._closed or slot.process is not proc:
                return
            if slot.busy:
                held_dead.add(proc)
                slot.sentry_recheck = True
                return
            slot.busy = True  # claimed, as a call would: nobody else touches it now
        exited = False
        try:
            exited = slot.exited()
            if exited and slot.ready:
                self._ensure_started(slot)  # reap, report worker_died, start anew
            elif exited:
                # it never said hello (its hello is read by a call): reap and report
                # it, and leave the restart to the next call, which reports why it
                # fails if it does (a worker dying at start-up must not loop here)
                self._lost(slot, None, in_flight=0)
        except Exception as exc:  # PoolClosed at shutdown; a start that failed
            if not self._closed:
                self._log.warning("worker_restart_failed", worker=slot.index, error=safe_repr(exc))
        finally:
            self._release(slot, recycle=False)
        if exited:
            seen_dead.add(proc)
        else:  # (not expected) do not spin on it: look again when woken
            held_dead.add(proc)

    def _stop_sentry(self) -> None:
        with self._cond:
            sentry, self._sentry = self._sentry, None
        if sentry is not None:
            sentry.stop()

    def _sentry_lost(self, sentry: _Sentry) -> None:
        """The sentry thread failed (logged): forget it, so a new one starts with the
        next worker; its pipe is closed as it exits."""
        with self._cond:
            if self._sentry is sentry:
                self._sentry = None
        with sentry.lock:
            sentry.closed = True

    def _await_ready(self, slot: _Slot) -> None:
        if slot.ready or slot.process is None or slot.from_worker is None:
            return
        conn, sentinel = slot.from_worker, slot.process.sentinel
        while not slot.ready:
            ready = wait([conn, sentinel])
            if conn in ready and self._receive(slot, conn, _HELLO_BATCH, None, 0):
                continue
            ex = self._lost(slot, None, in_flight=0)
            raise WorkerCrashed(
                f"worker {slot.index} of process pool {self.name!r} {ex.description} during "
                "start-up; its stderr says why (is actorflow importable there?)"
            )

    def _lost(
        self,
        slot: _Slot,
        ex: _Exchange | None,
        *,
        in_flight: int,
        batch_id: int | None = None,
    ) -> _Exchange:
        """The worker died: reap it, report it, clear the slot (restarted on next use).

        The fate is ``"died"`` only if the worker had started ``batch_id`` (its progress
        record says so); a worker that died before (at start-up, or killed while idle
        just before the batch was sent) died of no item: ``"undelivered"``.
        """
        pid = slot.pid
        started = slot.ready  # a worker that never said hello died of no item
        reached = batch_id is not None and int(slot.progress[0]) == batch_id
        ahead = slot.routes.get(int(slot.progress[0])) if slot.ready else None
        exitcode = self._reap(slot, wait_s=self._stop_grace)
        description = _describe_exit(exitcode)
        if not started:
            description += " during start-up"
        if not self._killed:
            if self._on_event is None:  # (a handler logs it: see _emit)
                self._log.warning(
                    "worker_died",
                    worker=slot.index,
                    pid=pid,
                    exitcode=exitcode,
                    in_flight=in_flight,
                )
            self._emit(
                "worker_died",
                worker=slot.index,
                pid=pid,
                exitcode=exitcode,
                reason=description,
                in_flight=in_flight,
            )
        self._forget(slot, pid, f"worker process {description}")
        if ahead is not None and ahead[0] is not ex and ahead[0].fate == "done":
            # it died in a batch sent ahead: that batch isolates its items itself
            blamed = ahead[0]
            blamed.fate, blamed.description = "died", description
            blamed.exitcode, blamed.pid = exitcode, pid
        if ex is None:
            ex = _Exchange([], {})
        ex.fate = "died" if started and reached else "undelivered"
        ex.description, ex.exitcode, ex.pid = description, exitcode, pid
        return ex

    def _time_out(self, slot: _Slot, ex: _Exchange, position: int, timeout: float) -> _Exchange:
        pid = slot.pid
        if self._on_event is None:
            self._log.warning("worker_timed_out", worker=slot.index, pid=pid, timeout=timeout)
        self._emit("worker_timed_out", worker=slot.index, pid=pid, timeout=timeout)
        exitcode = self._terminate(slot)
        self._forget(slot, pid, f"worker process killed after an item ran over {timeout:g} s")
        ex.fate, ex.position, ex.exitcode, ex.pid = "timeout", position, exitcode, pid
        ex.description = _describe_exit(exitcode)
        return ex

    def _stop(self, slot: _Slot, *, kill: bool, reason: str) -> None:
        """Stop the slot's worker (gracefully unless ``kill``), reap it and clear the slot."""
        if slot.process is None:
            return
        pid = slot.pid
        if kill:
            self._signal(slot, signal.SIGKILL)
            self._reap(slot, wait_s=None)
        else:
            self._ask_stop(slot)
            if not wait([slot.process.sentinel], self._stop_grace):
                self._terminate(slot)
            self._reap(slot, wait_s=None)
        if reason != "shutdown" and not self._killed:  # (cancel(): part of the stop)
            if self._on_event is None:
                self._log.info("worker_recycled", worker=slot.index, pid=pid, reason=reason)
            self._emit("worker_recycled", worker=slot.index, pid=pid, reason=reason)
        self._forget(slot, pid, None if reason == "shutdown" else f"worker {reason}")

    def _ask_stop(self, slot: _Slot) -> None:
        """Send the worker its stop request (once per process; it exits after it)."""
        if slot.to_worker is not None and slot.process is not None and not slot.stop_sent:
            slot.stop_sent = True
            with contextlib.suppress(OSError):
                slot.to_worker.send_bytes(_STOP_MESSAGE)

    def _signal(self, slot: _Slot, signum: int) -> None:
        with self._proc_lock:
            proc = slot.process
            if proc is not None and proc.exitcode is None:
                with contextlib.suppress(Exception):
                    if signum == signal.SIGKILL:
                        proc.kill()
                    else:
                        proc.terminate()

    def _terminate(self, slot: _Slot) -> int | None:
        """SIGTERM, then SIGKILL after ``kill_grace``; reap. Returns the exit code."""
        assert slot.process is not None
        self._signal(slot, signal.SIGTERM)
        if not wait([slot.process.sentinel], self._kill_grace):
            self._signal(slot, signal.SIGKILL)
        return self._reap(slot, wait_s=None)

    def _reap(self, slot: _Slot, *, wait_s: float | None) -> int | None:
        proc = slot.process
        if proc is None:
            return None
        if not wait([proc.sentinel], wait_s):  # the pipe hit EOF but the process lingers
            self._signal(slot, signal.SIGKILL)
            wait([proc.sentinel])
        with self._proc_lock:
            proc.join()
            exitcode = proc.exitcode
            proc.close()
            slot.process = None
        return exitcode

    def _forget(self, slot: _Slot, pid: int | None, lost_reason: str | None) -> None:
        for conn in (slot.to_worker, slot.from_worker):
            if conn is not None:
                conn.close()
        slot.to_worker = slot.from_worker = None
        slot.poller, slot.conn_fd, slot.sentinel_fd = None, -1, -1
        slot.pid = None
        slot.ready = False
        slot.loaded.clear()
        slot.routes.clear()
        lost, slot.instances = slot.instances, set()
        if lost_reason is None or self._killed:
            return
        by_key: dict[str, list[int]] = {}
        for key, index in lost:
            by_key.setdefault(key, []).append(index)
        for key, indices in sorted(by_key.items()):
            if self._on_event is None:
                self._log.warning("instance_state_lost", key=key, worker=slot.index, pid=pid)
            self._emit(
                "instance_state_lost",
                key=key,
                indices=sorted(indices),
                worker=slot.index,
                pid=pid,
                reason=lost_reason,
            )

    def _emit(self, event: str, **data: Any) -> None:
        """Hand a pool event to ``on_event``, which logs it (the pool logs it itself
        only without a handler: one log record per event)."""
        if self._on_event is None:
            return
        data.setdefault("pool", self.name)
        try:
            self._on_event(event, data)
        except Exception as exc:
            self._log.error("on_event_failed", event_name=event, error=safe_repr(exc))

    # ----------------------------------------------------------------- monitoring, shutdown

    def stats(self) -> list[dict[str, Any]]:
        """Return one dict per worker: ``worker, pid, alive, busy, tasks_done, restarts,
        rss_mb, cpu_percent`` (cpu since the previous ``stats()`` call, psutil).

        Example::

            for w in pool.stats():
                print(w["pid"], w["alive"], w["tasks_done"], w["rss_mb"])
        """
        out: list[dict[str, Any]] = []
        for slot in self._slots:
            with self._proc_lock:
                proc = slot.process
                alive = proc is not None and proc.is_alive()
            rss_mb = cpu = 0.0
            ps = self._psutil(slot) if alive else None
            if ps is not None:
                try:
                    with ps.oneshot():
                        rss_mb = float(ps.memory_info().rss) / 2**20
                        cpu = float(ps.cpu_percent(interval=None))
                except psutil.Error:
                    alive = False
            out.append(
                {
                    "worker": slot.index,
                    "pid": slot.pid if alive else None,
                    "alive": alive,
                    "busy": slot.busy,
                    "tasks_done": slot.tasks_done,
                    "restarts": max(0, slot.starts - 1),
                    "rss_mb": rss_mb,
                    "cpu_percent": cpu,
                }
            )
        return out

    def close(self) -> None:
        """Take no new calls or leases: threads waiting for a worker get
        :class:`PoolClosed` now (a cancelled run's hosts must not wait for workers
        that nobody will give back). Calls and leases in progress go on.

        Example::

            pool.close()
            pool.shutdown(kill=True)
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self) -> None:
        """Kill every worker now, without waiting: calls and leases in flight raise
        :class:`PoolClosed` (``stop(drain=False)``: a batch of long items running in a
        worker must not hold the stop up). :meth:`shutdown` then reaps them.

        Example::

            pool.cancel()                # threads waiting on workers get PoolClosed
            pool.shutdown(kill=True)     # reap
        """
        with self._cond:
            self._closed = True
            self._killed = True
            self._cond.notify_all()
        for slot in self._slots:
            self._signal(slot, signal.SIGKILL)

    def shutdown(self, *, kill: bool = False) -> None:
        """Stop every worker and join it; idempotent.

        ``kill=False`` waits for calls in flight to finish, then asks each worker to
        exit (SIGTERM / SIGKILL after ``stop_grace``). ``kill=True`` kills workers at
        once; calls in flight raise :class:`PoolClosed`. Either way no worker process
        remains when it returns; later calls raise :class:`PoolClosed`.

        Example::

            pool.shutdown()              # drain, then stop
            pool.shutdown(kill=True)     # cancel what is running
        """
        with self._cond:
            self._closed = True
            if kill:
                self._killed = True
            self._cond.notify_all()
        if kill:
            for slot in self._slots:
                self._signal(slot, signal.SIGKILL)
        self._stop_sentry()  # (it may be starting a worker: joined before the stops)
        with self._cond:
            while any(slot.busy for slot in self._slots):
                self._cond.wait()
        with self._shutdown_lock:
            if not kill:
                # every worker is asked first, so they exit (~2 ms each) at once
                for slot in self._slots:
                    self._ask_stop(slot)
            for slot in self._slots:
                self._stop(slot, kill=kill, reason="shutdown")
            self._finalizer()


class Lease:
    """One worker of a :class:`ProcessPool`, held for a series of batches of one chain.

    ``send(items)`` encodes a batch and sends it at once; ``wait()`` returns the
    oldest batch's ``(values, failures)`` exactly like :meth:`ProcessPool.run_batch`
    (deaths, isolation and timeouts included). Two batches may be in flight: the
    second is written to the worker's pipe while it runs the first, so the worker
    never waits for the parent between them (W2: workers idle 20-30% of the time
    with one batch at a time). A second batch with a ``timeout``, or one too big
    for the pipe, is sent when the first is back instead. ``release()`` (or
    leaving the ``with`` block) gives the worker back; a batch sent and never
    waited for leaves the worker in an unknown state, so it is then stopped.

    Example::

        with pool.lease("parse_keep") as lease:
            lease.send(chunks[0])
            for nxt in chunks[1:]:
                lease.send(nxt)            # queued behind the batch in flight
                handle(*lease.wait())      # the oldest batch's results
            handle(*lease.wait())
    """

    def __init__(self, pool: ProcessPool, slot: _Slot, target: _Target) -> None:
        self._pool = pool
        self._slot: _Slot | None = slot
        self._target = target
        # (batch, fails, timeout, sent, encoded, worker start count when sent, fused)
        self._pending: deque[tuple[_Batch, dict[int, Outcome], float | None, Any, Any, int, bool]]
        self._pending = deque()
        self._checks = 0  # due_back() calls (the RSS check is rate-limited)
        self.kept: list[Any] | None = None  # see wait()
        self.skips: list[int] | None = None  # see wait()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet waited for (0, 1 or 2)."""
        return len(self._pending)

    def send(
        self, items: Sequence[Any], *, timeout: float | None = None, fused: bool = True
    ) -> None:
        """Encode and send a batch (at most two may be in flight). ``fused=False``:
        the worker runs the chain node by node, not its generated loop (items
        whose arguments the parent built, see ``ProcessPool.run_batch``)."""
        slot = self._slot
        if slot is None:
            raise RuntimeError("this lease was released")
        if len(self._pending) >= 2:
            raise RuntimeError("two batches are in flight: wait() for one before sending more")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, not {timeout!r}")
        batch = _Batch(items)
        fails: dict[int, Outcome] = {}
        sent = encoded = None
        if batch.items:
            pool = self._pool
            try:
                if not self._pending:
                    group = range(len(batch.items))
                    sent = pool._send_group(slot, self._target, batch, group, fails, timeout, fused)
                elif timeout is None and self._pending[0][3] is not None:
                    # behind a batch the worker has (in order); not a timed batch:
                    # its clock must start when it runs
                    sent, encoded = pool._send_ahead(slot, self._target, batch, fails, fused)
            except BaseException:
                self._break()
                raise
        self._pending.append((batch, fails, timeout, sent, encoded, slot.starts, fused))

    def ready(self, wake: WakeFd) -> bool:
        """Block until the oldest batch's results can be read (or its worker died):
        True; or until ``wake`` is signalled first: False. Not for a timed batch
        (:meth:`wait` enforces its timeout; this would not)."""
        slot, pending = self._slot, self._pending
        if slot is None or not pending:
            raise RuntimeError("no batch in flight on this lease")
        sent, starts = pending[0][3], pending[0][5]
        conn, process = slot.from_worker, slot.process
        if sent is None or conn is None or process is None or slot.starts != starts:
            return True  # wait() has to send it or tell what happened
        ex = sent[2]
        if ex.fate != "done" or ex.count >= len(ex.back):
            return True  # its results were read (routed) while an earlier batch was collected
        fd = wake.fileno()
        return fd not in slot.wait_fds(None, fd)

    def poll_fds(self) -> tuple[int, int] | None:
        """What to poll until the oldest batch's results can be read: the worker's
        result pipe and exit sentinel; None when :meth:`wait` need not block for
        them (they were read already, or it has to send or report something).

        For waiting on several leases (and other descriptors) at once, with
        :func:`select.poll`. Not for a timed batch (:meth:`wait` enforces its
        timeout; a poll would not).

        Example::

            fds = lease.poll_fds()
            if fds is None or poller_says_readable(fds):
                values, fails = lease.wait()
        """
        slot, pending = self._slot, self._pending
        if slot is None or not pending:
            raise RuntimeError("no batch in flight on this lease")
        sent, starts = pending[0][3], pending[0][5]
        if sent is None or slot.from_worker is None or slot.process is None:
            return None
        if slot.starts != starts or slot.conn_fd < 0:
            return None
        ex = sent[2]
        if ex.fate != "done" or ex.count >= len(ex.back):
            return None
        return slot.conn_fd, slot.sentinel_fd

    def read_hello(self) -> bool:
        """If the worker has not said hello yet, read its hello (call it when its
        result pipe is readable): True. A fresh worker sends it first, so a poll on
        the pipe would otherwise take it for results. False when the hello was
        read before, or when the worker died (then :meth:`wait` tells).

        Example::

            if lease.read_hello():
                ...  # not results yet: poll the pipe again
        """
        slot = self._slot
        if slot is None or slot.ready or slot.from_worker is None:
            return False
        # False on EOF: it died, and wait() reports it
        return self._pool._receive(slot, slot.from_worker, -1, None, 0)

    def warm(self) -> bool:
        """Whether the worker has started and loaded this lease's code: a first batch
        on a cold one also waits for that (a poor measure of the items' cost).

        Example::

            timed = lease.warm()
            lease.send(items)  # its round trip measures the items if timed
        """
        slot, target = self._slot, self._target
        return (
            slot is not None
            and slot.ready
            and slot.loaded.get(target.code_key) == target.code.version
        )

    def due_back(self) -> bool:
        """Whether the holder should give the worker back once its batches are in:
        another thread waits for a worker, or the worker is due for recycling
        (``max_tasks_per_worker``; ``max_worker_rss_mb`` is read at most every
        ``_RSS_CHECK_EVERY`` calls).

        Example::

            if lease.due_back():
                ...  # send it nothing more; release it once its batches are in
        """
        slot, pool = self._slot, self._pool
        if slot is None:
            return True
        if pool._acquiring or pool._closed:
            return True
        limit = pool.max_tasks_per_worker
        if limit is not None and slot.tasks_done >= limit:
            return True
        if pool.max_worker_rss_mb is not None:
            self._checks += 1
            if self._checks % _RSS_CHECK_EVERY == 0:
                return pool._recycle_reason(slot) is not None
        return False

    def wait(self) -> tuple[list[Any], dict[int, Outcome]]:
        """The results of the oldest batch in flight: ``(values, failures)``.

        Afterwards ``kept`` is, for a clean batch run whole through a generated
        loop, its values without the skipped ones (else None): what a stream
        yields, with no pass over the values. ``skips`` is, per function of the
        chain but the last, how many of the batch's items it skipped (or None)."""
        self.kept = None
        self.skips = None
        slot, pending = self._slot, self._pending
        if slot is None or not pending:
            raise RuntimeError("no batch in flight on this lease")
        batch, fails, timeout, sent, encoded, starts, fused = pending.popleft()
        if batch.items:
            pool = self._pool
            try:
                if sent is not None:
                    _, batch_id, ex = sent
                    slot.routes.pop(batch_id, None)
                    n = len(ex.back)
                    if (
                        timeout is None
                        and ex.fate == "done"
                        and slot.starts == starts
                        and slot.process is not None
                    ):
                        # the common case in few steps: the whole batch, run once, clean
                        if ex.count < n:
                            ex = pool._collect(slot, ex, n, batch_id, None, self._target)
                        if (
                            ex.fate == "done"
                            and not ex.fails
                            and not ex.redo
                            and not fails
                            and n == len(batch.values)
                        ):
                            slot.tasks_done += n
                            self.kept = ex.kept
                            self.skips = ex.skips
                            return ex.back, fails
                        sent = (sent[0], batch_id, ex)
                    elif (
                        ex.fate == "done"
                        and ex.count < n
                        and (slot.process is None or slot.starts != starts)
                    ):
                        # sent ahead to a worker that died before reaching it: send again
                        ex.fate = "undelivered"
                        ex.description = "died while it ran the batch before this one"
                elif encoded is not None:  # sent ahead when the worker is free
                    group = range(len(batch.items))
                    sent = pool._send_group(
                        slot, self._target, batch, group, fails, timeout, fused, encoded=encoded
                    )
                pool._drive(slot, self._target, batch, fails, timeout, in_flight=sent, fused=fused)
            except BaseException:
                self._break()
                raise
        self.skips = batch.skips
        return batch.values, fails

    def _break(self) -> None:
        slot = self._slot
        self._pending.clear()
        if slot is not None and slot.process is not None:  # state unknown: mid-batch
            self._pool._stop(slot, kill=True, reason="call interrupted")

    def release(self) -> None:
        """Give the worker back to the pool (idempotent)."""
        slot = self._slot
        if slot is None:
            return
        if self._pending:
            self._break()
        self._slot = None
        self._pool._release(slot)


class WakeFd:
    """A descriptor that wakes a thread blocked in :meth:`Lease.ready` (an eventfd on
    Linux, else a pipe). Close it when done.

    Example::

        wake = WakeFd()
        # another thread: wake.signal()
        lease.ready(wake)   # False: woken before the batch's results came
        wake.drain()
        wake.close()
    """

    __slots__ = ("_r", "_w", "armed")

    def __init__(self) -> None:
        self.armed = False  # a thread is about to block on it (a hint for signallers)
        if hasattr(os, "eventfd"):
            self._r = self._w = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            self._r, self._w = os.pipe()
            os.set_blocking(self._r, False)
            os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def signal(self) -> None:
        """Make the descriptor readable (until :meth:`drain`)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"\1\0\0\0\0\0\0\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)

    def close(self) -> None:
        os.close(self._r)
        if self._w != self._r:
            os.close(self._w)


def _outcomes(values: list[Any], fails: dict[int, Outcome]) -> list[Outcome]:
    """``run_batch``'s ``(values, failures)`` as one outcome per item."""
    return [fails[i] if v is _FAILED else Ok(v) for i, v in enumerate(values)]


def _now() -> float:
    return time.monotonic()


def _deadline(record: tuple[float, float, float], timeout: float) -> float:
    """When the running item (or the code loading before it) of ``record`` is over time."""
    if int(record[1]) == _LOADING:
        return record[2] + max(timeout, _LOAD_GRACE_S)
    return record[2] + timeout
