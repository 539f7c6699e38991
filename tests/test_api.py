"""The public surface stays curated and documented."""

from __future__ import annotations

import inspect

import pytest

import actorflow as af


def test_all_is_sorted_and_every_name_exists() -> None:
    assert list(af.__all__) == sorted(af.__all__, key=lambda n: (not n.isupper(), n))
    for name in af.__all__:
        assert hasattr(af, name), name


@pytest.mark.parametrize("name", [n for n in af.__all__ if n != "SKIP"])
def test_every_public_name_has_a_docstring_with_an_example(name: str) -> None:
    obj = getattr(af, name)
    doc = inspect.getdoc(obj) or ""
    assert doc, f"af.{name} has no docstring"
    assert "Example" in doc, f"af.{name}'s docstring shows no example"


def test_every_error_derives_from_actorflow_error() -> None:
    for cls in (af.GraphError, af.RunFailed, af.TaskTimeout, af.WorkerCrashed, af.StoreError):
        assert issubclass(cls, af.ActorflowError)


def test_skip_is_a_singleton_that_survives_pickling() -> None:
    import pickle

    assert pickle.loads(pickle.dumps(af.SKIP)) is af.SKIP
    assert repr(af.SKIP) == "af.SKIP"
