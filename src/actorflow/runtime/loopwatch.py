"""A watchdog for the run's event loop: coroutines that never yield.

An async task that computes without ``await`` holds the loop's thread: no other
coroutine runs, and ``asyncio`` cannot cancel it (cancellation is delivered at an
``await``). The loop beats every ``BEAT_S`` (a callback that notes the time); the
run's watcher looks at the beat every ``CHECK_S``. When the loop has not beaten
for ``STALL_S``, the watchdog finds the coroutine that holds it (the current task's
stack of the loop's thread, matched against the async calls in flight) and then:

- if that call has a ``timeout`` and is past it, raises ``TaskTimeout`` inside the
  loop's thread (``PyThreadState_SetAsyncExc``): a pure-Python loop is interrupted
  at its next bytecode, the item fails (or is retried) like any timed-out call,
  and the loop goes on;
- otherwise, after ``WARN_S``, logs ``async_task_blocking_loop`` (WARNING) once per
  call, naming the task and the item.

At stop, a loop that does not stop because a task's coroutine holds it gets
``CancelledError`` raised the same way (a few times, then an ERROR is logged and
the loop's daemon thread is left to the interpreter: a coroutine stuck in one C
call cannot be interrupted; it is the event-loop analogue of an abandoned
timed-out thread).

Limits: the exception is delivered between bytecodes, so code blocked inside one C
call (``time.sleep``, a C extension's loop) is interrupted only when that call
returns. There is a tiny window in which the coroutine yields just before the
exception lands; the watchdog re-reads the stall right before raising, so the
window is microseconds after seconds of stall.

Example (inside actorflow; users see only the effect)::

    watch = LoopWatch(loop, thread, call_later, log)
    watch.start()
    token = watch.enter(coro, "spin", item_id, timeout)
    ...
    watch.leave(token)
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from actorflow.errors import TaskTimeout
from actorflow.observe.log import EventLog

BEAT_S: Final = 0.1
CHECK_S: Final = 0.25
STALL_S: Final = 0.5  # no beat for this long: a coroutine holds the loop
WARN_S: Final = 5.0
STOP_TRIES: Final = 5


def _raise_in(thread: threading.Thread, exc_type: type[BaseException]) -> bool:
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return False
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc_type)
    )
    return bool(n == 1)


class _Call:
    __slots__ = ("interrupted", "item", "started", "task", "timeout", "warned")

    def __init__(self, task: str, item: Any, timeout: float | None) -> None:
        self.task = task
        self.item = item
        self.timeout = timeout
        self.started = time.monotonic()
        self.warned = False
        self.interrupted = False


class LoopWatch:
    """Watches one event loop running in ``thread`` (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        call_later: Callable[..., None],
        log: EventLog,
    ) -> None:
        self.loop = loop
        self.thread = thread
        self.call_later = call_later
        self.log = log
        self.calls: dict[Any, _Call] = {}  # user coroutine object -> its call
        self.beat = time.monotonic()
        self.stopping = False

    def start(self) -> None:
        self.loop.call_soon_threadsafe(self._beat)
        self.call_later(CHECK_S, self._check)

    # -- in the loop ---------------------------------------------------------------
    def _beat(self) -> None:
        self.beat = time.monotonic()
        if not self.loop.is_closed():  # beats on during stop: a free loop is not "held"
            self.loop.call_later(BEAT_S, self._beat)

    def enter(self, coro: Any, task: str, item: Any, timeout: float | None) -> Any:
        """Note that ``coro`` (an async task's call) starts; returns the key for leave."""
        self.calls[coro] = _Call(task, item, timeout)
        return coro

    def leave(self, key: Any) -> None:
        self.calls.pop(key, None)

    # -- in the run's watcher ------------------------------------------------------------
    def _holder(self) -> _Call | None:
        """The async call whose coroutine is running on the loop right now, if any.

        Read from the loop thread's current stack: the innermost frame that belongs to
        a call in flight (a running coroutine's frame is its ``cr_frame``).
        """
        ident = self.thread.ident
        frame = sys._current_frames().get(ident) if ident is not None else None
        if frame is None:
            return None
        by_frame: dict[int, _Call] = {}
        for coro, entry in list(self.calls.items()):
            f = getattr(coro, "cr_frame", None)
            if f is not None:
                by_frame[id(f)] = entry
        current: Any = frame
        while current is not None:
            found = by_frame.get(id(current))
            if found is not None:
                return found
            current = current.f_back
        return None

    def _check(self) -> None:
        if self.stopping or self.loop.is_closed():
            return
        try:
            stalled = time.monotonic() - self.beat
            if stalled >= STALL_S:
                call = self._holder()
                if call is not None:
                    self._act(call, stalled)
        finally:
            self.call_later(CHECK_S, self._check)

    def _act(self, call: _Call, stalled: float) -> None:
        ran = time.monotonic() - call.started
        if call.timeout is not None and ran > call.timeout and not call.interrupted:
            if time.monotonic() - self.beat < STALL_S or self._holder() is not call:
                return  # it just yielded
            call.interrupted = True
            message = (
                f"task {call.task!r} (item {call.item!r}) ran {ran:.1f} s without yielding, past "
                f"its timeout of {call.timeout} s; it was interrupted. A coroutine is "
                "cancellable only at an await: move CPU-bound work to executor='thread' or "
                "'process'"
            )
            _raise_in(self.thread, _timeout_type(message))
            self.log.warning(
                "async_task_interrupted", task=call.task, item_id=call.item, elapsed_s=ran
            )
        elif stalled >= WARN_S and not call.warned:
            call.warned = True
            self.log.warning(
                "async_task_blocking_loop",
                task=call.task,
                item_id=call.item,
                elapsed_s=ran,
                hint=(
                    "this coroutine has not awaited for "
                    f"{stalled:.1f} s: every async task of the run waits for it; give it a "
                    "timeout, await inside its loop, or use executor='thread' / 'process'"
                ),
            )

    # -- at stop (the stopping thread) ---------------------------------------------------
    def stop(self, join: Callable[[float], None]) -> bool:
        """Stop watching; while the loop's thread is held by a coroutine, interrupt it.

        ``join(seconds)`` waits for the loop's thread. Returns True if it ended.
        """
        self.stopping = True
        for _ in range(STOP_TRIES):
            join(1.0)
            if not self.thread.is_alive():
                return True
            if time.monotonic() - self.beat >= STALL_S and self._holder() is not None:
                _raise_in(self.thread, asyncio.CancelledError)  # only into a task's coroutine
        join(1.0)
        if self.thread.is_alive():
            self.log.error(
                "event_loop_stuck",
                hint="a coroutine holds the loop and ignores cancellation; its thread remains",
            )
            return False
        return True


def _timeout_type(message: str) -> type[TaskTimeout]:
    """A ``TaskTimeout`` subclass whose no-argument construction carries ``message``.

    ``PyThreadState_SetAsyncExc`` raises a class, constructed without arguments.
    """

    def __init__(self: TaskTimeout, *args: Any) -> None:
        TaskTimeout.__init__(self, *(args or (message,)))

    return type("TaskTimeout", (TaskTimeout,), {"__init__": __init__, "__module__": __name__})
