"""Tasks: plain functions (or classes) that become nodes of a graph.

Outside a flow a task is a plain call, so it is unit-testable as is; inside a
flow being traced, calling it returns a :class:`~actorflow.flow.Node` (its
signature still says it returns the value, as in other tracing APIs).
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from actorflow import _trace
from actorflow.errors import GraphError

if TYPE_CHECKING:
    from actorflow.pipeline import Pipeline

__all__ = ["Backoff", "Task", "task"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay policy between retries of a task.

    The delay before retry ``k`` (1-based) is
    ``min(maximum, initial * factor ** (k - 1))``, spread by ``± jitter * delay``.

    Example::

        @af.task(retries=3, backoff=af.Backoff(initial=0.05, factor=2.0, maximum=2.0))
        def fetch(url): ...
    """

    initial: float = 0.05
    factor: float = 2.0
    maximum: float = 2.0
    jitter: float = 0.1

    def delay(self, retry: int) -> float:
        """The base delay (before jitter) of retry number ``retry`` (1-based).

        Example::

            >>> Backoff(initial=0.1, factor=2.0, maximum=1.0).delay(3)
            0.4
        """
        return float(min(self.maximum, self.initial * self.factor ** (retry - 1)))

    def jittered(self, retry: int, rng: Any = None) -> float:
        """The delay of retry ``retry`` spread uniformly by ``± jitter * delay``.

        Example::

            0.09 <= Backoff(initial=0.1, jitter=0.1).jittered(1) <= 0.11
        """
        import random

        base = self.delay(retry)
        spread: float = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + spread))


_DEFAULT_BACKOFF = Backoff()
_FUNCTION = type(lambda: None)
_CO_GENERATOR = inspect.CO_GENERATOR
_CO_COROUTINE = inspect.CO_COROUTINE
_CO_ASYNC_GENERATOR = inspect.CO_ASYNC_GENERATOR


def _code_kinds(fn: Any) -> tuple[bool, bool, bool]:
    """``(coroutine function, generator function, async generator function)``.

    A plain function answers from its code flags (what :mod:`inspect` reads too,
    after unwrapping partials and methods): ``af.task`` took 8.3 us with three
    ``inspect`` calls, 6 us with this.
    """
    # (3.12+: inspect.markcoroutinefunction marks a plain def as a coroutine function)
    if type(fn) is _FUNCTION and "_is_coroutine_marker" not in fn.__dict__:
        flags = fn.__code__.co_flags
        return (
            bool(flags & _CO_COROUTINE),
            bool(flags & _CO_GENERATOR),
            bool(flags & _CO_ASYNC_GENERATOR),
        )
    return (
        inspect.iscoroutinefunction(fn),
        inspect.isgeneratorfunction(fn),
        inspect.isasyncgenfunction(fn),
    )


# Options described in DESIGN.md whose implementation lands in a later issue.
# They are refused loudly instead of being silently ignored.


