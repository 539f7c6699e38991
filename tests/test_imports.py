"""What a cold process pays for: modules actorflow imports only when a run needs them.

A short script's start-up is dominated by imports (W3b cold). asyncio (~30 ms),
the process runtime (cloudpickle, psutil, multiprocessing) and structlog load
only when a graph uses async tasks, process tasks or logging; each check runs a
fresh interpreter, as a user's script would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _modules_after(code: str) -> set[str]:
    """Top-level modules loaded once ``code`` ran in a fresh interpreter."""
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import sys
        print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    return set(out.stdout.split())


THREAD_RUN = """
import actorflow as af

@af.task
def inc(x):
    return x + 1

@af.flow
def two(x):
    return inc(inc(x))

assert two.run(1) == 3
with two.start() as running:
    assert list(running.map([1, 2])) == [3, 4]
"""


def test_a_thread_graph_run_loads_neither_asyncio_nor_the_process_runtime() -> None:
    loaded = _modules_after(THREAD_RUN)
    assert "actorflow" in loaded
    assert "pykka" in loaded
    assert "asyncio" not in loaded  # stopping a run without async tasks used to import it
    assert not {"cloudpickle", "psutil", "structlog"} & loaded


def test_an_async_task_still_gets_its_loop_and_stops_it() -> None:
    loaded = _modules_after(
        """
        import asyncio, threading
        import actorflow as af

        @af.task
        async def later(x):
            await asyncio.sleep(0)
            return x * 2

        @af.flow
        def f(x):
            return later(x)

        assert f.run(21) == 42
        assert not [t for t in threading.enumerate() if t is not threading.main_thread()]
        """
    )
    assert "asyncio" in loaded


def test_import_and_run_print_nothing() -> None:
    out = subprocess.run(
        [sys.executable, "-c", THREAD_RUN], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout == ""
    assert out.stderr == ""


def test_warning_events_build_nothing_while_logging_is_not_configured() -> None:
    # a retry logs task_retried (WARNING): with only actorflow's NullHandler that
    # reached no handler, yet built structlog (and imported asyncio, ssl...: ~40 ms,
    # seen as a first retry 40 ms late); once logging is configured it is delivered
    loaded = _modules_after(
        """
        import logging
        import actorflow as af

        calls = []

        @af.task(retries=1, backoff=af.Backoff(initial=0.01))
        def flaky(x):
            calls.append(x)
            if len(calls) == 1:
                raise ConnectionError("once")
            return x

        @af.flow
        def f(x):
            return flaky(x)

        assert f.run(3) == 3
        assert len(calls) == 2
        """
    )
    assert "structlog" not in loaded
    assert "asyncio" not in loaded
    configured = _modules_after(
        """
        import logging
        import actorflow as af
        from actorflow.observe.log import EventLog

        logging.basicConfig(level=logging.WARNING)
        EventLog(run_id="r").warning("task_retried", attempt=1)
        """
    )
    assert "structlog" in configured
