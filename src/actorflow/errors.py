"""Errors and the forensic failure record.

Every error actorflow raises derives from :class:`ActorflowError`::

    ActorflowError
    ├── GraphError        a graph is malformed, or an API is used against its shape
    ├── RunFailed         a run (or one item of a long-lived graph) had failures
    ├── TaskTimeout       a task attempt went over its ``timeout``
    ├── WorkerCrashed     a worker process died while running an item
    └── StoreError        the durable store could not be read or written

A task that raises does not raise out of the engine directly: the exception is
captured as an :class:`Failure` (a picklable, JSON-ready forensic record that
holds no live frames), flows downstream in place of the value, and reaches the
caller inside :class:`RunFailed`.
"""

from __future__ import annotations

import os
import reprlib
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

__all__ = [
    "ActorflowError",
    "Failure",
    "GraphError",
    "RunFailed",
    "StoreError",
    "TaskTimeout",
    "WorkerCrashed",
]

_PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__))
_REPR_LIMIT = 1_000


class ActorflowError(Exception):
    """Base class of every error raised by actorflow.

    Example::

        try:
            flow.run(x)
        except af.ActorflowError as exc:
            print("actorflow refused or failed:", exc)
    """


class GraphError(ActorflowError):
    """A graph is malformed or used against its shape.

    Raised when a graph is built (first ``.graph``, ``run`` or ``start``, before
    any actor starts): cycles, unknown or duplicate names, arguments that do not
    bind to a task's signature, a Node used as a Python value. The message names
    the culprit and the fix.

    Example::

        g = af.Graph("etl")
        g.add("load", load, depends_on=["raw"])
        g.run()   # GraphError: task 'load' depends on 'raw', but graph 'etl' has no node 'raw'
    """


class TaskTimeout(ActorflowError):
    """A task attempt went over its ``timeout`` (seconds).

    Example::

        @af.task(timeout=1.0)
        def slow(x): ...
    """


class WorkerCrashed(ActorflowError):
    """A worker process died while it was running an item.

    Example::

        except af.RunFailed as exc:
            crashed = [f for f in exc.failures if f.error_type == "WorkerCrashed"]
    """


class StoreError(ActorflowError):
    """The durable store could not be opened, read or written; names the file.

    Example::

        except af.StoreError as exc:
            print("store problem:", exc)
    """


def safe_repr(value: Any, limit: int = _REPR_LIMIT) -> str:
    """Return ``repr(value)`` truncated to ``limit`` characters, never raising.

    Example::

        >>> safe_repr("x" * 5000, limit=20)[:12]
        "'xxxxxxxxxxx"
    """
    try:
        r = reprlib.Repr()
        r.maxstring = r.maxother = limit
        text = r.repr(value)
        if len(text) <= limit:
            # reprlib abbreviates containers; for short values plain repr is clearer
            full = repr(value)
            text = full if len(full) <= limit else text
    except BaseException as exc:  # a user __repr__ may raise anything
        return f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


