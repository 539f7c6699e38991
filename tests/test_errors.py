"""The forensic failure record and the error hierarchy."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

import actorflow as af
from actorflow.errors import safe_repr


class Unreprable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle")


def _capture(exc: BaseException, **kw: Any) -> af.Failure:
    try:
        raise exc
    except BaseException as caught:
        return af.Failure.capture(caught, task="t", item_id=7, run_id="r", **kw)


def test_a_failure_is_picklable_json_ready_and_holds_no_frames() -> None:
    def boom(big: str, odd: Unreprable) -> None:
        raise ValueError("bad value")

    try:
        boom("x" * 100_000, Unreprable())
    except ValueError as exc:
        failure = af.Failure.capture(exc, task="boom", item_id=3, run_id="r1", inputs=(1, "a"))
    assert failure.function == "boom"
    assert failure.line_number is not None
    assert len(failure.locals["big"]) <= 1000  # enormous locals are truncated
    assert failure.locals["odd"].startswith("<unrepresentable Unreprable")
    assert failure.inputs == ("1", "'a'")
    assert failure.exception().__traceback__ is None
    clone = pickle.loads(pickle.dumps(failure))
    assert clone.to_dict() == failure.to_dict()
    data = json.loads(json.dumps(failure.to_dict()))
    assert data["error_type"] == "ValueError"
    assert data["message"] == "bad value"
    assert "Traceback" in data["traceback"]
    assert set(data) >= {"task", "item_id", "run_id", "attempt", "pid", "thread", "executor"}


def test_a_failure_of_an_unpicklable_exception_still_pickles() -> None:
    failure = _capture(Unpicklable("nope"))
    clone = pickle.loads(pickle.dumps(failure))
    assert clone.error_type == "Unpicklable"
    assert "Unpicklable: nope" in str(clone.exception())


def test_run_failed_summarises_every_failure_and_pickles() -> None:
    failures = [_capture(KeyError(i)) for i in range(12)]
    err = af.RunFailed(failures, run_id="r9")
    text = str(err)
    assert text.startswith("run 'r9' failed: 12 task failures")
    assert "... and 2 more" in text
    clone = pickle.loads(pickle.dumps(err))
    assert clone.run_id == "r9"
    assert len(clone.failures) == 12


@pytest.mark.parametrize("value", [Unreprable(), "y" * 5000, list(range(10_000))])
def test_safe_repr_never_raises_and_truncates(value: Any) -> None:
    text = safe_repr(value, limit=100)
    assert len(text) <= 100


def test_a_missing_key_in_node_indexing_names_the_source_node_and_the_fix() -> None:
    # the failure read only "KeyError 'k'", blamed on the consumer or the flow, with no
    # location (acceptance test of issue 2)
    @af.task
    def ident(x: Any) -> Any:
        return x

    @af.task
    def use(v: Any) -> Any:
        return ("used", v)

    @af.flow
    def out_proj(x: Any) -> Any:
        return ident(x)["k"]

    @af.flow
    def mid_proj(x: Any) -> Any:
        return use(ident(x)["k"])

    for flow, prefix in ((out_proj, "the flow's output"), (mid_proj, "task 'use' did not run")):
        with pytest.raises(af.RunFailed) as info:
            flow.run({})
        (failure,) = info.value.failures
        assert failure.error_type == "KeyError"
        assert failure.message.startswith(prefix)
        assert "taking ['k'] from the output of 'ident'" in failure.message
    assert mid_proj.run({"k": 1}) == ("used", 1)
