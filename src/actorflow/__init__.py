"""actorflow: an actor-model dataflow engine for Python.

Write plain functions, wire them into a graph, and actorflow turns every node
into a long-lived actor that fires when all inputs of an item have arrived and
forwards its output downstream.

Example::

    import actorflow as af

    @af.task
    def double(x): return 2 * x

    @af.task
    def add(a, b): return a + b

    @af.flow
    def pipeline(x):
        return add(double(x), double(x))

    pipeline.run(3)                       # -> 12
    with pipeline.start() as running:
        list(running.map(range(5)))       # -> [0, 4, 8, 12, 16]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actorflow._markers import SKIP
from actorflow.errors import (
    ActorflowError,
    Failure,
    GraphError,
    RunFailed,
    StoreError,
    TaskTimeout,
    WorkerCrashed,
)
from actorflow.flow import Flow, Node, flow, map
from actorflow.graph import Graph, NodeSpec
from actorflow.pipeline import Pipeline, in_parallel
from actorflow.runtime.running import NodeMetrics, RunningFlow
from actorflow.supervision import Supervision
from actorflow.task import Backoff, Task, task

if TYPE_CHECKING:
    from actorflow.observe.monitor import ResourceMonitor

__all__ = [
    "SKIP",
    "ActorflowError",
    "Backoff",
    "Failure",
    "Flow",
    "Graph",
    "GraphError",
    "Node",
    "NodeMetrics",
    "NodeSpec",
    "Pipeline",
    "ResourceMonitor",
    "RunFailed",
    "RunningFlow",
    "StoreError",
    "Supervision",
    "Task",
    "TaskTimeout",
    "WorkerCrashed",
    "flow",
    "in_parallel",
    "map",
    "task",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # af.ResourceMonitor is imported on first use: psutil and sqlite3 are a third of
    # the time `import actorflow` takes, and most programs never monitor
    if name == "ResourceMonitor":
        from actorflow.observe.monitor import ResourceMonitor

        globals()["ResourceMonitor"] = ResourceMonitor
        return ResourceMonitor
    raise AttributeError(f"module 'actorflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