@dataclass(frozen=True, slots=True)
class Failure:
    """The forensic record of one failed task attempt (the last one, once retries ran out).

    Always picklable, never holding the live exception or its frames.
    ``file_path`` / ``line_number`` / ``function`` / ``locals`` describe the
    innermost frame of user code (frames inside actorflow are skipped).

    Example::

        try:
            flow.run(1)
        except af.RunFailed as exc:
            f = exc.failures[0]
            print(f.task, f.error_type, f.message, f"{f.file_path}:{f.line_number}")
            print(f.locals)            # {"x": "1", ...}
            json.dumps(f.to_dict())    # JSON-ready
    """

    task: str
    item_id: Any
    run_id: str
    attempt: int
    error_type: str
    message: str
    traceback: str
    file_path: str | None
    line_number: int | None
    function: str | None
    timestamp: float
    inputs: tuple[str, ...]
    locals: dict[str, str]
    pid: int
    thread: str
    executor: str
    _exception: BaseException | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-serialisable dict.

        Example::

            json.dumps(failure.to_dict())
        """
        data = asdict(self)
        data.pop("_exception", None)
        data["item_id"] = _jsonable(self.item_id)
        data["inputs"] = list(self.inputs)
        return data

    def exception(self) -> BaseException:
        """Return an exception equivalent to the original one.

        The original exception object is kept (stripped of its traceback) when
        it survives pickling; otherwise a :class:`RuntimeError` with the same
        type name and message is returned.

        Example::

            raise failure.exception()
        """
        if self._exception is not None:
            return self._exception
        return RuntimeError(f"{self.error_type}: {self.message}")

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self._exception
        if exc is not None:
            try:
                import pickle

                pickle.dumps(exc)
            except Exception:
                exc = None
        values = [getattr(self, name) for name in _FAILURE_FIELDS]
        values[-1] = exc
        return (Failure, tuple(values))

    @classmethod
    def capture(
        cls,
        exc: BaseException,
        *,
        task: str,
        item_id: Any,
        run_id: str,
        attempt: int = 1,
        inputs: tuple[Any, ...] = (),
        executor: str = "thread",
    ) -> Failure:
        """Build the record from a live exception (called where it was caught).

        Example::

            try:
                fn(x)
            except Exception as exc:
                failure = Failure.capture(exc, task="parse", item_id=7, run_id="r1")
        """
        tb = exc.__traceback__
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        frame_info = _innermost_user_frame(tb)
        file_path = line_number = function = None
        local_reprs: dict[str, str] = {}
        if frame_info is not None:
            frame, line_number = frame_info
            file_path = frame.f_code.co_filename
            function = frame.f_code.co_name
            local_reprs = {
                name: safe_repr(value) for name, value in list(frame.f_locals.items())[:50]
            }
        stripped = exc.with_traceback(None)
        stripped.__context__ = None
        return cls(
            task=task,
            item_id=item_id,
            run_id=run_id,
            attempt=attempt,
            error_type=type(exc).__name__,
            message=_message(exc),
            traceback=text,
            file_path=file_path,
            line_number=line_number,
            function=function,
            timestamp=time.time(),
            inputs=tuple(safe_repr(v) for v in inputs),
            locals=local_reprs,
            pid=os.getpid(),
            thread=threading.current_thread().name,
            executor=executor,
            _exception=stripped,
        )


_FAILURE_FIELDS = tuple(Failure.__dataclass_fields__)


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return f"<{type(exc).__name__} with unprintable message>"


def _innermost_user_frame(tb: TracebackType | None) -> tuple[Any, int] | None:
    found = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith((_PACKAGE_DIR, "<actorflow")):
            found = (tb.tb_frame, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, int | str | float):
        return value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return repr(value)


class RunFailed(ActorflowError):
    """A run, or one item of a long-lived graph, ended with failures.

    ``failures`` holds every :class:`Failure` of the run (or of that item);
    ``run_id`` names the run. The message summarises each failure.

    Example::

        try:
            flow.run(x)
        except af.RunFailed as exc:
            for f in exc.failures:
                print(f.task, f.error_type, f.message)
    """

    def __init__(self, failures: list[Failure] | tuple[Failure, ...], run_id: str = "") -> None:
        self.failures: list[Failure] = list(failures)
        self.run_id = run_id
        super().__init__(self._summary())

    def _summary(self) -> str:
        n = len(self.failures)
        head = f"run {self.run_id!r} failed" if self.run_id else "run failed"
        lines = [f"{head}: {n} task failure{'s' if n != 1 else ''}"]
        for f in self.failures[:10]:
            where = f" at {f.file_path}:{f.line_number}" if f.file_path else ""
            lines.append(
                f"  task {f.task!r} (item {f.item_id!r}, attempt {f.attempt}): "
                f"{f.error_type}: {f.message}{where}"
            )
        if n > 10:
            lines.append(f"  ... and {n - 10} more")
        return "\n".join(lines)

    def __reduce__(self) -> tuple[Any, ...]:
        return (RunFailed, (self.failures, self.run_id))


class _InnerFailures(RunFailed):
    """A nested run (a continuation, a parallel branch) failed: carries its own failures.

    The node that ran it reports these records as they are instead of
    wrapping them: inner failures reach ``RunFailed`` as the inner tasks' own.
    """
