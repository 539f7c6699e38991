"""The tracing switch: whether task calls build Nodes (inside a flow) or run.

``depth`` is a module global read on every plain task call, so the fast path
outside flows costs one attribute load; the per-thread tracer is consulted
only while some thread is tracing.
"""

from __future__ import annotations

import threading
from typing import Any

depth = 0  # number of threads tracing right now (read without a lock: a hint)
_local = threading.local()
_lock = threading.Lock()


def current() -> Any:
    """The tracer of this thread, or None."""
    return getattr(_local, "tracer", None)


def push(tracer: Any) -> Any:
    """Make ``tracer`` current for this thread; return the previous one."""
    global depth
    previous = getattr(_local, "tracer", None)
    _local.tracer = tracer
    with _lock:
        depth += 1
    return previous


def pop(previous: Any) -> None:
    """Restore the tracer that ``push`` returned."""
    global depth
    _local.tracer = previous
    with _lock:
        depth -= 1
