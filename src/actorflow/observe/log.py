"""Structured events through structlog, delivered to stdlib logging.

The library never configures logging: events go to the stdlib logger
``"actorflow"`` (which has a ``NullHandler``), so nothing is printed unless the
application enables it, e.g. ``logging.basicConfig(level=logging.INFO)``.
Event names are past-tense snake_case (``run_started``, ``task_failed``) and
carry the fixed keys ``run_id``, ``task``, ``item_id``, ``attempt``,
``elapsed_s``; they reach stdlib handlers as the record's message, with the
keys in ``record.__dict__`` (``extra``).

Example::

    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s %(run_id)s")
    flow.run(x)        # run_started ..., run_finished ...
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["get_logger", "stdlib_logger"]

stdlib_logger = logging.getLogger("actorflow")
stdlib_logger.addHandler(logging.NullHandler())


def get_logger(**initial: Any) -> Any:
    """A structlog logger over the stdlib ``"actorflow"`` logger, bound with ``initial``.

    Example::

        log = get_logger(run_id="r1")
        log.info("run_started", flow="analysis")
    """
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


def enabled(level: int) -> bool:
    """Whether events at ``level`` would be delivered (cheap: check before building them)."""
    return stdlib_logger.isEnabledFor(level)
