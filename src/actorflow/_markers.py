"""Singleton markers shared by the whole package."""

from __future__ import annotations

from typing import Any, Final


class _SkipType:
    """The type of :data:`SKIP`; there is exactly one instance."""

    _instance: _SkipType | None = None

    def __new__(cls) -> _SkipType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "af.SKIP"

    def __reduce__(self) -> Any:
        return (_SkipType, ())

    def __bool__(self) -> bool:
        return False


SKIP: Final = _SkipType()
"""Returned by a task to drop the item.

A node whose task returns ``SKIP`` emits a skip marker: a positional join with
a skipped input is skipped, a gather omits it, a future resolves to ``SKIP``,
``map`` yields ``SKIP`` in its place and ``stream`` yields only real outputs.

Example::

    @af.task
    def keep_errors(ev):
        return ev if ev["level"] == "ERROR" else af.SKIP
"""
