"""Helpers for testing code built on actorflow, and actorflow itself.

Example::

    from actorflow.testing import crash_node

    with flow.start() as running:
        crash_node(running, "parse", times=2)   # the next 2 batches crash internally
        running.submit(x).result()              # the supervisor restarts the node
"""

from __future__ import annotations

from actorflow.errors import GraphError
from actorflow.runtime.running import RunningFlow

__all__ = ["crash_node"]


def crash_node(running: RunningFlow, node: str, *, times: int = 1) -> None:
    """Make ``node`` fail internally on its next ``times`` batches (fault injection).

    The failure is an engine-level error raised where the node's state
    machine starts a batch, before any task runs: exactly what the run's
    supervisor handles by restarting the node (fresh class-task instances,
    the batch replayed) or, past the restart limit, by failing the run.

    Example::

        crash_node(running, "score", times=1)
    """
    for seg in running._segments:
        if any(n.name == node for n in seg.nodes):
            with seg.lock:
                seg.crash_next += times
                seg.crash_target = node
            return
    names = ", ".join(repr(n.name) for seg in running._segments for n in seg.nodes)
    raise GraphError(f"running flow {running.name!r} has no node {node!r}; nodes: {names}")
