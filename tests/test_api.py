"""The public surface stays curated and documented."""

from __future__ import annotations

import inspect
import subprocess
import sys

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


def test_import_leaves_the_monitor_and_psutil_until_first_use() -> None:
    # psutil and sqlite3 were a third of `import actorflow`; most programs never monitor
    code = (
        "import sys, actorflow as af\n"
        "print('psutil' in sys.modules, 'sqlite3' in sys.modules)\n"
        "print(af.ResourceMonitor.__name__, 'ResourceMonitor' in dir(af))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split("\n")
    assert out[0] == "False False"
    assert out[1] == "ResourceMonitor True"
