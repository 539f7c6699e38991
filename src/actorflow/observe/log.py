"""Structured events through structlog, delivered to stdlib logging.

The library never configures logging: events go to the stdlib logger
``"actorflow"`` (which has a ``NullHandler``), so nothing is printed unless the
application enables it, e.g. ``logging.basicConfig(level=logging.INFO)``.
Event names are past-tense snake_case (``run_started``, ``task_failed``) and
carry the fixed keys ``run_id``, ``task``, ``item_id``, ``attempt``,
``elapsed_s``; they reach stdlib handlers as the record's message, with the
keys in ``record.__dict__`` (``extra``).

structlog is imported, and a bound logger built, only when an event would
reach a handler (its level is enabled and some handler other than a
``NullHandler`` would take it): a silent library costs neither import time
nor per-event work (the first event otherwise builds structlog: ~40 ms).

Example::

    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s %(run_id)s")
    flow.run(x)        # run_started ..., run_finished ...
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["EventLog", "get_logger", "stdlib_logger"]

stdlib_logger = logging.getLogger("actorflow")
stdlib_logger.addHandler(logging.NullHandler())


def get_logger(**initial: Any) -> Any:
    """A structlog logger over the stdlib ``"actorflow"`` logger, bound with ``initial``.

    Example::

        log = get_logger(run_id="r1")
        log.info("run_started", flow="analysis")
    """
    import structlog

    logger = structlog.wrap_logger(
        stdlib_logger,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.stdlib.render_to_log_kwargs,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    return logger.bind(**initial) if initial else logger


class EventLog:
    """Emits structlog events with fixed context, building the logger on first real use.

    Example::

        log = EventLog(run_id="r1", flow="etl")
        log.info("run_started", nodes=3)       # a no-op unless INFO is enabled
    """

    __slots__ = ("_bound", "_context")

    def __init__(self, **context: Any) -> None:
        self._context = context
        self._bound: Any = None

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if not enabled(level):
            return
        if self._bound is None:
            self._bound = get_logger(**self._context)
        getattr(self._bound, method)(event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at DEBUG."""
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at INFO."""
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at WARNING."""
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at ERROR."""
        self._emit(logging.ERROR, "error", event, fields)


def enabled(level: int) -> bool:
    """Whether events at ``level`` would be delivered (cheap: check before building them):
    the level is enabled and a handler other than a ``NullHandler`` would take them
    (checked each time: the application may configure logging at any moment).

    Example::

        if enabled(logging.DEBUG): ...
    """
    if not stdlib_logger.isEnabledFor(level):
        return False
    logger: logging.Logger | None = stdlib_logger
    while logger is not None:
        for handler in logger.handlers:
            if level >= handler.level and not isinstance(handler, logging.NullHandler):
                return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False
