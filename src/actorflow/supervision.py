"""Supervision policy: how a run reacts when a node fails internally.

Two levels of failure are kept apart:

- a *task* raising on one item is handled by that task's retry policy
  (``retries``, ``backoff``, ``retry_on``, ``timeout`` on :func:`actorflow.task`)
  while the node keeps serving other items; when retries run out the failure
  flows downstream in place of the value;
- a *node* failing (an internal error escaping the node's state machine) is
  handled by the run's supervisor with the restart strategy below. The batch
  the node was processing is put back first, so a restart loses no message
  (delivery is at least once: nodes of a fused chain that ran before the
  error may run again for that batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Supervision"]


@dataclass(frozen=True, slots=True)
class Supervision:
    """The restart policy of a run's supervisor.

    ``strategy``: ``"one_for_one"`` (default) restarts only the failed node;
    ``"with_downstream"`` also restarts every node downstream of it (their
    class-task instances start over too: use it when their state derives from
    the failed node's outputs). A restart gives class tasks fresh instances
    and keeps queued items. More than ``max_restarts`` restarts of one node
    within ``within_s`` seconds escalate: the run fails with an
    :class:`~actorflow.ActorflowError` naming the node and the last error.

    Example::

        @af.flow(supervision=af.Supervision(strategy="with_downstream", max_restarts=3))
        def pipeline(x): ...
    """

    strategy: Literal["one_for_one", "with_downstream"] = "one_for_one"
    max_restarts: int = 5
    within_s: float = 60.0

    def __post_init__(self) -> None:
        if self.strategy not in ("one_for_one", "with_downstream"):
            raise ValueError(
                f"Supervision strategy must be 'one_for_one' or 'with_downstream', "
                f"got {self.strategy!r}"
            )
        if self.max_restarts < 0 or self.within_s <= 0:
            raise ValueError("Supervision needs max_restarts >= 0 and within_s > 0")