class Task(Generic[P, R]):
    """A function or class turned into a graph task by :func:`task`.

    Attributes: ``name``, ``fn`` (the wrapped function or class), ``executor``
    (``"thread"``), ``workers`` (how many calls, or class instances, run at
    once), ``is_class``, and the retry policy ``retries``, ``backoff``,
    ``retry_on``, ``timeout``.

    Example::

        @af.task(workers=4)
        def fetch(url: str) -> bytes: ...

        fetch("http://x")        # outside a flow: a plain call
        fetch.name, fetch.workers
    """

    __slots__ = (
        "__dict__",
        "__wrapped__",
        "backoff",
        "concurrency",
        "executor",
        "fn",
        "is_class",
        "key",
        "name",
        "retries",
        "retry_on",
        "timeout",
        "workers",
    )

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        executor: str = "thread",
        workers: int = 1,
        retries: int = 0,
        backoff: Backoff | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        timeout: float | None = None,
        key: Callable[[Any], Any] | None = None,
        concurrency: int = 100,
    ) -> None:
        if isinstance(fn, Task):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(f"af.task needs a function or a class, got {fn!r}")
        self.fn: Callable[..., Any] = fn
        self.is_class = isinstance(fn, type)
        self.name: str = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.executor = executor
        self.workers = workers
        self.retries = retries
        self.backoff = backoff or _DEFAULT_BACKOFF
        self.retry_on = retry_on
        self.timeout = timeout
        self.key = key
        self.concurrency = concurrency
        self.__wrapped__ = fn
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task (outside a flow) or add a node (inside a flow being traced).

        Inside a flow the return value is a Node standing for the result.
        """
        if _trace.depth:
            tracer = _trace.current()
            if tracer is not None:
                return tracer.call(self, args, kwargs)  # type: ignore[no-any-return]
        if self.is_class:
            return self.fn()(*args, **kwargs)  # type: ignore[no-any-return]
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]

    def send(self, *args: P.args, **kwargs: P.kwargs) -> Pipeline:
        """Start a pipeline with this call; continue it with ``.continue_with(...)``.

        Example::

            multiply.send(3, 2).continue_with(divide, 2).run()   # -> 3.0
        """
        from actorflow.pipeline import send

        return send(self, *args, **kwargs)

    def signature(self) -> inspect.Signature:
        """The signature the task is called with (a class task's ``__call__``).

        Example::

            parse.signature().parameters.keys()
        """
        return _signature(self.fn, self.is_class)

    def __repr__(self) -> str:
        return f"<af.task {self.name!r}>"

    def __reduce__(self) -> str | tuple[Any, ...]:
        # A decorated module-level task is importable under its function's name:
        # pickle it by reference (the function itself is shadowed by the task).
        module = sys.modules.get(getattr(self.fn, "__module__", None) or "")
        qualname = getattr(self.fn, "__qualname__", "")
        if module is not None and "<locals>" not in qualname:
            target: Any = module
            for part in qualname.split("."):
                target = getattr(target, part, None)
            if target is self:
                return qualname
        return (_rebuild_task, (self.fn, self._options()))

    def _options(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "executor": self.executor,
            "workers": self.workers,
            "retries": self.retries,
            "backoff": self.backoff,
            "retry_on": self.retry_on,
            "timeout": self.timeout,
            "key": self.key,
            "concurrency": self.concurrency,
        }

    def retryable(self, exc: BaseException, attempt: int) -> bool:
        """Whether attempt number ``attempt`` failing with ``exc`` gets another try.

        Example::

            fetch.retryable(ConnectionError(), attempt=1)   # True with retries >= 1
        """
        if attempt > self.retries or not isinstance(exc, Exception):
            return False
        return self.retry_on is None or isinstance(exc, self.retry_on)


_ANY_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)


@functools.lru_cache(maxsize=4096)
def _signature(fn: Any, is_class: bool) -> inspect.Signature:
    target: Any = fn.__call__ if is_class else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature
        return _ANY_SIGNATURE
    if is_class:  # the instance is bound at run time: drop `self`
        params = list(sig.parameters.values())[1:]
        sig = sig.replace(parameters=params)
    return sig


def _rebuild_task(fn: Any, options: dict[str, Any]) -> Task[Any, Any]:
    return Task(fn, **options)


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    executor: str = "thread",
    workers: int = 1,
    retries: int = 0,
    backoff: Backoff | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    timeout: float | None = None,
    key: Callable[[Any], Any] | None = None,
    concurrency: int = 100,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    executor: str = "thread",
    workers: int = 1,
    retries: int = 0,
    backoff: Backoff | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    timeout: float | None = None,
    key: Callable[[Any], Any] | None = None,
    concurrency: int = 100,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Turn a function (or a class: a stateful task) into a task.

    Bare (``@af.task``) or with options (``@af.task(name=..., workers=...)``).
    ``workers=N`` allows up to N concurrent calls of a function task, or N
    instances of a class task (one instance serves one call at a time). A
    class task keeps its state for as long as the graph runs; every ``run()``
    and ``start()`` gets fresh instances.

    Retry policy: ``retries=N`` allows up to N+1 calls per item; the delay
    before retry k is ``backoff.delay(k)`` spread by its jitter; ``retry_on``
    limits retries to those exception classes (default: any ``Exception``);
    ``timeout`` (seconds) fails an attempt that runs longer with
    :class:`~actorflow.TaskTimeout` (a thread cannot be killed: it is
    abandoned, its late result discarded and counted). A pending retry waits
    on a timer, never blocking the node's other items; a retried item is
    emitted when it succeeds, after items that arrived later.

    A coroutine function (``async def``) becomes an async task: it runs on an
    event loop owned by the running graph, with up to ``concurrency`` awaits
    in flight per node (default 100); a timeout cancels the coroutine.

    A class task with ``key=`` and ``workers=N`` has N instances; every item
    goes to instance ``stable_hash(key(item)) % N``, so items with the same key
    always reach the same instance (a hash stable across processes, not
    Python's salted ``hash()``). Without ``key``, items go to any free instance
    (an async class task's batches take its instances in turn).

    ``executor="process"`` runs the task's calls in the running graph's pool of
    worker processes (shared by all its process tasks; ``processes=`` on
    ``run`` / ``start``, default: the number of cores); ``workers=N`` is how
    many of the node's calls (or, for class tasks, instances) run at once.
    The function is shipped once per worker with cloudpickle; an unpicklable
    one is refused when the graph is built, naming the offending object.

    Example::

        @af.task
        def parse(line: str) -> dict:
            return json.loads(line)

        @af.task(name="fetch", workers=8, retries=3, retry_on=(ConnectionError,), timeout=5.0)
        def fetch(url: str) -> bytes: ...

        @af.task(executor="process", workers=2)
        def score(rows: list[dict]) -> float: ...

        @af.task
        class Counter:
            def __init__(self):
                self.seen = 0
            def __call__(self, ev):
                self.seen += 1
                return self.seen

        parse('{"a": 1}')    # -> {"a": 1}: outside a flow, a plain call
    """

    def wrap(f: Callable[P, R]) -> Task[P, R]:
        label = name or getattr(f, "__name__", None) or repr(f)
        target_fn = f.fn if isinstance(f, Task) else f
        if key is not None and not (inspect.isclass(target_fn) and callable(key)):
            raise GraphError(
                f"task {label!r}: key= routes items to the instances of a class task (state "
                "per key); make the task a class with __call__, or drop key= "
                "(a function task keeps no state)"
            )
        target = f.fn if isinstance(f, Task) else f
        is_coroutine, is_generator, is_async_generator = _code_kinds(target)
        if not is_coroutine and isinstance(target, type):
            is_coroutine = inspect.iscoroutinefunction(target.__call__)
        kind = executor
        if is_coroutine:
            if executor not in ("thread", "async"):  # a coroutine cannot cross processes
                raise GraphError(
                    f"task {label!r} is a coroutine function: it runs on the run's event "
                    f"loop (executor='async'), not executor={executor!r}"
                )
            kind = "async"
        elif executor == "async":
            raise GraphError(
                f"task {label!r}: executor='async' needs a coroutine function (async def)"
            )
        if kind not in ("thread", "async", "process"):
            raise GraphError(
                f"task {label!r}: unknown executor={executor!r}; use 'thread' (default), "
                "'process' (CPU-bound work in worker processes) or 'async' (coroutines)"
            )
        if is_async_generator:
            raise GraphError(
                f"task {label!r} is an async generator: generator (flat-map) tasks arrive "
                "with the streaming operators; return a list for now"
            )
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise GraphError(
                f"task {label!r}: concurrency must be an int >= 1, got {concurrency!r}"
            )
        if concurrency != 100 and kind != "async":  # (100: the default)
            raise GraphError(
                f"task {label!r}: concurrency= bounds the awaits of an async task (async "
                f"def); this is a {kind} task, which runs up to workers= calls at once: use "
                "workers=N"
            )
        if is_generator:
            raise GraphError(
                f"task {label!r} is a generator function: generator (flat-map) tasks arrive "
                "with the streaming operators; return a list for now"
            )
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise GraphError(f"task {label!r}: workers must be an int >= 1, got {workers!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise GraphError(f"task {label!r}: retries must be an int >= 0, got {retries!r}")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise GraphError(
                f"task {label!r}: backoff must be an af.Backoff(initial=, factor=, maximum=, "
                f"jitter=), got {backoff!r}"
            )
        on: Any = retry_on
        if isinstance(on, type):
            on = (on,)  # a single exception class is accepted as a 1-tuple
        if on is not None and not (
            isinstance(on, tuple)
            and all(isinstance(e, type) and issubclass(e, BaseException) for e in on)
        ):
            raise GraphError(
                f"task {label!r}: retry_on must be a tuple of exception classes, "
                f"e.g. retry_on=(ConnectionError,), got {retry_on!r}"
            )
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise GraphError(f"task {label!r}: timeout must be seconds > 0, got {timeout!r}")
        return Task(
            f,
            name=name,
            executor=kind,
            workers=workers,
            retries=retries,
            backoff=backoff,
            retry_on=on,
            timeout=None if timeout is None else float(timeout),
            key=key,
            concurrency=concurrency,
        )

    if fn is not None:
        return wrap(fn)
    return wrap


def stable_hash(value: Any) -> int:
    """A hash of ``value`` that is the same in every process (keyed routing).

    Strings and bytes hash by content (CRC-32), ints are themselves, tuples
    combine their elements; anything else hashes its ``repr``.

    Example::

        stable_hash("checkout") % 4   # the same in every interpreter
    """
    if isinstance(value, str):
        return zlib.crc32(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray):
        return zlib.crc32(value)
    if isinstance(value, int):
        return value
    if isinstance(value, tuple):
        h = 0x345678
        for v in value:
            h = (h * 1000003) ^ stable_hash(v)
            h &= 0xFFFFFFFFFFFF
        return h
    return zlib.crc32(repr(value).encode("utf-8", "surrogatepass"))


def as_task(fn: Any) -> Task[Any, Any]:
    """Return ``fn`` as a Task (wrapping a plain callable with default options).

    Example::

        as_task(len).name   # 'len'
    """
    if isinstance(fn, Task):
        return fn
    try:
        return _PLAIN_TASKS[fn]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable or unhashable
        pass
    wrapped: Task[Any, Any] = task(fn)
    try:
        _PLAIN_TASKS[fn] = wrapped
    except TypeError:
        pass
    return wrapped


# plain callables added to graphs, wrapped once (a Task with default options is immutable)
_PLAIN_TASKS: weakref.WeakKeyDictionary[Any, Task[Any, Any]] = weakref.WeakKeyDictionary()
