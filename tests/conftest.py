"""Shared fixtures: every test checks that no thread of actorflow outlives it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for ``predicate()`` to hold, polling briefly; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.001)


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail a test that leaves any new thread running (hosts, supervisors, anything).

    Daemon threads that a test abandons on purpose are the only exception
    allowed by the design; no test here abandons one.
    """
    before = _threads()
    yield
    leaked = {
        t
        for t in _threads() - before
        # a timed-out call's runner is abandoned on purpose (a thread cannot be killed)
        if not (t.daemon and t.name.startswith("actorflow-timeout-"))
    }
    assert not leaked, f"threads left running after the test: {sorted(t.name for t in leaked)}"
